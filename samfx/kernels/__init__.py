"""Custom ops with plain-PyTorch references; passes call them, never the reverse.

Each op module registers its ops under ``torch.ops.samfx`` when imported.
"""
