"""The feature store on real zarr stores: roundtrip, sampling through the stored
transform, attrs checks, incomplete stores, shard-wise creation, and damaged data
(missing shard files, empty index entries, flipped bytes) that every read path refuses."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import semcorr.pipeline.store as store_module
from semcorr.pipeline.coords import CellTransform, flip_points
from semcorr.pipeline.store import (CODECS, DEFAULT_CODEC, FeatureStore, StoreError, StoreMismatch, create_store,
                                    open_store, replace_store, store_path, verify_store, write_store)

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


def test_store_is_a_few_files_and_padding_costs_nothing(tmp_path):
    rng = np.random.default_rng(1)
    items = []
    for k in range(12):  # grids 8 x 6 padded into 8 x 8: a quarter of each chunk is padding
        t = transform_for((300, 400), "pad")
        items.append((f"i{k}", rng.standard_normal((C * 16, t.grid_h, t.grid_w)).astype(np.float32), t))
    path = write_store(tmp_path / "s.zarr", make_attrs(feat_dim=C * 16), items, shard_images=4)
    files = [f for f in path.rglob("*") if f.is_file()]
    raw = sum(f.nbytes // 2 for _, f, _ in items)
    feature_bytes = sum(f.stat().st_size for f in (path / "feats").rglob("*") if f.is_file())
    # random fp16 does not compress: what is stored is the maps, their checksums and headers, not the padding
    assert feature_bytes <= 1.03 * raw
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


@pytest.mark.parametrize("codec", list(CODECS))
def test_iter_maps_reads_what_features_reads(tmp_path, codec):
    items = make_items("pad", flips=True)
    path = write_store(tmp_path / "s.zarr", make_attrs(flips=True), items, shard_images=2, codec=codec)
    store = open_store(path)
    assert store.codec == codec == store.attrs["codec"]
    for flip in (False, True):
        got = [(n, feats.copy()) for n, feats in store.iter_maps([4, 0, 3, 0], flip=flip, ahead=1)]
        assert [n for n, _ in got] == [0, 3, 4]
        for n, feats in got:
            assert feats.dtype == np.float16
            written = items[n][3 if flip else 1]
            torch.testing.assert_close(torch.from_numpy(feats).float(), written.half().float(), rtol=0, atol=0)
            torch.testing.assert_close(torch.from_numpy(feats).float(), store.features(store.image_ids[n], flip),
                                       rtol=0, atol=0)
    # abandoning the iterator stops its reader thread
    maps = store.iter_maps(ahead=1)
    next(maps)
    maps.close()
    assert not [t for t in threading.enumerate() if t.name == "store-reader"]
    with pytest.raises(IndexError, match="out of range"):
        list(store.iter_maps([5]))


def test_an_all_zero_map_is_stored(tmp_path):
    """zarr skips chunks equal to the fill value unless told otherwise; an image whose
    features are all zeros must still have its chunk (else it would read as missing)."""
    items = make_items("pad")
    items[3] = (items[3][0], torch.zeros_like(items[3][1]), items[3][2])
    store = open_store(write_store(tmp_path / "s.zarr", make_attrs(), items, shard_images=2))
    assert store.features("img3").abs().sum() == 0
    assert verify_store(store.path).ok


# -- damaged stores: every read path raises, naming the store, the shard file and the image --


def shard_file(path: Path, shard: int, name: str = "feats") -> Path:
    return path / name / "c" / str(shard) / "0" / "0" / "0"


def replace_bytes(file: Path, data: bytes) -> None:
    """Write a damaged copy the way a store file is always written: a new file renamed over."""
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def read_paths(store: FeatureStore, image_id: str, flip: bool = False) -> dict:
    """Every way to read one image's features: name -> callable."""
    n = store.index(image_id)
    centre = np.array([[store.transform(image_id).image_w / 2, store.transform(image_id).image_h / 2]])
    return {
        "features": lambda: store.features(image_id, flip),
        "sample": lambda: store.sample(image_id, centre, flip),
        "iter_maps": lambda: [m.copy() for _, m in store.iter_maps([n], flip=flip)],
        "iter_features": lambda: list(store.iter_features(flip=flip)),
    }


def assert_refused(store: FeatureStore, image_id: str, file: Path, what: str, flip: bool = False) -> None:
    for name, read in read_paths(store, image_id, flip).items():
        with pytest.raises(StoreError, match=what) as err:
            read()
        message = str(err.value)
        assert str(store.path) in message and str(file) in message and repr(image_id) in message, (name, message)
        assert "semcorr verify" in message and "semcorr extract --dataset toy --backbone tiny" in message


