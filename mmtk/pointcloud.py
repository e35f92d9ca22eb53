"""Point clouds: depth + intrinsics <-> clouds, `.ply`/`.pcd` files, ROS ``PointCloud2`` messages.

Conventions (camera optical frame, as in ROS ``*_optical_frame`` and PCL): x right, y down, z forward,
metres. A pixel (u, v) with depth z maps to ``x = (u - cx) * z / fx``, ``y = (v - cy) * z / fy``.

A cloud is *organized* when its points keep the image layout (``points`` is [H, W, 3], NaN where the
sensor gave nothing) and *unorganized* otherwise (``points`` is [N, 3]). Invalid points are NaN in an
organized cloud; functions that cannot use them count and skip them.

open3d is imported only inside the functions that read or write files, so ``import mmtk`` never loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtk.errors import MmtkError
from mmtk.io import atomic_path

CLOUD_SUFFIXES = (".ply", ".pcd")



@dataclass
class PointCloud:
    """Points in metres, optionally coloured.

    Attributes:
        points: float32, [H, W, 3] (organized, NaN = invalid) or [N, 3] (unorganized).
        colors: uint8 RGB with the same leading shape as ``points``, or None.
        frame_id: the coordinate frame the points are expressed in ("" when unknown).
    """

    points: np.ndarray
    colors: np.ndarray | None = None
    frame_id: str = ""

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32)
        if self.points.ndim not in (2, 3) or self.points.shape[-1] != 3:
            raise MmtkError(f"point array has shape {self.points.shape}; expected [N, 3] or [H, W, 3]")
        if self.colors is not None:
            self.colors = np.asarray(self.colors)
            if self.colors.shape != self.points.shape:
                raise MmtkError(
                    f"colour array has shape {self.colors.shape} but points have {self.points.shape}; "
                    "give one RGB triple per point")
            if self.colors.dtype != np.uint8:
                raise MmtkError(f"colours must be uint8 RGB, got {self.colors.dtype}")

    @property
    def organized(self) -> bool:
        """True when the points keep an image layout [H, W, 3]."""
        return self.points.ndim == 3

    @property
    def valid(self) -> np.ndarray:
        """bool mask, [H, W] or [N]: True where all three coordinates are finite."""
        return np.isfinite(self.points).all(axis=-1)

    @property
    def num_invalid(self) -> int:
        """Number of points with a NaN or infinite coordinate."""
        return int((~self.valid).sum())

    def finite(self) -> "PointCloud":
        """An unorganized copy without the invalid (NaN/inf) points."""
        mask = self.valid
        colors = None if self.colors is None else self.colors[mask]
        return PointCloud(self.points[mask], colors, self.frame_id)

    def transformed(self, matrix: np.ndarray, frame_id: str) -> "PointCloud":
        """The valid points moved into ``frame_id`` by a 4x4 rigid ``matrix`` (points here -> points there).

        The result is unorganized: seen from another frame, the points no longer keep their image layout.
        """
        moved = self.finite()
        matrix = np.asarray(matrix, dtype=np.float64)
        points = moved.points.astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
        return PointCloud(points, moved.colors, frame_id)


@dataclass
class Projection:
    """Result of projecting an unorganized cloud onto an image (see :func:`project_points`).

    Attributes:
        depth: float32 [H, W] metres, 0 where no point landed.
        colors: uint8 [H, W, 3] colour of the nearest point per pixel (0 elsewhere), or None.
        skipped_invalid: points with a NaN/inf coordinate (skipped).
        skipped_behind: points with z <= 0 (behind the camera; skipped).
        skipped_outside: points whose pixel falls outside the image (skipped).
        occluded: points that landed on a pixel where a nearer point won.
    """

    depth: np.ndarray
    colors: np.ndarray | None
    skipped_invalid: int = 0
    skipped_behind: int = 0
    skipped_outside: int = 0
    occluded: int = 0


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """The 3x3 pinhole matrix K (float32) from focal lengths and principal point, in pixels."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float32)


