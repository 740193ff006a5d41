"""Throughput of match + evaluate at SPair-71k scale on this machine's CPU, against the disk.

Builds (or reuses) a synthetic store of ``--images`` 60x60x768 fp16 maps and a pair table
of ``--pairs`` pairs with up to 20 keypoints each under ``--workdir``, drops the store
from the page cache, times the match (argmax) and evaluate stage functions in-process,
and compares with the disk-read bound: store bytes read / sequential read speed of the
same disk (measured on a fresh file with no page-cache help).

    .venv/bin/python benchmarks/eval_throughput.py                       # full size, ~10 GB
    .venv/bin/python benchmarks/eval_throughput.py --images 40 --pairs 200  # smoke run
    .venv/bin/python benchmarks/eval_throughput.py --codec none          # another chunk codec

`benchmarks/store_codecs.py` runs this for every chunk codec and both readers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from semcorr.pipeline import export as export_module
from semcorr.pipeline import matching as matching_module
from semcorr.pipeline.coords import CellTransform
from semcorr.pipeline.store import CODECS, DEFAULT_CODEC, open_store, write_store
from semcorr.pipeline.tables import flatten, write_tables
from semcorr.stages import evaluate, match

GRID, DIM, PATCH, SIDE = 60, 768, 14, 480  # 480 px images squashed to 840 px -> 60 x 60 cells
DATASET, VARIANT = "bench", "bench_bb"
POOL = 32  # distinct random maps; image n is pool[n % POOL] scaled by a per-image factor


def store_dir(data: Path) -> Path:
    return data / "features" / VARIANT / f"{DATASET}.zarr"


def build(data: Path, n_images: int, n_pairs: int, seed: int = 0, codec: str = DEFAULT_CODEC) -> None:
    """The pair tables and a store of ``n_images`` 60 x 60 x 768 maps with chunk codec ``codec``
    (kept when one of that size and codec is there)."""
    rng = np.random.default_rng(seed)
    store_path = store_dir(data)
    prepared = data / "prepared" / DATASET
    if prepared.exists() and store_path.exists():
        try:
            store = open_store(store_path)
            if (len(store), store.codec) == (n_images, codec) and len(pd.read_parquet(prepared / "pairs.parquet")) == n_pairs:
                return
        except Exception:
            pass
    ids = [f"img{n:05d}" for n in range(n_images)]
    images = pd.DataFrame({"image_id": ids, "path": [f"/nonexistent/{i}.jpg" for i in ids],
                           "width": SIDE, "height": SIDE, "category": [f"c{n % 18}" for n in range(n_images)]})
    src = rng.integers(0, n_images, n_pairs)
    trg = (src + 1 + rng.integers(0, n_images - 1, n_pairs)) % n_images
    counts = rng.integers(8, 21, n_pairs)
    pairs = pd.DataFrame({
        "pair_id": [f"pair{p:06d}" for p in range(n_pairs)], "split": "test",
        "category": [f"c{s % 18}" for s in src], "source_id": [ids[s] for s in src], "target_id": [ids[t] for t in trg],
        "source_kps": [flatten(rng.uniform(0, SIDE - 1, (k, 2))) for k in counts],
        "target_kps": [flatten(rng.uniform(0, SIDE - 1, (k, 2))) for k in counts],
        "visible": [(rng.random(k) < 0.9).tolist() for k in counts],
        "pck_norm": rng.uniform(100, SIDE, n_pairs), "norm_kind": "bbox",
    })
    write_tables(prepared, pairs, images)
    transform = CellTransform.from_resize((SIDE, SIDE), (840, 840), (0.0, 0.0), PATCH, (GRID, GRID))
    pool = rng.standard_normal((POOL, DIM, GRID, GRID)).astype(np.float16)
    attrs = {"backbone": VARIANT, "family": "synthetic", "variant": VARIANT, "weights_sha256": None,
             "random_init": True, "layer": None, "patch_size": PATCH, "input_size": 840, "resize": "squash",
             "feat_dim": DIM, "dataset": DATASET, "flips": False, "versions": {"benchmark": "1"}}
    items = ((i, pool[n % POOL] * np.float16(1 + n / n_images), transform) for n, i in enumerate(ids))
    write_store(store_path, attrs, items, codec=codec)


def drop_from_page_cache(path: Path) -> int:
    """fadvise(DONTNEED) every file under ``path``; returns their total bytes."""
    total = 0
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        total += f.stat().st_size
    return total


def disk_read_speed(workdir: Path, size: int = 2 << 30) -> float:
    """Sequential read speed (bytes/s) of a freshly written file with no page-cache help."""
    path = workdir / "readspeed.bin"
    block = np.random.default_rng(1).integers(0, 255, min(64 << 20, size), dtype=np.uint8).tobytes()
    size = len(block) * (size // len(block))
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    drop_from_page_cache(path)
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    speed = size / (time.perf_counter() - start)
    path.unlink()
    return speed


class Timed:
    """Wraps a function and sums the seconds spent in it (to split the match stage's time)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def match_and_evaluate(data: Path) -> dict[str, float]:
    """Seconds of the match stage (argmax; of which `pipeline.matching.match_pairs` and the
    hloc .h5 export) and of the evaluate stage, run in-process from a cold page cache
    (`stages.match.main`, `stages.evaluate.main` with default match settings)."""
    drop_from_page_cache(store_dir(data))
    matching, export = Timed(matching_module.match_pairs), Timed(export_module.write_matches_h5)
    original = matching_module.match_pairs, export_module.write_matches_h5
    matching_module.match_pairs, export_module.write_matches_h5 = matching, export  # the stage imports them per call
    conf = {"argmax": dict(matching_module.default_conf), "softargmax": dict(matching_module.default_soft_conf)}
    try:
        t0 = time.perf_counter()
        match.main(DATASET, VARIANT, "argmax", conf, "test", None, data)
        match_s = time.perf_counter() - t0
    finally:
        matching_module.match_pairs, export_module.write_matches_h5 = original
    t0 = time.perf_counter()
    evaluate.main(DATASET, VARIANT, "argmax", [0.01, 0.05, 0.1, 0.15, 0.2], "test", conf, data)
    return {"match": match_s, "match_pairs": matching.seconds, "export": export.seconds,
            "evaluate": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semcorr-bench"))
    parser.add_argument("--images", type=int, default=1800)
    parser.add_argument("--pairs", type=int, default=12234)
    parser.add_argument("--codec", default=DEFAULT_CODEC, choices=sorted(CODECS), help="chunk codec of the store")
    parser.add_argument("--read-test-mb", type=int, default=2048, help="size of the disk read-speed test file")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (match_pairs uses one less: a core for the store reader thread)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.workdir / "data"
    t0 = time.perf_counter()
    build(data, args.images, args.pairs, codec=args.codec)
    build_s = time.perf_counter() - t0
    store_bytes = drop_from_page_cache(store_dir(data))
    times = match_and_evaluate(data)
    match_s, eval_s = times["match"], times["evaluate"]
    speed = disk_read_speed(args.workdir, args.read_test_mb << 20)

    total = match_s + eval_s
    read_bytes = 2 * store_bytes  # each image read once as a source, once as a target
    bound, bound_once = read_bytes / speed, store_bytes / speed
    n_kp = len(pd.read_parquet(match.predictions_dir(data, VARIANT, DATASET, "argmax") / "predictions.parquet"))
    rows = [
        ("images / pairs / keypoints", f"{args.images} / {args.pairs} / {n_kp}"),
        ("store on disk", f"{store_bytes / 1e9:.2f} GB (raw fp16 {args.images * DIM * GRID * GRID * 2 / 1e9:.2f} GB; "
                          f"chunk codec {args.codec} + crc32c)"),
        ("build (or reuse) store", f"{build_s:.1f} s"),
        ("match stage (argmax), cold cache", f"{match_s:.1f} s"),
        ("  of which match_pairs (2 passes)", f"{times['match_pairs']:.1f} s"),
        ("  of which hloc .h5 export", f"{times['export']:.1f} s"),
        ("evaluate", f"{eval_s:.1f} s"),
        ("match + evaluate", f"{total:.1f} s   (target <= 60 s: {'met' if total <= 60 else 'NOT met'})"),
        ("disk sequential read", f"{speed / 1e6:.0f} MB/s"),
        ("disk-read bound, 2 reads/image", f"{bound:.1f} s"),
        ("disk-read bound, 1 read/image", f"{bound_once:.1f} s"),
        ("time / bound (2 reads)", f"{total / bound:.2f}x   (target <= 2x: {'met' if total <= 2 * bound else 'NOT met'})"),
        ("speed vs bound (2 reads)", f"{bound / total:.2f}x of disk-read speed"),
        ("time / bound (1 read)", f"{total / bound_once:.2f}x"),
        ("match_pairs / bound (2 reads)", f"{times['match_pairs'] / bound:.2f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\neval throughput ({args.threads} torch threads)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
