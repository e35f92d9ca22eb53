"""The source options `mmtk convert` and `mmtk predict` share, declared once: which source (``--rgbd``, ``--rosbag``,
``--images``, ``--data``) and how to read it (topics, depth units, layout, plugins).

A command takes them with :func:`source_options`; it receives them as one :class:`SourceFlags`, whose
:meth:`SourceFlags.choose` checks them together and says which source they name (:class:`SourceChoice`), opened with
:func:`mmtk.data.sources.open_source.open_source` or converted with :mod:`mmtk.data.convert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from mmtk.cli.app import PLUGIN_HELP, bundled_options, load_plugins
from mmtk.errors import MmtkError

SEVERAL = "; repeat it or give a quoted glob for several."
PATHS, TEXT, NUMBER = Optional[list[str]], Optional[str], Optional[float]


def _option(kind: Any, flag: str, help: str) -> Any:
    """A parameter type that declares the option ``flag`` (typer reads the option from the annotation)."""
    return Annotated[kind, typer.Option(flag, help=help)]


OPTIONS: dict[str, Any] = {  # parameter -> its declaration; defaults: SourceFlags
    "rgbd": _option(PATHS, "--rgbd", "RGB-D dataset folder (layout auto-detected) or NYUv2 .mat" + SEVERAL),
    "rosbag": _option(PATHS, "--rosbag", "ROS1 .bag or ROS2 bag directory (sqlite3/mcap)" + SEVERAL),
    "images": _option(PATHS, "--images", "Folder of RGB images (flat, class folders, or train/val/test above them); "
                                         "RGB only" + SEVERAL),
    "data": _option(PATHS, "--data", "An mmtk dataset (a .h5 file or a shard folder)" + SEVERAL),
    "rgb_topic": _option(TEXT, "--rgb-topic", "Colour Image/CompressedImage topic."),
    "depth_topic": _option(TEXT, "--depth-topic", "Depth Image topic (16UC1 mm, 32FC1 m), paired by stamp."),
    "cloud_topic": _option(TEXT, "--cloud-topic", "Or a PointCloud2 topic (metres; moved into the colour camera's "
                                                  "frame with /tf_static and /tf) as the depth source."),
    "camera_info_topic": _option(TEXT, "--camera-info-topic", "CameraInfo topic (default: beside the colour topic)."),
    "topic": _option(PATHS, "--topic", "--rosbag: a further image topic stored as modality NAME, paired by time like "
                                       "depth: NAME=/topic (repeatable)."),
    "max_dt": _option(float, "--max-dt", "Max stamp difference of paired bag messages, seconds."),
    "depth_scale": _option(NUMBER, "--depth-scale", "Depth units per metre (1000 = mm), not the source's."),
    "depth_format": _option(TEXT, "--depth-format", "--rgbd: depth encoding instead of the layout's or a guess: m, mm, "
                                                    "0.1mm, tum, multimae, sun (bit-rotated mm), kinect-disparity (raw "
                                                    "11-bit Kinect v1)."),
    "depth_range": _option(TEXT, "--depth-range", "--rgbd: plausible range of depth whose units were not given: indoor "
                                                  "(0.2-12 m, default), outdoor (0.5-120 m), lidar (0.3-250 m) or "
                                                  "MIN-MAX metres."),
    "layout": _option(TEXT, "--layout", "--rgbd: read the folder as layout NAME instead of detecting one (README, "
                                        "Source layouts; an unknown NAME lists them; a --plugin file may add one)."),
    "plugin": _option(Optional[list[Path]], "--plugin", PLUGIN_HELP),
}
KINDS = {"rgbd": "FOLDER", "rosbag": "BAG", "images": "FOLDER", "data": "DATASET"}  # source option -> its value
BAG_ONLY = ("rgb_topic", "depth_topic", "cloud_topic", "camera_info_topic", "topic")
RGBD_ONLY = ("depth_format", "depth_range", "layout")


@dataclass
class SourceChoice:
    """The source the options name: its kind (an option name: "rgbd", "rosbag", ...), its inputs (globs expanded)
    and the reading options of :func:`~mmtk.data.sources.open_source.open_source` for that kind."""

    kind: str
    inputs: list[Path]
    options: dict[str, Any]


@dataclass
class SourceFlags:
    """The source options as given on the command line (None: not given)."""

    rgbd: list[str] | None = None
    rosbag: list[str] | None = None
    images: list[str] | None = None
    data: list[str] | None = None
    rgb_topic: str | None = None
    depth_topic: str | None = None
    cloud_topic: str | None = None
    camera_info_topic: str | None = None
    topic: list[str] | None = None
    max_dt: float = 0.02
    depth_scale: float | None = None
    depth_format: str | None = None
    depth_range: str | None = None
    layout: str | None = None
    plugin: list[Path] | None = None

    def choose(self, kinds: tuple[str, ...], other: dict[str, bool] | None = None) -> SourceChoice | None:
        """The one source given among ``kinds`` (None when one of the command's ``other`` sources, e.g. predict's
        ``--rgb IMAGE``, is given instead), after checking that every option given applies to it."""
        other = other or {}
        given = [kind for kind in kinds if getattr(self, kind)] + [name for name, used in other.items() if used]
        if len(given) != 1:
            names = [*other, *(f"--{kind} {KINDS[kind]}" for kind in kinds)]
            raise MmtkError(f"give exactly one source: {', '.join(names[:-1])} or {names[-1]}")
        kind = given[0]
        self._check_applies(kind)
        if kind in other:
            return None
        from mmtk.data.convert import expand_inputs

        return SourceChoice(kind, expand_inputs(getattr(self, kind), f"--{kind}"), self._reading_options(kind))

    def _check_applies(self, kind: str) -> None:
        """Refuse an option of another kind of source (the values themselves are checked by the library)."""
        if self.topic and kind != "rosbag":
            raise MmtkError("--topic NAME=/topic is for --rosbag; folders take --stream NAME=GLOB")
        for only, source in ((BAG_ONLY, "rosbag"), (RGBD_ONLY, "rgbd")):
            extra = [f"--{name.replace('_', '-')}" for name in only if getattr(self, name) and kind != source]
            if extra:
                raise MmtkError(f"{', '.join(extra)} only apply to --{source} {KINDS[source].lower()}s; remove them")

    def _reading_options(self, kind: str) -> dict[str, Any]:
        from mmtk.data.convert import parse_named

        if kind == "rgbd":
            return dict(depth_scale=self.depth_scale, depth_format=self.depth_format, depth_range=self.depth_range,
                        layout=self.layout)
        if kind == "rosbag":
            return dict(rgb_topic=self.rgb_topic, depth_topic=self.depth_topic, cloud_topic=self.cloud_topic,
                        camera_info_topic=self.camera_info_topic, max_dt=self.max_dt, depth_scale=self.depth_scale,
                        extra_topics=parse_named(self.topic, "--topic"))
        return {}


def bag_topics(bag: Path) -> str:
    """The image and point-cloud topics of a bag, one per line (what --rgb-topic, --depth-topic and --cloud-topic
    may name)."""
    from mmtk.data.sources.ros.bag import image_topics

    topics = image_topics(bag)
    return "\n".join(f"  {t.topic:<45} {t.msgtype:<35} {t.count} messages" for t in topics) or "  (none)"


def source_options(*kinds: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the source options of ``kinds`` (and every reading option): it takes them as one
    ``source: SourceFlags`` parameter, with the ``--plugin`` files already loaded."""
    names = [name for name in OPTIONS if name not in KINDS or name in kinds]

    return bundled_options("source", {name: OPTIONS[name] for name in names}, SourceFlags,
                           then=lambda flags: load_plugins(flags.plugin))  # before any registry lookup
