"""Matching settings chosen on val: the grid, its deterministic choice, the stage that never
reads test; and the matcher's output rules (points clamped to the image, ties broken
by the lowest index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from semcorr.pipeline.matching import match_pairs, peaks
from semcorr.pipeline.store import open_store, write_store
from semcorr.pipeline.tables import write_tables
from semcorr.pipeline.tuning import grid, grid_search
from test_matching import C, pair_row, store_attrs, transform

SUBCELL = (0.3, 0.2)  # the bumps' centre, off the cell centres


def bump_case(tmp_path: Path, n_kp: int = 6):
    """Target maps holding a smooth bump per keypoint centred off the cell grid: argmax can only
    find the nearest cell, a soft-argmax gets closer. Returns (store, pairs table)."""
    rng = np.random.default_rng(0)
    t = transform((56, 56), "squash")  # 7 x 7 cells of 8 px
    src = np.zeros((C, 7, 7), np.float32)
    trg = np.zeros((C, 7, 7), np.float32)
    src[C - 1] = trg[C - 1] = 0.3
    ys, xs = np.mgrid[0:7, 0:7]
    src_cells, trg_xy = [], []
    for k in range(n_kp):
        j, i = 1 + k % 4, 1 + (k * 2) % 5
        src[k, i, j] = 1.0
        cx, cy = j + SUBCELL[0], i + SUBCELL[1]
        trg[k] = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 0.6**2))
        src_cells.append((j, i))
        trg_xy.append(t.cells_to_pixels(np.array([cx, cy])))
    path = write_store(tmp_path / "f.zarr", store_attrs("squash"), [("a", src, t), ("b", trg, t)])
    src_xy = t.cells_to_pixels(np.array(src_cells, float))
    rows = [pair_row(f"p{k}", "a", "b", src_xy + rng.normal(0, 1e-3, src_xy.shape), np.array(trg_xy), norm=56.0)
            for k in range(3)]
    return open_store(path), pd.DataFrame(rows)


GRID = {"upsample": [1], "window": [0, 1, 2], "temperature": [0.01, 0.05, 0.2], "zero_outside": [False], "alpha": 0.03}


def test_grid_search_prefers_a_refinement_that_recovers_sub_cell_positions(tmp_path):
    store, pairs = bump_case(tmp_path)
    table, chosen = grid_search(store, pairs, GRID)
    assert len(table) == 1 + 2 * 3 and table["val_pairs"].eq(3).all()
    argmax = table[table["window"] == 0]["val_pck"].iloc[0]
    assert argmax == 0.0  # 0.36 cells = 2.9 px off, alpha 0.03 x 56 = 1.7 px
    assert chosen["window"] > 0 and chosen["val_pck"] > argmax
    assert chosen["val_pck"] == table["val_pck"].max()


def test_ties_go_to_the_first_setting_in_grid_order(tmp_path):
    store, pairs = bump_case(tmp_path)
    table, chosen = grid_search(store, pairs, {**GRID, "alpha": 1.0})  # everything correct: all tie
    assert table["val_pck"].eq(1.0).all()
    assert chosen == {"upsample": 1, "window": 0, "temperature": None, "zero_outside": False, "val_pck": 1.0}
    order = grid({"upsample": [2, 1], "window": [1, 0], "temperature": [0.1, 0.02], "zero_outside": [True, False]})
    assert [tuple(s.values()) for s in order[:3]] == [(1, 0, None, False), (1, 1, 0.02, False), (1, 1, 0.02, True)]


def test_predictions_are_clamped_to_the_target_image(tmp_path):
    """With pad resizing a partial last cell's centre lies in the padding; predictions stay inside."""
    t = transform((45, 70), "pad")  # the last row of cells is partial
    cx, cy = t.cells_to_pixels(np.array([t.grid_w - 1, t.grid_h - 1], float))
    assert cy > 45 - 1  # the last cell's centre is below the image
    feats = np.zeros((C, t.grid_h, t.grid_w), np.float32)
    feats[C - 1] = 0.2
    feats[0, -1, -1] = 1.0  # the match lands on the bottom-right cell
    path = write_store(tmp_path / "f.zarr", store_attrs(), [("a", feats, t), ("b", feats, t)])
    xy = t.cells_to_pixels(np.array([[t.grid_w - 1, t.grid_h - 1]], float))
    pred = match_pairs(open_store(path), pd.DataFrame([pair_row("p", "a", "b", xy, xy)])).table
    assert pred.loc[0, "y"] == 45 - 1 and 0 <= pred.loc[0, "x"] <= 70 - 1


def test_similarity_ties_break_to_the_lowest_flat_index():
    sim = torch.zeros(2, 4, 5)
    sim[0, 3, 1] = sim[0, 1, 4] = 1.0  # row 1 comes first
    sim[1, 2, 3] = sim[1, 2, 0] = 1.0  # same row: column 0 comes first
    cells = peaks(sim, 0).cells.tolist()
    assert cells == [[4, 1], [0, 2]]


def test_tune_stage_reads_val_only_and_valtuned_uses_its_choice(tmp_path):
    from semcorr.stages import match, tune

    store, pairs = bump_case(tmp_path / "s")
    data = tmp_path / "data"
    (data / "features" / "bb").mkdir(parents=True)
    store.path.rename(data / "features" / "bb" / "toy.zarr")
    images = pd.DataFrame({"image_id": ["a", "b"], "path": ["/nowhere/a.png", "/nowhere/b.png"], "width": 56,
                           "height": 56, "category": "cat"})
    val = pairs.assign(split="val", pair_id=["v0", "v1", "v2"])
    test = pairs.assign(split="test")
    write_tables(data / "prepared" / "toy", pd.concat([val, test], ignore_index=True), images)
    out = tune.main("toy", "bb", GRID, "toy", data_root=data)
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["tuned_on"] == {"dataset": "toy", "split": "val", "pairs": 3} and chosen["setting"]["window"] > 0
    assert pd.read_csv(out / "grid.csv")["val_pairs"].eq(3).all()
    conf = {"argmax": {"upsample": 1, "mutual": False, "max_window": 3}, "valtuned": GRID}
    folder = match.main("toy", "bb", "valtuned", conf, "test", data_root=data)
    setting = json.loads((folder / "setting.json").read_text())
    assert setting["match"]["chosen"] == chosen["setting"] and setting["tuned_on"]["split"] == "val"
    with pytest.raises(ValueError, match="another grid"):
        match.main("toy", "bb", "valtuned", {**conf, "valtuned": {**GRID, "window": [0, 1]}}, "test", data_root=data)
    no_val = write_tables(data / "prepared" / "noval", test, images)
    with pytest.raises(ValueError, match="neither noval nor finetune.train_dataset = noval has val pairs"):
        tune.main("noval", "bb", GRID, "noval", data_root=data)
    assert no_val.exists()
