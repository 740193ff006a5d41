"""`semcorr <stage>`: every DVC stage, callable by hand with the same arguments as dvc.yaml."""

from __future__ import annotations

import typer

from stages import download, evaluate, extract, finetune, match, prepare, report, workspace

app = typer.Typer(
    help="semcorr: cache-first semantic-correspondence evaluation and fine-tuning. "
    "Stages in DAG order: download, prepare, extract, finetune, match, evaluate, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("download", help="Fetch a dataset or backbone checkpoint (checksummed) into data/raw or data/weights.")(download.command)
app.command("prepare", help="Parse a dataset into data/prepared/<dataset>/{pairs,images}.parquet.")(prepare.command)
app.command("extract", help="Dense features of every image of a dataset into a zarr store.")(extract.command)
app.command("finetune", help="Fine-tune the last N blocks of a backbone with Gaussian cross-entropy.")(finetune.command)
app.command("match", help="Predict target keypoints from cached features (argmax / soft-argmax).")(match.command)
app.command("evaluate", help="PCK per image and per point from a predictions table.")(evaluate.command)
app.command("report", help="Summary table, text reports and pictures over everything evaluated.")(report.command)
app.command("visualize", help="Draw one pair: ground truth against prediction.")(report.visualize_command)
app.command("workspace", help="Create or refresh a self-contained git+DVC workspace (used by `make demo`).")(workspace.command)


def main() -> None:
    app()
