"""Weight codecs: how samfx turns tensors into fewer bits, and how it stores them.

Two kinds live here:

* **quantizers**, lossy: :mod:`samfx.codecs.lattice` (samfx's hyper codec: pairs
  of weights on the hexagonal lattice, per-row centre and step, fixed-width
  runtime codes; the baselines it is measured against, Birkhoff's codec and
  round-to-nearest integers, live with the benchmarks in ``benchmarks/codecs``);
* **tensor codecs**, lossless: how a tensor is written into a checkpoint.
  :func:`samfx.save` stores a tensor through the codec its module names
  (``module.samfx_tensor_codecs()``), so runtime codes kept fixed-width for the
  kernels are entropy-coded in the file and decoded back bit for bit.

Example::

    >>> import torch
    >>> from samfx.codecs import get_tensor_codec
    >>> codec = get_tensor_codec("zlib/1")
    >>> x = torch.arange(1000)
    >>> data = codec.encode(x, {})
    >>> torch.equal(codec.decode(data, {}, x.dtype, tuple(x.shape)), x)
    True
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["TensorCodec", "get_tensor_codec", "list_tensor_codecs", "register_tensor_codec", "huffman", "unhuffman"]


@dataclass(frozen=True)
class TensorCodec:
    """A lossless way to write a tensor into a checkpoint.

    Attributes:
        name: ``family/version``; the version changes whenever the byte format does,
            and readers refuse names they do not know.
        encode: ``(tensor, params) -> bytes``.
        decode: ``(bytes, params, dtype, shape) -> tensor``; must return exactly
            the tensor that was encoded.
    """

    name: str
    encode: Callable[[torch.Tensor, dict[str, Any]], bytes]
    decode: Callable[[bytes, dict[str, Any], torch.dtype, tuple[int, ...]], torch.Tensor]


_CODECS: dict[str, TensorCodec] = {}


def register_tensor_codec(codec: TensorCodec) -> TensorCodec:
    if "/" not in codec.name:
        raise ValueError(f"a tensor codec name is family/version, got {codec.name!r}")
    _CODECS[codec.name] = codec
    return codec


def get_tensor_codec(name: str) -> TensorCodec:
    if name not in _CODECS:
        from . import lattice  # noqa: F401  (registers the lattice-code codec)
    try:
        return _CODECS[name]
    except KeyError:
        raise KeyError(f"unknown tensor codec {name!r} (this samfx knows {sorted(_CODECS)})") from None


def list_tensor_codecs() -> list[str]:
    return sorted(_CODECS)


def huffman(data: np.ndarray) -> bytes:
    """Entropy-code a byte array: deflate restricted to Huffman coding.

    Weight codes are memoryless symbols, so string matching (LZ77) finds
    nothing; Huffman-only deflate is within a few hundredths of a bit of the
    symbols' entropy and runs at hundreds of MB/s.
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return packer.compress(np.ascontiguousarray(data, dtype=np.uint8).tobytes()) + packer.flush()


def unhuffman(data: bytes) -> np.ndarray:
    return np.frombuffer(zlib.decompress(data), dtype=np.uint8)


def _zlib_encode(tensor: torch.Tensor, params: dict[str, Any]) -> bytes:
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.compress(raw.tobytes(), 6)


def _zlib_decode(data: bytes, params: dict[str, Any], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(zlib.decompress(data)), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone()


#: Lossless deflate of the raw bytes, for tensors that compress (index tables, zeros).
ZLIB = register_tensor_codec(TensorCodec("zlib/1", _zlib_encode, _zlib_decode))
