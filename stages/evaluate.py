"""Stage `evaluate`: ``data/predictions/<V>/<D>/<method>.parquet`` + the pair table ->
``data/eval/<V>/<D>/<method>/`` (metrics.json, per_category.csv, reports/phase{X}_<method>_{image,kpt}_report.txt).

Reads only tables: never an image, a feature or a backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console

from semcorr.pipeline.io import atomic_path, write_json
from semcorr.pipeline.pck import DEFAULT_ALPHAS, evaluate_predictions
from semcorr.pipeline.report import metrics_dict, per_category_table, phase, report_name, text_report
from semcorr.pipeline.tables import TableError, read_pairs
from semcorr.stages.match import predictions_dir
from semcorr.stages.params import DEFAULT_PARAMS, load_params, section

console = Console(stderr=True)


def eval_dir(data_root: Path, variant: str, dataset: str, method: str) -> Path:
    return Path(data_root) / "eval" / variant / dataset / method


def main(
    dataset: str, variant: str, method: str, alphas=DEFAULT_ALPHAS, split: str = "test", data_root: Path = Path("data")
) -> Path:
    """PCK of one predictions table; returns the output folder."""
    data_root = Path(data_root)
    pred_path = predictions_dir(data_root, variant, dataset) / f"{method}.parquet"
    setting_path = pred_path.with_suffix(".json")
    for path in (pred_path, setting_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run `semcorr match --dataset {dataset} --variant {variant} --method {method}` first")
    setting = json.loads(setting_path.read_text())
    pairs = read_pairs(data_root / "prepared" / dataset, split)
    predictions = pd.read_parquet(pred_path)
    try:
        overall, per_category = evaluate_predictions(pairs, predictions, alphas)
    except KeyError as exc:
        raise TableError(f"{pred_path}: {exc.args[0]} (predictions made for another pair table or split?)") from None
    setting.update(
        split=split,
        norm_kind=",".join(sorted(pairs["norm_kind"].unique())),
        phase=phase(method, setting.get("train_dataset"), dataset),
    )
    if setting.get("match", {}).get("mutual"):
        visible = predictions["visible"].to_numpy(bool)
        setting["mutual_reliable"] = float(predictions["reliable"].to_numpy(bool)[visible].mean()) if visible.any() else None
    out = eval_dir(data_root, variant, dataset, method)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "metrics.json", metrics_dict(setting, overall))
        per_category_table(overall, per_category).to_csv(tmp / "per_category.csv", index=False)
        (tmp / "reports").mkdir()
        for kind in ("image", "kpt"):
            (tmp / "reports" / report_name(setting["phase"], method, kind)).write_text(text_report(kind, setting, overall, per_category))
    return out


def command(
    dataset: Annotated[str, typer.Option(help="dataset key, e.g. spair")],
    variant: Annotated[str, typer.Option(help="feature variant: backbone key or <backbone>_ft<N>")],
    method: Annotated[str, typer.Option(help="argmax or softargmax")] = "argmax",
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """PCK per image and per point, overall and per category."""
    try:
        p = load_params(params)
        out = main(dataset, variant, method, section(p, "evaluate", "alphas"), str(section(p, "evaluate", "split")))
    except (TableError, KeyError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")
