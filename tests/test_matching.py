"""Matching: exact predictions on hand-built feature maps, through real feature stores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from semcorr.pipeline.backbones.base import Backbone, BackboneSpec
from semcorr.pipeline.coords import CellTransform
from semcorr.pipeline.export import names_to_pair, write_matches_h5
from semcorr.pipeline.matching import (check_conf, default_soft_conf, locate, match_keypoints, match_pairs,
                                      mutual_nearest, peaks, refine, soft_argmax)
from semcorr.pipeline.store import open_store, write_store
from semcorr.pipeline.tables import flatten

C = 16


class GridOnly(Backbone):
    """The real resize/grid/transform logic of `Backbone`, with no network."""

    patch_size = 8
    feat_dim = C


def transform(image_hw, resize, input_size=56) -> CellTransform:
    spec = BackboneSpec(family="daisy", variant="grid", random_init=True, input_size=input_size, resize=resize)
    return GridOnly(spec).transform(image_hw)


def store_attrs(resize="pad", feat_dim=C, input_size=56, patch=8) -> dict:
    return {
        "backbone": "grid", "family": "daisy", "variant": "grid", "weights_sha256": None, "random_init": True,
        "layer": None, "patch_size": patch, "input_size": input_size, "resize": resize, "feat_dim": feat_dim,
        "dataset": "hand", "flips": False, "versions": {"test": "0"},
    }


def predict(store, pairs, method="argmax", upsample=1, mutual=False, **soft) -> pd.DataFrame:
    """The match stage's two steps: argmax (keeping windows), then soft-argmax from them."""
    matches = match_pairs(store, pairs, {"upsample": upsample, "mutual": mutual, "max_window": 7})
    return matches.table if method == "argmax" else refine(matches, soft)


def pair_row(pair_id, src, trg, src_xy, trg_xy, category="cat", norm=10.0, visible=None) -> dict:
    n = len(src_xy)
    return {
        "pair_id": pair_id, "split": "test", "category": category, "source_id": src, "target_id": trg,
        "source_kps": flatten(src_xy), "target_kps": flatten(trg_xy),
        "visible": [True] * n if visible is None else list(visible), "pck_norm": norm, "norm_kind": "bbox",
    }


def shifted_case(resize, rng, shift=(2, 1)):
    """A random source map and a target map holding a shifted copy of it, on rectangular
    images of different sizes; source keypoints at source cell centres with known answers."""
    t_src, t_trg = transform((45, 70), resize), transform((62, 41), resize)
    src = rng.standard_normal((C, t_src.grid_h, t_src.grid_w)).astype(np.float16).astype(np.float32)
    trg = rng.standard_normal((C, t_trg.grid_h, t_trg.grid_w)).astype(np.float16).astype(np.float32)
    dx, dy = shift
    src_cells, trg_cells = [], []
    for i in range(t_src.grid_h):
        for j in range(t_src.grid_w):
            if i + dy < t_trg.grid_h and j + dx < t_trg.grid_w:
                trg[:, i + dy, j + dx] = src[:, i, j]
                src_cells.append((j, i))
                trg_cells.append((j + dx, i + dy))
    src_xy = t_src.cells_to_pixels(np.array(src_cells, dtype=np.float64))
    trg_xy = t_trg.cells_to_pixels(np.array(trg_cells, dtype=np.float64))
    return (t_src, src), (t_trg, trg), src_xy, trg_xy


@pytest.mark.parametrize("resize", ["pad", "squash"])
def test_shifted_copy_gives_exact_pixels_through_store(tmp_path, resize):
    rng = np.random.default_rng(0)
    (t_src, src), (t_trg, trg), src_xy, trg_xy = shifted_case(resize, rng)
    assert (t_src.grid_h, t_src.grid_w) != (t_trg.grid_h, t_trg.grid_w) or resize == "squash"
    path = write_store(tmp_path / "f.zarr", store_attrs(resize), [("a", src, t_src), ("b", trg, t_trg)])
    pairs = pd.DataFrame([pair_row("p0", "a", "b", src_xy, trg_xy), pair_row("p1", "a", "b", src_xy[::-1], trg_xy[::-1])])
    for method in ("argmax", "softargmax"):
        pred = predict(open_store(path), pairs, method, temperature=1e-4)
        assert list(pred.columns) == ["pair_id", "kp_index", "x", "y", "score", "reliable", "visible"]
        got = pred[pred.pair_id == "p0"][["x", "y"]].to_numpy()
        np.testing.assert_allclose(got, trg_xy, atol=1e-6)
        np.testing.assert_allclose(pred[pred.pair_id == "p1"][["x", "y"]].to_numpy(), trg_xy[::-1], atol=1e-6)
        np.testing.assert_allclose(pred["score"], 1.0, atol=1e-5)


