"""Evaluation outputs: the study's phase numbering, metrics dicts, text reports and chart tables
(the summary itself: `pipeline.summary`)."""

from __future__ import annotations

import json
import re

import pandas as pd

from semcorr.pipeline.pck import PCK
from semcorr.pipeline.tables import NORM_KINDS

TUNED_VARIANT = re.compile(r"^(?P<base>.+)_(?P<mode>ft|lora)(?P<n>\d+)$")  # blocks: _ft<depth>; LoRA: _lora<rank>
HEAD_VARIANT = re.compile(r"^(?P<base>.+)_head$")  # a post-processor on the backbone's cached features
PHASES = {
    1: "baseline argmax",
    2: "fine-tuned argmax",
    3: "refined matching (soft-argmax, val-tuned)",
    4: "cross-dataset (fine-tuned on another dataset)",
}


def base_variant(variant: str) -> str | None:
    """``dinov2_vitb14_ft2`` (blocks) or ``dinov2_vitb14_lora4`` (LoRA) -> ``dinov2_vitb14``; None if untuned."""
    found = TUNED_VARIANT.match(variant)
    return found["base"] if found else None


def head_base(variant: str) -> str | None:
    """``dinov2_vitb14_head`` -> ``dinov2_vitb14``; None if not a head variant."""
    found = HEAD_VARIANT.match(variant)
    return found["base"] if found else None


def phase(method: str, train_dataset: str | None, dataset: str) -> int:
    """The study's phase of an evaluation.

    ``train_dataset``: the dataset the weights were fine-tuned on, None for baseline weights.
    Cross-dataset evaluation of tuned weights is phase 4 whatever the method (it is the
    generalisation study); otherwise refined matching (soft-argmax, val-tuned) is 3, tuned
    argmax 2, baseline argmax 1.
    """
    if train_dataset is not None and train_dataset != dataset:
        return 4
    if method != "argmax":
        return 3
    return 2 if train_dataset is not None else 1


def weights_label(setting: dict) -> str:
    """What the weights are, in words: pretrained, weight-free, random-init, or fine-tuned."""
    trained_on = setting.get("train_dataset")
    if trained_on and setting.get("tuned_depth") == "head":
        base = "random-init base" if setting.get("random_init") else (
            "weight-free base" if setting.get("family") == "daisy" else "pretrained base")
        return f"{base} + head trained on {trained_on}"
    if trained_on:
        return f"random-init base, fine-tuned on {trained_on}" if setting.get("random_init") else f"fine-tuned on {trained_on}"
    if setting.get("random_init"):
        return "random-init (not a trained model)"
    return "weight-free" if setting.get("family") == "daisy" else "pretrained"


def pose_lines(setting: dict) -> list[str]:
    """The report's line on pose alignment (`pipeline.pose`), if the predictions used it."""
    pose = setting.get("pose")
    if not pose:
        return []
    where = ("the dataset's object masks" if pose["foreground"] == "mask"
             else "the whole image (the dataset has no masks)")
    return [f"pose alignment: {pose['align']}: source mirrored in {pose['flipped_pairs']} of {pose['pairs']} pairs; "
            f"distance over the foreground = {where}; mirrored keypoints: {pose['counterparts']}"]


def geo_aware_lines(setting: dict) -> list[str]:
    """The report's line on the geometry-aware subset (`pipeline.symmetry`): its PCK@0.1 and
    counts, or why the dataset does not define it."""
    geo = setting.get("geo_aware")
    if not geo:
        return []
    if not geo["defined"]:
        return [f"geometry-aware subset: not defined ({geo['reason']})"]
    img, pt = geo["pck_img"].get("0.1"), geo["pck_pt"].get("0.1")
    value = lambda v: "n/a" if v is None or v != v else f"{100 * v:.2f}"  # noqa: E731
    return [f"geometry-aware subset (GeoAware-SC): {geo['n_points']} of {geo['n_points_visible']} visible keypoints "
            f"in {geo['n_pairs']} pairs; PCK@0.1 per image {value(img)}, per point {value(pt)}"]


def metric_key(kind: str, alpha: float) -> str:
    """``pck_img@0.1`` (per image) or ``pck_pt@0.1`` (per point): the keys of metrics.json."""
    return f"pck_{'img' if kind == 'image' else 'pt'}@{alpha:g}"


def metrics_dict(overall: PCK, extra: dict | None = None, intervals: dict | None = None) -> dict:
    """``metrics.json`` of one evaluation: numbers only (for ``dvc metrics`` / ``exp show``);
    the setting they were measured under goes to the evaluation's ``setting.json``.
    ``intervals``: ``{"image"|"point": {alpha: (low, high)}}`` -> ``<key>_lo``, ``<key>_hi``."""
    out = {}
    for kind, values in (("image", overall.image), ("point", overall.point)):
        for alpha, value in values.items():
            key = metric_key(kind, alpha)
            out[key] = _number(value)
            if intervals is not None:
                low, high = intervals[kind][alpha]
                out[f"{key}_lo"], out[f"{key}_hi"] = _number(low), _number(high)
    out.update(n_pairs=overall.n_pairs, n_points=overall.n_points, n_pairs_no_visible=overall.n_pairs_no_visible)
    out.update({k: _number(v) for k, v in (extra or {}).items()})
    return out


