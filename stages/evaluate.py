"""Stage `evaluate`: ``data/predictions/<V>/<D>/<method>/`` + the pair table ->
``data/eval/<V>/<D>/<method>/``, written as one unit::

    metrics.json       numbers only: pck_img@<alpha>, pck_pt@<alpha> with their 95% bootstrap
                       bounds (<key>_lo, <key>_hi), counts (dvc metrics, exp show)
    setting.json       what they were measured under: protocols, match params, store attrs, phase
    per_category.csv   PCK per category and alpha
    protocols.csv      the same predictions under each protocol preset, with bootstrap intervals
    per_pair.parquet   correct keypoints per pair: what the report's paired comparisons resample;
                       with pose alignment (argmax) also hits_unaligned@<alpha>, the same pairs without it
    geo_aware.csv      PCK on the geometry-aware subset per category and alpha, with counts (GeoAware-SC;
                       header only where the dataset does not define it: setting.json says why)
    difficulty.csv     SPair-71k only: PCK per level of each difficulty flag, with intervals
    reports/phase{X}_<method>_{image,kpt}_report.txt

Refuses predictions whose recorded settings (split, pair table, match params) differ from
params. Reads only tables: never an image, a feature or a backbone (nor torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console
from semcorr.stages.params import DEFAULT_PARAMS, load_params


def eval_dir(data_root: Path, variant: str, dataset: str, method: str) -> Path:
    return Path(data_root) / "eval" / variant / dataset / method


def main(dataset: str, variant: str, method: str, alphas, split: str = "test", match_conf: dict | None = None,
         data_root: Path = DATA, protocols=("native",), bootstrap: dict | None = None) -> Path:
    """PCK of one predictions folder; returns the evaluation folder. ``match_conf``: params
    ``match`` (the sections the method reads are checked against the recorded ones);
    ``protocols``: preset names (`pipeline.protocols.PRESETS`) scored side by side;
    ``bootstrap``: `pipeline.bootstrap.default_conf` keys."""
    import numpy as np
    import pandas as pd

    from semcorr.pipeline import bootstrap as boot
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.pck import evaluate_predictions
    from semcorr.pipeline.protocols import PRESETS, evaluate_protocols, pair_image_sizes, preset, score
    from semcorr.pipeline.report import metrics_dict, per_category_table, phase, report_name, text_report
    from semcorr.pipeline.symmetry import geo_aware_pck
    from semcorr.pipeline.tables import TableError, read_images, read_pairs
    from semcorr.pipeline.weights import sha256_file
    from semcorr.stages.match import predictions_dir, read_setting

    data_root = Path(data_root)
    conf = {**boot.default_conf, **(bootstrap or {})}
    chosen = [preset(name) for name in protocols]
    prepared = data_root / "prepared" / dataset
    pairs = read_pairs(prepared, split)
    expect = {"split": split, "pairs_sha256": sha256_file(prepared / "pairs.parquet")}
    if match_conf is not None:
        sections = ("argmax",) if method == "argmax" else ("argmax", method)
        expect["match"] = {name: dict(match_conf[name]) for name in sections}
    folder = predictions_dir(data_root, variant, dataset, method)
    setting = read_setting(folder, expect)
    predictions = pd.read_parquet(folder / "predictions.parquet")
    reverse = pd.read_parquet(folder / "reverse.parquet") if (folder / "reverse.parquet").is_file() else None
    try:
        overall, per_category = evaluate_predictions(pairs, predictions, alphas)
    except KeyError as exc:
        raise TableError(f"{folder}: {exc.args[0]} (predictions made for another pair table or split?)") from None
    sizes = pair_image_sizes(pairs, read_images(prepared))
    weights = boot.resample_counts(pairs["category"].to_numpy(), int(conf["resamples"]), int(conf["seed"]))
    native = score(PRESETS["native"], pairs, predictions, sizes, alphas)
    cis = {}
    for kind, aggregation in (("image", "image"), ("point", "point")):
        low, high = boot.interval(boot.pck_statistic(aggregation, native.hits, native.n_visible, native.categories,
                                                     weights), float(conf["confidence"]))
        cis[kind] = dict(zip([float(a) for a in alphas], zip(low, high)))
    table = evaluate_protocols(chosen, pairs, predictions, sizes, alphas, weights, float(conf["confidence"]),
                               setting.get("input_size"), reverse)
    setting.pop("files", None)
    setting.update(
        alphas=[float(a) for a in alphas], protocols=[p.describe() for p in chosen], bootstrap=conf,
        norm_kind=",".join(sorted(pairs["norm_kind"].unique())),
        phase=phase(method, setting.get("train_dataset"), dataset),
    )
    extra = {}
    geo = geo_aware_pck(pairs, predictions, alphas, dataset)
    setting["geo_aware"] = geo_setting(geo)
    if geo.defined:
        for kind, values in (("img", geo.pck.image), ("pt", geo.pck.point)):
            extra.update({f"geo_pck_{kind}@{float(a):g}": float(v) for a, v in values.items() if v == v})
        extra.update(geo_n_pairs=geo.pck.n_pairs, geo_n_points=geo.pck.n_points)
    per_pair = per_pair_table(pairs, native, alphas)
    if (folder / "unaligned.parquet").is_file():  # pose alignment: the same pairs scored without it
        without = score(PRESETS["native"], pairs, pd.read_parquet(folder / "unaligned.parquet"), sizes, alphas)
        for k, alpha in enumerate(alphas):
            per_pair[f"hits_unaligned@{float(alpha):g}"] = without.hits[:, k]
    if setting["match"].get("argmax", {}).get("mutual"):
        visible = predictions["visible"].to_numpy(bool)
        reliable = predictions["reliable"].to_numpy(bool)[visible]
        setting["mutual_reliable"] = extra["mutual_reliable"] = float(reliable.mean()) if visible.any() else None
    out = eval_dir(data_root, variant, dataset, method)
    with staged(out, work_root(data_root)) as tmp:
        (tmp / "reports").mkdir(parents=True)
        write_json(tmp / "metrics.json", metrics_dict(overall, extra, cis))
        write_json(tmp / "setting.json", setting)
        per_category_table(overall, per_category).to_csv(tmp / "per_category.csv", index=False)
        table.to_csv(tmp / "protocols.csv", index=False)
        per_pair.to_parquet(tmp / "per_pair.parquet", index=False)
        geo_table = (per_category_table(geo.pck, geo.per_category) if geo.defined else
                     pd.DataFrame(columns=["category", "alpha", "pck_image", "pck_point", "n_pairs", "n_points"]))
        geo_table.to_csv(tmp / "geo_aware.csv", index=False)
        difficulty = difficulty_table(pairs, native, alphas, weights, float(conf["confidence"]))
        if not difficulty.empty:
            difficulty.to_csv(tmp / "difficulty.csv", index=False)
        for kind in ("image", "kpt"):
            (tmp / "reports" / report_name(setting["phase"], method, kind)).write_text(
                text_report(kind, setting, overall, per_category, cis["image" if kind == "image" else "point"]))
    low, high = cis["image"].get(0.1, (np.nan, np.nan))
    console.print(f"evaluate {variant}/{dataset}/{method}: PCK@0.1 per image {_percent(overall.image.get(0.1))} "
                  f"[{_percent(low)}, {_percent(high)}] over {overall.n_pairs} pairs; wrote {out}")
    return out


def geo_setting(geo) -> dict:
    """What setting.json and the reports say of the geometry-aware subset (`symmetry.geo_aware_pck`)."""
    if not geo.defined:
        return {"defined": False, "reason": geo.reason}
    return {"defined": True, "n_pairs": geo.pck.n_pairs, "n_points": geo.pck.n_points,
            "n_pairs_flagged": geo.n_pairs_flagged, "n_points_visible": geo.n_points_visible,
            "pck_img": {f"{a:g}": v if v == v else None for a, v in geo.pck.image.items()},  # None: no subset point
            "pck_pt": {f"{a:g}": v if v == v else None for a, v in geo.pck.point.items()}}


DIFFICULTY = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")  # SPair-71k's flags


def per_pair_table(pairs, scored, alphas):
    """One row per pair: pair_id, category, n_visible, hits@<alpha> (native protocol): what
    the report's paired comparisons resample."""
    import pandas as pd

    table = pd.DataFrame({"pair_id": pairs["pair_id"].to_numpy(), "category": scored.categories,
                          "n_visible": scored.n_visible.astype(int)})
    for k, alpha in enumerate(alphas):
        table[f"hits@{float(alpha):g}"] = scored.hits[:, k]
    return table


