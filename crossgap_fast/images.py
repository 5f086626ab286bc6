"""Pictures as the image tower wants them: 8-bit RGB, whatever bit depth they were stored in."""

from __future__ import annotations

from typing import Any

import numpy as np

_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(im: Any) -> Any:
    """An 8-bit RGB copy of the PIL image ``im``, with high-bit-depth greyscale mapped by
    its range instead of PIL's clipping (which turns a 16-bit image white and a float one
    black):

    * 16-bit ('I;16*'): value * 255 / 65535. PNG and TIFF define 16-bit samples over the
      full 0..65535 range (the PNG spec scales lower bit depths up to it), so this keeps
      the picture's brightness, as image viewers show it;
    * 32-bit integer ('I') and float ('F'), which have no such range: the image's own
      minimum to maximum becomes 0..255, except float images already within [0, 1], the
      usual float convention, which are scaled by 255. NaN or infinite values raise
      ValueError (the item is recorded as unreadable, never fed as a wrong picture).
    """
    if im.mode not in _UINT16_MODES and im.mode not in ("I", "F"):
        return im.convert("RGB")
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    if im.mode in _UINT16_MODES:
        scaled = a * (255.0 / 65535.0)
    else:
        if not np.isfinite(a).all():
            raise ValueError(f"{im.mode!r} image with NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))
        else:  # a constant image: its value, clipped to the 8-bit range
            scaled = np.full_like(a, min(max(lo, 0.0), 255.0))
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return grey.convert("RGB")
