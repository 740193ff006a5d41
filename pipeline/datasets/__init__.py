"""Dataset parsers: raw files in ``data/raw/<name>`` -> the normalised pair and image tables
(`pipeline.tables`) in ``data/prepared/<name>``.

Cheap to import: a parser module (which needs PIL, and scikit-image for the synthetic
set) is imported by `prepare` only."""

from __future__ import annotations

import importlib
from pathlib import Path

NAMES = ("spair", "pfpascal", "pfwillow", "synthetic")  # one parser module of this package each

__all__ = ["NAMES", "DatasetError", "prepare"]


class DatasetError(ValueError):
    """Bad raw dataset input; the message names the file and the fault."""


def prepare(name: str, raw_dir: Path, out_dir: Path) -> Path:
    """Parse dataset ``name`` from ``raw_dir`` and write ``out_dir/{pairs,images}.parquet``;
    bad input raises `DatasetError` naming the file, and nothing is written."""
    if name not in NAMES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    if not Path(raw_dir).is_dir():
        raise DatasetError(f"{raw_dir}: raw dataset folder not found; run `semcorr download {name}` first")
    from semcorr.pipeline.tables import write_tables

    pairs, images = importlib.import_module(f"{__name__}.{name}").parse(Path(raw_dir))
    return write_tables(Path(out_dir), pairs, images)
