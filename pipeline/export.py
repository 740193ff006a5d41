"""Export predicted matches to HDF5 in the layout of hloc's match files.

One group per pair, named by `names_to_pair` (``<source>/<target>``, '/' inside names
replaced by '-'), holding:

    matches0    [N] int32    index into keypoints1 of source keypoint i's match; -1: none
                             (no finite source keypoint, or flagged unreliable)
    scores0     [N] float32  peak cosine similarity (0 where matches0 is -1 for lack of a prediction)
    keypoints0  [N, 2] float64  source keypoints (pixels, 0-based pixel centres)
    keypoints1  [N, 2] float64  target "keypoints" = the predicted points, keypoints1[i] for keypoint i

and the pair id as the group attr ``pair_id``. A pair repeating the source and target of an
earlier one (hloc has no name for it) is stored as ``<source>/<target>#<pair_id>``. Read it with h5py as hloc does:
``f[names_to_pair(a, b)]["matches0"]``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from pipeline.io import atomic_path
from pipeline.tables import keypoints


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's pair key."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def write_matches_h5(path: Path, pairs: pd.DataFrame, predictions: pd.DataFrame) -> Path:
    """Write the predictions table (pair_id, kp_index, x, y, score, reliable) of the pairs
    of ``pairs`` (prepared pair table) to ``path`` atomically."""
    names = pd.Series([names_to_pair(s, t) for s, t in zip(pairs["source_id"], pairs["target_id"])])
    repeated = names.duplicated().to_numpy()
    names[repeated] = names[repeated] + "#" + pairs["pair_id"].astype(str).to_numpy()[repeated]
    by_pair = {pid: rows.sort_values("kp_index") for pid, rows in predictions.groupby("pair_id", sort=False)}
    with atomic_path(Path(path)) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, row in zip(names, pairs.itertuples(index=False)):
                rows = by_pair.get(row.pair_id)
                if rows is None:
                    raise KeyError(f"{path}: no predictions for pair {row.pair_id!r}")
                xy = rows[["x", "y"]].to_numpy(np.float64)
                found = np.isfinite(xy).all(axis=1)
                matched = found & rows["reliable"].to_numpy(bool)
                group = f.create_group(name)
                group.attrs["pair_id"] = str(row.pair_id)
                group.create_dataset("matches0", data=np.where(matched, np.arange(len(rows)), -1).astype(np.int32))
                group.create_dataset("scores0", data=np.where(found, rows["score"].to_numpy(np.float32), 0).astype(np.float32))
                group.create_dataset("keypoints0", data=keypoints(row.source_kps))
                group.create_dataset("keypoints1", data=xy)
    return Path(path)
