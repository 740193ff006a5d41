"""Test-time pose alignment: the flip mapping through the coordinate module, the
instance-matching distance, foreground cells, and the choice on a real photo and its mirror."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from skimage import data as skdata
from skimage.transform import resize

from semcorr.pipeline.backbones import BackboneSpec, build_backbone
from semcorr.pipeline.coords import CellTransform, flip_points
from semcorr.pipeline.matching import match_keypoints
from semcorr.pipeline.pose import (PoseError, cell_descriptors, choose_pose, foreground_cells, instance_distance,
                                   posed_pairs)
from semcorr.pipeline.store import open_store, write_store
from semcorr.pipeline.tables import encode_mask, flatten, keypoints, write_tables

PATCH = 8


def attrs(flips: bool, feat_dim: int, input_size: int = 64, patch: int = PATCH) -> dict:
    return {"backbone": "toy", "family": "daisy", "variant": "toy", "weights_sha256": None, "random_init": False,
            "layer": None, "patch_size": patch, "input_size": input_size, "resize": "pad", "feat_dim": feat_dim,
            "dataset": "toy", "flips": flips, "versions": {"test": "0"}}


def exact_transform(h: int, w: int) -> CellTransform:
    """No resize, no padding: the grid covers the image exactly (h, w multiples of PATCH)."""
    return CellTransform.from_resize((h, w), (h, w), (0.0, 0.0), PATCH, (h // PATCH, w // PATCH))


def pair_table(rows: list[dict]) -> pd.DataFrame:
    out = []
    for r in rows:
        n = len(r["src"])
        out.append({"pair_id": r["id"], "split": "test", "category": "c", "source_id": r["s"], "target_id": r["t"],
                    "source_kps": flatten(r["src"]), "target_kps": flatten(r["trg"]),
                    "visible": r.get("visible", [True] * n), "pck_norm": 10.0, "norm_kind": "image",
                    **({"flip_index": r["flip_index"]} if "flip_index" in r else {})})
    return pd.DataFrame(out)


# -- the flip mapping -----------------------------------------------------------------------------


def test_mirrored_source_samples_equal_unmirrored_on_a_mirror_symmetric_store(tmp_path):
    """feats_flip is the exact mirror of feats (the grid covers the image): a keypoint sampled
    in the mirrored map at `flip_points` of its pixel gives the unmirrored descriptor."""
    rng = np.random.default_rng(0)
    h, w = 24, 40
    t = exact_transform(h, w)
    feats = rng.standard_normal((6, t.grid_h, t.grid_w)).astype(np.float32)
    write_store(tmp_path / "s.zarr", attrs(True, 6), [("a", feats, t, feats[:, :, ::-1].copy())])
    store = open_store(tmp_path / "s.zarr")
    xy = rng.uniform([0, 0], [w - 1, h - 1], (20, 2))
    np.testing.assert_allclose(store.sample("a", flip_points(xy, w), flip=True), store.sample("a", xy),
                               rtol=1e-3, atol=1e-3)  # float16 storage


def test_one_hot_mirrored_match_lands_on_the_same_target_pixel(tmp_path):
    """One-hot maps, source mirror-symmetric: the descriptor `posed_pairs` reads from the
    mirrored source matches the same target cell as the unmirrored one."""
    h, w, c = 32, 48, 5
    t_src, t_trg = exact_transform(h, w), exact_transform(h, w)
    src_cells = [(1, 2), (4, 1), (5, 3)]  # (gx, gy)
    trg_cells = [(5, 3), (0, 0), (2, 1)]
    src = np.zeros((c, t_src.grid_h, t_src.grid_w), np.float32)
    trg = np.full((c, t_trg.grid_h, t_trg.grid_w), 0.01, np.float32)
    for k, ((sx, sy), (tx, ty)) in enumerate(zip(src_cells, trg_cells)):
        src[k, sy, sx] = 1.0
        trg[k, ty, tx] = 1.0
    write_store(tmp_path / "s.zarr", attrs(True, c), [("src", src, t_src, src[:, :, ::-1].copy()),
                                                       ("trg", trg, t_trg, trg[:, :, ::-1].copy())])
    store = open_store(tmp_path / "s.zarr")
    src_xy = t_src.cells_to_pixels(np.array(src_cells, dtype=np.float64))
    pairs = pair_table([{"id": "p", "s": "src", "t": "trg", "src": src_xy, "trg": np.zeros((3, 2))}])
    posed = posed_pairs(pairs, np.array([True]), {"src": w, "trg": w})
    assert posed["source_flip"][0] == [True, True, True]
    xy_flip = keypoints(posed["source_kps"][0])
    np.testing.assert_allclose(xy_flip, flip_points(src_xy, w))
    for desc in (store.sample("src", src_xy), store.sample("src", xy_flip, flip=True)):
        cells, _ = match_keypoints(desc[None], store.features("trg"))
        np.testing.assert_allclose(t_trg.cells_to_pixels(cells[0].double().numpy()),
                                   t_trg.cells_to_pixels(np.array(trg_cells, dtype=np.float64)))


def test_posed_pairs_reads_each_keypoints_counterpart_in_the_mirrored_source():
    src = np.array([[1.0, 2.0], [7.0, 3.0], [4.0, 4.0], [2.0, 9.0]])
    pairs = pair_table([
        # 0 <-> 1 are a left/right pair, 2 is central, 3's counterpart is not annotated in this pair
        {"id": "flip", "s": "a", "t": "b", "src": src, "trg": src, "flip_index": [1, 0, 2, -1]},
        {"id": "keep", "s": "a", "t": "b", "src": src, "trg": src, "flip_index": [1, 0, 2, -1]},
    ])
    posed = posed_pairs(pairs, np.array([True, False]), {"a": 10, "b": 10})
    moved = keypoints(posed["source_kps"][0])
    np.testing.assert_allclose(moved[0], flip_points(src[1], 10))
    np.testing.assert_allclose(moved[1], flip_points(src[0], 10))
    np.testing.assert_allclose(moved[2], flip_points(src[2], 10))
    np.testing.assert_allclose(moved[3], src[3])  # no counterpart: its unmirrored descriptor
    assert posed["source_flip"][0] == [True, True, True, False]
    np.testing.assert_allclose(keypoints(posed["source_kps"][1]), src)
    assert posed["source_flip"][1] == [False] * 4
    np.testing.assert_allclose(keypoints(pairs["source_kps"][0]), src)  # the input is left alone


# -- distance and foreground ------------------------------------------------------------------------


def test_instance_distance_by_hand():
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    trg = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # nearest target of (1, 0) is itself (0); of (0, 1) any: sqrt(2)
    assert instance_distance(src, trg, chunk=1) == pytest.approx(np.sqrt(2) / 2)
    assert np.isnan(instance_distance(src[:0], trg))


def test_foreground_cells_follow_the_mask_and_its_mirror():
    t = CellTransform.from_resize((20, 44), (20, 44), (0.0, 0.0), PATCH, (3, 6))  # last row/col partly padding
    inside = foreground_cells(t)  # a centre on the image's last pixel edge (19.5, 43.5) is outside
    assert inside[:2, :5].all() and not inside[:, 5].any() and not inside[2].any()
    mask = np.zeros((20, 44), bool)
    mask[:, :8] = True  # the left 8 columns: cell column 0
    assert np.array_equal(np.flatnonzero(foreground_cells(t, mask).any(0)), [0])
    mirrored = foreground_cells(t, mask, flip=True)  # the right 8 columns of the mirror: x 36..43
    assert np.array_equal(np.flatnonzero(mirrored.any(0)), [4])  # cell 4 covers 32..39; 5's centre (44) is outside
    assert cell_descriptors(np.ones((3, 3, 6), np.float32), mirrored).shape == (int(mirrored.sum()), 3)


# -- a real photo and its mirror ----------------------------------------------------------------


def daisy():
    return build_backbone(BackboneSpec(family="daisy", variant="daisy", input_size=112, resize="pad"))


def extract(net, image: np.ndarray):
    x, t = net.preprocess(image)
    with torch.no_grad():
        feats = net(x[None])[0, :, : t.grid_h, : t.grid_w]
    return feats, t


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A store of skimage's astronaut (112 x 84), its mirror, its mirror rescaled and
    another photo, with mirrored maps; images table with masks."""
    root = tmp_path_factory.mktemp("pose")
    photo = (resize(skdata.astronaut(), (84, 112), anti_aliasing=True) * 255).astype(np.uint8)
    images = {"astro": photo, "mirror": photo[:, ::-1].copy(),
              "mirror_small": (resize(photo[:, ::-1], (70, 96), anti_aliasing=True) * 255).astype(np.uint8),
              "coffee": (resize(skdata.coffee(), (84, 112), anti_aliasing=True) * 255).astype(np.uint8)}
    net = daisy()
    items = []
    for image_id, image in images.items():
        feats, t = extract(net, image)
        items.append((image_id, feats, t, extract(net, image[:, ::-1].copy())[0]))
    write_store(root / "photos.zarr", {**attrs(True, net.feat_dim, 112, net.patch_size), "dataset": "photos"}, items)
    table = pd.DataFrame([{"image_id": k, "path": f"{k}.png", "width": v.shape[1], "height": v.shape[0],
                           "category": "c", "mask": encode_mask(np.ones(v.shape[:2], np.uint8))}
                          for k, v in images.items()])
    return root, open_store(root / "photos.zarr"), table, images


