"""IDX files (the format of MNIST and Fashion-MNIST), gzipped or not, read into numpy arrays; a truncated or
foreign file is refused in one sentence naming it.

The format: two zero bytes, a type code (0x08 unsigned byte ... 0x0E double), the number of dimensions, each
dimension as a big-endian uint32, then the values, big-endian, in C order.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from dsd2.data.raw import DataError

IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path, fix: str = "fetch the file again") -> np.ndarray:
    """The array an IDX file holds, in native byte order. Gzip is recognised by its magic bytes, not the file
    name. Raises DataError, ending with `fix`, for a file that is unreadable, truncated or not IDX."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"'{path}' is a truncated or damaged gzip file ({exc.__class__.__name__}); {fix}") from None
    except OSError as exc:
        raise DataError(f"cannot read '{path}' ({exc.strerror or exc.__class__.__name__}); {fix}") from None
    return parse_idx(data, path, fix)


def parse_idx(data: bytes, path: str | Path, fix: str = "fetch the file again") -> np.ndarray:
    """The array held by the bytes of an IDX file (`path` names it in errors)."""
    if len(data) < 4:
        raise DataError(f"'{path}' is truncated: {len(data)} bytes, shorter than an IDX header; {fix}")
    if data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise DataError(f"'{path}' is not an IDX file: it starts with bytes {data[:4].hex(' ')}, not 00 00 then a "
                        f"type code ({', '.join(f'{c:02x}' for c in IDX_TYPES)}); {fix}")
    dtype, ndim = IDX_TYPES[data[2]], data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise DataError(f"'{path}' is truncated: its header announces {ndim} dimensions and ends after "
                        f"{len(data)} bytes; {fix}")
    dims = struct.unpack(f">{ndim}I", data[4:start])
    count = math.prod(dims)
    expected, held = count * dtype.itemsize, len(data) - start
    if held != expected:
        what = "is truncated" if held < expected else "is longer than its header says"
        raise DataError(f"'{path}' {what}: its header announces {'x'.join(map(str, dims))} values of {dtype.name} "
                        f"({expected:,} bytes), it holds {held:,}; {fix}")
    return np.frombuffer(data, dtype, count, start).reshape(dims).astype(dtype.newbyteorder("="))
