"""Stage `report`: every ``data/eval/*/*/*/metrics.json`` -> ``results/`` (summary.md,
summary.csv, metrics.json) and, optionally, pictures of predictions (``results/pictures/``).

Pictures are the one place that reads images (the image table has their paths); with
``report.max_pair_pictures`` and ``report.pictures_per_category`` at 0 no image is read
and no plotting library is imported. `visualize_command` draws one pair.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from semcorr.pipeline.io import atomic_path, write_json
from semcorr.pipeline.report import base_variant, summary_markdown, summary_metrics, summary_table
from semcorr.pipeline.tables import TableError, keypoints, read_images, read_pairs
from semcorr.stages.match import predictions_dir
from semcorr.stages.params import DEFAULT_PARAMS, load_params, section

console = Console(stderr=True)
PICTURE_ALPHA = 0.1  # correct (green) within 0.1 * pck_norm


def main(
    data_root: Path = Path("data"),
    results: Path = Path("results"),
    pictures_per_category: int = 4,
    max_pair_pictures: int = 20,
) -> Path:
    """Write the summary of every evaluation under ``<data_root>/eval``; returns ``results``."""
    data_root, results = Path(data_root), Path(results)
    table = summary_table(data_root / "eval")
    if table.empty:
        raise FileNotFoundError(f"{data_root / 'eval'}: no evaluations (*/*/*/metrics.json); run `semcorr evaluate` first")
    results.mkdir(parents=True, exist_ok=True)
    with atomic_path(results / "summary.md") as tmp:
        tmp.write_text(summary_markdown(table))
    with atomic_path(results / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(results / "metrics.json", summary_metrics(table))
    collect_text_reports(data_root / "eval", results / "reports")
    if max_pair_pictures > 0 or pictures_per_category > 0:
        draw_pictures(table, data_root, results / "pictures", pictures_per_category, max_pair_pictures)
    (results / "pictures").mkdir(exist_ok=True)
    print_table(table)
    return results


def collect_text_reports(eval_root: Path, out: Path) -> Path:
    """Every evaluation's phase reports, gathered as ``<out>/<variant>/<dataset>/phase*_report.txt``."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for report in sorted(eval_root.glob("*/*/*/reports/*.txt")):
            variant, dataset = report.parts[-5], report.parts[-4]
            (tmp / variant / dataset).mkdir(parents=True, exist_ok=True)
            shutil.copy2(report, tmp / variant / dataset / report.name)
    return out


def print_table(table: pd.DataFrame) -> None:
    view = Table(title="semcorr summary (PCK %)")
    for column in table.columns:
        view.add_column(column, justify="right" if column.startswith(("pck", "n_")) else "left")
    for row in table.itertuples(index=False):
        view.add_row(*("n/a" if pd.isna(v) else f"{100 * v:.2f}" if c.startswith("pck") else str(v)
                       for v, c in zip(row, table.columns)))
    Console().print(view)


# -- pictures ---------------------------------------------------------------------------


class _Evaluation:
    """Pairs, images and predictions of one evaluated (variant, dataset, method)."""

    def __init__(self, data_root: Path, variant: str, dataset: str, method: str):
        metrics = json.loads((data_root / "eval" / variant / dataset / method / "metrics.json").read_text())
        self.variant, self.dataset, self.method = variant, dataset, method
        self.pairs = read_pairs(data_root / "prepared" / dataset, metrics.get("split", "test")).set_index("pair_id", drop=False)
        self.images = read_images(data_root / "prepared" / dataset).set_index("image_id")
        pred_path = predictions_dir(data_root, variant, dataset) / f"{method}.parquet"
        table = pd.read_parquet(pred_path).sort_values(["pair_id", "kp_index"])
        self.pred = {pid: rows[["x", "y"]].to_numpy(np.float64) for pid, rows in table.groupby("pair_id", sort=False)}

    def pair(self, pair_id: str) -> pd.Series:
        if pair_id not in self.pairs.index:
            raise KeyError(f"no pair {pair_id!r} in the {self.dataset} pair table")
        return self.pairs.loc[pair_id]


