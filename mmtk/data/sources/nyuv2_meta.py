"""The shipped NYUv2 metadata: splits, class maps and names, the RGB camera's intrinsics."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np


@lru_cache(maxsize=1)
def nyuv2_meta() -> dict[str, Any]:
    """The shipped NYUv2 metadata (splits, class maps, names, intrinsics); see mmtk/resources/nyuv2/README.md."""
    text = resources.files("mmtk").joinpath("resources/nyuv2/nyuv2_meta.json").read_text()
    return json.loads(text)


def nyuv2_intrinsics() -> np.ndarray:
    """NYUv2 RGB camera matrix for 640x480 with a 0-based principal point (toolbox cx, cy minus 1)."""
    k = nyuv2_meta()["intrinsics_rgb"]
    return np.array([[k["fx"], 0.0, k["cx"] - 1.0], [0.0, k["fy"], k["cy"] - 1.0], [0.0, 0.0, 1.0]], np.float32)

