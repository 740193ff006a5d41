"""SPair-71k (Min et al. 2019).

Raw layout (``data/raw/spair``): ``Layout/large/{trn,val,test}.txt`` list the official pairs
(one ``<pair name>`` a line); each has ``PairAnnotation/<split>/<pair name>.json`` with
``src_imname``, ``trg_imname``, ``category``, ``src_kps`` / ``trg_kps`` (``[N, 2]``, the
keypoints annotated in both images, already 0-based pixel coordinates, as every public
loader uses them), ``src_bndbox`` / ``trg_bndbox`` (``[x1, y1, x2, y2]``), ``kps_ids``,
``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion`` and ``mirror``
(stored as ``flip``). Images: ``JPEGImages/<category>/<imname>``. PCK normaliser: max side of
the target bounding box (``norm_kind='bbox'``), the dataset's standard convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import (SPLITS, bbox_norm, check_pair_images, images_table, pair_row,
                                              pairs_table, track)

FIELDS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "trg_bndbox",
          "viewpoint_variation", "scale_variation", "truncation", "occlusion")
FLAGS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")


def layout_path(raw_dir: Path, split: str) -> Path:
    return Path(raw_dir) / "Layout" / "large" / f"{split}.txt"


def read_layout(listing: Path) -> list[str]:
    """The pair names of one split list; `DatasetError` naming the file if it is missing,
    unreadable, empty, or names a pair with a path in it."""
    if not listing.is_file():
        raise DatasetError(f"{listing}: split list not found")
    try:
        names = listing.read_text(encoding="utf-8").split()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{listing}: not a text file ({exc})") from exc
    if not names:
        raise DatasetError(f"{listing}: no pairs (the split list is empty)")
    for name in names:
        if not _plain_name(name):
            raise DatasetError(f"{listing}: pair name {name!r} is not a plain file name")
    return names


def read_annotation(path: Path) -> dict:
    """One pair annotation -> dict with source, target (image ids), category, source_xy,
    target_xy ``[N, 2]``, pck_norm and the SPair difficulty flags."""
    if not path.is_file():
        raise DatasetError(f"{path}: pair annotation not found")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a JSON object")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise DatasetError(f"{path}: lacks fields {missing}")
    for field in ("category", "src_imname", "trg_imname"):
        if not _plain_name(data[field]):
            raise DatasetError(f"{path}: field {field} is {data[field]!r}, not a plain name")
    try:
        src = np.asarray(data["src_kps"], dtype=np.float64).reshape(-1, 2)
        trg = np.asarray(data["trg_kps"], dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: keypoints are not [N, 2] numbers ({exc})") from exc
    if len(src) != len(trg) or not len(src):
        raise DatasetError(f"{path}: {len(src)} source but {len(trg)} target keypoints")
    if np.isnan(src).any() or np.isnan(trg).any():
        raise DatasetError(f"{path}: NaN keypoints")
    category = data["category"]
    return {"source": f"JPEGImages/{category}/{data['src_imname']}",
            "target": f"JPEGImages/{category}/{data['trg_imname']}",
            "category": category, "source_xy": src, "target_xy": trg,
            "pck_norm": _box_norm(data["trg_bndbox"], path),
            "spair": {**{flag: _flag(data, flag, path) for flag in FLAGS}, "flip": bool(data.get("mirror", 0))}}


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not set(name) & {"/", "\\"}


def _flag(data: dict, field: str, path: Path) -> int:
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{path}: field {field} is {value!r}, not an integer")
    return value


def _box_norm(box, path: Path) -> float:
    """PCK normaliser of the target box; `DatasetError` unless it is ``[x1, y1, x2, y2]`` with extent."""
    try:
        values = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.empty(0)
    norm = bbox_norm(values) if values.shape == (4,) and np.isfinite(values).all() else 0.0
    if not norm > 0:
        raise DatasetError(f"{path}: field trg_bndbox is {box!r}, not an [x1, y1, x2, y2] box with extent")
    return norm


def parse(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``raw_dir`` -> (pairs, images) tables over the official trn/val/test splits."""
    raw_dir = Path(raw_dir)
    annotated = []
    for split in SPLITS:
        for name in track(read_layout(layout_path(raw_dir, split)), f"reading SPair-71k {split} annotations"):
            path = raw_dir / "PairAnnotation" / split / f"{name}.json"
            annotated.append((split, name, path, read_annotation(path)))
    images = {}
    for _, _, path, ann in annotated:
        for role in ("source", "target"):
            image = raw_dir / ann[role]
            if not image.is_file():
                raise DatasetError(f"{path}: points at {ann[role]}, which is not there ({image})")
            images[ann[role]] = (image, ann["category"])
    image_table = images_table(images)
    rows = [pair_row(f"{split}/{name}", split, ann["category"], ann["source"], ann["target"],
                     ann["source_xy"], ann["target_xy"], np.ones(len(ann["source_xy"]), dtype=bool),
                     ann["pck_norm"], "bbox", **ann["spair"])
            for split, name, _, ann in annotated]
    check_pair_images(rows, image_table, [str(path) for _, _, path, _ in annotated])
    return pairs_table(rows), image_table
