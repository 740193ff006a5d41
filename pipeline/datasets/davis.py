"""DAVIS-2017 (Pont-Tuset et al. 2017), semi-supervised video object segmentation: the val split.

Raw layout (``data/raw/davis``, the official ``DAVIS-2017-trainval-480p.zip``):
``ImageSets/2017/val.txt`` (one sequence a line), ``JPEGImages/480p/<seq>/00000.jpg, ...`` and
``Annotations/480p/<seq>/00000.png, ...``: palette PNGs whose indices are the labels, 0
background, 1..N the objects, 255 void. Every val frame is annotated. The objects of a
sequence are those of its first frame, as the official evaluation counts them; void and
later-appearing labels are kept in the masks table and handled by the metrics.

`read_layout` reads this layout for any list of sequences (the synthetic video set shares it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import image_size, track
from semcorr.pipeline.tables import FRAME_COLUMNS, IMAGE_COLUMNS, MASK_COLUMNS, encode_mask, mask_objects

SEQUENCE_LIST = Path("ImageSets/2017/val.txt")
FRAMES = Path("JPEGImages/480p")
ANNOTATIONS = Path("Annotations/480p")


def read_sequence_list(path: Path) -> list[str]:
    """Sequence names, one a line (blank lines skipped); `DatasetError` naming the file for a
    missing or empty list or a name that is not a plain folder name."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: sequence list not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: no sequences")
    for line, name in enumerate(names, 1):
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DatasetError(f"{path}: line {line}: {name!r} is not a sequence folder name")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: lists a sequence twice")
    return names


def frame_files(folder: Path, suffix: str) -> list[Path]:
    """The frames ``<folder>/<number><suffix>``, in order; `DatasetError` naming the folder
    when there are none and naming the first missing file when the numbers have a gap."""
    folder = Path(folder)
    files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
    if not files:
        raise DatasetError(f"{folder}: no frames (*{suffix})")
    numbered = []
    for path in files:
        if not path.stem.isdigit():
            raise DatasetError(f"{path}: frame name is not a frame number")
        numbered.append((int(path.stem), path))
    numbered.sort()
    first, width = numbered[0][0], len(numbered[0][1].stem)
    for offset, (number, _) in enumerate(numbered):
        if number != first + offset:
            raise DatasetError(f"{folder / f'{first + offset:0{width}d}{suffix}'}: missing frame "
                               f"(the sequence has frames {first}..{numbered[-1][0]})")
    return [path for _, path in numbered]


def read_palette_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` uint8 label map of an indexed (palette or grey) PNG; `DatasetError` naming
    the file if it is missing, unreadable, not indexed, or not ``size`` = (width, height)."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation not found")
    try:
        with Image.open(path) as image:
            mode, found = image.mode, image.size
            labels = np.array(image)
    except Exception as exc:  # PIL raises many types for broken files
        raise DatasetError(f"{path}: corrupt or unreadable annotation ({type(exc).__name__}: {exc})") from exc
    if mode not in ("P", "L"):
        raise DatasetError(f"{path}: not a palette PNG (mode {mode}); labels must be the pixel indices")
    if tuple(found) != tuple(size):
        raise DatasetError(f"{path}: annotation is {found[0]}x{found[1]}, its frame {size[0]}x{size[1]}")
    return labels.astype(np.uint8)


def read_layout(raw_dir: Path, sequences: list[str], frames_dir: Path, masks_dir: Path,
                suffix: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Frames ``<frames_dir>/<seq>/<n><suffix>`` and their annotations ``<masks_dir>/<seq>/<n>.png``
    (paths relative to ``raw_dir``) -> (images, frames, masks) tables (`pipeline.tables`)."""
    raw_dir = Path(raw_dir)
    images, frames, masks = [], [], []
    for sequence in track(sequences, "reading video frames"):
        files = frame_files(raw_dir / frames_dir / sequence, suffix)
        for index, path in enumerate(files):
            image_id = path.relative_to(raw_dir).as_posix()
            width, height = image_size(path)
            mask_path = raw_dir / masks_dir / sequence / f"{path.stem}.png"
            if index == 0 and not mask_path.is_file():
                raise DatasetError(f"{mask_path}: sequence {sequence!r} has no first-frame annotation")
            labels = read_palette_mask(mask_path, (width, height))
            if index == 0 and mask_objects(labels) == 0:
                raise DatasetError(f"{mask_path}: the first-frame annotation of {sequence!r} holds no object")
            images.append({"image_id": image_id, "path": str(path), "width": width, "height": height,
                           "category": sequence})
            frames.append({"sequence": sequence, "frame": index, "image_id": image_id})
            masks.append({"sequence": sequence, "frame": index, "image_id": image_id, "height": height,
                          "width": width, "mask": encode_mask(labels)})
    return (pd.DataFrame(images, columns=IMAGE_COLUMNS), pd.DataFrame(frames, columns=FRAME_COLUMNS),
            pd.DataFrame(masks, columns=MASK_COLUMNS))


def parse(raw_dir: Path) -> dict[str, pd.DataFrame]:
    """``raw_dir`` -> {images, frames, masks} of the val sequences."""
    raw_dir = Path(raw_dir)
    sequences = read_sequence_list(raw_dir / SEQUENCE_LIST)
    images, frames, masks = read_layout(raw_dir, sequences, FRAMES, ANNOTATIONS, ".jpg")
    return {"images": images, "frames": frames, "masks": masks}
