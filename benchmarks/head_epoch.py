"""One training epoch of the post-processor (`pipeline.head`) over an SPair-scale feature cache:
seconds per epoch and peak RSS, against the targets (15 min, 6 GB on a 2-core CPU).

The cache is SPair-71k's training split in size: 18 categories x 70 images, 53,340 pairs
drawn without repetition from each category's ordered image pairs, 10 keypoints a pair on
average (3..17), maps of 60 x 60 cells x 768 channels in float16 (DINOv2-B/14 at 840 px),
with mirrored maps (flip augmentation reads them). Features are random (the cost does not
depend on them); the store is written once (about 14 GB with the mirrored maps) and can be
kept with ``--store``. The epoch runs in a child process, so its peak RSS is the epoch's
own: the head's steps (`pipeline.head.epoch_batches`, `train_epoch`) with the library's
defaults unless flags say otherwise; the per-epoch validation is not part of it.

    .venv/bin/python benchmarks/head_epoch.py                       # builds a temp store, then one epoch
    .venv/bin/python benchmarks/head_epoch.py --store /data/bench.zarr --keep   # reuse / keep the store
    .venv/bin/python benchmarks/head_epoch.py --categories 2 --pairs 500       # a quick smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semcorr.pipeline.coords import CellTransform  # noqa: E402
from semcorr.pipeline.head import PairData, build_head, check_conf, epoch_batches, train_epoch  # noqa: E402
from semcorr.pipeline.store import open_store, write_store  # noqa: E402
from semcorr.pipeline.tables import flatten  # noqa: E402

TARGET_SECONDS, TARGET_RSS_GB = 15 * 60, 6.0
FULL_CATEGORIES = 18  # SPair-71k's
IMAGE_SIDE, INPUT, PATCH = 500, 840, 14


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", type=int, default=FULL_CATEGORIES)
    parser.add_argument("--images-per-category", type=int, default=70)
    parser.add_argument("--pairs", type=int, default=53340, help="training pairs, spread evenly over categories")
    parser.add_argument("--dim", type=int, default=768, help="feature channels")
    parser.add_argument("--store", type=Path, default=None, help="store path (reused if it exists)")
    parser.add_argument("--keep", action="store_true", help="keep the store")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a head setting, e.g. blocks=2")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def transform() -> CellTransform:
    grid = INPUT // PATCH
    return CellTransform.from_resize((IMAGE_SIDE, IMAGE_SIDE), (INPUT, INPUT), (0.0, 0.0), PATCH, (grid, grid))


def make_pairs(args, rng: np.random.Generator) -> pd.DataFrame:
    rows, per_category = [], args.pairs // args.categories
    for c in range(args.categories):
        n = args.images_per_category
        ordered = [(s, t) for s in range(n) for t in range(n) if s != t]
        extra = 1 if c < args.pairs % args.categories else 0
        for k in rng.choice(len(ordered), size=per_category + extra, replace=False):
            s, t = ordered[k]
            n_kp = int(rng.integers(3, 18))
            rows.append({"pair_id": f"{c}/{s}-{t}", "split": "trn", "category": str(c),
                         "source_id": f"{c}/{s}", "target_id": f"{c}/{t}",
                         "source_kps": flatten(rng.uniform(0, IMAGE_SIDE - 1, (n_kp, 2))),
                         "target_kps": flatten(rng.uniform(0, IMAGE_SIDE - 1, (n_kp, 2))),
                         "visible": [True] * n_kp, "pck_norm": 300.0, "norm_kind": "bbox",
                         "flip_index": rng.permutation(n_kp).tolist()})  # a random left/right permutation
    return pd.DataFrame(rows)


def build_store(path: Path, args) -> float:
    rng = np.random.default_rng(1)
    grid = INPUT // PATCH
    t = transform()

    def items():
        for c in range(args.categories):
            for k in range(args.images_per_category):
                maps = rng.standard_normal((2, args.dim, grid, grid), dtype=np.float32).astype(np.float16)
                yield f"{c}/{k}", maps[0], t, maps[1]

    attrs = {"backbone": "bench", "family": "dinov2", "variant": "bench", "weights_sha256": None, "random_init": True,
             "layer": None, "patch_size": PATCH, "input_size": INPUT, "resize": "pad", "feat_dim": args.dim,
             "dataset": "bench", "flips": True, "versions": {"bench": "0"}}
    start = time.perf_counter()
    write_store(path, attrs, items())
    return time.perf_counter() - start


def child(args) -> None:
    """The epoch itself; prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    conf = check_conf({k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    pairs = make_pairs(args, np.random.default_rng(0))
    store = open_store(args.child)
    head = build_head(args.dim, conf)
    batches = epoch_batches(pairs, conf, 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=conf["lr"], weight_decay=conf["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=conf["lr"], total_steps=len(batches) + 1,
                                                    pct_start=conf["warmup"])
    load = os.getloadavg()[0]
    start = time.perf_counter()
    losses = train_epoch(head, PairData(pairs, store), batches, optimizer, scheduler, conf,
                         lambda k, loss: print(f"step {k}/{len(batches)}, loss {loss:.4f}, "
                                               f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "steps": len(batches), "pairs": len(pairs),
                      "image_passes": sum(len(b.images) for b in batches), "loss": float(np.mean(losses)),
                      "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "threads": torch.get_num_threads(), "load": [load, os.getloadavg()[0]],
                      "conf": {k: conf[k] for k in ("blocks", "bottleneck_ratio", "batch_images", "flip_augment")}}))


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    tmp = None
    path = args.store
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="semcorr-head-bench-"))
        path = tmp / "bench.zarr"
    built = None
    try:
        if not (path / "zarr.json").is_file():
            built = build_store(path, args)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        command = [sys.executable, __file__, "--child", str(path), "--categories", str(args.categories),
                   "--images-per-category", str(args.images_per_category), "--pairs", str(args.pairs),
                   "--dim", str(args.dim), *(["--threads", str(args.threads)] if args.threads else []),
                   *[f"--set={s}" for s in args.set]]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    grid = INPUT // PATCH
    print(f"head epoch: {result['pairs']} pairs, {args.categories} x {args.images_per_category} images, "
          f"{grid} x {grid} x {args.dim} float16 maps (+ mirrored), store {size / 2**30:.1f} GiB"
          + (f" written in {built:.0f} s" if built is not None else " (reused)") + f" at {path}")
    print(f"head {result['conf']}, {result['steps']} steps, {result['image_passes']} image passes "
          f"(forward + backward), {result['threads']} threads, load average {result['load'][0]:.1f} -> "
          f"{result['load'][1]:.1f}")
    print()
    print("| measure | value | target | ratio |")
    print("|---|---|---|---|")
    # a step is one category: a run on fewer categories scales to SPair's 18 by their count
    scale = FULL_CATEGORIES / args.categories
    label = "seconds per epoch" if scale == 1 else f"seconds per epoch (this run x {scale:.2f}: 18 categories)"
    print(f"| {label} | {result['seconds'] * scale:.0f} | {TARGET_SECONDS} | "
          f"{result['seconds'] * scale / TARGET_SECONDS:.2f} |")
    print(f"| peak RSS (GB) | {result['rss_gb']:.2f} | {TARGET_RSS_GB:.0f} | {result['rss_gb'] / TARGET_RSS_GB:.2f} |")


if __name__ == "__main__":
    main()
