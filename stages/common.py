"""What every stage shares: one-line errors, the weights record, the store a variant expects."""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
DATA = Path("data")
# Expected failures (bad input, missing upstream output) print one line and exit 1;
# SEMCORR_DEBUG=1 shows the traceback instead.
EXPECTED = (ValueError, KeyError, FileNotFoundError, PermissionError, RuntimeError)


@contextmanager
def clean_errors() -> Iterator[None]:
    """Turn an expected failure into ``error: <message>`` on stderr and exit status 1."""
    try:
        yield
    except EXPECTED as exc:
        if os.environ.get("SEMCORR_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        console.print(f"[red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def weights_info(data_root: Path, variant: str) -> dict:
    """``data/weights/<variant>/weights.json`` (written by the weights or finetune stage)."""
    path = Path(data_root) / "weights" / variant / "weights.json"
    if not path.is_file():
        found = re.fullmatch(r"(.+)_(ft|lora)(\d+)", variant)
        hint = (f"semcorr finetune --backbone {found[1]} --{'depth' if found[2] == 'ft' else 'lora-rank'} {found[3]}"
                if found else f"semcorr head --backbone {variant.removesuffix('_head')}" if variant.endswith("_head")
                else f"semcorr download {variant}")
        raise FileNotFoundError(f"{path}: not found; run `{hint}` first")
    return json.loads(path.read_text())


def expected_store_attrs(backbone: str, variant: str, tuned: int | None, model: dict, weights: dict,
                         dataset: str, flips: bool) -> dict:
    """The store attrs that params (``backbone.<key>.model``, ``extract.flips``) and the
    weights record fix: what a reader of ``data/features/<variant>/<dataset>.zarr`` checks."""
    return {
        "backbone": backbone, "variant": variant, "tuned_depth": tuned, "dataset": dataset, "flips": bool(flips),
        "family": model["family"], "model": model["variant"], "arch": dict(model["arch"]), "layer": model["layer"],
        "input_size": int(model["input_size"]), "resize": model["resize"],
        "weights_sha256": weights.get("sha256") if weights.get("file") else None,
        "random_init": bool(weights.get("random_init", False)),
    }


def variant_store_attrs(p, variant: str, dataset: str) -> dict:
    """`expected_store_attrs` of ``data/features/<variant>/<dataset>.zarr`` under params ``p``."""
    key, tuned = p.variant(variant)
    model = p.backbone_conf(key).model.model_dump()
    return expected_store_attrs(key, variant, tuned, model, weights_info(DATA, variant), dataset, p.extract.flips)


def steps(items, description: str, label=str):
    """Iterate ``items`` showing progress: a bar on a terminal, else one log line per item."""
    items = list(items)
    if console.is_terminal:
        from rich.progress import track

        yield from track(items, description=description, console=console, transient=True)
        return
    for n, item in enumerate(items, 1):
        console.print(f"{description} {n}/{len(items)}: {label(item)}", highlight=False)
        yield item
