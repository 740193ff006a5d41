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
    Optional (`OPTIONAL_PAIR_COLUMNS`; absent or null where the dataset does not define them):
    kp_ids: list<int> of length N, each keypoint's id in its category's keypoint list;
    flip_index: list<int> of length N, the position in this row of each keypoint's mirror
        counterpart (itself if central; -1 if the counterpart is not in the row);
    geo_aware: list<bool> of length N, the geometry-aware flags (`pipeline.symmetry`);
    source_bbox, target_bbox: list<float64> [x1, y1, x2, y2], the object boxes (SPair-71k).

Optional image columns (`OPTIONAL_IMAGE_COLUMNS`, null for an image without a mask):
    mask_path: str, the dataset's object mask; mask: bytes, that mask as a 0/1 label map packed
    by `encode_mask` (after prepare the pipeline reads masks from here, never from image files).

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
OPTIONAL_PAIR_COLUMNS = ["kp_ids", "flip_index", "geo_aware"]
BOX_COLUMNS = ["source_bbox", "target_bbox"]
OPTIONAL_IMAGE_COLUMNS = ["mask_path", "mask"]
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
    columns = IMAGE_COLUMNS + [c for c in OPTIONAL_IMAGE_COLUMNS if c in images.columns]
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir(parents=True)
        images[columns].to_parquet(tmp / "images.parquet", index=False)
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
    return Path(out_dir)


def read_pairs(prepared_dir: Path, split: str | None = None) -> pd.DataFrame:
    pairs = _read(Path(prepared_dir) / "pairs.parquet", PAIR_COLUMNS)
    return pairs if split is None else pairs[pairs["split"] == split].reset_index(drop=True)


def read_images(prepared_dir: Path) -> pd.DataFrame:
    return _read(Path(prepared_dir) / "images.parquet", IMAGE_COLUMNS)


def validate(pairs: pd.DataFrame, images: pd.DataFrame, where: str) -> None:
    """Raise `TableError` naming ``where`` on missing columns, unknown image ids,
    NaN keypoints, keypoints outside their image beyond half a pixel, optional per-keypoint
    lists of another length than the keypoints, or masks of another size than their image."""
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
    _validate_optional(pairs, images, where)


def _validate_optional(pairs: pd.DataFrame, images: pd.DataFrame, where: str) -> None:
    for column in [c for c in OPTIONAL_PAIR_COLUMNS if c in pairs.columns]:
        for pair_id, n_flags, values in zip(pairs["pair_id"], pairs["visible"].map(len), pairs[column]):
            if values is None or (np.ndim(values) == 0 and pd.isna(values)):
                continue
            if len(values) != n_flags:
                raise TableError(f"{where}: pair {pair_id} has {len(values)} {column} values for {n_flags} keypoints")
            if column == "flip_index" and any(not -1 <= int(v) < n_flags for v in values):
                raise TableError(f"{where}: pair {pair_id} has flip_index values outside -1..{n_flags - 1}")
    for column in [c for c in BOX_COLUMNS if c in pairs.columns]:
        for pair_id, box in zip(pairs["pair_id"], pairs[column]):
            if box is None or (np.ndim(box) == 0 and pd.isna(box)):
                continue
            box = np.asarray(box, dtype=np.float64)
            if box.shape != (4,) or not np.isfinite(box).all() or box[2] < box[0] or box[3] < box[1]:
                raise TableError(f"{where}: pair {pair_id} has {column} {box.tolist()}, not [x1, y1, x2, y2]")
    if "mask" in images.columns:
        for row in images.itertuples(index=False):
            if row.mask is not None:
                try:
                    decode_mask(row.mask, row.height, row.width)
                except (TableError, ValueError) as exc:
                    raise TableError(f"{where}: image {row.image_id!r}: {exc}") from None


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


# -- video datasets -----------------------------------------------------------------------
# A video dataset is prepared into the images table above (every frame is an image, so the
# extract stage and the feature store serve it unchanged) plus:
#
# ``<prepared>/frames.parquet``: one row per frame
#     sequence: str, frame: int (0-based, consecutive within a sequence), image_id: str
# ``<prepared>/masks.parquet`` (segmentation sets): one row per annotated frame
#     sequence, frame, image_id, height: int, width: int,
#     mask: bytes, the ``[height, width]`` uint8 label map (0 background, 1..N objects,
#     255 void) as zlib-compressed row-major bytes (`encode_mask` / `decode_mask`)
# ``<prepared>/keypoints.parquet`` (pose sets): one row per annotated frame
#     sequence, frame, image_id, kps: list<float64> of length 2J (x0, y0, x1, y1, ...) in
#     original-image pixel centres (`pipeline.coords`), visible: list<bool> of length J

FRAME_COLUMNS = ["sequence", "frame", "image_id"]
MASK_COLUMNS = ["sequence", "frame", "image_id", "height", "width", "mask"]
VIDEO_KEYPOINT_COLUMNS = ["sequence", "frame", "image_id", "kps", "visible"]
VIDEO_TABLES = {"frames": FRAME_COLUMNS, "masks": MASK_COLUMNS, "keypoints": VIDEO_KEYPOINT_COLUMNS}


