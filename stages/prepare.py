"""Stage `prepare`: ``data/raw/<dataset>/`` -> ``data/prepared/<dataset>/{pairs,images}.parquet``
(a video dataset: ``{images,frames}.parquet`` and its ``masks`` / ``keypoints`` tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console
from semcorr.stages.params import DEFAULT_PARAMS, load_params


def main(dataset: str, data_root: Path = DATA, raw_dir: Path | None = None) -> Path:
    """Parse ``raw_dir`` (default ``<data_root>/raw/<dataset>``) into ``<data_root>/prepared/<dataset>``."""
    from semcorr.pipeline.datasets import prepare

    data_root = Path(data_root)
    return prepare(dataset, Path(raw_dir) if raw_dir else data_root / "raw" / dataset,
                   data_root / "prepared" / dataset)


def command(
    dataset: Annotated[str, typer.Argument(help="dataset key (datasets or video_datasets), e.g. spair or davis")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Build the normalised pair and image tables of one dataset."""
    with clean_errors():
        load_params(params).any_dataset(dataset)
        console.print(f"wrote {main(dataset)}")
