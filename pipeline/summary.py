"""The study's summary: every evaluation with its protocol and 95% intervals, paired
comparisons (fine-tuned against baseline, method against method), the protocol
sensitivity of the same predictions, and SPair-71k's difficulty breakdown.

Reads only evaluation folders (`stages.evaluate`): metrics.json, setting.json,
per_pair.parquet, protocols.csv, difficulty.csv.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline import bootstrap as boot
from semcorr.pipeline.report import PHASES, base_variant, head_base, metric_key, weights_label
from semcorr.pipeline.tables import NORM_KINDS

COMPARISONS = (  # (name, how to find the baseline of an evaluation)
    ("fine-tuned − baseline", lambda v, d, m: (base_variant(v), d, m) if base_variant(v) else None),
    ("head − baseline", lambda v, d, m: (head_base(v), d, m) if head_base(v) else None),
    ("soft-argmax − argmax", lambda v, d, m: (v, d, "argmax") if m == "softargmax" else None),
    ("val-tuned − fixed soft-argmax", lambda v, d, m: (v, d, "softargmax") if m == "valtuned" else None),
)
COMPARISON_COLUMNS = ["comparison", "dataset", "variant", "method", "baseline", "alpha", "pck_baseline", "pck",
                      "delta", "ci_low", "ci_high", "significant", "n_pairs"]


@dataclass
class Evaluation:
    key: tuple[str, str, str]  # (variant, dataset, method)
    metrics: dict
    setting: dict
    per_pair: pd.DataFrame
    protocols: pd.DataFrame
    difficulty: pd.DataFrame | None


def load(folder: Path) -> Evaluation:
    folder = Path(folder)
    setting = json.loads((folder / "setting.json").read_text())
    difficulty = folder / "difficulty.csv"
    return Evaluation(
        (setting["variant"], setting["dataset"], setting["method"]), json.loads((folder / "metrics.json").read_text()),
        setting, pd.read_parquet(folder / "per_pair.parquet"), pd.read_csv(folder / "protocols.csv"),
        pd.read_csv(difficulty) if difficulty.is_file() else None)


def phase_name(number: int) -> str:
    return f"{number} {PHASES[number]}"


def norm_words(norm_kind: str) -> str:
    return "; ".join(NORM_KINDS.get(k.strip(), k) for k in str(norm_kind).split(","))


def evaluations_table(evaluations: list[Evaluation]) -> pd.DataFrame:
    """One row per evaluation: setting in words, PCK per image and per point at every alpha
    with its 95% bounds (fractions), counts."""
    rows = []
    for ev in evaluations:
        s, m = ev.setting, ev.metrics
        row = {"variant": s["variant"], "dataset": s["dataset"], "method": s["method"], "phase": s["phase"],
               "phase_name": phase_name(s["phase"]), "weights": weights_label(s),
               "trained_on": s.get("train_dataset") or "", "split": s["split"],
               "normaliser": norm_words(s.get("norm_kind", "")), "n_pairs": m["n_pairs"], "n_points": m["n_points"],
               "random_init": bool(s.get("random_init")), "per_point_differs": per_point_differs(ev.per_pair),
               **_geometry_columns(s)}
        for kind in ("image", "point"):
            for alpha in s["alphas"]:
                key = metric_key(kind, alpha)
                row.update({key: m.get(key), f"{key}_lo": m.get(f"{key}_lo"), f"{key}_hi": m.get(f"{key}_hi")})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(["dataset", "phase", "variant", "method"], ignore_index=True) if rows else table


def _geometry_columns(setting: dict) -> dict:
    """Pose alignment (pairs mirrored, foreground) and the geometry-aware subset (PCK@0.1, counts,
    or why it is not defined) of one evaluation, as flat columns."""
    pose, geo = setting.get("pose") or {}, setting.get("geo_aware") or {}
    defined = bool(geo.get("defined"))
    return {"pose_align": pose.get("align", "none"), "pose_flipped_pairs": pose.get("flipped_pairs"),
            "pose_foreground": pose.get("foreground", ""),
            "geo_pck_img@0.1": geo["pck_img"].get("0.1") if defined else None,
            "geo_pck_pt@0.1": geo["pck_pt"].get("0.1") if defined else None,
            "geo_n_points": geo.get("n_points") if defined else None,
            "geo_n_pairs": geo.get("n_pairs") if defined else None,
            "geo_undefined": "" if defined else geo.get("reason", "")}


def per_point_differs(per_pair: pd.DataFrame) -> bool:
    """Per point can differ from per image only if pairs have different numbers of visible keypoints."""
    counted = per_pair.loc[per_pair["n_visible"] > 0, "n_visible"]
    return counted.nunique() > 1


def comparisons(evaluations: list[Evaluation], conf: dict, alpha: float = 0.1) -> pd.DataFrame:
    """Paired bootstrap of PCK@alpha per image differences on the same pairs: every
    evaluation against its baseline (`COMPARISONS`). ``conf``: `bootstrap.default_conf`."""
    conf = {**boot.default_conf, **conf}
    by_key = {ev.key: ev for ev in evaluations}
    column = f"hits@{float(alpha):g}"
    rows = []
    for name, baseline_of in COMPARISONS:
        for ev in evaluations:
            base_key = baseline_of(*ev.key)
            base = by_key.get(base_key) if base_key else None
            if base is None or column not in ev.per_pair or column not in base.per_pair:
                continue
            if not base.per_pair["pair_id"].equals(ev.per_pair["pair_id"]):
                raise ValueError(f"{ev.key} and {base_key} were evaluated on different pairs; cannot pair them")
            rows.append({"comparison": name, "dataset": ev.key[1], "variant": ev.key[0], "method": ev.key[2],
                         "baseline": "/".join(base_key), "alpha": alpha,
                         **_paired(base.per_pair, column, ev.per_pair, column, conf)})
    unaligned = f"hits_unaligned@{float(alpha):g}"  # pose alignment against none, on the same predictions' pairs
    for ev in evaluations:
        if unaligned in ev.per_pair and column in ev.per_pair:
            rows.append({"comparison": "pose-aligned − unaligned", "dataset": ev.key[1], "variant": ev.key[0],
                         "method": ev.key[2], "baseline": "/".join(ev.key) + " without pose alignment",
                         "alpha": alpha, **_paired(ev.per_pair, unaligned, ev.per_pair, column, conf)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _paired(a: pd.DataFrame, a_column: str, b: pd.DataFrame, b_column: str, conf: dict) -> dict:
    """PCK per image of column ``b_column`` of ``b`` against ``a_column`` of ``a`` (the same
    pairs), with the paired bootstrap interval of the difference."""
    weights = boot.resample_counts(a["category"].to_numpy(), int(conf["resamples"]), int(conf["seed"]))
    stats = {}
    for label, table, column in (("a", a, a_column), ("b", b, b_column)):
        args = (table[[column]].to_numpy(), table["n_visible"].to_numpy(), table["category"].to_numpy())
        stats[label] = (boot.pck_statistic("image", *args, boot.point_weights(len(table)))[0, 0],
                        boot.pck_statistic("image", *args, weights)[:, 0])
    low, high = boot.interval((stats["b"][1] - stats["a"][1])[:, None], float(conf["confidence"]))
    return {"pck_baseline": stats["a"][0], "pck": stats["b"][0], "delta": stats["b"][0] - stats["a"][0],
            "ci_low": low[0], "ci_high": high[0], "significant": bool(low[0] > 0 or high[0] < 0),
            "n_pairs": int((a["n_visible"] > 0).sum())}


def protocol_table(evaluations: list[Evaluation], alpha: float = 0.1) -> pd.DataFrame:
    """The same predictions under each protocol preset at ``alpha``: one row per evaluation,
    one column per protocol (NaN where a protocol is not defined for the dataset)."""
    rows = []
    for ev in evaluations:
        at = ev.protocols[(ev.protocols["alpha"] - alpha).abs() < 1e-9]
        rows.append({"variant": ev.key[0], "dataset": ev.key[1], "method": ev.key[2],
                     **{r.protocol: (r.pck if r.defined else np.nan) for r in at.itertuples()}})
    return pd.DataFrame(rows)


def difficulty_table(evaluations: list[Evaluation], alpha: float = 0.1) -> pd.DataFrame:
    frames = []
    for ev in evaluations:
        if ev.difficulty is not None:
            at = ev.difficulty[(ev.difficulty["alpha"] - alpha).abs() < 1e-9]
            frames.append(at.assign(variant=ev.key[0], dataset=ev.key[1], method=ev.key[2]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# -- markdown -----------------------------------------------------------------------------


def markdown(table: pd.DataFrame, compared: pd.DataFrame, protocols: pd.DataFrame, difficulty: pd.DataFrame) -> str:
    """The summary a researcher reads without the README: per dataset, every evaluation with
    its protocol, the paired comparisons, the protocol sensitivity and the difficulty breakdown."""
    lines = ["# semcorr summary", "", _legend(table), ""]
    for dataset, rows in table.groupby("dataset", sort=True):
        first = rows.iloc[0]
        alphas = sorted({float(c.split("@")[1]) for c in rows.columns
                         if c.startswith("pck_img@") and not c.endswith(("_lo", "_hi"))})
        lines += [f"## {dataset}", "",
                  f"{first['split']} split, {first['n_pairs']} pairs, {first['n_points']} visible keypoints; "
                  f"normaliser: {first['normaliser']}; a keypoint is correct when its distance to the ground truth "
                  "is <= alpha x the normaliser, in original target pixels. PCK per image in percent "
                  "[95% bootstrap interval].", ""]
        per_point = bool(rows["per_point_differs"].any())
        header = ["phase", "variant", "weights", "trained on", "method", *[f"@{a:g}" for a in alphas]]
        header += ["per point @0.1"] if per_point else []
        lines += [_row(header), _row(["---"] * len(header))]
        for r in rows.to_dict("records"):
            cells = [r["phase_name"], r["variant"], r["weights"], r["trained_on"] or "—", r["method"]]
            cells += [_pct(r.get(f"pck_img@{a:g}"), r.get(f"pck_img@{a:g}_lo"), r.get(f"pck_img@{a:g}_hi"))
                      for a in alphas]
            if per_point:
                cells.append(_pct(r.get("pck_pt@0.1"), r.get("pck_pt@0.1_lo"), r.get("pck_pt@0.1_hi")))
            lines.append(_row(cells))
        if not per_point:
            lines += ["", "Per point equals per image here (every pair has the same number of visible keypoints): "
                          "not repeated."]
        lines += _geometry_lines(rows)
        lines += _comparison_lines(compared[compared["dataset"] == dataset] if len(compared) else compared)
        lines += _protocol_lines(protocols[protocols["dataset"] == dataset] if len(protocols) else protocols)
        lines += _difficulty_lines(difficulty[difficulty["dataset"] == dataset] if len(difficulty) else difficulty)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _legend(table: pd.DataFrame) -> str:
    phases = "; ".join(phase_name(n) for n in sorted(PHASES))
    return ("Phases: " + phases + ". PCK per image = mean over pairs with a visible keypoint of the fraction of "
            "correct visible keypoints; per point = visible keypoints pooled. Intervals: 95% percentile bootstrap "
            "over pairs, resampled within categories (seeded: the same resamples for every row of a dataset, so "
            "differences are paired). Δ marked * when its interval excludes 0. `weights`: whether the backbone is "
            "pretrained, weight-free, or random-init (not a trained model).")


def _geometry_lines(rows: pd.DataFrame) -> list[str]:
    """Pose alignment (where used) and the geometry-aware subset of one dataset's evaluations."""
    lines = []
    posed = rows[rows["pose_align"] != "none"] if "pose_align" in rows else rows.iloc[:0]
    if len(posed):
        lines += ["", "Pose alignment (GeoAware-SC: each pair matched from the original or the mirrored source, "
                      "whichever is closer by the instance-matching distance over the source's foreground):", "",
                  _row(["variant", "method", "setting", "mirrored pairs", "foreground"]), _row(["---"] * 5)]
        for r in posed.to_dict("records"):
            where = "object masks" if r["pose_foreground"] == "mask" else "whole image (no masks)"
            lines.append(_row([r["variant"], r["method"], r["pose_align"],
                               f"{int(r['pose_flipped_pairs'])} of {r['n_pairs']}", where]))
    undefined = rows["geo_undefined"].iloc[0] if "geo_undefined" in rows and len(rows) else ""
    if undefined:
        return lines + ["", f"Geometry-aware subset (GeoAware-SC): not defined for this dataset ({undefined})."]
    if "geo_pck_img@0.1" not in rows:
        return lines
    lines += ["", "Geometry-aware subset (GeoAware-SC: keypoints whose left/right counterpart group has two members "
                  "visible in the target; PCK@0.1, percent):", "",
              _row(["variant", "method", "full set per image", "subset per image", "subset per point",
                    "subset points", "subset pairs"]), _row(["---"] * 7)]
    for r in rows.to_dict("records"):
        lines.append(_row([r["variant"], r["method"], _pct(r.get("pck_img@0.1")), _pct(r["geo_pck_img@0.1"]),
                           _pct(r["geo_pck_pt@0.1"]), _count(r["geo_n_points"]), _count(r["geo_n_pairs"])]))
    return lines


