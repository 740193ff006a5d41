"""Geometry-aware keypoints: the left/right tables, the flags and flip permutations SPair-71k's
parser writes (hand-made fixture with image annotations and masks), and PCK on the subset."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semcorr.pipeline.datasets import DatasetError, prepare
from semcorr.pipeline.pck import evaluate_predictions
from semcorr.pipeline.symmetry import AP10K, SPAIR, UNDEFINED, flip_index, geo_aware_flags, geo_aware_pck
from semcorr.pipeline.tables import decode_mask, read_images, read_pairs
from test_datasets import make_spair, spair_annotation

# SPair-71k keypoints per category (SPair's own ImageAnnotation files list 0..n-1 per category)
SPAIR_COUNTS = {"aeroplane": 25, "bicycle": 14, "bird": 17, "boat": 14, "bottle": 10, "bus": 30, "car": 30, "cat": 15,
                "chair": 14, "cow": 21, "dog": 16, "horse": 20, "motorbike": 13, "person": 20, "pottedplant": 9,
                "sheep": 21, "train": 18, "tvmonitor": 16}


@pytest.mark.parametrize("name, kset", [*SPAIR.items(), ("ap10k", AP10K)])
def test_left_right_tables_agree_with_their_sides(name, kset):
    """Two published lists (the sides and the flip pairs) tell the same story: each pair is
    one left and one right keypoint, and every keypoint with a side has a counterpart."""
    assert kset.n == (SPAIR_COUNTS[name] if name in SPAIR else 17)
    paired = [i for pair in kset.flip_pairs for i in pair]
    assert len(paired) == len(set(paired))
    assert all({kset.sides[a], kset.sides[b]} == {1, 2} for a, b in kset.flip_pairs)
    assert sorted(paired) == [i for i in range(kset.n) if kset.sides[i]]
    assert all(0 <= i < kset.n and len(g) >= 2 for g in kset.geo_groups for i in g)
    assert (kset.counterpart()[kset.counterpart()] == np.arange(kset.n)).all()  # an involution


def test_flags_and_permutation_by_hand():
    cat = SPAIR["cat"]  # ears 2-3 a group; paws 9-12 a group; eyes 4-5 mirror each other but are no group
    ids = [2, 3, 9, 4]
    assert flip_index(cat, ids) == [1, 0, -1, -1]  # 9's counterpart 10 and 4's (5) are not in the pair
    assert geo_aware_flags(cat, ids, [True] * 4, [2, 3, 4, 9, 10]) == [True, True, True, False]
    assert geo_aware_flags(cat, ids, [True, True, False, True], [2, 9]) == [False, False, False, False]
    assert geo_aware_flags(cat, ids, [False, True, True, True], [2, 3, 9, 11]) == [False, True, True, False]
    with pytest.raises(ValueError, match=r"ids \[15\] outside 0..14"):
        flip_index(cat, [15])


def write_image_annotation(root, category: str, name: str, visible: list[int], n: int) -> None:
    path = root / "ImageAnnotation" / category / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"filename": f"{name}.jpg", "kps": {str(k): [1.0, 1.0] if k in visible else None
                                                                     for k in range(n)}}))


@pytest.fixture
def spair_raw(tmp_path):
    """The parser tests' SPair fixture (cat a 80x60 -> b 70x90) with ids, image annotations, masks."""
    pairs = {
        "trn": {"p1:cat": spair_annotation(kps_ids=["2", "3", "9"])},  # ears + a paw; b shows 2, 3, 4, 9, 10
        "val": {"p2:cat": spair_annotation("b.jpg", "a.jpg", kps_ids=["2", "3", "4"], src_kps=[[5, 5], [69, 89], [30, 40]],
                                           trg_kps=[[0, 0], [79, 59], [10.5, 20]], trg_bndbox=[0, 0, 50, 40])},  # a: 2, 9
        "test": {"p3:cat": spair_annotation(kps_ids=["1", "4", "7"])},  # ids as the parser tests use them
    }
    raw = make_spair(tmp_path / "raw", pairs)
    write_image_annotation(raw, "cat", "b", [2, 3, 4, 9, 10], 15)
    write_image_annotation(raw, "cat", "a", [2, 9], 15)
    for name, (w, h) in (("a", (80, 60)), ("b", (70, 90))):
        mask = np.zeros((h, w), np.uint8)
        mask[10:30, 5:40] = 1 if name == "a" else 255  # indexed or binary PNGs: object = nonzero
        (raw / "Segmentation" / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(raw / "Segmentation" / "cat" / f"{name}.png")
    return raw


def test_spair_parser_writes_ids_flags_permutations_and_masks(spair_raw, tmp_path):
    out = prepare("spair", spair_raw, tmp_path / "prepared")
    pairs = read_pairs(out).set_index("pair_id")
    trn, val, test = pairs.loc["trn/p1:cat"], pairs.loc["val/p2:cat"], pairs.loc["test/p3:cat"]
    assert list(trn.kp_ids) == [2, 3, 9] and list(trn.flip_index) == [1, 0, -1]
    assert list(trn.geo_aware) == [True, True, True]  # b shows both ears, and paws 9 and 10
    assert list(val.geo_aware) == [False, False, False]  # a shows one ear; the eye is in no group
    assert list(test.flip_index) == [-1, -1, -1]  # counterparts 0, 5, 6 are not in the pair
    assert list(test.geo_aware) == [False, False, False]  # below ear, eye, nose: in no group
    images = read_images(out).set_index("image_id")
    mask = decode_mask(images.loc["JPEGImages/cat/a.jpg", "mask"], 60, 80) > 0
    assert mask.sum() == 20 * 35 and mask[10:30, 5:40].all()
    assert images.loc["JPEGImages/cat/b.jpg", "mask_path"].endswith("Segmentation/cat/b.png")


def test_without_image_annotations_the_flags_are_undefined(spair_raw, tmp_path):
    import shutil

    shutil.rmtree(spair_raw / "ImageAnnotation")
    shutil.rmtree(spair_raw / "Segmentation")
    pairs = read_pairs(prepare("spair", spair_raw, tmp_path / "prepared"))
    assert pairs["geo_aware"].isna().all() and pairs["flip_index"].notna().all()
    assert "mask" not in read_images(tmp_path / "prepared").columns
    result = geo_aware_pck(pairs, pd.DataFrame(), [0.1], "spair")
    assert not result.defined and "no geometry-aware flags" in result.reason


@pytest.mark.parametrize("remove, fragment", [
    ("ImageAnnotation/cat/b.json", "image annotation not found"),
    ("Segmentation/cat/a.png", "segmentation mask not found"),
])
def test_a_missing_image_annotation_or_mask_is_named(spair_raw, tmp_path, remove, fragment):
    (spair_raw / remove).unlink()
    with pytest.raises(DatasetError, match=rf"{remove}: {fragment}"):
        prepare("spair", spair_raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_a_mask_of_another_size_is_named(spair_raw, tmp_path):
    Image.fromarray(np.ones((10, 10), np.uint8)).save(spair_raw / "Segmentation" / "cat" / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png: mask is 10x10, its image 70x90"):
        prepare("spair", spair_raw, tmp_path / "prepared")


# -- PCK on the subset ---------------------------------------------------------------------------


def test_geo_aware_pck_counts_only_flagged_keypoints():
    def row(pair_id, category, n, flags, visible=None):
        return {"pair_id": pair_id, "split": "test", "category": category, "source_id": "s", "target_id": "t",
                "source_kps": [0.0] * 2 * n, "target_kps": [0.0] * 2 * n, "visible": visible or [True] * n,
                "pck_norm": 10.0, "norm_kind": "bbox", "geo_aware": flags}
    pairs = pd.DataFrame([row("a", "cat", 3, [True, True, False]), row("b", "dog", 2, [False, True]),
                          row("c", "dog", 2, [False, False]), row("d", "cat", 2, None),
                          row("e", "cat", 2, [True, True], [True, False])])
    err = {"a": [0.5, 5.0, 0.5], "b": [0.5, 0.5], "c": [0.5, 0.5], "d": [0.5, 0.5], "e": [5.0, 0.5]}  # pixels
    predictions = pd.DataFrame([{"pair_id": p, "kp_index": k, "x": e, "y": 0.0} for p, es in err.items()
                                for k, e in enumerate(es)])
    result = geo_aware_pck(pairs, predictions, [0.1])
    assert result.defined and result.n_pairs_flagged == 4  # d has no flags
    assert result.n_points_visible == 3 + 2 + 2 + 1
    # flagged and visible: a0 (hit), a1 (miss), b1 (hit), e0 (miss); e1 is flagged but not visible
    assert result.pck.n_points == 4 and result.pck.point[0.1] == pytest.approx(2 / 4)
    assert result.pck.n_pairs == 3 and result.pck.image[0.1] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert result.pck.n_pairs_no_visible == 1  # c: no geometry-aware visible keypoint
    assert result.per_category["dog"].point[0.1] == 1.0
    full, _ = evaluate_predictions(pairs, predictions, [0.1])
    assert full.n_points == 10  # the full set, d included


def test_geo_aware_pck_is_undefined_where_the_dataset_has_no_ids():
    pairs = pd.DataFrame({"pair_id": ["p"], "visible": [[True]]})
    for dataset in ("pfpascal", "pfwillow", "synthetic"):
        result = geo_aware_pck(pairs, pd.DataFrame(), [0.1], dataset)
        assert not result.defined and result.reason == UNDEFINED[dataset]



def test_evaluate_reports_the_subset_beside_the_full_set(spair_raw, tmp_path):
    """The evaluate stage on the hand-made SPair pairs: metrics.json holds the subset's PCK and
    counts (numbers only), geo_aware.csv its table, the text report says it."""
    from semcorr.pipeline.weights import sha256_file
    from semcorr.stages.evaluate import main as evaluate
    from semcorr.stages.match import _write

    data = tmp_path / "data"
    prepare("spair", spair_raw, data / "prepared" / "spair")
    pairs = read_pairs(data / "prepared" / "spair", "trn")  # ids 2, 3, 9: all geometry-aware
    truth = np.asarray(pairs["target_kps"][0], dtype=float).reshape(-1, 2)
    table = pd.DataFrame({"pair_id": pairs["pair_id"][0], "kp_index": [0, 1, 2], "x": truth[:, 0] + [0, 0, 50],
                          "y": truth[:, 1], "score": 1.0, "reliable": True, "visible": True})  # the third misses
    digest = sha256_file(data / "prepared" / "spair" / "pairs.parquet")
    _write(data, "v", "spair", "argmax", pairs, table, {"variant": "v", "dataset": "spair", "method": "argmax",
                                                         "split": "trn", "pairs_sha256": digest, "match": {}})
    out = evaluate("spair", "v", "argmax", [0.1], "trn", data_root=data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["geo_n_points"], metrics["geo_n_pairs"]) == (3, 1)
    assert metrics["geo_pck_pt@0.1"] == pytest.approx(2 / 3) and metrics["pck_pt@0.1"] == pytest.approx(2 / 3)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    geo = pd.read_csv(out / "geo_aware.csv")
    assert geo.loc[geo["category"] == "all", "n_points"].tolist() == [3]
    report = next((out / "reports").glob("*_kpt_report.txt")).read_text()
    assert "geometry-aware subset (GeoAware-SC): 3 of 3 visible keypoints in 1 pairs" in report
