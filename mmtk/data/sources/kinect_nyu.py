"""Registration of raw NYU Depth v2 Kinect frames: depth from the depth (IR) camera into the colour image.

A raw NYUv2 frame pairs a distorted colour image with depth measured by the other camera of the Kinect, 2.5 cm
beside it: their pixels do not correspond. The NYU Depth v2 toolbox (Silberman et al., ECCV 2012,
``toolbox_nyu_depth_v2.zip``; ``project_depth_map.m``) registers them, and so does :class:`NyuRegistration`:

1. the colour image is undistorted onto the pinhole grid of its own camera matrix (``undistort.m``: each output
   pixel samples the distorted image bilinearly where the lens model puts it; pixels the lens never saw are
   filled white, 255, as the toolbox's are);
2. each valid depth pixel is undistorted as a point (the lens model inverted by fixed-point iteration, as
   Bouguet's ``comp_distortion_oulu``), back-projected with the depth camera matrix, moved into the colour
   camera's frame by the rotation and translation, and projected with the colour camera matrix;
3. points landing on the same pixel keep the nearest (z-buffer); pixels no point reaches stay 0 = invalid.

Two differences to the toolbox, both to avoid inventing depth: the toolbox resamples the disparity image
bilinearly to undistort it (step 2 moves each measurement instead, so no value is a blend of neighbours), and
it stores the depth camera's z; here z is the point's distance along the colour camera's axis (on the sample
frame 4 mm apart in the median, 22 mm at most), so that back-projecting the stored depth with the stored (colour)
intrinsics gives the measured points.

Calibration (``camera_params.m``, calibrated by NYU with RGBDemo; read from the toolbox copy in
github.com/onmyoji-xiao/NYU_Raw_extract @ a21cdaf, files ``camera_params.m``, ``project_depth_map.m``,
``depth_world2rgb_world.m``, ``undistort.m``, ``apply_distortion.m``). The toolbox projects with 1-based pixel
coordinates (``meshgrid(1:640, 1:480)``), so every principal point here is the toolbox's minus 1 (mmtk's pixels
are 0-based), as in :func:`mmtk.data.sources.nyuv2_meta.nyuv2_intrinsics`. (Its ``undistort.m``, taken from Bouguet's
calibration toolbox, counts pixels from 0 with the same principal point; using the minus-1 point for the lens
too moves the colour correction by at most 0.14 px: 0.11 px across, 0.09 px down, at the top-left corner.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from mmtk.data.sources.intrinsics import IntrinsicsFile
from mmtk.data.sources.nyuv2_meta import nyuv2_intrinsics
from mmtk.errors import MmtkError
from mmtk.pointcloud import PointCloud, intrinsics_matrix, project_points

NYU_KINECT_SIZE = (480, 640)  # (H, W) both cameras were calibrated at
UNSEEN_RGB = 255  # colour of undistorted pixels outside the lens's view (the toolbox's white border)
UNDISTORT_ITERATIONS = 20  # Bouguet's comp_distortion_oulu; the residual is < 1e-6 px over the NYU image

# camera_params.m, lens distortion as Bouguet's kc = (k1, k2, p1, p2, k3) (the order OpenCV uses too)
_NYU_RGB_DISTORTION = (2.0796615318809061e-01, -5.8613825163911781e-01, 7.2231363135888329e-04,
                       1.0479627195765181e-03, 4.9856986684705107e-01)
_NYU_DEPTH_K = (5.8262448167737955e+02, 5.8269103270988637e+02,  # fx_d, fy_d (px)
                3.1304475870804731e+02 - 1.0, 2.3844389626620386e+02 - 1.0)  # cx_d, cy_d, 0-based
_NYU_DEPTH_DISTORTION = (-9.9897236553084481e-02, 3.9065324602765344e-01, 1.9290592870229277e-03,
                         -1.9422022475975055e-03, -5.1031725053400578e-01)
# camera_params.m lists nine numbers V (row by row) and sets R = inv(reshape(-V, 3, 3)') = -inv(V), with
# T = (t_x, t_z, t_y) in depth_world2rgb_world.m: p_rgb = R p_depth + T. Since the projection divides by z,
# that equals the proper rotation inv(V) = V' (det +1) with translation -T, which is what is used here.
_NYU_ROTATION_ROWS = ((9.9997798940829263e-01, 5.0518419386157446e-03, 4.3011152014118693e-03),
                      (-5.0359919480810989e-03, 9.9998051861143999e-01, -3.6879781309514218e-03),
                      (-4.3196624923060242e-03, 3.6662365748484798e-03, 9.9998394948385538e-01))
_NYU_T = (2.5031875059141302e-02, -2.9342312935846411e-04, 6.6238747008330102e-04)  # (t_x, t_z, t_y), metres


@dataclass(frozen=True)
class KinectCalibration:
    """Two pinhole cameras with Brown-Conrady lenses and the rigid motion between them.

    Attributes:
        rgb_matrix, depth_matrix: K, 3x3 (pixels, 0-based principal point) of the colour and depth cameras.
        rgb_distortion, depth_distortion: (k1, k2, p1, p2, k3) of each lens (0 = an ideal pinhole).
        depth_to_rgb: 4x4 rigid matrix taking points in the depth camera's frame to the colour camera's (metres).
        size: (H, W) of both images.
    """

    rgb_matrix: np.ndarray
    depth_matrix: np.ndarray
    rgb_distortion: tuple[float, ...]
    depth_distortion: tuple[float, ...]
    depth_to_rgb: np.ndarray
    size: tuple[int, int] = NYU_KINECT_SIZE


def nyu_kinect_calibration() -> KinectCalibration:
    """The NYU Depth v2 Kinect's calibration (toolbox ``camera_params.m``), 0-based pixels, metres."""
    motion = np.eye(4)
    motion[:3, :3] = np.asarray(_NYU_ROTATION_ROWS).T  # = inv(V): V's rows are orthonormal to 1e-16
    motion[:3, 3] = -np.asarray(_NYU_T)
    return KinectCalibration(nyuv2_intrinsics().astype(np.float64), intrinsics_matrix(*_NYU_DEPTH_K).astype(np.float64),
                             _NYU_RGB_DISTORTION, _NYU_DEPTH_DISTORTION, motion)