@pytest.mark.parametrize("flip", [False, True])
def test_missing_shard_file_is_an_error(tmp_path, flip):
    path = write_store(tmp_path / "s.zarr", make_attrs(flips=True), make_items("pad", flips=True), shard_images=2)
    store = open_store(path)
    missing = shard_file(path, 1, "feats_flip" if flip else "feats")
    missing.unlink()
    for image_id in ("img2", "img3"):  # both images of the shard, by every read path
        assert_refused(store, image_id, missing, "shard file is missing", flip)
    assert [n for n, _ in store.iter_maps([0, 1, 4], flip=flip)] == [0, 1, 4]  # the other shards still read
    with pytest.raises(StoreError, match="shard file is missing") as err:  # a stat at open finds it
        open_store(path)
    assert str(missing) in str(err.value) and "'img2', 'img3'" in str(err.value)
    report = verify_store(path)
    assert not report.ok and report.bad_shards == [1] and report.bad_images == ["img2", "img3"]


def index_of(data: bytes, chunks: int) -> np.ndarray:
    return np.frombuffer(data[-(16 * chunks + 4) : -4], dtype="<u8").reshape(chunks, 2).copy()


def test_empty_index_entry_is_an_error(tmp_path):
    import google_crc32c

    path = write_store(tmp_path / "s.zarr", make_attrs(), make_items("pad"), shard_images=2)
    store = open_store(path)
    file = shard_file(path, 1)
    data = file.read_bytes()
    index = index_of(data, 2)
    index[1] = 2**64 - 1  # img3 never written, with a valid index checksum
    tail = index.tobytes()
    replace_bytes(file, data[: -(len(tail) + 4)] + tail + np.uint32(google_crc32c.value(tail)).tobytes())
    assert_refused(store, "img3", file, "no chunk in the shard index")
    torch.testing.assert_close(store.features("img2"), make_items("pad")[2][1].half().float(), rtol=0, atol=0)
    report = verify_store(path)
    assert report.bad_images == ["img3"] and report.bad_shards == [1]


@pytest.mark.parametrize("codec", [DEFAULT_CODEC, "none"])
def test_every_flipped_byte_is_detected(tmp_path, codec):
    """A single changed byte anywhere in a shard file (chunk data, chunk checksum, index,
    index checksum) is an error on every read path, never silently different features."""
    items = make_items("pad")
    path = write_store(tmp_path / "s.zarr", make_attrs(), items, shard_images=2, codec=codec)
    store = open_store(path)
    file = shard_file(path, 1)
    original = file.read_bytes()
    index = index_of(original, 2)
    owner = {}  # byte offset -> image id whose chunk holds it
    for k, (offset, nbytes) in enumerate(index):
        owner.update({int(b): f"img{2 + k}" for b in range(offset, offset + nbytes)})
    positions = sorted(set(np.linspace(0, len(original) - 1, 43).astype(int)) | {len(original) - 1, len(original) - 5})
    for position in positions:
        damaged = bytearray(original)
        damaged[position] ^= 0x5A
        replace_bytes(file, bytes(damaged))
        images = [owner[position]] if position in owner else ["img2", "img3"]  # index bytes: both
        for image_id in images:
            assert_refused(store, image_id, file, "checksum mismatch")
        report = verify_store(path)
        assert report.bad_shards == [1] and report.bad_images == images, position
    replace_bytes(file, original)
    assert verify_store(path).ok
    torch.testing.assert_close(store.features("img3"), items[3][1].half().float(), rtol=0, atol=0)


def test_damaged_small_arrays_and_metadata(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_attrs(), make_items("pad"), shard_images=2)
    transforms = path / "transforms" / "c" / "0" / "0"
    original = transforms.read_bytes()
    transforms.unlink()  # zarr would read zeros: every image a 0 x 0 grid
    with pytest.raises(StoreError, match="transforms chunk file is missing"):
        open_store(path)
    replace_bytes(transforms, original[:9] + bytes([original[9] ^ 1]) + original[10:])
    with pytest.raises(StoreError, match="corrupt transforms"):
        open_store(path)
    replace_bytes(transforms, original)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"zarr.json: unreadable store metadata.*semcorr extract --dataset s "):
        open_store(path)
    assert verify_store(path).rebuild


def test_replace_store_swaps_in_one_step(tmp_path, monkeypatch):
    """`write_store` over an existing store: the new one replaces it whole; the fallback for
    filesystems without RENAME_EXCHANGE (simulated) gives the same result."""
    items = make_items("pad")
    path = write_store(tmp_path / "s.zarr", make_attrs(), items)
    write_store(path, make_attrs(layer=3), items[:2])
    assert open_store(path, expect={"layer": 3}).image_ids == ["img0", "img1"]
    monkeypatch.setattr(store_module, "_exchange", lambda a, b: False)
    other = write_store(tmp_path / "other.zarr", make_attrs(layer=4), items[:3])
    replace_store(other, path)
    assert open_store(path, expect={"layer": 4}).image_ids == ["img0", "img1", "img2"]
    assert not other.exists() and not other.with_name("other.zarr.old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