def _number(value) -> float | None:
    return None if value is None or value != value else float(value)  # NaN -> null


def per_category_table(overall: PCK, per_category: dict[str, PCK]) -> pd.DataFrame:
    """Long table (category, alpha, pck_image, pck_point, n_pairs, n_points); category ``all`` last."""
    rows = []
    for category, result in [*sorted(per_category.items()), ("all", overall)]:
        for alpha in result.image:
            rows.append({
                "category": category, "alpha": alpha, "pck_image": result.image[alpha],
                "pck_point": result.point[alpha], "n_pairs": result.n_pairs, "n_points": result.n_points,
            })
    return pd.DataFrame(rows, columns=["category", "alpha", "pck_image", "pck_point", "n_pairs", "n_points"])


def text_report(kind: str, setting: dict, overall: PCK, per_category: dict[str, PCK],
                intervals: dict[float, tuple[float, float]] | None = None) -> str:
    """The study's text report, ``kind`` ``image`` (PCK per image) or ``kpt`` (per point);
    ``intervals``: alpha -> 95% bootstrap bounds of the overall PCK."""
    per_image = kind == "image"
    alphas = list(overall.image)
    norm = setting.get("norm_kind", "?")
    lines = [
        f"semcorr PCK report: phase {setting['phase']} ({PHASES[setting['phase']]})",
        f"PCK {'per image (mean over pairs of the fraction of correct visible keypoints)' if per_image else 'per point (all visible keypoints pooled)'}",
        f"dataset: {setting['dataset']} (split {setting.get('split', '?')})",
        f"backbone/variant: {setting.get('backbone', '?')} / {setting['variant']}",
        f"weights: {weights_label(setting)}" + ("   [RANDOM-INIT]" if setting.get("random_init") else ""),
        f"method: {setting['method']}   match params: {json.dumps(setting.get('match', {}), sort_keys=True)}",
        f"normaliser: {norm} ({_norm_words(norm)}); correct if distance <= alpha * normaliser",
        f"alphas: {', '.join(f'{a:g}' for a in alphas)}",
        f"pairs: {overall.n_pairs} counted"
        + (f", {overall.n_pairs_no_visible} left out for having no visible keypoint" if per_image else "")
        + f"; visible points: {overall.n_points}",
    ]
    if setting.get("tuned_on"):
        tuned = setting["tuned_on"]
        lines.append(f"settings chosen on {tuned['dataset']} {tuned['split']} ({tuned['pairs']} pairs), never on "
                     f"test: {json.dumps(setting['match'].get('chosen', {}), sort_keys=True)}")
    if setting.get("mutual_reliable") is not None:
        lines.append(f"mutual nearest neighbours: {100 * setting['mutual_reliable']:.2f}% of the visible keypoints' "
                     "matches are mutual (`reliable`); PCK counts every match")
    lines += pose_lines(setting) + geo_aware_lines(setting)
    lines += [
        "",
        f"{'category':<20}{'n_pairs':>9}{'n_points':>10}" + "".join(f"{'PCK@' + format(a, 'g'):>11}" for a in alphas),
    ]
    for category, result in [*sorted(per_category.items()), ("all", overall)]:
        values = result.image if per_image else result.point
        lines.append(
            f"{category:<20}{result.n_pairs:>9}{result.n_points:>10}"
            + "".join(f"{100 * values[a]:>11.2f}" for a in alphas)
        )
    if intervals:
        lines.append(f"{'all: 95% interval':<39}" + "".join(
            f"{f'{100 * lo:.1f}-{100 * hi:.1f}':>11}" for lo, hi in (intervals[a] for a in alphas)))
        lines.append("(percentile bootstrap over pairs, resampled within categories; "
                     f"seed {setting.get('bootstrap', {}).get('seed', '?')}, "
                     f"{setting.get('bootstrap', {}).get('resamples', '?')} resamples)")
    return "\n".join(lines) + "\n"


def report_name(phase_number: int, method: str, kind: str) -> str:
    """``phase{X}_{method}_{image|kpt}_report.txt``."""
    return f"phase{phase_number}_{method}_{kind}_report.txt"


def category_chart_table(per_category: dict[str, pd.DataFrame], alpha: float = 0.1) -> pd.DataFrame:
    """Rows ``label`` ("<category> · <variant>"), ``pck_img`` (PCK@alpha per image, percent):
    one bar per category and variant, for DVC's bar_horizontal template. ``per_category``:
    variant -> its evaluation's per_category.csv table."""
    rows = []
    for variant, table in per_category.items():
        at = table[(table["alpha"] - alpha).abs() < 1e-9]
        for category, value in zip(at["category"], at["pck_image"]):
            rows.append({"label": f"{category} · {variant}", "category": category, "variant": variant,
                         "pck_img": None if pd.isna(value) else round(100 * float(value), 4)})
    table = pd.DataFrame(rows, columns=["label", "category", "variant", "pck_img"])
    return table.sort_values(["category", "variant"], key=lambda c: c.map(lambda v: (v == "all", v)), ignore_index=True)


def _norm_words(norm_kind: str) -> str:
    kinds = [k.strip() for k in str(norm_kind).split(",")]
    return "; ".join(NORM_KINDS.get(k, k) for k in kinds)
