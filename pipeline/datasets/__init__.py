"""Dataset parsers: raw files in ``data/raw/<name>`` -> the normalised pair and image tables
(`pipeline.tables`) in ``data/prepared/<name>``."""

from __future__ import annotations

from pathlib import Path

from semcorr.pipeline.datasets import pfpascal, pfwillow, spair, synthetic
from semcorr.pipeline.datasets.common import DatasetError
from semcorr.pipeline.tables import write_tables

PARSERS = {"spair": spair.parse, "pfpascal": pfpascal.parse, "pfwillow": pfwillow.parse,
           "synthetic": synthetic.parse}

__all__ = ["PARSERS", "DatasetError", "prepare"]


def prepare(name: str, raw_dir: Path, out_dir: Path) -> Path:
    """Parse dataset ``name`` from ``raw_dir`` and write ``out_dir/{pairs,images}.parquet``;
    bad input raises `DatasetError` naming the file, and nothing is written."""
    if name not in PARSERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(PARSERS)}")
    if not Path(raw_dir).is_dir():
        raise DatasetError(f"{raw_dir}: raw dataset folder not found; run `semcorr download {name}` first")
    pairs, images = PARSERS[name](Path(raw_dir))
    return write_tables(Path(out_dir), pairs, images)
