"""Image and CompressedImage messages decoded with numpy and PIL: colour (uint8 RGB, or a JPEG's own bytes), depth
(integers with their scale, or metres) and an extra stream's samples as stored; sizes checked before allocating."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmtk.data.codecs import Encoded, Quantized
from mmtk.data.format import MAX_IMAGE_SIDE
from mmtk.data.sources.depth_encoding import DepthEncoding, keep_depth, to_metres
from mmtk.data.sources.image_files import check_image_size, encoded_colour
from mmtk.errors import MmtkError

COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = {"16UC1": 1000.0, "mono16": 1000.0, "32FC1": None}  # units per metre (None = metres)


def decode_image(msg: Any, msgtype: str, role: str,
                 depth_scale: float | None) -> np.ndarray | Encoded | Quantized:
    """Decode an Image/CompressedImage to uint8 RGB [H, W, 3] (role 'rgb'; a JPEG's own bytes as Encoded),
    depth [H, W] (role 'depth': integers with their scale as Quantized, float as metres), or its own samples (any
    other role, an extra stream: uint8/uint16/float32 [H, W] or uint8 [H, W, 3])."""
    if msgtype.endswith("CompressedImage"):
        return _decode_compressed(msg, role, depth_scale)
    encoding = str(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if role not in ("rgb", "depth"):
        if encoding not in SAMPLE_ENCODINGS:
            raise MmtkError(f"{role} topic encoding {encoding!r} is not supported; use one of "
                            f"{', '.join(SAMPLE_ENCODINGS)}")
        code, channels = SAMPLE_ENCODINGS[encoding]
        row_bytes = width * channels * np.dtype(code).itemsize
    elif role == "rgb":
        channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(encoding)
        if channels is None:
            raise MmtkError(f"colour encoding {encoding!r} is not supported; use one of {', '.join(COLOR_ENCODINGS)}")
        row_bytes = width * channels
    elif encoding not in DEPTH_ENCODINGS:
        raise MmtkError(f"depth encoding {encoding!r} is not supported; use 16UC1 (mm) or 32FC1 (m)")
    else:
        row_bytes = width * (4 if encoding == "32FC1" else 2)
    _check_image_fields(role, encoding, height, width, step, row_bytes, len(msg.data))
    data = np.asarray(msg.data, dtype=np.uint8)
    rows = data[: height * step].reshape(height, step)
    if role not in ("rgb", "depth"):
        return _decode_samples(rows, encoding, width, bool(msg.is_bigendian))
    if role == "rgb":
        pixels = rows[:, :row_bytes].reshape(height, width, channels)
        if encoding == "mono8":
            return np.repeat(pixels, 3, axis=2)
        if encoding.startswith("bgr"):
            return np.ascontiguousarray(pixels[:, :, 2::-1])
        return np.ascontiguousarray(pixels[:, :, :3])
    dtype = np.dtype(np.uint16 if encoding != "32FC1" else np.float32).newbyteorder(">" if msg.is_bigendian else "<")
    values = rows[:, : width * dtype.itemsize].copy().view(dtype).reshape(height, width).astype(dtype.newbyteorder("="))
    scale = depth_scale if depth_scale is not None else DEPTH_ENCODINGS[encoding]
    return keep_depth(values, DepthEncoding(None, scale), "depth image")


SAMPLE_ENCODINGS = {"mono8": ("u1", 1), "8UC1": ("u1", 1), "mono16": ("u2", 1), "16UC1": ("u2", 1),
                    "32FC1": ("f4", 1), "rgb8": ("u1", 3), "bgr8": ("u1", 3)}


def _decode_samples(rows: np.ndarray, encoding: str, width: int, big_endian: bool) -> np.ndarray:
    """An extra stream's image as stored samples: [H, W] for one channel, [H, W, 3] RGB for colour."""
    code, channels = SAMPLE_ENCODINGS[encoding]
    dtype = np.dtype(code).newbyteorder(">" if big_endian else "<")
    values = rows[:, : width * channels * dtype.itemsize].copy().view(dtype).astype(dtype.newbyteorder("="))
    values = values.reshape(rows.shape[0], width, channels)
    if encoding == "bgr8":
        values = values[:, :, ::-1]
    return np.ascontiguousarray(values[:, :, 0] if channels == 1 else values)


def _check_image_fields(role: str, encoding: str, height: int, width: int, step: int, row_bytes: int,
                        length: int) -> None:
    """An Image message's declared size must be plausible and match its data, before anything is allocated."""
    what = f"{role} image ({encoding}, {height}x{width} px, step {step} B)"
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise MmtkError(f"{what}: height and width must be 1..{MAX_IMAGE_SIDE} px; the bag is corrupt")
    if step < row_bytes:
        raise MmtkError(f"{what}: step is shorter than a row of {width} px ({row_bytes} B); the bag is corrupt")
    if length < height * step:
        raise MmtkError(f"{what} is truncated ({length} bytes for {height} rows of {step})")
    if length != height * step:
        raise MmtkError(f"{what}: data has {length} bytes, expected height x step = {height * step}; the bag is "
                        f"corrupt")


def _decode_compressed(msg: Any, role: str, depth_scale: float | None) -> np.ndarray | Encoded | Quantized:
    fmt = str(msg.format)
    payload = bytes(np.asarray(msg.data, dtype=np.uint8))
    if "compressedDepth" in fmt:
        if role != "depth":
            raise MmtkError(f"compressedDepth ({fmt!r}) given as the colour topic")
        # image_transport's compressedDepth: 12-byte header (int32 format, float32 quant A, B), then PNG
        if len(payload) < 12:
            raise MmtkError(f"compressedDepth image of {len(payload)} bytes is shorter than its 12-byte header")
        _, quant_a, quant_b = struct.unpack_from("<iff", payload, 0)
        values = _decode_bytes(payload[12:], fmt)
        if "32FC1" in fmt:  # stored as quantised inverse depth
            depth = np.zeros(values.shape, np.float32)
            valid = values > 0
            depth[valid] = quant_a / (values[valid].astype(np.float32) - quant_b)
            return to_metres(depth, depth_scale)
        return _integer_depth(values, depth_scale, fmt)
    if role == "rgb" and (encoded := encoded_colour(payload, f"compressed image ({fmt!r})")) is not None:
        return encoded  # the JPEG as the camera sent it; decoded (and so checked) when written
    array = _decode_bytes(payload, fmt)
    if role not in ("rgb", "depth"):
        return array
    if role == "rgb":
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.dtype != np.uint8:
            raise MmtkError(f"compressed colour image has dtype {array.dtype}; expected 8-bit")
        # PIL decodes to RGB; a "bgr8; jpeg compressed bgr8" message was encoded from BGR by cv2, which
        # writes a standard RGB JPEG/PNG, so no swap is needed.
        return np.ascontiguousarray(array[:, :, :3])
    if array.ndim != 2 or array.dtype != np.uint16:
        raise MmtkError(f"compressed depth image has dtype {array.dtype} {array.shape}; expected 16-bit mono PNG")
    return _integer_depth(array, depth_scale, fmt)


def _integer_depth(values: np.ndarray, depth_scale: float | None, fmt: str) -> np.ndarray | Quantized:
    """Compressed integer depth kept with its scale (default millimetres)."""
    scale = depth_scale if depth_scale is not None else 1000.0
    return keep_depth(values, DepthEncoding(None, scale), f"compressed depth ({fmt!r})")


def _decode_bytes(payload: bytes, fmt: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload)) as image:
            check_image_size(image, f"compressed image ({fmt!r})")
            array = np.array(image)
    except UnidentifiedImageError:  # its message names an in-memory file object, of no use to anyone
        raise MmtkError(f"cannot decode a compressed image ({fmt!r}): its {len(payload)} bytes are not an image "
                        f"PIL can identify (corrupt or truncated)") from None
    except Image.DecompressionBombError as err:
        raise MmtkError(f"cannot decode a compressed image ({fmt!r}): {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise MmtkError(f"cannot decode a compressed image ({fmt!r}): corrupt or truncated ({err})") from None
    if array.dtype == np.int32:
        array = array.astype(np.uint16)
    return array
