"""What each codec of format 2 costs on one real 480x640 frame (samples/nyuv2_sync): decode times and sizes.

The numbers behind the README's codec table: QOI against PNG for raw colour, imagecodecs' JPEG decode against
Pillow's, and Blosc2 (zstd level 5 + shuffle, as format 2 stores depth) against the depth PNG. Median of
``--repeat`` runs, one thread.

Usage: python benchmarks/bench_codecs.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import hdf5plugin
import imagecodecs
import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "nyuv2_sync"


def median_ms(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def pillow_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    repeat = parser.parse_args().repeat
    jpeg = (SAMPLE / "rgb" / "rgb_00000.jpg").read_bytes()
    rgb = pillow_decode(jpeg)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    qoi = imagecodecs.qoi_encode(rgb)
    print(f"colour {rgb.shape[1]}x{rgb.shape[0]}: QOI {len(qoi) / 1e3:.0f} KB, decode "
          f"{median_ms(lambda: imagecodecs.qoi_decode(qoi), repeat):.2f} ms; PNG {len(png.getvalue()) / 1e3:.0f} KB, "
          f"decode {median_ms(lambda: pillow_decode(png.getvalue()), repeat):.2f} ms (Pillow)")
    print(f"JPEG {len(jpeg) / 1e3:.0f} KB: decode {median_ms(lambda: imagecodecs.jpeg8_decode(jpeg), repeat):.2f} ms "
          f"(imagecodecs, libjpeg-turbo), {median_ms(lambda: pillow_decode(jpeg), repeat):.2f} ms (Pillow)")
    depth_png = SAMPLE / "depth" / "sync_depth_00000.png"
    depth = np.asarray(Image.open(depth_png))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "depth.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("depth", data=depth[None], chunks=(1, *depth.shape),
                                  **hdf5plugin.Blosc2(cname="zstd", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE))
        with h5py.File(path, "r", rdcc_nbytes=0) as handle:  # no chunk cache: every read decompresses
            stored = handle["depth"]
            print(f"depth {depth.dtype} mm: PNG {depth_png.stat().st_size / 1e3:.0f} KB, decode "
                  f"{median_ms(lambda: np.asarray(Image.open(depth_png)), repeat):.2f} ms (Pillow); Blosc2 zstd-5 + "
                  f"shuffle {stored.id.get_storage_size() / 1e3:.0f} KB, read {median_ms(lambda: stored[0], repeat):.2f} ms")


if __name__ == "__main__":
    main()
