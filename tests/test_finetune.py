"""Fine-tuning: the split into frozen prefix and trained tail, the prefix cache, seeds,
resuming, the stage outputs, and the finetune -> extract -> match -> evaluate chain."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from semcorr.pipeline.backbones import BackboneSpec, build_backbone
from semcorr.pipeline.datasets import synthetic
from semcorr.pipeline.finetune import (
    FinetuneError,
    PrefixSource,
    epoch_batches,
    finetune,
    load_image,
    to_pairs,
    train_step,
    trainable_parameters,
)
from semcorr.pipeline.prefix_cache import PrefixCache, PrefixCacheError, build_prefix_cache
from semcorr.pipeline.tables import write_tables
from tiny import TINY_SPECS

FAMILIES = ["dinov2", "dinov3", "sam", "clip"]
# tiny runs: one or two epochs over the 4 trn pairs of the small synthetic set
FAST = {"depth": 1, "epochs": 2, "lr": 1e-3, "batch_size": 2, "cache_dtype": "float32"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small synthetic set (2 categories x 6 images of 64 px): 4 trn, 4 val, 4 test pairs."""
    root = tmp_path_factory.mktemp("synthetic")
    raw = synthetic.generate(root / "raw", {"categories": 2, "images_per_category": 6, "image_size": 64, "keypoints": 6})
    pairs, images = synthetic.parse(raw)
    return write_tables(root / "prepared", pairs, images)


