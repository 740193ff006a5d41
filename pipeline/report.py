"""Evaluation outputs: the study's phase numbering, metrics dicts, text reports and the summary table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from semcorr.pipeline.pck import PCK
from semcorr.pipeline.tables import NORM_KINDS

TUNED_VARIANT = re.compile(r"^(?P<base>.+)_ft(?P<depth>\d+)$")
SUMMARY_ALPHAS = (0.05, 0.1, 0.15)
PHASES = {
    1: "baseline backbone, argmax",
    2: "fine-tuned backbone, argmax",
    3: "soft-argmax (any backbone)",
    4: "fine-tuned on another dataset than evaluated",
}


def base_variant(variant: str) -> str | None:
    """``dinov2_vitb14_ft2`` -> ``dinov2_vitb14``; None for an untuned variant."""
    found = TUNED_VARIANT.match(variant)
    return found["base"] if found else None


def phase(method: str, train_dataset: str | None, dataset: str) -> int:
    """The study's phase of an evaluation.

    ``train_dataset``: the dataset the weights were fine-tuned on, None for baseline weights.
    Cross-dataset evaluation of tuned weights is phase 4 whatever the method (it is the
    generalisation study); otherwise soft-argmax is 3, tuned argmax 2, baseline argmax 1.
    """
    if train_dataset is not None and train_dataset != dataset:
        return 4
    if method == "softargmax":
        return 3
    return 2 if train_dataset is not None else 1


def metric_key(kind: str, alpha: float) -> str:
    """``pck_img@0.1`` (per image) or ``pck_pt@0.1`` (per point): the keys of metrics.json."""
    return f"pck_{'img' if kind == 'image' else 'pt'}@{alpha:g}"


def metrics_dict(overall: PCK, extra: dict | None = None) -> dict:
    """``metrics.json`` of one evaluation: numbers only (for ``dvc metrics`` / ``exp show``);
    the setting they were measured under goes to the evaluation's ``setting.json``."""
    out = {metric_key("image", a): _number(v) for a, v in overall.image.items()}
    out.update({metric_key("point", a): _number(v) for a, v in overall.point.items()})
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


def text_report(kind: str, setting: dict, overall: PCK, per_category: dict[str, PCK]) -> str:
    """The study's text report, ``kind`` ``image`` (PCK per image) or ``kpt`` (per point)."""
    per_image = kind == "image"
    alphas = list(overall.image)
    norm = setting.get("norm_kind", "?")
    lines = [
        f"semcorr PCK report: phase {setting['phase']} ({PHASES[setting['phase']]})",
        f"PCK {'per image (mean over pairs of the fraction of correct visible keypoints)' if per_image else 'per point (all visible keypoints pooled)'}",
        f"dataset: {setting['dataset']} (split {setting.get('split', '?')})",
        f"backbone/variant: {setting.get('backbone', '?')} / {setting['variant']}"
        + ("   [RANDOM-INIT WEIGHTS: not a trained model]" if setting.get("random_init") else ""),
        f"trained on: {setting['train_dataset']}" if setting.get("train_dataset") else "weights: baseline (not fine-tuned)",
        f"method: {setting['method']}   match params: {json.dumps(setting.get('match', {}), sort_keys=True)}",
        f"normaliser: {norm} ({_norm_words(norm)}); correct if distance <= alpha * normaliser",
        f"alphas: {', '.join(f'{a:g}' for a in alphas)}",
        f"pairs: {overall.n_pairs} counted"
        + (f", {overall.n_pairs_no_visible} left out for having no visible keypoint" if per_image else "")
        + f"; visible points: {overall.n_points}",
    ]
    if setting.get("mutual_reliable") is not None:
        lines.append(f"mutual nearest neighbours: {100 * setting['mutual_reliable']:.2f}% of the visible keypoints' "
                     "matches are mutual (`reliable`); PCK counts every match")
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
    return "\n".join(lines) + "\n"


def report_name(phase_number: int, method: str, kind: str) -> str:
    """``phase{X}_{method}_{image|kpt}_report.txt``."""
    return f"phase{phase_number}_{method}_{kind}_report.txt"


def summary_table(eval_dirs: list[Path]) -> pd.DataFrame:
    """One row per evaluation folder (``metrics.json`` + ``setting.json``), PCK as fractions."""
    rows = []
    for folder in eval_dirs:
        m = json.loads((Path(folder) / "metrics.json").read_text())
        s = json.loads((Path(folder) / "setting.json").read_text())
        row = {"variant": s["variant"], "phase": s["phase"], "dataset": s["dataset"], "method": s["method"]}
        for kind in ("image", "point"):
            for alpha in SUMMARY_ALPHAS:
                row[metric_key(kind, alpha)] = m.get(metric_key(kind, alpha))
        row.update(n_pairs=m["n_pairs"], n_points=m["n_points"], normaliser=s.get("norm_kind"),
                   random_init=bool(s.get("random_init")))
        rows.append(row)
    columns = ["variant", "phase", "dataset", "method",
               *[metric_key(k, a) for k in ("image", "point") for a in SUMMARY_ALPHAS],
               "n_pairs", "n_points", "normaliser", "random_init"]
    return pd.DataFrame(rows, columns=columns).sort_values(["phase", "dataset", "variant", "method"], ignore_index=True)


def summary_markdown(table: pd.DataFrame) -> str:
    """GitHub markdown of the summary table, PCK in percent."""
    header = "| " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, name) for v, name in zip(row, table.columns)) + " |")
    note = ("PCK in percent, original target pixels: a keypoint is correct when its distance to the ground truth is "
            "<= alpha x the normaliser (column `normaliser`: " + "; ".join(f"{k} = {v}" for k, v in NORM_KINDS.items())
            + "). `pck_img` = per image (mean over pairs with a visible keypoint), `pck_pt` = per point (visible "
            "keypoints pooled); `n_pairs`, `n_points` count them. `random_init` True: the weights are not a "
            "trained model.")
    return "\n".join(["# semcorr summary", "", note, "", *lines]) + "\n"


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


def _cell(value, column: str) -> str:
    if column.startswith("pck_"):
        return "n/a" if value is None or pd.isna(value) else f"{100 * value:.2f}"
    return str(value)


def _norm_words(norm_kind: str) -> str:
    kinds = [k.strip() for k in str(norm_kind).split(",")]
    return "; ".join(NORM_KINDS.get(k, k) for k in kinds)
