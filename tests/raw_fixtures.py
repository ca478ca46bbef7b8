"""Camera RAW files for tests: DNGs laid out as cameras and Adobe's converter write them.

No real camera file can be had offline, so ``write_dng`` writes one from a photo: IFD0 a 160x120 RGB thumbnail
(what Pillow reads, as it does a NEF's or an ARW's first directory), its SubIFDs the 12-bit RGGB sensor mosaic
and, optionally, a JPEG preview (what LibRaw's ``extract_thumb`` returns); the orientation in IFD0.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
PACK = {BYTE: "B", SHORT: "H", LONG: "I"}


def _ifd(entries: dict[int, tuple[int, object]], at: int) -> bytes:
    """A little-endian TIFF directory written at offset ``at``, its values longer than 4 bytes right after it."""
    spill_at = at + 2 + 12 * len(entries) + 4
    head, spill = [struct.pack("<H", len(entries))], b""
    for tag in sorted(entries):
        kind, values = entries[tag]
        if kind == ASCII:
            raw, count = values.encode() + b"\0", len(values) + 1
        elif kind in (RATIONAL, SRATIONAL):
            raw, count = b"".join(struct.pack("<ii" if kind == SRATIONAL else "<II", *v) for v in values), len(values)
        else:
            raw, count = struct.pack(f"<{len(values)}{PACK[kind]}", *values), len(values)
        if len(raw) <= 4:
            head.append(struct.pack("<HHI", tag, kind, count) + raw.ljust(4, b"\0"))
        else:
            spill += b"\0" * (len(spill) % 2)
            head.append(struct.pack("<HHII", tag, kind, count, spill_at + len(spill)))
            spill += raw
    out = b"".join(head) + struct.pack("<I", 0) + spill
    return out + b"\0" * (len(out) % 2)


def write_dng(path: Path, photo: Image.Image, preview: Image.Image | None = None, orientation: int = 1) -> Path:
    """``photo`` (RGB, even sides) as a DNG's sensor data (gamma 2.2 undone, RGGB, 12 bits); ``preview`` stored
    as its embedded JPEG; ``orientation`` the EXIF value of IFD0 (6: turn 90 degrees clockwise to view)."""
    rgb = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0
    h, w = rgb.shape[:2]
    linear = rgb ** 2.2
    mosaic = np.empty((h, w), np.float32)
    mosaic[0::2, 0::2], mosaic[0::2, 1::2] = linear[0::2, 0::2, 0], linear[0::2, 1::2, 1]
    mosaic[1::2, 0::2], mosaic[1::2, 1::2] = linear[1::2, 0::2, 1], linear[1::2, 1::2, 2]
    sensor = (mosaic * 4095).round().astype("<u2").tobytes()
    small = photo.convert("RGB")
    small.thumbnail((160, 160))
    thumb = small.tobytes()
    jpeg = b""
    if preview is not None:
        buf = io.BytesIO()
        preview.convert("RGB").save(buf, "JPEG", quality=92)
        jpeg = buf.getvalue()
    ifd0 = {254: (LONG, [1]), 256: (LONG, [small.width]), 257: (LONG, [small.height]), 258: (SHORT, [8, 8, 8]),
            259: (SHORT, [1]), 262: (SHORT, [2]), 271: (ASCII, "Captioner"), 272: (ASCII, "Test camera"),
            274: (SHORT, [orientation]), 277: (SHORT, [3]), 278: (LONG, [small.height]), 279: (LONG, [len(thumb)]),
            284: (SHORT, [1]), 50706: (BYTE, [1, 4, 0, 0]), 50707: (BYTE, [1, 1, 0, 0]),
            50708: (ASCII, "Captioner Test camera"), 50778: (SHORT, [21]),
            50721: (SRATIONAL, [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]),
            50728: (RATIONAL, [(1, 1), (1, 1), (1, 1)])}
    sensor_ifd = {254: (LONG, [0]), 256: (LONG, [w]), 257: (LONG, [h]), 258: (SHORT, [16]), 259: (SHORT, [1]),
                  262: (SHORT, [32803]), 277: (SHORT, [1]), 278: (LONG, [h]), 279: (LONG, [len(sensor)]),
                  284: (SHORT, [1]), 33421: (SHORT, [2, 2]), 33422: (BYTE, [0, 1, 1, 2]), 50714: (LONG, [0]),
                  50717: (LONG, [4095])}
    preview_ifd = {} if preview is None else {
        254: (LONG, [1]), 256: (LONG, [preview.width]), 257: (LONG, [preview.height]), 258: (SHORT, [8, 8, 8]),
        259: (SHORT, [7]), 262: (SHORT, [6]), 277: (SHORT, [3]), 278: (LONG, [preview.height]),
        279: (LONG, [len(jpeg)]), 284: (SHORT, [1])}
    subifds = 2 if jpeg else 1
    for ifd in (ifd0, sensor_ifd, preview_ifd):  # placeholders: the second pass writes the real data offsets
        ifd.update({273: (LONG, [0])} if ifd else {})
    ifd0[330] = (LONG, [0] * subifds)
    for _ in range(2):  # the directories' sizes do not depend on the offsets in them
        blocks = [_ifd(ifd0, 8)]
        blocks.append(_ifd(sensor_ifd, 8 + len(blocks[0])))
        blocks.append(_ifd(preview_ifd, 8 + len(blocks[0]) + len(blocks[1])) if jpeg else b"")
        ifd0[330] = (LONG, [8 + len(blocks[0]), 8 + len(blocks[0]) + len(blocks[1])][:subifds])
        data_at = 8 + sum(map(len, blocks))
        ifd0[273], sensor_ifd[273] = (LONG, [data_at]), (LONG, [data_at + len(thumb)])
        if jpeg:
            preview_ifd[273] = (LONG, [data_at + len(thumb) + len(sensor)])
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + b"".join(blocks) + thumb + sensor + jpeg)
    return path