def difficulty_table(pairs, scored, alphas, weights, confidence: float):
    """PCK per image by level of each SPair difficulty flag (empty where the pair table
    has none): flag, level, alpha, pck, ci_low, ci_high, n_pairs."""
    import numpy as np
    import pandas as pd

    from semcorr.pipeline import bootstrap as boot

    rows = []
    for flag in DIFFICULTY:
        if flag not in pairs.columns or pairs[flag].isna().all():
            continue
        levels = pairs[flag].to_numpy()
        for level in sorted(pd.unique(levels[pd.notna(levels)])):
            members = np.flatnonzero(levels == level)
            args = (scored.hits[members], scored.n_visible[members], scored.categories[members])
            value = boot.pck_statistic("image", *args, boot.point_weights(len(members)))[0]
            low, high = boot.interval(boot.pck_statistic("image", *args, weights[:, members]), confidence)
            for k, alpha in enumerate(alphas):
                rows.append({"flag": flag, "level": int(level), "alpha": float(alpha), "pck": value[k],
                             "ci_low": low[k], "ci_high": high[k], "n_pairs": int((args[1] > 0).sum())})
    return pd.DataFrame(rows, columns=["flag", "level", "alpha", "pck", "ci_low", "ci_high", "n_pairs"])


def _percent(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.2f}%"


def command(
    dataset: Annotated[str, typer.Option(help="dataset key, e.g. spair")],
    variant: Annotated[str, typer.Option(help="feature variant: backbone key or <backbone>_ft<N>")],
    method: Annotated[str, typer.Option(help="argmax or softargmax")] = "argmax",
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """PCK per image and per point, overall and per category."""
    with clean_errors():
        p = load_params(params)
        p.dataset(dataset)
        p.variant(variant)
        main(dataset, variant, method, p.evaluate.alphas, p.evaluate.split, p.match.model_dump(),
             protocols=p.evaluate.protocols, bootstrap=p.evaluate.bootstrap.model_dump())