def parse_intrinsics(text: str) -> np.ndarray:
    """K from a "fx,fy,cx,cy" string (pixels), as users type it on the command line."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[0] <= 0 or values[1] <= 0:
        raise MmtkError(f"cannot read intrinsics {text!r}; give four numbers fx,fy,cx,cy in pixels, e.g. 525,525,320,240")
    return intrinsics_matrix(*values)


def _check_intrinsics(intrinsics: np.ndarray) -> np.ndarray:
    k = np.asarray(intrinsics, dtype=np.float64)
    if k.shape != (3, 3) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise MmtkError(f"intrinsics must be a 3x3 pinhole matrix with positive focal lengths, got {k.tolist()}")
    return k


def depth_to_xyz(depth: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Back-project a depth image to per-pixel camera-frame XYZ.

    Args:
        depth: [H, W] metres; values <= 0 or non-finite are invalid.
        intrinsics: K, 3x3, in pixels of this depth image.

    Returns:
        float32 [H, W, 3] metres, NaN where the depth is invalid.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise MmtkError(f"depth must be one [H, W] image, got shape {depth.shape}")
    k = _check_intrinsics(intrinsics)
    height, width = depth.shape
    u = np.arange(width, dtype=np.float32)[None, :]
    v = np.arange(height, dtype=np.float32)[:, None]
    valid = np.isfinite(depth) & (depth > 0)
    z = np.where(valid, depth, np.float32(np.nan))
    x = (u - np.float32(k[0, 2])) * z / np.float32(k[0, 0])
    y = (v - np.float32(k[1, 2])) * z / np.float32(k[1, 1])
    return np.stack([x, y, z], axis=-1).astype(np.float32)


def depth_to_cloud(depth: np.ndarray, intrinsics: np.ndarray, rgb: np.ndarray | None = None,
                   organized: bool = True, frame_id: str = "") -> PointCloud:
    """A cloud from a depth image [H, W] (metres) and K; coloured by ``rgb`` (uint8 [H, W, 3]) if given.

    ``organized=False`` drops the invalid pixels and returns an [N, 3] cloud.
    """
    points = depth_to_xyz(depth, intrinsics)
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape != points.shape:
            raise MmtkError(f"colour image has shape {rgb.shape} but depth has {points.shape[:2]}; they must be aligned")
    cloud = PointCloud(points, None if rgb is None else rgb.astype(np.uint8), frame_id)
    return cloud if organized else cloud.finite()


def cloud_to_depth(cloud: PointCloud, intrinsics: np.ndarray | None = None,
                   image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Depth [H, W] (float32 metres, 0 = invalid) from a cloud.

    An organized cloud gives its z channel (NaN -> 0), no intrinsics needed. An unorganized cloud is
    projected with :func:`project_points` and needs both ``intrinsics`` and ``image_size`` (H, W).
    """
    if cloud.organized and intrinsics is None:
        z = cloud.points[..., 2]
        return np.where(cloud.valid & (z > 0), z, 0.0).astype(np.float32)
    if intrinsics is None or image_size is None:
        raise MmtkError("an unorganized point cloud has no image layout; give the camera intrinsics "
                        "(fx,fy,cx,cy) and image size to project it to a depth image")
    return project_points(cloud, intrinsics, image_size).depth


