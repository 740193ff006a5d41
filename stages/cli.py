"""`semcorr <stage>`: every DVC stage, callable by hand with the same arguments as dvc.yaml.

Only the stage being run is imported, and stage modules import their heavy libraries
(torch, zarr, pandas, backbone libraries) inside the work, so `semcorr --help` and
`semcorr <stage> --help` start in about a second (`benchmarks/cli_startup.py`).
"""

from __future__ import annotations

import importlib
import sys
import warnings

import typer

# name -> (module, function, help), in DAG order
STAGES = {
    "download": ("semcorr.stages.download", "command", "Fetch a dataset or backbone checkpoint (checksummed) into data/raw or data/weights."),
    "prepare": ("semcorr.stages.prepare", "command", "Parse a dataset into data/prepared/<dataset>/{pairs,images}.parquet."),
    "extract": ("semcorr.stages.extract", "command", "Dense features of every image of a dataset into a zarr store."),
    "verify": ("semcorr.stages.verify", "command", "Check every shard and checksum of a feature store; say how to repair it."),
    "finetune": ("semcorr.stages.finetune", "command", "Fine-tune the last N blocks of a backbone with Gaussian cross-entropy."),
    "head": ("semcorr.stages.head", "command", "Train a light post-processor on cached features (no backbone runs)."),
    "head_apply": ("semcorr.stages.head", "apply_command", "Run a trained head over a store: the variant <backbone>_head."),
    "tune": ("semcorr.stages.tune", "command", "Choose matching settings (upsampling, window, temperature) on a val split."),
    "match": ("semcorr.stages.match", "command", "Predict target keypoints from cached features (argmax, soft-argmax, val-tuned)."),
    "evaluate": ("semcorr.stages.evaluate", "command", "PCK per image and per point from a predictions folder."),
    "keypoints": ("semcorr.stages.sparse", "keypoints_command", "SIFT keypoints of a homography benchmark's images (hloc features file)."),
    "sparse": ("semcorr.stages.sparse", "command", "Sparse matching with local, semantic and fused descriptors: MMA, homography accuracy."),
    "propagate": ("semcorr.stages.propagate", "command", "Propagate first-frame masks / joints through each video by cached-feature affinities."),
    "video_eval": ("semcorr.stages.video_eval", "command", "DAVIS J&F and JHMDB PCK of a propagation, against copying the first frame."),
    "report": ("semcorr.stages.report", "command", "Summary table, text reports, charts and pictures over every evaluation."),
    "visualize": ("semcorr.stages.report", "visualize_command", "Draw one pair: ground truth against prediction."),
    "workspace": ("semcorr.stages.workspace", "command", "Create or refresh a self-contained git+DVC workspace (used by `make demo`)."),
}

HELP = ("semcorr: cache-first semantic-correspondence evaluation and fine-tuning. "
        "Stages in DAG order: download, prepare, extract, finetune, match, evaluate, propagate, video_eval, report.")


def usage() -> str:
    width = max(map(len, STAGES))
    rows = "\n".join(f"  {name:<{width}}  {help_text}" for name, (_, _, help_text) in STAGES.items())
    return (f"Usage: semcorr STAGE [OPTIONS]...\n\n{HELP}\n\nStages:\n{rows}\n\n"
            "`semcorr STAGE --help` shows a stage's options.\n")


def stage_app(name: str) -> typer.Typer:
    """A Typer app holding only stage ``name`` (importing only its module)."""
    module, function, help_text = STAGES[name]
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name, help=help_text)(getattr(importlib.import_module(module), function))
    return app


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message="The pynvml package is deprecated")  # via torch.cuda
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return
    if args[0] not in STAGES:
        print(f"semcorr: unknown stage {args[0]!r}\n\n{usage()}", end="", file=sys.stderr)
        raise SystemExit(2)
    stage_app(args[0])(args=args[1:], prog_name=f"semcorr {args[0]}")
