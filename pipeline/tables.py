"""The normalised pair and image tables every dataset is prepared into.

``<prepared>/images.parquet``: one row per unique image
    image_id: str, path: str (absolute, or relative to the working directory),
    width: int, height: int, category: str

``<prepared>/pairs.parquet``: one row per ordered (source, target) pair
    pair_id: str, split: str ('trn' | 'val' | 'test'), category: str,
    source_id: str, target_id: str,
    source_kps, target_kps: list<float64> of length 2N, flattened (x0, y0, x1, y1, ...)
        in original-image pixel centres (see `pipeline.coords`),
    visible: list<bool> of length N (keypoint annotated in both images),
    pck_norm: float64, the PCK normaliser in target pixels,
    norm_kind: str ('bbox' | 'image' | 'kpts'),
    and, for SPair-71k (null elsewhere): viewpoint_variation, scale_variation,
    truncation, occlusion (int), flip (bool).

Readers get keypoints as ``[N, 2]`` arrays through `keypoints`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline.io import atomic_path

PAIR_COLUMNS = [
    "pair_id", "split", "category", "source_id", "target_id",
    "source_kps", "target_kps", "visible", "pck_norm", "norm_kind",
]
SPAIR_COLUMNS = ["viewpoint_variation", "scale_variation", "truncation", "occlusion", "flip"]
IMAGE_COLUMNS = ["image_id", "path", "width", "height", "category"]
NORM_KINDS = {"bbox": "max side of the target bounding box",
              "image": "max side of the target image",
              "kpts": "max side of the target keypoints' bounding box"}


class TableError(ValueError):
    """A prepared table is malformed; the message names the file."""


def keypoints(flat) -> np.ndarray:
    """Flattened ``[2N]`` keypoints -> ``[N, 2]`` float64."""
    return np.asarray(flat, dtype=np.float64).reshape(-1, 2)


def flatten(xy: np.ndarray) -> list[float]:
    return np.asarray(xy, dtype=np.float64).reshape(-1).tolist()


def write_tables(out_dir: Path, pairs: pd.DataFrame, images: pd.DataFrame) -> Path:
    """Validate and write both tables into ``out_dir`` atomically (all or nothing)."""
    validate(pairs, images, where=str(out_dir))
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir(parents=True)
        images[IMAGE_COLUMNS].to_parquet(tmp / "images.parquet", index=False)
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
    return Path(out_dir)


def read_pairs(prepared_dir: Path, split: str | None = None) -> pd.DataFrame:
    pairs = _read(Path(prepared_dir) / "pairs.parquet", PAIR_COLUMNS)
    return pairs if split is None else pairs[pairs["split"] == split].reset_index(drop=True)


def read_images(prepared_dir: Path) -> pd.DataFrame:
    return _read(Path(prepared_dir) / "images.parquet", IMAGE_COLUMNS)


def validate(pairs: pd.DataFrame, images: pd.DataFrame, where: str) -> None:
    """Raise `TableError` naming ``where`` on missing columns, unknown image ids,
    NaN keypoints or keypoints outside their image beyond half a pixel."""
    for name, table, cols in (("pairs", pairs, PAIR_COLUMNS), ("images", images, IMAGE_COLUMNS)):
        missing = set(cols) - set(table.columns)
        if missing:
            raise TableError(f"{where}: {name} table lacks columns {sorted(missing)}")
    if images["image_id"].duplicated().any():
        dup = images.loc[images["image_id"].duplicated(), "image_id"].iloc[0]
        raise TableError(f"{where}: image id {dup!r} appears twice")
    sizes = images.set_index("image_id")[["width", "height"]]
    for row in pairs.itertuples(index=False):
        for role, image_id, flat in (("source", row.source_id, row.source_kps), ("target", row.target_id, row.target_kps)):
            if image_id not in sizes.index:
                raise TableError(f"{where}: pair {row.pair_id} points at {role} image {image_id!r}, which is not there")
            xy = keypoints(flat)
            vis = np.asarray(row.visible, dtype=bool)
            if len(xy) != len(vis):
                raise TableError(f"{where}: pair {row.pair_id} has {len(xy)} {role} keypoints but {len(vis)} visibility flags")
            if np.isnan(xy[vis]).any():
                raise TableError(f"{where}: pair {row.pair_id} has NaN {role} keypoints")
            w, h = sizes.loc[image_id]
            if len(xy[vis]) and (
                (xy[vis] < -KEYPOINT_TOLERANCE).any()
                or (xy[vis, 0] > w - 1 + KEYPOINT_TOLERANCE).any()
                or (xy[vis, 1] > h - 1 + KEYPOINT_TOLERANCE).any()
            ):
                raise TableError(
                    f"{where}: pair {row.pair_id} has {role} keypoints outside image {image_id!r} ({w}x{h})"
                )


# Annotations sit on pixel centres; allow a few pixels of annotator slack at the border.
KEYPOINT_TOLERANCE = 2.0


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise TableError(f"{path}: not found; run `semcorr prepare` for this dataset first")
    table = pd.read_parquet(path)
    missing = set(columns) - set(table.columns)
    if missing:
        raise TableError(f"{path}: lacks columns {sorted(missing)}")
    return table
