"""Extraction (`pipeline.extract.extract_features`) end to end on the real PF-WILLOW images:
every backbone family, kill -9 and resume, parallel parts filling one store, repair of a
store with a missing shard, the write lock between configurations, and an old store kept
whole until its replacement is complete. Concurrency and kills use real processes. The
PF-WILLOW subset (``willow_root``, ``images``) and the uninterrupted slow run (``reference``)
are session fixtures in conftest.py, shared with the torchrun and S3 tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import ExtractError, ExtractResult, default_conf, extract_features, store_attrs
from semcorr.pipeline.store import StoreError, open_store, store_path
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
N_SHARDS = -(-N_IMAGES // SLOW_EXTRACT["shard_images"])


def extract(root: Path, key: str, spec: dict, conf: dict, images: pd.DataFrame, sha256: str | None = None,
            **kwargs) -> ExtractResult:
    """`extract_features` as the extract stage calls it, into ``root/features/<key>/pfwillow.zarr``
    (work folder: the default, ``root/.semcorr``)."""
    net = build_backbone(spec)
    attrs = store_attrs(net, key, key, "pfwillow", sha256, conf["flips"])
    return extract_features(net, images, store_path(root / "features", key, "pfwillow"), attrs, conf,
                            progress=False, **kwargs)


def files_of(path: Path) -> dict[Path, tuple[int, int]]:
    """Every shard file of a store -> (inode, mtime)."""
    return {f.relative_to(path): (f.stat().st_ino, f.stat().st_mtime_ns) for f in path.glob("feats*/c/*/0/0/0")}


@pytest.mark.parametrize("family", list(TINY_SPECS))
def test_every_family_on_pfwillow(willow_root, images, family):
    key = f"tiny_{family}"
    spec = TINY_SPECS[family]
    result = extract(willow_root, key, spec, FAST, images)
    out = willow_root / "features" / key / "pfwillow.zarr"
    assert result.path == out and result.complete and result.extracted == N_IMAGES
    backbone = build_backbone(spec)
    store = open_store(out, expect={"backbone": key, "family": spec["family"], "random_init": family != "daisy",
                                    "input_size": spec["input_size"], "resize": spec["resize"], "dataset": "pfwillow",
                                    "patch_size": backbone.patch_size, "feat_dim": backbone.feat_dim})
    assert set(store.attrs) >= {"variant", "weights_sha256", "layer", "flips", "dtype", "versions", "model", "arch"}
    assert store.image_ids == images["image_id"].tolist()
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) < 4 * store.n_shards + 10  # a few files per shard, not one per image
    for row in images.itertuples():
        grid = backbone.grid_hw((row.height, row.width))
        feats = store.features(row.image_id)
        assert feats.shape == (backbone.feat_dim, *grid) and feats.abs().sum(dim=0).min() > 0
        assert (store.transform(row.image_id).grid_h, store.transform(row.image_id).grid_w) == grid
    assert not (willow_root / ".semcorr" / "partial" / key / "pfwillow.zarr").exists()  # promoted, not copied


def test_a_second_run_computes_nothing(willow_root, images):
    key = "ckpt_dinov2"
    checkpoint = willow_root / "weights" / key / "model.pth"
    sha = write_official_checkpoint("dinov2", checkpoint)
    spec = {**TINY_SPECS["dinov2"], "random_init": False, "weights": str(checkpoint), "sha256": sha}
    out = extract(willow_root, key, spec, FAST, images, sha256=sha).path
    store = open_store(out, expect={"weights_sha256": sha, "random_init": False})
    before = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.rglob("*") if f.is_file()}
    again = extract(willow_root, key, spec, FAST, images, sha256=sha)
    assert (again.extracted, again.skipped, again.complete) == (0, N_IMAGES, True)
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.rglob("*") if f.is_file()} == before
    assert len(store) == N_IMAGES


def test_bad_image_names_the_file(images, tmp_path):
    liar = images.head(3).copy()
    liar.loc[1, "width"] += 7  # the table lies about the size
    with pytest.raises(ExtractError, match=re.escape(liar.loc[1, "path"]) + ".*images table says"):
        extract(tmp_path, "tiny", TINY_SPECS["dinov2"], FAST, liar)
    out = tmp_path / "features" / "tiny" / "pfwillow.zarr"
    assert not out.exists()  # nothing a later stage could read
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(out)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_work_folder_on_another_filesystem_is_refused(images, tmp_path):
    """The finished store is renamed into place: a work folder elsewhere is a clear error up front."""
    work = Path("/dev/shm") / tmp_path.name
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the filesystem of the test folder")
    try:
        with pytest.raises(ExtractError, match="are on different filesystems"):
            extract(tmp_path, "tiny", TINY_SPECS["dinov2"], FAST, images, work_root=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not (tmp_path / "features").exists()


def test_a_missing_shard_is_re_extracted(images, tmp_path):
    """A deleted shard file of a complete store: opening the store names it, and extract
    re-extracts that shard alone (its done flags are set: they must not be trusted)."""
    out = extract(tmp_path, "tiny", TINY_SPECS["dinov2"], FAST, images).path
    reference = open_store(out)
    expected = {n: reference.features(n).numpy() for n in reference.image_ids}
    kept = files_of(out)
    missing = out / "feats" / "c" / "2" / "0" / "0" / "0"
    missing.unlink()
    with pytest.raises(StoreError, match="shard file is missing") as err:
        open_store(out)
    assert str(missing) in str(err.value)
    result = extract(tmp_path, "tiny", TINY_SPECS["dinov2"], FAST, images)
    assert (result.extracted, result.skipped, result.complete) == (4, N_IMAGES - 4, True)
    store = open_store(out)
    for image_id, feats in expected.items():
        np.testing.assert_array_equal(store.features(image_id).numpy(), feats)
    now = files_of(out)
    assert {f: v for f, v in now.items() if f.parts[2] != "2"} == {f: v for f, v in kept.items() if f.parts[2] != "2"}


def test_a_failed_run_leaves_the_old_store(images, tmp_path):
    """A complete store stays whole and readable while a run with another configuration
    fails, whether on a bad parameter or on a bad image after some shards were written."""
    out = extract(tmp_path, "tiny", TINY_SPECS["dinov2"], FAST, images).path
    before = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.rglob("*") if f.is_file()}
    with pytest.raises(ValueError, match="input_size -112"):
        extract(tmp_path, "tiny", {**TINY_SPECS["dinov2"], "input_size": -112}, FAST, images)
    broken = images.copy()
    broken.loc[13, "path"] = str(tmp_path / "broken.jpg")  # fails in shard 3, after shards 0-2 were written
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ExtractError, match="broken.jpg: cannot read image"):
        extract(tmp_path, "tiny", {**TINY_SPECS["dinov2"], "input_size": 84}, FAST, broken)
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.rglob("*") if f.is_file()} == before
    store = open_store(out, expect={"input_size": TINY_SPECS["dinov2"]["input_size"]})
    assert store.features(store.image_ids[-1]).abs().sum() > 0
    # the fixed run replaces the old store in one rename
    result = extract(tmp_path, "tiny", {**TINY_SPECS["dinov2"], "input_size": 84}, FAST, images)
    assert result.complete and result.skipped == 12  # the 3 shards of the failed run verified and were kept
    open_store(out, expect={"input_size": 84})


# -- real processes: kill -9 / resume, parallel parts, the write lock ------------------------------
DRIVER = """
import json, sys
from pathlib import Path
import pandas as pd
from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import extract_features, store_attrs
spec, conf, images, out, part = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
net = build_backbone(spec)
attrs = store_attrs(net, "slow", "slow", "pfwillow", None, conf["flips"])
result = extract_features(net, pd.read_parquet(images), Path(out), attrs, conf,
                          part=tuple(int(v) for v in part.split("/")), progress=False)
