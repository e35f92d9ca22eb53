"""Loader throughput and bytes per frame: mmtk files (format 2) against the source files they were converted from.

Two real layouts at 480x640 with rgb + depth + semseg, their frames repeated to --frames files:

* MultiMAE's PNG layout (``samples/nyuv2_multimae``): rgb PNG, depth uint16 PNG at 6553.6 units/m, semseg PNG;
* the BTS layout (``samples/nyuv2_sync``): rgb JPEG, depth uint16 PNG in mm; BTS ships no labels, so the MultiMAE
  sample's semseg PNG stands beside each frame.

Each layout is converted the way ``mmtk convert --rgbd`` does it (the same source readers and writer), and read by
``H5Dataset``; the file loaders decode the same files with Pillow, as the official MultiMAE code does. A format 1
file (raw uint8 rgb, float32 metres) of the same frames is read too, for reference. All loaders produce the same
tensors (rgb + depth + semseg, random resized crop + flip, 224x224) with the same augmentation code, in one process
with one torch thread: samples/s per DataLoader worker. Rounds are interleaved and the best kept (a shared machine
only slows a round down). Ratios: bytes against the layout's own files; speed against the PNG layout's loader.

Usage: python benchmarks/bench_loader.py [--frames 64] [--samples 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from PIL import Image

from mmtk.data import H5Dataset
from mmtk.adapters.depth import prepare_depth  # noqa: E402 (adapters sit above mmtk.data)
from mmtk.adapters.rgb import prepare_rgb
from mmtk.adapters.semseg import prepare_semseg
from mmtk.data.convert import convert_rgbd, write_frames
from mmtk.data.sources.frame import ConvertOptions
from mmtk.data.sources.nyuv2_meta import nyuv2_meta
from mmtk.data.sources.folders import open_rgbd_source
from mmtk.data.transforms import random_resized_crop

REPO = Path(__file__).resolve().parents[1]
MULTIMAE = REPO / "samples" / "nyuv2_multimae" / "train"
SYNC = REPO / "samples" / "nyuv2_sync"
LABELS = MULTIMAE / "semseg" / "data" / "0000.png"
GPU_RATES = {"MultiMAE-B on one H200 (bf16, measured)": 1891, "MultiMAE-B at 45 % of an H100's bf16 matmul rate": 5000}


class FileDataset(torch.utils.data.Dataset):
    """Samples decoded from image files with Pillow, prepared exactly as H5Dataset prepares them."""

    def __init__(self, triples: list[tuple[Path, Path, Path]], units_per_metre: float,
                 size: tuple[int, int] = (224, 224)) -> None:
        self.triples, self.scale, self.size = triples, np.float32(units_per_metre), size

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rgb_path, depth_path, label_path = self.triples[index]
        rgb = np.array(Image.open(rgb_path).convert("RGB"))
        depth = np.array(Image.open(depth_path)).astype(np.float32) / self.scale
        labels = np.array(Image.open(label_path))
        win = random_resized_crop(*rgb.shape[:2])
        sample = {"rgb": prepare_rgb(rgb[win.rows, win.cols], self.size, win.flip)}
        sample.update(prepare_depth(depth[win.rows, win.cols], self.size, win.flip))
        sample.update(prepare_semseg(labels[win.rows, win.cols], self.size, win.flip))
        return sample


def multimae_folder(root: Path, frames: int) -> list[tuple[Path, Path, Path]]:
    """MultiMAE's layout with ``frames`` copies of the real frame (each file decoded independently)."""
    for name in ("rgb", "depth", "semseg"):
        (root / "train" / name / "data").mkdir(parents=True)
        for i in range(frames):
            shutil.copy(MULTIMAE / name / "data" / "0000.png", root / "train" / name / "data" / f"{i:04d}.png")
    return [tuple(root / "train" / name / "data" / f"{i:04d}.png" for name in ("rgb", "depth", "semseg"))
            for i in range(frames)]


def bts_folder(root: Path, frames: int) -> list[tuple[Path, Path, Path]]:
    """The BTS layout with the 3 real sample frames cycled to ``frames``, and a label PNG beside each."""
    sources = sorted((SYNC / "rgb").glob("rgb_*.jpg"))
    for name in ("rgb", "depth", "semseg"):
        (root / name).mkdir(parents=True)
    triples = []
    for i in range(frames):
        source = sources[i % len(sources)]
        depth = SYNC / "depth" / source.name.replace("rgb_", "sync_depth_").replace(".jpg", ".png")
        triple = (root / "rgb" / f"rgb_{i:05d}.jpg", root / "depth" / f"sync_depth_{i:05d}.png",
                  root / "semseg" / f"{i:05d}.png")
        for src, dst in zip((source, depth, LABELS), triple):
            shutil.copy(src, dst)
        triples.append(triple)
    return triples


