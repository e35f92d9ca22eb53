"""Mixtures of datasets with different sensor sets (the data side): an RGB-D file and an RGB-only file as one
training set, sampling weights, the presence mask a batch carries, and training through the CLI."""

from __future__ import annotations

import itertools
import math
import json
import shutil

import pytest
import torch

from data_helpers import SAMPLES, SYNC
from engine_helpers import RECIPES, TINY, TINY_SEMSEG, one_thread, run_cli, sample_h5  # noqa: F401
from mmtk.train.batches import RunSampler, WeightedEpochs, make_batches
from mmtk.config import load_recipe
from mmtk.errors import MmtkError
from mmtk.runtime import DistInfo
from mmtk.train.run import _prepare
from mmtk.train.settings import train_settings

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def rgb_h5(tmp_path_factory):
    """3 real NYUv2 colour images alone (no depth, no labels), as `mmtk convert --images` writes them."""
    from mmtk.data.convert import convert_images

    out = tmp_path_factory.mktemp("rgb") / "photos.h5"
    convert_images(SYNC / "rgb", out, (120, 160), progress=False)
    return out


def _recipe(paths, *sets, name="tiny.yaml"):
    return load_recipe(RECIPES / name, [*TINY, *sets], data_path=[str(p) for p in paths])


def test_a_batch_mixes_samples_with_and_without_depth_and_says_which_have_it(sample_h5, rgb_h5):
    info, mixture = _prepare(_recipe([sample_h5, rgb_h5]))
    assert mixture.sizes == [1, 3] and len(mixture) == 4 and info.frames == 4
    assert info.modalities[:3] == ("rgb", "depth", "semseg") and info.num_classes == 40
    batch = torch.utils.data.default_collate([mixture[i] for i in range(4)])
    assert batch["depth_present"].tolist() == batch["semseg_present"].tolist() == [True, False, False, False]
    assert "rgb_present" not in batch  # every file has rgb: nothing to say
    assert batch["depth"].shape == (4, 1, 64, 64) and batch["semseg"].shape == (4, 16, 16)
    assert batch["depth"][1:].eq(0).all() and not batch["depth_valid"][1:].any()  # placeholders
    assert batch["depth_valid"][0].any() and batch["rgb"][1:].abs().sum() > 0  # real frames


def test_weights_set_each_epochs_draws_exactly_and_ranks_split_them(sample_h5, rgb_h5):
    info, mixture = _prepare(_recipe([sample_h5, rgb_h5], "data.weights=[3,1]", "data.repeat=8"))
    epochs = WeightedEpochs(mixture.sizes, (3.0, 1.0), len(mixture) * 8, num_replicas=1, rank=0, seed=0)
    for epoch in range(3):
        epochs.set_epoch(epoch)
        draws = list(epochs)
        frames = [draw % 4 for draw in draws]
        assert len(draws) == 32 and frames.count(0) == 24  # 3/4 of 32 draws: the RGB-D file's one frame
        photos = sorted(frames.count(frame) for frame in (1, 2, 3))
        assert photos == [2, 3, 3]  # 8 draws of 3 frames: whole passes without replacement, then part of one
        assert len(set(draws)) == 32  # every pass over a frame has its own augmentation seed
    ranks = [WeightedEpochs(mixture.sizes, (3.0, 1.0), 32, num_replicas=2, rank=r, seed=0) for r in range(2)]
    for rank in ranks:
        rank.set_epoch(2)
    assert [*ranks[0]] == draws[0::2] and [*ranks[1]] == draws[1::2]  # the same epoch, dealt out
    # through the run's data feed: a quarter of the samples come without depth, every epoch
    recipe = _recipe([sample_h5, rgb_h5], "data.weights=[3,1]", "data.repeat=8", "optim.batch_size=8")
    feed = make_batches(train_settings(recipe).feed, mixture, ONE)
    batches = list(itertools.islice(feed.from_step(0), 2 * feed.steps_per_epoch))
    present = torch.cat([batch["depth_present"] for batch in batches])
    assert feed.steps_per_epoch == 4 and present.sum().item() == 48 and len(present) == 64


def test_a_weighted_feed_resumed_at_any_step_continues_the_same_keys():
    epochs = WeightedEpochs([1, 3], (3.0, 1.0), 32, num_replicas=1, rank=0, seed=5)
    sampler = RunSampler(range(4), 1, 0, 5, samples_per_step=8, epoch_order=epochs)
    keys = list(itertools.islice(iter(sampler), 64))  # epochs 0 and 1
    assert {epoch for epoch, _ in keys} == {0, 1}
    for step in range(1, 8):
        sampler.start_step = step
        assert list(itertools.islice(iter(sampler), 64 - 8 * step)) == keys[8 * step:]


