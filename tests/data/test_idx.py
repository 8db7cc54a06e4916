"""The IDX reader: files written here from the format's definition, gzipped or not, truncated or foreign."""

import gzip
import struct

import numpy as np
import pytest

from dsd2.data import DataError
from dsd2.data.idx import read_idx

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of `array`: 00 00, type code, dimensions, big-endian sizes, big-endian values."""
    header = bytes([0, 0, CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.count(". ") == 0


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(CODES))
def test_every_type_reads_back_in_native_order(tmp_path, gz, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    got = read_idx(write(tmp_path / "a.idx", idx_bytes(array), gz))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative and got.shape == (3, 5, 7)
    assert np.array_equal(got, array)
    got[0, 0, 0] = 1  # a writable copy: torch.from_numpy takes it as it is


def test_gzip_is_recognised_by_its_bytes_not_the_name(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    assert np.array_equal(read_idx(write(tmp_path / "plain.gz", idx_bytes(labels), gz=False)), labels)
    assert np.array_equal(read_idx(write(tmp_path / "packed", idx_bytes(labels), gz=True)), labels)


def test_the_header_sizes_are_big_endian(tmp_path):
    images = np.zeros((2, 300, 1), dtype=np.uint8)  # 300 = 0x0000012c: little-endian would read 0x2c010000
    data = idx_bytes(images)
    assert data[4:16] == bytes.fromhex("00000002 0000012c 00000001")
    assert read_idx(write(tmp_path / "i", data, gz=False)).shape == (2, 300, 1)


def read_error(path) -> str:
    with pytest.raises(DataError) as info:
        read_idx(path, fix="fetch it again")
    message = str(info.value)
    assert str(path) in message and message.endswith("; fetch it again") and one_sentence(message), message
    return message


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("keep, words", [
    (3, "is truncated: 3 bytes, shorter than an IDX header"),
    (9, "is truncated: its header announces 3 dimensions and ends after 9 bytes"),
    (16 + 4 * 28 * 28 - 1, "is truncated: its header announces 4x28x28 values of uint8 (3,136 bytes), it holds 3,135"),
])
def test_a_truncated_file_is_one_sentence_naming_it(tmp_path, gz, keep, words):
    data = idx_bytes(np.ones((4, 28, 28), dtype=np.uint8))[:keep]
    assert words in read_error(write(tmp_path / "train-images-idx3-ubyte", data, gz))


def test_a_cut_gzip_stream_is_one_sentence_naming_it(tmp_path):
    packed = gzip.compress(idx_bytes(np.ones((50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(packed[: len(packed) // 2])
    assert "is a truncated or damaged gzip file (EOFError)" in read_error(path)


def test_bytes_past_the_announced_values_are_refused(tmp_path):
    data = idx_bytes(np.ones(6, dtype=np.uint8)) + b"\0"
    assert "is longer than its header says: its header announces 6 values of uint8 (6 bytes), it holds 7" in \
        read_error(write(tmp_path / "labels", data, gz=False))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("head", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x89PNG"])
def test_a_wrong_magic_number_is_one_sentence_naming_the_file(tmp_path, gz, head):
    data = head + struct.pack(">I", 2) + b"\0\0"
    message = read_error(write(tmp_path / "labels", data, gz))
    assert f"is not an IDX file: it starts with bytes {head.hex(' ')}, not 00 00 then a type code" in message


def test_a_missing_file_is_one_sentence_naming_it(tmp_path):
    assert "cannot read" in read_error(tmp_path / "nowhere-idx1-ubyte")
