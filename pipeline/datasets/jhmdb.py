"""JHMDB (Jhuang et al. 2013), keypoint propagation: the test videos of split 1.

The split CRW (Jabri et al. 2020) and the label-propagation papers after it (SFC among them)
evaluate on: the 268 videos marked ``2`` (test) in JHMDB's official ``<action>_test_split1.txt``
files (lines ``<video>.avi 1|2``).

Raw layout (``data/raw/jhmdb``, from the official ``Rename_Images.tar.gz``,
``joint_positions.zip`` and ``splits.zip``): ``Rename_Images/<action>/<video>/00001.png, ...``,
``joint_positions/<action>/<video>/joint_positions.mat`` (``pos_img``: ``[2, 15, T]``, MATLAB
1-based pixel coordinates, converted once with `from_matlab`) and the split files anywhere
under the folder (``splits/`` in the official archive). A sequence is ``<action>/<video>``.
Joints outside the frame are kept (the puppet may leave it); the protocol scores them too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline.coords import from_matlab
from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import image_size, track
from semcorr.pipeline.datasets.davis import frame_files
from semcorr.pipeline.tables import FRAME_COLUMNS, IMAGE_COLUMNS, VIDEO_KEYPOINT_COLUMNS, flatten

FRAMES = Path("Rename_Images")
JOINTS = Path("joint_positions")
SPLIT_SUFFIX = "_test_split1.txt"
TEST = "2"  # split-file flag of a test video (1 = train)
N_JOINTS = 15


def test_videos(raw_dir: Path) -> list[tuple[str, str]]:
    """(action, video) of every test video of split 1, from the split files under ``raw_dir``."""
    files = sorted(p for p in Path(raw_dir).rglob(f"*{SPLIT_SUFFIX}") if "__MACOSX" not in p.parts)
    if not files:
        raise DatasetError(f"{raw_dir}: no JHMDB split files (*{SPLIT_SUFFIX}, from the official splits.zip)")
    videos = []
    for path in files:
        action = path.name.removesuffix(SPLIT_SUFFIX)
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[0].endswith(".avi") or fields[1] not in ("1", "2"):
                raise DatasetError(f"{path}: line {line_number}: expected '<video>.avi 1|2', got {line.strip()!r}")
            name = fields[0].removesuffix(".avi")
            if "/" in name or "\\" in name or name in (".", ".."):
                raise DatasetError(f"{path}: line {line_number}: {name!r} is not a video folder name")
            if fields[1] == TEST:
                videos.append((action, name))
    if not videos:
        raise DatasetError(f"{files[0].parent}: the split files mark no test video")
    return videos


def read_joints(path: Path, n_frames: int) -> np.ndarray:
    """``joint_positions.mat`` -> ``[T, 15, 2]`` 0-based pixel centres; `DatasetError` naming
    the file when it is missing, unreadable, malformed or has another number of frames."""
    from scipy.io import loadmat

    if not path.is_file():
        raise DatasetError(f"{path}: joint positions not found")
    try:
        pos = np.asarray(loadmat(str(path))["pos_img"], dtype=np.float64)
    except KeyError:
        raise DatasetError(f"{path}: has no 'pos_img' variable") from None
    except Exception as exc:  # scipy raises many types for broken files
        raise DatasetError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})") from exc
    if pos.ndim != 3 or pos.shape[:2] != (2, N_JOINTS):
        raise DatasetError(f"{path}: pos_img has shape {pos.shape}, expected [2, {N_JOINTS}, T]")
    if pos.shape[2] != n_frames:
        raise DatasetError(f"{path}: joints for {pos.shape[2]} frames, but the video has {n_frames} frames")
    return from_matlab(pos.transpose(2, 1, 0))


def parse(raw_dir: Path) -> dict[str, pd.DataFrame]:
    """``raw_dir`` -> {images, frames, keypoints} of the split-1 test videos."""
    raw_dir = Path(raw_dir)
    images, frames, keypoints = [], [], []
    for action, video in track(test_videos(raw_dir), "reading JHMDB videos"):
        sequence = f"{action}/{video}"
        files = frame_files(raw_dir / FRAMES / action / video, ".png")
        joints = read_joints(raw_dir / JOINTS / action / video / "joint_positions.mat", len(files))
        for index, (path, xy) in enumerate(zip(files, joints)):
            image_id = path.relative_to(raw_dir).as_posix()
            width, height = image_size(path)
            images.append({"image_id": image_id, "path": str(path), "width": width, "height": height,
                           "category": action})
            frames.append({"sequence": sequence, "frame": index, "image_id": image_id})
            keypoints.append({"sequence": sequence, "frame": index, "image_id": image_id, "kps": flatten(xy),
                              "visible": np.isfinite(xy).all(axis=1).tolist()})
    return {"images": pd.DataFrame(images, columns=IMAGE_COLUMNS),
            "frames": pd.DataFrame(frames, columns=FRAME_COLUMNS),
            "keypoints": pd.DataFrame(keypoints, columns=VIDEO_KEYPOINT_COLUMNS)}
