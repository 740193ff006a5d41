"""HPatches sequences (Balntas et al., CVPR 2017) in their official layout:

    hpatches-sequences-release/<seq>/1.ppm ... 6.ppm    (``i_*``: illumination, ``v_*``: viewpoint)
    hpatches-sequences-release/<seq>/H_1_2 ... H_1_6    3 x 3 homography, image 1 -> image k pixels

(the sequence folders may also sit directly in the raw folder). Pairs are (1, k) for k = 2..6
of every sequence, all in split ``test``; category = the sequence's kind (``illumination``,
``viewpoint``). For the PCK pipeline each pair carries a grid of `GRID` x `GRID` points of
image 1 mapped through ``H_1_k`` (visible where they land inside image k), normaliser
``image``; `homographies` gives the homographies themselves, for the sparse benchmark.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import check_pair_images, images_table, pair_row, pairs_table

RELEASE = "hpatches-sequences-release"
KINDS = {"i": "illumination", "v": "viewpoint"}
TARGETS = range(2, 7)  # image 1 is matched to images 2..6
GRID = 8  # points per side of the PCK grid on image 1
_SEQUENCE = re.compile(r"^(?P<kind>[iv])_[\w.-]+$")


def sequences_dir(raw_dir: Path) -> Path:
    """The folder holding the ``i_*`` / ``v_*`` sequences."""
    raw_dir = Path(raw_dir)
    return raw_dir / RELEASE if (raw_dir / RELEASE).is_dir() else raw_dir


def sequences(raw_dir: Path) -> list[Path]:
    """Every sequence folder, sorted; `DatasetError` when there is none."""
    root = sequences_dir(raw_dir)
    found = sorted(p for p in root.iterdir() if p.is_dir() and _SEQUENCE.match(p.name)) if root.is_dir() else []
    if not found:
        raise DatasetError(f"{root}: no HPatches sequences (folders i_* or v_*); expected the official "
                           f"{RELEASE} layout")
    return found


def read_homography(path: Path) -> np.ndarray:
    """One ``H_1_k`` file -> ``[3, 3]`` float64; `DatasetError` naming the file unless it holds
    9 finite numbers forming an invertible matrix."""
    if not path.is_file():
        raise DatasetError(f"{path}: homography file not found")
    try:
        h = np.array(path.read_text().split(), dtype=np.float64)
    except (UnicodeDecodeError, ValueError):
        raise DatasetError(f"{path}: not a whitespace-separated 3 x 3 matrix of numbers") from None
    if h.size != 9 or not np.isfinite(h).all():
        raise DatasetError(f"{path}: expected 9 finite numbers (a 3 x 3 homography), got {h.size}")
    h = h.reshape(3, 3)
    if abs(np.linalg.det(h)) < 1e-12:
        raise DatasetError(f"{path}: singular homography")
    return h


def image_id(sequence: str, k: int) -> str:
    return f"{sequence}/{k}.ppm"


def homographies(raw_dir: Path) -> dict[tuple[str, str], np.ndarray]:
    """(source id, target id) -> ``[3, 3]`` homography from source to target pixels."""
    out = {}
    for folder in sequences(raw_dir):
        for k in TARGETS:
            out[(image_id(folder.name, 1), image_id(folder.name, k))] = read_homography(folder / f"H_1_{k}")
    return out


def parse(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``raw_dir`` -> (pairs, images) tables: pairs (1, k), k = 2..6, of every sequence."""
    root = sequences_dir(raw_dir)
    folders = sequences(raw_dir)
    images = {}
    for folder in folders:
        kind = KINDS[_SEQUENCE.match(folder.name)["kind"]]
        for k in (1, *TARGETS):
            images[image_id(folder.name, k)] = (folder / f"{k}.ppm", kind)
    table = images_table(images)
    sizes = table.set_index("image_id")[["width", "height"]]
    rows, wheres = [], []
    for (source, target), h in homographies(raw_dir).items():
        w, h_px = (int(v) for v in sizes.loc[source])
        tw, th = (int(v) for v in sizes.loc[target])
        xs = np.linspace(0.1 * (w - 1), 0.9 * (w - 1), GRID)
        ys = np.linspace(0.1 * (h_px - 1), 0.9 * (h_px - 1), GRID)
        src = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        p = np.concatenate([src, np.ones((len(src), 1))], axis=1) @ h.T
        trg = p[:, :2] / p[:, 2:]
        visible = (p[:, 2] > 0) & (trg[:, 0] >= 0) & (trg[:, 0] <= tw - 1) & (trg[:, 1] >= 0) & (trg[:, 1] <= th - 1)
        sequence = source.split("/")[0]
        rows.append(pair_row(f"{sequence}/1-{target.split('/')[1].removesuffix('.ppm')}", "test",
                             images[source][1], source, target, src, np.where(visible[:, None], trg, 0.0), visible,
                             float(max(tw, th)), "image"))
        wheres.append(str(root / sequence / f"H_1_{target.split('/')[1].removesuffix('.ppm')}"))
    check_pair_images(rows, table, wheres)
    return pairs_table(rows), table
