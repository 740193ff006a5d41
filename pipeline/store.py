"""The feature store: dense features of every image of one dataset, from one backbone
configuration, in one zarr v3 group.

Layout of ``data/features/<variant>/<dataset>.zarr``::

    feats       [N, C, G, G] float16  image n's features in feats[n, :, :h_n, :w_n], zeros elsewhere
                                      (chunks stored cell-major: transpose codec, see ``FILTERS``)
    feats_flip  [N, C, G, G] float16  the same for the horizontally mirrored image (when attrs.flips)
    transforms  [N, 8] float64        `CellTransform.to_array()` per image (h_n, w_n = its grid)
    done        [N] uint8             1 once image n's shard is on disk

One chunk holds one image, one shard file holds ``shard_images`` images, so a store is
a few files (DVC hashes each), a reader fetches one image with one ranged read, and
concurrent writers that own disjoint shards never touch the same file. ``G`` is the
largest grid; the padding of smaller grids is zeros that the Blosc-lz4 codec squeezes
away (store bytes stay below the raw fp16 bytes, see `benchmarks/extract_throughput.py`).
`FeatureStore.iter_maps` is the fast bulk reader (match stage): it reads the shard files
with plain reads following the zarr v3 sharding index and decodes in a background thread.

zarr's LocalStore writes every file through a temp file + ``os.replace``, so a killed
writer never leaves a torn shard; `FeatureStore.write_shard` also fsyncs the shard
files before it sets their ``done`` flags. A store is complete (readable by
`open_store`) only once every flag is set and the ``complete`` attr is written.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import sys
import threading
import uuid
import warnings
from importlib import metadata
from pathlib import Path
from itertools import islice
from typing import Iterable, Iterator, Sequence

import google_crc32c
import numcodecs.blosc
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, TransposeCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from semcorr.pipeline.coords import CellTransform, sample_map

FORMAT = "semcorr-features/1"
# Attrs a reader relies on; `write_store` and `create_store` refuse attrs without them.
REQUIRED_ATTRS = (
    "backbone", "family", "variant", "weights_sha256", "random_init", "layer",
    "patch_size", "input_size", "resize", "feat_dim", "dataset", "flips",
)
# Attrs the store manages itself (not part of a configuration to compare).
_INTERNAL_ATTRS = ("format", "image_ids", "shard_images", "grid_max", "dtype", "complete")
# Chunks are stored cell-major ([1, G, G, C]: each cell's channels together), so that the
# padding of a smaller grid is long runs of zeros even with bit shuffle, which lz4 needs to
# squeeze fp16 features (~0.95x raw); lz4 decodes ~3x faster than zstd (lz4hc level 1:
# the densest lz4 that still encodes at extract speed).
FILTERS = (TransposeCodec(order=(0, 2, 3, 1)),)
CODEC = BloscCodec(cname="lz4hc", clevel=1, shuffle="bitshuffle", typesize=2)
_EMPTY = 2**64 - 1  # sharding index entry of a chunk never written (reads as fill value 0)


class StoreError(RuntimeError):
    """The path is not a (complete) feature store; the message names the path."""


class StoreMismatch(StoreError):
    """The store was made with another configuration than the one expected."""


def store_path(features_dir: Path, variant: str, dataset: str) -> Path:
    """``<features_dir>/<variant>/<dataset>.zarr``."""
    return Path(features_dir) / variant / f"{dataset}.zarr"


def library_versions() -> dict[str, str]:
    import timm

    return {
        "semcorr": metadata.version("semcorr"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
    }


class FeatureStore:
    """Reader (and, for the extract stage, shard writer) of one feature store."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self._group = group
        attrs = dict(group.attrs)
        self.image_ids: list[str] = list(attrs["image_ids"])
        self.shard_images: int = int(attrs["shard_images"])
        self.attrs: dict = {k: v for k, v in attrs.items() if k != "image_ids"}
        self._index = {image_id: n for n, image_id in enumerate(self.image_ids)}
        self._feats = group["feats"]
        self._feats_flip = group["feats_flip"] if attrs["flips"] else None
        self._transforms = group["transforms"][:]  # [N, 8], small: read once

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"FeatureStore({self.path}, {len(self)} images, {self.attrs['variant']}/{self.attrs['dataset']})"

    # -- reading ----------------------------------------------------------------------
    def index(self, image_id: str) -> int:
        if image_id not in self._index:
            raise KeyError(f"{self.path}: no image {image_id!r} in this feature store")
        return self._index[image_id]

    def transform(self, image_id: str) -> CellTransform:
        return CellTransform.from_array(self._transforms[self.index(image_id)])

    def features(self, image_id: str, flip: bool = False) -> torch.Tensor:
        """``[C, h, w]`` float32 features of one image (of its mirror when ``flip``)."""
        return torch.from_numpy(self._map(self.index(image_id), flip)).float()

    def sample(self, image_id: str, xy: np.ndarray | torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Bilinear features at pixels ``xy: [N, 2]`` -> ``[N, C]``.

        ``xy`` are pixels of the image the features belong to: with ``flip``, of the
        mirrored image (pass ``coords.flip_points(xy, width)`` to sample mirrored points).
        """
        g = self.transform(image_id).pixels_to_cells(np.asarray(xy, dtype=np.float64))
        return sample_map(self._map(self.index(image_id), flip), g)

    def iter_features(self, flip: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(image_id, [C, h, w] float32)`` for every image in storage order, read ahead in bulk."""
        for n, feats in self.iter_maps(flip=flip):
            yield self.image_ids[n], torch.from_numpy(feats).float()

    def iter_maps(
        self, indices: Iterable[int] | None = None, flip: bool = False, ahead: int = 6
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(n, [C, h_n, w_n] float16)`` for images ``indices`` (default: all), in storage order.

        The fast bulk read: a background thread reads each shard file with plain reads
        (asking the kernel to prefetch the next shard) and decodes the chunks into a ring
        of ``ahead + 1`` reused buffers; Blosc releases the GIL, so decoding overlaps the
        caller's compute. Each yielded array is a view of a reused buffer: valid only until
        the next item is requested (copy it to keep it). Its memory is cell-major
        (``feats.transpose(1, 2, 0)`` is a C-ordered ``[h, w, C]`` view).
        """
        order = sorted(set(range(len(self)) if indices is None else (int(n) for n in indices)))
        if order and not 0 <= order[0] <= order[-1] < len(self):
            raise IndexError(f"{self.path}: image index out of range 0..{len(self) - 1}")
        array = self._array(flip)
        if not _fast_layout(array):  # not the layout `create_store` writes: let zarr read it
            for n in order:
                yield n, self._map(n, flip)
            return
        c, g = array.shape[1], array.shape[2]
        filled: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        for _ in range(ahead + 1):
            free.put(np.empty((g, g, c), dtype=np.float16))
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read_shards, args=(array, order, filled, free, stop), name="store-reader", daemon=True
        )
        reader.start()
        held = None
        try:
            while True:
                if held is not None:
                    free.put(held)
                item = filled.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                n, held = item
                gh, gw = self._grid(n)
                yield n, held[:gh, :gw].transpose(2, 0, 1)
        finally:
            stop.set()
            reader.join()

    def _read_shards(self, array: zarr.Array, order: list[int], filled: queue.Queue, free: queue.Queue,
                     stop: threading.Event) -> None:
        """Reader thread of `iter_maps`: puts ``(n, buffer)`` per image, then None (or the error)."""
        try:
            shards: dict[int, list[int]] = {}
            for n in order:
                shards.setdefault(n // self.shard_images, []).append(n)
            files = [self._shard_file(array, shard) for shard in shards]
            scratch = np.empty(0, dtype=np.uint8)
            for k, (shard, rows) in enumerate(shards.items()):
                if k + 1 < len(files):
                    _prefetch_file(files[k + 1])
                with _ShardFile(files[k], self.shard_images) as spans:
                    for n in rows:
                        while True:
                            if stop.is_set():
                                return
                            try:
                                buffer = free.get(timeout=0.1)
                                break
                            except queue.Empty:
                                continue
                        offset, nbytes = spans.entry(n - shard * self.shard_images)
                        if offset == _EMPTY:
                            buffer.fill(0)
                        else:
                            if scratch.size < nbytes:
                                scratch = np.empty(nbytes, dtype=np.uint8)
                            spans.read(offset, scratch[:nbytes])
                            numcodecs.blosc.decompress(scratch[:nbytes], buffer)
                        filled.put((n, buffer))
            filled.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            filled.put(exc if isinstance(exc, StoreError) else StoreError(f"{self.path}: cannot read features: {exc}"))

    def _map(self, n: int, flip: bool) -> np.ndarray:
        """``[C, h, w]`` float16 map of image ``n`` (a fresh array)."""
        gh, gw = self._grid(n)
        return self._array(flip)[n, :, :gh, :gw]

    def _shard_file(self, array: zarr.Array, shard: int) -> Path:
        return self.path / array.path / "c" / str(shard) / "0" / "0" / "0"

    def _grid(self, n: int) -> tuple[int, int]:
        return int(self._transforms[n, 4]), int(self._transforms[n, 5])

    def _array(self, flip: bool) -> zarr.Array:
        if not flip:
            return self._feats
        if self._feats_flip is None:
            raise StoreError(f"{self.path}: store has no flipped features (extracted with flips: false)")
        return self._feats_flip

    # -- writing (extract stage) ------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return math.ceil(len(self) / self.shard_images)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_images, min((shard + 1) * self.shard_images, len(self)))

    def done(self) -> np.ndarray:
        """``[N]`` bool: which images are on disk (re-read from disk on every call)."""
        return self._group["done"][:].astype(bool)

    def write_shard(self, shard: int, feats: Sequence[np.ndarray], feats_flip: Sequence[np.ndarray] | None = None) -> None:
        """Write every image of one shard (``feats[k]: [C, h, w]``, image ``shard_range(shard)[k]``),
        make the shard files durable, then set their ``done`` flags."""
        rows = self.shard_range(shard)
        if len(feats) != len(rows):
            raise ValueError(f"{self.path}: shard {shard} holds {len(rows)} images, got {len(feats)}")
        self._feats[rows.start : rows.stop] = self._padded(rows, feats)
        if self._feats_flip is not None:
            if feats_flip is None:
                raise ValueError(f"{self.path}: store keeps flipped features; shard {shard} came without them")
            self._feats_flip[rows.start : rows.stop] = self._padded(rows, feats_flip)
        for name in ("feats", "feats_flip"):
            _fsync(self.path / name / "c" / str(shard) / "0" / "0" / "0")
        self._group["done"][rows.start : rows.stop] = 1

    def finalize(self) -> bool:
        """Mark the store complete if every image is done; returns whether it is complete.
        Safe to call from several writers: whoever sees all flags set marks it."""
        if not self.done().all():
            return False
        for partial in self.path.rglob("*.partial"):  # left by writers killed mid-file
            partial.unlink(missing_ok=True)
        self._group.attrs["complete"] = True
        _consolidate(self.path)
        self.attrs["complete"] = True
        return True

    def _padded(self, rows: range, feats: Sequence[np.ndarray]) -> np.ndarray:
        """``[len(rows), C, G, G]`` float16, each image's map at the top-left of zeros."""
        out = np.zeros((len(rows), *self._feats.shape[1:]), dtype=np.float16)
        for k, (n, f) in enumerate(zip(rows, feats)):
            gh, gw = self._grid(n)
            if tuple(f.shape) != (out.shape[1], gh, gw) or gh > out.shape[2] or gw > out.shape[3]:
                raise ValueError(
                    f"{self.path}: image {self.image_ids[n]!r} has features {tuple(f.shape)}, "
                    f"expected {(out.shape[1], gh, gw)} (feat_dim, grid of its transform; grid at most {out.shape[2]})"
                )
            out[k, :, :gh, :gw] = f
        return out


def open_store(path: Path, expect: dict | None = None, complete: bool = True) -> FeatureStore:
    """Open a feature store for reading.

    Raises `StoreError` if ``path`` is not a feature store (or, with ``complete``, not a
    finished one) and `StoreMismatch` naming every key whose value differs from ``expect``.
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a feature store (no zarr.json); run `semcorr extract` to make it")
    group = zarr.open_group(store=str(path), mode="r" if complete else "r+", use_consolidated=complete)
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a semcorr feature store (format {attrs.get('format')!r}, expected {FORMAT!r})")
    if complete and not attrs.get("complete"):
        done = int(np.count_nonzero(group["done"][:]))
        raise StoreError(
            f"{path}: incomplete feature store ({done} of {len(attrs['image_ids'])} images written); "
            "rerun `semcorr extract` to finish it"
        )
    check_attrs(path, attrs, expect or {})
    return FeatureStore(path, group)


def check_attrs(path: Path, found: dict, expect: dict) -> None:
    """Raise `StoreMismatch` listing each key of ``expect`` whose value ``found`` disagrees with."""
    differing = []
    for key, value in expect.items():
        want = _jsonable(value)
        if key not in found:
            differing.append(f"{key}: expected {want!r}, found nothing")
        elif found[key] != want:
            differing.append(f"{key}: expected {want!r}, found {found[key]!r}")
    if differing:
        raise StoreMismatch(f"{path}: feature store made with another configuration: " + "; ".join(differing))


def create_store(
    path: Path,
    attrs: dict,
    image_ids: Sequence[str],
    transforms: Sequence[CellTransform],
    shard_images: int = 16,
    replace_stale: bool = False,
) -> FeatureStore:
    """Create an empty store (all ``done`` flags 0), or open the existing one if it was made
    with the same attrs, images and transforms (so that resumed and parallel writers share it).

    A store with another configuration raises `StoreMismatch`, or is deleted and
    recreated with ``replace_stale``. Creation is atomic: the skeleton is built in a
    temp folder and renamed into place; a concurrent creator that loses the race opens
    the winner's store.
    """
    path = Path(path)
    _check_required(path, attrs)
    layout = dict(attrs, format=FORMAT, image_ids=list(image_ids), shard_images=int(shard_images), dtype="float16")
    layout = _jsonable(layout)
    table = np.stack([t.to_array() for t in transforms]) if transforms else np.zeros((0, 8))
    if path.exists():
        try:
            return _open_matching(path, layout, table)
        except StoreMismatch:
            if not replace_stale:
                raise
            shutil.rmtree(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        group = _create_group(tmp, layout, len(image_ids), table, shard_images)
        group.attrs["complete"] = False
        _consolidate(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another writer created it first
            if not (path / "zarr.json").is_file():
                raise
            return _open_matching(path, layout, table)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return open_store(path, complete=False)


def write_store(
    path: Path,
    attrs: dict,
    items: Iterable[tuple],
    shard_images: int = 16,
) -> Path:
    """Write a whole store at once from ``(image_id, feats [C, h, w], CellTransform)`` items
    (plus ``feats_flip [C, h, w]`` as a 4th element when ``attrs['flips']``).

    Streams shard by shard (memory: one shard); grids are at most
    ``ceil(input_size / patch_size)`` cells a side. Atomic: the store appears complete or not at all.
    """
    path = Path(path)
    _check_required(path, attrs)
    attrs = dict(attrs)
    attrs.setdefault("versions", library_versions())
    grid_max = math.ceil(attrs["input_size"] / attrs["patch_size"])
    items = iter(items)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        layout = _jsonable(dict(attrs, format=FORMAT, image_ids=[], shard_images=int(shard_images), dtype="float16"))
        group = _create_group(tmp, layout, 0, np.zeros((0, 8)), shard_images, grid_max=grid_max)
        ids: list[str] = []
        rows: list[np.ndarray] = []
        while batch := list(islice(items, shard_images)):
            start = len(ids)
            for item in batch:
                ids.append(str(item[0]))
                rows.append(item[2].to_array())
            n = len(ids)
            for name in ("feats", "feats_flip", "done", "transforms"):
                if name in group:
                    group[name].resize((n, *group[name].shape[1:]))
            group["transforms"][start:n] = np.stack(rows[start:n])
            group.attrs["image_ids"] = ids
            store = FeatureStore(tmp, group)
            flips = [_numpy(item[3]) for item in batch] if attrs["flips"] else None
            store.write_shard(start // shard_images, [_numpy(item[1]) for item in batch], flips)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: duplicate image ids in the items")
        FeatureStore(tmp, group).finalize()
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _fast_layout(array: zarr.Array) -> bool:
    """Whether `_ShardFile` can read ``array`` directly: the layout `create_store` writes
    (one cell-major (``FILTERS``) Blosc chunk per image, index at the end with crc32c).
    Anything else is read through zarr."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or sys.byteorder != "little":
        return False
    sharding = codecs[0]
    inner = list(sharding.codecs)
    return (
        len(inner) == 3
        and isinstance(inner[0], TransposeCodec) and tuple(inner[0].order) == (0, 2, 3, 1)
        and isinstance(inner[1], BytesCodec) and isinstance(inner[2], BloscCodec)
        and sharding.index_location == ShardingCodecIndexLocation.end
        and tuple(sharding.chunk_shape) == (1, *array.shape[1:])
        and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
        and array.dtype == np.float16
    )


class _ShardFile:
    """One shard file of the zarr v3 sharding layout: chunks, then the index
    ``[chunks, 2] uint64 (offset, nbytes)`` and its crc32c. A missing file reads as empty."""

    def __init__(self, path: Path, chunks: int):
        self.path, self.chunks, self.fd = path, chunks, None

    def __enter__(self) -> "_ShardFile":
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self.index = np.full((self.chunks, 2), _EMPTY, dtype=np.uint64)
            return self
        size = os.fstat(self.fd).st_size
        tail = np.empty(self.chunks * 16 + 4, dtype=np.uint8)
        if size < tail.size:
            raise StoreError(f"{self.path}: shard file too short for its index ({size} bytes)")
        self.read(size - tail.size, tail)
        if google_crc32c.value(tail[:-4].tobytes()) != int(tail[-4:].view("<u4")[0]):
            raise StoreError(f"{self.path}: shard index checksum mismatch (corrupt shard file)")
        self.index = tail[:-4].view("<u8").reshape(self.chunks, 2)
        used = self.index[:, 0] != _EMPTY
        if (self.index[used, 0] + self.index[used, 1] > size - tail.size).any():
            raise StoreError(f"{self.path}: shard index points past the end of the file")
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def entry(self, k: int) -> tuple[int, int]:
        offset, nbytes = self.index[k]
        return int(offset), int(nbytes)

    def read(self, offset: int, out: np.ndarray) -> None:
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise StoreError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += got


def _prefetch_file(path: Path) -> None:
    """Ask the kernel to start reading ``path`` into the page cache (returns at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _create_group(
    path: Path, layout: dict, n: int, transforms: np.ndarray, shard_images: int, grid_max: int | None = None
) -> zarr.Group:
    if grid_max is None:
        grid_max = int(max(transforms[:, 4].max(), transforms[:, 5].max())) if n else 1
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    group.attrs.update(dict(layout, grid_max=grid_max))
    c = int(layout["feat_dim"])
    for name in ("feats", "feats_flip") if layout["flips"] else ("feats",):
        group.create_array(
            name, shape=(n, c, grid_max, grid_max), dtype="float16", chunks=(1, c, grid_max, grid_max),
            shards=(shard_images, c, grid_max, grid_max), filters=FILTERS, compressors=CODEC, fill_value=0,
        )
    # One chunk per store shard: each writer only ever touches the flags of its own shards.
    group.create_array("done", shape=(n,), dtype="uint8", chunks=(shard_images,), fill_value=0)
    group.create_array("transforms", shape=(n, 8), dtype="float64", chunks=(max(n, 1024), 8), fill_value=0)
    if n:
        group["transforms"][:] = transforms
    return group


def _open_matching(path: Path, layout: dict, transforms: np.ndarray) -> FeatureStore:
    """Open an existing (possibly incomplete) store if it holds the same configuration."""
    store = open_store(path, complete=False)
    found = dict(store.attrs, image_ids=store.image_ids)
    check_attrs(path, found, {k: v for k, v in layout.items() if k != "versions"})
    if not np.array_equal(store._transforms, transforms):
        raise StoreMismatch(f"{path}: feature store made with other per-image transforms (image sizes differ)")
    return store


def _check_required(path: Path, attrs: dict) -> None:
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise ValueError(f"{path}: feature store attrs lack {missing}")
    reserved = [key for key in _INTERNAL_ATTRS if key in attrs]
    if reserved:
        raise ValueError(f"{path}: attrs {reserved} are managed by the store")


def _consolidate(path: Path) -> None:
    """One metadata read for readers. zarr warns that consolidated metadata is not in the v3
    spec yet; semcorr reads its stores only with zarr-python, which supports it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(path)


def _fsync(path: Path) -> None:
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _numpy(feats) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        return feats.detach().cpu().float().numpy()
    return np.asarray(feats)


def _jsonable(value):
    """The value as it reads back from zarr attrs (tuples -> lists, numpy -> python)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else v.tolist()))
