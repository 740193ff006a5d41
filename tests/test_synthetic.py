"""The embedded synthetic set: deterministic from its seed, correct correspondences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semcorr.pipeline.datasets import DatasetError, prepare, synthetic
from semcorr.pipeline.tables import keypoints, read_images, read_pairs
from semcorr.stages import download as download_stage
from semcorr.stages import prepare as prepare_stage

CONF = {"seed": 0, "categories": 4, "images_per_category": 6, "image_size": 160, "keypoints": 12}


def build(root: Path, **overrides) -> Path:
    """Build under ``root/data`` with a relative data root, as the stages run from the project root."""
    conf = {**CONF, **overrides}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        download_stage.main("synthetic", conf)
        prepare_stage.main("synthetic")
    return root / "data"


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seed0(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("seed0"))


def test_same_seed_gives_identical_bytes(seed0, tmp_path):
    data = build(tmp_path)
    for part in ("raw/synthetic", "prepared/synthetic"):
        assert files(seed0 / part) == files(data / part)


def test_different_seed_differs(seed0, tmp_path):
    data = build(tmp_path, seed=1)
    a, b = files(seed0 / "raw" / "synthetic"), files(data / "raw" / "synthetic")
    assert a.keys() == b.keys()
    assert a["annotations.json"] != b["annotations.json"]
    assert a["images/cat/000.png"] != b["images/cat/000.png"]


def test_tables_layout(seed0):
    prepared = seed0 / "prepared" / "synthetic"
    pairs, images = read_pairs(prepared), read_images(prepared)
    assert len(images) == 24 and set(images["width"]) == {160} and images["category"].nunique() == 4
    assert set(pairs["split"]) == {"trn", "val", "test"}
    assert set(pairs["norm_kind"]) == {"image"} and set(pairs["pck_norm"]) == {160.0}
    assert (pairs["source_id"] != pairs["target_id"]).all()
    split_of = {}
    for row in pairs.itertuples():
        for image_id in (row.source_id, row.target_id):
            assert split_of.setdefault(image_id, row.split) == row.split  # splits share no image
            assert image_id.split("/")[1] == row.category
    assert len(pairs) == 4 * 3 * 2  # 2 images per split and category -> 2 ordered pairs


def test_keypoints_follow_the_warp(seed0):
    """Colours at corresponding keypoints agree far better than at shuffled ones."""
    prepared = seed0 / "prepared" / "synthetic"
    paths = read_images(prepared).set_index("image_id")["path"].map(lambda p: seed0.parent / p)
    same, shuffled = [], []
    rng = np.random.default_rng(0)
    for row in read_pairs(prepared).itertuples():
        src = np.asarray(Image.open(paths[row.source_id]), dtype=np.float64)
        trg = np.asarray(Image.open(paths[row.target_id]), dtype=np.float64)
        vis = np.asarray(row.visible)
        a = _bilinear(src, keypoints(row.source_kps)[vis])
        b = _bilinear(trg, keypoints(row.target_kps)[vis])
        same.append(np.abs(a - b).mean())
        shuffled.append(np.abs(a - b[rng.permutation(len(b))]).mean())
    assert np.mean(same) < 0.5 * np.mean(shuffled)


def _bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    x0, y0 = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
    fx, fy = (xy[:, 0] - x0)[:, None], (xy[:, 1] - y0)[:, None]
    x1, y1 = np.minimum(x0 + 1, image.shape[1] - 1), np.minimum(y0 + 1, image.shape[0] - 1)
    return ((1 - fx) * (1 - fy) * image[y0, x0] + fx * (1 - fy) * image[y0, x1]
            + (1 - fx) * fy * image[y1, x0] + fx * fy * image[y1, x1])


def test_invisible_points_are_outside(tmp_path):
    synthetic.generate(tmp_path / "raw", {**CONF, "categories": 2, "images_per_category": 8, "keypoints": 16})
    import json

    anns = json.loads((tmp_path / "raw" / "annotations.json").read_text())["images"]
    for ann in anns.values():
        xy, vis = np.asarray(ann["keypoints"]), np.asarray(ann["visible"])
        inside = ((xy >= 0) & (xy <= 159)).all(axis=1)
        assert np.array_equal(inside, vis)


def test_bad_conf_is_refused(tmp_path):
    with pytest.raises(ValueError, match="images_per_category"):
        synthetic.generate(tmp_path / "raw", {**CONF, "images_per_category": 4})
    with pytest.raises(ValueError, match="categories"):
        synthetic.generate(tmp_path / "raw", {**CONF, "categories": 99})
    assert not (tmp_path / "raw").exists()


def rewrite_annotations(raw: Path, edit) -> Path:
    path = raw / synthetic.ANNOTATIONS
    annotations = json.loads(path.read_text())
    edit(annotations)
    path.write_text(json.dumps(annotations))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda a: [ann.update(split="trn") for ann in a["images"].values()], "no pairs in split 'val'"),
    (lambda a: a.update(images={}), "no pairs"),
    (lambda a: a.pop("images"), "images"),
    (lambda a: next(iter(a["images"].values())).pop("visible"), "visible"),
], ids=["one-split", "no-images", "no-images-key", "no-visible"])
def test_bad_annotations_are_refused_naming_the_file(tmp_path, edit, message):
    raw = synthetic.generate(tmp_path / "raw", {**CONF, "categories": 1})
    path = rewrite_annotations(raw, edit)
    with pytest.raises(DatasetError, match=message) as err:
        prepare("synthetic", raw, tmp_path / "prepared")
    assert str(path) in str(err.value)
    assert not (tmp_path / "prepared").exists()


def test_annotations_that_are_not_json_are_refused(tmp_path):
    raw = synthetic.generate(tmp_path / "raw", {**CONF, "categories": 1})
    (raw / synthetic.ANNOTATIONS).write_text("{not json")
    with pytest.raises(DatasetError, match=f"{raw / synthetic.ANNOTATIONS}: not valid JSON"):
        prepare("synthetic", raw, tmp_path / "prepared")
