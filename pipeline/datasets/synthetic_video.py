"""An embedded synthetic video set for label propagation: no download, deterministic from a seed.

Each sequence is a photograph shipped with scikit-image (the background) and two real
textured objects moving over it: a horse (scikit-image's horse silhouette, the known mask,
filled with the texture of another shipped photograph) and, in front of it, a disc cut from
a third photograph. Every frame the objects move along a smooth random path, scale and
rotate slightly (a similarity transform per object and frame, drawn from the seed); the
frame is rendered by warping each object's texture and mask with that transform and pasting
it where its mask is set, so the ground-truth label map (0 background, 1 horse, 2 disc) is
exactly the rendered one. The horse carries tracked keypoints (Harris corners of its texture
inside its mask) mapped through the same transforms: 0-based pixel centres, the convention
skimage's ``warp`` and `pipeline.coords` share; a keypoint is invisible in a frame where it
leaves the frame or the disc covers it.

Raw layout (``data/raw/synthvideo``), the DAVIS layout plus keypoints:
``sequences.txt``, ``frames/<seq>/00000.png, ...``, ``masks/<seq>/00000.png, ...`` (palette
PNGs) and ``keypoints.json`` (``{seq: {"kps": [T][J][2], "visible": [T][J]}}``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage import data as skdata
from skimage.color import gray2rgb, rgb2gray
from skimage.feature import corner_harris, corner_peaks
from skimage.morphology import disk, erosion
from skimage.transform import SimilarityTransform, resize, warp

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import read_json
from semcorr.pipeline.datasets.davis import read_layout, read_sequence_list
from semcorr.pipeline.io import atomic_path
from semcorr.pipeline.tables import VIDEO_KEYPOINT_COLUMNS, flatten

default_conf = {
    "seed": 0,  # one seed fixes every frame, mask and keypoint
    "sequences": 2,  # videos, each with its own photographs and paths (at most len(SCENES))
    "frames": 20,  # frames per video
    "width": 160,  # frame size in pixels
    "height": 120,
    "keypoints": 8,  # tracked points on the horse
}
# (background, horse texture, disc texture): photographs bundled inside scikit-image itself
SCENES = [("coffee", "chelsea", "coins"), ("astronaut", "coffee", "camera"), ("rocket", "grass", "chelsea"),
          ("chelsea", "gravel", "astronaut")]
PHOTOS = {"coffee": skdata.coffee, "chelsea": skdata.chelsea, "coins": skdata.coins, "astronaut": skdata.astronaut,
          "brick": skdata.brick, "camera": skdata.camera, "rocket": skdata.rocket, "grass": skdata.grass,
          "gravel": skdata.gravel}
SEQUENCES, FRAMES, MASKS, KEYPOINTS = "sequences.txt", "frames", "masks", "keypoints.json"
HORSE_HEIGHT = 0.65  # horse height as a fraction of the frame height (at scale 1)
DISC_RADIUS = 0.16  # disc radius as a fraction of the frame height
TRAVEL = 0.35  # path length as a fraction of the frame width
MAX_SCALE_CHANGE = 0.15  # objects grow or shrink by up to this fraction over the video
MAX_ROTATION = np.deg2rad(8)  # and turn by up to this angle
HORSE_START = (0.3, 0.35, 0.7, 0.65)  # box of the objects' first centres (fractions of the frame)
DISC_START = (0.12, 0.15, 0.88, 0.85)
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)  # DAVIS colours of labels 0, 1, 2


def generate(out_dir: Path, conf: dict | None = None) -> Path:
    """Write the synthetic video set into ``out_dir`` (atomically)."""
    conf = {**default_conf, **(conf or {})}
    n_seq, n_frames, width, height, n_kps = (int(conf[k])
                                             for k in ("sequences", "frames", "width", "height", "keypoints"))
    if not 1 <= n_seq <= len(SCENES):
        raise ValueError(f"synthvideo: sequences must be 1..{len(SCENES)}, got {n_seq}")
    if n_frames < 3:
        raise ValueError(f"synthvideo: frames must be >= 3 (the evaluation skips the first and the last), "
                         f"got {n_frames}")
    names = [f"{'-'.join(SCENES[k])}" for k in range(n_seq)]
    tracks = {}
    with atomic_path(Path(out_dir)) as tmp:
        for k, name in enumerate(names):
            rng = np.random.default_rng([int(conf["seed"]), k])
            background, horse_photo, disc_photo = SCENES[k]
            frames, labels, kps, visible = render_sequence(rng, background, horse_photo, disc_photo, n_frames,
                                                           (height, width), n_kps)
            (tmp / FRAMES / name).mkdir(parents=True)
            (tmp / MASKS / name).mkdir(parents=True)
            for t in range(n_frames):
                Image.fromarray(frames[t]).save(tmp / FRAMES / name / f"{t:05d}.png")
                mask = Image.fromarray(labels[t], mode="P")
                mask.putpalette(PALETTE)
                mask.save(tmp / MASKS / name / f"{t:05d}.png")
            tracks[name] = {"kps": kps.round(6).tolist(), "visible": visible.tolist()}
        (tmp / SEQUENCES).write_text("\n".join(names) + "\n")
        (tmp / KEYPOINTS).write_text(json.dumps({"conf": conf, "sequences": tracks}, sort_keys=True) + "\n")
    return Path(out_dir)


def render_sequence(rng: np.random.Generator, background: str, horse_photo: str, disc_photo: str, n_frames: int,
                    size: tuple[int, int], n_kps: int):
    """-> frames ``[T, H, W, 3]`` uint8, labels ``[T, H, W]`` uint8, keypoints ``[T, J, 2]``, visible ``[T, J]``."""
    h, w = size
    scene = _photo(background, (h, w))
    horse_mask = ~skdata.horse()  # the silhouette: False on the horse
    hh = int(round(HORSE_HEIGHT * h))
    hw = int(round(hh * horse_mask.shape[1] / horse_mask.shape[0]))
    horse_mask = resize(horse_mask.astype(float), (hh, hw), order=0, anti_aliasing=False) > 0.5
    horse_tex = _photo(horse_photo, (hh, hw))
    r = int(round(DISC_RADIUS * h))
    yy, xx = np.mgrid[:2 * r + 1, :2 * r + 1]
    disc_mask = (yy - r) ** 2 + (xx - r) ** 2 <= r ** 2
    disc_tex = _photo(disc_photo, (2 * r + 1, 2 * r + 1))
    local_kps = _texture_points(horse_tex, horse_mask, n_kps, horse_photo)
    horse_poses = _poses(rng, (hw, hh), (w, h), n_frames, HORSE_START)
    horse_first = warp(horse_mask.astype(float), horse_poses[0].inverse, output_shape=(h, w), order=0) > 0.5
    for _ in range(100):  # the disc starts clear of the horse: every keypoint is seen in the first frame
        disc_poses = _poses(rng, (2 * r + 1, 2 * r + 1), (w, h), n_frames, DISC_START)
        disc_first = warp(disc_mask.astype(float), disc_poses[0].inverse, output_shape=(h, w), order=0) > 0.5
        if not (disc_first & horse_first).any():
            break
    else:
        raise ValueError("synthvideo: found no disc path that starts clear of the horse")
    frames = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    labels = np.zeros((n_frames, h, w), dtype=np.uint8)
    kps = np.empty((n_frames, n_kps, 2))
    visible = np.empty((n_frames, n_kps), dtype=bool)
    for t in range(n_frames):
        image = scene.copy()
        for label, tex, mask, pose in ((1, horse_tex, horse_mask, horse_poses[t]),
                                       (2, disc_tex, disc_mask, disc_poses[t])):
            inside = warp(mask.astype(float), pose.inverse, output_shape=(h, w), order=0) > 0.5
            image[inside] = warp(tex, pose.inverse, output_shape=(h, w), order=1)[inside]
            labels[t][inside] = label
        frames[t] = np.round(image * 255).astype(np.uint8)
        kps[t] = horse_poses[t](local_kps)
        col, row = np.round(kps[t]).astype(int).T
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        visible[t] = inside
        visible[t][inside] = labels[t][row[inside], col[inside]] == 1
    return frames, labels, kps, visible


def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """The bundled photo ``name``, centre-cropped to the aspect of ``size`` and resized: ``[h, w, 3]`` in [0, 1]."""
    photo = np.asarray(PHOTOS[name]())
    photo = gray2rgb(photo) if photo.ndim == 2 else photo[..., :3]
    ph, pw = photo.shape[:2]
    h, w = size
    ch, cw = (ph, min(pw, round(ph * w / h))) if pw * h >= ph * w else (min(ph, round(pw * h / w)), pw)
    top, left = (ph - ch) // 2, (pw - cw) // 2
    crop = photo[top:top + ch, left:left + cw].astype(np.float64) / 255.0
    return resize(crop, size, order=1, anti_aliasing=True)


def _texture_points(texture: np.ndarray, mask: np.ndarray, count: int, name: str) -> np.ndarray:
    """The ``count`` strongest Harris corners of ``texture`` well inside ``mask`` -> ``[count, 2]`` (x, y)."""
    response = corner_harris(rgb2gray(texture))
    response[~erosion(mask, disk(2))] = 0
    peaks = corner_peaks(response, min_distance=2, threshold_rel=1e-3, num_peaks=count)
    if len(peaks) < count:
        raise ValueError(f"synthvideo: only {len(peaks)} corners on the {name!r} horse; lower `keypoints`")
    return peaks[:, ::-1].astype(np.float64)


def _poses(rng: np.random.Generator, object_wh: tuple[int, int], frame_wh: tuple[int, int], n_frames: int,
           start_box: tuple[float, float, float, float]) -> list[SimilarityTransform]:
    """Object-pixel -> frame-pixel similarity per frame: the object's centre starts in
    ``start_box`` (x0, y0, x1, y1, fractions of the frame) and moves ``TRAVEL`` of the frame
    width along a gently curved path; its scale and angle change smoothly."""
    (ow, oh), (w, h) = object_wh, frame_wh
    x0, y0, x1, y1 = start_box
    start = rng.uniform([x0 * w, y0 * h], [x1 * w, y1 * h])
    heading = rng.uniform(0, 2 * np.pi)
    step = TRAVEL * w * np.array([np.cos(heading), np.sin(heading)])
    if not (0.15 * w < start[0] + step[0] < 0.85 * w):
        step[0] = -step[0]
    if not (0.2 * h < start[1] + step[1] < 0.8 * h):
        step[1] = -step[1]
    bend = rng.uniform(-0.1, 0.1) * w * np.array([-np.sin(heading), np.cos(heading)])
    scale_end = 1 + rng.uniform(-MAX_SCALE_CHANGE, MAX_SCALE_CHANGE)
    angle_end = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    poses = []
    for s in np.linspace(0, 1, n_frames):
        centre = start + s * step + 4 * s * (1 - s) * bend
        scale, angle = 1 + s * (scale_end - 1), s * angle_end
        to_origin = SimilarityTransform(translation=(-(ow - 1) / 2, -(oh - 1) / 2))
        poses.append(to_origin + SimilarityTransform(scale=scale, rotation=angle, translation=centre))
    return poses


def read_tracks(path: Path, frames: pd.DataFrame) -> pd.DataFrame:
    """``keypoints.json`` -> the keypoints table for ``frames``; `DatasetError` naming the file
    for invalid JSON, a missing sequence or tracks whose shape disagrees with the frames."""
    data = read_json(path, "keypoint tracks not found; run `semcorr download synthvideo` first")
    try:
        tracks = data["sequences"]
    except (KeyError, TypeError):
        raise DatasetError(f"{path}: lacks the 'sequences' object") from None
    rows = []
    for sequence, group in frames.groupby("sequence", sort=False):
        entry = tracks.get(sequence) if isinstance(tracks, dict) else None
        try:
            kps = np.asarray(entry["kps"], dtype=np.float64)
            visible = np.asarray(entry["visible"], dtype=bool)
        except (TypeError, KeyError, ValueError):
            raise DatasetError(f"{path}: no valid 'kps' and 'visible' tracks for sequence {sequence!r}") from None
        if kps.ndim != 3 or kps.shape[0] != len(group) or kps.shape[2] != 2 or visible.shape != kps.shape[:2]:
            raise DatasetError(f"{path}: tracks of {sequence!r} are {kps.shape}, expected [{len(group)} frames, J, 2] "
                               "with [frames, J] visible flags")
        for row, xy, vis in zip(group.itertuples(index=False), kps, visible):
            rows.append({"sequence": sequence, "frame": row.frame, "image_id": row.image_id, "kps": flatten(xy),
                         "visible": vis.tolist()})
    return pd.DataFrame(rows, columns=VIDEO_KEYPOINT_COLUMNS)


def parse(raw_dir: Path) -> dict[str, pd.DataFrame]:
    """``raw_dir`` -> {images, frames, masks, keypoints}."""
    raw_dir = Path(raw_dir)
    sequences = read_sequence_list(raw_dir / SEQUENCES)
    images, frames, masks = read_layout(raw_dir, sequences, Path(FRAMES), Path(MASKS), ".png")
    return {"images": images, "frames": frames, "masks": masks, "keypoints": read_tracks(raw_dir / KEYPOINTS, frames)}