print(json.dumps({"extracted": result.extracted, "skipped": result.skipped, "complete": result.complete}))
"""


def extract_process(willow_root: Path, out: Path, spec: dict = SLOW_BACKBONE, part: str = "0/1") -> subprocess.Popen:
    images = willow_root / "prepared" / "pfwillow" / "images.parquet"
    cmd = [sys.executable, "-c", DRIVER, json.dumps(spec), json.dumps(SLOW_EXTRACT), str(images), str(out), part]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def slow_out(tmp_path: Path) -> Path:
    return tmp_path / "data" / "features" / "slow" / "pfwillow.zarr"


def partial_of(out: Path) -> Path:
    return out.parent.parent.parent / ".semcorr" / "partial" / "slow" / "pfwillow.zarr"


def wait_for_shards(process: subprocess.Popen, partial: Path, count: int) -> None:
    deadline = time.monotonic() + 90
    while len(list((partial / "done" / "c").glob("[0-9]*"))) < count and process.poll() is None:
        assert time.monotonic() < deadline, "extract made no progress"
        time.sleep(0.02)


def assert_same_store(path: Path, reference: Path) -> None:
    store, ref = open_store(path), open_store(reference)
    assert store.image_ids == ref.image_ids
    for name in (*ref.array_names, "transforms", "done"):
        a, b = store._group[name][:], ref._group[name][:]
        assert a.tobytes() == b.tobytes(), name  # bitwise


def flip_byte(file: Path, position: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0xFF
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, file)


def test_kill_and_resume(willow_root, reference, tmp_path):
    out = slow_out(tmp_path)
    partial = partial_of(out)
    process = extract_process(willow_root, out)
    wait_for_shards(process, partial, 3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(out)  # nothing at out until the store is complete
    store = open_store(partial, complete=False)
    intact = [s for s in range(store.n_shards) if not store.check_shard(s)]
    assert 3 <= len(intact) < N_SHARDS, "the run finished before the kill; make the slow backbone slower"
    # a shard that is marked done but damaged on disk is not trusted: it is extracted again
    damaged = intact.pop(0)
    assert store.done()[store.shard_range(damaged)].all()
    flip_byte(store.shard_file("feats_flip", damaged), 100)
    kept = {f: v for f, v in files_of(partial).items() if int(f.parts[2]) in intact}
    assert len(kept) == 2 * len(intact)

    result = finish(extract_process(willow_root, out))
    skipped = len(intact) * SLOW_EXTRACT["shard_images"]
    assert (result["extracted"], result["skipped"], result["complete"]) == (N_IMAGES - skipped, skipped, True)
    assert {f: v for f, v in files_of(out).items() if f in kept} == kept  # not rewritten, moved into place
    assert not list(out.rglob("*.partial")) and not partial.exists()
    assert_same_store(out, reference)


def test_parallel_parts_fill_one_store(willow_root, reference, tmp_path):
    out = slow_out(tmp_path)
    parts = [extract_process(willow_root, out, part=f"{i}/2") for i in range(2)]
    results = [finish(p) for p in parts]
    assert sorted(r["extracted"] for r in results) == [8, 12] and any(r["complete"] for r in results)
    assert_same_store(out, reference)


def test_another_configuration_is_refused_while_one_writes(willow_root, reference, tmp_path):
    """A second extract of the store with other settings fails at once, naming the store,
    and the first run's store comes out intact; once the first is done (or dead), another
    configuration may run and replaces the store."""
    out = slow_out(tmp_path)
    other = {**SLOW_BACKBONE, "input_size": 168}
    first = extract_process(willow_root, out)
    wait_for_shards(first, partial_of(out), 1)
    first.send_signal(signal.SIGSTOP)  # a writer that is slow: it holds the store for as long as it runs
    try:
        second = extract_process(willow_root, out, spec=other)
        _, err = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode != 0
    assert f"{out}: another extract is writing this store with another configuration" in " ".join(err.split())
    assert finish(first)["complete"]
    assert_same_store(out, reference)
    # with the first run done, the other configuration replaces the store
    assert finish(extract_process(willow_root, out, spec=other))["extracted"] == N_IMAGES
    open_store(out, expect={"input_size": 168})
    # a writer killed mid-run holds no lock; its partial store (another configuration) is discarded
    dead = extract_process(willow_root, out)
    wait_for_shards(dead, partial_of(out), 1)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    kept = files_of(out)
    assert finish(extract_process(willow_root, out, spec=other))["extracted"] == 0  # out already holds this one
    assert files_of(out) == kept and not partial_of(out).exists()
    open_store(out, expect={"input_size": 168})


def test_default_conf_matches_params_layout():
    assert set(default_conf) == {"batch_size", "num_workers", "device", "flips", "shard_images"}
