"""Label propagation on a DAVIS-size sequence: seconds per frame and peak RSS of the
propagate stage (`stages.propagate.main`: store reads, the rule, masks back to 480p pixels,
writing), for two sequence lengths, each in a fresh process.

The sequence: 480x854 frames, a 60x107 grid of 768 channels (a ViT-B/8-like cache at 480p),
stored as float16 like any extract; the features are a smooth random field panning one cell
every 4 frames plus noise, and frame 0 holds two objects. Params: SFC's published settings
(n_context 20, radius 12, topk 10, temperature 0.05) unless overridden. The store and tables
are built under ``--workdir`` once and reused.

    .venv/bin/python benchmarks/propagation.py                      # 30 and 60 frames, int8 selection
    .venv/bin/python benchmarks/propagation.py --frames 20 40 --threads 1
    .venv/bin/python benchmarks/propagation.py --check              # also: int8 against float32 selection

Target: <= 0.5 s per frame and <= 3 GB peak RSS whatever the sequence length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, W, GRID_H, GRID_W, DIM, PATCH = 480, 854, 60, 107, 768, 8
DATASET, VARIANT = "benchvideo", "bench_bb"


def build(data: Path, frames: int, seed: int = 0) -> None:
    """Prepared tables and the store of one ``frames``-frame sequence (kept when there)."""
    from semcorr.pipeline.coords import CellTransform
    from semcorr.pipeline.store import open_store, write_store
    from semcorr.pipeline.tables import encode_mask, write_video_tables

    store_path = data / "features" / VARIANT / f"{DATASET}.zarr"
    try:
        if len(open_store(store_path)) == frames:
            return
    except Exception:  # absent or another size: build it
        pass
    rng = np.random.default_rng(seed)
    ids = [f"seq/{t:05d}.jpg" for t in range(frames)]
    images = pd.DataFrame({"image_id": ids, "path": [f"/nonexistent/{i}" for i in ids], "width": W, "height": H,
                           "category": "seq"})
    table = pd.DataFrame({"sequence": "seq", "frame": range(frames), "image_id": ids})
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[120:360, 200:400] = 1
    labels[200:300, 500:700] = 2
    masks = pd.DataFrame([{"sequence": "seq", "frame": 0, "image_id": ids[0], "height": H, "width": W,
                           "mask": encode_mask(labels)}])
    write_video_tables(data / "prepared" / DATASET, images, table, masks)
    transform = CellTransform.from_resize((H, W), (H, W), (0.0, 0.0), PATCH, (GRID_H, GRID_W))
    pan = frames // 4 + 2
    field = rng.standard_normal((DIM, GRID_H // 4 + 2, (GRID_W + pan) // 4 + 2)).astype(np.float32)
    import torch

    field = torch.nn.functional.interpolate(torch.from_numpy(field)[None], size=(GRID_H, GRID_W + pan),
                                            mode="bilinear", align_corners=False)[0].numpy()

    def items():
        for t, image_id in enumerate(ids):
            shift = t // 4
            noise = 0.3 * rng.standard_normal((DIM, GRID_H, GRID_W)).astype(np.float32)
            yield image_id, (field[:, :, shift:shift + GRID_W] + noise).astype(np.float16), transform

    attrs = {"backbone": VARIANT, "family": "synthetic", "variant": VARIANT, "weights_sha256": None,
             "random_init": True, "layer": None, "patch_size": PATCH, "input_size": GRID_W * PATCH, "resize": "pad",
             "feat_dim": DIM, "dataset": DATASET, "flips": False, "versions": {"benchmark": "1"}}
    write_store(store_path, attrs, items())


def child(data: Path, conf: dict) -> None:
    """Run the stage in this (fresh) process; print one JSON line of timings and peak RSS."""
    from semcorr.stages import propagate

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    propagate.main(DATASET, VARIANT, conf, data_root=data)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    frames = len(pd.read_parquet(data / "prepared" / DATASET / "frames.parquet")) - 1
    print(json.dumps({"frames": frames, "seconds": seconds, "per_frame": seconds / frames, "cpu_per_frame": cpu / frames,
                      "peak_rss_gib": usage.ru_maxrss / 2 ** 20}))  # ru_maxrss: KiB


def agreement(data: Path, conf: dict, frames: int = 12) -> dict:
    """How far the propagated soft labels (3 random label channels) of int8 selection are from
    float32 selection's over the first ``frames`` frames of the benchmark store: the largest and
    the mean difference, and the share of (frame, cell) whose labels agree within 0.01."""
    import torch

    from semcorr.pipeline.propagation import check_conf, propagate
    from semcorr.pipeline.store import open_store

    store = open_store(data / "features" / VARIANT / f"{DATASET}.zarr")
    ids = store.image_ids[:frames]
    labels = torch.rand(3, GRID_H, GRID_W, generator=torch.Generator().manual_seed(0))
    runs = {}
    for select in ("int8", "float32"):
        lib = check_conf({**{k: conf[k] for k in ("n_context", "radius", "topk", "temperature")}, "select": select})
        runs[select] = [out for _, out in propagate(lambda t: store.features(ids[t]), len(ids), labels, lib)]
    diffs = torch.stack([(a - b).abs() for a, b in zip(runs["int8"], runs["float32"])])
    return {"frames": frames, "max_label_difference": float(diffs.max()), "mean_label_difference": float(diffs.mean()),
            "cells_within_0.01": float((diffs.amax(1) <= 0.01).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[30, 60], help="sequence lengths to run")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench_propagation"))
    parser.add_argument("--n-context", type=int, default=20)
    parser.add_argument("--radius", type=float, default=12.0)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the stage (default: torch's)")
    parser.add_argument("--check", action="store_true", help="also compare int8 and float32 selection")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    conf = {"n_context": args.n_context, "radius": args.radius, "topk": args.topk, "temperature": args.temperature,
            "device": "cpu"}
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(Path(args.child), conf)
        return
    print(f"grid {GRID_H}x{GRID_W}, {DIM} channels, frames {H}x{W}; params {conf}; "
          f"{torch.get_num_threads()} threads; load average before {os.getloadavg()[0]:.2f}")
    results = []
    for frames in args.frames:
        data = args.workdir / f"f{frames}" / "data"
        build(data, frames)
        cmd = [sys.executable, __file__, "--child", str(data), "--n-context", str(args.n_context), "--radius",
               str(args.radius), "--topk", str(args.topk), "--temperature", str(args.temperature),
               *(["--threads", str(args.threads)] if args.threads else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{frames} frames: {result['per_frame']:.3f} s per frame ({result['seconds']:.1f} s for "
              f"{result['frames']} target frames; CPU time {result['cpu_per_frame']:.3f} s per frame), "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    print(f"load average after {os.getloadavg()[0]:.2f}; target <= 0.5 s per frame, <= 3 GB: per frame "
          f"{max(r['per_frame'] for r in results) / 0.5:.2f}x the target, peak RSS "
          f"{max(r['peak_rss_gib'] for r in results) * 2 ** 30 / 3e9:.2f}x")
    if args.check:
        print("int8 selection vs float32:", agreement(args.workdir / f"f{args.frames[0]}" / "data", conf))


if __name__ == "__main__":
    main()