def test_one_hot_in_interior_is_exact_for_windowed_softargmax():
    h, w = 9, 12
    trg = torch.zeros(C, h, w)
    src_desc = torch.zeros(1, 3, C)
    spots = [(4, 3), (7, 5), (5, 4)]  # (gx, gy), all >= 3 cells from the border
    for k, (j, i) in enumerate(spots):
        trg[k, i, j] = 1.0
        src_desc[0, k, k] = 1.0
    trg[C - 1] = 0.3  # background so that every cell has a direction
    # the seed study's default (+-3 cells, temperature 0.1) and GeoAware-SC's (radius 7, beta 0.02;
    # its zeros outside the window weigh exp(0) each, negligible against exp(1 / 0.02))
    for window, temperature, zero_outside in ((3, 0.1, False), (7, 0.02, True)):
        cells, _ = match_keypoints(src_desc, trg, "softargmax", window, temperature, zero_outside)
        np.testing.assert_allclose(cells[0].numpy(), np.array(spots, dtype=np.float32), atol=1e-5)
    cells, _ = match_keypoints(src_desc, trg, "softargmax", window=3, temperature=0.1)
    assert cells.dtype == torch.float32


def test_softargmax_tends_to_argmax_as_temperature_goes_to_zero():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(3, 40, C, generator=gen)
    trg = torch.randn(3, C, 7, 10, generator=gen)  # batched targets, peaks often at the border
    arg, arg_scores = match_keypoints(src, trg, "argmax")
    for zero_outside, window in ((False, 3), (True, 7)):
        errors = [
            (match_keypoints(src, trg, "softargmax", window, t, zero_outside)[0] - arg).abs().max().item()
            for t in (1.0, 0.1, 1e-3, 1e-6)
        ]
        assert errors[-1] < 1e-4 and errors[0] > errors[-1]
        soft_scores = match_keypoints(src, trg, "softargmax", window, 1e-6, zero_outside)[1]
        torch.testing.assert_close(soft_scores, arg_scores)


def test_windowed_softargmax_by_hand():
    sim = torch.full((1, 5, 5), -1.0)
    sim[0, 2, 2], sim[0, 2, 3] = 1.0, 0.5  # peak at (gx=2, gy=2), runner-up to its right
    cells, score = locate(sim, "softargmax", window=1, temperature=0.5, zero_outside=False)
    e = np.exp(np.array([1.0, 0.5] + [-1.0] * 7) / 0.5)
    gx = (2 * e[0] + 3 * e[1] + e[2:] @ np.array([1, 1, 1, 2, 2, 3, 3])) / e.sum()
    gy = (2 * e[0] + 2 * e[1] + e[2:] @ np.array([1, 2, 3, 1, 3, 1, 3])) / e.sum()
    np.testing.assert_allclose(cells[0].numpy(), [gx, gy], rtol=1e-6)
    assert score.item() == 1.0
    # GeoAware-SC: outside the window the similarity is 0, softmax over the whole map.
    cells, _ = locate(sim, "softargmax", window=0, temperature=0.5, zero_outside=True)
    e_peak, n_out = np.exp(2.0), 24
    xs = np.tile(np.arange(5), 5)
    gx = (2 * e_peak + (xs.sum() - 2)) / (e_peak + n_out)
    np.testing.assert_allclose(cells[0, 0].item(), gx, rtol=1e-6)


def test_upsampling_stays_exact_on_one_hot_maps_at_cell_centres():
    h, w = 8, 9
    trg = torch.zeros(C, h, w)
    trg[C - 1] = 0.5
    src_desc = torch.zeros(1, 2, C)
    spots = [(3, 2), (6, 5)]
    for k, (j, i) in enumerate(spots):
        trg[k, i, j] = 1.0
        src_desc[0, k, k] = 1.0
    expected = np.array(spots, dtype=np.float32)
    # factor 2: the one-hot becomes a 2x2 plateau centred on the cell centre
    cells, _ = match_keypoints(src_desc, trg, "softargmax", window=3, temperature=1e-3, upsample=2)
    np.testing.assert_allclose(cells[0].numpy(), expected, atol=1e-5)
    cells, _ = match_keypoints(src_desc, trg, "softargmax", window=3, temperature=1e-3, zero_outside=True, upsample=2)
    np.testing.assert_allclose(cells[0].numpy(), expected, atol=1e-5)
    # odd factors put an upsampled cell on the centre: argmax is exact too
    cells, _ = match_keypoints(src_desc, trg, "argmax", upsample=3)
    np.testing.assert_allclose(cells[0].numpy(), expected, atol=1e-6)


