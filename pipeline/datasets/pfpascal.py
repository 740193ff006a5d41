"""PF-PASCAL (Proposal Flow, Ham et al. 2017) with the trn/val/test pair lists of
WeakAlign/SD4Match.

Raw layout (``data/raw/pfpascal``): ``PF-dataset-PASCAL/JPEGImages/*.jpg`` and
``{trn,val,test}_pairs.csv`` with columns ``source_image,target_image,class,XA,YA,XB,YB``
(paths relative to the raw folder, ``class`` 1..20 in PASCAL VOC order, coordinates as
``;``-separated MATLAB 1-based lists, converted with `from_matlab`). A ``flip`` column,
present in the training list, marks pairs the original loaders mirror on the fly; the
keypoints are given for the unmirrored images, so such rows are kept as they are and
duplicates of a (source, target) pair within a split are dropped. PCK normaliser: max side
of the target image (``norm_kind='image'``), the dataset's standard convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline.coords import from_matlab
from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import (SPLITS, check_pair_images, images_table, number, pair_row, pairs_table,
                                              read_csv_rows, relative_image)

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor")
COLUMNS = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")


def pair_list_path(raw_dir: Path, split: str) -> Path:
    return Path(raw_dir) / f"{split}_pairs.csv"


def read_pair_list(csv_path: Path) -> list[dict]:
    """Parse one pair list (no image access) -> one dict per unique (source, target) row:
    source, target (relative paths), category, source_xy / target_xy ``[N, 2]`` 0-based."""
    csv_path = Path(csv_path)
    header, rows = read_csv_rows(csv_path)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}: lacks columns {missing}")
    pairs, seen = [], set()
    for line, values in rows:
        where = f"{csv_path}: row {line}"
        key = (values["source_image"], values["target_image"])
        if key in seen:
            continue
        seen.add(key)
        xa, ya, xb, yb = (_numbers(values[c], where, c) for c in ("XA", "YA", "XB", "YB"))
        if not len(xa) == len(ya) == len(xb) == len(yb):
            raise DatasetError(f"{where}: keypoint lists differ in length "
                               f"(XA {len(xa)}, YA {len(ya)}, XB {len(xb)}, YB {len(yb)})")
        try:
            category = CLASSES[int(values["class"]) - 1]
        except (ValueError, IndexError):
            raise DatasetError(f"{where}: class {values['class']!r} is not 1..{len(CLASSES)}") from None
        pairs.append({"source": relative_image(key[0], where), "target": relative_image(key[1], where),
                      "category": category, "source_xy": from_matlab(np.stack([xa, ya], axis=1)),
                      "target_xy": from_matlab(np.stack([xb, yb], axis=1))})
    return pairs


def _numbers(text: str, where: str, column: str) -> np.ndarray:
    """A ``;``-separated list of coordinates -> ``[N]`` float64."""
    return np.array([number(v, where, column) for v in text.split(";")], dtype=np.float64)


def parse(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``raw_dir`` -> (pairs, images) tables over the trn, val and test lists."""
    raw_dir = Path(raw_dir)
    lists = {split: read_pair_list(pair_list_path(raw_dir, split)) for split in SPLITS}
    images = {}
    for split, pairs in lists.items():
        for pair in pairs:
            for role in ("source", "target"):
                path = raw_dir / pair[role]
                if not path.is_file():
                    raise DatasetError(f"{pair_list_path(raw_dir, split)}: a pair points at {pair[role]}, "
                                       f"which is not there ({path})")
                images[pair[role]] = (path, pair["category"])
    image_table = images_table(images)
    sizes = image_table.set_index("image_id")
    rows = []
    for split, pairs in lists.items():
        split_rows = []
        for index, pair in enumerate(pairs):
            target = sizes.loc[pair["target"]]
            split_rows.append(pair_row(
                f"{split}/{index:05d}", split, pair["category"], pair["source"], pair["target"],
                pair["source_xy"], pair["target_xy"], np.ones(len(pair["source_xy"]), dtype=bool),
                float(max(target["width"], target["height"])), "image"))
        check_pair_images(split_rows, image_table, str(pair_list_path(raw_dir, split)))
        rows += split_rows
    return pairs_table(rows), image_table
