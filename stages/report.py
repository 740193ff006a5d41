"""Stage `report`: every evaluation of the study (``datasets`` x variants x ``methods``)
-> ``results/``, written as one unit::

    summary.md, summary.csv   one row per evaluation, with its protocol (normaliser, alpha, counts, random-init);
                              summary.md ends with the sparse-matching table (homography benchmarks) and the
                              video label-propagation table (J&F, PCK, copy-first-frame baseline)
    sparse.csv                that table: per backbone, dataset, descriptor (local, semantic, fused), sequence kind
    video.csv                 the video table: per (video dataset, backbone), every J / F / PCK number and bound
    comparisons.csv           paired bootstrap differences: fine-tuned - baseline, head - baseline,
                              method - method, pose-aligned - unaligned
    protocols.csv             the same predictions under each protocol preset (PCK@0.1)
    difficulty.csv            SPair-71k: PCK@0.1 per difficulty level
    metrics.json              PCK@0.1 per image of each evaluation, J&F and PCK@0.1 of each propagation, compact
                              (numbers only; for `dvc exp show`)
    reports/<V>/<D>/          the evaluations' text reports
    plots/pck/<D>_<method>.csv  PCK@0.1 per category, one row per (category, variant): DVC bar charts
    charts/*.png              per-category bars, PCK against alpha, difficulty (image plots)
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
    """(variant, dataset, method) of every evaluation the study's params define; a head variant
    (``<key>_head``) is evaluated by argmax and soft-argmax only (dvc.yaml `evaluate_head`)."""
    variants = list(params.backbones) + params.tuned_variants()
    return [(v, d, m) for v in variants for d in params.datasets
            for m in (HEAD_METHODS if v.endswith("_head") else params.methods)]


HEAD_METHODS = ("argmax", "softargmax")


def main(wanted: list[tuple[str, str, str]], data_root: Path = DATA, results: Path = RESULTS,
         pictures_per_category: int = 4, max_pair_pictures: int = 20, bootstrap: dict | None = None,
         sparse: list[tuple[str, str]] = (), video: list[tuple[str, str]] = ()) -> Path:
    """Write ``results`` from the evaluations ``wanted`` (variant, dataset, method); returns it.
    ``bootstrap``: the evaluations' bootstrap settings (params ``evaluate.bootstrap``), for the
    paired comparisons; ``sparse``: the (variant, dataset) sparse-matching evaluations;
    ``video``: the (variant, video dataset) label-propagation evaluations."""
    from semcorr.pipeline import summary
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.stages.evaluate import eval_dir

    data_root, results = Path(data_root), Path(results)
    if not wanted:
        raise ValueError("no evaluations to report (params list no dataset, variant or method)")
    folders = [eval_dir(data_root, *key) for key in wanted]
    missing = [f for f in folders if not all((f / name).is_file() for name in EVALUATION_FILES)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no evaluation ({len(missing)} of {len(folders)} missing); "
                                "run `semcorr evaluate` for it first")
    evaluations = [summary.load(folder) for folder in folders]
    table = summary.evaluations_table(evaluations)
    compared = summary.comparisons(evaluations, bootstrap or {})
    protocols = summary.protocol_table(evaluations)
    difficulty = summary.difficulty_table(evaluations)
    sparse_table, sparse_text = _sparse(data_root, sparse, bootstrap or {})
    video_table, video_text = _video(data_root, video)
    draw = max_pair_pictures > 0 or pictures_per_category > 0
    with staged(results, work_root(data_root)) as out:
        out.mkdir(parents=True)
        (out / "summary.md").write_text(summary.markdown(table, compared, protocols, difficulty) + sparse_text
                                        + video_text)
        sparse_table.to_csv(out / "sparse.csv", index=False)
        video_table.to_csv(out / "video.csv", index=False)
        table.to_csv(out / "summary.csv", index=False)
        compared.to_csv(out / "comparisons.csv", index=False)
        protocols.to_csv(out / "protocols.csv", index=False)
        difficulty.to_csv(out / "difficulty.csv", index=False)
        write_json(out / "metrics.json", compact_metrics(table, video_table))
        collect_text_reports(folders, out / "reports")
        _charts(wanted, data_root, out, table, difficulty, draw)
        (out / "pictures").mkdir()
        if draw:
            draw_pictures(wanted, data_root, out / "pictures", pictures_per_category, max_pair_pictures)
    print_table(table, compared)
    return results


EVALUATION_FILES = ("metrics.json", "setting.json", "per_pair.parquet", "protocols.csv", "per_category.csv")


def compact_metrics(table, video_table=None) -> dict:
    """``{variant: {dataset: {method: {"pck_img@0.1": ...}}}}``: one number per evaluation, and
    ``{variant: {video dataset: {"propagation": {"jf_mean": ..., "pck@0.1": ...}}}}`` per
    propagation. DVC names its columns ``<variant>.<dataset>.<method>.pck_img@0.1``, unique, so
    `dvc exp show` needs no file paths in its headers."""
    out: dict = {}
    for r in table.to_dict("records"):
        out.setdefault(r["variant"], {}).setdefault(r["dataset"], {})[r["method"]] = {
            "pck_img@0.1": _number(r["pck_img@0.1"])}
    for r in ([] if video_table is None else video_table.to_dict("records")):
        out.setdefault(r["variant"], {}).setdefault(r["dataset"], {})["propagation"] = {
            key: _number(r[key]) for key in ("jf_mean", "pck@0.1")}
    return out


def _number(value) -> float | None:
    return None if value is None or value != value else float(value)


def collect_text_reports(folders: list[Path], out: Path) -> None:
    """Every evaluation's phase reports, gathered as ``<out>/<variant>/<dataset>/phase*_report.txt``."""
    for folder in folders:
        variant, dataset = folder.parts[-3], folder.parts[-2]
        (out / variant / dataset).mkdir(parents=True, exist_ok=True)
        for report in sorted((folder / "reports").glob("*.txt")):
            shutil.copy2(report, out / variant / dataset / report.name)


