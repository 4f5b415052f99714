"""Compact vector formats: half-precision bytes, scalar (int8/uint8) and binary quantization.

Applied to the finished vectors (after Matryoshka truncation and normalisation). Request fields:

- `encoding_format` (OpenAI): `float` (JSON numbers) or `base64` (the raw little-endian bytes).
- `embed_dtype` (vLLM): the width of the float bytes under `base64`: float32, float16 or bfloat16.
- `endianness` (vLLM): byte order of those bytes: little (default), big, or native (this host's).
- `output_dtype` (Voyage; the values are Cohere's and sentence-transformers'): float, int8, uint8,
  binary, ubinary. Integers are JSON lists of ints, or their bytes in base64.

The integer formats follow sentence-transformers' `quantize_embeddings` exactly, so that codes made
here and codes a client makes locally with the same ranges agree:

- uint8: trunc((v - min) / step), step = (max - min) / 255, in float32, clipped to 0..255
- int8: trunc((v - min) / step - 128), clipped to -128..127
- ubinary: the sign bits v > 0, packed 8 to a byte, first component in the high bit
  (numpy.packbits); a last partial byte is padded with 0 bits
- binary: ubinary - 128, as int8

`min` and `max` are per component, from the calibration (engine/calibration.py). Nothing here
knows about HTTP: a bad value raises FormatError, which the request parser turns into a 400.
"""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

ENCODING_FORMATS = ("float", "base64")
EMBED_DTYPES = ("float32", "float16", "bfloat16")
ENDIANNESS = ("little", "big", "native")
OUTPUT_DTYPES = ("float", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # the formats that need per-component ranges
MIN_RANGE_WIDTH = 1e-6  # a component whose calibration values are all equal gets this width


class FormatError(ValueError):
    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class OutputFormat:
    encoding_format: str = "float"
    embed_dtype: str = "float32"
    output_dtype: str = "float"
    endianness: str = "little"

    @property
    def plain(self) -> bool:
        """float32 numbers or float32 little-endian bytes: the response encoder's fast path."""
        return self.output_dtype == "float" and (
            self.encoding_format == "float" or (self.embed_dtype == "float32" and self.byteorder == "little"))

    @property
    def calibrated(self) -> bool:
        return self.output_dtype in CALIBRATED

    @property
    def byteorder(self) -> str:
        return sys.byteorder if self.endianness == "native" else self.endianness


PLAIN = OutputFormat()


def _choice(body: dict, key: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise FormatError(f"{key} must be a string, one of {', '.join(allowed)}.", key, "invalid_type")
    if value not in allowed:
        raise FormatError(f"{key} must be one of {', '.join(allowed)}, got {value!r}.", key)
    return value


def parse_output_format(body: dict) -> OutputFormat:
    """The output fields of a request body; FormatError names the offending field."""
    encoding = _choice(body, "encoding_format", ENCODING_FORMATS, "float")
    embed_dtype = _choice(body, "embed_dtype", EMBED_DTYPES, "float32")
    endianness = _choice(body, "endianness", ENDIANNESS, "little")
    output_dtype = _choice(body, "output_dtype", OUTPUT_DTYPES, "float")
    if embed_dtype != "float32":
        if output_dtype != "float":
            raise FormatError(f"embed_dtype {embed_dtype} applies to float vectors; output_dtype {output_dtype} "
                              "has its own width: leave embed_dtype out.", "embed_dtype")
        if encoding == "float":
            raise FormatError(f"embed_dtype {embed_dtype} sets the width of the base64 bytes: send "
                              "encoding_format 'base64' with it (JSON numbers are always float32 values).",
                              "embed_dtype")
    return OutputFormat(encoding, embed_dtype, output_dtype, endianness)


# --------------------------------------------------------------------------- encoders


def bfloat16_bits(vectors: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 as uint16 bit patterns, rounded to nearest, ties to even (as torch does)."""
    bits = np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def quantize(vectors: np.ndarray, output_dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """float32 rows -> int8 / uint8 / binary / ubinary rows (sentence-transformers' conventions).

    `ranges` is (2, dimensions): the per-component minimum and maximum (int8 and uint8 only).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if output_dtype in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return packed if output_dtype == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if output_dtype not in CALIBRATED:
        raise ValueError(f"not a quantized output_dtype: {output_dtype!r}")
    if ranges is None or ranges.shape != (2, vectors.shape[-1]):
        raise ValueError("int8/uint8 need ranges of shape (2, dimensions)")
    starts = ranges[0].astype(np.float32)
    steps = (ranges[1].astype(np.float32) - starts) / np.float32(255)
    buckets = (vectors - starts) / steps
    if output_dtype == "uint8":
        return np.clip(np.trunc(buckets), 0, 255).astype(np.uint8)
    return np.clip(np.trunc(buckets - np.float32(128)), -128, 127).astype(np.int8)


def dequantize(codes: np.ndarray, output_dtype: str, ranges: np.ndarray) -> np.ndarray:
    """int8 / uint8 codes -> approximate float32 components (each within one step of the original)."""
    starts = ranges[0].astype(np.float32)
    steps = (ranges[1].astype(np.float32) - starts) / np.float32(255)
    buckets = codes.astype(np.float32) + (np.float32(128) if output_dtype == "int8" else np.float32(0))
    return starts + (buckets + np.float32(0.5)) * steps


def encode_rows(vectors: np.ndarray, fmt: OutputFormat, ranges: np.ndarray | None = None) -> list[Any]:
    """The `embedding` value of each row in the requested format (for anything but PLAIN)."""
    if fmt.output_dtype != "float":
        rows = quantize(vectors, fmt.output_dtype, ranges)
        if fmt.encoding_format == "float":
            return rows.tolist()
    elif fmt.embed_dtype == "bfloat16":
        rows = bfloat16_bits(vectors)
    else:
        rows = np.asarray(vectors, dtype=np.float16 if fmt.embed_dtype == "float16" else np.float32)
    if rows.dtype.itemsize > 1:
        rows = rows.astype(rows.dtype.newbyteorder("<" if fmt.byteorder == "little" else ">"))
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def ranges_of(vectors: np.ndarray) -> np.ndarray:
    """(2, dimensions) float32: per-component minimum and maximum of the calibration vectors; a
    component with no spread gets MIN_RANGE_WIDTH around its value, so that every step is > 0."""
    low = vectors.min(axis=0).astype(np.float32)
    high = vectors.max(axis=0).astype(np.float32)
    flat = (high - low) < MIN_RANGE_WIDTH
    low[flat] -= np.float32(MIN_RANGE_WIDTH / 2)
    high[flat] += np.float32(MIN_RANGE_WIDTH / 2)
    return np.stack([low, high])
