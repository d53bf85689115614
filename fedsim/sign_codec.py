"""1-bit sign codec: a weight array ``s·sgn(W)`` (one float32 scale ``s``) sent as packed sign bits.

A binarised layer (ReSTE, Wu et al., ICCV 2023, arXiv 2308.06689) computes with ``mean|W|·sign(W)``;
its reply needs one bit per weight plus one scale per layer. This module packs such an array into
``np.packbits(W > 0)`` (uint8, ``ceil(numel/8)`` bytes, big bit order, zero padding) and a float32
scale, and unpacks it back to the dense float32 array, bit for bit.

Exactness: the codec accepts only arrays whose every entry is ``+s`` or ``-s`` for one float32
``s ≥ 0`` (:func:`is_sign_binary`). ReSTE's uplink maps an exact zero latent weight to ``+s``
(a 1-bit code has no third value), so what it sends always round-trips exactly. With ``s = 0``
every entry decodes to ``+0.0``.

Wire format of a reply (written by :func:`encode_arrays`, read by
:func:`fedsim.strategies.replies.decode_sign_reply`): in the reply's ``arrays`` record every packed
key ``k`` holds the uint8 bits instead of the dense weights; the ConfigRecord ``codec`` lists the
packed keys under ``sign1`` and their scales, in the same order, under ``sign1.scale``. The shape is
not sent: the receiver takes it from the global model (the reply's shape must equal it anyway).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

__all__ = ["CODEC_RECORD", "KEYS_FIELD", "SCALES_FIELD", "MARKER_PREFIX", "encode_arrays", "is_sign_binary",
           "pack_signs", "packed_size", "unpack_signs"]

#: name of the reply's ConfigRecord describing the packed arrays
CODEC_RECORD = "codec"
#: field of that record listing the packed keys of the ``arrays`` record
KEYS_FIELD = "sign1"
#: field of that record holding each packed key's scale (float32 values, same order)
SCALES_FIELD = "sign1.scale"
#: a plugin metric ``MARKER_PREFIX + key`` asks the client's reply to pack the array ``key``
MARKER_PREFIX = "codec.sign1:"


def packed_size(shape: tuple[int, ...]) -> int:
    """Bytes of the packed bits of an array of ``shape``: ``ceil(numel / 8)``."""
    return (math.prod(shape) + 7) // 8


def is_sign_binary(w: np.ndarray) -> bool:
    """True when ``w`` is a non-empty float32 array whose entries are all ``+s`` or ``-s`` for one finite
    ``s`` (so :func:`pack_signs` represents it exactly)."""
    if w.dtype != np.float32 or w.size == 0:
        return False
    s = np.abs(w.reshape(-1)[0])
    return bool(np.isfinite(s) and np.all(np.abs(w) == s))


def pack_signs(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """``(np.packbits(w > 0), s)`` of a sign-binary array ``w`` (``ValueError`` if it is not one)."""
    w = np.asarray(w)
    if not is_sign_binary(w):
        raise ValueError("the sign codec packs only non-empty float32 arrays of +s/-s entries (one scale s)")
    scale = np.float32(np.abs(w.reshape(-1)[0]))
    return np.packbits(w.reshape(-1) > 0), scale


def unpack_signs(bits: np.ndarray, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    """The dense float32 array of ``shape`` that :func:`pack_signs` packed into ``(bits, scale)``.

    ``ValueError`` when ``bits`` is not a 1-D uint8 array of ``ceil(numel/8)`` bytes with zero padding
    bits, or ``scale`` is not a finite, non-negative float32 value.
    """
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if bits.dtype != np.uint8 or bits.ndim != 1:
        raise ValueError(f"packed bits must be a 1-D uint8 array, got {bits.dtype}{tuple(bits.shape)}")
    if n == 0 or bits.size != packed_size(shape):
        raise ValueError(f"{bits.size} packed bytes do not fit shape {shape} ({packed_size(shape)} expected)")
    s = np.float32(scale)
    if not (math.isfinite(float(scale)) and float(s) == float(scale) and s >= 0):
        raise ValueError(f"scale must be a finite non-negative float32 value, got {scale!r}")
    signs = np.unpackbits(bits)
    if signs[n:].any():
        raise ValueError("the padding bits after the last weight must be zero")
    dense = np.where(signs[:n].astype(bool), s, -s).astype(np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    return dense.reshape(shape)


def encode_arrays(arrays: ArrayRecord, keys: Iterable[str]) -> tuple[ArrayRecord, ConfigRecord | None]:
    """``arrays`` with every listed key that holds a sign-binary array replaced by its packed bits, and
    the ``codec`` record describing them (``None`` when nothing was packed). A listed array that is not
    sign-binary (e.g. a Byzantine client's corruption of it) travels dense, as it is."""
    from fedsim.wire import from_numpy, to_numpy

    wanted = set(keys)
    out: dict = {}
    packed: list[str] = []
    scales: list[float] = []
    for k, a in arrays.items():
        w = to_numpy(a) if k in wanted else None
        if w is not None and is_sign_binary(w):
            bits, s = pack_signs(w)
            out[k] = from_numpy(bits)
            packed.append(k)
            scales.append(float(s))
        else:
            out[k] = a
    if not packed:
        return arrays, None
    return ArrayRecord(out), ConfigRecord({KEYS_FIELD: packed, SCALES_FIELD: scales})
