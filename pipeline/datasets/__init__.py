"""Dataset parsers: raw files in ``data/raw/<name>`` -> the normalised tables
(`pipeline.tables`) in ``data/prepared/<name>``: pair and image tables for the
correspondence sets (`NAMES`), image, frame and label tables for the video sets
(`VIDEO_NAMES`, which have no pairs and stay out of the correspondence matrix).

Cheap to import: a parser module (which needs PIL, and scikit-image for the synthetic
sets) is imported by `prepare` only."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

NAMES = ("spair", "pfpascal", "pfwillow", "synthetic", "hpatches", "ap10k", "ap10k_cross_species",
         "ap10k_cross_family")  # a parser module of this package each (`_MODULES` where it is shared)
VIDEO_NAMES = ("davis", "jhmdb", "synthvideo")
_MODULES = {"synthvideo": "synthetic_video", "ap10k_cross_species": "ap10k",
            "ap10k_cross_family": "ap10k"}  # dataset key -> parser module, where they differ
# dataset key -> the parser's arguments: AP-10k's three pair settings of one archive (GeoAware-SC)
_SETTINGS = {"ap10k": {"setting": "intra-species"}, "ap10k_cross_species": {"setting": "cross-species"},
             "ap10k_cross_family": {"setting": "cross-family"}}
GENERATED = ("synthetic", "synthvideo")  # embedded sets: `generator(name).generate(out, conf)`

__all__ = ["NAMES", "VIDEO_NAMES", "GENERATED", "DatasetError", "prepare", "generator"]


class DatasetError(ValueError):
    """Bad raw dataset input; the message names the file and the fault."""


def parser(name: str) -> ModuleType:
    """The parser module of dataset ``name``."""
    if name not in NAMES + VIDEO_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(NAMES + VIDEO_NAMES)}")
    return importlib.import_module(f"{__name__}.{_MODULES.get(name, name)}")


def generator(name: str) -> ModuleType:
    """The module whose ``generate(out_dir, conf)`` writes the embedded set ``name``."""
    if name not in GENERATED:
        raise DatasetError(f"{name!r} is not an embedded dataset; embedded: {', '.join(GENERATED)}")
    return parser(name)


def prepare(name: str, raw_dir: Path, out_dir: Path) -> Path:
    """Parse dataset ``name`` from ``raw_dir`` and write its tables into ``out_dir``
    (``{pairs,images}.parquet``; for a video set ``images``, ``frames`` and its label
    tables); bad input raises `DatasetError` naming the file, and nothing is written."""
    module = parser(name)
    if not Path(raw_dir).is_dir():
        raise DatasetError(f"{raw_dir}: raw dataset folder not found; run `semcorr download {name}` first")
    from semcorr.pipeline.tables import write_tables, write_video_tables

    if name in VIDEO_NAMES:
        return write_video_tables(Path(out_dir), **module.parse(Path(raw_dir)))
    pairs, images = module.parse(Path(raw_dir), **_SETTINGS.get(name, {}))
    return write_tables(Path(out_dir), pairs, images)
