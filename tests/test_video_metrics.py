"""DAVIS J and F on hand-made masks (as the official davis2017-evaluation defines them), their
per-object statistics, JHMDB PCK with its normaliser, bootstrap intervals over sequences,
and the summary table of the video evaluations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from skimage.morphology import dilation, disk

from semcorr.pipeline import video_metrics as vm

H, W = 60, 80  # diagonal 100 px: the F tolerance is ceil(0.008 * 100) = 1 px


def square(top: int, left: int, size: int = 20) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_boundary_radius_is_the_official_one():
    assert vm.boundary_radius((H, W)) == 1
    assert vm.boundary_radius((480, 854)) == 8  # DAVIS 480p: ceil(0.008 * 979.6)


def test_identical_masks():
    mask = square(10, 10)
    assert vm.region_similarity(mask, mask) == 1.0 and vm.boundary_measure(mask, mask) == 1.0


def test_disjoint_masks():
    assert vm.region_similarity(square(0, 0), square(30, 50)) == 0.0
    assert vm.boundary_measure(square(0, 0), square(30, 50)) == 0.0


def test_a_one_pixel_boundary_shift_is_within_tolerance_and_a_three_pixel_one_beyond():
    gt = square(10, 10)
    assert vm.boundary_measure(gt, square(10, 11)) == 1.0  # every boundary pixel within 1 px of the other's
    assert vm.region_similarity(gt, square(10, 11)) == pytest.approx(380 / 420)
    shifted = vm.boundary_measure(gt, square(10, 13))
    assert 0 < shifted < 1  # the vertical edges are 3 px apart: only the horizontal ones match
    # the same shift scored with a wider tolerance (0.04 * 100 px = 4 px) matches fully
    assert vm.boundary_measure(gt, square(10, 13), tolerance=0.04) == 1.0


def test_an_empty_object():
    empty = np.zeros((H, W), dtype=bool)
    assert vm.region_similarity(empty, empty) == 1.0 and vm.boundary_measure(empty, empty) == 1.0
    assert vm.region_similarity(square(5, 5), empty) == 0.0 and vm.boundary_measure(square(5, 5), empty) == 0.0
    assert vm.boundary_measure(empty, square(5, 5)) == 0.0


def test_boundaries_are_the_official_shift_xor_and_dilation_is_the_disk_of_skimage_morphology():
    mask = square(10, 10, 4)
    edge = vm.boundary_map(mask)
    # the pixels that differ from their right, lower or lower-right neighbour: the mask's last row /
    # column and the ring just above / left of it
    expected = np.zeros_like(mask)
    expected[9:14, 9:14] = True
    expected[10:13, 10:13] = False
    assert np.array_equal(edge, expected)
    from skimage.morphology import isotropic_dilation

    rng = np.random.default_rng(0)
    sparse = rng.random((50, 70)) < 0.02
    for radius in (1, 3, 8):
        assert np.array_equal(isotropic_dilation(sparse, radius), dilation(sparse, disk(radius)).astype(bool))


def test_statistics_mean_recall_and_decay_as_the_official_ones():
    values = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    mean, recall, decay = vm.statistics(values)
    assert mean == pytest.approx(0.65) and recall == pytest.approx(5 / 8)
    # the official bins: ids round(linspace(1, 8, 5) + 1e-10) - 1 = 0, 2, 4, 5, 7, bin i = values[ids[i]:ids[i+1] + 1]:
    # the first [1.0, 0.9, 0.8], the last [0.5, 0.4, 0.3]
    assert decay == pytest.approx(0.9 - 0.4)


def test_score_sequence_skips_the_first_and_last_frame_and_scores_void_in_neither_mask():
    gt = [np.zeros((H, W), dtype=np.uint8) for _ in range(4)]
    for t, frame in enumerate(gt):
        frame[square(10, 10 + t)] = 1
        frame[square(35, 50, 10)] = 2
    gt[0][0:2, 0:2] = 255  # void is no object
    pred = {t: frame.copy() for t, frame in enumerate(gt)}
    pred[2][pred[2] == 2] = 0  # object 2 lost in frame 2
    gt[1][square(10, 11)] = 255  # void in frame 1 where object 1 is predicted: scored in neither mask
    gt[1][square(10, 11, 4)] = 1
    pred[1][square(10, 11)] = 1
    pred[1][square(10, 11, 4)] = 1
    table = vm.score_sequence(gt, pred)
    assert sorted(set(table["frame"])) == [1, 2] and sorted(set(table["object"])) == [1, 2]
    objects = vm.object_table({"toy": table})
    assert objects.loc[objects["object"] == 1, "J_mean"].item() == 1.0
    assert objects.loc[objects["object"] == 2, "J_mean"].item() == 0.5
    summary = vm.davis_summary(objects)
    assert summary["j_mean"] == 0.75 and summary["jf_mean"] == pytest.approx((summary["j_mean"] + summary["f_mean"]) / 2)
    with pytest.raises(KeyError, match="frame 2"):
        vm.score_sequence(gt, {1: pred[1]})


def test_pck_uses_point_six_of_the_box_diagonal_of_the_counted_joints_and_skips_frame_zero():
    gt = np.zeros((3, 3, 2))
    gt[:, 1] = [30.0, 40.0]  # box 30 x 40 -> diagonal 50 -> normaliser 30
    pred = gt.copy()
    pred[1, 0] += [3.0, 0.0]  # 0.1 of the normaliser
    pred[1, 2] += [0.0, 4.0]  # joint 2 not counted: ignored
    pred[2, 1] += [0.0, 9.0]  # 0.3
    pred[0] += 100.0  # frame 0 is never scored
    counted = np.ones((3, 3), dtype=bool)
    counted[:, 2] = False
    d = vm.pck_distances(gt, pred, counted)
    assert d.shape == (2, 3) and np.isnan(d[:, 2]).all()
    np.testing.assert_allclose(d[:, :2], [[0.1, 0.0], [0.0, 0.3]])
    joints = vm.joint_pck([d])
    assert joints["n"].tolist() == [2, 2, 0]
    assert joints["pck@0.1"].tolist()[:2] == [1.0, 0.5] and joints["pck@0.2"].tolist()[:2] == [1.0, 0.5]
    assert vm.pck_summary(joints) == {"pck@0.1": 0.75, "pck@0.2": 0.75}  # the mean over the scored joints


def test_bootstrap_intervals_over_sequences_contain_the_estimate():
    from semcorr.pipeline.bootstrap import resample_counts

    objects = pd.DataFrame({"sequence": ["a", "a", "b", "c"], "J_mean": [0.9, 0.7, 0.5, 0.1],
                            "F_mean": [0.8, 0.6, 0.4, 0.2]})
    counts = resample_counts(np.zeros(3), 500, 0)
    low, high = vm.davis_interval(objects, counts, 0.95)
    estimate = (objects["J_mean"].mean() + objects["F_mean"].mean()) / 2
    assert low < estimate < high and 0.1 <= low and high <= 0.9
    same = resample_counts(np.zeros(3), 1, 0) * 0 + 1  # every sequence once: the estimate itself
    assert vm.davis_interval(objects, same, 0.95) == pytest.approx((estimate, estimate))
    d = [np.array([[0.05, 0.3]]), np.array([[0.15, 0.05]]), np.array([[0.05, np.nan]])]
    bounds = vm.pck_interval(d, resample_counts(np.zeros(3), 500, 0), 0.95)
    full = vm.pck_summary(vm.joint_pck(d))
    for key, (lo, hi) in bounds.items():
        assert lo <= full[key] <= hi


def test_summary_table_and_markdown_state_the_protocol(tmp_path):
    folders = []
    for variant, random_init, jf in (("dino", False, 0.62), ("tiny", True, 0.2)):
        folder = tmp_path / variant
        folder.mkdir()
        metrics = {"jf_mean": jf, "jf_mean_low": jf - 0.05, "jf_mean_high": jf + 0.05, "j_mean": jf, "f_mean": jf,
                   "copy_jf_mean": 0.1, "n_sequences": 2, "n_objects": 3, "pck@0.1": None}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "setting.json").write_text(json.dumps({
            "dataset": "davis", "variant": variant, "random_init": random_init, "family": "dinov2",
            "propagate": {"topk": 10}, "protocol": {"bootstrap": {"resamples": 1000, "unit": "sequence"}}}))
        folders.append(folder)
    table = vm.video_summary_table(folders)
    assert table["variant"].tolist() == ["dino", "tiny"] and table.loc[0, "jf_mean"] == 0.62
    assert table["weights"].tolist() == ["pretrained", "random-init (not a trained model)"]
    text = vm.video_summary_markdown(table, [json.loads((f / "setting.json").read_text()) for f in folders])
    assert "| davis | dino | pretrained | 62.00 [57.0, 67.0] | 62.00 | n/a | 62.00 | n/a | n/a | n/a | 10.00 |" in text
    assert "ceil(0.008 x image diagonal)" in text and '{"topk": 10}' in text and "| 2 | 3 | n/a |" in text
    assert '"unit": "sequence"' in text and "0.6 x the diagonal" in text
