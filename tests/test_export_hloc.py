"""The hloc files round-trip through a reader written from hloc's documented layout
(`hloc.utils.io.get_keypoints`, `get_matches` with its reversed-pair lookup, `list_h5_names`,
`hloc.utils.parsers.names_to_pair`), -1 matches included; the keypoint-transfer export gives
every image one keypoint set."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from semcorr.pipeline.export import (ImageFeatures, PairMatches, merge_points, write_features_h5, write_matches_h5,
                                     write_pair_matches_h5)
from semcorr.pipeline.tables import flatten


# -- hloc's readers, from its documented file layout ----------------------------------------


def hloc_names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def hloc_list_names(path) -> list[str]:
    """Names of the groups holding datasets (hloc's `list_h5_names`)."""
    names = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, obj: names.append(obj.parent.name.strip("/")) if isinstance(obj, h5py.Dataset) else None)
    return sorted(set(names))


def hloc_get_keypoints(path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name]["keypoints"][()]


def hloc_get_matches(path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """[M, 2] (index in name0's keypoints, index in name1's) and [M] scores; the pair may be
    stored either way round (hloc's find_pair)."""
    with h5py.File(path, "r") as f:
        pair, reverse = hloc_names_to_pair(name0, name1), False
        if pair not in f:
            pair, reverse = hloc_names_to_pair(name1, name0), True
            if pair not in f:
                raise ValueError(f"Could not find pair {(name0, name1)}")
        matches = f[pair]["matches0"][()]
        scores = f[pair]["matching_scores0"][()]
    idx = np.where(matches != -1)[0]
    out = np.stack([idx, matches[idx]], -1)
    return (np.flip(out, -1) if reverse else out), scores[idx]


# -------------------------------------------------------------------------------------------


def test_features_and_matches_round_trip_with_minus_one(tmp_path):
    rng = np.random.default_rng(0)
    a = ImageFeatures(rng.uniform(0, 50, (5, 2)), rng.uniform(0, 1, 5), (60, 40), rng.normal(size=(5, 8)))
    b = ImageFeatures(rng.uniform(0, 50, (3, 2)), rng.uniform(0, 1, 3), (30, 70), rng.normal(size=(3, 8)))
    features = write_features_h5(tmp_path / "feats.h5", [("seq/a.ppm", a), ("seq/b.ppm", b)])
    m0 = np.array([2, -1, 0, -1, 1])
    s0 = np.array([0.9, 0.0, 0.7, 0.0, 0.5])
    matches = write_pair_matches_h5(tmp_path / "matches.h5", [PairMatches("seq/a.ppm", "seq/b.ppm", m0, s0, "p0")])

    assert hloc_list_names(features) == ["seq/a.ppm", "seq/b.ppm"]
    np.testing.assert_allclose(hloc_get_keypoints(features, "seq/a.ppm"), a.keypoints, rtol=1e-6)
    with h5py.File(features, "r") as f:
        assert f["seq/a.ppm"]["descriptors"].shape == (8, 5)  # hloc's [D, N]
        np.testing.assert_allclose(f["seq/a.ppm"]["descriptors"][()].T, a.descriptors, rtol=1e-6)
        assert f["seq/b.ppm"]["image_size"][()].tolist() == [30, 70]
        np.testing.assert_allclose(f["seq/b.ppm"]["scores"][()], b.scores, rtol=1e-6)
    found, scores = hloc_get_matches(matches, "seq/a.ppm", "seq/b.ppm")
    assert found.tolist() == [[0, 2], [2, 0], [4, 1]]
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.5], rtol=1e-6)
    back, _ = hloc_get_matches(matches, "seq/b.ppm", "seq/a.ppm")  # stored as a -> b: read reversed
    assert back.tolist() == [[2, 0], [0, 2], [1, 4]]
    with pytest.raises(ValueError, match="Could not find pair"):
        hloc_get_matches(matches, "seq/a.ppm", "seq/c.ppm")
    with pytest.raises(ValueError, match="3 keypoints but 2 scores"):
        write_features_h5(tmp_path / "bad.h5", [("x", ImageFeatures(np.zeros((3, 2)), np.zeros(2), (1, 1)))])
    assert not (tmp_path / "bad.h5").exists()