def test_upsampled_argmax_exact_through_store(tmp_path):
    rng = np.random.default_rng(1)
    t_src, t_trg = transform((40, 64), "pad"), transform((64, 48), "pad")
    src = np.zeros((C, t_src.grid_h, t_src.grid_w), np.float32)
    trg = np.zeros((C, t_trg.grid_h, t_trg.grid_w), np.float32)
    src[C - 1], trg[C - 1] = 0.5, 0.5
    src_cells = [(1, 1), (5, 3), (6, 2)]
    trg_cells = [(4, 5), (1, 2), (3, 4)]  # not on the border: there the upsampled map is flat outwards
    for k, ((sj, si), (tj, ti)) in enumerate(zip(src_cells, trg_cells)):
        src[k, si, sj] = trg[k, ti, tj] = 1.0 + rng.random()
    path = write_store(tmp_path / "f.zarr", store_attrs(), [("a", src, t_src), ("b", trg, t_trg)])
    src_xy = t_src.cells_to_pixels(np.array(src_cells, float))
    trg_xy = t_trg.cells_to_pixels(np.array(trg_cells, float))
    pairs = pd.DataFrame([pair_row("p", "a", "b", src_xy, trg_xy)])
    pred = predict(open_store(path), pairs, upsample=3)
    np.testing.assert_allclose(pred[["x", "y"]].to_numpy(), trg_xy, atol=1e-6)


def test_mutual_filter_flags_a_planted_non_mutual_match(tmp_path):
    t = transform((48, 48), "squash")  # 7 x 7 cells
    e = np.eye(C, dtype=np.float32)
    src = np.zeros((C, 7, 7), np.float32)
    trg = np.zeros((C, 7, 7), np.float32)
    src[C - 1], trg[C - 1] = 0.05, 0.05
    src[:, 1, 1] = e[0]  # keypoint A: its best target cell (0, 5)...
    trg[:, 5, 0] = e[0] + e[1]
    src[:, 6, 6] = e[0] + e[1]  # ...matches back to a far source cell: not mutual
    src[:, 3, 4] = e[2]  # keypoint B: mutual
    trg[:, 2, 2] = e[2]
    path = write_store(tmp_path / "f.zarr", store_attrs("squash"), [("a", src, t), ("b", trg, t)])
    src_xy = t.cells_to_pixels(np.array([(1, 1), (4, 3)], float))
    trg_xy = t.cells_to_pixels(np.array([(0, 5), (2, 2)], float))
    pairs = pd.DataFrame([pair_row("p", "a", "b", src_xy, trg_xy)])
    pred = predict(open_store(path), pairs, mutual=True)
    assert pred["reliable"].tolist() == [False, True]
    assert predict(open_store(path), pairs, "softargmax", mutual=True)["reliable"].tolist() == [False, True]
    assert predict(open_store(path), pairs, mutual=False)["reliable"].tolist() == [True, True]
    # tensor level: the back-match lands within one cell -> still reliable
    src_t = torch.from_numpy(src)
    assert mutual_nearest(src_t[:, 6, 6][None], src_t, torch.tensor([[5.0, 5.0]])).item()
    assert not mutual_nearest(src_t[:, 6, 6][None], src_t, torch.tensor([[4.0, 6.0]])).item()


def test_invisible_and_missing_keypoints_and_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    (t_src, src), (t_trg, trg), src_xy, trg_xy = shifted_case("pad", rng)
    path = write_store(tmp_path / "f.zarr", store_attrs(), [("a", src, t_src), ("b", trg, t_trg)])
    src_xy = src_xy[:3].copy()
    src_xy[2] = np.nan  # not annotated in the source
    pairs = pd.DataFrame([pair_row("p", "a", "b", src_xy, trg_xy[:3], visible=[True, False, False])])
    pred = predict(open_store(path), pairs)
    assert pred["visible"].tolist() == [True, False, False]
    assert pred["reliable"].tolist() == [True, True, False]
    assert np.isnan(pred.loc[2, ["x", "y", "score"]].to_numpy(float)).all()
    np.testing.assert_allclose(pred.loc[:1, ["x", "y"]].to_numpy(), trg_xy[:2], atol=1e-6)
    bad = pd.DataFrame([pair_row("q", "a", "zzz", src_xy, trg_xy[:3])])
    with pytest.raises(KeyError, match="f.zarr.*zzz"):
        match_pairs(open_store(path), bad)
    with pytest.raises(ValueError, match="unknown match settings.*windw"):
        check_conf({"windw": 3})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        check_conf({"temperature": 0}, default_soft_conf)
    with pytest.raises(ValueError, match="window 5 exceeds the kept windows' radius 2"):
        refine(match_pairs(open_store(path), pairs, {"max_window": 2}), {"window": 5})


