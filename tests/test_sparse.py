"""Sparse matching: mutual NN and the ratio test, MMA and homography accuracy on hand-made
cases, HPatches in its real layout (written here), the synthetic set's homographies, and the
keypoints -> sparse stages end to end, read back through hloc's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.transform import ProjectiveTransform, resize, warp

from semcorr.pipeline.datasets import DatasetError, hpatches, synthetic
from semcorr.pipeline.sparse import (corner_error, descriptors, estimate_homography, match_precision, mutual_nearest,
                                     sparse_markdown, sparse_table, summarize, unit, warp_points)
from semcorr.pipeline.tables import keypoints, write_tables
from test_export_hloc import hloc_get_keypoints, hloc_get_matches

MATCH = {"weight": 1.0, "ratio": None, "ransac_threshold": 3.0, "seed": 0}


def test_mutual_nearest_and_ratio_test():
    d0 = unit(np.array([[1.0, 0, 0], [0, 1.0, 0], [0.9, 0.1, 0], [0, 0, 1.0]]))
    d1 = unit(np.array([[1.0, 0.05, 0], [0, 1.0, 0], [0.7, 0.7, 0.1]]))
    m0, s0 = mutual_nearest(d0, d1)
    # 0 <-> 0, 1 <-> 1; 2 also prefers 0 but 0 prefers 0 (not mutual); 3's best is 2, whose best is 1
    assert m0.tolist() == [0, 1, -1, -1]
    np.testing.assert_allclose(s0, [d0[0] @ d1[0], d0[1] @ d1[1], 0, 0], rtol=1e-6)
    # the ratio test runs both ways: d1[0] is nearly as close to d0[2] as to d0[0], so 0 <-> 0 is
    # ambiguous from the target's side and dropped; 1 <-> 1 (distance 0) always passes
    assert mutual_nearest(d0, d1, ratio=0.3)[0].tolist() == [-1, 1, -1, -1]
    assert mutual_nearest(d0, d1, ratio=0.99)[0].tolist() == [0, 1, -1, -1]
    assert mutual_nearest(d0, d1[:0])[0].tolist() == [-1] * 4


def test_fused_descriptor_is_unit_and_weights_the_cosines():
    rng = np.random.default_rng(0)
    local, semantic = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 4))
    a, b = (descriptors("fused", local[i], semantic[i], weight=2.0) for i in range(2))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-6)
    cos_l, cos_s = (unit(local[0]) * unit(local[1])).sum(1), (unit(semantic[0]) * unit(semantic[1])).sum(1)
    np.testing.assert_allclose((a * b).sum(1), (cos_l + 4 * cos_s) / 5, rtol=1e-5)
    np.testing.assert_allclose(descriptors("fused", local[0], semantic[0], 0.0)[:, :8], unit(local[0]), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown descriptor"):
        descriptors("dense", local[0], semantic[0])


def test_mma_and_homography_accuracy_on_identity_and_a_known_shift():
    grid = np.stack(np.meshgrid(np.arange(10, 90, 10.0), np.arange(10, 70, 10.0)), -1).reshape(-1, 2)
    shift = np.array([[1, 0, 3.0], [0, 1, 0], [0, 0, 1]])
    matches = np.arange(len(grid))
    # identity homography, exact matches: everything within 1 px; the estimate is exact
    assert match_precision(grid, grid, matches, np.eye(3)).tolist() == [1.0] * 10
    assert corner_error(estimate_homography(grid, grid, matches), np.eye(3), (100, 80)) == pytest.approx(0, abs=1e-6)
    # target keypoints shifted by 3 px but judged against the identity: correct from 3 px on
    shifted = grid + [3.0, 0.0]
    assert match_precision(grid, shifted, matches, np.eye(3)).tolist() == [0, 0] + [1.0] * 8
    estimate = estimate_homography(grid, shifted, matches)
    assert corner_error(estimate, shift, (100, 80)) == pytest.approx(0, abs=1e-6)
    assert corner_error(estimate, np.eye(3), (100, 80)) == pytest.approx(3, abs=1e-6)
    # half the matches wrong: MMA 0.5; RANSAC still finds the shift
    wrong = matches.copy()
    wrong[::2] = np.roll(matches[::2], 5)
    assert match_precision(grid, shifted, wrong, shift)[0] == pytest.approx(0.5)
    assert corner_error(estimate_homography(grid, shifted, wrong), shift, (100, 80)) < 1e-3
    # no match, or fewer than 4: MMA 0 and a failed estimate
    none = np.full(len(grid), -1)
    assert match_precision(grid, grid, none, np.eye(3)).tolist() == [0.0] * 10
    assert corner_error(estimate_homography(grid, grid, np.r_[matches[:3], none[3:]]), np.eye(3), (100, 80)) == np.inf
    np.testing.assert_allclose(warp_points(shift, [[1.0, 2.0]]), [[4.0, 2.0]])


def test_summary_and_table_state_their_setting():
    per_pair = pd.DataFrame([
        {"descriptor": d, "pair_id": f"p{k}", "kind": kind, "n_matches": 10, **{f"mma@{t}": v for t in range(1, 11)},
         "corner_error": err}
        for d in ("local", "fused") for k, (kind, v, err) in enumerate([("illumination", 1.0, 0.5),
                                                                        ("viewpoint", 0.5, 4.0)])])
    summary = summarize(per_pair)
    row = summary[(summary.descriptor == "fused") & (summary.kind == "all")].iloc[0]
    assert (row["mma@3"], row["h_acc@1"], row["h_acc@5"], row["n_pairs"]) == (0.75, 0.5, 1.0, 2)
    assert summary[summary.kind == "viewpoint"]["h_acc@3"].tolist() == [0.0, 0.0]
    from semcorr.pipeline.sparse import metrics_dict

    table = sparse_table([(metrics_dict(summary), {"variant": "tiny", "dataset": "hpatches", "random_init": True})])
    assert table.descriptor.tolist()[:3] == ["local", "local", "local"] and table.kind.tolist()[:3] == \
        ["all", "illumination", "viewpoint"]
    text = sparse_markdown(table, {"max_keypoints": 64, "weight": 1.0, "ransac_threshold": 3.0})
    assert "| tiny | hpatches | fused | all | 75.0 |" in text and "at most 64 per image" in text
    # intervals over pairs: the same resamples for every descriptor, exact where the pairs agree
    boot = {"resamples": 200, "seed": 0, "confidence": 0.95}
    table = sparse_table([(metrics_dict(summary), {"variant": "tiny", "dataset": "hpatches"})], [per_pair], boot)
    fused = table[table.descriptor == "fused"].set_index("kind")
    assert (fused.loc["viewpoint", "mma@3_lo"], fused.loc["viewpoint", "mma@3_hi"]) == (0.5, 0.5)
    assert (fused.loc["all", "h_acc@3_lo"], fused.loc["all", "h_acc@3_hi"]) == (0.5, 0.5)  # one pair of each kind
    text = sparse_markdown(table, {**boot, "max_keypoints": 64})
    assert "| 75.0 [75.0, 75.0] |" in text and "95% bootstrap interval over pairs (200 resamples" in text
    other = per_pair.assign(**{"mma@3": [1.0, 0.0, 1.0, 0.0]})  # two pairs per kind: a real spread
    other = pd.concat([other, other.assign(pair_id=other.pair_id + "b", **{"mma@3": [0.0, 1.0, 0.0, 1.0]})])
    wide = sparse_table([(metrics_dict(summarize(other)), {"variant": "tiny", "dataset": "hpatches"})], [other], boot)
    row = wide[(wide.descriptor == "local") & (wide.kind == "all")].iloc[0]
    assert row["mma@3_lo"] < row["mma@3"] == 0.5 < row["mma@3_hi"]
    one_kind = summarize(per_pair[per_pair.kind == "viewpoint"])
    rows = sparse_table([(metrics_dict(one_kind), {"variant": "tiny", "dataset": "synthetic"})])
    assert rows.kind.tolist() == ["viewpoint", "viewpoint"] and rows["mma@1"].tolist() == [0.5, 0.5]


# -- HPatches in its official layout --------------------------------------------------------


def write_hpatches(root: Path, size: int = 96) -> Path:
    """Two sequences in the release layout: i_* (brightness changes, identity homography) and
    v_* (random homographies), images 1..6 as PPM, H_1_2 .. H_1_6 as text."""
    base = resize(skdata.astronaut()[60:360, 100:400] / 255.0, (size, size), anti_aliasing=True)
    rng = np.random.default_rng(0)
    corners = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], dtype=np.float64)
    for name in ("i_test", "v_test"):
        folder = root / hpatches.RELEASE / name
        folder.mkdir(parents=True)
        Image.fromarray((base * 255).astype(np.uint8)).save(folder / "1.ppm")
        for k in range(2, 7):
            if name.startswith("i_"):
                h, image = np.eye(3), np.clip(base * (0.6 + 0.15 * k), 0, 1)
            else:
                moved = corners + rng.uniform(-0.08, 0.08, (4, 2)) * size
                tform = ProjectiveTransform.from_estimate(corners, moved)
                h, image = tform.params, warp(base, tform.inverse, output_shape=(size, size), order=1)
            Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{k}.ppm")
            (folder / f"H_1_{k}").write_text("\n".join(" ".join(f"{v:.10e}" for v in r) for r in h) + "\n")
    return root


@pytest.fixture(scope="module")
def hp(tmp_path_factory) -> Path:
    return write_hpatches(tmp_path_factory.mktemp("hpatches") / "raw" / "hpatches")


def test_hpatches_parse_and_homographies(hp, tmp_path):
    pairs, images = hpatches.parse(hp)
    assert len(images) == 12 and set(images.category) == {"illumination", "viewpoint"}
    assert len(pairs) == 10 and set(pairs.split) == {"test"} and pairs.pair_id.iloc[0] == "i_test/1-2"
    h = hpatches.homographies(hp)
    assert np.allclose(h[("i_test/1.ppm", "i_test/3.ppm")], np.eye(3))
    row = pairs[pairs.pair_id == "v_test/1-4"].iloc[0]
    vis = np.asarray(row.visible)
    np.testing.assert_allclose(warp_points(h[("v_test/1.ppm", "v_test/4.ppm")], keypoints(row.source_kps)[vis]),
                               keypoints(row.target_kps)[vis], atol=1e-9)
    write_tables(tmp_path / "prepared", pairs, images)  # a valid prepared dataset for the PCK pipeline too

    import shutil

    bad = shutil.copytree(hp, tmp_path / "bad")
    (bad / hpatches.RELEASE / "v_test" / "H_1_5").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(DatasetError, match="H_1_5: expected 9 finite numbers"):
        hpatches.homographies(bad)
    (bad / hpatches.RELEASE / "v_test" / "H_1_5").write_text("0 0 0\n0 0 0\n0 0 0\n")
    with pytest.raises(DatasetError, match="H_1_5: singular"):
        hpatches.parse(bad)
    with pytest.raises(DatasetError, match="no HPatches sequences"):
        hpatches.parse(tmp_path)


def test_synthetic_homographies_carry_the_annotations(tmp_path):
    raw = synthetic.generate(tmp_path / "raw", {"categories": 1, "images_per_category": 6, "image_size": 64,
                                                "keypoints": 6})
    h = synthetic.homographies(raw)
    ann = json.loads((raw / "annotations.json").read_text())["images"]
    a, b = sorted(ann)[:2]
    np.testing.assert_allclose(warp_points(h[b] @ np.linalg.inv(h[a]), ann[a]["keypoints"]), ann[b]["keypoints"],
                               atol=1e-5)


def test_keypoints_and_sparse_stages_on_hpatches(hp, tmp_path):
    """keypoints -> sparse with a weight-free DAISY store: per-kind MMA and H-acc, hloc files."""
    import shutil

    from semcorr.stages import extract, sparse

    data = tmp_path / "data"
    shutil.copytree(hp, data / "raw" / "hpatches")
    pairs, images = hpatches.parse(data / "raw" / "hpatches")
    write_tables(data / "prepared" / "hpatches", pairs, images)
    (data / "weights" / "daisy").mkdir(parents=True)
    (data / "weights" / "daisy" / "weights.json").write_text(json.dumps({"file": None, "sha256": None}))
    model = {"family": "daisy", "variant": "daisy", "layer": None, "input_size": 98, "resize": "pad", "arch": {}}
    conf = {"batch_size": 4, "num_workers": 0, "device": "cpu", "flips": False, "shard_images": 16}
    extract.main("hpatches", "daisy", model, conf, data_root=data, progress=False)

    kp_dir = sparse.keypoints_main("hpatches", "test", {"max_keypoints": 200}, data_root=data)
    table = pd.read_parquet(kp_dir / "pairs.parquet")
    assert len(table) == 10 and set(table.kind) == {"illumination", "viewpoint"}
    out = sparse.main("hpatches", "daisy", MATCH, data_root=data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"local", "semantic", "fused"}
    assert set(metrics["local"]) == {"all", "illumination", "viewpoint"}
    assert metrics["local"]["illumination"]["n_pairs"] == 5
    assert metrics["local"]["all"]["mma@3"] > 0.8 and metrics["local"]["illumination"]["h_acc@3"] == 1.0
    assert all(isinstance(v, (int, float)) for d in metrics.values() for k in d.values() for v in k.values())
    per_pair = pd.read_csv(out / "per_pair.csv")
    assert len(per_pair) == 30 and per_pair["mma@10"].between(0, 1).all()
    assert json.loads((out / "setting.json").read_text())["max_keypoints"] == 200

    # the files read back through hloc's layout: keypoints in the local features file, matches index into them
    kp1 = hloc_get_keypoints(kp_dir / "features.h5", "v_test/1.ppm")
    kp3 = hloc_get_keypoints(kp_dir / "features.h5", "v_test/3.ppm")
    np.testing.assert_array_equal(hloc_get_keypoints(out / "features-fused.h5", "v_test/1.ppm"), kp1)
    found, scores = hloc_get_matches(out / "matches-local.h5", "v_test/1.ppm", "v_test/3.ppm")
    h = hpatches.homographies(data / "raw" / "hpatches")[("v_test/1.ppm", "v_test/3.ppm")]
    error = np.linalg.norm(warp_points(h, kp1[found[:, 0]]) - kp3[found[:, 1]], axis=1)
    row = per_pair[(per_pair.descriptor == "local") & (per_pair.pair_id == "v_test/1-3")].iloc[0]
    assert len(found) == row.n_matches and (error <= 3).mean() == pytest.approx(row["mma@3"], abs=1e-6)
    assert (scores > 0).all()


def test_stages_refuse_a_dataset_without_homographies(tmp_path):
    from semcorr.stages import sparse

    with pytest.raises(ValueError, match="no known homographies"):
        sparse.pair_homographies("spair", tmp_path, pd.DataFrame())
    with pytest.raises(FileNotFoundError, match="run `semcorr keypoints --dataset hpatches` first"):
        sparse.main("hpatches", "daisy", MATCH, data_root=tmp_path)
