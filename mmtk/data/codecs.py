"""How each stored array of an mmtk file (format 2) is kept on disk, asked by the writer and every reader.

A frame's array reaches the writer in one of three forms (a source hands over what it got):

* a plain numpy array (raw pixels, metres, class ids);
* :class:`Encoded`: an image file's bytes as the source received them (a JPEG file, a ROS ``CompressedImage``),
  stored as the same bytes, never re-encoded;
* :class:`Quantized`: integer samples with their scale (millimetres: 1000 per metre, TUM's 5000, ...), stored as
  those integers with the scale, so nothing of the source's precision is lost or invented.

Where it goes is the codec its :class:`mmtk.modality.StoredArray` declares (``codec``), looked up here:

* an image codec (:data:`IMAGE_CODECS`: QOI, JPEG, PNG) keeps one encoded image per frame in an HDF5 byte
  dataset (``vlen uint8 [N]``), each element the image file followed by its CRC-32 (4 bytes, little-endian);
* an array codec (:data:`ARRAY_CODECS`: Blosc2) keeps an ordinary chunked ``[N, H, W(, C)]`` array behind a
  lossless HDF5 filter (hdf5plugin), one frame per chunk, with fletcher32 checksums.

Readers call :func:`read_frame` (any format version: format 1's plain arrays read as before).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import h5py
import hdf5plugin  # registers the Blosc2 filter with HDF5 (reading and writing)
import imagecodecs
import numpy as np

from mmtk.errors import MmtkError
from mmtk.modality import StoredArray

SCALE_ATTR = "scale"  # on an integer array of a float quantity: stored integers per unit (1000: millimetres)
SHAPE_ATTR = "frame_shape"  # on a byte dataset: the decoded frame's shape, e.g. [480, 640, 3]
DTYPE_ATTR = "frame_dtype"  # on a byte dataset: the decoded frame's dtype, e.g. "uint8"
CODEC_ATTR = "codec"  # the codec(s) the dataset's frames are kept with, comma-separated (for people, `mmtk info`)
ENCODED_BYTES_ATTR = "encoded_bytes"  # on a byte dataset: the bytes of all its elements (HDF5 does not count them)
CRC_BYTES = 4
REFS_PER_CHUNK = 1024  # elements of a byte dataset per chunk of references (the images sit in the heap)


@dataclass(frozen=True)
class Encoded:
    """An image file's bytes as a source received them (e.g. a JPEG), with its decoded ``shape`` and dtype."""

    data: bytes
    codec: str  # a key of IMAGE_CODECS
    shape: tuple[int, ...]
    dtype: str = "uint8"

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def decoded(self) -> np.ndarray:
        """The pixels (the library's decode; raises MmtkError when the bytes are not a valid image)."""
        return decode_image(self.data, self.shape, np.dtype(self.dtype), self.codec)


@dataclass(frozen=True)
class Quantized:
    """Integer samples of a float quantity and their ``scale`` (integers per unit: 1000 for millimetres)."""

    values: np.ndarray
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes

    def decoded(self) -> np.ndarray:
        """float32 values in units (``values / scale``, computed in float32 as mmtk always converted them)."""
        return self.values.astype(np.float32) / np.float32(self.scale)


FrameArray = np.ndarray | Encoded | Quantized


def plain(value: FrameArray) -> np.ndarray:
    """A frame's array as numbers: pixels of encoded bytes, units of quantized integers, arrays unchanged."""
    return value if isinstance(value, np.ndarray) else value.decoded()


# ------------------------------------------------------------------------------------------- codecs
@dataclass(frozen=True)
class ImageCodec:
    """An image file format one stored frame is kept in (an element of a byte dataset)."""

    name: str
    magic: bytes  # how the format's files begin: the reader picks the decoder by it
    encode: Callable[[np.ndarray, int | None], bytes]  # (pixels, quality) -> file bytes
    decode: Callable[[bytes, np.ndarray], np.ndarray]  # (file bytes, out with the expected shape) -> out


