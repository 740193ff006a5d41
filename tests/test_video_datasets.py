"""Video datasets: a DAVIS-layout fixture with palette PNGs and a JHMDB-layout fixture with
.mat joints, both written here; the embedded synthetic video set; bad input (one error
naming the file, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from semcorr.pipeline.datasets import VIDEO_NAMES, DatasetError, prepare, synthetic_video
from semcorr.pipeline.download import VIDEO_DATASETS, download_dataset
from semcorr.pipeline.tables import decode_mask, keypoints, read_frames, read_images, read_video_labels

SIZE = (32, 24)  # (width, height) of the fixture frames


def palette_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    image.save(path)


def make_davis(root: Path, sequences=("bear", "dogs"), frames: int = 4) -> Path:
    """``root`` in the DAVIS-2017 trainval layout: each sequence a moving square (label 1),
    ``dogs`` a second object (2) and some void (255)."""
    rng = np.random.default_rng(0)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(sequences) + "\n")
    for sequence in sequences:
        for t in range(frames):
            frame = root / "JPEGImages" / "480p" / sequence / f"{t:05d}.jpg"
            frame.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(frame)
            labels = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
            labels[4:12, 4 + t:12 + t] = 1
            if sequence == "dogs":
                labels[16:22, 20:28] = 2
                labels[0, :] = 255
            palette_png(root / "Annotations" / "480p" / sequence / f"{t:05d}.png", labels)
    return root


def expect_failure(tmp_path: Path, name: str, raw: Path, *parts: str) -> None:
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError) as info:
        prepare(name, raw, out)
    for part in parts:
        assert part in str(info.value), str(info.value)
    assert not out.exists()


def test_davis_layout_gives_frames_images_and_palette_masks(tmp_path):
    raw = make_davis(tmp_path / "raw")
    out = prepare("davis", raw, tmp_path / "prepared")
    frames, images, masks = read_frames(out), read_images(out), read_video_labels(out, "masks")
    assert len(frames) == len(images) == len(masks) == 8 and read_video_labels(out, "keypoints") is None
    assert frames["sequence"].tolist() == ["bear"] * 4 + ["dogs"] * 4 and frames["frame"].tolist() == [0, 1, 2, 3] * 2
    assert frames["image_id"].iloc[5] == "JPEGImages/480p/dogs/00001.jpg"
    assert set(images["category"]) == {"bear", "dogs"} and (images["width"] == SIZE[0]).all()
    row = masks.iloc[6]
    labels = decode_mask(row["mask"], row["height"], row["width"])
    with Image.open(raw / "Annotations" / "480p" / "dogs" / "00002.png") as png:
        assert np.array_equal(labels, np.array(png))
    assert set(np.unique(labels)) == {0, 1, 2, 255}


def test_davis_from_a_local_source_archive_folder_is_hoisted(tmp_path):
    make_davis(tmp_path / "mirror" / "DAVIS")  # the official zip wraps the dataset in DAVIS/
    raw = download_dataset("davis", tmp_path / "raw", source=tmp_path / "mirror")
    assert all((raw / marker).exists() for marker in VIDEO_DATASETS["davis"].markers)
    assert json.loads((raw / "manifest.json").read_text())["dataset"] == "davis"
    assert len(read_frames(prepare("davis", raw, tmp_path / "prepared"))) == 8


def test_davis_missing_frame(tmp_path):
    raw = make_davis(tmp_path / "raw")
    (raw / "JPEGImages" / "480p" / "bear" / "00002.jpg").unlink()
    expect_failure(tmp_path, "davis", raw, "JPEGImages/480p/bear/00002.jpg", "missing frame")


def test_davis_annotation_whose_size_differs_from_its_frame(tmp_path):
    raw = make_davis(tmp_path / "raw")
    palette_png(raw / "Annotations" / "480p" / "dogs" / "00001.png", np.zeros((SIZE[1], SIZE[0] + 2)))
    expect_failure(tmp_path, "davis", raw, "Annotations/480p/dogs/00001.png", "annotation is 34x24, its frame 32x24")


def test_davis_sequence_without_a_first_frame_annotation(tmp_path):
    raw = make_davis(tmp_path / "raw")
    (raw / "Annotations" / "480p" / "bear" / "00000.png").unlink()
    expect_failure(tmp_path, "davis", raw, "Annotations/480p/bear/00000.png", "no first-frame annotation")


def test_davis_annotation_that_is_not_a_palette_png(tmp_path):
    raw = make_davis(tmp_path / "raw")
    Image.new("RGB", SIZE).save(raw / "Annotations" / "480p" / "bear" / "00001.png")
    expect_failure(tmp_path, "davis", raw, "Annotations/480p/bear/00001.png", "not a palette PNG")


def test_davis_sequence_listed_but_absent(tmp_path):
    raw = make_davis(tmp_path / "raw")
    (raw / "ImageSets" / "2017" / "val.txt").write_text("bear\ncamel\n")
    expect_failure(tmp_path, "davis", raw, "JPEGImages/480p/camel", "no frames")


# -- JHMDB -----------------------------------------------------------------------------------


def make_jhmdb(root: Path, frames: int = 5, mat_frames: int | None = None) -> Path:
    """``root`` in the JHMDB layout: action ``walk`` with a test video ``v_walk`` (split 2) and a
    train video (split 1, no files: it must be ignored)."""
    folder = root / "Rename_Images" / "walk" / "v_walk"
    folder.mkdir(parents=True)
    for t in range(frames):
        Image.new("RGB", SIZE, (t * 10, 0, 0)).save(folder / f"{t + 1:05d}.png")
    t_len = frames if mat_frames is None else mat_frames
    pos = np.zeros((2, 15, t_len))
    pos[0] = 1 + np.arange(15)[:, None] + np.arange(t_len)[None]  # x: 1-based
    pos[1] = 1 + 0.5 * np.arange(15)[:, None]
    mat = root / "joint_positions" / "walk" / "v_walk" / "joint_positions.mat"
    mat.parent.mkdir(parents=True)
    savemat(mat, {"pos_img": pos, "scale": 1.0})
    (root / "splits").mkdir()
    (root / "splits" / "walk_test_split1.txt").write_text("v_walk.avi 2\nv_train.avi 1\n")
    return root


def test_jhmdb_layout_gives_split_one_test_videos_with_0_based_joints(tmp_path):
    out = prepare("jhmdb", make_jhmdb(tmp_path / "raw"), tmp_path / "prepared")
    frames, kps = read_frames(out), read_video_labels(out, "keypoints")
    assert frames["sequence"].unique().tolist() == ["walk/v_walk"] and len(frames) == 5
    assert frames["image_id"].iloc[0] == "Rename_Images/walk/v_walk/00001.png"
    xy = keypoints(kps.iloc[2]["kps"])
    assert xy.shape == (15, 2) and all(kps.iloc[2]["visible"])
    np.testing.assert_allclose(xy[:, 0], np.arange(15) + 2)  # 1-based (1 + j + t) -> 0-based, t = 2
    np.testing.assert_allclose(xy[:, 1], 0.5 * np.arange(15))
    assert read_video_labels(out, "masks") is None


def test_jhmdb_joints_for_another_number_of_frames(tmp_path):
    raw = make_jhmdb(tmp_path / "raw", frames=5, mat_frames=4)
    expect_failure(tmp_path, "jhmdb", raw, "joint_positions/walk/v_walk/joint_positions.mat", "4 frames",
                   "has 5 frames")


def test_jhmdb_missing_joints_and_malformed_split(tmp_path):
    raw = make_jhmdb(tmp_path / "raw")
    (raw / "joint_positions" / "walk" / "v_walk" / "joint_positions.mat").unlink()
    expect_failure(tmp_path, "jhmdb", raw, "joint_positions.mat", "not found")
    raw2 = make_jhmdb(tmp_path / "raw2")
    (raw2 / "splits" / "walk_test_split1.txt").write_text("v_walk.avi two\n")
    expect_failure(tmp_path, "jhmdb", raw2, "walk_test_split1.txt", "line 1")


# -- the embedded synthetic video set ----------------------------------------------------------

SMALL = {"seed": 3, "sequences": 2, "frames": 6, "width": 96, "height": 72, "keypoints": 5}


def test_synthetic_video_is_deterministic_exact_and_prepares(tmp_path):
    a = synthetic_video.generate(tmp_path / "a", SMALL)
    b = synthetic_video.generate(tmp_path / "b", SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    out = prepare("synthvideo", a, tmp_path / "prepared")
    frames, masks, kps = read_frames(out), read_video_labels(out, "masks"), read_video_labels(out, "keypoints")
    assert len(frames) == len(masks) == len(kps) == 12
    for m, k in zip(masks.itertuples(), kps.itertuples()):
        labels = decode_mask(m.mask, m.height, m.width)
        assert {1, 2} <= set(np.unique(labels)) or m.frame > 0  # both objects in view at the start
        xy, visible = keypoints(k.kps), np.asarray(k.visible)
        col, row = np.round(xy[visible]).astype(int).T
        assert (labels[row, col] == 1).all()  # a visible keypoint lies on the horse
    first = kps[kps["frame"] == 0]
    assert all(all(v) for v in first["visible"])  # every keypoint is seen in the first frame
    moved = np.abs(keypoints(kps.iloc[5]["kps"]) - keypoints(kps.iloc[0]["kps"])).max()
    assert moved > 5  # the horse moves


def test_synthetic_video_tracks_that_disagree_with_the_frames(tmp_path):
    raw = synthetic_video.generate(tmp_path / "raw", SMALL)
    tracks = json.loads((raw / "keypoints.json").read_text())
    name = next(iter(tracks["sequences"]))
    tracks["sequences"][name]["kps"] = tracks["sequences"][name]["kps"][:-1]
    (raw / "keypoints.json").write_text(json.dumps(tracks))
    expect_failure(tmp_path, "synthvideo", raw, "keypoints.json", name, "expected [6 frames")


def test_video_names_are_known_to_prepare_and_download():
    assert set(VIDEO_NAMES) == {"davis", "jhmdb", "synthvideo"} and set(VIDEO_DATASETS) == {"davis", "jhmdb"}
    with pytest.raises(DatasetError, match="unknown dataset 'davsi'.*davis"):
        prepare("davsi", Path("."), Path("out"))
