"""Chunk codec and reader of the feature store, chosen by measurement.

For every codec of `pipeline.store.CODECS` (each with the per-chunk crc32c) this builds the
eval benchmark's store (`benchmarks/eval_throughput.py`: ``--images`` 60x60x768 fp16 maps,
``--pairs`` pairs) and measures, from a cold page cache:

- store size, and store / raw on grids padded 60x45 into 60x60 (as `pad` resizing of 4:3 images leaves);
- store / raw and warm `iter_maps` speed on features of real photographs (scikit-image's,
  several aspect ratios, `pad` resizing) from a random-init ViT-S/14 at 448 px;
- the bulk read `FeatureStore.iter_maps` (hand-written `_ShardFile` reader: plain reads,
  every checksum checked) against zarr's own API on the same store, one shard per slice
  (``feats[a:b]``) and one image per slice (``feats[n, :, :h, :w]``), in MB/s of stored bytes;
- one random image as ``[C, h, w]`` float32 (warm cache): `FeatureStore.features` (zarr's
  ``feats[n, :, :h, :w]`` after the index check) against the same read by `_ShardFile`;
- match + evaluate of the eval benchmark (argmax, `stages.match.main` + `stages.evaluate.main`).

It prints one table, with the machine's load average before and after each codec (the
numbers are only comparable between rows run under similar load). The rule: keep zarr's own
API where its speed is within 1.5x of the hand-written reader.

    .venv/bin/python benchmarks/store_codecs.py --images 200 --pairs 1500   # small check
    .venv/bin/python benchmarks/store_codecs.py                             # full size: ~10 GB per codec

Full size on the 2-core development machine (shared with other workers: load average 1.3-2.4
during the run; disk 2274 MB/s); before chunk checksums (lz4hc-bitshuffle, hand-written reader):
match_pairs 31.2 s, match + evaluate 39.2 s::

    codec             store GB  /raw   /raw padded  iter_maps MB/s  zarr shard / image MB/s  match_pairs s  match+eval s
    none                  9.95  1.000        1.333            1155                299 / 421           32.2          41.2
    lz4                   9.95  1.000        1.002             951                294 / 377           32.5          41.6
    lz4-bitshuffle        9.93  0.998        0.975             805                323 / 356           31.1          39.7
    lz4hc-bitshuffle      9.89  0.993        0.954             684                256 / 337           36.1          45.0

Matching is compute-bound here (ties within the load noise, but for lz4hc). Default: lz4,
whose decode (3.5 GB/s warm) stays faster than the disk, so the read bound is the disk;
bit shuffle saves ~6% on real-image features (random-init ViT-S: 0.94x against lz4's 1.00x)
but decodes at ~1.6 GB/s, below the disk; no compression stores padding (1.27-1.33x).
zarr's API is 2-3x slower than `iter_maps` (kept hand-written) and as fast for one image
(`features` and `sample` use it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_throughput import DIM, GRID, PATCH, build, disk_read_speed, drop_from_page_cache, match_and_evaluate, store_dir  # noqa: E402
from extract_throughput import make_images  # noqa: E402

from semcorr.pipeline.backbones import build_backbone  # noqa: E402

from semcorr.pipeline.coords import CellTransform  # noqa: E402
from semcorr.pipeline.extract import extract_features, store_attrs  # noqa: E402
from semcorr.pipeline.store import CODECS, DEFAULT_CODEC, FeatureStore, _ShardFile, open_store, write_store  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_custom(store: FeatureStore) -> None:
    for _ in store.iter_maps():
        pass


def read_zarr_shards(store: FeatureStore) -> None:
    """zarr's API, one slice per shard: the whole shard file decoded by zarr's codec pipeline."""
    feats = store._group["feats"]
    for shard in range(store.n_shards):
        rows = store.shard_range(shard)
        block = feats[rows.start : rows.stop]
        for k, n in enumerate(rows):
            gh, gw = store._grid(n)
            block[k, :, :gh, :gw]


def read_zarr_images(store: FeatureStore) -> None:
    """zarr's API, one slice per image (its index read, then its chunk)."""
    feats = store._group["feats"]
    for n in range(len(store)):
        gh, gw = store._grid(n)
        feats[n, :, :gh, :gw]


