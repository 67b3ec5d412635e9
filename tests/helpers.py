"""Shared test helpers: a tiny demo VOC tree, tiny training flags, a decompression-bomb PNG."""
import io
import struct
import zlib
from pathlib import Path

from PIL import Image

from demo_data import make_demo_voc

TINY = ["--width", "0.0625", "--image-size", "64", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--eval-interval", "1", "--log-interval", "1"]


def tiny_voc(root: Path, n_trainval: int = 12, n_test: int = 6) -> Path:
    return make_demo_voc(root, n_trainval=n_trainval, n_test=n_test, seed=0)


def png_bomb(w: int, h: int) -> bytes:
    """A real 8x8 PNG whose header (with a correct CRC) claims w x h pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = b"IHDR" + struct.pack(">II", w, h) + bytes(data[24:29])
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)
