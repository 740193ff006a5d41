"""Stage `report`: every evaluation of the study (``datasets`` x variants x ``methods``)
-> ``results/``, written as one unit::

    summary.md, summary.csv   one row per evaluation, with its protocol (normaliser, alpha, counts, random-init)
    metrics.json              PCK@0.1 per image of each evaluation, compact (numbers only; for `dvc exp show`)
    reports/<V>/<D>/          the evaluations' text reports
    plots/pck/<D>_<method>.csv  PCK@0.1 per category, one row per (category, variant): DVC bar charts
    charts/pck_<D>_<method>.png the same drawn with matplotlib (image plots)
    pictures/<V>/<D>/<method>/  pairs (ground truth against prediction, baseline beside tuned), category grids

Pictures are the one place that reads images (the image table has their paths); with
``report.max_pair_pictures`` and ``report.pictures_per_category`` at 0 no image is read.
`visualize_command` draws one pair.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, steps
from semcorr.stages.params import DEFAULT_PARAMS, load_params

PICTURE_ALPHA = 0.1  # correct (green) within 0.1 * pck_norm
RESULTS = Path("results")


def evaluations(params) -> list[tuple[str, str, str]]:
    """(variant, dataset, method) of every evaluation the study's params define."""
    variants = list(params.backbones) + [f"{k}_ft{d}" for k in params.finetune_backbones for d in params.finetune_depths]
    return [(v, d, m) for v in variants for d in params.datasets for m in params.methods]