def tables(prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    pairs = pd.read_parquet(prepared / "pairs.parquet")
    images = pd.read_parquet(prepared / "images.parquet")
    return pairs[pairs.split == "trn"], pairs[pairs.split == "val"], images


def tiny(family: str) -> torch.nn.Module:
    return build_backbone(TINY_SPECS[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_tail_is_the_last_blocks_and_the_head(family):
    backbone = tiny(family)
    x = torch.zeros(1, 3, backbone.spec.input_size, backbone.spec.input_size)
    names = set(trainable_parameters(backbone, 1, backbone.forward_prefix(x, 1)))
    name_of = {id(p): n for n, p in backbone.named_parameters()}
    last = {name_of[id(p)] for p in backbone.blocks()[-1].parameters()}
    earlier = {name_of[id(p)] for block in backbone.blocks()[:-1] for p in block.parameters()}
    head = names - last
    assert last <= names and not earlier & names
    assert head, "the final norm / neck after the blocks trains too"
    assert all(any(k in n for k in ("model.norm.", "model.neck.", "model.ln_post.")) for n in head), head
    assert not any(p.requires_grad for p in backbone.parameters())  # left frozen


def test_depth_out_of_range_and_daisy_refused():
    backbone = tiny("dinov2")
    x = torch.zeros(1, 3, 112, 112)
    with pytest.raises(FinetuneError, match="depth must be in 1..2"):
        trainable_parameters(backbone, 3, backbone.forward_prefix(x, 0))
    with pytest.raises(FinetuneError, match="daisy"):
        trainable_parameters(build_backbone(TINY_SPECS["daisy"]), 1, x)


def _one_step(prepared: Path, family: str, cache_dtype: str | None, tmp_path: Path) -> tuple[float, dict]:
    """(loss, weights) after one SGD step on a flipped and an unflipped pair. SGD, not
    AdamW: Adam's first step is lr * sign(grad), which turns rounding noise in
    near-zero gradients into lr-sized differences."""
    train, _, images = tables(prepared)
    backbone = tiny(family)
    source = PrefixSource(backbone, 1, images, torch.device("cpu"))
    pairs = to_pairs(train)[:2]
    if cache_dtype is not None:
        entries = sorted({(i, f) for p in pairs for i in (p.source_id, p.target_id) for f in (False, True)})
        path = tmp_path / f"{family}-{cache_dtype}.zarr"
        cache = build_prefix_cache(path, backbone, 1, entries, source.image, {}, {"dtype": cache_dtype})
        source = PrefixSource(backbone, 1, images, torch.device("cpu"), cache)
    names = trainable_parameters(backbone, 1, source.tokens([(pairs[0].source_id, False)]))
    params = dict(backbone.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    optimizer = torch.optim.SGD([params[n] for n in names], lr=0.1)
    transforms = {r.image_id: backbone.transform((r.height, r.width)) for r in images.itertuples()}
    widths = dict(zip(images.image_id, images.width))
    conf = {"temperature": 0.03, "kernel_size": 7, "sigma": 1.5}
    loss = train_step(backbone, source, pairs, [True, False], transforms, widths, optimizer, conf)
    return loss, {n: params[n].detach().clone() for n in names}


@pytest.mark.parametrize("family", ["dinov2", "sam"])
def test_step_from_cache_equals_step_from_images(prepared, tmp_path, family):
    loss, from_images = _one_step(prepared, family, None, tmp_path)
    cached_loss, from_cache = _one_step(prepared, family, "float32", tmp_path)
    bf16_loss, from_bf16 = _one_step(prepared, family, "bfloat16", tmp_path)
    assert cached_loss == pytest.approx(loss, rel=1e-5) and bf16_loss == pytest.approx(loss, rel=1e-2)
    untouched = dict(tiny(family).named_parameters())
    for name, value in from_images.items():
        torch.testing.assert_close(from_cache[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_bf16[name], value, rtol=0.0, atol=2e-3)  # bf16 rounding of the inputs only
    assert sum(float((from_images[n] - untouched[n]).abs().sum()) for n in from_images) > 0


def test_cached_flips_are_the_mirrored_images(prepared, tmp_path):
    _, _, images = tables(prepared)
    backbone = tiny("dinov3")
    source = PrefixSource(backbone, 1, images, torch.device("cpu"))
    image_id = images.image_id.iloc[0]
    cache = build_prefix_cache(tmp_path / "c.zarr", backbone, 1, [(image_id, False), (image_id, True)], source.image, {}, {"dtype": "float32"})
    mirrored = load_image(images.path.iloc[0])[:, ::-1].copy()
    with torch.no_grad():
        expected = backbone.forward_prefix(backbone.preprocess(mirrored)[0][None], 1)
    torch.testing.assert_close(cache.tokens([(image_id, True)]), expected)
    assert not torch.allclose(cache.tokens([(image_id, False)]), expected)


def test_prefix_cache_resumes_rebuilds_and_refuses_incomplete(prepared, tmp_path):
    _, _, images = tables(prepared)
    backbone = tiny("clip")
    source = PrefixSource(backbone, 1, images, torch.device("cpu"))
    entries = [(i, False) for i in images.image_id[:5]]
    loads = []

    def dying_loader(image_id):
        if len(loads) == 3:
            raise KeyboardInterrupt
        loads.append(image_id)
        return source.image(image_id)

    path = tmp_path / "prefix.zarr"
    with pytest.raises(KeyboardInterrupt):
        build_prefix_cache(path, backbone, 1, entries, dying_loader, {"w": 1}, {"batch_size": 2})
    with pytest.raises(PrefixCacheError, match="incomplete"):
        PrefixCache(path)
    loads.clear()
    cache = build_prefix_cache(path, backbone, 1, entries, lambda i: loads.append(i) or source.image(i), {"w": 1}, {"batch_size": 2})
    assert loads == [i for i, _ in entries[2:]]  # the first batch of 2 was done before the kill
    with torch.no_grad():
        expected = backbone.forward_prefix(torch.stack([backbone.preprocess(source.image(i))[0] for i, _ in entries]), 1)
    torch.testing.assert_close(cache.tokens(entries), expected.to(torch.bfloat16).float())
    loads.clear()
    build_prefix_cache(path, backbone, 1, entries, lambda i: loads.append(i) or source.image(i), {"w": 1}, {"batch_size": 2})
    assert loads == []  # complete: nothing recomputed
    build_prefix_cache(path, backbone, 1, entries, lambda i: loads.append(i) or source.image(i), {"w": 2}, {"batch_size": 2})
    assert len(loads) == len(entries)  # other weights: rebuilt


def test_epoch_order_depends_on_seed_and_epoch_only():
    conf = {"seed": 3, "batch_size": 3, "flip_augment": True}
    assert epoch_batches(10, conf, 2) == epoch_batches(10, conf, 2)
    assert epoch_batches(10, conf, 1) != epoch_batches(10, conf, 2)
    assert sorted(i for b in epoch_batches(10, conf, 1) for i, _ in b) == list(range(10))
    assert {f for b in epoch_batches(10, {**conf, "flip_augment": False}, 1) for _, f in b} == {False}


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory):
    train, val, images = tables(prepared)
    result = finetune(tiny("dinov2"), train, val, images, tmp_path_factory.mktemp("ref"), FAST)
    return result


def test_same_seed_same_weights_other_seed_other_weights(prepared, tmp_path, reference_run):
    train, val, images = tables(prepared)
    again = finetune(tiny("dinov2"), train, val, images, tmp_path / "again", FAST)
    for k, v in reference_run.state_dict.items():
        assert torch.equal(v, again.state_dict[k]), k
    other = finetune(tiny("dinov2"), train, val, images, tmp_path / "other", {**FAST, "seed": 1})
    assert any(not torch.equal(v, other.state_dict[k]) for k, v in reference_run.state_dict.items())
    base = tiny("dinov2").state_dict()
    changed = {k for k, v in reference_run.state_dict.items() if not torch.equal(v, base[k])}
    assert changed == set(reference_run.trainable)


def test_interrupted_run_resumes_and_finished_run_is_not_redone(prepared, tmp_path, reference_run):
    train, val, images = tables(prepared)
    work = tmp_path / "work"

    def kill_after_first(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny("dinov2"), train, val, images, work, FAST, on_epoch_end=kill_after_first)
    curve = pd.read_csv(work / "curve.csv")
    assert curve.epoch.tolist() == [0, 1]
    epochs_run = []
    resumed = finetune(tiny("dinov2"), train, val, images, work, FAST, on_epoch_end=epochs_run.append)
    assert epochs_run == [2]
    for k, v in reference_run.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
    curve = pd.read_csv(work / "curve.csv")
    assert curve.columns.tolist()[:4] == ["epoch", "step", "loss", "val_pck"]
    assert curve.epoch.tolist() == [0, 1, 2] and curve.step.tolist() == [0, 2, 4]
    (work / "curve.csv").unlink()  # dvc removes outputs before it reruns a stage
    again = finetune(tiny("dinov2"), train, val, images, work, FAST, on_epoch_end=epochs_run.append)
    assert epochs_run == [2] and again.best_epoch == resumed.best_epoch
    assert pd.read_csv(work / "curve.csv").epoch.tolist() == [0, 1, 2]
    # another setting is another run: the old state is not reused
    finetune(tiny("dinov2"), train, val, images, work, {**FAST, "epochs": 1}, on_epoch_end=epochs_run.append)
    assert epochs_run == [2, 1]


def test_best_epoch_is_the_best_val_pck(reference_run):
    trained = [row for row in reference_run.curve if row["epoch"] > 0]
    best = max(trained, key=lambda row: row["val_pck"])
    assert reference_run.best_epoch == best["epoch"] and reference_run.best_val_pck == best["val_pck"]
    assert reference_run.base_val_pck == reference_run.curve[0]["val_pck"]


def test_training_fits_the_training_pairs(prepared, tmp_path):
    """Gradient steps on the trn pairs lower their loss: the loss trains the features."""
    train, _, images = tables(prepared)
    result = finetune(tiny("sam"), train, train, images, tmp_path, {**FAST, "epochs": 6, "flip_augment": False, "batch_size": 4})
    losses = [row["loss"] for row in result.curve[1:]]
    assert losses[-1] < 0.8 * losses[0]
    assert result.best_val_pck >= result.base_val_pck


MATCH = {"argmax": {"upsample": 1, "mutual": False, "max_window": 3},
         "softargmax": {"window": 3, "temperature": 0.1, "zero_outside": False}}
EXTRACT = {"batch_size": 8, "num_workers": 0, "device": "cpu", "flips": False, "shard_images": 16}


def _workspace(prepared: Path, root: Path, family: str) -> tuple[dict, dict]:
    """A data root with the prepared synthetic set and a random-init base backbone;
    (params ``backbone.tiny.model``, params ``finetune``)."""
    (root / "prepared").mkdir(parents=True)
    (root / "prepared" / "synthetic").symlink_to(prepared)
    (root / "weights" / "tiny").mkdir(parents=True)
    (root / "weights" / "tiny" / "weights.json").write_text(json.dumps({"file": None, "sha256": None, "random_init": True}))
    spec = TINY_SPECS[family]
    model = {"family": spec["family"], "variant": spec["variant"], "layer": None, "input_size": spec["input_size"],
             "resize": spec["resize"], "arch": spec["arch"]}
    finetune_params = {"train_dataset": "synthetic", "device": "cpu", **FAST, "epochs": 1}
    del finetune_params["depth"]
    return model, finetune_params


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_extract_match_evaluate_chain(prepared, tmp_path, family):
    """The stages end to end: finetune -> re-extract with the tuned weights -> match -> evaluate."""
    from semcorr.pipeline.store import open_store
    from semcorr.stages import evaluate, extract, match
    from semcorr.stages import finetune as finetune_stage

    model, ft = _workspace(prepared, tmp_path, family)
    out = finetune_stage.main("tiny", 1, model, ft, data_root=tmp_path)
    assert out == tmp_path / "weights" / "tiny_ft1"
    info = json.loads((out / "weights.json").read_text())
    assert info["file"] == "model.pth" and info["random_init"] is True  # tuned from an untrained base
    assert info["base"] == "tiny" and info["depth"] == 1 and info["train_dataset"] == "synthetic"
    assert info["best_epoch"] == 1 and 0.0 <= info["best_val_pck"] <= 1.0
    curve = pd.read_csv(tmp_path / "finetune" / "tiny_ft1" / "state" / "curve.csv")
    assert curve.epoch.tolist() == [0, 1] and curve.val_pck.iloc[-1] == pytest.approx(info["best_val_pck"])
    assert (tmp_path / "finetune" / "tiny_ft1" / "state" / "state.pt").is_file()
    live = tmp_path / "finetune" / "tiny_ft1" / "live"
    assert json.loads((live / "metrics.json").read_text())["val_pck"] == pytest.approx(curve.val_pck.iloc[-1])
    logged = pd.read_csv(live / "plots" / "metrics" / "val_pck.tsv", sep="\t")
    assert logged["step"].tolist() == [0, 1] and logged["val_pck"].tolist() == pytest.approx(curve.val_pck.tolist())
    assert not (tmp_path / ".semcorr" / "partial" / "finetune" / "tiny_ft1").exists()  # work folder cleared

    # the tuned checkpoint loads through build_backbone like an official one, and differs from the base
    tuned = build_backbone(BackboneSpec(**{**TINY_SPECS[family], "random_init": False, "weights": str(out / "model.pth"), "sha256": info["sha256"]}))
    base = build_backbone(TINY_SPECS[family])
    saved = torch.load(out / "model.pth", weights_only=True)
    assert saved.keys() == tuned.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in tuned.state_dict().items())
    assert {k for k, v in base.state_dict().items() if not torch.equal(v, saved[k])} == set(info["trained_parameters"])

    store_path = extract.main("synthetic", "tiny", model, EXTRACT, tuned=1, data_root=tmp_path, progress=False)
    store = open_store(store_path)
    assert store.attrs["random_init"] is True and store.attrs["tuned_depth"] == 1
    image = store.image_ids[0]
    x, tf = tuned.preprocess(load_image(pd.read_parquet(prepared / "images.parquet").set_index("image_id").loc[image, "path"]))
    with torch.no_grad():
        expected = tuned(x[None])[0, :, : tf.grid_h, : tf.grid_w]
    torch.testing.assert_close(store.features(image), expected, rtol=1e-2, atol=1e-2)  # fp16 store

    match.main("synthetic", "tiny_ft1", "argmax", MATCH, split="test", data_root=tmp_path)
    folder = evaluate.main("synthetic", "tiny_ft1", "argmax", [0.1], "test", MATCH, data_root=tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    setting = json.loads((folder / "setting.json").read_text())
    assert setting["variant"] == "tiny_ft1" and setting["train_dataset"] == "synthetic"
    assert metrics["n_pairs"] == 4 and 0.0 <= metrics["pck_img@0.1"] <= 1.0


def test_stage_refuses_unknown_settings_and_missing_weights(prepared, tmp_path):
    from semcorr.stages import finetune as finetune_stage

    model, ft = _workspace(prepared, tmp_path, "dinov2")
    with pytest.raises(FinetuneError, match="unknown finetune settings.*learning_rate"):
        finetune_stage.main("tiny", 1, model, {**ft, "learning_rate": 1.0}, data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="weights.json"):
        finetune_stage.main("tiny", 1, model, ft, data_root=tmp_path / "nowhere")


def test_mode_and_lora_settings_are_checked(prepared, tmp_path):
    train, val, images = tables(prepared)
    with pytest.raises(FinetuneError, match="finetune mode 'adapters': expected one of blocks, lora"):
        finetune(tiny("dinov2"), train, val, images, tmp_path, {**FAST, "mode": "adapters"})
    with pytest.raises(FinetuneError, match=r"unknown lora settings \['dropout'\]"):
        finetune(tiny("dinov2"), train, val, images, tmp_path, {**FAST, "mode": "lora", "lora": {"dropout": 0.1}})
    with pytest.raises(FinetuneError, match="depth must be in 1..2"):
        finetune(tiny("dinov2"), train, val, images, tmp_path, {**FAST, "mode": "lora", "depth": 3})
    assert not (tmp_path / "state").exists()
