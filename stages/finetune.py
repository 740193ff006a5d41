"""Stage `finetune`: train the last N blocks of ``backbone.<B>`` on ``finetune.train_dataset``
-> ``data/weights/<B>_ft<N>/`` (model.pth, weights.json) and ``data/finetune/<B>_ft<N>/``
(curve.csv, prefix.zarr, state/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import resolve_device
from semcorr.pipeline.finetune import FinetuneError, default_conf, finetune, save_tuned
from semcorr.pipeline.prefix_cache import PrefixCacheError
from semcorr.pipeline.tables import TableError, read_images, read_pairs
from semcorr.pipeline.weights import WeightsError
from semcorr.stages.extract import backbone_spec
from semcorr.stages.params import DEFAULT_PARAMS, load_params, section

console = Console(stderr=True)

# finetune params that belong to the stage, not to the training loop
STAGE_KEYS = ("train_dataset", "device")


def tuned_variant(backbone: str, depth: int) -> str:
    return f"{backbone}_ft{depth}"


def main(backbone: str, depth: int, params: dict, data_root: Path = Path("data")) -> Path:
    """Fine-tune ``backbone`` (a ``backbone.<key>`` of ``params``) at ``depth``; returns the
    tuned weights folder ``<data_root>/weights/<backbone>_ft<depth>``."""
    data_root = Path(data_root)
    ft = dict(section(params, "finetune"))
    spec, _ = backbone_spec(backbone, section(params, "backbone", backbone), data_root / "weights" / backbone)
    prepared = data_root / "prepared" / ft["train_dataset"]
    pairs, images = read_pairs(prepared), read_images(prepared)
    conf = {k: v for k, v in ft.items() if k not in STAGE_KEYS}
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise FinetuneError(f"params.yaml `finetune` has unknown keys {sorted(unknown)}")
    conf["depth"] = int(depth)
    variant = tuned_variant(backbone, depth)
    model = build_backbone(spec)
    result = finetune(
        model, pairs[pairs["split"] == "trn"], pairs[pairs["split"] == "val"], images,
        data_root / "finetune" / variant, conf, resolve_device(ft.get("device", "auto")),
    )
    meta = {
        "source": "finetune",
        "base": backbone,
        "base_sha256": spec.sha256,
        "base_random_init": spec.random_init,
        "depth": int(depth),
        "train_dataset": ft["train_dataset"],
        "best_epoch": result.best_epoch,
        "best_val_pck": result.best_val_pck,
        "base_val_pck": result.base_val_pck,
        "trained_parameters": result.trainable,
    }
    return save_tuned(data_root / "weights" / variant, result.state_dict, meta)


def command(
    backbone: Annotated[str, typer.Option(help="backbone key (backbone.<key> in params)")],
    depth: Annotated[int, typer.Option(help="number of last transformer blocks to train (2, 4, 6)")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Fine-tune the last N blocks of a backbone with Gaussian cross-entropy."""
    try:
        out = main(backbone, depth, load_params(params))
    except (FinetuneError, PrefixCacheError, TableError, WeightsError, FileNotFoundError, KeyError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    info = json.loads((out / "weights.json").read_text())
    console.print(
        f"wrote {out}: best epoch {info['best_epoch']}, val PCK@0.1 {info['best_val_pck']:.4f} "
        f"(untuned {info['base_val_pck']:.4f})"
    )