def _count(value) -> str:
    return "n/a" if value is None or pd.isna(value) else str(int(value))


def _comparison_lines(rows: pd.DataFrame) -> list[str]:
    if rows.empty:
        return []
    lines = ["", "Paired comparisons (PCK@0.1 per image, percent; Δ = row − baseline):", "",
             _row(["comparison", "variant", "method", "baseline", "PCK baseline", "PCK", "Δ", "95% interval of Δ"]),
             _row(["---"] * 8)]
    for r in rows.itertuples(index=False):
        mark = " *" if r.significant else ""
        lines.append(_row([r.comparison, r.variant, r.method, r.baseline, _pct(r.pck_baseline), _pct(r.pck),
                           f"{100 * r.delta:+.2f}{mark}", f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]"]))
    return lines


def _protocol_lines(rows: pd.DataFrame) -> list[str]:
    if rows.empty:
        return []
    names = [c for c in rows.columns if c not in ("variant", "dataset", "method")]
    lines = ["", "Protocol sensitivity: the same predictions under each preset (PCK@0.1, percent; n/a: the preset "
                 "needs what this dataset lacks, e.g. bounding boxes):", "",
             _row(["variant", "method", *names]), _row(["---"] * (2 + len(names)))]
    for r in rows.to_dict("records"):
        lines.append(_row([r["variant"], r["method"], *[_pct(r[n]) for n in names]]))
    return lines


def _difficulty_lines(rows: pd.DataFrame) -> list[str]:
    if rows.empty:
        return []
    lines = ["", "Difficulty (SPair-71k flags; PCK@0.1 per image, percent, [95% interval]):", "",
             _row(["variant", "method", "flag", "level", "PCK", "pairs"]), _row(["---"] * 6)]
    for r in rows.itertuples(index=False):
        lines.append(_row([r.variant, r.method, r.flag, str(r.level), _pct(r.pck, r.ci_low, r.ci_high),
                           str(r.n_pairs)]))
    return lines


def _pct(value, low=None, high=None) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    text = f"{100 * value:.2f}"
    if low is not None and high is not None and not (pd.isna(low) or pd.isna(high)):
        text += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return text


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
