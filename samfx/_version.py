"""The package version, read from ``samfx/VERSION`` (the one place it is written).

Kept apart from ``samfx/__init__.py`` so that modules recording the version
(reports, saved models, ONNX metadata) do not import the package root, which
imports every layer.

Example::

    >>> from samfx._version import __version__
    >>> __version__.count(".") >= 1
    True
"""

from pathlib import Path

__all__ = ["__version__"]

__version__ = (Path(__file__).parent / "VERSION").read_text().strip()