def test_pose_alignment_picks_the_mirrored_source_for_a_mirrored_photo(photos):
    _, store, images, arrays = photos
    w = arrays["astro"].shape[1]
    t = store.transform("mirror")  # the mirror's keypoints at its cell centres: exact matches
    xy = flip_points(t.cells_to_pixels(np.array([[3.0, 2.0], [8.0, 5.0], [6.0, 9.0], [11.0, 1.0]])), w)
    pairs = pair_table([
        {"id": "to_mirror", "s": "astro", "t": "mirror", "src": xy, "trg": flip_points(xy, w)},
        {"id": "to_small_mirror", "s": "astro", "t": "mirror_small", "src": xy, "trg": flip_points(xy, w) * 96 / 112},
        {"id": "to_itself", "s": "astro", "t": "astro", "src": xy, "trg": xy},
        {"id": "mirror_to_photo", "s": "mirror", "t": "astro", "src": flip_points(xy, w), "trg": xy},
    ])
    choice = choose_pose(store, pairs, images)
    assert choice.flip.tolist() == [True, True, False, True]
    assert choice.foreground == "mask"
    assert choice.distance[0, 1] < 0.01 < choice.distance[0, 0] / 10  # mirrored maps = the target's own (float16)
    assert (choice.distance[:, 0] > choice.distance[:, 1])[[0, 1, 3]].all()
    # matched from the mirrored source, the keypoints land on their mirrored pixels exactly
    posed = posed_pairs(pairs, choice.flip, {k: v.shape[1] for k, v in arrays.items()})
    desc = store.sample("astro", keypoints(posed["source_kps"][0]), flip=True)
    cells, _ = match_keypoints(desc[None], store.features("mirror"))
    np.testing.assert_allclose(t.cells_to_pixels(cells[0].double().numpy()), flip_points(xy, w))