def cloud_to_xyz(cloud: PointCloud, intrinsics: np.ndarray | None = None,
                 image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Per-pixel XYZ [H, W, 3] (float32 metres, NaN = invalid) from a cloud.

    An organized cloud is returned as is; an unorganized one is projected (nearest point per pixel wins),
    which needs ``intrinsics`` and ``image_size``.
    """
    if cloud.organized and intrinsics is None:
        return cloud.points.copy()
    depth = cloud_to_depth(cloud, intrinsics, image_size)
    return depth_to_xyz(depth, intrinsics)


def cloud_to_image_depth(cloud: PointCloud, image_size: tuple[int, int],
                         intrinsics: np.ndarray | None = None) -> np.ndarray:
    """Depth [H, W] (metres, 0 = invalid) aligned with a colour image of ``image_size`` (H, W).

    An organized cloud of exactly that size is read pixel for pixel (it is registered to the image);
    any other cloud (unorganized, or organized at another resolution such as a subsampled one) is
    projected with the colour camera's ``intrinsics``, which are then required.
    """
    if cloud.organized and cloud.points.shape[:2] == tuple(image_size):
        return cloud_to_depth(cloud)
    if intrinsics is None:
        layout = f"an organized {cloud.points.shape[1]}x{cloud.points.shape[0]}" if cloud.organized else "an unorganized"
        raise MmtkError(f"{layout} point cloud cannot be aligned with the {image_size[1]}x{image_size[0]} colour "
                        "image without the colour camera's intrinsics; give a camera_info topic or fx,fy,cx,cy")
    return project_points(cloud, intrinsics, image_size).depth


def project_points(cloud: PointCloud, intrinsics: np.ndarray, image_size: tuple[int, int]) -> Projection:
    """Project a cloud onto an image with a z-buffer: where several points hit a pixel, the nearest wins.

    Each point goes to the pixel ``(round(fx*x/z + cx), round(fy*y/z + cy))``. NaN points, points behind
    the camera (z <= 0) and points outside the image are counted and skipped.

    Args:
        cloud: organized or unorganized, camera optical frame, metres.
        intrinsics: K, 3x3, pixels of the target image.
        image_size: (H, W) of the target image.
    """
    k = _check_intrinsics(intrinsics)
    height, width = int(image_size[0]), int(image_size[1])
    points = cloud.points.reshape(-1, 3).astype(np.float64)
    colors = None if cloud.colors is None else cloud.colors.reshape(-1, 3)
    finite = np.isfinite(points).all(axis=1)
    in_front = finite & (points[:, 2] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.rint(k[0, 0] * points[:, 0] / points[:, 2] + k[0, 2])
        v = np.rint(k[1, 1] * points[:, 1] / points[:, 2] + k[1, 2])
    inside = in_front & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    index = np.flatnonzero(inside)
    pixel = v[index].astype(np.int64) * width + u[index].astype(np.int64)
    z = points[index, 2]
    # Sort by pixel, then by depth: the first point of each pixel run is the nearest one.
    order = np.lexsort((z, pixel))
    pixel, z, index = pixel[order], z[order], index[order]
    first = np.ones(len(pixel), dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    depth = np.zeros(height * width, dtype=np.float32)
    depth[pixel[first]] = z[first]
    image_colors = None
    if colors is not None:
        image_colors = np.zeros((height * width, 3), dtype=np.uint8)
        image_colors[pixel[first]] = colors[index[first]]
        image_colors = image_colors.reshape(height, width, 3)
    return Projection(
        depth=depth.reshape(height, width), colors=image_colors,
        skipped_invalid=int((~finite).sum()), skipped_behind=int((finite & ~in_front).sum()),
        skipped_outside=int((in_front & ~inside).sum()), occluded=int((~first).sum()))


# ----------------------------------------------------------------------------------------- files

def _pcd_layout(path: Path) -> tuple[int, int] | None:
    """(HEIGHT, WIDTH) from a PCD header when the cloud is organized (HEIGHT > 1), else None."""
    width = height = 1
    with open(path, "rb") as handle:
        for _ in range(64):
            line = handle.readline()
            if not line:
                break
            words = line.decode("ascii", errors="replace").split()
            if not words:
                continue
            if words[0] == "WIDTH":
                width = int(words[1])
            elif words[0] == "HEIGHT":
                height = int(words[1])
            elif words[0] == "DATA":
                break
    return (height, width) if height > 1 else None


def read_cloud(path: str | os.PathLike) -> PointCloud:
    """Read a ``.ply`` or ``.pcd`` file (open3d). An organized PCD (HEIGHT > 1) keeps its [H, W, 3] layout."""
    import open3d as o3d

    path = Path(path)
    if path.suffix.lower() not in CLOUD_SUFFIXES:
        raise MmtkError(f"{path}: unknown point-cloud format {path.suffix!r}; use .ply or .pcd")
    if not path.is_file():
        raise MmtkError(f"{path}: no such point-cloud file")
    legacy = o3d.io.read_point_cloud(str(path), remove_nan_points=False, remove_infinite_points=False)
    points = np.asarray(legacy.points, dtype=np.float32)
    if len(points) == 0:
        raise MmtkError(f"{path}: no points could be read (empty or corrupt {path.suffix} file)")
    colors = None
    if legacy.has_colors():
        colors = np.clip(np.rint(np.asarray(legacy.colors) * 255.0), 0, 255).astype(np.uint8)
    layout = _pcd_layout(path) if path.suffix.lower() == ".pcd" else None
    if layout is not None and layout[0] * layout[1] == len(points):
        points = points.reshape(*layout, 3)
        colors = None if colors is None else colors.reshape(*layout, 3)
    return PointCloud(points, colors)


def write_cloud(path: str | os.PathLike, cloud: PointCloud, binary: bool = True, sweep: bool = True) -> int:
    """Write the valid points of ``cloud`` to a ``.ply`` or ``.pcd`` file (open3d); returns the number written.

    Invalid (NaN) points are skipped, so the file is unorganized. The file appears under its name only
    once complete (:func:`mmtk.io.atomic_path`; ``sweep=False`` skips removing dead runs' temporary files).
    """
    import open3d as o3d

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CLOUD_SUFFIXES:
        raise MmtkError(f"{path}: cannot write point-cloud format {path.suffix!r}; use .ply or .pcd")
    valid = cloud.finite()
    if len(valid.points) == 0:
        raise MmtkError(f"{path}: the point cloud has no valid points to write")
    legacy = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(valid.points.astype(np.float64)))
    if valid.colors is not None:
        legacy.colors = o3d.utility.Vector3dVector(valid.colors.astype(np.float64) / 255.0)
    with atomic_path(path, suffix=suffix, sweep=sweep) as tmp:
        if not o3d.io.write_point_cloud(str(tmp), legacy, write_ascii=not binary):
            raise MmtkError(f"{path}: open3d could not write the point cloud (check the folder is writable)")
    return len(valid.points)


def frame_colours(arrays: dict[str, np.ndarray], colour: str | None, num_labels: int | None = None
                  ) -> np.ndarray | None:
    """Point colours uint8 [H, W, 3] from a frame's array ``colour``: a colour image (uint8 [H, W, 3]) as it is,
    integer class labels [H, W] through the label palette (``num_labels``: ids incl. unlabeled, when known); None
    for no colour."""
    from mmtk.visualize import colorize_labels

    if colour is None:
        return None
    if colour not in arrays:
        raise MmtkError(f"--color {colour}: the frame has no {colour!r} array (it has {', '.join(sorted(arrays))})")
    values = np.asarray(arrays[colour])
    if values.ndim == 3 and values.shape[2] == 3 and values.dtype == np.uint8:
        return values
    if values.ndim == 2 and np.issubdtype(values.dtype, np.integer):
        return colorize_labels(values, num_labels)
    raise MmtkError(f"--color {colour}: a {values.dtype} array of shape {list(values.shape)} is neither a colour "
                    f"image nor class labels; give one of those, or none")
