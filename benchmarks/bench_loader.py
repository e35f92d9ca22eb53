"""Loader throughput: mmtk HDF5 (H5Dataset) vs decoding the same frames from PNG files (MultiMAE's layout).

Both loaders produce the same tensors (rgb + depth + semseg, random resized crop + flip, 224x224) with the
same augmentation code; only the storage differs. Runs in one process with one torch thread, so the
numbers are samples/s per DataLoader worker. Frames are the real samples, repeated to N files.

A second table compares ways to store depth (the largest array after rgb): float32 metres (the format's),
uint16 millimetres, float16 metres, and HDF5 filters from hdf5plugin (Blosc LZ4 / Zstd with byte shuffle) when
it is installed; each reads the depth crop, converts it to metres and prepares it as the loader does.

Usage: python benchmarks/bench_loader.py [--frames 64] [--samples 200] [--rounds 3] [--compression none,lzf,gzip]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtk.data import H5Dataset, H5Writer
from mmtk.adapters.semseg import prepare_semseg  # noqa: E402 (adapters sit above mmtk.data)
from mmtk.data.transforms import prepare_depth, prepare_rgb, random_resized_crop

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "nyuv2_multimae" / "train"
SCALE = 6553.6


def real_frame() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = np.array(Image.open(SAMPLE / "rgb/data/0000.png"))
    depth_units = np.array(Image.open(SAMPLE / "depth/data/0000.png"))
    labels = np.array(Image.open(SAMPLE / "semseg/data/0000.png"))
    return rgb, depth_units, labels


def build_png_folder(root: Path, frames: int) -> None:
    """MultiMAE layout with `frames` copies of the real frame (each file decoded independently)."""
    for name in ("rgb", "depth", "semseg"):
        (root / name / "data").mkdir(parents=True)
        for i in range(frames):
            shutil.copy(SAMPLE / name / "data" / "0000.png", root / name / "data" / f"{i:04d}.png")


def build_h5(path: Path, frames: int, compression: str | None) -> None:
    rgb, depth_units, labels = real_frame()
    from mmtk.data.sources.base import nyuv2_meta

    with H5Writer(path, source="bench", classes=nyuv2_meta()["names40"], compression=compression) as writer:
        for _ in range(frames):
            writer.add_frame("train", {"rgb": rgb, "depth": depth_units / np.float32(SCALE), "semseg": labels})


class PngDataset(torch.utils.data.Dataset):
    """The same samples decoded from PNG files, as the official MultiMAE code stores NYUv2."""

    def __init__(self, root: Path, size: tuple[int, int] = (224, 224)) -> None:
        self.files = sorted((root / "rgb" / "data").iterdir())
        self.root, self.size = root, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        name = self.files[index].name
        rgb = np.array(Image.open(self.root / "rgb" / "data" / name).convert("RGB"))
        depth = np.array(Image.open(self.root / "depth" / "data" / name)).astype(np.float32) / np.float32(SCALE)
        labels = np.array(Image.open(self.root / "semseg" / "data" / name))
        win = random_resized_crop(*rgb.shape[:2])
        sample = {"rgb": prepare_rgb(rgb[win.rows, win.cols], self.size, win.flip)}
        sample.update(prepare_depth(depth[win.rows, win.cols], self.size, win.flip))
        sample.update(prepare_semseg(labels[win.rows, win.cols], self.size, win.flip))
        return sample


DEPTH_STORAGE = {  # name -> (dtype, stored units per metre, h5py filter kwargs or None when hdf5plugin is needed)
    "float32 m": (np.float32, 1.0, {}),
    "uint16 mm": (np.uint16, 1000.0, {}),
    "float16 m": (np.float16, 1.0, {}),
    "float32 m, lzf": (np.float32, 1.0, {"compression": "lzf"}),
    "uint16 mm, lzf": (np.uint16, 1000.0, {"compression": "lzf"}),
    "float32 m, blosc-lz4": (np.float32, 1.0, None),
    "uint16 mm, blosc-lz4": (np.uint16, 1000.0, None),
    "uint16 mm, blosc-zstd": (np.uint16, 1000.0, None),
}


def blosc_filter(name: str) -> dict | None:
    try:
        import hdf5plugin
    except ImportError:
        return None
    codec = "zstd" if "zstd" in name else "lz4"
    return dict(hdf5plugin.Blosc(cname=codec, clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))


class DepthOnly(torch.utils.data.Dataset):
    """Depth crops read from one storage variant, converted to metres and prepared like the loader's."""

    def __init__(self, path: Path, scale: float, size: tuple[int, int] = (224, 224)) -> None:
        self.path, self.scale, self.size, self.dataset = path, scale, size, None

    def __len__(self) -> int:
        import h5py

        with h5py.File(self.path) as f:
            return f["depth"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import h5py

        if self.dataset is None:
            self.dataset = h5py.File(self.path)["depth"]
        win = random_resized_crop(*self.dataset.shape[1:3])
        crop = self.dataset[index, win.rows, win.cols].astype(np.float32) / np.float32(self.scale)
        return prepare_depth(crop, self.size, win.flip)


def build_depth_variants(root: Path, frames: int) -> dict[str, tuple[Path, float]]:
    import h5py

    _, depth_units, _ = real_frame()
    metres = depth_units / np.float32(SCALE)
    built = {}
    for name, (dtype, scale, filters) in DEPTH_STORAGE.items():
        filters = filters if filters is not None else blosc_filter(name)
        if filters is None:
            continue
        path = root / f"depth_{len(built)}.h5"
        stored = np.round(metres * scale).astype(dtype) if dtype == np.uint16 else (metres * scale).astype(dtype)
        with h5py.File(path, "w") as f:
            d = f.create_dataset("depth", shape=(frames, *stored.shape), dtype=dtype, chunks=(1, *stored.shape),
                                 **filters)
            for i in range(frames):
                d[i] = stored
        built[name] = (path, scale)
    return built


def throughput(dataset: torch.utils.data.Dataset, samples: int) -> float:
    for i in range(min(4, len(dataset))):  # warm-up (file cache, allocations)
        dataset[i]
    start = time.perf_counter()
    for i in range(samples):
        dataset[i % len(dataset)]
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--compression", default="none,lzf,gzip")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    options = args.compression.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        build_png_folder(tmp_path / "png", args.frames)
        datasets: dict[str, torch.utils.data.Dataset] = {"png": PngDataset(tmp_path / "png")}
        for option in options:
            path = tmp_path / f"bench_{option}.h5"
            build_h5(path, args.frames, None if option == "none" else option)
            datasets[option] = H5Dataset(path, split="train", augment=True)
        # Interleaved rounds, best round kept: the machine may be shared, and contention only slows a round.
        rates: dict[str, list[float]] = {name: [] for name in datasets}
        for _ in range(args.rounds):
            for name, dataset in datasets.items():
                rates[name].append(throughput(dataset, args.samples))
        best = {name: max(values) for name, values in rates.items()}
        print(f"frames: {args.frames} x 480x640 (real NYUv2 frame); output rgb+depth+semseg at 224x224 with random "
              f"resized crop + flip; 1 torch thread (= one DataLoader worker); best of {args.rounds} rounds of "
              f"{args.samples} samples")
        png_mb = sum(f.stat().st_size for f in (tmp_path / "png").rglob("*.png")) / 1e6 / args.frames
        print(f"PNG files (MultiMAE layout, PIL decode): {best['png']:7.1f} samples/s, {png_mb:.2f} MB/frame")
        for option in options:
            size_mb = (tmp_path / f"bench_{option}.h5").stat().st_size / 1e6 / args.frames
            print(f"HDF5 compression={option:<5}: {best[option]:7.1f} samples/s "
                  f"({best[option] / best['png']:4.1f}x PNG), {size_mb:.2f} MB/frame")
        variants = build_depth_variants(tmp_path, args.frames)
        depth_sets = {name: DepthOnly(path, scale) for name, (path, scale) in variants.items()}
        depth_rates: dict[str, list[float]] = {name: [] for name in depth_sets}
        for _ in range(args.rounds):
            for name, dataset in depth_sets.items():
                depth_rates[name].append(throughput(dataset, args.samples))
        print("depth storage (depth alone: read crop, to metres, prepare):")
        for name, (path, _) in variants.items():
            mb = path.stat().st_size / 1e6 / args.frames
            print(f"  {name:<22} {max(depth_rates[name]):7.1f} samples/s, {mb:.3f} MB/frame, "
                  f"2.5 M frames (ScanNet-sized): {mb * 2.5e6 / 1e6:.2f} TB")

if __name__ == "__main__":
    main()