def distort(x: np.ndarray, y: np.ndarray, kc: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Ideal normalized image coordinates -> where the lens puts them (Bouguet's ``apply_distortion``)."""
    k1, k2, p1, p2, k3 = kc
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def undistort(xd: np.ndarray, yd: np.ndarray, kc: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Distorted normalized coordinates -> ideal ones: :func:`distort` inverted by fixed-point iteration."""
    k1, k2, p1, p2, k3 = kc
    x, y = xd.copy(), yd.copy()
    for _ in range(UNDISTORT_ITERATIONS):
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        x, y = ((xd - (2 * p1 * x * y + p2 * (r2 + 2 * x * x))) / radial,
                (yd - (p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)) / radial)
    return x, y


def _pixel_grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:size[0], 0:size[1]].astype(np.float64)
    return u, v


class NyuRegistration:
    """Registers raw Kinect frames of one calibration; the per-pixel lens maps are computed once."""

    def __init__(self, calibration: KinectCalibration | None = None) -> None:
        self.calibration = calibration or nyu_kinect_calibration()
        c = self.calibration
        u, v = _pixel_grid(c.size)
        # Colour: for each pixel of the undistorted image, where it lies in the distorted one (undistort.m)
        k = c.rgb_matrix
        xd, yd = distort((u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], c.rgb_distortion)
        self._rgb_source = np.stack([yd * k[1, 1] + k[1, 2], xd * k[0, 0] + k[0, 2]])  # [2, H, W] (row, col)
        # Depth: the ideal ray (x/z, y/z) of each distorted depth pixel
        k = c.depth_matrix
        x, y = undistort((u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], c.depth_distortion)
        self._depth_rays = np.stack([x, y, np.ones_like(x)], axis=-1)  # [H, W, 3]

    def undistort_image(self, image: np.ndarray, nearest: bool = False, fill: int = UNSEEN_RGB) -> np.ndarray:
        """A [H, W] or [H, W, C] image of the distorted colour camera -> the pinhole image of
        ``calibration.rgb_matrix``: bilinear (``nearest``: the nearest pixel, for labels); ``fill`` where the
        lens saw nothing."""
        planes = image[..., None] if image.ndim == 2 else image
        out = np.stack([ndimage.map_coordinates(planes[..., i].astype(np.float32), self._rgb_source,
                                                order=0 if nearest else 1, mode="constant", cval=np.nan)
                        for i in range(planes.shape[2])], axis=-1)
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        # other dtypes pass through unchanged: the writer's adapter check refuses what it cannot store
        out = np.where(np.isnan(out), fill, out).astype(image.dtype)
        return out[..., 0] if image.ndim == 2 else out

    def register_depth(self, depth: np.ndarray) -> np.ndarray:
        """float32 [H, W] metres in the (distorted) depth image -> metres in the undistorted colour image.

        Nearest point wins where several land on one pixel; pixels none reaches are 0 (invalid)."""
        valid = depth > 0
        points = self._depth_rays[valid] * depth[valid, None].astype(np.float64)  # [N, 3] depth camera frame
        motion = self.calibration.depth_to_rgb
        # [N, 3] colour camera frame; einsum, since BLAS's [N, 3] @ [3, 3] took 15x longer (0.22 against 0.015 s)
        in_rgb = np.einsum("ij,nj->ni", motion[:3, :3], points) + motion[:3, 3]
        return project_points(PointCloud(in_rgb, frame_id="rgb"), self.calibration.rgb_matrix,
                              self.calibration.size).depth

    def __call__(self, arrays: dict[str, np.ndarray], where: object) -> dict[str, np.ndarray]:
        """A raw frame's arrays -> registered ones: "rgb" (uint8, distorted) undistorted, "depth" (metres, depth
        camera) projected into it, "semseg" (drawn on the raw colour image, 0 = unlabeled) undistorted."""
        missing = sorted({"rgb", "depth"} - set(arrays))
        if missing:
            raise MmtkError(f"{where}: a raw Kinect frame is registered from its colour image and its depth, but "
                            f"this frame has no {' and no '.join(missing)}; give both")
        size = self.calibration.size
        shapes = {name: array.shape[:2] for name, array in arrays.items()}
        if any(shape != size for shape in shapes.values()):
            listed = ", ".join(f"{name} {shape[1]}x{shape[0]}" for name, shape in shapes.items())
            raise MmtkError(f"{where}: raw Kinect frames are registered with the NYU Depth v2 calibration for "
                            f"{size[1]}x{size[0]} images, but this frame has {listed}; give the frames as the "
                            f"Kinect wrote them")
        extra = sorted(set(arrays) - {"rgb", "depth", "semseg"})
        if extra:
            raise MmtkError(f"{where}: {', '.join(extra)} cannot be registered with a raw Kinect frame (only rgb, "
                            f"depth and semseg can); convert them separately")
        out = {"rgb": self.undistort_image(arrays["rgb"]), "depth": self.register_depth(arrays["depth"])}
        if "semseg" in arrays:
            out["semseg"] = self.undistort_image(arrays["semseg"], nearest=True, fill=0)
        return out


def kinect_registration(src: Path, camera: IntrinsicsFile | None, notes: list[str]) -> NyuRegistration:
    """The registration of raw Kinect v1 frames (NYU Depth v2 calibration), refused beside another camera file."""
    if camera is not None:
        raise MmtkError(f"{src}: raw Kinect disparity is registered to the colour image with the NYU Depth v2 "
                        f"calibration, which brings its own intrinsics, but {camera.path.name} gives others; "
                        f"move {camera.path.name} away, or convert the depth to millimetres first")
    notes.append("raw Kinect depth registered to the colour image with the NYU Depth v2 toolbox calibration "
                 "(camera_params.m): colour undistorted, each depth pixel projected into it (nearest wins, "
                 "pixels no depth reaches = 0, invalid); intrinsics: the NYUv2 RGB camera")
    return NyuRegistration()
