"""An image file of any mode Pillow opens, as 8-bit RGB: the one reader of train.py's image folders and fid.py's
folders of PNGs."""
import numpy as np
from PIL import Image

from support.cli import UserError


def open_rgb(path):
    """The image at path as an RGB PIL image. 16-bit greyscale (modes I;16*, and I as older Pillows open 16-bit
    PNGs) is scaled to 8 bits: Pillow's convert('RGB') clips it, so a mid-grey 16-bit image would become white.
    Floating-point and wider-than-16-bit pixels have no known range and are refused by name."""
    try:
        with Image.open(path) as img:
            if img.mode == "F":
                raise UserError(f"{path}: floating-point pixels (mode F) have no known range; save it as 8-bit RGB")
            if img.mode.startswith("I;16") or img.mode == "I":
                a = np.asarray(img).astype(np.int64)
                if a.min() < 0 or a.max() > 65535:
                    raise UserError(f"{path}: {img.mode} pixels beyond 16 bits; save it as 8-bit RGB")
                return Image.fromarray(np.round(a / 257).astype(np.uint8), "L").convert("RGB")
            return img.convert("RGB")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}") from None
