"""The feature store on real zarr stores: roundtrip, sampling through the stored
transform, attrs checks, incomplete stores and shard-wise creation."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from semcorr.pipeline.coords import CellTransform, flip_points
from semcorr.pipeline.store import (StoreError, StoreMismatch, create_store, open_store, store_path, write_store)

PATCH, SIZE, C = 14, 112, 6  # grid at most 8 x 8


def make_attrs(**overrides) -> dict:
    attrs = dict(backbone="tiny", family="dinov2", variant="tiny", weights_sha256="ab" * 32, random_init=True,
                 layer=None, patch_size=PATCH, input_size=SIZE, resize="pad", feat_dim=C, dataset="toy", flips=False)
    return attrs | overrides


def transform_for(image_hw: tuple[int, int], resize: str) -> CellTransform:
    """What a patch-14 backbone at 112 px reports (same rule as `Backbone.transform`)."""
    h, w = image_hw
    if resize == "squash":
        rh = rw = SIZE
    else:
        scale = SIZE / max(h, w)
        rh, rw = round(h * scale), round(w * scale)
    grid = (math.ceil(rh / PATCH), math.ceil(rw / PATCH))
    return CellTransform.from_resize(image_hw, (rh, rw), (0.0, 0.0), PATCH, grid)


IMAGE_SIZES = [(240, 320), (300, 200), (128, 128), (90, 400), (333, 500)]  # (h, w): landscape, portrait, square...


def make_items(resize: str, flips: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    items = []
    for k, hw in enumerate(IMAGE_SIZES):
        t = transform_for(hw, resize)
        feats = rng.standard_normal((C, t.grid_h, t.grid_w)).astype(np.float32)
        item = (f"img{k}", torch.from_numpy(feats), t)
        items.append(item + (torch.from_numpy(rng.standard_normal(feats.shape).astype(np.float32)),) if flips else item)
    return items


@pytest.mark.parametrize("resize", ["pad", "squash"])
def test_roundtrip_and_sampling(tmp_path, resize):
    items = make_items(resize, flips=True)
    path = write_store(tmp_path / "s.zarr", make_attrs(resize=resize, flips=True), iter(items), shard_images=2)
    store = open_store(path, expect=make_attrs(resize=resize, flips=True))
    assert store.image_ids == [item[0] for item in items]
    assert store.attrs["complete"] and store.attrs["random_init"] is True and store.attrs["dtype"] == "float16"
    assert set(store.attrs["versions"]) == {"semcorr", "torch", "timm", "zarr"}
    for image_id, feats, t, feats_flip in items:
        assert store.transform(image_id) == t
        for flip, written in ((False, feats), (True, feats_flip)):
            got = store.features(image_id, flip=flip)
            assert got.dtype == torch.float32 and got.shape == (C, t.grid_h, t.grid_w)
            torch.testing.assert_close(got, written.half().float(), rtol=0, atol=0)
            # cell centres give the cell's vector exactly
            i, j = np.meshgrid(np.arange(t.grid_h), np.arange(t.grid_w), indexing="ij")
            centres = t.cells_to_pixels(np.stack([j.ravel(), i.ravel()], axis=1).astype(np.float64))
            torch.testing.assert_close(store.sample(image_id, centres, flip=flip),
                                       got.reshape(C, -1).T, rtol=0, atol=1e-5)
        # a third of the way between two horizontal neighbours: bilinear mix
        a, b = t.cells_to_pixels(np.array([[0.0, 1.0], [1.0, 1.0]]))
        between = store.sample(image_id, (2 * a + b)[None] / 3)[0]
        got = store.features(image_id)
        torch.testing.assert_close(between, (2 * got[:, 1, 0] + got[:, 1, 1]) / 3, rtol=0, atol=1e-5)
        # mirrored points sample the mirrored map at the mirrored cell
        xy_flip = flip_points(centres[:1], t.image_w)
        assert store.sample(image_id, xy_flip, flip=True).shape == (1, C)
    # storage-order iteration reads the same maps
    for (image_id, feats), item in zip(store.iter_features(flip=True), items):
        assert image_id == item[0]
        torch.testing.assert_close(feats, item[3].half().float(), rtol=0, atol=0)


def test_store_is_a_few_files_and_no_larger_than_raw_fp16(tmp_path):
    rng = np.random.default_rng(1)
    items = []
    for k in range(12):  # grids 8 x 6 padded into 8 x 8: padding must cost nothing
        t = transform_for((300, 400), "pad")
        items.append((f"i{k}", rng.standard_normal((C * 16, t.grid_h, t.grid_w)).astype(np.float32), t))
    path = write_store(tmp_path / "s.zarr", make_attrs(feat_dim=C * 16), items, shard_images=4)
    files = [f for f in path.rglob("*") if f.is_file()]
    raw = sum(f.nbytes // 2 for _, f, _ in items)
    feature_bytes = sum(f.stat().st_size for f in (path / "feats").rglob("*") if f.is_file())
    assert feature_bytes <= raw
    assert len([f for f in files if "feats" in f.parts]) == 1 + 3  # metadata + one file per shard


def test_mismatch_names_each_key(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_attrs(), make_items("pad"))
    open_store(path, expect=make_attrs())  # the same configuration opens
    for key, value in [("backbone", "other"), ("weights_sha256", "cd" * 32), ("layer", 3),
                       ("input_size", 224), ("resize", "squash")]:
        with pytest.raises(StoreMismatch) as err:
            open_store(path, expect=make_attrs(**{key: value}))
        message = str(err.value)
        assert str(path) in message and f"{key}: expected {value!r}, found" in message
    with pytest.raises(StoreMismatch, match="input_size: .*layer: |layer: .*input_size: "):
        open_store(path, expect={"layer": 2, "input_size": 9})


def test_not_a_store_and_incomplete_store(tmp_path):
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(tmp_path / "missing.zarr")
    items = make_items("pad")
    path = store_path(tmp_path, "tiny", "toy")
    store = create_store(path, make_attrs(), [i for i, _, _ in items], [t for _, _, t in items], shard_images=2)
    assert store.n_shards == 3 and not store.done().any()
    store.write_shard(1, [f.numpy() for _, f, _ in items[2:4]])
    assert store.done().tolist() == [False, False, True, True, False]
    with pytest.raises(StoreError, match=r"incomplete feature store \(2 of 5 images"):
        open_store(path)
    assert not store.finalize()
    # a second writer with the same configuration shares the store; another configuration is refused
    again = create_store(path, make_attrs(), [i for i, _, _ in items], [t for _, _, t in items], shard_images=2)
    assert again.done().sum() == 2
    with pytest.raises(StoreMismatch, match="layer: expected 5"):
        create_store(path, make_attrs(layer=5), [i for i, _, _ in items], [t for _, _, t in items], shard_images=2)
    for shard in (0, 2):
        rows = store.shard_range(shard)
        store.write_shard(shard, [items[n][1].numpy() for n in rows])
    assert store.finalize()
    done = open_store(path, expect=make_attrs())
    torch.testing.assert_close(done.features("img4"), items[4][1].half().float(), rtol=0, atol=0)


def test_bad_features_refused(tmp_path):
    items = make_items("pad")
    wrong = [(items[0][0], items[0][1][:, :-1], items[0][2])]
    with pytest.raises(ValueError, match="img0"):
        write_store(tmp_path / "s.zarr", make_attrs(), wrong)
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(ValueError, match="lack"):
        write_store(tmp_path / "s.zarr", {"backbone": "x"}, items)


@pytest.mark.parametrize("hw", [(7, 5), (1, 4), (3, 1), (2, 2)])
def test_sample_map_equals_grid_sample(hw):
    """The 4-neighbour gather on the float16 map is `coords.sample_cells` on the float32 map."""
    from semcorr.pipeline.coords import sample_cells
    from semcorr.pipeline.coords import sample_map

    rng = np.random.default_rng(3)
    h, w = hw
    feats = rng.standard_normal((C, h, w)).astype(np.float16)
    corners = [(-0.5, -0.5), (w - 1, h - 1), (w - 0.5, h - 0.5), (0, 0), (w - 1, 0), (0, h - 1), (-3.0, 2.5), (w + 4.0, -7.0)]
    g = np.concatenate([rng.uniform([-1, -1], [w, h], (200, 2)), np.array(corners, dtype=np.float64)])
    expected = sample_cells(torch.from_numpy(feats).float()[None], torch.from_numpy(g).float()[None])[0]
    got = sample_map(feats, g)
    assert got.dtype == torch.float32 and got.shape == (len(g), C)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # cell-major memory (as `iter_maps` hands out) gives the same; non-finite points give NaN
    cell_major = np.ascontiguousarray(feats.transpose(1, 2, 0)).transpose(2, 0, 1)
    torch.testing.assert_close(sample_map(cell_major, g), got, rtol=0, atol=0)
    assert sample_map(feats, np.array([[np.nan, 1.0]])).isnan().all()


@pytest.mark.parametrize("legacy", [False, True])
def test_iter_maps_reads_what_features_reads(tmp_path, monkeypatch, legacy):
    import semcorr.pipeline.store as store_module
    from zarr.codecs import BloscCodec

    if legacy:  # another layout (channel-major zstd chunks) goes through zarr and reads the same
        monkeypatch.setattr(store_module, "FILTERS", ())
        monkeypatch.setattr(store_module, "CODEC", BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2))
    items = make_items("pad", flips=True)
    path = write_store(tmp_path / "s.zarr", make_attrs(flips=True), items, shard_images=2)
    store = open_store(path)
    for flip in (False, True):
        got = [(n, feats.copy()) for n, feats in store.iter_maps([4, 0, 3, 0], flip=flip, ahead=1)]
        assert [n for n, _ in got] == [0, 3, 4]
        for n, feats in got:
            assert feats.dtype == np.float16
            torch.testing.assert_close(torch.from_numpy(feats).float(), store.features(store.image_ids[n], flip),
                                       rtol=0, atol=0)
    # abandoning the iterator stops its reader thread
    maps = store.iter_maps(ahead=1)
    next(maps)
    maps.close()
    assert not [t for t in threading.enumerate() if t.name == "store-reader"]
    with pytest.raises(IndexError, match="out of range"):
        list(store.iter_maps([5]))


def test_iter_maps_refuses_a_corrupt_shard_index(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_attrs(), make_items("pad"), shard_images=2)
    shard = path / "feats" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = open_store(path)
    assert [n for n, _ in store.iter_maps([0, 1])] == [0, 1]  # other shards still read
    with pytest.raises(StoreError, match=f"{shard}.*checksum"):
        list(store.iter_maps([2]))