def test_merge_points_keeps_the_first_and_joins_within_half_a_pixel():
    image = np.array([0, 0, 0, 1, 0, 0])
    xy = np.array([[10.0, 10.0], [10.3, 10.3], [10.0, 10.0], [10.1, 10.0], [10.6, 10.0], [20.0, 5.0]])
    index, kept = merge_points(image, xy)
    # (10.3,10.3) is 0.42 px away -> point 0; image 1 has its own set; (10.6,10) is 0.6 px -> new
    assert index.tolist() == [0, 0, 0, 0, 1, 2] and kept.tolist() == [True, False, False, True, True, True]


def test_transfer_export_one_keypoint_set_per_image(tmp_path):
    """Nine sources matched to one target (a PF-WILLOW target is in nine pairs): the target
    has ONE keypoint set, its annotations plus the predictions that land apart from them, and
    every pair's matches read back through hloc's readers as the predicted points."""
    rng = np.random.default_rng(1)
    target = rng.uniform(5, 90, (10, 2))
    rows, preds = [], []
    for k in range(9):
        source = rng.uniform(5, 90, (10, 2))
        rows.append({"pair_id": f"p{k}", "split": "test", "category": "car", "source_id": f"car/s{k}.png",
                     "target_id": "car/t.png", "source_kps": flatten(source), "target_kps": flatten(target),
                     "visible": [True] * 10, "pck_norm": 90.0, "norm_kind": "kpts"})
        guess = target + rng.normal(0, 2.0, target.shape) * (rng.uniform(size=(10, 1)) < 0.5)  # half exact
        reliable = rng.uniform(size=10) < 0.8
        guess[0] = np.nan  # no prediction
        for i in range(10):
            preds.append({"pair_id": f"p{k}", "kp_index": i, "x": guess[i, 0], "y": guess[i, 1],
                          "score": 0.5 + 0.01 * i, "reliable": bool(reliable[i]), "visible": True})
    pairs, pred = pd.DataFrame(rows), pd.DataFrame(preds)
    names = ["car/t.png"] + [f"car/s{k}.png" for k in range(9)]
    images = pd.DataFrame({"image_id": names, "path": names, "width": 100, "height": 100, "category": "car"})
    matches = write_matches_h5(tmp_path / "matches.h5", pairs, pred, images, tmp_path / "features.h5")

    kp_t = hloc_get_keypoints(tmp_path / "features.h5", "car/t.png")
    np.testing.assert_allclose(kp_t[:10], target, rtol=0, atol=1e-4)  # annotations first, once
    found_any = 0
    for k, row in enumerate(rows):
        kp_s = hloc_get_keypoints(tmp_path / "features.h5", row["source_id"])
        np.testing.assert_allclose(kp_s, np.reshape(row["source_kps"], (-1, 2)), rtol=0, atol=1e-4)
        got, scores = hloc_get_matches(matches, row["source_id"], "car/t.png")
        mine = pred[pred.pair_id == row["pair_id"]].sort_values("kp_index")
        ok = mine[np.isfinite(mine.x) & mine.reliable]
        assert got[:, 0].tolist() == ok.kp_index.tolist()  # -1 for the rest
        np.testing.assert_allclose(kp_t[got[:, 1]], ok[["x", "y"]].to_numpy(), rtol=0, atol=0.5 + 1e-4)
        np.testing.assert_allclose(scores, ok.score.to_numpy(), rtol=1e-6)
        found_any += len(got)
    assert found_any > 40
    # every kept point is at least 0.5 px from every other
    d = np.linalg.norm(kp_t[:, None] - kp_t[None], axis=-1) + np.eye(len(kp_t)) * 99
    assert d.min() > 0.5 and len(kp_t) < 10 + found_any