def _png_encode(pixels: np.ndarray, quality: int | None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _png_decode(data: bytes, out: np.ndarray) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.size != (out.shape[1], out.shape[0]):  # checked before decoding: no decompression bomb
            raise ValueError(f"the PNG is {image.size[1]}x{image.size[0]}")
        out[...] = np.asarray(image).reshape(out.shape)
    return out


IMAGE_CODECS: dict[str, ImageCodec] = {
    # QOI (imagecodecs): lossless 8-bit RGB(A), decodes a 480x640 frame in 2 ms (PNG: 10 ms), files ~1.3x PNG.
    "qoi": ImageCodec("qoi", b"qoif", lambda pixels, quality: imagecodecs.qoi_encode(pixels),
                      lambda data, out: imagecodecs.qoi_decode(data, out=out)),
    # JPEG (libjpeg-turbo through imagecodecs): what cameras and datasets ship; kept as received, never re-encoded
    # unless the user asks for a quality (--jpeg-quality).
    "jpeg": ImageCodec("jpeg", b"\xff\xd8", lambda pixels, quality: imagecodecs.jpeg8_encode(pixels, level=quality),
                       lambda data, out: imagecodecs.jpeg8_decode(data, out=out)),
    # PNG (Pillow): lossless for any 8/16-bit image the other codecs cannot hold.
    "png": ImageCodec("png", b"\x89PNG", _png_encode, _png_decode),
}


def _blosc2() -> dict[str, Any]:
    # zstd level 5 with byte shuffle: the smallest lossless depth and labels measured at < 0.5 ms a frame to read
    # (docs/dataset-format.md); the filter ships with hdf5plugin.
    return dict(hdf5plugin.Blosc2(cname="zstd", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE))


ARRAY_CODECS: dict[str, Callable[[], dict[str, Any]]] = {"blosc2": _blosc2}
CODECS = (*IMAGE_CODECS, *ARRAY_CODECS)


def decode_image(data: bytes, shape: tuple[int, ...], dtype: np.dtype, codec: str | None = None) -> np.ndarray:
    """Decode one image file's bytes to ``shape``; MmtkError (one line) when they are not such an image."""
    chosen = IMAGE_CODECS.get(codec or "") or next((c for c in IMAGE_CODECS.values() if data.startswith(c.magic)), None)
    if chosen is None:
        raise MmtkError(f"image bytes begin with {bytes(data[:4])!r}, which is none of "
                        f"{', '.join(IMAGE_CODECS)}; the data is damaged")
    try:
        return chosen.decode(data, np.empty(shape, dtype))
    except Exception as err:  # each library raises its own types (Jpeg8Error, QoiError, ValueError, OSError)
        raise MmtkError(f"the {chosen.name} image cannot be decoded to {list(shape)} ({err}); the data is "
                        f"damaged") from None


# ------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Storage:
    """How one array of one split is stored: an image codec (byte dataset) or an array codec (filtered array)."""

    codec: str
    frame_shape: tuple[int, ...]
    dtype: np.dtype
    scale: float | None = None  # integers per unit, for quantized float quantities
    quality: int | None = None  # JPEG quality for raw pixels, when the user asked for lossy storage

    @property
    def as_bytes(self) -> bool:
        return self.codec in IMAGE_CODECS

    def create(self, group: h5py.Group, name: str) -> h5py.Dataset:
        """The empty dataset, one frame per chunk (array codecs) or per element (image codecs)."""
        if self.as_bytes:
            dataset = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=h5py.vlen_dtype(np.uint8),
                                           chunks=(REFS_PER_CHUNK,))
            dataset.attrs[SHAPE_ATTR] = list(self.frame_shape)
            dataset.attrs[DTYPE_ATTR] = self.dtype.name
            dataset.attrs[ENCODED_BYTES_ATTR] = 0
            dataset.attrs[CODEC_ATTR] = ""  # the codecs its elements turn out to use (record_element)
        else:
            dataset = group.create_dataset(name, shape=(0, *self.frame_shape), maxshape=(None, *self.frame_shape),
                                           dtype=self.dtype, chunks=(1, *self.frame_shape), fletcher32=True,
                                           **ARRAY_CODECS[self.codec]())
            if self.scale is not None:
                dataset.attrs[SCALE_ATTR] = self.scale
            dataset.attrs[CODEC_ATTR] = self.codec
        return dataset

    def element(self, value: FrameArray, array: np.ndarray, where: str) -> tuple[np.ndarray, str]:
        """What one frame writes, and with which codec: ``value`` as it came when it can stay so, else ``array``
        (its checked numbers) encoded by this storage's codec."""
        if self.as_bytes:
            if isinstance(value, Encoded) and value.codec in IMAGE_CODECS:
                data, codec = value.data, value.codec  # the source's own bytes
            else:
                data = IMAGE_CODECS[self.codec].encode(np.ascontiguousarray(array, self.dtype), self.quality)
                codec = self.codec
            payload = bytes(data) + zlib.crc32(data).to_bytes(CRC_BYTES, "little")
            return np.frombuffer(payload, np.uint8), codec
        if self.scale is None:
            return array.astype(self.dtype, copy=False), self.codec
        if not isinstance(value, Quantized) or value.scale != self.scale:
            got = "values in units" if not isinstance(value, Quantized) else f"integers at {value.scale:g} per unit"
            raise MmtkError(f"{where} arrives as {got}, but the split's first frame came as integers at "
                            f"{self.scale:g} per unit; every frame of a split needs the same units (pass --depth-scale)")
        if not np.can_cast(value.values.dtype, self.dtype) and value.values.max(initial=0) > np.iinfo(self.dtype).max:
            raise MmtkError(f"{where} holds values beyond {self.dtype.name}, which the split's first frame set")
        return value.values.astype(self.dtype, copy=False), self.codec