def main(wanted: list[tuple[str, str, str]], data_root: Path = DATA, results: Path = RESULTS,
         pictures_per_category: int = 4, max_pair_pictures: int = 20) -> Path:
    """Write ``results`` from the evaluations ``wanted`` (variant, dataset, method); returns it."""
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.report import summary_markdown, summary_table
    from semcorr.stages.evaluate import eval_dir

    data_root, results = Path(data_root), Path(results)
    if not wanted:
        raise ValueError("no evaluations to report (params list no dataset, variant or method)")
    folders = [eval_dir(data_root, *key) for key in wanted]
    missing = [f for f in folders if not (f / "metrics.json").is_file() or not (f / "setting.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no evaluation ({len(missing)} of {len(folders)} missing); "
                                "run `semcorr evaluate` for it first")
    table = summary_table(folders)
    with staged(results, work_root(data_root)) as out:
        out.mkdir(parents=True)
        (out / "summary.md").write_text(summary_markdown(table))
        table.to_csv(out / "summary.csv", index=False)
        write_json(out / "metrics.json", compact_metrics(table))
        collect_text_reports(folders, out / "reports")
        _category_charts(wanted, data_root, out, draw=max_pair_pictures > 0 or pictures_per_category > 0)
        (out / "pictures").mkdir()
        if max_pair_pictures > 0 or pictures_per_category > 0:
            draw_pictures(wanted, data_root, out / "pictures", pictures_per_category, max_pair_pictures)
    print_table(table)
    return results


def compact_metrics(table) -> dict:
    """``{variant: {dataset: {method: {"pck_img@0.1": ...}}}}``: one number per evaluation.
    DVC names its columns ``<variant>.<dataset>.<method>.pck_img@0.1``, unique, so
    `dvc exp show` needs no file paths in its headers."""
    out: dict = {}
    for r in table.to_dict("records"):
        value = r["pck_img@0.1"]
        out.setdefault(r["variant"], {}).setdefault(r["dataset"], {})[r["method"]] = {
            "pck_img@0.1": None if value != value else value}
    return out


def collect_text_reports(folders: list[Path], out: Path) -> None:
    """Every evaluation's phase reports, gathered as ``<out>/<variant>/<dataset>/phase*_report.txt``."""
    for folder in folders:
        variant, dataset = folder.parts[-3], folder.parts[-2]
        (out / variant / dataset).mkdir(parents=True, exist_ok=True)
        for report in sorted((folder / "reports").glob("*.txt")):
            shutil.copy2(report, out / variant / dataset / report.name)


def _category_charts(wanted, data_root: Path, out: Path, draw: bool) -> None:
    """Per (dataset, method): PCK@0.1 per category of every variant, as a CSV for DVC's bar
    template and (when pictures are on) as a PNG chart."""
    import pandas as pd

    from semcorr.pipeline.report import category_chart_table
    from semcorr.stages.evaluate import eval_dir

    (out / "plots" / "pck").mkdir(parents=True)
    (out / "charts").mkdir()
    groups: dict[tuple[str, str], list[str]] = {}
    for variant, dataset, method in wanted:
        groups.setdefault((dataset, method), []).append(variant)
    for (dataset, method), variants in groups.items():
        tables = {v: pd.read_csv(eval_dir(data_root, v, dataset, method) / "per_category.csv") for v in variants}
        chart = category_chart_table(tables)
        chart[["label", "pck_img"]].to_csv(out / "plots" / "pck" / f"{dataset}_{method}.csv", index=False)
        if draw:
            from semcorr.pipeline import visualize

            title = f"{dataset} / {method}: PCK@0.1 per image (%), per category"
            visualize.save(visualize.bar_chart(chart, title), out / "charts" / f"pck_{dataset}_{method}.png")


def print_table(table) -> None:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    columns = ["variant", "phase", "dataset", "method", "pck_img@0.1", "pck_pt@0.1", "n_pairs", "random_init"]
    view = Table(title="semcorr summary (PCK %; results/summary.md has every alpha and the normaliser)")
    for column in columns:
        view.add_column(column, justify="right" if column.startswith(("pck", "n_")) else "left")
    for row in table[columns].itertuples(index=False):
        view.add_row(*("n/a" if pd.isna(v) else f"{100 * v:.2f}" if c.startswith("pck") else str(v)
                       for v, c in zip(row, columns)))
    Console(width=max(100, Console().width)).print(view)


# -- pictures ---------------------------------------------------------------------------


class _Evaluation:
    """Pairs, images and predictions of one evaluated (variant, dataset, method)."""

    def __init__(self, data_root: Path, variant: str, dataset: str, method: str):
        import numpy as np
        import pandas as pd

        from semcorr.pipeline.tables import read_images, read_pairs
        from semcorr.stages.evaluate import eval_dir
        from semcorr.stages.match import predictions_dir

        setting = json.loads((eval_dir(data_root, variant, dataset, method) / "setting.json").read_text())
        self.variant, self.dataset, self.method = variant, dataset, method
        self.pairs = read_pairs(data_root / "prepared" / dataset, setting["split"]).set_index("pair_id", drop=False)
        self.images = read_images(data_root / "prepared" / dataset).set_index("image_id")
        pred_path = predictions_dir(data_root, variant, dataset, method) / "predictions.parquet"
        table = pd.read_parquet(pred_path).sort_values(["pair_id", "kp_index"])
        self.pred = {pid: rows[["x", "y"]].to_numpy(np.float64) for pid, rows in table.groupby("pair_id", sort=False)}

    def pair(self, pair_id: str):
        if pair_id not in self.pairs.index:
            raise KeyError(f"no pair {pair_id!r} in the {self.dataset} {self.pairs['split'].iloc[0]} pair table")
        return self.pairs.loc[pair_id]


def draw_pictures(wanted, data_root: Path, out_root: Path, per_category: int, max_pairs: int) -> None:
    """Pair pictures (baseline and tuned side by side when both were evaluated) and category grids."""
    from semcorr.pipeline import visualize
    from semcorr.pipeline.report import base_variant

    evaluated = set(wanted)
    for variant, dataset, method in steps(sorted(evaluated), "report: pictures", lambda k: "/".join(k)):
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
    import numpy as np

    from semcorr.pipeline.tables import keypoints

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
    import numpy as np

    from semcorr.pipeline.tables import keypoints

    row = run.pair(pair_id)
    return {
        "source": visualize.read_image(Path(run.images.loc[row.source_id, "path"])),
        "target": visualize.read_image(Path(run.images.loc[row.target_id, "path"])),
        "src_xy": keypoints(row.source_kps), "gt_xy": keypoints(row.target_kps), "pred_xy": run.pred[pair_id],
        "visible": np.asarray(row.visible, dtype=bool), "pck_norm": float(row.pck_norm), "name": str(pair_id),
    }


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", str(name))


def visualize(pair_id: str, variant: str, dataset: str, method: str, data_root: Path = DATA,
              out_root: Path = Path("visualize")) -> Path:
    """Draw one evaluated pair (with the baseline beside a tuned variant when evaluated); returns the PNG."""
    from semcorr.pipeline import visualize as vis
    from semcorr.pipeline.report import base_variant
    from semcorr.stages.evaluate import eval_dir

    data_root = Path(data_root)
    runs = []
    base = base_variant(variant)
    if base and (eval_dir(data_root, base, dataset, method) / "setting.json").is_file():
        runs.append(_Evaluation(data_root, base, dataset, method))
    runs.append(_Evaluation(data_root, variant, dataset, method))
    return vis.save(_pair_picture(vis, runs, pair_id), Path(out_root) / variant / dataset / method / f"pair_{_safe(pair_id)}.png")


def command(params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS) -> None:
    """Summary table over every evaluation, charts and pictures."""
    with clean_errors():
        p = load_params(params)
        main(evaluations(p), pictures_per_category=p.report.pictures_per_category,
             max_pair_pictures=p.report.max_pair_pictures)
        console.print(f"wrote {RESULTS}")


def visualize_command(
    pair: Annotated[str, typer.Option(help="pair_id to draw")],
    variant: Annotated[str | None, typer.Option(help="feature variant (default: first of `backbones`)")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset (default: first of `datasets`)")] = None,
    method: Annotated[str | None, typer.Option(help="method (default: first of `methods`)")] = None,
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Draw one pair: source, ground truth against prediction (green correct, red wrong), into visualize/."""
    with clean_errors():
        p = load_params(params)
        out = visualize(pair, variant or p.backbones[0], dataset or p.datasets[0], method or p.methods[0])
        console.print(f"wrote {out}")
