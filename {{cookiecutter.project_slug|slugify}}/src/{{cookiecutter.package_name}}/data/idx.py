"""IDX files (the MNIST format): read, write and download, never leaving a partial file.

An IDX file is a big-endian header (two zero bytes, a type code, the number of
dimensions, then one uint32 per dimension) followed by the raw values. We only need
unsigned bytes (type 0x08): images are N x rows x cols, labels are N.
"""

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import torch

from ..errors import UserError

UBYTE = 0x08


def read_idx(path: Path) -> torch.Tensor:
    """Return the file's values as a uint8 tensor; `.gz` files are decompressed."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path}: cannot be read ({err}); delete it and download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != UBYTE:
        raise UserError(
            f"{path}: not an IDX file of unsigned bytes (it starts with {raw[:4].hex()}, "
            "expected 000008..); delete it and download it again"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: IDX header is cut short; delete it and download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        raise UserError(
            f"{path}: truncated or padded: the header promises {expected} bytes, the file has "
            f"{len(raw)}; delete it and download it again"
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).reshape(shape)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_idx(path: Path, values: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzip-compressed when `path` ends in .gz)."""
    values = values.to(torch.uint8).contiguous()
    header = bytes([0, 0, UBYTE, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    data = header + values.numpy().tobytes()
    atomic_write(path, gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def download(url: str, path: Path, md5: str, timeout: float = 60.0) -> None:
    """Fetch `url` into `path` if its MD5 is `md5`; otherwise raise and leave nothing."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    got = hashlib.md5(data).hexdigest()
    if got != md5:
        raise UserError(f"{url}: checksum mismatch (MD5 {got}, expected {md5}); file not saved")
    atomic_write(path, data)