def storage_for(stored: StoredArray, value: FrameArray, array: np.ndarray, jpeg_quality: int | None = None) -> Storage:
    """The storage of a split's array from the codec its declaration names and its first frame (``value`` as it
    came, ``array`` its checked numbers): integers keep their scale; 8-bit colour may be JPEG at ``jpeg_quality``."""
    codec = stored.codec
    if codec not in CODECS:
        raise ValueError(f"StoredArray {stored.name}: codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if isinstance(value, Quantized) and value.values.dtype.kind == "u":
        return Storage(next(iter(ARRAY_CODECS)) if codec in IMAGE_CODECS else codec, array.shape,
                       value.values.dtype, scale=float(value.scale))
    if codec in IMAGE_CODECS and jpeg_quality is not None and array.dtype == np.uint8 and array.shape[-1:] == (3,):
        return Storage("jpeg", array.shape, array.dtype, quality=jpeg_quality)
    return Storage(codec, array.shape, array.dtype)


def record_element(dataset: h5py.Dataset, element: np.ndarray, codec: str) -> None:
    """Note a written element of a byte dataset: its bytes in the total, its codec among the dataset's."""
    dataset.attrs[ENCODED_BYTES_ATTR] = int(dataset.attrs[ENCODED_BYTES_ATTR]) + element.size
    used = [name for name in str(dataset.attrs[CODEC_ATTR]).split(",") if name]
    if codec not in used:
        dataset.attrs[CODEC_ATTR] = ",".join([*used, codec])


# ------------------------------------------------------------------------------------------- reading
def is_bytes(dataset: h5py.Dataset) -> bool:
    """Whether the dataset keeps one encoded image per element (format 2 image codecs)."""
    return h5py.check_vlen_dtype(dataset.dtype) == np.dtype(np.uint8)  # (frame_id is a vlen of str)


def frame_shape(dataset: h5py.Dataset) -> tuple[int, ...]:
    """The decoded shape of one frame ([H, W] or [H, W, C]; for per-frame metadata, its trailing axes)."""
    if is_bytes(dataset):
        return tuple(int(v) for v in dataset.attrs[SHAPE_ATTR])
    return tuple(dataset.shape[1:])


def frame_dtype(dataset: h5py.Dataset) -> np.dtype:
    """The dtype a reader gets: the decoded pixels', float32 for quantized values, else the dataset's."""
    if is_bytes(dataset):
        return np.dtype(str(dataset.attrs[DTYPE_ATTR]))
    return np.dtype(np.float32) if SCALE_ATTR in dataset.attrs else dataset.dtype


def stored_bytes(dataset: h5py.Dataset) -> int:
    """Bytes the dataset takes in the file (compressed chunks, or all encoded elements)."""
    extra = int(dataset.attrs.get(ENCODED_BYTES_ATTR, 0)) if is_bytes(dataset) else 0
    return int(dataset.id.get_storage_size()) + extra


@dataclass(frozen=True)
class FrameReader:
    """Reads frames of one stored image array (its layout looked up once): ``reader(index, rows, cols)``."""

    dataset: h5py.Dataset
    encoded: bool  # a byte dataset (one encoded image per element)
    shape: tuple[int, ...]  # one decoded frame's
    dtype: np.dtype  # the decoded pixels' (encoded) or the stored values' (arrays)
    scale: float | None  # integers per unit of quantized values

    def __call__(self, index: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        if self.encoded:
            blob = self.dataset[index]
            data, crc = blob[:-CRC_BYTES].tobytes(), blob[-CRC_BYTES:].tobytes()
            if len(blob) <= CRC_BYTES or zlib.crc32(data).to_bytes(CRC_BYTES, "little") != crc:
                raise MmtkError(f"{self.dataset.name.rsplit('/', 1)[-1]}: stored bytes fail their CRC-32 (damaged data)")
            return np.ascontiguousarray(decode_image(data, self.shape, self.dtype)[rows, cols])
        height, width = (len(range(*axis.indices(side))) for axis, side in zip((rows, cols), self.shape))
        out = np.empty((height, width, *self.shape[2:]), dtype=self.dtype)
        self.dataset.read_direct(out, np.s_[index, rows, cols])
        return out if self.scale is None else Quantized(out, self.scale).decoded()


def frame_reader(dataset: h5py.Dataset) -> FrameReader:
    """The reader of a stored image array of any format version (format 1's plain arrays read as stored)."""
    encoded = is_bytes(dataset)
    scale = None if encoded or SCALE_ATTR not in dataset.attrs else float(dataset.attrs[SCALE_ATTR])
    return FrameReader(dataset, encoded, frame_shape(dataset), frame_dtype(dataset) if encoded else dataset.dtype,
                       scale)


def read_frame(dataset: h5py.Dataset, index: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """Frame ``index`` of a stored image array, cropped to ``rows`` x ``cols``, in the units readers use.

    Byte datasets are checked (CRC-32) and decoded whole, then cropped; arrays read only the crop, and quantized
    integers become float32 units. Damaged data raises MmtkError (the caller names file, split and frame);
    HDF5's own checksum failures raise OSError as they always did. (A loader reading many frames keeps a
    :func:`frame_reader` instead.)"""
    return frame_reader(dataset)(index, rows, cols)


class FrameView:
    """A stored image array read like the numpy array of its decoded frames ``[N, H, W(, C)]``: ``view[i]``,
    ``view[a:b]``, ``view[:, rows, cols]`` (frames are decoded one by one with :func:`read_frame`); ``attrs``,
    ``name`` and the rest are the dataset's."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dataset.shape[0], *frame_shape(self.dataset))

    @property
    def dtype(self) -> np.dtype:
        return frame_dtype(self.dataset)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.dataset.shape[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        first = slice(None) if isinstance(first, tuple) else first  # view[()]: every frame
        first = slice(None) if first is Ellipsis else first
        if isinstance(first, (int, np.integer)):
            return read_frame(self.dataset, int(first) % len(self))[rest]
        frames = [read_frame(self.dataset, index)[rest] for index in range(len(self))[first]]
        return np.stack(frames) if frames else np.empty((0, *self.shape[1:]), self.dtype)