def encode_mask(labels: np.ndarray) -> bytes:
    """``[H, W]`` label map (values 0..255) -> zlib-compressed uint8 bytes."""
    import zlib

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"a mask must be a [H, W] map of values 0..255, got shape {labels.shape}")
    return zlib.compress(np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), 1)


def decode_mask(data: bytes, height: int, width: int) -> np.ndarray:
    """`encode_mask` bytes -> ``[height, width]`` uint8 label map."""
    import zlib

    flat = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
    if flat.size != int(height) * int(width):
        raise TableError(f"a mask holds {flat.size} pixels, not {height}x{width}")
    return flat.reshape(int(height), int(width))


MASK_VOID = 255  # label of pixels the annotators left undecided (DAVIS); scored as background


def mask_objects(labels: np.ndarray) -> int:
    """Objects of a sequence from its first label map: the largest label that is not void."""
    labels = np.asarray(labels)
    return int(labels[labels != MASK_VOID].max(initial=0))


def write_video_tables(out_dir: Path, images: pd.DataFrame, frames: pd.DataFrame,
                       masks: pd.DataFrame | None = None, keypoints: pd.DataFrame | None = None) -> Path:
    """Validate and write the images, frames and label tables into ``out_dir`` atomically."""
    validate_video(images, frames, masks, keypoints, where=str(out_dir))
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir(parents=True)
        images[IMAGE_COLUMNS].to_parquet(tmp / "images.parquet", index=False)
        frames[FRAME_COLUMNS].to_parquet(tmp / "frames.parquet", index=False)
        if masks is not None:
            masks[MASK_COLUMNS].to_parquet(tmp / "masks.parquet", index=False)
        if keypoints is not None:
            keypoints[VIDEO_KEYPOINT_COLUMNS].to_parquet(tmp / "keypoints.parquet", index=False)
    return Path(out_dir)


def read_frames(prepared_dir: Path) -> pd.DataFrame:
    """The frames table, sorted by sequence and frame."""
    table = _read(Path(prepared_dir) / "frames.parquet", FRAME_COLUMNS)
    return table.sort_values(["sequence", "frame"], ignore_index=True)


def read_video_labels(prepared_dir: Path, kind: str) -> pd.DataFrame | None:
    """The ``masks`` or ``keypoints`` table of a prepared video dataset; None if it has none."""
    path = Path(prepared_dir) / f"{kind}.parquet"
    if not path.exists():
        return None
    return _read(path, VIDEO_TABLES[kind]).sort_values(["sequence", "frame"], ignore_index=True)


def validate_video(images: pd.DataFrame, frames: pd.DataFrame, masks: pd.DataFrame | None,
                   keypoints: pd.DataFrame | None, where: str) -> None:
    """Raise `TableError` naming ``where`` on missing columns, unknown image ids, gaps in a
    sequence's frame numbers, a mask whose size is not its image's, or malformed keypoints."""
    for name, table, cols in (("images", images, IMAGE_COLUMNS), ("frames", frames, FRAME_COLUMNS),
                              ("masks", masks, MASK_COLUMNS), ("keypoints", keypoints, VIDEO_KEYPOINT_COLUMNS)):
        missing = set(cols) - set(table.columns) if table is not None else set()
        if missing:
            raise TableError(f"{where}: {name} table lacks columns {sorted(missing)}")
    if masks is None and keypoints is None:
        raise TableError(f"{where}: a video dataset needs a masks or a keypoints table")
    if images["image_id"].duplicated().any():
        raise TableError(f"{where}: image id {images.loc[images['image_id'].duplicated(), 'image_id'].iloc[0]!r} "
                         "appears twice")
    sizes = images.set_index("image_id")[["width", "height"]]
    unknown = set(frames["image_id"]) - set(sizes.index)
    if unknown:
        raise TableError(f"{where}: frames point at image {sorted(unknown)[0]!r}, which is not in the images table")
    for sequence, group in frames.groupby("sequence"):
        numbers = np.sort(group["frame"].to_numpy())
        if not np.array_equal(numbers, np.arange(len(numbers))):
            raise TableError(f"{where}: sequence {sequence!r} has frames {numbers.tolist()[:8]}..., "
                             "not 0, 1, 2, ... without gaps")
    by_frame = frames.set_index(["sequence", "frame"])["image_id"]
    for name, table in (("masks", masks), ("keypoints", keypoints)):
        if table is None:
            continue
        for row in table.itertuples(index=False):
            key = (row.sequence, row.frame)
            if key not in by_frame.index or by_frame.loc[key] != row.image_id:
                raise TableError(f"{where}: {name} row for {row.sequence} frame {row.frame} ({row.image_id}) "
                                 "matches no frame")
            w, h = sizes.loc[row.image_id]
            if name == "masks" and (int(row.height), int(row.width)) != (int(h), int(w)):
                raise TableError(f"{where}: mask of {row.image_id} is {row.width}x{row.height}, its image {w}x{h}")
            if name == "keypoints" and len(row.kps) != 2 * len(row.visible):
                raise TableError(f"{where}: {row.image_id} has {len(row.kps) // 2} keypoints but "
                                 f"{len(row.visible)} visibility flags")
        first = set(table.loc[table["frame"] == 0, "sequence"])
        lacking = sorted(set(frames["sequence"]) - first)
        if lacking:
            raise TableError(f"{where}: sequence {lacking[0]!r} has no first-frame {name[:-1]} annotation")
