"""Feature stores on object storage, against a real S3 API: moto's standalone server on
127.0.0.1 (started and stopped by tests/conftest.py). Extract writes a store bitwise equal to
the local one; match, verify and the CLI read it without listing the bucket; a writer killed
mid-run resumes (trusting only shards that verify); a store of another configuration is
refused by readers and writers; exactly one of two concurrent creators wins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import numpy as np
import pandas as pd
import pytest

from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import ExtractError, extract_features, store_attrs
from semcorr.pipeline.matching import match_pairs
from semcorr.pipeline.store import StoreError, StoreMismatch, create_store, open_store, verify_store
from semcorr.pipeline.tables import read_pairs
from semcorr.stages.cli import main as cli
from test_extract import FAST, N_IMAGES, N_SHARDS, SLOW_BACKBONE, SLOW_EXTRACT, assert_same_store, extract
from test_store import make_attrs, make_items
from tiny import TINY_SPECS

pytestmark = pytest.mark.slow


def keys(s3, bucket: str, prefix: str = "") -> dict[str, str]:
    """Every object under ``prefix`` -> its ETag (the test lists; semcorr's readers never do)."""
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def listings(requests: list[str]) -> list[str]:
    """The bucket listings (ListObjects / ListObjectsV2) among logged requests."""
    return [r for r in requests if "list-type=" in r or "?prefix=" in r or "&prefix=" in r]


def test_s3_store_is_the_local_store_and_is_read_without_listing(s3, bucket, willow_root, images, tmp_path, capsys):
    url = f"s3://{bucket}/features/tiny/pfwillow.zarr"
    net = build_backbone(TINY_SPECS["dinov2"])
    attrs = store_attrs(net, "tiny", "tiny", "pfwillow", None, FAST["flips"])
    result = extract_features(net, images, url, attrs, FAST, progress=False)
    assert (result.path, result.extracted, result.complete) == (url, N_IMAGES, True)
    local = extract(tmp_path, "tiny", TINY_SPECS["dinov2"], FAST, images).path
    objects = keys(s3, bucket)
    n_shards = -(-N_IMAGES // FAST["shard_images"])
    assert sum("/feats/c/" in k for k in objects) == n_shards  # one object per shard, not per image
    assert sum("/done/c/" in k for k in objects) == n_shards and len(objects) <= 2 * n_shards + 6

    before = len(s3.requests())
    store = open_store(url, expect={"backbone": "tiny", "input_size": TINY_SPECS["dinov2"]["input_size"]})
    assert_same_store(url, local)  # bitwise
    pairs = read_pairs(willow_root / "prepared" / "pfwillow", "test")
    pairs = pairs[pairs.source_id.isin(store.image_ids) & pairs.target_id.isin(store.image_ids)]
    assert len(pairs) >= 10
    pd.testing.assert_frame_equal(match_pairs(store, pairs).table, match_pairs(open_store(local), pairs).table)
    assert verify_store(url).ok
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        cli(["verify", url])  # `semcorr verify s3://...`
    assert exit_status.value.code == 0
    ok = f"{url}: OK ({N_IMAGES} images in {n_shards} shards, every checksum verified)"
    assert capsys.readouterr().out.strip() == ok
    read = s3.requests()[before:]
    assert len(read) > 3 * n_shards and not listings(read), listings(read)


S3_DRIVER = """
import json, sys
import pandas as pd
from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import extract_features, store_attrs
spec, conf, images, url = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
net = build_backbone(spec)
attrs = store_attrs(net, "slow", "slow", "pfwillow", None, conf["flips"])
result = extract_features(net, pd.read_parquet(images), url, attrs, conf, progress=False)
print(json.dumps({"extracted": result.extracted, "skipped": result.skipped, "complete": result.complete}))
"""


def test_a_writer_killed_on_s3_resumes_to_the_same_store(s3, bucket, willow_root, reference):
    url = f"s3://{bucket}/features/slow/pfwillow.zarr"
    images_file = willow_root / "prepared" / "pfwillow" / "images.parquet"
    writer = subprocess.Popen([sys.executable, "-c", S3_DRIVER, json.dumps(SLOW_BACKBONE), json.dumps(SLOW_EXTRACT),
                               str(images_file), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    deadline = time.monotonic() + 120
    while sum("/done/c/" in k for k in keys(s3, bucket)) < 2 and writer.poll() is None:
        assert time.monotonic() < deadline, "extract made no progress"
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    _, err = writer.communicate()
    assert writer.returncode == -signal.SIGKILL, err
    with pytest.raises(StoreError, match="incomplete feature store"):
        open_store(url)  # nothing readable until complete
    store = open_store(url, complete=False)
    intact = [s for s in range(store.n_shards) if not store.check_shard(s)]
    assert 2 <= len(intact) < N_SHARDS, "the run finished before the kill; make the slow backbone slower"
    # a shard marked done but damaged in the bucket is not trusted: extracted again
    damaged = intact.pop(0)
    key = url.removeprefix(f"s3://{bucket}/") + f"/feats_flip/c/{damaged}/0/0/0"
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[100] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    kept = {k: v for k, v in keys(s3, bucket).items() if any(f"/feats/c/{s}/" in k for s in intact)}

    net = build_backbone(SLOW_BACKBONE)
    attrs = store_attrs(net, "slow", "slow", "pfwillow", None, SLOW_EXTRACT["flips"])
    result = extract_features(net, pd.read_parquet(images_file), url, attrs, SLOW_EXTRACT, progress=False)
    skipped = len(intact) * SLOW_EXTRACT["shard_images"]
    assert (result.extracted, result.skipped, result.complete) == (N_IMAGES - skipped, skipped, True)
    assert {k: v for k, v in keys(s3, bucket).items() if k in kept} == kept  # intact shards not rewritten
    assert_same_store(url, reference)  # bitwise the local, uninterrupted run


def test_a_store_of_another_configuration_is_refused(s3, bucket, images):
    url = f"s3://{bucket}/features/tiny/pfwillow.zarr"
    spec = TINY_SPECS["dinov2"]
    net = build_backbone(spec)
    attrs = store_attrs(net, "tiny", "tiny", "pfwillow", None, FAST["flips"])
    extract_features(net, images, url, attrs, FAST, progress=False)
    with pytest.raises(StoreMismatch, match=f"{url}: .*input_size: expected 84, found {spec['input_size']}"):
        open_store(url, expect={"input_size": 84})  # what match does with the params' settings
    before = keys(s3, bucket)
    other = build_backbone({**spec, "input_size": 84})
    other_attrs = store_attrs(other, "tiny", "tiny", "pfwillow", None, FAST["flips"])
    with pytest.raises(ExtractError, match=f"{url}: feature store made with another configuration: "
                                           f"input_size: expected 84, found {spec['input_size']}.*--replace"):
        extract_features(other, images, url, other_attrs, FAST, progress=False)
    assert keys(s3, bucket) == before  # not a byte written
    open_store(url, expect={"input_size": spec["input_size"]})
    result = extract_features(other, images, url, other_attrs, FAST, progress=False, replace=True)
    assert result.complete and result.extracted == N_IMAGES
    open_store(url, expect={"input_size": 84})


def test_one_of_two_concurrent_creators_wins(s3, bucket):
    """No lock on S3: the exclusive create of zarr.json decides, and the loser is refused
    once the winner's store is whole (never a mix of two configurations)."""
    url = f"s3://{bucket}/race.zarr"
    items = make_items("pad")
    ids, transforms = [i for i, _, _ in items], [t for _, _, t in items]
    start, outcomes = threading.Barrier(2), {}

    def create(layer: int) -> None:
        start.wait()
        try:
            outcomes[layer] = create_store(url, make_attrs(layer=layer), ids, transforms, shard_images=2)
        except StoreMismatch as exc:
            outcomes[layer] = exc

    threads = [threading.Thread(target=create, args=(layer,)) for layer in (3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [layer for layer, got in outcomes.items() if not isinstance(got, Exception)]
    assert len(won) == 1, outcomes
    lost = ({3, 4} - set(won)).pop()
    assert f"layer: expected {lost}, found {won[0]}" in str(outcomes[lost])
    open_store(url, complete=False, expect={"layer": won[0]})
    store = outcomes[won[0]]
    store.write_shard(0, [f.numpy() for _, f, _ in items[:2]])
    assert store.done().tolist() == [True, True, False, False, False]
    np.testing.assert_array_equal(store.features("img1").numpy(), items[1][1].half().float().numpy())
