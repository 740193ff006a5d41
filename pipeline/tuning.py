"""Matching settings chosen on a val split, never on test.

`grid_search` scores every combination of upsampling, soft-argmax window, temperature
and (optionally) GeoAware-SC's zero-outside rule on val pairs, from cached features only:
one similarity computation per upsampling factor (`matching.match_pairs`), then each
soft-argmax setting refines its kept windows (`matching.refine`). Window 0 is the plain
argmax. The best val PCK wins; ties go to the first combination in grid order (smaller
upsampling, smaller window, lower temperature, zero_outside false first), so the choice
is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product

import pandas as pd

from semcorr.pipeline.matching import match_pairs, refine
from semcorr.pipeline.pose import PoseChoice
from semcorr.pipeline.pck import evaluate_predictions

default_conf = {
    "upsample": [1, 2, 3],  # bilinear upsampling factors of the target map
    "window": [0, 1, 2, 3],  # soft-argmax radii in cells of the matched map; 0 = argmax
    "temperature": [0.02, 0.05, 0.1],  # soft-argmax temperatures
    "zero_outside": [False],  # also try GeoAware-SC's zero-outside rule with [False, True]
    "alpha": 0.1,  # settings are chosen by val PCK@alpha per image
}
GRID_COLUMNS = ["upsample", "window", "temperature", "zero_outside", "val_pck", "val_pairs"]


def grid(conf: dict) -> list[dict]:
    """Every setting of the grid, in tie-breaking order; window 0 once per upsampling."""
    settings = []
    for upsample, window in product(sorted(conf["upsample"]), sorted(conf["window"])):
        if window == 0:
            settings.append({"upsample": upsample, "window": 0, "temperature": None, "zero_outside": False})
            continue
        for temperature, zero_outside in product(sorted(conf["temperature"]), sorted(conf["zero_outside"])):
            settings.append({"upsample": upsample, "window": window, "temperature": float(temperature),
                             "zero_outside": bool(zero_outside)})
    return settings


def predict(store, pairs: pd.DataFrame, setting: dict, mutual: bool = False, log=lambda m: None,
            pose_align: str = "none", images: pd.DataFrame | None = None) -> tuple[pd.DataFrame, PoseChoice | None]:
    """(predictions of ``pairs`` under one grid ``setting`` (window 0: argmax), the pose choice
    with ``pose_align: flip``, else None); ``images``: masks for the pose alignment."""
    matches = match_pairs(store, pairs, {"upsample": setting["upsample"], "mutual": mutual,
                                         "max_window": setting["window"], "pose_align": pose_align},
                          log=log, images=images)
    if setting["window"] == 0:
        return matches.table, matches.pose
    return refine(matches, {"window": setting["window"], "temperature": setting["temperature"],
                            "zero_outside": setting["zero_outside"]}), matches.pose


def grid_search(store, val_pairs: pd.DataFrame, conf: dict | None = None,
                log: Callable[[str], None] = lambda message: None) -> tuple[pd.DataFrame, dict]:
    """(one row per setting with its val PCK, the chosen setting) for ``val_pairs``."""
    conf = {**default_conf, **(conf or {})}
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise ValueError(f"unknown tuning settings {sorted(unknown)}; known: {sorted(default_conf)}")
    if val_pairs.empty:
        raise ValueError("no val pairs to choose matching settings on")
    alpha = float(conf["alpha"])
    settings = grid(conf)
    rows = []
    for upsample in sorted(conf["upsample"]):
        ours = [s for s in settings if s["upsample"] == upsample]
        matches = match_pairs(store, val_pairs, {"upsample": upsample, "max_window": max(s["window"] for s in ours)})
        for setting in ours:
            table = matches.table if setting["window"] == 0 else refine(matches, {
                "window": setting["window"], "temperature": setting["temperature"],
                "zero_outside": setting["zero_outside"]})
            overall, _ = evaluate_predictions(val_pairs, table, [alpha])
            rows.append({**setting, "val_pck": overall.image[alpha], "val_pairs": overall.n_pairs})
        log(f"tune: upsample {upsample}: best val PCK@{alpha:g} "
            f"{max(r['val_pck'] for r in rows if r['upsample'] == upsample):.4f} over {len(ours)} settings")
    table = pd.DataFrame(rows, columns=GRID_COLUMNS)
    best = table["val_pck"].fillna(-1).to_numpy().argmax()  # the first of the best: grid order breaks ties
    chosen = {k: _plain(table.iloc[best][k]) for k in ("upsample", "window", "temperature", "zero_outside", "val_pck")}
    return table, chosen


def _plain(value):
    """numpy scalars and NaN -> JSON-friendly Python values."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value
