"""Reading image files with clear errors: colour as RGB (JPEG kept as its bytes), bounded sizes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmtk.data.codecs import Encoded
from mmtk.errors import MmtkError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".bmp", ".webp")  # what the readers decode


COLOUR_MODES = ("1", "P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")  # modes PIL converts to RGB


MAX_IMAGE_PIXELS = 8192 * 8192  # far above any RGB-D camera, far below a decompression bomb (PIL warns at 89 Mpx)


def read_image(path: Path, to_rgb: bool = False) -> np.ndarray:
    """Decode an image file fully (PNG/JPEG/TIFF/PPM...) to a numpy array; corrupt files raise MmtkError.

    With ``to_rgb``, palette, alpha and other 8-bit colour modes are converted to RGB; label images keep their
    palette indices (the class ids)."""
    try:
        with Image.open(path) as image:
            check_image_size(image, path)
            array = np.array(image.convert("RGB") if to_rgb and image.mode in COLOUR_MODES else image)
            mode = image.mode
    except FileNotFoundError:
        raise MmtkError(f"{path} does not exist") from None
    except Image.DecompressionBombError as err:
        raise MmtkError(f"{path}: {err}; refused before decoding (a corrupt or hostile file)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MmtkError(f"{path} is corrupt or truncated ({err}); re-export or remove it") from None
    if mode in ("I", "I;16B") and array.dtype != np.uint16:
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise MmtkError(f"{path}: 32-bit integer image with values beyond 16 bits; expected a uint16 depth")
        array = array.astype(np.uint16)
    return array


def check_image_size(image: Image.Image, name: object) -> None:
    """Refuse an image whose header declares more than :data:`MAX_IMAGE_PIXELS`, before it is decoded."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MmtkError(f"{name}: the image header declares {width}x{height} px ({width * height / 1e6:.0f} Mpx), over "
                        f"the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit; refused before decoding (a corrupt or hostile "
                        f"file, or resize it first)")


def read_rgb(path: Path) -> np.ndarray:
    """Decode a colour image to uint8 [H, W, 3] RGB (grey, palette, alpha and CMYK images are converted)."""
    array = read_image(path, to_rgb=True)
    if array.dtype != np.uint8:
        raise MmtkError(f"{path}: colour image has dtype {array.dtype}, expected 8-bit")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def read_colour(path: Path) -> np.ndarray | Encoded:
    """A colour file as it is to be stored: a JPEG of 8-bit RGB as its own bytes (decoded, and so checked, when
    written), any other image decoded to uint8 RGB (:func:`read_rgb`)."""
    try:
        data = path.read_bytes()
    except OSError:
        return read_rgb(path)  # which says what is wrong with the file
    return encoded_colour(data, path) or read_rgb(path)


def encoded_colour(data: bytes, name: object) -> Encoded | None:
    """``data`` as :class:`Encoded` when it is a whole JPEG of 8-bit RGB (decoded once by Pillow to check), else
    None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode != "RGB":
                return None
            check_image_size(image, name)
            image.load()  # a complete decode, which refuses a truncated file (libjpeg-turbo alone fills it in)
            return Encoded(data, "jpeg", (image.height, image.width, 3))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None  # not a whole JPEG: the decoder that follows names the problem

