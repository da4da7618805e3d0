import bz2
import functools
import io
import struct
import zipfile

import numpy as np
import pytest

from conversions import convert
from task import make_instance

# Each zip header field: its offset in a local header, in a central header, and its format.
HEADER_FIELDS = {"flags": (6, 8, "<H"), "method": (8, 10, "<H"), "size": (22, 24, "<I")}
BZ2_BLOCK, BZ2_END = f"{0x314159265359:048b}", f"{0x177245385090:048b}"  # bzip2's block and end-of-stream magics


@pytest.fixture
def save(tmp_path):
    """Write a dict of arrays as an .npz submission and return its path."""
    def _save(weights: dict, name: str = "sub.npz"):
        path = tmp_path / name
        np.savez(path, **weights)
        return path
    return _save


def reference(level: int, seed: int) -> dict[str, np.ndarray]:
    inst = make_instance(level, seed)
    return convert(inst.files, inst.args, inst.config, optimizer=inst.optimizer)


def set_header_field(data: bytes, field: str, value: int, *, bits: bool = False) -> bytes:
    """Set a field in every local and central header of a zip archive; with bits, OR value into it."""
    data, (local, central, fmt) = bytearray(data), HEADER_FIELDS[field]
    for signature, offset in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        at = data.find(signature)
        while at >= 0:
            old = struct.unpack_from(fmt, data, at + offset)[0] if bits else 0
            struct.pack_into(fmt, data, at + offset, value | old)
            at = data.find(signature, at + 4)
    return bytes(data)


@functools.cache
def bz2_bomb(member: str = "model.embed_tokens.weight.npy", inflated: int = 3 * 2**30) -> bytes:
    """An .npz of about 2 KiB whose one member is bzip2-compressed (zip method 12) and inflates to `inflated`
    bytes of zeros, while its headers declare 1000. Built from one compressed block of zeros, repeated,
    without inflating anything."""
    bits = "".join(f"{byte:08b}" for byte in bz2.compress(bytes(50_000_000), 9))  # a full block, then a partial one
    start = bits.index(BZ2_BLOCK, 32)
    block = bits[start:bits.index(BZ2_BLOCK, start + 48)]
    block_crc = int(block[48:80], 2)

    def stream(blocks: int) -> bytes:
        crc = 0  # the stream's CRC combines its blocks'
        for _ in range(blocks):
            crc = ((crc << 1 | crc >> 31) & 0xFFFFFFFF) ^ block_crc
        out = bits[:32] + block * blocks + BZ2_END + f"{crc:032b}"
        out += "0" * (-len(out) % 8)
        return int(out, 2).to_bytes(len(out) // 8, "big")
    per_block = len(bz2.decompress(stream(1)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # stored, then relabelled: zipfile has no way to write raw bzip2
        zf.writestr(member, stream(-(-inflated // per_block)))
    return set_header_field(set_header_field(buf.getvalue(), "method", zipfile.ZIP_BZIP2), "size", 1000)
