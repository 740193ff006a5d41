"""SPair-71k (Min et al. 2019).

Raw layout (``data/raw/spair``): ``Layout/large/{trn,val,test}.txt`` list the official pairs
(one ``<pair name>`` a line); each has ``PairAnnotation/<split>/<pair name>.json`` with
``src_imname``, ``trg_imname``, ``category``, ``src_kps`` / ``trg_kps`` (``[N, 2]``, the
keypoints annotated in both images, already 0-based pixel coordinates, as every public
loader uses them), ``src_bndbox`` / ``trg_bndbox`` (``[x1, y1, x2, y2]``), ``kps_ids``,
``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion`` and ``mirror``
(stored as ``flip``). Images: ``JPEGImages/<category>/<imname>``. PCK normaliser: max side of
the target bounding box (``norm_kind='bbox'``), the dataset's standard convention.

Geometry-aware columns (`pipeline.symmetry`): ``kps_ids`` (the keypoints' ids, in ``src_kps``
order) become ``kp_ids`` and, with the category's left/right table, ``flip_index``; a pair
whose ``kps_ids`` is missing or not one id per keypoint gets neither (nor flags). The flags
(``geo_aware``) also need to know which counterparts the target shows, which only the target's
``ImageAnnotation/<category>/<stem>.json`` (``kps``: id -> ``[x, y]`` or null) says; without an
``ImageAnnotation`` folder they stay null. Masks: with a ``Segmentation`` folder, every image
needs ``Segmentation/<category>/<stem>.png`` (object = nonzero pixels, the image's size); the
images table gets ``mask_path`` and the packed 0/1 ``mask`` (`pipeline.tables.encode_mask`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import (SPLITS, bbox_norm, check_pair_images, images_table, pair_row,
                                              pairs_table, read_json, track)
from semcorr.pipeline.symmetry import flip_index, geo_aware_flags, keypoint_set
from semcorr.pipeline.tables import encode_mask

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
    data = read_json(path, "pair annotation not found")
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
            "kp_ids": _kp_ids(data.get("kps_ids"), len(src), path),
            "pck_norm": _box_norm(data["trg_bndbox"], path),
            "target_bbox": _box(data["trg_bndbox"], path, "trg_bndbox"),
            "source_bbox": _box(data["src_bndbox"], path, "src_bndbox") if "src_bndbox" in data else None,
            "spair": {**{flag: _flag(data, flag, path) for flag in FLAGS}, "flip": bool(data.get("mirror", 0))}}


def _kp_ids(value, n: int, path: Path) -> list[int] | None:
    """``kps_ids`` as ints; None when absent or not one id per keypoint."""
    if not isinstance(value, list) or len(value) != n:
        return None
    try:
        ids = [int(v) for v in value]
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: field kps_ids is {value!r}, not a list of keypoint ids") from None
    return ids


def read_image_keypoints(path: Path) -> list[int]:
    """Ids of the keypoints annotated in one ``ImageAnnotation`` file (``kps``: id -> point or null)."""
    if not path.is_file():
        raise DatasetError(f"{path}: image annotation not found (needed for the geometry-aware flags)")
    try:
        kps = json.loads(path.read_text())["kps"]
        return sorted(int(k) for k, point in kps.items() if point is not None)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DatasetError(f"{path}: not an image annotation with a 'kps' object of id -> point ({exc})") from None


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool object mask (nonzero pixels) of an image of ``size`` (width, height)."""
    if not path.is_file():
        raise DatasetError(f"{path}: segmentation mask not found")
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
    except Exception as exc:  # PIL raises many types for broken files
        raise DatasetError(f"{path}: corrupt or unreadable mask ({type(exc).__name__}: {exc})") from exc
    if mask.shape != (size[1], size[0]):
        raise DatasetError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {size[0]}x{size[1]}")
    return mask


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not set(name) & {"/", "\\"}


def _flag(data: dict, field: str, path: Path) -> int:
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{path}: field {field} is {value!r}, not an integer")
    return value


def _box(box, path: Path, field: str) -> list[float]:
    """``[x1, y1, x2, y2]``; `DatasetError` unless the box is four numbers with extent."""
    try:
        values = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.empty(0)
    norm = bbox_norm(values) if values.shape == (4,) and np.isfinite(values).all() else 0.0
    if not norm > 0:
        raise DatasetError(f"{path}: field {field} is {box!r}, not an [x1, y1, x2, y2] box with extent")
    return values.tolist()


def _box_norm(box, path: Path) -> float:
    """PCK normaliser: max side of the target box."""
    return bbox_norm(np.asarray(_box(box, path, "trg_bndbox")))


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
    if (raw_dir / "Segmentation").is_dir():
        _add_masks(raw_dir, image_table)
    rows = [pair_row(f"{split}/{name}", split, ann["category"], ann["source"], ann["target"],
                     ann["source_xy"], ann["target_xy"], np.ones(len(ann["source_xy"]), dtype=bool),
                     ann["pck_norm"], "bbox", **ann["spair"])
            for split, name, _, ann in annotated]
    check_pair_images(rows, image_table, [str(path) for _, _, path, _ in annotated])
    pairs = pairs_table(rows)
    for column in ("source_bbox", "target_bbox"):  # the protocols' bbox normaliser in any frame
        pairs[column] = [ann[column] for _, _, _, ann in annotated]
    _add_symmetry(raw_dir, pairs, [(path, ann) for _, _, path, ann in annotated])
    return pairs, image_table


def _add_symmetry(raw_dir: Path, pairs: pd.DataFrame, annotated: list[tuple[Path, dict]]) -> None:
    """Columns kp_ids, flip_index and geo_aware (null where not defined), in place."""
    with_targets = (raw_dir / "ImageAnnotation").is_dir()
    target_ids: dict[str, list[int]] = {}
    kp_ids, flips, flags = [], [], []
    for (path, ann), visible in zip(annotated, pairs["visible"]):
        kset, ids = keypoint_set("spair", ann["category"]), ann["kp_ids"]
        if kset is None or ids is None:
            kp_ids.append(ids), flips.append(None), flags.append(None)
            continue
        try:
            flips.append(flip_index(kset, ids))
            if with_targets:
                target = ann["target"]
                if target not in target_ids:
                    stem = Path(target).with_suffix(".json").name
                    target_ids[target] = read_image_keypoints(raw_dir / "ImageAnnotation" / ann["category"] / stem)
                flags.append(geo_aware_flags(kset, ids, visible, target_ids[target]))
            else:
                flags.append(None)
        except ValueError as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"{path}: kps_ids: {exc}") from None
        kp_ids.append(ids)
    pairs["kp_ids"], pairs["flip_index"], pairs["geo_aware"] = kp_ids, flips, flags


def _add_masks(raw_dir: Path, images: pd.DataFrame) -> None:
    """Columns mask_path and mask from ``Segmentation/<category>/<stem>.png``, in place."""
    paths, masks = [], []
    for row in track(list(images.itertuples(index=False)), "reading SPair-71k masks"):
        relative = Path("Segmentation", *Path(row.image_id).parts[1:]).with_suffix(".png")
        masks.append(encode_mask(read_mask(raw_dir / relative, (int(row.width), int(row.height))).astype(np.uint8)))
        paths.append(str(raw_dir / relative))
    images["mask_path"], images["mask"] = paths, masks
