"""Protocol presets on hand-worked examples, bootstrap intervals (exact in degenerate cases,
seeded), paired comparisons, and the deterministic rules of the matcher's output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from semcorr.pipeline import bootstrap as boot
from semcorr.pipeline.protocols import PRESETS, Protocol, ProtocolError, evaluate_protocols, score
from semcorr.pipeline.summary import Evaluation, comparisons
from semcorr.pipeline.tables import flatten

# Two categories, three pairs; every target image 100 x 50 (w x h).
#   pair a (cat x): 2 visible keypoints, errors 3 px and 10 px
#   pair b (cat x): 1 visible keypoint, error 5 px; one invisible keypoint with a huge error
#   pair c (cat y): 2 visible keypoints, errors 0 and 20 px
GT = {"a": [[10, 10], [30, 20]], "b": [[50, 25], [60, 30]], "c": [[20, 5], [80, 45]]}
PRED = {"a": [[13, 10], [30, 30]], "b": [[50, 30], [0, 0]], "c": [[20, 5], [80, 25]]}
VISIBLE = {"a": [True, True], "b": [True, False], "c": [True, True]}


def tables(norm_kind="image", pck_norm=100.0, bbox=None):
    pairs = pd.DataFrame([{
        "pair_id": p, "category": "y" if p == "c" else "x", "source_id": f"s{p}", "target_id": f"t{p}",
        "source_kps": flatten(np.array(GT[p])), "target_kps": flatten(np.array(GT[p])), "visible": VISIBLE[p],
        "pck_norm": pck_norm, "norm_kind": norm_kind, **({"target_bbox": bbox[p]} if bbox else {}),
    } for p in GT])
    predictions = pd.DataFrame([{"pair_id": p, "kp_index": k, "x": float(x), "y": float(y)}
                                for p in PRED for k, (x, y) in enumerate(PRED[p])])
    sizes = {"target": np.array([[100.0, 50.0]] * 3), "source": np.array([[100.0, 50.0]] * 3)}
    return pairs, predictions, sizes


def value(protocol: Protocol, pairs, predictions, sizes, alphas, input_size=None) -> np.ndarray:
    scored = score(protocol, pairs, predictions, sizes, alphas, input_size)
    return boot.pck_statistic(protocol.aggregation, scored.hits, scored.n_visible, scored.categories,
                              boot.point_weights(len(scored.hits)))[0]


def test_aggregations_by_hand():
    pairs, predictions, sizes = tables()
    # image normaliser 100 px, alpha 0.1 -> 10 px: a 2/2 (10 <= 10), b 1/1, c 1/2
    image = Protocol("t", "image", "image")
    assert value(image, pairs, predictions, sizes, [0.1]) == pytest.approx([(1 + 1 + 0.5) / 3])
    assert value(Protocol("t", "image", "point"), pairs, predictions, sizes, [0.1]) == pytest.approx([4 / 5])
    # category mean: x = mean(1, 1) = 1, y = 0.5 -> 0.75
    assert value(Protocol("t", "image", "category"), pairs, predictions, sizes, [0.1]) == pytest.approx([0.75])
    # strict threshold: the 10 px error of pair a is no longer correct at exactly 10 px
    strict = Protocol("t", "image", "image", threshold="<")
    assert value(strict, pairs, predictions, sizes, [0.1]) == pytest.approx([(0.5 + 1 + 0.5) / 3])


def test_normalisers_by_hand():
    pairs, predictions, sizes = tables(norm_kind="bbox", pck_norm=40.0,
                                       bbox={"a": [0, 0, 40, 20], "b": [0, 0, 20, 40], "c": [0, 0, 10, 40]})
    # kpts: extents a max(20, 10) = 20, b 0 (one visible point) -> only an exact hit counts, c max(60, 40) = 60
    kpts = Protocol("t", "kpts", "image")
    assert value(kpts, pairs, predictions, sizes, [0.25]) == pytest.approx([(0.5 + 0 + 0.5) / 3])
    # bbox from the boxes: all 40 px; alpha 0.25 -> 10 px: a 2/2, b 1/1, c 1/2
    assert value(Protocol("t", "bbox", "image"), pairs, predictions, sizes, [0.25]) == pytest.approx([2.5 / 3])
    # native: the pair table's pck_norm (40, bbox) gives the same here
    assert value(PRESETS["native"], pairs, predictions, sizes, [0.25]) == pytest.approx([2.5 / 3])


def test_squash_frame_by_hand():
    """Targets 100 x 50 squashed to 200 x 200: x scales by 2, y by 4 (edge-aligned)."""
    pairs, predictions, sizes = tables()
    squash = Protocol("t", "image", "point", frame="squash", frame_size=200)
    # in the squash frame, pixel offsets: a (3, 0)->(6, 0): 6 px; (0, 10)->(0, 40): 40 px; b (0, 5)->(0, 20)
    # c: 0 and (0, 20)->(0, 80); normaliser 200, alpha 0.1 -> 20 px: 6, 20 correct; 40, 80 not; 0 correct
    assert value(squash, pairs, predictions, sizes, [0.1]) == pytest.approx([3 / 5])
    # the variant's input size is the default side
    assert value(Protocol("t", "image", "point", frame="squash"), pairs, predictions, sizes, [0.1],
                 input_size=200) == pytest.approx([3 / 5])
    with pytest.raises(ProtocolError, match="bounding box in the squash frame"):
        score(Protocol("t", "bbox", "image", frame="squash"), pairs, predictions, sizes, [0.1], 200)


def test_bbox_normaliser_in_the_squash_frame_by_hand():
    """SPair's boxes squashed with their image: [0, 0, 40, 20] -> 80 x 80; [0, 0, 20, 40] and
    [0, 0, 10, 40] -> max side 160."""
    pairs, predictions, sizes = tables(norm_kind="bbox", pck_norm=40.0,
                                       bbox={"a": [0, 0, 40, 20], "b": [0, 0, 20, 40], "c": [0, 0, 10, 40]})
    # alpha 0.1: a 8 px (errors 6, 40 -> 1 of 2), b 16 px (20 -> 0), c 16 px (0, 80 -> 1 of 2)
    squash = Protocol("t", "bbox", "point", frame="squash", frame_size=200)
    assert value(squash, pairs, predictions, sizes, [0.1]) == pytest.approx([2 / 5])
    assert value(PRESETS["seed_study"], pairs, predictions, sizes, [0.1], input_size=200) == pytest.approx([1 / 3])


def test_backward_direction_needs_reverse_predictions():
    pairs, predictions, sizes = tables()
    both = Protocol("t", "image", "point", directions=("forward", "backward"))
    with pytest.raises(ProtocolError, match="match.argmax.reverse"):
        score(both, pairs, predictions, sizes, [0.1])
    scored = score(both, pairs, predictions, sizes, [0.1], reverse=predictions)  # the same errors backwards
    assert scored.hits.shape == (6, 1)
    assert value(Protocol("t", "image", "point"), pairs, predictions, sizes, [0.1]) == pytest.approx(
        boot.pck_statistic("point", scored.hits, scored.n_visible, scored.categories, boot.point_weights(6))[0])


def test_undefined_protocols_are_reported_not_invented():
    pairs, predictions, sizes = tables()  # no boxes: the spair preset (bbox) is not defined
    weights = boot.resample_counts(pairs["category"].to_numpy(), 200, 0)
    table = evaluate_protocols([PRESETS["spair"], PRESETS["pfpascal"]], pairs, predictions, sizes, [0.1], weights, 0.95)
    spair = table[table.protocol == "spair"].iloc[0]
    assert not spair.defined and np.isnan(spair.pck) and "bounding box" in spair.note
    pascal = table[table.protocol == "pfpascal"].iloc[0]
    assert pascal.defined and pascal.pck == pytest.approx(2.5 / 3) and pascal.ci_low <= pascal.pck <= pascal.ci_high


def test_bootstrap_degenerate_cases_are_exact_and_seeded():
    categories = np.array(["x"] * 30 + ["y"] * 20)
    n_visible = np.full(50, 4.0)
    weights = boot.resample_counts(categories, 1000, seed=7)
    assert weights.shape == (1000, 50)
    assert (weights[:, :30].sum(1) == 30).all() and (weights[:, 30:].sum(1) == 20).all()  # strata keep their size
    for hits, expected in ((n_visible[:, None], 1.0), (np.zeros((50, 1)), 0.0)):
        for aggregation in ("image", "point", "category"):
            low, high = boot.interval(boot.pck_statistic(aggregation, hits, n_visible, categories, weights), 0.95)
            assert (low[0], high[0]) == (expected, expected)
    again = boot.resample_counts(categories, 1000, seed=7)
    assert np.array_equal(weights, again) and not np.array_equal(weights, boot.resample_counts(categories, 1000, 8))


def test_bootstrap_interval_covers_a_mixed_sample():
    rng = np.random.default_rng(0)
    hits = rng.integers(0, 5, size=(400, 1)).astype(float)
    n_visible = np.full(400, 4.0)
    categories = np.repeat(["a", "b", "c", "d"], 100)
    weights = boot.resample_counts(categories, 1000, 0)
    point = boot.pck_statistic("image", np.minimum(hits, 4), n_visible, categories, boot.point_weights(400))[0, 0]
    low, high = boot.interval(boot.pck_statistic("image", np.minimum(hits, 4), n_visible, categories, weights), 0.95)
    assert low[0] < point < high[0] and high[0] - low[0] < 0.15


def _evaluation(key, hits, categories):
    per_pair = pd.DataFrame({"pair_id": [f"p{k}" for k in range(len(hits))], "category": categories,
                             "n_visible": 2, "hits@0.1": hits})
    return Evaluation(key, {}, {}, per_pair, pd.DataFrame(), None)


def test_paired_comparisons():
    categories = np.repeat(["a", "b"], 50)
    base = _evaluation(("vit", "d", "argmax"), np.r_[np.ones(50), np.zeros(50)], categories)
    same = _evaluation(("vit", "d", "softargmax"), np.r_[np.ones(50), np.zeros(50)], categories)
    better = _evaluation(("vit_ft2", "d", "argmax"), np.r_[np.full(50, 2.0), np.ones(50)], categories)
    table = comparisons([base, same, better], {"resamples": 500, "seed": 0}).set_index("comparison")
    soft = table.loc["soft-argmax − argmax"]
    assert (soft.delta, soft.ci_low, soft.ci_high, soft.significant) == (0.0, 0.0, 0.0, False)
    tuned = table.loc["fine-tuned − baseline"]
    assert tuned.delta == pytest.approx(0.5) and tuned.ci_low > 0 and tuned.significant
    assert tuned.baseline == "vit/d/argmax" and tuned.n_pairs == 100


def test_difficulty_breakdown_by_flag_level():
    from semcorr.stages.evaluate import difficulty_table

    pairs, predictions, sizes = tables()
    pairs["viewpoint_variation"] = [0, 0, 2]
    pairs["occlusion"] = [None, None, None]  # a flag without values is left out
    native = score(PRESETS["native"], pairs, predictions, sizes, [0.1])
    weights = boot.resample_counts(pairs["category"].to_numpy(), 200, 0)
    table = difficulty_table(pairs, native, [0.1], weights, 0.95)
    assert set(table["flag"]) == {"viewpoint_variation"}
    level = table.set_index("level")
    assert level.loc[0, "pck"] == pytest.approx(1.0) and level.loc[0, "n_pairs"] == 2  # pairs a and b
    assert level.loc[2, "pck"] == pytest.approx(0.5) and (level.loc[2, "ci_low"], level.loc[2, "ci_high"]) == (0.5, 0.5)
