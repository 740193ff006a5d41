"""`semcorr <stage>`: every DVC stage, callable by hand with the same arguments as dvc.yaml.

Only the stage being run is imported (a DVC repro starts this CLI once per stage, and
the backbone libraries are slow to import); `semcorr --help` imports them all.
"""

from __future__ import annotations

import importlib
import sys

import typer

# name -> (module, function, help), in DAG order
STAGES = {
    "download": ("semcorr.stages.download", "command", "Fetch a dataset or backbone checkpoint (checksummed) into data/raw or data/weights."),
    "prepare": ("semcorr.stages.prepare", "command", "Parse a dataset into data/prepared/<dataset>/{pairs,images}.parquet."),
    "extract": ("semcorr.stages.extract", "command", "Dense features of every image of a dataset into a zarr store."),
    "finetune": ("semcorr.stages.finetune", "command", "Fine-tune the last N blocks of a backbone with Gaussian cross-entropy."),
    "match": ("semcorr.stages.match", "command", "Predict target keypoints from cached features (argmax / soft-argmax)."),
    "evaluate": ("semcorr.stages.evaluate", "command", "PCK per image and per point from a predictions table."),
    "report": ("semcorr.stages.report", "command", "Summary table, text reports and pictures over everything evaluated."),
    "visualize": ("semcorr.stages.report", "visualize_command", "Draw one pair: ground truth against prediction."),
    "workspace": ("semcorr.stages.workspace", "command", "Create or refresh a self-contained git+DVC workspace (used by `make demo`)."),
}


def build_app(names: list[str]) -> typer.Typer:
    app = typer.Typer(
        help="semcorr: cache-first semantic-correspondence evaluation and fine-tuning. "
        "Stages in DAG order: download, prepare, extract, finetune, match, evaluate, report.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    # a callback keeps the app a command group even when one stage is registered
    app.callback()(lambda: None)
    for name in names:
        module, function, help_text = STAGES[name]
        app.command(name, help=help_text)(getattr(importlib.import_module(module), function))
    return app


def main() -> None:
    requested = sys.argv[1] if len(sys.argv) > 1 else None
    build_app([requested] if requested in STAGES else list(STAGES))()