def random_access(store: FeatureStore, count: int = 100) -> tuple[float, float]:
    """Median seconds to fetch one random image's ``[C, h, w]`` float32 features (warm page
    cache) with the hand-written `_ShardFile` reader and with `FeatureStore.features` (zarr's
    API after the index check); the two alternate image by image, so that load drifts hit both."""
    picks = [int(n) for n in np.random.default_rng(0).integers(0, len(store), count)]
    buffer, scratch = np.empty(store._chunk_shape, dtype=np.float16), np.empty(0, dtype=np.uint8)

    def hand_written(n: int) -> None:
        with _ShardFile(store, "feats", n // store.shard_images) as shard_file:
            shard_file.read(n, buffer, scratch)
        gh, gw = store._grid(n)
        torch.from_numpy(np.asarray(buffer[:gh, :gw].transpose(2, 0, 1), dtype=np.float32, order="C"))

    times: dict = {hand_written: [], store.features: []}
    for n in picks[:4] + picks:
        for fetch, seconds in times.items():
            seconds.append(timed(lambda: fetch(n) if fetch is hand_written else fetch(store.image_ids[n])))
    return tuple(float(np.median(seconds[4:])) for seconds in times.values())


def padded_ratio(workdir: Path, codec: str, images: int = 32) -> float:
    """Stored bytes / raw fp16 bytes of maps 60x45 padded into 60x60."""
    rng = np.random.default_rng(2)
    t = CellTransform.from_resize((360, 480), (630, 840), (0.0, 0.0), PATCH, (45, GRID))
    items = [(f"p{n}", rng.standard_normal((DIM, 45, GRID)).astype(np.float16), t) for n in range(images)]
    attrs = {"backbone": "pad", "family": "synthetic", "variant": "pad", "weights_sha256": None, "random_init": True,
             "layer": None, "patch_size": PATCH, "input_size": 840, "resize": "pad", "feat_dim": DIM,
             "dataset": "pad", "flips": False, "versions": {"benchmark": "1"}}
    path = write_store(workdir / f"padded-{codec}.zarr", attrs, items, codec=codec)
    stored = sum(f.stat().st_size for f in (path / "feats").rglob("*") if f.is_file())
    shutil.rmtree(path)
    return stored / (images * DIM * 45 * GRID * 2)


def vit_features(workdir: Path, n_images: int) -> tuple[dict, list[tuple]]:
    """Store attrs and ``(image_id, [C, h, w] float16, CellTransform)`` items of random-init
    ViT-S/14 features (448 px, pad) of ``n_images`` photographs."""
    folder = workdir / "vit"
    folder.mkdir(parents=True, exist_ok=True)
    images = make_images(folder, n_images)
    backbone = build_backbone({"family": "dinov2", "variant": "vits14", "random_init": True, "input_size": 448,
                               "resize": "pad"})
    attrs = store_attrs(backbone, "vit", "vit", "photos", None, False)
    result = extract_features(backbone, images, folder / "features" / "vit" / "photos.zarr", attrs,
                              {"num_workers": 0, "device": "cpu"}, progress=False, work_root=folder / "work")
    store = open_store(result.path)
    items = [(i, f.numpy().astype(np.float16), store.transform(i)) for i, f in store.iter_features()]
    shutil.rmtree(folder)
    return attrs, items


def vit_row(workdir: Path, codec: str, attrs: dict, items: list[tuple]) -> dict:
    """Stored / raw bytes and warm `iter_maps` MB/s (of raw fp16) of the ViT features with ``codec``."""
    path = write_store(workdir / f"vit-{codec}.zarr", attrs, items, codec=codec)
    stored = sum(f.stat().st_size for f in (path / "feats").rglob("*") if f.is_file())
    raw = sum(f.nbytes for _, f, _ in items)
    store = open_store(path)
    read_custom(store)
    seconds = min(timed(lambda: read_custom(store)) for _ in range(3))
    shutil.rmtree(path)
    return {"vit_ratio": stored / raw, "vit_mbs": raw / seconds / 1e6}


def measure(workdir: Path, codec: str, n_images: int, n_pairs: int, keep: bool) -> dict:
    data = workdir / codec / "data"
    row = {"codec": codec, "load_before": os.getloadavg()[0]}
    row["build_s"] = timed(lambda: build(data, n_images, n_pairs, codec=codec))
    store_bytes = drop_from_page_cache(store_dir(data))
    store = open_store(store_dir(data))
    row["store_gb"] = store_bytes / 1e9
    row["ratio"] = store_bytes / (n_images * DIM * GRID * GRID * 2)
    row["padded_ratio"] = padded_ratio(workdir, codec)
    for name, reader in (("custom", read_custom), ("zarr_shards", read_zarr_shards), ("zarr_images", read_zarr_images)):
        drop_from_page_cache(store_dir(data))
        row[f"{name}_mbs"] = store_bytes / timed(lambda: reader(store)) / 1e6
    row["shardfile_ms"], row["features_ms"] = (1e3 * t for t in random_access(store))
    row.update(match_and_evaluate(data))
    row["load_after"] = os.getloadavg()[0]
    if not keep:
        shutil.rmtree(workdir / codec)
    return row


def print_table(rows: list[dict], disk: float, threads: int, n_images: int, n_pairs: int) -> None:
    columns = [
        ("codec", "{codec}"), ("store GB", "{store_gb:.2f}"), ("/raw", "{ratio:.3f}"), ("/raw padded", "{padded_ratio:.3f}"),
        ("/raw ViT", "{vit_ratio:.3f}"), ("ViT warm MB/s", "{vit_mbs:.0f}"),
        ("iter_maps MB/s", "{custom_mbs:.0f}"), ("zarr shard MB/s", "{zarr_shards_mbs:.0f}"),
        ("zarr image MB/s", "{zarr_images_mbs:.0f}"), ("_ShardFile image ms", "{shardfile_ms:.1f}"),
        ("features ms (zarr)", "{features_ms:.1f}"), ("match_pairs s", "{match_pairs:.1f}"), ("h5 s", "{export:.1f}"),
        ("match+eval s", "{total:.1f}"), ("load", "{load_before:.1f}->{load_after:.1f}"),
    ]
    cells = [[fmt.format(**row, total=row["match"] + row["evaluate"]) for _, fmt in columns] for row in rows]
    widths = [max(len(name), *(len(c[k]) for c in cells)) for k, (name, _) in enumerate(columns)]
    print(f"\nstore codecs: {n_images} images, {n_pairs} pairs, {threads} torch threads, {os.cpu_count()} CPUs, "
          f"disk {disk / 1e6:.0f} MB/s sequential, default {DEFAULT_CODEC!r}")
    print("  ".join(name.rjust(w) for (name, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    for row in rows:
        best_zarr = max(row["zarr_shards_mbs"], row["zarr_images_mbs"])
        print(f"{row['codec']}: zarr's API is {row['custom_mbs'] / best_zarr:.2f}x slower than iter_maps, "
              f"{row['features_ms'] / row['shardfile_ms']:.2f}x the hand-written time for one image "
              f"(zarr's API is used where this is <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semcorr-codecs"))
    parser.add_argument("--images", type=int, default=1800)
    parser.add_argument("--pairs", type=int, default=12234)
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (as in eval_throughput.py)")
    parser.add_argument("--read-test-mb", type=int, default=1024, help="size of the disk read-speed test file")
    parser.add_argument("--vit-images", type=int, default=48, help="photographs for the ViT feature measurement")
    parser.add_argument("--keep", action="store_true", help="keep each codec's store under --workdir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    disk = disk_read_speed(args.workdir, args.read_test_mb << 20)
    vit_attrs, vit_items = vit_features(args.workdir, args.vit_images)
    rows = []
    for codec in args.codecs:
        rows.append(measure(args.workdir, codec, args.images, args.pairs, args.keep))
        rows[-1].update(vit_row(args.workdir, codec, vit_attrs, vit_items))
        print(f"{codec}: done ({rows[-1]})", flush=True)
    print_table(rows, disk, args.threads, args.images, args.pairs)


if __name__ == "__main__":
    main()