def _charts(wanted, data_root: Path, out: Path, table, difficulty, draw: bool) -> None:
    """Per (dataset, method): PCK@0.1 per category of every variant, as a CSV for DVC's bar
    template; and, when pictures are on, PNG charts: per-category bars, PCK against alpha,
    and (SPair-71k) the difficulty breakdown."""
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
        if not draw:
            continue
        from semcorr.pipeline import visualize

        rows = table[(table["dataset"] == dataset) & (table["method"] == method)]
        visualize.save(visualize.bar_chart(chart, f"{dataset} / {method}: PCK@0.1 per image (%), per category"),
                       out / "charts" / f"pck_{dataset}_{method}.png")
        visualize.save(visualize.alpha_curves(rows, f"{dataset} / {method}: PCK per image against alpha, 95% bands"),
                       out / "charts" / f"alpha_{dataset}_{method}.png")
        hard = difficulty[(difficulty["dataset"] == dataset) & (difficulty["method"] == method)] if len(difficulty) else difficulty
        if len(hard):
            visualize.save(visualize.difficulty_chart(hard, f"{dataset} / {method}: PCK@0.1 per image by difficulty"),
                           out / "charts" / f"difficulty_{dataset}_{method}.png")


def print_table(table, compared) -> None:
    """The summary in a terminal, readable at 100 columns (results/summary.md has it all)."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    view = Table(title="PCK@0.1 per image (%) [95% interval]; every alpha: results/summary.md")
    for column in ("dataset", "phase", "variant", "method", "PCK@0.1", "Δ tuned", "Δ val-tuned"):
        view.add_column(column, justify="right" if column.startswith(("PCK", "Δ")) else "left")
    deltas = {(r.comparison, r.variant, r.dataset, r.method): r for r in compared.itertuples(index=False)}

    def delta(comparison: str, key: tuple) -> str:
        d = deltas.get((comparison, *key))
        return "" if d is None else f"{100 * d.delta:+.1f}{'*' if d.significant else ''}"

    for r in table.to_dict("records"):
        value = r["pck_img@0.1"]
        cell = "n/a" if value is None or pd.isna(value) else f"{100 * value:.1f} [{100 * r['pck_img@0.1_lo']:.1f}, {100 * r['pck_img@0.1_hi']:.1f}]"
        key = (r["variant"], r["dataset"], r["method"])
        view.add_row(r["dataset"], str(r["phase"]), r["variant"], r["method"], cell,
                     delta("fine-tuned − baseline", key), delta("val-tuned − fixed soft-argmax", key))
    Console(width=100).print(view)


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
        self.label = variant + (" [random-init]" if setting.get("random_init") else "")
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
    """Pair pictures and category grids, the baseline beside a tuned variant when both were
    evaluated; example pairs are taken across categories in turn."""
    from semcorr.pipeline import visualize
    from semcorr.pipeline.report import base_variant, head_base

    evaluated = set(wanted)
    for variant, dataset, method in steps(sorted(evaluated), "report: pictures", lambda k: "/".join(k)):
        runs = [_Evaluation(data_root, variant, dataset, method)]
        base = base_variant(variant) or head_base(variant)
        if base and (base, dataset, method) in evaluated:
            runs.insert(0, _Evaluation(data_root, base, dataset, method))
        out = out_root / variant / dataset / method
        main_run = runs[-1]
        for pair_id in across_categories(main_run.pairs, max_pairs):
            visualize.save(_pair_picture(visualize, runs, pair_id), out / f"pair_{_safe(pair_id)}.png")
        if per_category > 0:
            for category, members in main_run.pairs.groupby("category"):
                rows = [_grid_row(visualize, runs, pid) for pid in members["pair_id"].iloc[:per_category]]
                title = f"{dataset} / {method}: {category}; {' against '.join(run.label for run in runs)}"
                visualize.save(visualize.grid_figure(rows, PICTURE_ALPHA, title), out / f"category_{_safe(category)}.png")


def across_categories(pairs, n: int) -> list[str]:
    """Up to ``n`` pair ids, one per category in turn (categories sorted, pairs in table order)."""
    queues = [list(members["pair_id"]) for _, members in sorted(pairs.groupby("category"), key=lambda g: g[0])]
    chosen = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def _pair_picture(visualize, runs: list[_Evaluation], pair_id: str):
    import numpy as np

    from semcorr.pipeline.tables import keypoints

    ref = runs[-1]
    row = ref.pair(pair_id)
    source = visualize.read_image(Path(ref.images.loc[row.source_id, "path"]))
    target = visualize.read_image(Path(ref.images.loc[row.target_id, "path"]))
    predictions = {run.label: run.pred[pair_id] for run in runs}
    title = f"{ref.dataset} / {ref.method} / pair {pair_id} ({row.category}); alpha {PICTURE_ALPHA:g} x {row.norm_kind} normaliser"
    return visualize.pair_figure(
        source, target, keypoints(row.source_kps), keypoints(row.target_kps), predictions,
        np.asarray(row.visible, dtype=bool), PICTURE_ALPHA * float(row.pck_norm), PICTURE_ALPHA, title,
    )


def _grid_row(visualize, runs: list[_Evaluation], pair_id: str) -> dict:
    import numpy as np

    from semcorr.pipeline.tables import keypoints

    ref = runs[-1]
    row = ref.pair(pair_id)
    return {
        "source": visualize.read_image(Path(ref.images.loc[row.source_id, "path"])),
        "target": visualize.read_image(Path(ref.images.loc[row.target_id, "path"])),
        "src_xy": keypoints(row.source_kps), "gt_xy": keypoints(row.target_kps),
        "predictions": {run.label: run.pred[pair_id] for run in runs},
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


def _sparse(data_root: Path, wanted: list[tuple[str, str]], bootstrap: dict):
    """(the sparse-matching table, its markdown section; empty without sparse evaluations);
    ``bootstrap``: params ``evaluate.bootstrap``, for the intervals over pairs."""
    import pandas as pd

    from semcorr.pipeline.sparse import sparse_markdown, sparse_table
    from semcorr.stages.sparse import sparse_dir

    results, per_pairs = [], []
    for variant, dataset in wanted:
        folder = sparse_dir(data_root, variant, dataset)
        if not all((folder / name).is_file() for name in ("metrics.json", "setting.json", "per_pair.csv")):
            raise FileNotFoundError(f"{folder}: no sparse evaluation; run `semcorr sparse --dataset {dataset} "
                                    f"--variant {variant}` first")
        results.append((json.loads((folder / "metrics.json").read_text()),
                        json.loads((folder / "setting.json").read_text())))
        per_pairs.append(pd.read_csv(folder / "per_pair.csv"))
    table = sparse_table(results, per_pairs, bootstrap)
    return table, ("\n" + sparse_markdown(table, {**results[0][1], **bootstrap}) if results else "")


def _video(data_root: Path, wanted: list[tuple[str, str]]):
    """(the video label-propagation table, its markdown section; empty without video evaluations)."""
    import pandas as pd

    from semcorr.pipeline.video_metrics import SUMMARY_COLUMNS, video_summary_markdown, video_summary_table
    from semcorr.stages.video_eval import video_eval_dir

    folders = [video_eval_dir(data_root, variant, dataset) for variant, dataset in wanted]
    for folder, (variant, dataset) in zip(folders, wanted):
        if not (folder / "metrics.json").is_file() or not (folder / "setting.json").is_file():
            raise FileNotFoundError(f"{folder}: no video evaluation; run `semcorr video_eval --dataset {dataset} "
                                    f"--variant {variant}` first")
    if not folders:
        return pd.DataFrame(columns=SUMMARY_COLUMNS), ""
    settings = [json.loads((folder / "setting.json").read_text()) for folder in folders]
    table = video_summary_table(folders)
    return table, "\n" + video_summary_markdown(table, settings)


def command(params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS) -> None:
    """Summary table over every evaluation, charts and pictures."""
    with clean_errors():
        p = load_params(params)
        main(evaluations(p), pictures_per_category=p.report.pictures_per_category,
             max_pair_pictures=p.report.max_pair_pictures, bootstrap=p.evaluate.bootstrap.model_dump(),
             sparse=[(v, d) for d in p.sparse_datasets for v in p.backbones],
             video=[(v, d) for d in p.video_datasets for v in p.backbones])
        console.print(f"wrote {RESULTS}")


def visualize_command(
    pair: Annotated[str, typer.Option(help="pair_id to draw")],
    variant: Annotated[str | None, typer.Option(help="feature variant (default: first of `backbones`)")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset (default: first of `datasets`)")] = None,
    method: Annotated[str | None, typer.Option(help="method (default: first of `methods`)")] = None,
    out: Annotated[Path, typer.Option(help="folder for the picture (outside DVC's outputs)")] = Path("visualize"),
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Draw one pair: source, ground truth against each prediction (baseline beside tuned)."""
    with clean_errors():
        p = load_params(params)
        out = visualize(pair, variant or p.backbones[0], dataset or p.datasets[0], method or p.methods[0],
                        out_root=out)
        console.print(f"wrote {out}")