def test_without_weights_each_epoch_visits_every_frame_of_every_file_once(sample_h5, rgb_h5):
    _, mixture = _prepare(_recipe([sample_h5, rgb_h5], "data.repeat=2"))
    feed = make_batches(train_settings(_recipe([sample_h5, rgb_h5], "data.repeat=2", "optim.batch_size=4")).feed,
                        mixture, ONE)
    batches = list(itertools.islice(feed.from_step(0), feed.steps_per_epoch))
    present = torch.cat([batch["depth_present"] for batch in batches])
    assert len(present) == 8 and present.sum().item() == 2  # 1 of 4 frames has depth, twice (data.repeat 2)


def test_mixture_mistakes_are_one_line(sample_h5, rgb_h5, tmp_path):
    with pytest.raises(MmtkError, match=r"data.weights \[1.0\]: give one finite weight >= 0 per data.path entry \(2\)"):
        _recipe([sample_h5, rgb_h5], "data.weights=[1]")
    with pytest.raises(MmtkError, match="not found"):
        _recipe([sample_h5, tmp_path / "missing.h5"])
    with pytest.raises(MmtkError, match=r"photos.h5 has none of the model's inputs depth"):
        _prepare(_recipe([sample_h5, rgb_h5], "model.inputs=[depth]", "model.outputs=[depth]"))
    with pytest.raises(MmtkError, match=r"needs 'depth' but .*photos.h5 \+ .*photos.h5 has only rgb"):
        _prepare(_recipe([rgb_h5, rgb_h5], "model.inputs=[rgb,depth]", "model.outputs=[rgb,depth]"))
    from mmtk.data import convert_rgbd

    convert_rgbd(SAMPLES / "nyuv2_multimae", tmp_path / "c13.h5", classes=13, size=(120, 160), progress=False)
    with pytest.raises(MmtkError, match=r"c13.h5 is labelled with 13 classes, .*nyuv2_sample.h5 with 40 \(names"):
        _prepare(_recipe([sample_h5, tmp_path / "c13.h5"]))


def test_pretraining_and_finetuning_on_an_rgbd_file_and_an_rgb_only_file_through_the_cli(sample_h5, rgb_h5, tmp_path):
    sets = [f"--set={s}" for s in TINY + ["optim.epochs=2", "optim.warmup_epochs=1", "data.weights=[1,1]",
                                         "data.repeat=2"]]
    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--data", rgb_h5, "--out", tmp_path / "pre", *sets)
    assert code == 0, output
    records = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["depth"] > 0 and r["semseg"] > 0 for r in records)  # losses from file 1
    checkpoint = torch.load(tmp_path / "pre" / "last.pt", weights_only=True)
    assert checkpoint["data"]["paths"] == [str(sample_h5), str(rgb_h5)]
    assert checkpoint["data"]["path"] == str(sample_h5)  # what eval falls back to
    # finetuning semseg: the RGB-only file has no labels, so its samples add no loss
    sets = [f"--set={s}" for s in TINY_SEMSEG + ["optim.epochs=2", "optim.warmup_epochs=1", "optim.batch_size=4",
                                                 "model.inputs=[rgb,depth]"]]
    code, output = run_cli("finetune", "tiny_finetune_semseg", "--init", tmp_path / "pre", "--data", sample_h5,
                           "--data", rgb_h5, "--out", tmp_path / "ft", *sets)
    assert code == 0, output
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["loss"]) for r in records)


def test_files_with_the_same_modalities_carry_no_presence_flags(sample_h5, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(sample_h5, copy)
    info, mixture = _prepare(_recipe([sample_h5, copy]))
    assert "depth_present" not in mixture[0]  # the same modalities: nothing to say


def test_finetuning_loss_counts_only_samples_that_have_the_target(sample_h5, rgb_h5):
    import mmtk
    from mmtk.train.run import finetune_loss_fn, model_args

    recipe = _recipe([sample_h5, rgb_h5], "model.inputs=[rgb,depth]", "model.overrides.convnext_dim=64",
                     "model.overrides.convnext_depth=1", name="tiny_finetune_semseg.yaml")
    info, mixture = _prepare(recipe)
    torch.manual_seed(0)
    model = mmtk.create_model(recipe.model.name, verbose=False, **model_args(recipe, info)).eval()
    loss_fn = finetune_loss_fn(recipe)
    mixed = torch.utils.data.default_collate([mixture[0], mixture[1], mixture[2]])  # labelled, photo, photo
    alone = {k: v[:1] for k, v in mixed.items() if not k.endswith("_present")}  # the labelled frame on its own
    with torch.no_grad():
        loss, _ = loss_fn(model, mixed)
        expected, _ = loss_fn(model, alone)
        photos, _ = loss_fn(model, {k: v[1:] for k, v in mixed.items()})
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert expected > 0 and photos == 0  # a batch without labels adds nothing


def test_a_weighted_mixture_stopped_mid_epoch_and_resumed_repeats_the_uninterrupted_run(sample_h5, rgb_h5, tmp_path,
                                                                                       one_thread):
    from mmtk.train.engine import read_metrics

    # 1 + 3 frames x data.repeat 2 = 8 draws per epoch: 2 steps of 4; the step-3 checkpoint lies mid-epoch
    sets = [f"--set={s}" for s in TINY + ["optim.batch_size=4", "data.repeat=2", "optim.epochs=3", "train.ckpt_every=3",
                                          "optim.warmup_epochs=1", "data.weights=[1,3]", "train.device=cpu"]]
    data = ["--data", sample_h5, "--data", rgb_h5]
    assert run_cli("pretrain", "tiny", *data, "--out", tmp_path / "full", *sets)[0] == 0
    assert run_cli("pretrain", "tiny", *data, "--out", tmp_path / "cut", *sets, "--set=train.max_steps=3")[0] == 0
    assert run_cli("pretrain", "tiny", *data, "--out", tmp_path / "cut", *sets, "--resume")[0] == 0
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in full] == [r["step"] for r in cut] == list(range(1, 7))
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in cut] == \
        [{k: v for k, v in r.items() if k != "images_per_s"} for r in full]  # bit-identical losses and lr