def convert_bts_with_labels(root: Path, out: Path) -> None:
    """`mmtk convert --rgbd` of the BTS folder, with each frame's label PNG added as semseg."""
    source = open_rgbd_source(root, ConvertOptions())
    labels = np.array(Image.open(LABELS))

    def frames():
        for frame in source.frames():
            frame.arrays["semseg"] = labels
            yield frame

    write_frames(frames(), out, source="bench", total=source.total, classes=nyuv2_meta()["names40"], progress=False)


def write_format_1(path: Path, triples: list[tuple[Path, Path, Path]], units_per_metre: float) -> None:
    """The same frames as format 1 stored them: raw chunked arrays, depth float32 metres (mmtk still reads it)."""
    from mmtk.data.sources.depth_encoding import DepthEncoding, read_depth

    first = [np.array(Image.open(p)) for p in triples[0]]
    with h5py.File(path, "w") as f:
        f.attrs.update({"mmtk_format": 1, "source": "bench", "created": "2025-01-01T00:00:00+00:00"})
        group = f.create_group("train")
        shapes = {"rgb": (first[0].shape, np.uint8), "depth": (first[1].shape, np.float32),
                  "semseg": (first[2].shape, np.uint8)}
        for name, (shape, dtype) in shapes.items():
            group.create_dataset(name, shape=(len(triples), *shape), dtype=dtype, chunks=(1, *shape), fletcher32=True)
        group["semseg"].attrs["classes"] = json.dumps(nyuv2_meta()["names40"])
        for i, (rgb, depth, labels) in enumerate(triples):
            group["rgb"][i] = np.array(Image.open(rgb).convert("RGB"))
            group["depth"][i] = read_depth(depth, DepthEncoding(None, units_per_metre))
            group["semseg"][i] = np.array(Image.open(labels))


def throughput(dataset: torch.utils.data.Dataset, samples: int) -> float:
    for i in range(min(4, len(dataset))):  # warm-up (file cache, allocations)
        dataset[i]
    start = time.perf_counter()
    for i in range(samples):
        dataset[i % len(dataset)]
    return samples / (time.perf_counter() - start)


def mb_per_frame(paths: list[Path], frames: int) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6 / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        layouts: dict[str, tuple[list[tuple[Path, Path, Path]], float, Callable[[Path], None]]] = {}
        png = multimae_folder(tmp_path / "multimae", args.frames)
        layouts["MultiMAE PNG"] = (png, 6553.6, lambda out: convert_rgbd(tmp_path / "multimae", out, progress=False))
        bts = bts_folder(tmp_path / "bts", args.frames)
        layouts["BTS jpg+png"] = (bts, 1000.0, lambda out: convert_bts_with_labels(tmp_path / "bts", out))
        loaders: dict[str, torch.utils.data.Dataset] = {}
        sizes: dict[str, float] = {}
        for name, (triples, scale, convert) in layouts.items():
            out = tmp_path / f"{name.split()[0]}.h5"
            convert(out)
            loaders[f"{name} files"] = FileDataset(triples, scale)
            with h5py.File(out) as handle:
                split = next(iter(handle))  # MultiMAE's folder is "train", BTS's has no split ("all")
            loaders[f"{name} -> mmtk format 2"] = H5Dataset(out, split=split, augment=True)
            sizes[f"{name} files"] = mb_per_frame([p for t in triples for p in t], args.frames)
            sizes[f"{name} -> mmtk format 2"] = mb_per_frame([out], args.frames)
        old = tmp_path / "format1.h5"
        write_format_1(old, png, 6553.6)
        loaders["MultiMAE PNG -> mmtk format 1"] = H5Dataset(old, split="train", augment=True)
        sizes["MultiMAE PNG -> mmtk format 1"] = mb_per_frame([old], args.frames)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, dataset in loaders.items():
                rates[name].append(throughput(dataset, args.samples))
        best = {name: max(values) for name, values in rates.items()}
        print(f"{args.frames} frames x 480x640 (real NYUv2 frames), rgb + depth + semseg -> 224x224 with random "
              f"resized crop + flip; 1 torch thread (= one DataLoader worker); best of {args.rounds} rounds of "
              f"{args.samples} samples")
        reference = best["MultiMAE PNG files"]
        print(f"| storage | MB/frame | bytes vs its source files | samples/s per worker | vs PNG layout loader |")
        print("| --- | --- | --- | --- | --- |")
        for name in loaders:
            source = sizes[f"{name.split(' ->')[0].removesuffix(' files')} files"]
            print(f"| {name} | {sizes[name]:.3f} | {sizes[name] / source:.2f}x | {best[name]:.1f} | "
                  f"{best[name] / reference:.2f}x |")
        for name in layouts:
            mb, rate = sizes[f"{name} -> mmtk format 2"], best[f"{name} -> mmtk format 2"]
            cores = ", ".join(f"{gpu / rate:.1f} at {gpu} img/s ({what})" for what, gpu in GPU_RATES.items())
            print(f"{name} -> format 2: 2.5 M frames take {mb * 2.5e6 / 1e6:.2f} TB; loader worker cores per GPU: "
                  f"{cores}")


if __name__ == "__main__":
    main()
