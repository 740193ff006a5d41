"""Stage `download`: one dataset -> ``data/raw/<name>/``, or one backbone's weights ->
``data/weights/<name>/``, or the embedded synthetic set -> ``data/raw/synthetic/``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from semcorr.pipeline.datasets import DatasetError, synthetic
from semcorr.pipeline.download import CONNECT_TIMEOUT, DATASETS, DownloadError, download_dataset, download_weights
from semcorr.stages.params import DEFAULT_PARAMS, load_params, section

console = Console(stderr=True)


def main(name: str, conf: dict, data_root: Path = Path("data"), connect_timeout: float = CONNECT_TIMEOUT) -> Path:
    """``conf``: ``download.<name>`` for a dataset (or ``synthetic``), ``backbone.<name>`` for a backbone."""
    data_root = Path(data_root)
    source = Path(conf["source"]) if conf.get("source") else None
    if name == "synthetic":
        return synthetic.generate(data_root / "raw" / name, conf)
    if name in DATASETS:
        return download_dataset(name, data_root / "raw" / name, source, data_root / "downloads", connect_timeout)
    checkpoint = None if conf.get("family") == "daisy" else conf.get("checkpoint")
    return download_weights(name, data_root / "weights" / name, checkpoint, source,
                            bool(conf.get("random_init", False)), data_root / "downloads", connect_timeout)


def command(
    name: Annotated[str, typer.Argument(help="dataset key (download.<name>), backbone key (backbone.<name>) or 'synthetic'")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Download (or copy from its `source`) one dataset or one backbone's weights, checksummed."""
    config = load_params(params)
    if name in config.get("download", {}):
        conf = section(config, "download", name)
    elif name in config.get("backbone", {}):
        conf = section(config, "backbone", name)
    else:
        console.print(f"[red]error:[/] {params} has neither `download.{name}` nor `backbone.{name}`")
        raise typer.Exit(1)
    try:
        out = main(name, conf or {})
    except (DownloadError, DatasetError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")
