"""Tiny randomly initialised pseudo-labelling networks of every supported family (built from their transformers
configs, offline), real frames to label, and the networks' raw outputs straight from transformers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_helpers import KINECT, KINECT_FRAME

CLASSES = ["floor", "wall", "laptop", "box", "carpet"]
COCO_PANOPTIC_CLASSES = 133  # the paper's Mask2Former (COCO panoptic): 80 things + 53 stuff
STAGES = ["stage1", "stage2", "stage3", "stage4"]
BOXES = [(0, 0, 640, 480), (0, 0, 320, 240), (320, 240, 640, 480), (160, 120, 480, 360)]


def real_frames(size: tuple[int, int] = (120, 160)) -> tuple[np.ndarray, np.ndarray]:
    """Four views (whole frame and crops) of the real PCL Kinect frame at ``size`` (H, W): rgb uint8, depth m."""
    rgb = Image.open(KINECT / f"{KINECT_FRAME}_rgb.png").convert("RGB")
    depth = Image.open(KINECT / f"{KINECT_FRAME}_depth.png")
    wh = (size[1], size[0])
    rgbs = [np.array(rgb.crop(b).resize(wh, Image.BILINEAR)) for b in BOXES]
    depths = [np.array(depth.crop(b).resize(wh, Image.NEAREST)).astype(np.float32) / 1000 for b in BOXES]
    return np.stack(rgbs), np.stack(depths)


def write_h5(path: Path, size: tuple[int, int] = (120, 160), train: int = 3, test: int = 1) -> None:
    """An mmtk HDF5 file (mmtk.data.H5Writer) of the real frames: ``train`` + ``test`` frames (at most 4)."""
    from mmtk.data import H5Writer

    rgb, depth = real_frames(size)
    with H5Writer(path, source="pcl_kinect_grabber (crops)") as writer:
        for i in range(train + test):
            writer.add_frame("train" if i < train else "test", {"rgb": rgb[i], "depth": depth[i]})


def labels(names: list[str]) -> dict:
    id2label = dict(enumerate(names))
    return {"num_labels": len(names), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _dinov2() -> object:
    import transformers as t

    return t.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=56,
                          patch_size=14, out_features=STAGES, reshape_hidden_states=False)


def _depth_anything(kind: str) -> tuple:
    import transformers as t

    metric = {"depth_estimation_type": "metric", "max_depth": 10} if kind == "metric" else {}
    return (t.DepthAnythingForDepthEstimation(t.DepthAnythingConfig(
        backbone_config=_dinov2(), reassemble_hidden_size=32, neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16, head_hidden_size=16, **metric)),
        t.DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14))


def _zoedepth() -> tuple:
    import transformers as t

    config = t.ZoeDepthConfig(
        backbone_config=_dinov2(), neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16, bottleneck_features=16,
        num_relative_features=8, bin_embedding_dim=16, num_attractors=[4, 2, 2, 1], num_patch_transformer_layers=1,
        patch_transformer_hidden_size=16, patch_transformer_intermediate_size=32,
        patch_transformer_num_attention_heads=2,
        bin_configurations=[{"n_bins": 8, "min_depth": 0.1, "max_depth": 10.0, "name": "nyu"}])
    return (t.ZoeDepthForDepthEstimation(config),
            t.ZoeDepthImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14))


def _mask2former(names: list[str]) -> tuple:
    import transformers as t

    return (t.Mask2FormerForUniversalSegmentation(t.Mask2FormerConfig(
        backbone_config=t.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64,
                                     out_features=STAGES),
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=8, common_stride=4, **labels(names))),
        t.Mask2FormerImageProcessor(size={"height": 64, "width": 64}))


def _spread(model: torch.nn.Module) -> None:
    """Weight matrices drawn with std 0.2: at the default init (0.02) these tiny networks predict a nearly constant
    map (depth within 1e-6, one class), which would test little; now outputs vary and some are <= 0 (invalid)."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.2)


def tiny_models() -> dict[str, tuple]:
    """(model, image processor) of every supported family; the key names the family (and its depth kind)."""
    torch.manual_seed(0)
    models = _families()
    for model, _ in models.values():
        _spread(model)
    return models


def _families() -> dict[str, tuple]:
    import transformers as t

    return {
        "dpt": (t.DPTForDepthEstimation(t.DPTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
            patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 16, 16],
            fusion_hidden_size=16, head_in_index=-1)),
            t.DPTImageProcessor(size={"height": 64, "width": 64})),
        "depth_anything": _depth_anything("relative"),
        "depth_anything_metric": _depth_anything("metric"),
        "zoedepth": _zoedepth(),
        "segformer": (t.SegformerForSemanticSegmentation(t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
            **labels(CLASSES))),
            t.SegformerImageProcessor(size={"height": 64, "width": 64})),
        "upernet": (t.UperNetForSemanticSegmentation(t.UperNetConfig(
            backbone_config=t.ConvNextConfig(num_stages=4, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                             out_features=STAGES),
            hidden_size=16, auxiliary_in_channels=32, use_auxiliary_head=False, **labels(CLASSES))),
            t.SegformerImageProcessor(size={"height": 64, "width": 64})),
        "mask2former": _mask2former(CLASSES),
        "mask2former_coco": _mask2former([f"coco-panoptic-{k}" for k in range(COCO_PANOPTIC_CLASSES)]),
    }


def save_models(root: Path) -> dict[str, Path]:
    """Every tiny model and its processor saved as `save_pretrained` writes them; folder per key."""
    folders = {}
    for key, (model, processor) in tiny_models().items():
        model.save_pretrained(root / key)
        processor.save_pretrained(root / key)
        folders[key] = root / key
    return folders


@functools.lru_cache(maxsize=None)
def _loaded(folder: Path) -> tuple[str, object, object]:
    """(model_type, model, processor) straight from transformers, once per folder."""
    import transformers

    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    model_class = {"dpt": transformers.DPTForDepthEstimation,
                   "depth_anything": transformers.DepthAnythingForDepthEstimation,
                   "zoedepth": transformers.ZoeDepthForDepthEstimation,
                   "segformer": transformers.SegformerForSemanticSegmentation,
                   "upernet": transformers.UperNetForSemanticSegmentation,
                   "mask2former": transformers.Mask2FormerForUniversalSegmentation}[model_type]
    model = model_class.from_pretrained(folder, local_files_only=True).eval()
    return model_type, model, transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)


def reference(folder: Path, frame: np.ndarray) -> np.ndarray:
    """One frame through the model and its processor, straight from transformers (no batching, no mmtk): the
    raw depth output, or the 0-based class map."""
    model_type, model, processor = _loaded(folder)
    with torch.no_grad():
        out = model(pixel_values=processor(images=frame, return_tensors="pt")["pixel_values"])
    size = [frame.shape[:2]]
    if model_type == "zoedepth":
        return processor.post_process_depth_estimation(out, source_sizes=size, target_sizes=size)[0][
            "predicted_depth"].numpy()
    if model_type in ("dpt", "depth_anything"):
        return processor.post_process_depth_estimation(out, target_sizes=size)[0]["predicted_depth"].numpy()
    return processor.post_process_semantic_segmentation(out, target_sizes=size)[0].numpy()


def expected_depth(raw: np.ndarray, units: str) -> np.ndarray:
    """What depth_pseudo must hold for a network output, written out independently of mmtk: metres as predicted;
    relative kinds divided by the median of the positive outputs; outputs <= 0 are 0 (invalid)."""
    positive = raw > 0
    scale = 1.0 if units == "m" else float(np.median(raw[positive]))
    return np.where(positive, raw / scale, 0.0)
