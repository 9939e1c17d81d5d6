"""Large PNGs for the decoding tests, written without ever holding their pixels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def repeated_row_png(path: Path, width: int, height: int, pixels: bytes = b"") -> Path:
    """An RGB PNG whose every row starts with ``pixels`` (the rest black). One row is deflated once with a
    full flush, which resets the dictionary, so every row's compressed bytes are the same and the stream is
    that unit repeated: a 144 Mpx file in milliseconds, its size set by how much of a row is noise."""
    row = b"\0" + pixels + bytes(width * 3 - len(pixels))  # filter byte "none", then the pixels
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
    unit = deflate.compress(row) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height) if pixels else ():
        adler = zlib.adler32(row, adler)
    if not pixels:  # adler32 of n zero bytes, without reading them
        adler = (((len(row) * height) % 65521) << 16) | 1
    data = b"\x78\x01" + unit * height + deflate.flush(zlib.Z_FINISH) + struct.pack(">I", adler)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path
