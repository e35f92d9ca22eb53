"""A folder layout mmtk does not know, added by a plugin file alone and converted with `mmtk convert --plugin`.

The layout `capture-log` is defined in this test file: a robot recorder's folder with `capture.log`, one line
`STAMP COLOUR DEPTH` per frame, colour in c/ and depth (uint16 millimetres) in r/. Its frames are the real NYUv2
frames shipped in samples/nyuv2_sync, renamed so that no built-in layout recognises the folder.
"""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from cli_helpers import run_cli
from data_helpers import SYNC, DecodedFile

CAPTURE_LOG_LAYOUT = '''
"""A recorder's capture.log: one 'STAMP COLOUR DEPTH' line per frame, depth uint16 millimetres."""
from mmtk.data.sources.depth_encoding import FORMAT_UNITS, DepthEncoding, read_depth_kept
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import Frame, RgbdSource
from mmtk.data.sources.image_files import read_colour


@register_layout
class CaptureLog(Layout):
    name = "capture-log"
    description = "capture.log: one 'STAMP COLOUR DEPTH' line per frame (depth uint16 mm)"

    def detect(self, src):
        return "capture.log found" if (src / "capture.log").is_file() else None

    def open(self, src, options):
        rows = [line.split() for line in (src / "capture.log").read_text().splitlines() if line.strip()]
        encoding = options.encoding(DepthEncoding("mm", FORMAT_UNITS["mm"]))

        def frames():
            for stamp, colour, depth in rows:
                arrays = {"rgb": read_colour(src / colour), "depth": read_depth_kept(src / depth, encoding)}
                yield Frame("all", arrays, timestamp=float(stamp), frame_id=colour)

        return RgbdSource(self.name, f"capture log (depth {encoding.text})", len(rows), frames)
'''
STAMPS = {"00000": 100.0, "00050": 101.5, "00100": 103.0}


def _capture_folder(root):
    """The sample frames as a capture-log folder: c/NNNNN.jpg, r/NNNNN.png, capture.log."""
    (root / "c").mkdir(parents=True)
    (root / "r").mkdir()
    lines = []
    for number, stamp in STAMPS.items():
        shutil.copy(SYNC / "rgb" / f"rgb_{number}.jpg", root / "c" / f"{number}.jpg")
        shutil.copy(SYNC / "depth" / f"sync_depth_{number}.png", root / "r" / f"{number}.png")
        lines.append(f"{stamp} c/{number}.jpg r/{number}.png")
    (root / "capture.log").write_text("\n".join(lines) + "\n")
    return root


def test_a_plugin_file_adds_a_layout_that_convert_detects(tmp_path, capsys, monkeypatch):
    src = _capture_folder(tmp_path / "capture")
    plugin = tmp_path / "capture_log_layout.py"
    plugin.write_text(CAPTURE_LOG_LAYOUT)
    out = tmp_path / "capture.h5"
    code, _, err = run_cli(["convert", "--rgbd", src, out, "--no-progress"], capsys, monkeypatch)
    assert code == 2 and "cannot tell the layout of" in err and "capture-log" not in err and not out.exists()

    code, _, err = run_cli(["convert", "--rgbd", src, out, "--plugin", plugin, "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert "layout: capture-log" in err and "layout evidence: capture.log found" in err
    with DecodedFile(out) as f:
        assert f["all/timestamp"][:].tolist() == list(STAMPS.values())
        assert [v.decode() for v in f["all/frame_id"][:]] == [f"c/{n}.jpg" for n in STAMPS]
        for index, number in enumerate(STAMPS):
            rgb = np.array(Image.open(SYNC / "rgb" / f"rgb_{number}.jpg"))
            millimetres = np.array(Image.open(SYNC / "depth" / f"sync_depth_{number}.png"))
            np.testing.assert_array_equal(f["all/rgb"][index], rgb)
            np.testing.assert_allclose(f["all/depth"][index], millimetres / 1000.0, rtol=1e-6)

    code, _, err = run_cli(["convert", "--rgbd", src, tmp_path / "x.h5", "--layout", "nope", "--plugin", plugin],
                           capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--layout 'nope' is unknown; use one of" in err and "paired" in err and "capture-log" in err


def test_a_plugin_layout_may_not_take_a_built_in_name(tmp_path, capsys, monkeypatch):
    plugin = tmp_path / "second_paired.py"
    plugin.write_text(CAPTURE_LOG_LAYOUT.replace('name = "capture-log"', 'name = "paired"'))
    code, _, err = run_cli(["convert", "--rgbd", SYNC, tmp_path / "x.h5", "--plugin", plugin], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "layout 'paired' is already registered (from mmtk); give CaptureLog another name" in err and not (tmp_path / "x.h5").exists()
