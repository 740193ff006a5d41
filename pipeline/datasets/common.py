"""Shared pieces of the dataset parsers: pair-list CSV rows, numbers and image paths, image
headers, keypoint checks, PCK normalisers, rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image
from rich.console import Console
from rich.progress import track as _track

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.tables import IMAGE_COLUMNS, KEYPOINT_TOLERANCE, PAIR_COLUMNS, SPAIR_COLUMNS, flatten

SPLITS = ("trn", "val", "test")

_console = Console(stderr=True)


def track(items, description: str):
    """Progress bar for long loops (hidden when it ends)."""
    return _track(items, description=description, console=_console, transient=True)


def read_json(path: Path, missing: str):
    """The JSON value in ``path``; `DatasetError` naming the file when it is absent (``missing``
    says what it is and what to do) or not valid JSON."""
    if not path.is_file():
        raise DatasetError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A pair list -> (header, [(row number, {column: text})]); the header is row 1, blank
    lines are skipped. `DatasetError` naming the file (and the row) for a missing, unreadable,
    empty or header-only file, and for a row whose field count differs from the header's."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: pair list not found")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: empty file; expected a header row, then one row per pair")
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DatasetError(f"{path}: row {reader.line_num}: {len(fields)} fields, "
                                       f"expected {len(header)} (as in the header)")
                rows.append((reader.line_num, dict(zip(header, fields))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({exc})") from exc
    if not rows:
        raise DatasetError(f"{path}: no pairs (a header and no rows)")
    return header, rows


def number(text: str, where: str, column: str) -> float:
    """One coordinate field -> float; `DatasetError` naming ``where`` and ``column`` unless it
    is a finite number."""
    text = text.strip()
    if not text or text.lower() == "nan":
        raise DatasetError(f"{where}: NaN keypoints (column {column} is {text!r})")
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: column {column} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: column {column} is {text!r}, not a finite number")
    return value


def relative_image(text: str, where: str) -> str:
    """An image path read from an annotation, checked to stay inside the raw dataset folder
    (not absolute, no ``..``): `DatasetError` naming ``where`` otherwise."""
    pure = PurePosixPath(text.replace("\\", "/"))
    if not text or pure.is_absolute() or ".." in pure.parts:
        raise DatasetError(f"{where}: image path {text!r} lies outside the raw dataset folder")
    return text


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header; the file is checked with PIL ``verify()``
    (structure and, for PNG, chunk checksums) without decoding all pixels."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except Exception as exc:  # PIL raises many types for broken files
        raise DatasetError(f"{path}: corrupt or unreadable image ({type(exc).__name__}: {exc})") from exc
    return int(size[0]), int(size[1])


def images_table(images: dict[str, tuple[Path, str]]) -> pd.DataFrame:
    """``images``: image_id -> (path, category) -> the images table, sizes read from headers."""
    rows = []
    for image_id, (path, category) in track(sorted(images.items()), "reading image headers"):
        width, height = image_size(path)
        rows.append({"image_id": image_id, "path": str(path), "width": width, "height": height,
                     "category": category})
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def check_keypoints(xy: np.ndarray, visible: np.ndarray, size: tuple[int, int], where: str) -> None:
    """Raise `DatasetError` naming ``where`` on NaN visible keypoints or ones outside the
    ``(width, height)`` image beyond `KEYPOINT_TOLERANCE` pixels."""
    xy = np.asarray(xy, dtype=np.float64)[np.asarray(visible, dtype=bool)]
    if np.isnan(xy).any():
        raise DatasetError(f"{where}: NaN keypoints")
    w, h = size
    outside = ((xy < -KEYPOINT_TOLERANCE).any(axis=1) | (xy[:, 0] > w - 1 + KEYPOINT_TOLERANCE)
               | (xy[:, 1] > h - 1 + KEYPOINT_TOLERANCE))
    if outside.any():
        raise DatasetError(f"{where}: keypoint {xy[outside][0].tolist()} lies outside the {w}x{h} image")


def bbox_norm(box) -> float:
    """Max side of an ``[x1, y1, x2, y2]`` box (SPair-71k convention)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(x2 - x1, y2 - y1)


def kpts_norm(xy: np.ndarray, visible: np.ndarray) -> float:
    """Max side of the bounding box of the visible keypoints ``[N, 2]`` (PF-WILLOW convention)."""
    pts = np.asarray(xy, dtype=np.float64)[np.asarray(visible, dtype=bool)]
    return float((pts.max(axis=0) - pts.min(axis=0)).max())


def pair_row(pair_id: str, split: str, category: str, source_id: str, target_id: str,
             source_xy: np.ndarray, target_xy: np.ndarray, visible: np.ndarray,
             pck_norm: float, norm_kind: str, **spair) -> dict:
    row = {"pair_id": pair_id, "split": split, "category": category, "source_id": source_id,
           "target_id": target_id, "source_kps": flatten(source_xy), "target_kps": flatten(target_xy),
           "visible": [bool(v) for v in visible], "pck_norm": float(pck_norm), "norm_kind": norm_kind}
    row.update({key: spair.get(key) for key in SPAIR_COLUMNS})
    return row


def pairs_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=PAIR_COLUMNS + SPAIR_COLUMNS)
    for key in ("viewpoint_variation", "scale_variation", "truncation", "occlusion"):
        table[key] = table[key].astype("Int64")
    table["flip"] = table["flip"].astype("boolean")
    return table


def check_pair_images(rows: list[dict], images: pd.DataFrame, where: str | list[str]) -> None:
    """Every visible keypoint of every pair must lie inside its image (sizes from ``images``).
    ``where``: the annotation file, one for all rows or one per row."""
    sizes = {r.image_id: (r.width, r.height) for r in images.itertuples(index=False)}
    wheres = [where] * len(rows) if isinstance(where, str) else where
    for row, place in zip(rows, wheres):
        for role in ("source", "target"):
            xy = np.asarray(row[f"{role}_kps"]).reshape(-1, 2)
            image_id = row[f"{role}_id"]
            check_keypoints(xy, row["visible"], sizes[image_id], f"{place}: pair {row['pair_id']} ({role} {image_id})")
