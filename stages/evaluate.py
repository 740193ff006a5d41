"""Stage `evaluate`: ``data/predictions/<V>/<D>/<method>/`` + the pair table ->
``data/eval/<V>/<D>/<method>/``, written as one unit::

    metrics.json       numbers only: pck_img@<alpha>, pck_pt@<alpha>, counts (dvc metrics, exp show)
    setting.json       what they were measured under: protocol, match params, store attrs, phase
    per_category.csv   PCK per category and alpha
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
         data_root: Path = DATA) -> Path:
    """PCK of one predictions folder; returns the evaluation folder. ``match_conf``: params
    ``match`` (the sections the method reads are checked against the recorded ones)."""
    import pandas as pd

    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.pck import evaluate_predictions
    from semcorr.pipeline.report import metrics_dict, per_category_table, phase, report_name, text_report
    from semcorr.pipeline.tables import TableError, read_pairs
    from semcorr.pipeline.weights import sha256_file
    from semcorr.stages.match import predictions_dir, read_setting

    data_root = Path(data_root)
    prepared = data_root / "prepared" / dataset
    pairs = read_pairs(prepared, split)
    expect = {"split": split, "pairs_sha256": sha256_file(prepared / "pairs.parquet")}
    if match_conf is not None:
        sections = ("argmax",) if method == "argmax" else ("argmax", method)
        expect["match"] = {name: dict(match_conf[name]) for name in sections}
    folder = predictions_dir(data_root, variant, dataset, method)
    setting = read_setting(folder, expect)
    predictions = pd.read_parquet(folder / "predictions.parquet")
    try:
        overall, per_category = evaluate_predictions(pairs, predictions, alphas)
    except KeyError as exc:
        raise TableError(f"{folder}: {exc.args[0]} (predictions made for another pair table or split?)") from None
    setting.pop("files", None)
    setting.update(
        alphas=[float(a) for a in alphas],
        norm_kind=",".join(sorted(pairs["norm_kind"].unique())),
        phase=phase(method, setting.get("train_dataset"), dataset),
    )
    extra = {}
    if setting["match"]["argmax"].get("mutual"):
        visible = predictions["visible"].to_numpy(bool)
        reliable = predictions["reliable"].to_numpy(bool)[visible]
        setting["mutual_reliable"] = extra["mutual_reliable"] = float(reliable.mean()) if visible.any() else None
    out = eval_dir(data_root, variant, dataset, method)
    with staged(out, work_root(data_root)) as tmp:
        (tmp / "reports").mkdir(parents=True)
        write_json(tmp / "metrics.json", metrics_dict(overall, extra))
        write_json(tmp / "setting.json", setting)
        per_category_table(overall, per_category).to_csv(tmp / "per_category.csv", index=False)
        for kind in ("image", "kpt"):
            (tmp / "reports" / report_name(setting["phase"], method, kind)).write_text(
                text_report(kind, setting, overall, per_category))
    console.print(f"evaluate {variant}/{dataset}/{method}: PCK@0.1 per image "
                  f"{_percent(overall.image.get(0.1))} over {overall.n_pairs} pairs; wrote {out}")
    return out


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
        main(dataset, variant, method, p.evaluate.alphas, p.evaluate.split, p.match.model_dump())