def test_without_masks_the_foreground_is_the_image(photos):
    _, store, images, _ = photos
    pairs = pair_table([{"id": "p", "s": "astro", "t": "mirror", "src": np.ones((1, 2)), "trg": np.ones((1, 2))}])
    assert choose_pose(store, pairs, images.drop(columns="mask")).foreground == "image"
    assert choose_pose(store, pairs, None).flip.tolist() == [True]


def test_pose_alignment_refuses_a_store_without_mirrored_maps(tmp_path):
    t = exact_transform(16, 16)
    write_store(tmp_path / "s.zarr", attrs(False, 2), [("a", np.ones((2, 2, 2), np.float32), t)])
    pairs = pair_table([{"id": "p", "s": "a", "t": "a", "src": np.ones((1, 2)), "trg": np.ones((1, 2))}])
    with pytest.raises(PoseError, match=r"extract\.flips: true"):
        choose_pose(open_store(tmp_path / "s.zarr"), pairs)


# -- the match stage --------------------------------------------------------------------------------


def test_match_stage_with_pose_alignment(photos, tmp_path):
    from semcorr.stages import match

    root, store, images, arrays = photos
    data = tmp_path / "data"
    w = arrays["astro"].shape[1]
    t = store.transform("mirror")
    xy = flip_points(t.cells_to_pixels(np.array([[3.0, 2.0], [8.0, 5.0], [6.0, 9.0]])), w)
    pairs = pair_table([{"id": "m", "s": "astro", "t": "mirror", "src": xy, "trg": flip_points(xy, w)},
                        {"id": "i", "s": "astro", "t": "astro", "src": xy, "trg": xy}])
    pairs["category"], images = "c", images.assign(path=[str(tmp_path / p) for p in images["path"]])
    for k, image in arrays.items():
        from PIL import Image

        Image.fromarray(image).save(tmp_path / f"{k}.png")
    write_tables(data / "prepared" / "photos", pairs, images)
    (data / "features" / "toy").mkdir(parents=True)
    (data / "features" / "toy" / "photos.zarr").symlink_to(root / "photos.zarr")
    conf = {"argmax": {"upsample": 1, "mutual": True, "max_window": 2, "pose_align": "flip"},
            "softargmax": {"window": 1, "temperature": 0.1, "zero_outside": False}}
    out = match.main("photos", "toy", "argmax", conf, "test", data_root=data)
    table = pd.read_parquet(out / "predictions.parquet")
    assert table.groupby("pair_id")["pose_flip"].first().to_dict() == {"m": True, "i": False}
    rows = table[table["pair_id"] == "m"]
    np.testing.assert_allclose(rows[["x", "y"]].to_numpy(), flip_points(xy, w))
    assert rows["source_flip"].all() and not table[table["pair_id"] == "i"]["source_flip"].any()
    unaligned = pd.read_parquet(out / "unaligned.parquet")  # the same pairs matched without the alignment
    same = unaligned["pair_id"] == "i"
    np.testing.assert_allclose(unaligned.loc[same, ["x", "y"]].to_numpy(), table.loc[same, ["x", "y"]].to_numpy())
    assert np.abs(unaligned.loc[~same, ["x", "y"]].to_numpy() - flip_points(xy, w)).max() > 1.0
    setting = json.loads((out / "setting.json").read_text())
    assert setting["pose"] == {"align": "flip", "foreground": "mask", "flipped_pairs": 1, "pairs": 2,
                               "counterparts": "identity (no left/right table)"}
