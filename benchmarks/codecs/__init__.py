"""Baseline codecs samfx's hyper codec is measured against (benchmark-only, not shipped)."""
