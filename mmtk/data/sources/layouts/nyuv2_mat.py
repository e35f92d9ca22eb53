"""The NYUv2 labeled release (``nyu_depth_v2_labeled.mat``, MATLAB v7.3 = HDF5), streamed frame by frame; with an
optional ``splits.mat`` beside it (else the official 795/654 split)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from mmtk.data.format import check_dataset_size
from mmtk.data.sources.depth_encoding import DepthEncoding, decode_depth
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.nyuv2_meta import nyuv2_intrinsics, nyuv2_meta
from mmtk.errors import MmtkError

NYU_MAT_NAME = "nyu_depth_v2_labeled.mat"
NYU_LABELED_FRAMES = 1449


def nyu_mat_path(src: Path) -> Path | None:
    """``src`` itself when it is a .mat file, else the labeled release inside the folder ``src``, if any."""
    if src.is_file() and src.suffix == ".mat":
        return src
    candidate = src / NYU_MAT_NAME
    return candidate if candidate.is_file() else None


def _class_space(classes: int) -> tuple[np.ndarray | None, list[str]]:
    """Map from raw 894 labels to the chosen space (None = keep 894) and the space's names."""
    meta = nyuv2_meta()
    if classes == 40:
        return np.asarray(meta["map894_to_40"], np.uint16), list(meta["names40"])
    if classes == 13:
        return np.asarray(meta["map894_to_13"], np.uint16), list(meta["names13"])
    if classes == 894:
        return None, list(meta["names894"])
    raise MmtkError(f"--classes {classes} is not supported; use 40, 13 or 894")


def nyuv2_split_indices(n_frames: int, splits_mat: Path | None) -> dict[str, list[int]]:
    """0-based frame indices per split: splits.mat if given, else the official split for 1449 frames, else all."""
    if splits_mat is not None:
        from scipy.io import loadmat

        try:
            mat = loadmat(splits_mat)
            train = [int(i) - 1 for i in np.ravel(mat["trainNdxs"])]
            test = [int(i) - 1 for i in np.ravel(mat["testNdxs"])]
        except (KeyError, ValueError, OSError, TypeError) as err:
            raise MmtkError(f"{splits_mat} is not a readable NYUv2 splits.mat ({err})") from None
        bad = [i for i in train + test if not 0 <= i < n_frames]
        if bad:
            raise MmtkError(f"{splits_mat} lists frame {bad[0] + 1} but the .mat holds {n_frames} frames; "
                            f"remove or fix splits.mat")
        return {"train": sorted(train), "test": sorted(test)}
    if n_frames == NYU_LABELED_FRAMES:
        meta = nyuv2_meta()
        return {"train": list(meta["train_indices"]), "test": list(meta["test_indices"])}
    return {"all": list(range(n_frames))}


def _mat_strings(handle: h5py.File, key: str) -> list[str] | None:
    if key not in handle:
        return None
    refs = handle[key][()].ravel()
    return ["".join(chr(int(c)) for c in np.ravel(handle[ref][()])) for ref in refs]


def _open_nyu_mat(mat_path: Path, options: ConvertOptions) -> RgbdSource:
    mapping, names = _class_space(options.classes)
    try:
        handle = h5py.File(mat_path, "r")
    except OSError as err:
        raise MmtkError(f"{mat_path} is not a readable MATLAB v7.3 file ({str(err).split(';')[0]}); "
                        f"it may be truncated: download it again") from None
    with handle:
        missing = [k for k in ("images", "depths") if k not in handle]
        if missing:
            raise MmtkError(f"{mat_path} lacks {', '.join(missing)}; is it nyu_depth_v2_labeled.mat?")
        for key in ("images", "depths", "rawDepths", "labels"):  # declared sizes, before memory follows them
            if key in handle and isinstance(handle[key], h5py.Dataset):
                check_dataset_size(handle[key], f"{mat_path}:{key}", "download the file again")
        n_frames = int(handle["images"].shape[0])
        has_labels = "labels" in handle
        has_raw = "rawDepths" in handle
        if options.classes == 894 and "names" in handle:
            names = _mat_strings(handle, "names") or names
    splits_mat = mat_path.parent / "splits.mat"
    splits = nyuv2_split_indices(n_frames, splits_mat if splits_mat.is_file() else None)
    notes = [f"splits: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} frames "
             f"({'from ' + str(splits_mat) if splits_mat.is_file() else 'official 795/654' if n_frames == NYU_LABELED_FRAMES else 'no split: not 1449 frames'})"]
    if has_labels:
        notes.append(f"labels: 894 raw classes -> {len(names)} classes")
    encoding = options.encoding(DepthEncoding())  # the .mat holds metres
    notes.append(f"depth read as {encoding.text}")

    def frames() -> Iterator[Frame]:
        intrinsics = nyuv2_intrinsics()
        with h5py.File(mat_path, "r") as mat:
            scenes = _mat_strings(mat, "scenes")
            for split, indices in splits.items():
                for i in indices:
                    yield _nyu_frame(mat, i, split, encoding, mapping, intrinsics, has_labels, has_raw,
                                     scenes[i] if scenes else None)

    return RgbdSource("nyuv2-mat", f"NYUv2 labeled release ({mat_path.name}, {n_frames} frames)",
                      sum(len(v) for v in splits.values()), frames, names if has_labels else None, notes,
                      decode_apart=False)


def _nyu_frame(mat: h5py.File, i: int, split: str, encoding: DepthEncoding, mapping: np.ndarray | None,
               intrinsics: np.ndarray, has_labels: bool, has_raw: bool, scene: str | None) -> Frame:
    try:
        rgb = np.ascontiguousarray(mat["images"][i].transpose(2, 1, 0))  # MATLAB column-major: [3,W,H] -> [H,W,3]
        depth = decode_depth(np.ascontiguousarray(mat["depths"][i].T), encoding, f"frame {i}")
        arrays = {"rgb": rgb, "depth": depth}
        if has_raw:
            arrays["depth_raw"] = decode_depth(np.ascontiguousarray(mat["rawDepths"][i].T), encoding, f"frame {i}")
        if has_labels:
            labels = np.ascontiguousarray(mat["labels"][i].T).astype(np.int64)
            if labels.max(initial=0) > 894 or labels.min(initial=0) < 0:
                raise MmtkError(f"frame {i}: label {labels.max()} is beyond the 894-class map")
            arrays["semseg"] = labels if mapping is None else mapping[labels]
    except OSError as err:
        raise MmtkError(f"frame {i} of the .mat cannot be read ({err}); the file may be truncated") from None
    frame_id = f"{i:04d}" + (f" {scene}" if scene else "")
    return Frame(split, arrays, intrinsics if rgb.shape[:2] == (480, 640) else None, None, frame_id)


@register_layout
class NyuMat(Layout):
    name = "nyuv2-mat"
    description = f"NYUv2 labeled release: a folder with {NYU_MAT_NAME} (+ optional splits.mat)"
    reads_a_file = True  # the .mat itself

    def detect(self, src: Path) -> str | None:
        return f"{src.name if src.suffix == '.mat' else NYU_MAT_NAME} found" if nyu_mat_path(src) else None

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        mat_path = nyu_mat_path(src)
        if mat_path is None:
            raise MmtkError(f"{src}: no {NYU_MAT_NAME} (nor a .mat file) to read")
        return _open_nyu_mat(mat_path, options)
