"""PF-WILLOW (Proposal Flow, Ham et al. 2016): test pairs only.

Raw layout (``data/raw/pfwillow``): ``PF-dataset/<class>/*.png`` and ``test_pairs.csv``
with columns ``imageA,imageB,XA1..XAn,YA1..YAn,XB1..XBn,YB1..YBn``: paths relative to the
raw folder, MATLAB 1-based coordinates (converted with `from_matlab`). Every keypoint is
annotated in both images. PCK normaliser: max side of the target keypoints' bounding box
(``norm_kind='kpts'``), the dataset's standard convention.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from semcorr.pipeline.coords import from_matlab
from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import (check_pair_images, images_table, kpts_norm, number, pair_row,
                                              pairs_table, read_csv_rows, relative_image)

PAIR_LIST = "test_pairs.csv"


def read_pair_list(csv_path: Path) -> list[dict]:
    """Parse the pair list -> one dict per row: source, target (relative paths), category
    (the image's class folder), source_xy / target_xy ``[N, 2]`` 0-based pixel centres."""
    csv_path = Path(csv_path)
    header, rows = read_csv_rows(csv_path)
    coords = {axis: sorted((c for c in header if c.startswith(axis) and c[2:].isdigit()), key=lambda c: int(c[2:]))
              for axis in ("XA", "YA", "XB", "YB")}
    if {"imageA", "imageB"} - set(header) or len({len(v) for v in coords.values()}) != 1 or not coords["XA"]:
        raise DatasetError(f"{csv_path}: expected columns imageA, imageB, XA1.., YA1.., XB1.., YB1..")
    pairs = []
    for line, values in rows:
        where = f"{csv_path}: row {line}"
        xy = {axis: [number(values[c], where, c) for c in columns] for axis, columns in coords.items()}
        source, target = (relative_image(values[c], where) for c in ("imageA", "imageB"))
        pairs.append({"source": source, "target": target, "category": PurePosixPath(source).parent.name,
                      "source_xy": from_matlab(np.stack([xy["XA"], xy["YA"]], axis=1)),
                      "target_xy": from_matlab(np.stack([xy["XB"], xy["YB"]], axis=1))})
    return pairs


def parse(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``raw_dir`` -> (pairs, images) tables."""
    raw_dir = Path(raw_dir)
    csv_path = raw_dir / PAIR_LIST
    pairs = read_pair_list(csv_path)
    images = {}
    for pair in pairs:
        for role in ("source", "target"):
            images[pair[role]] = (raw_dir / pair[role], pair["category"])
    for image_id, (path, _) in images.items():
        if not path.is_file():
            raise DatasetError(f"{csv_path}: a pair points at {image_id}, which is not there ({path})")
    image_table = images_table(images)
    rows = []
    for index, pair in enumerate(pairs):
        visible = np.ones(len(pair["source_xy"]), dtype=bool)
        rows.append(pair_row(f"test/{index:05d}", "test", pair["category"], pair["source"], pair["target"],
                             pair["source_xy"], pair["target_xy"], visible,
                             kpts_norm(pair["target_xy"], visible), "kpts"))
    check_pair_images(rows, image_table, str(csv_path))
    return pairs_table(rows), image_table