def draw_pictures(table: pd.DataFrame, data_root: Path, out_root: Path, per_category: int, max_pairs: int) -> None:
    """Pair pictures (baseline and tuned side by side when both were evaluated) and category grids."""
    from semcorr.pipeline import visualize

    evaluated = {(r.variant, r.dataset, r.method) for r in table.itertuples(index=False)}
    for variant, dataset, method in sorted(evaluated):
        runs = [_Evaluation(data_root, variant, dataset, method)]
        base = base_variant(variant)
        if base and (base, dataset, method) in evaluated:
            runs.insert(0, _Evaluation(data_root, base, dataset, method))
        out = out_root / variant / dataset / method
        main_run = runs[-1]
        for pair_id in main_run.pairs["pair_id"].iloc[:max_pairs]:
            visualize.save(_pair_picture(visualize, runs, pair_id), out / f"pair_{_safe(pair_id)}.png")
        if per_category > 0:
            for category, members in main_run.pairs.groupby("category"):
                rows = [_grid_row(visualize, main_run, pid) for pid in members["pair_id"].iloc[:per_category]]
                fig = visualize.grid_figure(rows, PICTURE_ALPHA, f"{variant} / {dataset} / {method}: {category}")
                visualize.save(fig, out / f"category_{_safe(category)}.png")


def _pair_picture(visualize, runs: list[_Evaluation], pair_id: str):
    ref = runs[-1]
    row = ref.pair(pair_id)
    source = visualize.read_image(Path(ref.images.loc[row.source_id, "path"]))
    target = visualize.read_image(Path(ref.images.loc[row.target_id, "path"]))
    predictions = {run.variant: run.pred[pair_id] for run in runs}
    title = f"{ref.dataset} / {ref.method} / pair {pair_id} ({row.category}); green: within {PICTURE_ALPHA:g} x {row.norm_kind} norm"
    return visualize.pair_figure(
        source, target, keypoints(row.source_kps), keypoints(row.target_kps), predictions,
        np.asarray(row.visible, dtype=bool), PICTURE_ALPHA * float(row.pck_norm), title,
    )


def _grid_row(visualize, run: _Evaluation, pair_id: str) -> dict:
    row = run.pair(pair_id)
    return {
        "source": visualize.read_image(Path(run.images.loc[row.source_id, "path"])),
        "target": visualize.read_image(Path(run.images.loc[row.target_id, "path"])),
        "src_xy": keypoints(row.source_kps), "gt_xy": keypoints(row.target_kps), "pred_xy": run.pred[pair_id],
        "visible": np.asarray(row.visible, dtype=bool), "pck_norm": float(row.pck_norm), "name": str(pair_id),
    }


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", str(name))


def visualize(pair_id: str, variant: str, dataset: str, method: str, data_root: Path = Path("data"),
              out_root: Path = Path("results/pictures")) -> Path:
    """Draw one evaluated pair (with the baseline beside a tuned variant when evaluated); returns the PNG."""
    from semcorr.pipeline import visualize as vis

    data_root = Path(data_root)
    runs = []
    base = base_variant(variant)
    if base and (data_root / "eval" / base / dataset / method / "metrics.json").is_file():
        runs.append(_Evaluation(data_root, base, dataset, method))
    runs.append(_Evaluation(data_root, variant, dataset, method))
    return vis.save(_pair_picture(vis, runs, pair_id), Path(out_root) / variant / dataset / method / f"pair_{_safe(pair_id)}.png")


def command(params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS) -> None:
    """Summary table over every evaluation, and pictures."""
    try:
        p = load_params(params)
        main(pictures_per_category=int(section(p, "report", "pictures_per_category")),
             max_pair_pictures=int(section(p, "report", "max_pair_pictures")))
    except (TableError, KeyError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


def visualize_command(
    pair: Annotated[str, typer.Option(help="pair_id to draw")],
    variant: Annotated[str | None, typer.Option(help="feature variant (default: first of `backbones`)")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset (default: first of `datasets`)")] = None,
    method: Annotated[str | None, typer.Option(help="method (default: first of `methods`)")] = None,
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Draw one pair: source, ground truth against prediction (green correct, red wrong)."""
    try:
        p = load_params(params)
        out = visualize(pair, variant or section(p, "backbones")[0], dataset or section(p, "datasets")[0],
                        method or section(p, "methods")[0])
    except (TableError, KeyError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")
