"""What bootstrap intervals, protocol presets and the difficulty breakdown add to evaluate,
at SPair-71k test size (12,234 pairs, 18 categories, up to 20 keypoints each).

Times the evaluate stage's core (`pck.evaluate_predictions`) and, separately, everything
the intervals add: the resample counts, the native protocol's per-pair hits, the per-image
and per-point intervals, every protocol preset with its interval, and the difficulty
breakdown. Target: the additions take <= 5 s for 1,000 resamples on this machine.

    .venv/bin/python benchmarks/bootstrap.py [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from semcorr.pipeline import bootstrap as boot
from semcorr.pipeline.pck import evaluate_predictions
from semcorr.pipeline.protocols import PRESETS, evaluate_protocols, score
from semcorr.pipeline.tables import flatten
from semcorr.stages.evaluate import difficulty_table, per_pair_table

ALPHAS = [0.01, 0.05, 0.1, 0.15, 0.2]


def spair_sized(n_pairs: int, seed: int = 0):
    """Pair table, predictions and image sizes shaped like SPair-71k's test split."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 21, n_pairs)
    w, h = rng.integers(300, 500, n_pairs), rng.integers(200, 500, n_pairs)
    rows, preds = [], []
    for p, (n, wp, hp) in enumerate(zip(counts, w, h)):
        gt = rng.uniform(0, 1, (n, 2)) * [wp - 1, hp - 1]
        box = [0.0, 0.0, float(wp) * 0.8, float(hp) * 0.8]
        rows.append({"pair_id": f"p{p}", "category": f"c{p % 18}", "source_id": f"s{p}", "target_id": f"t{p}",
                     "source_kps": flatten(gt), "target_kps": flatten(gt), "visible": [True] * n,
                     "pck_norm": max(box[2], box[3]), "norm_kind": "bbox", "target_bbox": box,
                     "viewpoint_variation": p % 3, "scale_variation": (p // 3) % 3, "truncation": p % 4,
                     "occlusion": (p // 4) % 4})
        xy = gt + rng.normal(0, 25, gt.shape)
        preds += [{"pair_id": f"p{p}", "kp_index": k, "x": x, "y": y} for k, (x, y) in enumerate(xy)]
    sizes = np.stack([w, h], 1).astype(np.float64)
    return pd.DataFrame(rows), pd.DataFrame(preds), {"target": sizes, "source": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12234)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    pairs, predictions, sizes = spair_sized(args.pairs)

    start = time.perf_counter()
    evaluate_predictions(pairs, predictions, ALPHAS)
    core = time.perf_counter() - start

    start = time.perf_counter()
    weights = boot.resample_counts(pairs["category"].to_numpy(), args.resamples, 0)
    native = score(PRESETS["native"], pairs, predictions, sizes, ALPHAS)
    for aggregation in ("image", "point"):
        boot.interval(boot.pck_statistic(aggregation, native.hits, native.n_visible, native.categories, weights), 0.95)
    intervals = time.perf_counter() - start
    start = time.perf_counter()
    table = evaluate_protocols(list(PRESETS.values()), pairs, predictions, sizes, ALPHAS, weights, 0.95, 840)
    protocols = time.perf_counter() - start
    start = time.perf_counter()
    difficulty_table(pairs, native, ALPHAS, weights, 0.95)
    per_pair_table(pairs, native, ALPHAS)
    difficulty = time.perf_counter() - start

    added = intervals + protocols + difficulty
    n_points = int(native.n_visible.sum())
    print(f"bootstrap cost at {args.pairs} pairs / {n_points} keypoints, {args.resamples} resamples, 5 alphas")
    print(f"  evaluate core (PCK per image, per point, per category)    {core:6.2f} s")
    print(f"  resamples + native intervals (per image, per point)         {intervals:6.2f} s")
    print(f"  {len(PRESETS)} protocol presets with intervals ({int(table['defined'].sum() / len(ALPHAS))} defined)"
          f"               {protocols:6.2f} s")
    print(f"  difficulty breakdown (4 flags) + per-pair table             {difficulty:6.2f} s")
    print(f"  added by the bootstrap                                      {added:6.2f} s   "
          f"(target <= 5 s: {'met' if added <= 5 else 'NOT met'})")


if __name__ == "__main__":
    main()
