"""The extract stage end to end on the real PF-WILLOW images: every backbone family,
kill -9 and resume, and parallel parts filling one store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import ExtractError, default_conf
from semcorr.pipeline.store import StoreError, open_store
from semcorr.pipeline.tables import read_images
from semcorr.stages import extract as extract_stage
from semcorr.stages import prepare
from tiny import TINY_SPECS, write_official_checkpoint

REPO = Path(__file__).resolve().parents[1]
WILLOW = REPO.parent / "shared" / "data" / "pf-willow"
pytestmark = pytest.mark.skipif(not WILLOW.is_dir(), reason=f"{WILLOW} not present")

FAST = {"batch_size": 3, "num_workers": 0, "device": "cpu", "flips": False, "shard_images": 4}
# Slow enough (~0.15 s per image and its mirror on 2 cores) that a kill lands between shards.
SLOW_BACKBONE = {"family": "dinov2", "variant": "vits14", "random_init": True, "layer": None, "input_size": 224,
                 "resize": "pad", "arch": {"depth": 2, "embed_dim": 192, "num_heads": 3, "img_size": 56}}
SLOW_EXTRACT = {"batch_size": 2, "num_workers": 1, "device": "cpu", "flips": True, "shard_images": 4}
N_IMAGES = 20


@pytest.fixture(scope="module")
def willow_root(tmp_path_factory) -> Path:
    """A data root holding PF-WILLOW prepared by the prepare stage, cut to a subset
    that spans the sub-classes (and their image sizes)."""
    root = tmp_path_factory.mktemp("data")
    prepared = prepare.main("pfwillow", data_root=root, raw_dir=WILLOW)
    images = read_images(prepared)
    images.iloc[:: len(images) // N_IMAGES].head(N_IMAGES).to_parquet(prepared / "images.parquet", index=False)
    return root


def write_weights_json(root: Path, key: str, file: str | None = None, sha256: str | None = None,
                       random_init: bool = False) -> None:
    """What `semcorr download` (or finetune) leaves in ``data/weights/<key>/``."""
    folder = root / "weights" / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.json").write_text(json.dumps({"file": file, "sha256": sha256, "random_init": random_init}))


def done_shards(store: Path) -> list[Path]:
    """The ``done`` chunk files: one per finished shard."""
    return sorted(f for f in (store / "done" / "c").glob("*") if "." not in f.name)


@pytest.mark.parametrize("family", list(TINY_SPECS))
def test_every_family_on_pfwillow(willow_root, family):
    key = f"tiny_{family}"
    conf = TINY_SPECS[family]
    write_weights_json(willow_root, key, random_init=conf.get("random_init", False))
    out = extract_stage.main("pfwillow", key, conf, FAST, data_root=willow_root, progress=False)
    assert out == willow_root / "features" / key / "pfwillow.zarr"
    backbone = build_backbone(extract_stage.backbone_spec(key, conf, willow_root / "weights" / key)[0])
    store = open_store(out, expect={"backbone": key, "family": conf["family"], "random_init": family != "daisy",
                                    "input_size": conf["input_size"], "resize": conf["resize"], "dataset": "pfwillow",
                                    "patch_size": backbone.patch_size, "feat_dim": backbone.feat_dim})
    assert set(store.attrs) >= {"variant", "weights_sha256", "layer", "flips", "dtype", "versions", "model", "arch"}
    images = read_images(willow_root / "prepared" / "pfwillow")
    assert store.image_ids == images["image_id"].tolist()
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) < 4 * store.n_shards + 10  # a few files per shard, not one per image
    for row in images.itertuples():
        grid = backbone.grid_hw((row.height, row.width))
        feats = store.features(row.image_id)
        assert feats.shape == (backbone.feat_dim, *grid) and feats.abs().sum(dim=0).min() > 0
        assert (store.transform(row.image_id).grid_h, store.transform(row.image_id).grid_w) == grid


def test_official_checkpoint_is_recorded(willow_root, tmp_path):
    key = "ckpt_dinov2"
    sha = write_official_checkpoint("dinov2", willow_root / "weights" / key / "model.pth")
    write_weights_json(willow_root, key, "model.pth", sha)
    conf = {**TINY_SPECS["dinov2"], "random_init": False}
    out = extract_stage.main("pfwillow", key, conf, FAST, data_root=willow_root, progress=False)
    store = open_store(out, expect={"weights_sha256": sha, "random_init": False})
    # the store is a cache: a second run computes nothing
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("c/*")}
    extract_stage.main("pfwillow", key, conf, FAST, data_root=willow_root, progress=False)
    assert {f: f.stat().st_mtime_ns for f in out.rglob("c/*")} == mtimes
    assert len(store) == N_IMAGES


def test_bad_image_names_the_file(willow_root, tmp_path):
    images = read_images(willow_root / "prepared" / "pfwillow").head(3).copy()
    images.loc[1, "width"] += 7  # the table lies about the size
    root = tmp_path / "data"
    (root / "prepared" / "bad").mkdir(parents=True)
    images.to_parquet(root / "prepared" / "bad" / "images.parquet", index=False)
    write_weights_json(root, "tiny", random_init=True)
    with pytest.raises(ExtractError, match=re.escape(images.loc[1, "path"]) + ".*images table says"):
        extract_stage.main("bad", "tiny", TINY_SPECS["dinov2"], {**FAST, "num_workers": 0}, data_root=root,
                           progress=False)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(root / "features" / "tiny" / "bad.zarr")


# -- real processes: kill -9 / resume and parallel parts --------------------------------------
def stage_process(root: Path, *args: str) -> subprocess.Popen:
    script = "import typer; from semcorr.stages.extract import command; typer.run(command)"
    cmd = [sys.executable, "-c", script, "--dataset", "pfwillow", "--backbone", "slow", "--params", "params.yaml", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=root.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return err


def make_project(tmp_path: Path, willow_root: Path) -> Path:
    """A project folder: params.yaml + data/{prepared,weights} for the slow backbone."""
    root = tmp_path / "data"
    (root / "prepared").mkdir(parents=True)
    os.symlink(willow_root / "prepared" / "pfwillow", root / "prepared" / "pfwillow")
    write_weights_json(root, "slow", random_init=True)
    params = {"backbone": {"slow": SLOW_BACKBONE}, "extract": SLOW_EXTRACT}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def reference(willow_root, tmp_path_factory) -> Path:
    """The store of one uninterrupted run (in this process: same code, one start-up less)."""
    root = make_project(tmp_path_factory.mktemp("reference"), willow_root)
    return extract_stage.main("pfwillow", "slow", SLOW_BACKBONE, SLOW_EXTRACT, data_root=root, progress=False)


def assert_same_store(path: Path, reference: Path) -> None:
    store, ref = open_store(path), open_store(reference)
    assert store.image_ids == ref.image_ids
    for name in ("feats", "feats_flip", "transforms", "done"):
        a, b = store._group[name][:], ref._group[name][:]
        assert a.tobytes() == b.tobytes(), name  # bitwise


def test_kill_and_resume(willow_root, reference, tmp_path):
    root = make_project(tmp_path, willow_root)
    out = root / "features" / "slow" / "pfwillow.zarr"
    n_shards = -(-N_IMAGES // SLOW_EXTRACT["shard_images"])
    process = stage_process(root)
    deadline = time.monotonic() + 60
    while len(done_shards(out)) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "extract made no progress"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = done_shards(out)
    assert 2 <= len(finished) < n_shards, "the run finished before the kill; make the slow backbone slower"
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    shard_files = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for s in finished
                   for f in out.glob(f"feats*/c/{s.name}/0/0/0")}
    assert len(shard_files) == 2 * len(finished)

    log = finish(stage_process(root))
    skipped = len(finished) * SLOW_EXTRACT["shard_images"]
    assert f"{N_IMAGES - skipped} images extracted, {skipped} already there" in " ".join(log.split())
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shard_files} == shard_files  # not rewritten
    assert not list(out.rglob("*.partial"))
    assert_same_store(out, reference)


def test_parallel_parts_fill_one_store(willow_root, reference, tmp_path):
    root = make_project(tmp_path, willow_root)
    parts = [stage_process(root, "--shard", f"{i}/2") for i in range(2)]
    logs = [finish(p) for p in parts]
    assert any("complete" in log for log in logs)
    assert_same_store(root / "features" / "slow" / "pfwillow.zarr", reference)


def test_default_conf_matches_params_layout():
    assert set(default_conf) == {"batch_size", "num_workers", "device", "flips", "shard_images"}
