"""Stage level: prepared tables + feature stores -> match -> evaluate -> report."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semcorr.pipeline.coords import CellTransform, sample_cells
from semcorr.pipeline.matching import match_keypoints
from semcorr.pipeline.pck import pck_batched
from semcorr.pipeline.report import phase
from semcorr.pipeline.store import open_store, write_store
from semcorr.pipeline.tables import flatten, keypoints, read_pairs, write_tables
from semcorr.stages import evaluate, match, report

C, PATCH, INPUT = 8, 8, 48
SIZES = [(40, 48), (48, 36), (30, 48), (48, 48), (44, 40), (36, 48)]  # (h, w)


def grid_transform(h: int, w: int) -> CellTransform:
    """The `pad` policy of `Backbone.transform`, for an INPUT-pixel input and PATCH-pixel cells."""
    scale = INPUT / max(h, w)
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    return CellTransform.from_resize((h, w), (rh, rw), (0.0, 0.0), PATCH, (-(-rh // PATCH), -(-rw // PATCH)))


def build_project(root: Path, variants=("toy_bb", "toy_bb_ft2")) -> Path:
    """A data root with a 6-image, 2-category prepared dataset `toy` (PNG images on disk) and
    one feature store per variant; ``toy_bb_ft2`` is marked as tuned on another dataset."""
    rng = np.random.default_rng(0)
    data = root / "data"
    (root / "images").mkdir(parents=True)
    images = []
    for n, (h, w) in enumerate(SIZES):
        path = root / "images" / f"im{n}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        images.append({"image_id": f"im{n}", "path": str(path), "width": w, "height": h, "category": "ab"[n % 2]})
    images = pd.DataFrame(images)
    pairs = []
    for s in range(6):
        for t in range(6):
            if s == t or s % 2 != t % 2:
                continue
            (sh, sw), (th, tw) = SIZES[s], SIZES[t]
            n_kp = 5
            src_xy = rng.uniform(0, 1, (n_kp, 2)) * [sw - 1, sh - 1]
            trg_xy = rng.uniform(0, 1, (n_kp, 2)) * [tw - 1, th - 1]
            visible = rng.random(n_kp) < 0.8
            if (s, t) == (0, 2):
                visible[:] = False  # a pair with no visible keypoint
            src_xy[~visible & (rng.random(n_kp) < 0.5)] = np.nan
            pairs.append({
                "pair_id": f"p{s}{t}", "split": "trn" if (s, t) == (2, 4) else "test", "category": "ab"[s % 2],
                "source_id": f"im{s}", "target_id": f"im{t}", "source_kps": flatten(src_xy),
                "target_kps": flatten(trg_xy), "visible": visible.tolist(), "pck_norm": float(max(th, tw)),
                "norm_kind": "image",
            })
    write_tables(data / "prepared" / "toy", pd.DataFrame(pairs), images)
    for variant in variants:
        attrs = {
            "backbone": "toy_bb", "family": "daisy", "variant": variant, "weights_sha256": None, "random_init": True,
            "layer": None, "patch_size": PATCH, "input_size": INPUT, "resize": "pad", "feat_dim": C,
            "dataset": "toy", "flips": False, "versions": {"test": "0"},
        }
        items = []
        for n, (h, w) in enumerate(SIZES):
            t = grid_transform(h, w)
            items.append((f"im{n}", rng.standard_normal((C, t.grid_h, t.grid_w)).astype(np.float32), t))
        write_store(data / "features" / variant / "toy.zarr", attrs, items)
    (data / "weights" / "toy_bb_ft2").mkdir(parents=True)
    (data / "weights" / "toy_bb_ft2" / "weights.json").write_text(json.dumps({"train_dataset": "other"}))
    return data


def direct_pck(data: Path, variant: str, method: str, conf: dict, alphas):
    """PCK computed pair by pair with the tensor-level functions."""
    store = open_store(data / "features" / variant / "toy.zarr")
    pairs = read_pairs(data / "prepared" / "toy", "test")
    n = max(len(keypoints(k)) for k in pairs["source_kps"])
    pred, gt, vis = np.zeros((len(pairs), n, 2)), np.zeros((len(pairs), n, 2)), np.zeros((len(pairs), n), bool)
    for p, row in enumerate(pairs.itertuples()):
        src_xy = keypoints(row.source_kps)
        ok = np.isfinite(src_xy).all(1)
        t_src, t_trg = store.transform(row.source_id), store.transform(row.target_id)
        g = t_src.pixels_to_cells(torch.from_numpy(src_xy[ok])).float()
        desc = sample_cells(store.features(row.source_id)[None], g[None])
        cells, _ = match_keypoints(desc, store.features(row.target_id), method, **conf)
        pred[p, ok] = t_trg.cells_to_pixels(cells[0].double()).numpy()
        pred[p, ~ok] = np.nan
        gt[p, : len(ok)] = keypoints(row.target_kps)
        vis[p, : len(ok)] = row.visible
    return pck_batched(pred, gt, vis, pairs["pck_norm"].to_numpy(), alphas)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return build_project(tmp_path_factory.mktemp("project"))


MATCH = {"argmax": {"upsample": 1, "mutual": True, "max_window": 3},
         "softargmax": {"window": 2, "temperature": 0.05, "zero_outside": False}}
WANTED = [(v, "toy", m) for v in ("toy_bb", "toy_bb_ft2") for m in ("argmax", "softargmax")]


def run_all(data: Path, alphas, conf=MATCH) -> None:
    for variant, dataset, method in WANTED:
        match.main(dataset, variant, method, conf, "test", data_root=data)
        evaluate.main(dataset, variant, method, alphas, "test", conf, data_root=data)


def test_match_evaluate_report_files_and_numbers(project, tmp_path):
    data = project
    alphas = [0.05, 0.1, 0.15]
    run_all(data, alphas)
    for variant, _, method in WANTED:
        out = data / "predictions" / variant / "toy" / method
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["features.h5", "matches.h5", "predictions.parquet", "setting.json"]
            + (["windows.npz"] if method == "argmax" else []))
        pred = pd.read_parquet(out / "predictions.parquet")
        assert len(pred) == 11 * 5 and "p24" not in set(pred["pair_id"])  # 11 test pairs x 5 keypoints
    folder = data / "eval" / "toy_bb" / "toy" / "softargmax"
    m = json.loads((folder / "metrics.json").read_text())
    s = json.loads((folder / "setting.json").read_text())
    expected = direct_pck(data, "toy_bb", "softargmax", {"window": 2, "temperature": 0.05}, alphas)
    assert {k: v for k, v in m.items() if k.startswith("pck_img") and "_" not in k[4:]} == pytest.approx(
        {f"pck_img@{a:g}": v for a, v in expected.image.items()})
    assert {k: v for k, v in m.items() if k.startswith("pck_pt") and "_" not in k[4:]} == pytest.approx(
        {f"pck_pt@{a:g}": v for a, v in expected.point.items()})
    for a in alphas:  # every PCK has its 95% bootstrap interval
        assert m[f"pck_img@{a:g}_lo"] <= m[f"pck_img@{a:g}"] <= m[f"pck_img@{a:g}_hi"]
    assert (m["n_pairs"], m["n_points"], m["n_pairs_no_visible"]) == (expected.n_pairs, expected.n_points, 1)
    assert all(isinstance(v, (int, float)) for v in m.values()), "metrics.json holds numbers only"
    assert (s["phase"], s["norm_kind"], s["random_init"], s["match"]["softargmax"]["window"]) == (3, "image", True, 2)
    pred = pd.read_parquet(data / "predictions" / "toy_bb" / "toy" / "softargmax" / "predictions.parquet")
    assert m["mutual_reliable"] == pytest.approx(pred.loc[pred["visible"], "reliable"].mean())

    out = data / "eval" / "toy_bb" / "toy" / "argmax"
    assert sorted(p.name for p in out.iterdir()) == ["geo_aware.csv", "metrics.json", "per_category.csv",
                                                     "per_pair.parquet", "protocols.csv", "reports", "setting.json"]
    assert sorted(p.name for p in (out / "reports").iterdir()) == [
        "phase1_argmax_image_report.txt", "phase1_argmax_kpt_report.txt"]
    text = (out / "reports" / "phase1_argmax_image_report.txt").read_text()
    for needle in ("per image", "normaliser: image", "RANDOM-INIT", "dataset: toy", "toy_bb", "argmax",
                   "1 left out for having no visible keypoint", "PCK@0.1"):
        assert needle in text
    assert "per point" in (out / "reports" / "phase1_argmax_kpt_report.txt").read_text()
    assert "matches are mutual" in (out / "reports" / "phase1_argmax_kpt_report.txt").read_text()
    per_cat = pd.read_csv(out / "per_category.csv")
    assert set(per_cat["category"]) == {"a", "b", "all"} and len(per_cat) == 9
    tuned = data / "eval" / "toy_bb_ft2" / "toy"
    assert (tuned / "argmax" / "reports" / "phase4_argmax_image_report.txt").is_file()
    assert "weights: random-init base, fine-tuned on other" in (tuned / "softargmax" / "reports" / "phase4_softargmax_kpt_report.txt").read_text()
    folder = data / "predictions" / "toy_bb" / "toy" / "argmax"
    with h5py.File(folder / "matches.h5", "r") as f, h5py.File(folder / "features.h5", "r") as g:
        assert f["im1/im3"]["matches0"].shape == (len(g["im1"]["keypoints"]),)  # hloc: one keypoint set per image

    results = report.main(WANTED, data, tmp_path / "results", pictures_per_category=1, max_pair_pictures=1)
    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == 4 and set(summary["phase"]) == {1, 3, 4}
    row = summary[(summary.variant == "toy_bb") & (summary.method == "softargmax")].iloc[0]
    assert row["pck_pt@0.1"] == pytest.approx(expected.point[0.1])
    markdown = (results / "summary.md").read_text()
    assert "| 3 refined matching (soft-argmax, val-tuned) | toy_bb | random-init (not a trained model) | — | softargmax |" in markdown
    assert "| 4 cross-dataset (fine-tuned on another dataset) | toy_bb_ft2 | random-init base, fine-tuned on other | other |" in markdown
    assert (results / "reports" / "toy_bb_ft2" / "toy" / "phase4_softargmax_kpt_report.txt").is_file()
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["toy_bb"]["toy"]["softargmax"]["pck_img@0.1"] == pytest.approx(expected.image[0.1])
    bars = pd.read_csv(results / "plots" / "pck" / "toy_softargmax.csv")
    assert list(bars.columns) == ["label", "pck_img"] and "all · toy_bb_ft2" in set(bars["label"])
    assert bars.set_index("label").loc["all · toy_bb", "pck_img"] == pytest.approx(100 * expected.image[0.1], abs=1e-4)
    assert (results / "charts" / "pck_toy_argmax.png").stat().st_size > 1000
    pictures = results / "pictures"
    assert (pictures / "toy_bb_ft2" / "toy" / "argmax" / "pair_p02.png").is_file()
    assert (pictures / "toy_bb" / "toy" / "softargmax" / "category_b.png").is_file()
    one = report.visualize("p13", "toy_bb_ft2", "toy", "argmax", data, tmp_path / "vis")
    assert one.is_file() and one.stat().st_size > 1000


def test_phase_derivation():
    assert phase("argmax", None, "spair") == 1
    assert phase("argmax", "spair", "spair") == 2
    assert phase("softargmax", None, "spair") == 3
    assert phase("softargmax", "spair", "spair") == 3
    assert phase("argmax", "spair", "pfwillow") == 4


def test_bad_inputs_fail_clearly_without_partial_output(project, tmp_path):
    with pytest.raises(FileNotFoundError, match="predictions/toy_bb/toy/nomethod"):
        evaluate.main("toy", "toy_bb", "nomethod", [0.1], "test", data_root=project)
    with pytest.raises(Exception, match="features/absent/toy.zarr"):
        match.main("toy", "absent", "argmax", MATCH, "test", data_root=project)
    assert not (project / "predictions" / "absent").exists()
    with pytest.raises(FileNotFoundError, match="eval/toy_bb/nowhere/argmax: no evaluation"):
        report.main([("toy_bb", "nowhere", "argmax")], project, tmp_path / "results", 0, 0)
    assert not (tmp_path / "results").exists()
