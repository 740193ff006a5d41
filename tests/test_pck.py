"""PCK against worked examples computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from semcorr.pipeline.pck import evaluate_predictions, pck_batched, pck_flat
from semcorr.pipeline.tables import flatten


def worked_example():
    """Three pairs, pck_norm 100 px each (alpha 0.1 -> 10 px, alpha 0.05 -> 5 px).

    pair a (cat x): errors 0, 4, 8, 30 px, keypoint 4 invisible (error 30) -> 0.05: 2/3, 0.1: 3/3
    pair b (cat x): errors 6, 12 px, both visible                          -> 0.05: 0/2, 0.1: 1/2
    pair c (cat y): 2 keypoints, none visible                             -> left out of per image
    per image: 0.05: (2/3 + 0) / 2 = 1/3;  0.1: (1 + 1/2) / 2 = 3/4
    per point (5 visible): 0.05: 2/5; 0.1: 4/5
    """
    gt = {"a": [[10, 10], [20, 20], [30, 30], [40, 40]], "b": [[50, 50], [60, 60]], "c": [[5, 5], [6, 6]]}
    offset = {"a": [0, 4, 8, 30], "b": [6, 12], "c": [1, 1]}
    visible = {"a": [True, True, True, False], "b": [True, True], "c": [False, False]}
    category = {"a": "x", "b": "x", "c": "y"}
    pairs = pd.DataFrame([
        {"pair_id": p, "split": "test", "category": category[p], "source_id": "s", "target_id": "t",
         "source_kps": flatten(np.array(gt[p], float)), "target_kps": flatten(np.array(gt[p], float)),
         "visible": visible[p], "pck_norm": 100.0, "norm_kind": "bbox"}
        for p in gt
    ])
    rows = []
    for p in gt:
        for k, ((x, y), d) in enumerate(zip(gt[p], offset[p])):
            rows.append({"pair_id": p, "kp_index": k, "x": x + d * 0.6, "y": y + d * 0.8})  # |(0.6, 0.8)| = 1
    return pairs, pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter


def test_worked_example_overall_and_per_category():
    pairs, pred = worked_example()
    overall, per_category = evaluate_predictions(pairs, pred, alphas=[0.05, 0.1])
    assert overall.image == pytest.approx({0.05: 1 / 3, 0.1: 3 / 4})
    assert overall.point == pytest.approx({0.05: 2 / 5, 0.1: 4 / 5})
    assert (overall.n_pairs, overall.n_points, overall.n_pairs_no_visible) == (2, 5, 1)
    assert per_category["x"].image == pytest.approx({0.05: 1 / 3, 0.1: 3 / 4})
    y = per_category["y"]
    assert (y.n_pairs, y.n_points, y.n_pairs_no_visible) == (0, 0, 1)
    assert math.isnan(y.image[0.1]) and math.isnan(y.point[0.1])
    np.testing.assert_allclose(overall.per_pair[:2], [[2 / 3, 1.0], [0.0, 0.5]])
    assert np.isnan(overall.per_pair[2]).all()


def test_boundary_is_inclusive_and_missing_prediction_is_wrong():
    # distance exactly alpha * norm counts as correct; a NaN prediction of a visible keypoint is wrong
    result = pck_flat([0.1, np.nan, 0.1000001], [0, 0, 0], [True, True, True], 1, alphas=[0.1])
    assert result.point[0.1] == pytest.approx(1 / 3)


def test_batched_matches_flat_and_accepts_tensors():
    pred = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[10.0, 0.0], [0.0, 0.0]]])  # errors 0, 5 | 10, pad
    gt = torch.zeros(2, 2, 2)
    visible = torch.tensor([[True, True], [True, False]])
    result = pck_batched(pred, gt, visible, torch.tensor([50.0, 100.0]), alphas=[0.05, 0.1])
    # pair 0: 0/50, 5/50=0.1 ; pair 1: 10/100=0.1
    assert result.image == pytest.approx({0.05: (1 / 2 + 0) / 2, 0.1: 1.0})
    assert result.point == pytest.approx({0.05: 1 / 3, 0.1: 1.0})
    assert result.n_points == 3


def test_missing_prediction_rows_raise():
    pairs, pred = worked_example()
    with pytest.raises(KeyError, match="pair 'b' keypoint 1"):
        evaluate_predictions(pairs, pred[~((pred.pair_id == "b") & (pred.kp_index == 1))])
