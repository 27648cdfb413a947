"""Emitters: deploy an optimized model outside eager PyTorch (ONNX, torch.compile).

Submodules load on first use, so ``import samfx`` stays light.
"""
