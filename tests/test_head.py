"""The post-processor trained from the cache: identity at start, the memory-saving backward
equal to plain autograd, epochs that count every pair once, left/right permutation of a
mirrored image, learning on a real (DAISY) cache, and the stages run with no backbone or
image import (guarded like tests/test_cache_only.py)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from semcorr.pipeline.coords import CellTransform, flip_points, sample_cells
from semcorr.pipeline.head import (Batch, HeadError, PairData, batch_backward, build_head, epoch_batches,
                                   posed_keypoints, train_head)
from semcorr.pipeline.losses import gaussian_cross_entropy, keypoint_targets
from semcorr.pipeline.matching import match_pairs
from semcorr.pipeline.pck import evaluate_predictions
from semcorr.pipeline.store import open_store, write_store
from semcorr.pipeline.tables import flatten, read_pairs
from test_cache_only import run_guarded

# the demo's setting for small maps (configs/demo.yaml `head`)
SMALL = {"blocks": 1, "bottleneck_ratio": 4, "dropout": 0.0, "epochs": 8, "lr": 0.02, "temperature": 0.1,
         "kernel_size": 3, "sigma": 0.75, "threads": 1}


def toy_store(path, flips=True, c=8, sizes=((6, 5), (5, 6), (6, 6), (4, 6)), seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for n, (h, w) in enumerate(sizes):
        t = CellTransform.from_resize((8 * h, 8 * w), (8 * h, 8 * w), (0.0, 0.0), 8, (h, w))
        maps = rng.standard_normal((2, c, h, w)).astype(np.float32)
        items.append((f"i{n}", maps[0], t, maps[1]) if flips else (f"i{n}", maps[0], t))
    attrs = {"backbone": "toy", "family": "daisy", "variant": "toy", "weights_sha256": None, "random_init": False,
             "layer": None, "patch_size": 8, "input_size": 48, "resize": "pad", "feat_dim": c, "dataset": "toy",
             "flips": flips, "versions": {"test": "0"}}
    write_store(path, attrs, items)
    return open_store(path)


def toy_pairs(store, rng, with_index=True) -> pd.DataFrame:
    rows = []
    for s in store.image_ids:
        for t in store.image_ids:
            if s == t:
                continue
            ts, tt = store.transform(s), store.transform(t)
            n = 4
            rows.append({"pair_id": f"{s}-{t}", "split": "trn", "category": "c", "source_id": s, "target_id": t,
                         "source_kps": flatten(rng.uniform(0, [ts.image_w - 1, ts.image_h - 1], (n, 2))),
                         "target_kps": flatten(rng.uniform(0, [tt.image_w - 1, tt.image_h - 1], (n, 2))),
                         "visible": [True, True, True, False], "pck_norm": 10.0, "norm_kind": "image",
                         "flip_index": [1, 0, -1, 3] if with_index else None})
    return pd.DataFrame(rows)


def test_the_untrained_head_is_the_identity():
    x = torch.randn(2, 16, 5, 7)
    for blocks in (1, 3):
        head = build_head(16, {"blocks": blocks, "dropout": 0.0}).eval()
        assert torch.equal(head(x), x)
    wider = build_head(16, {"out_dim": 32}).eval()
    assert wider(x).shape == (2, 32, 5, 7)
    with pytest.raises(HeadError, match=r"unknown head settings \['depth'\]"):
        build_head(16, {"depth": 2})


def test_memory_saving_backward_equals_plain_autograd(tmp_path):
    """`batch_backward` (outputs without autograd, loss target by target, each image's forward
    recomputed with its dropout mask) gives the gradients of the plain computation."""
    store = toy_store(tmp_path / "s.zarr")
    pairs = toy_pairs(store, np.random.default_rng(1))
    conf = {**SMALL, "dropout": 0.3, "batch_images": 4}
    head = build_head(8, conf).train()
    torch.nn.init.normal_(head.blocks[0].branch[-1].weight)  # away from the identity start
    data = PairData(pairs, store)
    batch = Batch({"i0": True, "i1": False, "i2": False, "i3": True}, np.arange(len(pairs)))
    torch.manual_seed(5)
    loss, count = batch_backward(head, data, batch, conf)
    fast = {name: p.grad.clone() for name, p in head.named_parameters()}
    head.zero_grad()
    torch.manual_seed(5)  # the same dropout masks, drawn in the same order
    maps = data.maps(batch.images)
    masks = {i: head.dropout_mask(m) for i, m in maps.items()}
    outputs = {i: head(m, masks[i])[0] for i, m in maps.items()}
    total, n = 0.0, 0
    for p in batch.pairs:
        s, t = data.source_id[p], data.target_id[p]
        fs, ft = batch.images[s], batch.images[t]
        ts, tt = store.transform(s), store.transform(t)
        src, ok_s = posed_keypoints(data.src[p], data.visible[p], data.index[p], fs, ft, ts.image_w)
        trg, ok_t = posed_keypoints(data.trg[p], data.visible[p], data.index[p], ft, fs, tt.image_w)
        target = keypoint_targets(src, trg, ok_s & ok_t, ts, tt)
        desc = sample_cells(outputs[s][None], target.src_cells[target.valid][None])[0]
        losses = gaussian_cross_entropy(desc, outputs[t], target.trg_peak[target.valid], 0.1, 3, 0.75)
        total, n = total + losses.sum(), n + len(losses)
    (total / n).backward()
    assert count == n and loss == pytest.approx(float((total / n).detach()), rel=1e-5)
    for name, p in head.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_epoch_counts_every_pair_once(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"pair_id": f"{c}{s}-{t}", "category": c, "source_id": f"{c}{s}", "target_id": f"{c}{t}",
             "flip_index": [0] if c == "a" else None}
            for c in "ab" for s in range(9) for t in range(9) if s != t and rng.random() < 0.7]
    pairs = pd.DataFrame(rows)
    conf = {"batch_images": 6, "seed": 3, "flip_augment": True}
    batches = epoch_batches(pairs, conf, 1)
    seen = np.concatenate([b.pairs for b in batches])
    assert sorted(seen) == list(range(len(pairs)))  # every pair once
    for b in batches:
        assert len(b.images) <= 6
        members = pairs.iloc[b.pairs]
        assert set(members["source_id"]) | set(members["target_id"]) == set(b.images)
        assert members["category"].nunique() == 1
        if members["category"].iloc[0] == "b":  # no left/right table: all mirrored or none
            assert len(set(b.images.values())) == 1
    flips_a = [f for b in batches if pairs.iloc[b.pairs[0]]["category"] == "a" for f in b.images.values()]
    assert 0 < sum(flips_a) < len(flips_a)  # with a table: each image on its own
    again = epoch_batches(pairs, conf, 1)
    assert [b.pairs.tolist() for b in again] == [b.pairs.tolist() for b in batches]
    assert [b.pairs.tolist() for b in epoch_batches(pairs, conf, 2)] != [b.pairs.tolist() for b in batches]
    assert all(not any(b.images.values()) for b in epoch_batches(pairs, {**conf, "flip_augment": False}, 1))


def test_an_image_mirrored_alone_takes_its_counterparts_points():
    xy = np.array([[1.0, 2.0], [8.0, 3.0], [5.0, 5.0], [2.0, 2.0]])
    visible = np.array([True, True, True, False])
    index = np.array([1, 0, -1, 3])
    moved, ok = posed_keypoints(xy, visible, index, flip=True, other_flip=False, width=10)
    np.testing.assert_allclose(moved[:2], flip_points(xy[[1, 0]], 10))
    assert ok.tolist() == [True, True, False, False]  # 2's counterpart is not in the pair; 3 not visible
    both, ok = posed_keypoints(xy, visible, index, flip=True, other_flip=True, width=10)
    np.testing.assert_allclose(both, flip_points(xy, 10))  # mirrored together: the same correspondences
    assert ok.tolist() == visible.tolist()
    same, ok = posed_keypoints(xy, visible, index, flip=False, other_flip=True, width=10)
    assert same is xy and ok is visible


def test_flip_augmentation_needs_mirrored_maps(tmp_path):
    store = toy_store(tmp_path / "s.zarr", flips=False)
    pairs = toy_pairs(store, np.random.default_rng(0))
    with pytest.raises(HeadError, match=r"set `extract\.flips: true`"):
        train_head(store, pairs, pairs, {"flip_augment": True})


# -- a real cache: DAISY features of the synthetic set ---------------------------------------------

MODEL = {"family": "daisy", "variant": "daisy", "layer": None, "input_size": 112, "resize": "pad", "arch": {}}


@pytest.fixture(scope="module")
def daisy_cache(tmp_path_factory):
    """A data root made by the real stages: synthetic set, DAISY weights record, store with flips."""
    from semcorr.stages import download, extract, prepare

    data = tmp_path_factory.mktemp("head") / "data"
    download.main("synthetic", {"seed": 0, "categories": 2, "images_per_category": 8, "image_size": 96,
                                "keypoints": 8}, data_root=data)
    prepare.main("synthetic", data_root=data)
    download.main("daisy", {"checkpoint": None, "source": None, "sha256": None, "random_init": False}, data_root=data)
    extract.main("synthetic", "daisy", MODEL, {"batch_size": 8, "num_workers": 0, "device": "cpu", "flips": True,
                                               "shard_images": 16}, data_root=data, progress=False)
    return data


def test_the_head_learns_from_cached_features(daisy_cache):
    store = open_store(daisy_cache / "features" / "daisy" / "synthetic.zarr")
    pairs = read_pairs(daisy_cache / "prepared" / "synthetic")
    result = train_head(store, pairs[pairs["split"] == "trn"], pairs[pairs["split"] == "val"], SMALL)
    assert result.curve[0]["val_pck"] == result.base_val_pck and result.best_val_pck > result.base_val_pck
    assert result.best_epoch > 0 and len(result.curve) == SMALL["epochs"] + 1
    again = train_head(store, pairs[pairs["split"] == "trn"], pairs[pairs["split"] == "val"], SMALL)
    assert all(torch.equal(again.state_dict[k], v) for k, v in result.state_dict.items())  # seeded: the same weights


# params `head` as the stage gets them
CONF = {"train_dataset": "synthetic", "blocks": 1, "out_dim": None, "bottleneck_ratio": 4, "groups": 32,
        "dropout": 0.0, "epochs": 6, "lr": 0.02, "weight_decay": 0.001, "warmup": 0.3, "batch_images": 96,
        "temperature": 0.1, "kernel_size": 3, "sigma": 0.75, "flip_augment": True, "seed": 0,
        "max_train_pairs": None, "max_val_pairs": None, "val_alpha": 0.1, "threads": 1}
GUARDED_HEAD = textwrap.dedent(
    f"""
    from pathlib import Path
    from semcorr.stages import head
    data = Path(data)
    head.main("daisy", {MODEL!r}, True, {CONF!r}, data_root=data)
    """
)


def test_head_trains_from_the_cache_only_and_beats_the_backbone(daisy_cache):
    """Train in a fresh interpreter that refuses backbones, image libraries and image files;
    the head variant's store then matches the test split better than DAISY's own."""
    from semcorr.stages import head

    done = run_guarded(daisy_cache, GUARDED_HEAD)
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stdout + done.stderr
    head.apply("synthetic", "daisy", MODEL, True, data_root=daisy_cache)
    info = json.loads((daisy_cache / "weights" / "daisy_head" / "weights.json").read_text())
    assert info["best_epoch"] > 0 and info["best_val_pck"] > info["base_val_pck"]
    base = open_store(daisy_cache / "features" / "daisy" / "synthetic.zarr")
    tuned = open_store(daisy_cache / "features" / "daisy_head" / "synthetic.zarr")
    assert tuned.attrs["variant"] == "daisy_head" and tuned.attrs["weights_sha256"] == info["sha256"]
    assert tuned.attrs["flips"] and tuned.image_ids == base.image_ids
    pairs = read_pairs(daisy_cache / "prepared" / "synthetic", "test")

    def pck(store):
        overall, _ = evaluate_predictions(pairs, match_pairs(store, pairs, {"max_window": 0}).table, [0.1])
        return overall.image[0.1]

    assert pck(tuned) > pck(base)


def test_head_stage_refuses_a_store_made_otherwise(daisy_cache):
    from semcorr.pipeline.store import StoreMismatch
    from semcorr.stages import head

    for flips, differing in ((True, "input_size: expected 224, found 112"), (False, "flips: expected False")):
        with pytest.raises(StoreMismatch, match=differing):
            head.main("daisy", {**MODEL, "input_size": 224 if flips else 112}, flips, CONF, data_root=daisy_cache)
