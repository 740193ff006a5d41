"""An embedded synthetic correspondence set: no download, deterministic from a seed.

Each category is one photograph bundled with scikit-image (astronaut, cat, coffee, motorcycle, ...),
centre-cropped to a square and resized to ``image_size``. Salient points of that base photo
(Harris corners) are the keypoints. Every image of the category is the base photo warped by
its own random homography; its keypoints are the base keypoints mapped through it (0-based
pixel centres, the convention skimage's ``warp`` and `pipeline.coords` share), invisible when
they leave the image. Images of a category are split into trn / val / test groups, so splits
share no image; pairs are the ordered pairs of distinct images within one group.
PCK normaliser: max side of the target image (``norm_kind='image'``): the warped photo fills
the whole frame, so the image plays the part of the object box.

Raw layout (``data/raw/synthetic``): ``images/<category>/<k>.png`` and ``annotations.json``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage import data as skdata
from skimage.color import gray2rgb, rgb2gray
from skimage.feature import corner_harris, corner_peaks
from skimage.transform import ProjectiveTransform, resize, warp

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import (SPLITS, check_pair_images, images_table, pair_row, pairs_table,
                                              read_json)
from semcorr.pipeline.io import atomic_path

default_conf = {
    "seed": 0,  # one seed fixes every image and keypoint
    "categories": 4,  # number of base photos (one category each), at most len(BASE_PHOTOS)
    "images_per_category": 6,  # warped images per category (>= 6: two per split)
    "image_size": 160,  # side of the square images in pixels
    "keypoints": 12,  # salient points per base photo
}

# Photos shipped inside scikit-image itself (no pooch download needed), with enough corners
# at 160 px (rocket and retina, mostly flat, are left out).
BASE_PHOTOS = {
    "astronaut": skdata.astronaut,
    "cat": skdata.chelsea,
    "coffee": skdata.coffee,
    "motorcycle": lambda: skdata.stereo_motorcycle()[0],
    "camera": skdata.camera,
    "cells": skdata.immunohistochemistry,
    "galaxies": skdata.hubble_deep_field,
    "coins": skdata.coins,
}
ANNOTATIONS = "annotations.json"
MAX_CORNER_SHIFT = 0.15  # homography: each image corner moves up to this fraction of the side


def generate(out_dir: Path, conf: dict | None = None) -> Path:
    """Write the synthetic set into ``out_dir`` (atomically): images and annotations.json."""
    conf = {**default_conf, **(conf or {})}
    n_cat, n_img, size, n_kps = (int(conf[k]) for k in ("categories", "images_per_category", "image_size", "keypoints"))
    if not 1 <= n_cat <= len(BASE_PHOTOS):
        raise ValueError(f"synthetic: categories must be 1..{len(BASE_PHOTOS)}, got {n_cat}")
    if n_img < 6:
        raise ValueError(f"synthetic: images_per_category must be >= 6 (two per split), got {n_img}")
    annotations = {"conf": conf, "norm_kind": "image", "images": {}}
    splits = _split_groups(n_img)
    bases: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # category -> (photo, salient points)
    with atomic_path(Path(out_dir)) as tmp:
        for image_id, category, k, tform in _warps(conf):
            if category not in bases:
                base = _base_photo(category, size)
                bases[category] = base, _salient_points(base, n_kps, category)
            base, base_xy = bases[category]
            image = warp(base, tform.inverse, output_shape=(size, size), order=1, mode="constant", cval=0.0)
            xy = tform(base_xy)
            visible = ((xy >= 0) & (xy <= size - 1)).all(axis=1)
            (tmp / image_id).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp / image_id)
            annotations["images"][image_id] = {"category": category, "split": splits[k],
                                               "keypoints": xy.round(6).tolist(), "visible": visible.tolist()}
        (tmp / ANNOTATIONS).write_text(json.dumps(annotations, indent=1, sort_keys=True) + "\n")
    return Path(out_dir)


def _warps(conf: dict):
    """``(image_id, category, k, homography)`` of every image, in generation order: the one
    draw of the seeded homographies that `generate` and `homographies` share."""
    n_cat, n_img, size = (int(conf[k]) for k in ("categories", "images_per_category", "image_size"))
    for index, category in enumerate(list(BASE_PHOTOS)[:n_cat]):
        rng = np.random.default_rng([int(conf["seed"]), index])
        for k in range(n_img):
            yield f"images/{category}/{k:03d}.png", category, k, _random_homography(rng, size)


def homographies(raw_dir: Path) -> dict[str, np.ndarray]:
    """image id -> ``[3, 3]`` homography from the base photo's pixels to the image's (pixel
    centres), redrawn from the seed ``annotations.json`` records. The homography from image
    a to image b is ``H[b] @ inv(H[a])``."""
    path = Path(raw_dir) / ANNOTATIONS
    if not path.is_file():
        raise DatasetError(f"{path}: annotations not found; run `semcorr download synthetic` first")
    try:
        conf = {**default_conf, **json.loads(path.read_text())["conf"]}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: no readable 'conf' record ({exc})") from None
    return {image_id: np.asarray(tform.params, dtype=np.float64) for image_id, _, _, tform in _warps(conf)}


def _base_photo(category: str, size: int) -> np.ndarray:
    """Square centre crop of the bundled photo, resized: ``[size, size, 3]`` float in [0, 1]."""
    photo = np.asarray(BASE_PHOTOS[category]())
    photo = gray2rgb(photo) if photo.ndim == 2 else photo[..., :3]
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = photo[top:top + side, left:left + side].astype(np.float64) / 255.0
    return resize(crop, (size, size), order=1, anti_aliasing=True)


def _salient_points(image: np.ndarray, count: int, category: str) -> np.ndarray:
    """The ``count`` strongest Harris corners away from the border -> ``[count, 2]`` (x, y)."""
    size = image.shape[0]
    response = corner_harris(rgb2gray(image))
    peaks = corner_peaks(response, min_distance=max(2, size // 20), exclude_border=size // 8,
                         threshold_rel=1e-3, num_peaks=count)
    if len(peaks) < count:
        raise ValueError(f"synthetic: only {len(peaks)} salient points in {category!r}; lower `keypoints`")
    return peaks[:, ::-1].astype(np.float64)


def _random_homography(rng: np.random.Generator, size: int) -> ProjectiveTransform:
    """Maps base-photo pixels to warped-image pixels: each corner moved at random."""
    corners = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], dtype=np.float64)
    moved = corners + rng.uniform(-MAX_CORNER_SHIFT, MAX_CORNER_SHIFT, size=(4, 2)) * size
    return ProjectiveTransform.from_estimate(corners, moved)


def _split_groups(n_images: int) -> list[str]:
    n_eval = max(2, n_images // 4)
    n_train = n_images - 2 * n_eval
    return ["trn"] * n_train + ["val"] * n_eval + ["test"] * n_eval


def read_annotations(path: Path) -> dict[str, dict]:
    """``annotations.json`` -> image id -> {category, split, keypoints ``[N, 2]``, visible ``[N]``};
    `DatasetError` naming the file for invalid JSON or a missing or malformed entry."""
    data = read_json(path, "annotations not found; run `semcorr download synthetic` first")
    try:
        images = data["images"]
    except (KeyError, TypeError):
        raise DatasetError(f"{path}: lacks the 'images' object") from None
    if not isinstance(images, dict):
        raise DatasetError(f"{path}: 'images' is not an object")
    for image_id, ann in images.items():
        missing = [key for key in ("category", "split", "keypoints", "visible")
                   if not isinstance(ann, dict) or key not in ann]
        if missing:
            raise DatasetError(f"{path}: image {image_id} lacks {missing}")
        try:
            xy = np.asarray(ann["keypoints"], dtype=np.float64)
        except (TypeError, ValueError):
            xy = np.empty(0)
        if ann["split"] not in SPLITS or xy.ndim != 2 or xy.shape[1] != 2 or np.shape(ann["visible"]) != xy.shape[:1]:
            raise DatasetError(f"{path}: image {image_id} needs a split in {SPLITS}, keypoints [N, 2] "
                               "and N visible flags")
    return images


def parse(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``raw_dir`` -> (pairs, images) tables: ordered pairs of distinct images per category and split."""
    raw_dir = Path(raw_dir)
    path = raw_dir / ANNOTATIONS
    annotations = read_annotations(path)
    image_table = images_table({image_id: (raw_dir / image_id, ann["category"])
                                for image_id, ann in annotations.items()})
    sizes = image_table.set_index("image_id")
    groups: dict[tuple[str, str], list[str]] = {}
    for image_id, ann in sorted(annotations.items()):
        groups.setdefault((ann["category"], ann["split"]), []).append(image_id)
    rows = []
    for (category, split), members in sorted(groups.items()):
        for source, target in itertools.permutations(members, 2):
            src, trg = annotations[source], annotations[target]
            visible = np.logical_and(src["visible"], trg["visible"])
            if not visible.any():
                continue
            rows.append(pair_row(f"{split}/{category}/{Path(source).stem}-{Path(target).stem}", split, category,
                                 source, target, np.asarray(src["keypoints"]), np.asarray(trg["keypoints"]),
                                 visible, float(sizes.loc[target, ["width", "height"]].max()), "image"))
    for split in SPLITS:
        if not any(row["split"] == split for row in rows):
            raise DatasetError(f"{path}: no pairs in split {split!r} (each needs two images of one category "
                               "sharing a visible keypoint)")
    check_pair_images(rows, image_table, str(path))
    return pairs_table(rows), image_table