def test_export_h5_in_hloc_layout(tmp_path):
    """One keypoint set per image (annotations, then transferred points, merged within 0.5 px);
    matches0 indexes into those sets; repeated pairs get their pair id."""
    pairs = pd.DataFrame([
        pair_row("p0", "cat/a.jpg", "cat/b.jpg", np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[7.2, 8.0], [0.0, 0.0]])),
        pair_row("p1", "cat/b.jpg", "cat/a.jpg", np.array([[5.0, 6.0]]), np.array([[1.0, 2.0]])),
        pair_row("p2", "cat/b.jpg", "cat/a.jpg", np.array([[1.0, 1.0]]), np.array([[3.0, 4.0]])),
    ])
    images = pd.DataFrame({"image_id": ["cat/a.jpg", "cat/b.jpg"], "path": ["a", "b"], "width": [20, 30],
                           "height": [25, 35], "category": ["cat", "cat"]})
    pred = pd.DataFrame({
        "pair_id": ["p0", "p0", "p1", "p2"], "kp_index": [0, 1, 0, 0], "x": [7.0, np.nan, 1.3, 1.0],
        "y": [8.0, np.nan, 2.0, 1.0], "score": [0.9, np.nan, 0.5, 0.2], "reliable": [True, False, True, False],
        "visible": [True] * 4,
    })
    path = write_matches_h5(tmp_path / "m.h5", pairs, pred, images, tmp_path / "f.h5")
    assert names_to_pair("cat/a.jpg", "cat/b.jpg") == "cat-a.jpg/cat-b.jpg"
    with h5py.File(tmp_path / "f.h5", "r") as f:
        # a: annotated (1,2) (3,4) (as p0 source and p1/p2 targets); nothing new lands in a
        np.testing.assert_allclose(f["cat/a.jpg"]["keypoints"][()], [[1, 2], [3, 4]])
        np.testing.assert_allclose(f["cat/a.jpg"]["scores"][()], [1, 1])
        assert f["cat/a.jpg"]["image_size"][()].tolist() == [20, 25]
        # b: annotated (7.2, 8) (0, 0) (5, 6) (1, 1); the prediction (7, 8) lands within 0.5 px of (7.2, 8)
        np.testing.assert_allclose(f["cat/b.jpg"]["keypoints"][()], [[7.2, 8], [0, 0], [5, 6], [1, 1]], atol=1e-6)
        assert "descriptors" not in f["cat/a.jpg"]
    with h5py.File(path, "r") as f:
        g = f["cat-a.jpg/cat-b.jpg"]
        assert g["matches0"].dtype == np.int32
        assert g["matches0"][()].tolist() == [0, -1]  # (1,2) -> b's point 0; (3,4): no prediction
        np.testing.assert_allclose(g["matching_scores0"][()], [0.9, 0.0])
        # b -> a: b's keypoints (7.2,8), (0,0), (5,6), (1,1); (5,6) predicted at (1.3,2), within 0.5 px of a's (1,2)
        assert f["cat-b.jpg/cat-a.jpg"]["matches0"][()].tolist() == [-1, -1, 0, -1]
        assert f["cat-b.jpg/cat-a.jpg#p2"]["matches0"][()].tolist() == [-1, -1, -1, -1]  # repeated pair; unreliable
        assert "scores0" not in g


def test_eval_throughput_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end at toy size and prints its table."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "benchmarks/eval_throughput.py", "--workdir", str(tmp_path), "--images", "12",
         "--pairs", "30", "--read-test-mb", "8"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 / 30 / " in done.stdout and "time / bound (2 reads)" in done.stdout
    pred = pd.read_parquet(tmp_path / "data" / "predictions" / "bench_bb" / "bench" / "argmax" / "predictions.parquet")
    assert pred["pair_id"].nunique() == 30 and np.isfinite(pred[["x", "y"]].to_numpy()).all()


