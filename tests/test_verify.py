"""`semcorr verify` (`stages.verify.command`, run as a real process) and `verify_store` on
real stores: intact, damaged, unreadable and incomplete; and the repair it prints, a
re-extract that redoes only the damaged shards and never writes a file of the old store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semcorr.pipeline.datasets import prepare
from semcorr.pipeline.store import create_store, open_store, verify_store, write_store
from semcorr.pipeline.tables import read_images
from test_extract import FAST, N_IMAGES, WILLOW, extract, flip_byte
from test_store import make_attrs, make_items, shard_file
from tiny import TINY_SPECS

VERIFY = "import typer; from semcorr.stages.verify import command; typer.run(command)"
TUNED = dict(backbone="dinov2_vitb14", variant="dinov2_vitb14_ft2", tuned_depth=2, dataset="spair")


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", VERIFY, str(path)], capture_output=True, text=True, timeout=120)


def test_intact_store_is_one_ok_line(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_attrs(**TUNED), make_items("pad"), shard_images=2)
    done = verify(path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{path}: OK (5 images in 3 shards, every checksum verified)"


def test_damaged_store_lists_the_images_and_the_repair(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_attrs(**TUNED), make_items("pad"), shard_images=2)
    corrupt, missing = shard_file(path, 1), shard_file(path, 2)
    offset, _ = chunk_span(open_store(path), "img3")
    flip_byte(corrupt, offset + 7)
    missing.unlink()
    report = verify_store(path)
    assert (report.bad_shards, report.bad_images) == ([1, 2], ["img3", "img4"])
    done = verify(path)
    assert done.returncode == 1
    out = " ".join(done.stdout.split())
    assert f"{corrupt}: chunk checksum mismatch (corrupt data) (image 'img3' of feature store {path}) [marked done]" in out
    assert f"{missing}: shard file is missing (image 'img4'" in out
    assert "damaged images: img3, img4" in out
    assert ("repair: re-extract the 2 damaged images (shards 1, 2; intact shards are kept): "
            "`semcorr extract --dataset spair --backbone dinov2_vitb14 --tuned 2`") in out


def chunk_span(store, image_id: str) -> tuple[int, int]:
    """``(offset, nbytes)`` of an image's chunk in its shard file (from the sharding index)."""
    n = store.index(image_id)
    data = store.shard_file("feats", n // store.shard_images).read_bytes()
    index = np.frombuffer(data[-(16 * store.shard_images + 4) : -4], dtype="<u8").reshape(-1, 2)
    return int(index[n % store.shard_images, 0]), int(index[n % store.shard_images, 1])


def test_unreadable_and_incomplete_stores(tmp_path):
    done = verify(tmp_path / "features" / "tiny_ft4" / "willow.zarr")
    assert done.returncode == 1
    assert "not a feature store (no zarr.json)" in done.stdout
    assert "repair: rebuild the whole store: `semcorr extract --dataset willow --backbone tiny --tuned 4`" in done.stdout
    items = make_items("pad")
    path = tmp_path / "partial.zarr"
    store = create_store(path, make_attrs(), [i for i, _, _ in items], [t for _, _, t in items], shard_images=2)
    store.write_shard(0, [f.numpy() for _, f, _ in items[:2]])
    done = verify(path)
    assert done.returncode == 1
    out = " ".join(done.stdout.split())
    assert f"{path / 'feats' / 'c' / '1' / '0' / '0' / '0'}: shard file is missing (images 'img2', 'img3'" in out
    assert "store not marked complete (2 of 5 images done)" in out
    assert "[marked done]" not in out


@pytest.mark.skipif(not WILLOW.is_dir(), reason=f"{WILLOW} not present")
def test_repair_re_extracts_only_the_damaged_shards(tmp_path):
    """The repair `verify` prints: extract keeps every intact shard (hard links), redoes the
    damaged ones, and never opens a file of the old store for writing: each keeps its bytes."""
    prepared = prepare("pfwillow", WILLOW, tmp_path / "data" / "prepared" / "pfwillow")
    images = read_images(prepared)
    images = images.iloc[:: len(images) // N_IMAGES].head(N_IMAGES).reset_index(drop=True)
    root = tmp_path / "data"
    out = extract(root, "tiny", TINY_SPECS["dinov2"], FAST, images).path
    expected = {i: open_store(out).features(i).numpy() for i in open_store(out).image_ids}
    flip_byte(shard_file(out, 1), 50)
    shard_file(out, 3).unlink()
    report = verify(out)
    assert report.returncode == 1 and "`semcorr extract --dataset pfwillow --backbone tiny`" in report.stdout
    # every file of the damaged store, kept by a second hard link with its content's hash
    side = tmp_path / "side"
    side.mkdir()
    digests = {}
    for k, f in enumerate(p for p in out.rglob("*") if p.is_file()):
        os.link(f, side / str(k))
        digests[k] = hashlib.sha256(f.read_bytes()).hexdigest()
    result = extract(root, "tiny", TINY_SPECS["dinov2"], FAST, images)
    assert (result.extracted, result.skipped, result.complete) == (8, N_IMAGES - 8, True)
    assert {k: hashlib.sha256((side / str(k)).read_bytes()).hexdigest() for k in digests} == digests
    done = verify(out)
    assert done.returncode == 0, done.stdout
    store = open_store(out)
    for image_id, feats in expected.items():
        np.testing.assert_array_equal(store.features(image_id).numpy(), feats)
