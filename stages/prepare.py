"""Stage `prepare`: ``data/raw/<dataset>/`` -> ``data/prepared/<dataset>/{pairs,images}.parquet``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from semcorr.pipeline.datasets import DatasetError, prepare
from semcorr.pipeline.tables import TableError
from semcorr.stages.params import DEFAULT_PARAMS, load_params

console = Console(stderr=True)


def main(dataset: str, data_root: Path = Path("data"), raw_dir: Path | None = None) -> Path:
    """Parse ``raw_dir`` (default ``<data_root>/raw/<dataset>``) into ``<data_root>/prepared/<dataset>``."""
    data_root = Path(data_root)
    return prepare(dataset, Path(raw_dir) if raw_dir else data_root / "raw" / dataset,
                   data_root / "prepared" / dataset)


def command(
    dataset: Annotated[str, typer.Argument(help="dataset key: spair, pfpascal, pfwillow or synthetic")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Build the normalised pair and image tables of one dataset."""
    load_params(params)  # the stage has no params of its own; fail early on a missing file
    try:
        out = main(dataset)
    except (DatasetError, TableError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")