@pytest.mark.parametrize("conf", [{"method": "argmax"}, {"method": "softargmax"}, {"method": "argmax", "upsample": 2},
                                  {"method": "softargmax", "upsample": 2, "zero_outside": True, "temperature": 0.02}])
def test_store_passes_equal_per_pair_reference(tmp_path, conf):
    """Bulk passes (gathered source descriptors, shared target products) = per-pair tensor matching."""
    from semcorr.pipeline.coords import clamp_to_image, sample_cells

    rng = np.random.default_rng(5)
    sizes = [(45, 70), (62, 41), (56, 56), (30, 50), (50, 30)]
    items = [(f"i{k}", rng.standard_normal((C, t.grid_h, t.grid_w)).astype(np.float32), t)
             for k, t in enumerate(transform(hw, "pad") for hw in sizes)]
    store = open_store(write_store(tmp_path / "f.zarr", store_attrs(), items, shard_images=2))
    rows = []
    for p in range(12):
        s, t = rng.choice(len(items), 2, replace=False)
        h, w = sizes[s]
        src_xy = rng.uniform([-2, -2], [w + 1, h + 1], (int(rng.integers(1, 9)), 2))
        rows.append(pair_row(f"p{p}", f"i{s}", f"i{t}", src_xy, src_xy))
    pairs = pd.DataFrame(rows)
    soft = {k: conf[k] for k in ("zero_outside", "temperature") if k in conf}
    pred = predict(store, pairs, conf["method"], conf.get("upsample", 1), **soft)
    for row in pairs.itertuples():
        xy = torch.from_numpy(np.asarray(row.source_kps, dtype=np.float64).reshape(-1, 2))
        g = store.transform(row.source_id).pixels_to_cells(xy).float()
        desc = sample_cells(store.features(row.source_id)[None], g[None])
        cells, scores = match_keypoints(desc, store.features(row.target_id), **conf)
        t_trg = store.transform(row.target_id)
        expected = clamp_to_image(t_trg.cells_to_pixels(cells[0].double()).numpy(), (t_trg.image_w, t_trg.image_h))
        got = pred[pred.pair_id == row.pair_id]
        np.testing.assert_allclose(got[["x", "y"]].to_numpy(), expected, atol=1e-3)
        np.testing.assert_allclose(got["score"].to_numpy(), scores[0].numpy(), atol=1e-5)


def test_softargmax_from_kept_windows_equals_the_full_map():
    """Step 2 reads only the windows around the argmax: it must give what a softmax over the
    whole similarity map gives (zero_outside: cells outside the window count with similarity 0),
    also for peaks at the border and windows smaller than the kept radius."""
    gen = torch.Generator().manual_seed(3)
    sim = torch.rand(200, 9, 13, generator=gen) * 2 - 1
    sim[0, 0, 0] = sim[1, 8, 12] = sim[2, 4, 0] = 5.0  # peaks in corners and on an edge
    found = peaks(sim, max_window=4)
    for window, temperature, zero_outside in ((0, 0.1, False), (2, 0.05, False), (4, 0.3, False), (1, 0.02, True),
                                              (4, 0.5, True)):
        expected = _full_map_softargmax(sim, window, temperature, zero_outside)
        got = soft_argmax(found.cells, found.windows, found.grid, window, temperature, zero_outside)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        cells, _ = locate(sim, "softargmax", window, temperature, zero_outside)
        torch.testing.assert_close(cells, expected, rtol=0, atol=1e-5)


def _full_map_softargmax(sim: torch.Tensor, window: int, temperature: float, zero_outside: bool) -> torch.Tensor:
    """Reference written from the definition, float64, over every cell of every map."""
    sim = sim.double()
    q, h, w = sim.shape
    flat = sim.reshape(q, -1)
    peak = flat.argmax(1)
    px, py = (peak % w)[:, None, None], (peak // w)[:, None, None]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = ((xs[None] - px).abs() <= window) & ((ys[None] - py).abs() <= window)
    if zero_outside:
        logits = torch.where(inside, sim, torch.zeros(())) / temperature
    else:
        logits = torch.where(inside, sim / temperature, torch.tensor(float("-inf"), dtype=torch.float64))
    weights = torch.softmax(logits.reshape(q, -1), 1).reshape(q, h, w)
    return torch.stack([(weights * xs).sum((1, 2)), (weights * ys).sum((1, 2))], 1).float()