def test_each_dataset_may_name_its_own_split_and_sources(rgb_h5, tmp_path):
    """A bag's shards hold split 'all', an image folder's 'train': data.train_split (and data.sources) take one value
    per data.path entry; a list of the wrong length is one line."""
    from mmtk.data.convert import convert_to_shards

    folder = tmp_path / "sync_shards"  # BTS sync frames in one split 'all', one frame a shard
    convert_to_shards("rgbd", [SYNC], folder, {"size": (120, 160)}, shard_frames=1, progress=False)
    sets = ["model.inputs=[rgb,depth]", "model.outputs=[rgb,depth]"]
    with pytest.raises(MmtkError, match=r"has no split 'train'.*data.train_split=\[all, train\]"):
        _prepare(_recipe([folder, rgb_h5], *sets))
    info, mixture = _prepare(_recipe([folder, rgb_h5], *sets, "data.train_split=[all, train]",
                                     "data.sources=[{}, {}]"))
    assert mixture.sizes == [3, 3] and info.modalities[:2] == ("rgb", "depth")
    batch = torch.utils.data.default_collate([mixture[i] for i in range(6)])
    assert batch["depth_present"].tolist() == [True] * 3 + [False] * 3
    with pytest.raises(MmtkError, match=r"data.train_split lists 3 values for 2 data.path entries"):
        _recipe([folder, rgb_h5], *sets, "data.train_split=[all, train, test]")


def test_a_whole_frame_augmentation_reads_a_shard_folder(tmp_path):
    """The paper's whole-frame augmentations go through a shard folder's shards like through a file."""
    from mmtk.data import H5Dataset
    from mmtk.data.convert import convert_to_shards

    folder = tmp_path / "sync_shards"
    convert_to_shards("rgbd", [SYNC], folder, {"size": (120, 160)}, shard_frames=2, progress=False)
    dataset = H5Dataset(folder, split="all", modalities=("rgb", "depth"), image_size=(64, 64), augment=True,
                        augmentation="multimae-depth")
    sample = dataset[2]  # a frame of the second shard
    assert sample["rgb"].shape == (3, 64, 64) and sample["depth"].shape == (1, 64, 64)
    assert dataset.shard(1).frame_augmentation is not None  # the shard reads whole frames through the augmentation


def test_eval_of_a_mixture_run_gives_one_table_per_dataset(sample_h5, rgb_h5, tmp_path):
    """A run finetuned on an RGB-D file and an RGB-only file: `mmtk eval` takes the datasets it recorded (or --data
    repeated), one table each; a dataset without the target is one line, and the others are still evaluated."""
    args = [f"--set={s}" for s in TINY_SEMSEG + ["optim.batch_size=2", "train.max_steps=2", "model.inputs=[rgb]",
                                                 "data.train_split=[train, train]"]]
    code, text = run_cli("finetune", RECIPES / "tiny_finetune_semseg.yaml", "--data", sample_h5, "--data", rgb_h5,
                         "--out", tmp_path / "ft", *args)
    assert code == 0, text
    code, text = run_cli("eval", "--checkpoint", tmp_path / "ft", "--split", "train", "--json", tmp_path / "e.json")
    assert code == 0, text
    assert f"data: {sample_h5}, {rgb_h5} (the datasets the run trained on)" in text, text
    assert "│ rgb " in text and f"1 frame of {sample_h5} evaluated (split 'train'" in text
    assert f"{rgb_h5}: not evaluated:" in text and "semseg" in text
    results = json.loads((tmp_path / "e.json").read_text())
    assert isinstance(results, list) and len(results) == 1 and results[0]["results"][0]["inputs"] == ["rgb"] and results[0]["data"] == str(sample_h5)
