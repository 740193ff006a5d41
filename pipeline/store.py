"""The feature store: dense features of every image of one dataset, from one backbone
configuration, in one zarr v3 group.

Layout of ``data/features/<variant>/<dataset>.zarr``::

    feats       [N, C, G, G] float16  image n's features in feats[n, :, :h_n, :w_n], zeros elsewhere
                                      (chunks stored cell-major: transpose codec, see ``CELL_MAJOR``)
    feats_flip  [N, C, G, G] float16  the same for the horizontally mirrored image (when attrs.flips)
    transforms  [N, 8] float64        `CellTransform.to_array()` per image (h_n, w_n = its grid)
    done        [N] uint8             1 once image n's shard is on disk

One chunk holds one image, one shard file holds ``shard_images`` images, so a store is
a few files (DVC hashes each), a reader fetches one image with one ranged read, and
concurrent writers that own disjoint shards never touch the same file. ``G`` is the
largest grid. Every chunk ends with its crc32c (zarr's ``Crc32cCodec``, the last codec
inside the sharding codec) and every shard index with its own, so any changed byte is
an error, never silently different features; a missing shard file or an empty index
entry of an image is an error too, never fill values. The chunk compression is
``attrs.codec`` (one of `CODECS`; `DEFAULT_CODEC` chosen by `benchmarks/store_codecs.py`).

The bulk reader (`FeatureStore.iter_maps`) is `_ShardFile`, which follows the zarr v3
sharding layout with plain reads and checks all of the above: zarr's own API reads these
stores 2-3x slower (`benchmarks/store_codecs.py`). One image (`features`, `sample`) is
read through zarr's API, as fast there, once `_ShardFile` has checked the shard file and
the image's index entry (zarr reads missing data as zeros; it checks the chunk crc32c).
Writes go through zarr: its LocalStore writes every file through a temp file + ``os.replace``, so a killed
writer never leaves a torn shard and a file is never written in place (stores may
share files by hard links). A store is complete (readable by `open_store`) once every
``done`` flag is set, every shard verified and the ``complete`` attr written (in the
same write of ``zarr.json`` as the consolidated metadata); `verify_store` checks a store
end to end.

A store path may also be a URL (``s3://bucket/prefix/<dataset>.zarr``, `pipeline.objectstore`):
the same layout and checks, through zarr's ``FsspecStore``; a shard is one object written
whole by one PUT, its ``done`` flags after it, ``complete`` last. Object storage has no
rename, so a store there is created in place (its ``zarr.json`` by an exclusive PUT:
`create_store`) and becomes readable only when the ``complete`` marker is written.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import google_crc32c
import numcodecs.blosc
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, TransposeCodec

from semcorr.pipeline.coords import CellTransform, sample_map
from semcorr.pipeline.objectstore import Blob, LocalFiles, ObjectFiles, is_url, location, store_parts

FORMAT = "semcorr-features/2"  # /2: per-chunk crc32c, codec attr; /1 stores are rebuilt
# Attrs a reader relies on; `write_store` and `create_store` refuse attrs without them.
REQUIRED_ATTRS = (
    "backbone", "family", "variant", "weights_sha256", "random_init", "layer",
    "patch_size", "input_size", "resize", "feat_dim", "dataset", "flips",
)
# Attrs the store manages itself (not part of a configuration to compare).
_INTERNAL_ATTRS = ("format", "image_ids", "shard_images", "grid_max", "dtype", "complete", "codec")
# Chunks are stored cell-major ([1, G, G, C]: each cell's channels together): the layout the
# matcher computes in, and the padding of a smaller grid becomes long runs of zeros.
CELL_MAJOR = TransposeCodec(order=(0, 2, 3, 1))
# Compression of a chunk (before its crc32c). Features are fp16 with near-random mantissas:
# lz4 squeezes the zero padding only; bit shuffle also the exponent bits (~6% of real-image
# features) but halves decode speed, below disk speed. Measured by benchmarks/store_codecs.py:
# lz4 matches as fast as any, reads faster than the disk, and keeps padding free.
CODECS: dict[str, tuple[BloscCodec, ...]] = {
    "none": (),
    "lz4": (BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle", typesize=2),),
    "lz4-bitshuffle": (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=2),),
    "lz4hc-bitshuffle": (BloscCodec(cname="lz4hc", clevel=1, shuffle="bitshuffle", typesize=2),),
}
DEFAULT_CODEC = "lz4"
_EMPTY = 2**64 - 1  # sharding index entry of a chunk never written
_WRITE = {"write_empty_chunks": True}  # an all-zero map is still an image: always store its chunk
_SKELETON_WAIT_S = 30.0  # object storage: how long a writer waits for another's store skeleton to be whole


class StoreError(RuntimeError):
    """The path is not a (complete, intact) feature store; the message names the path, and for
    damaged data ``file`` is the damaged file and ``images`` the image ids it holds."""

    def __init__(self, message: str, file: Path | str | None = None, images: Sequence[str] = (), problem: str = ""):
        super().__init__(message)
        self.file = file
        self.images = tuple(images)
        self.problem = problem or message  # the message without the repair advice


class StoreMismatch(StoreError):
    """The store was made with another configuration than the one expected."""


class ShardMissing(StoreError):
    """A shard file (object) does not exist: never written, or deleted."""


class StoreUnreachable(StoreError):
    """The store's storage cannot be reached (no endpoint, no credentials, no permission): nothing
    is known about the store itself."""


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


def extract_command(path: Path | str, attrs: dict | None = None) -> str:
    """The ``semcorr extract`` call that (re)builds the store at ``path``: from its attrs
    (dataset, backbone, tuned_depth), else from the path ``<variant>/<dataset>.zarr``;
    a store on object storage is named with ``--store URL``."""
    attrs = attrs or {}
    dataset, backbone, tuned = attrs.get("dataset"), attrs.get("backbone"), attrs.get("tuned_depth")
    if not (dataset and backbone):
        parent, name = store_parts(path)
        dataset = name.removesuffix(".zarr")
        found = re.fullmatch(r"(.+)_(ft|lora)(\d+)", parent)
        backbone, tuned = (found[1], found[3] if found[2] == "ft" else f"lora{found[3]}") if found else (parent, None)
    return (f"semcorr extract --dataset {dataset} --backbone {backbone}" + (f" --tuned {tuned}" if tuned else "")
            + (f" --store {path}" if is_url(path) else ""))


class FeatureStore:
    """Reader (and, for the extract stage, shard writer) of one feature store."""

    def __init__(self, path: Path | str, group: zarr.Group):
        self.files: LocalFiles | ObjectFiles = location(path)
        self.path: Path | str = self.files.root  # a Path, or the URL of a store on object storage
        self._group = group
        attrs = dict(group.attrs)
        self.image_ids: list[str] = list(attrs["image_ids"])
        self.shard_images: int = int(attrs["shard_images"])
        self.codec: str = attrs["codec"]
        self.attrs: dict = {k: v for k, v in attrs.items() if k != "image_ids"}
        self._index = {image_id: n for n, image_id in enumerate(self.image_ids)}
        self._arrays = {name: group[name].with_config(_WRITE) for name in self.array_names}
        for array in self._arrays.values():
            _check_layout(self.path, array, self.codec)
        _, c, g, _ = self._arrays["feats"].shape
        self._chunk_shape = (g, g, c)  # of a decoded chunk: cell-major
        self._transforms = _read_transforms(self.files, group)  # [N, 8], small: read once

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"FeatureStore({self.path}, {len(self)} images, {self.attrs['variant']}/{self.attrs['dataset']})"

    @property
    def array_names(self) -> tuple[str, ...]:
        return ("feats", "feats_flip") if self.attrs["flips"] else ("feats",)

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
        (asking the kernel to prefetch the next shard), checks every checksum and decodes
        the chunks into a ring of ``ahead + 1`` reused buffers; reads, crc32c and Blosc
        release the GIL, so they overlap the caller's compute. Each yielded array is a view
        of a reused buffer: valid only until the next item is requested (copy it to keep
        it). Its memory is cell-major (``feats.transpose(1, 2, 0)`` is a C-ordered ``[h, w, C]``
        view). Damaged or missing data raises `StoreError` when its image is reached.
        """
        order = sorted(set(range(len(self)) if indices is None else (int(n) for n in indices)))
        if order and not 0 <= order[0] <= order[-1] < len(self):
            raise IndexError(f"{self.path}: image index out of range 0..{len(self) - 1}")
        name = self._array_name(flip)
        filled: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        for _ in range(ahead + 1):
            free.put(np.empty(self._chunk_shape, dtype=np.float16))
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read_shards, args=(name, order, filled, free, stop), name="store-reader", daemon=True
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

    def _read_shards(self, name: str, order: list[int], filled: queue.Queue, free: queue.Queue,
                     stop: threading.Event) -> None:
        """Reader thread of `iter_maps`: puts ``(n, buffer)`` per image, then None (or the error)."""
        try:
            shards: dict[int, list[int]] = {}
            for n in order:
                shards.setdefault(n // self.shard_images, []).append(n)
            keys = [self.shard_key(name, shard) for shard in shards]
            scratch = np.empty(0, dtype=np.uint8)
            for k, (shard, rows) in enumerate(shards.items()):
                if k + 1 < len(keys):
                    self.files.prefetch(keys[k + 1])
                with _ShardFile(self, name, shard, whole=True) as shard_file:
                    for n in rows:
                        while True:
                            if stop.is_set():
                                return
                            try:
                                buffer = free.get(timeout=0.1)
                                break
                            except queue.Empty:
                                continue
                        scratch = shard_file.read(n, buffer, scratch)
                        filled.put((n, buffer))
            filled.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            filled.put(exc if isinstance(exc, StoreError) else StoreError(f"{self.path}: cannot read features: {exc}"))
        finally:
            self.files.drop_prefetched()

    def _map(self, n: int, flip: bool) -> np.ndarray:
        """``[C, h, w]`` float16 map of image ``n`` (a fresh C-ordered array), read through zarr's
        own API (as fast as `_ShardFile` for one image: `benchmarks/store_codecs.py`) after
        `_ShardFile` checked that the shard file and the image's chunk exist (zarr would
        read missing data as zeros); zarr checks the chunk's crc32c."""
        name, shard = self._array_name(flip), n // self.shard_images
        with _ShardFile(self, name, shard) as shard_file:
            shard_file.entry(n)
        gh, gw = self._grid(n)
        try:
            return self._arrays[name][n, :, :gh, :gw]
        except (ValueError, RuntimeError) as exc:
            what = "chunk checksum mismatch (corrupt data)" if "checksum" in str(exc) else f"chunk does not decode ({exc})"
            raise self.damaged(self.shard_file(name, shard), [n], what) from None

    def shard_key(self, name: str, shard: int) -> str:
        """The key (path below the store root) of shard ``shard`` of array ``name`` (feats or feats_flip)."""
        return f"{name}/c/{shard}/0/0/0"

    def shard_file(self, name: str, shard: int) -> Path | str:
        """The file (or object URL) of shard ``shard`` of array ``name``."""
        return self.files.path(self.shard_key(name, shard))

    def _grid(self, n: int) -> tuple[int, int]:
        return int(self._transforms[n, 4]), int(self._transforms[n, 5])

    def _array_name(self, flip: bool) -> str:
        if flip and not self.attrs["flips"]:
            raise StoreError(f"{self.path}: store has no flipped features (extracted with flips: false)")
        return "feats_flip" if flip else "feats"

    # -- checking ---------------------------------------------------------------------
    def check_shard(self, shard: int) -> list[StoreError]:
        """Every problem of shard ``shard`` (missing file, index or chunk checksum, empty entry),
        found by reading all of its files; an empty list when the shard is intact."""
        problems: list[StoreError] = []
        scratch = np.empty(0, dtype=np.uint8)
        for name in self.array_names:
            try:
                with _ShardFile(self, name, shard, whole=True) as shard_file:
                    for n in self.shard_range(shard):
                        try:
                            scratch = shard_file.check(n, scratch)
                        except StoreError as exc:
                            problems.append(exc)
            except StoreError as exc:
                problems.append(exc)
        return problems

    def check_files(self) -> None:
        """Raise `StoreError` naming the first shard file that is missing or too short (a stat,
        or a HEAD, each)."""
        index_bytes = 16 * self.shard_images + 4
        for shard in range(self.n_shards):
            for name in self.array_names:
                file = self.shard_file(name, shard)
                try:
                    size = self.files.size(self.shard_key(name, shard))
                except FileNotFoundError:
                    raise self.damaged(file, self.shard_range(shard), "shard file is missing", ShardMissing) from None
                if size < index_bytes:
                    raise self.damaged(file, self.shard_range(shard), f"shard file too short for its index ({size} bytes)")

    def damaged(self, file: Path | str, rows: Iterable[int], what: str,
                kind: type[StoreError] = StoreError) -> StoreError:
        """The error (a ``kind``) for damaged data of images ``rows`` in ``file``, with how to repair it."""
        ids = [self.image_ids[n] for n in rows]
        shown = ", ".join(map(repr, ids[:4])) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
        problem = f"{file}: {what} (image{'s' if len(ids) > 1 else ''} {shown} of feature store {self.path})"
        return kind(
            f"{problem}; list every damaged image with `semcorr verify {self.path}`, "
            f"re-extract them with `{extract_command(self.path, self.attrs)}`",
            file=file, images=ids, problem=problem,
        )

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
        if self.attrs["flips"] and feats_flip is None:
            raise ValueError(f"{self.path}: store keeps flipped features; shard {shard} came without them")
        for name, maps in zip(self.array_names, (feats, feats_flip)):
            self._arrays[name][rows.start : rows.stop] = self._padded(rows, maps)
            self.files.sync(self.shard_key(name, shard))
        self.mark_done(shard)

    def mark_done(self, shard: int) -> None:
        """Set the ``done`` flags of a shard whose files verified."""
        rows = self.shard_range(shard)
        self._group["done"][rows.start : rows.stop] = 1

    def adopt_shard(self, source: FeatureStore, shard: int) -> None:
        """Take shard ``shard`` from ``source`` (a local store of the same layout whose shard
        verified): hard-link its files here (copy where the filesystem refuses a link), then
        set the ``done`` flags. ``source``'s files are only ever read."""
        for name in self.array_names:
            self.files.link(source.files, self.shard_key(name, shard))
        self.mark_done(shard)

    def discard_shard(self, shard: int) -> None:
        """Clear the ``done`` flags of a shard and remove its files (it will be written again)."""
        rows = self.shard_range(shard)
        self._group["done"][rows.start : rows.stop] = 0
        for name in self.array_names:
            self.files.delete(self.shard_key(name, shard))

    def finalize(self) -> bool:
        """Mark the store complete if every image is done and every shard verifies; returns
        whether it is complete. A done shard that fails verification is discarded (so that
        a rerun writes it again) and raises `StoreError`. Call it under the writers' lock."""
        if not self.done().all():
            return False
        for shard in range(self.n_shards):
            problems = self.check_shard(shard)
            if problems:
                self.discard_shard(shard)
                raise StoreError(f"{self.path}: shard {shard} failed verification after writing "
                                 f"({problems[0].problem}); it was discarded: rerun the extract to write it again",
                                 file=problems[0].file, images=problems[0].images)
        self.files.remove_partials()  # left by writers killed mid-file
        _consolidate(self.files.zarr_store(read_only=False))
        # the marker and the consolidated metadata in one write of zarr.json: a reader sees both or neither
        consolidated = zarr.open_group(store=self.files.zarr_store(read_only=False), mode="r+", use_consolidated=True,
                                       zarr_format=3)
        consolidated.attrs["complete"] = True
        self.attrs["complete"] = True
        return True

    def mark_incomplete(self) -> None:
        """Clear the ``complete`` marker (before a shard of a finished store is written again in place)."""
        self._group.attrs["complete"] = False
        self.attrs["complete"] = False

    def _padded(self, rows: range, feats: Sequence[np.ndarray]) -> np.ndarray:
        """``[len(rows), C, G, G]`` float16, each image's map at the top-left of zeros."""
        g, _, c = self._chunk_shape
        out = np.zeros((len(rows), c, g, g), dtype=np.float16)
        for k, (n, f) in enumerate(zip(rows, feats)):
            gh, gw = self._grid(n)
            if tuple(f.shape) != (c, gh, gw) or gh > g or gw > g:
                raise ValueError(
                    f"{self.path}: image {self.image_ids[n]!r} has features {tuple(f.shape)}, "
                    f"expected {(c, gh, gw)} (feat_dim, grid of its transform; grid at most {g})"
                )
            out[k, :, :gh, :gw] = f
        return out


class _ShardFile:
    """One shard file of the zarr v3 sharding layout: chunks (each ending with its crc32c),
    then the index ``[chunks, 2] uint64 (offset, nbytes)`` and its crc32c. Opening checks
    that the file exists and the index checksum; reading an image, that the index has its
    chunk and the chunk's checksum."""

    def __init__(self, store: FeatureStore, name: str, shard: int, whole: bool = False):
        self.store, self.rows = store, store.shard_range(shard)
        self.key, self.whole = store.shard_key(name, shard), whole
        self.path = store.files.path(self.key)
        self.blob: Blob | None = None

    def __enter__(self) -> "_ShardFile":
        """Opens the file; an object on object storage is fetched whole (one GET) when ``whole``,
        else read by byte ranges."""
        try:
            self.blob = self.store.files.blob(self.key, self.whole)
        except FileNotFoundError:
            raise self.store.damaged(self.path, self.rows, "shard file is missing", ShardMissing) from None
        try:
            self._read_index()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.blob is not None:
            self.blob.close()
            self.blob = None

    def _read_index(self) -> None:
        size = self.blob.size
        tail = np.empty(self.store.shard_images * 16 + 4, dtype=np.uint8)
        if size < tail.size:
            raise self._damaged(self.rows, f"shard file too short for its index ({size} bytes)")
        self._pread(size - tail.size, tail)
        if google_crc32c.value(tail[:-4]) != int(tail[-4:].view("<u4")[0]):
            raise self._damaged(self.rows, "shard index checksum mismatch (corrupt shard file)")
        self.index = tail[:-4].view("<u8").reshape(-1, 2)[: len(self.rows)]
        self.data_bytes = size - tail.size

    def entry(self, n: int) -> tuple[int, int]:
        """``(offset, nbytes)`` of image ``n``'s chunk; `StoreError` if the index has none or a bad one."""
        offset, nbytes = (int(v) for v in self.index[n - self.rows.start])
        if offset == _EMPTY:
            raise self._damaged([n], "no chunk in the shard index (image never written)")
        exact = 2 * math.prod(self.store._chunk_shape) + 4  # an uncompressed chunk: the map and its crc32c
        if nbytes < 4 or offset + nbytes > self.data_bytes or (not CODECS[self.store.codec] and nbytes != exact):
            raise self._damaged([n], f"shard index entry out of bounds ({offset}, {nbytes})")
        return offset, nbytes

    def read(self, n: int, buffer: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Decode image ``n``'s chunk into ``buffer: [G, G, C] float16`` after checking its crc32c;
        returns ``scratch`` (grown if it was too small) for the next call."""
        if not CODECS[self.store.codec]:  # the chunk is the map: read it in place
            offset, nbytes = self.entry(n)
            crc = np.empty(4, dtype=np.uint8)
            self._pread(offset, buffer)
            self._pread(offset + nbytes - 4, crc)
            if google_crc32c.value(buffer) != int(crc.view("<u4")[0]):
                raise self._damaged([n], "chunk checksum mismatch (corrupt data)")
            return scratch
        scratch, nbytes = self._checked(n, scratch)
        try:
            numcodecs.blosc.decompress(scratch[: nbytes - 4], buffer)
        except (RuntimeError, ValueError) as exc:
            raise self._damaged([n], f"chunk does not decode ({exc})") from None
        return scratch

    def check(self, n: int, scratch: np.ndarray) -> np.ndarray:
        """Read image ``n``'s chunk and check its crc32c; returns ``scratch`` for the next call."""
        return self._checked(n, scratch)[0]

    def _checked(self, n: int, scratch: np.ndarray) -> tuple[np.ndarray, int]:
        """Image ``n``'s chunk read into ``scratch`` (grown if too small) with its crc32c checked;
        returns ``(scratch, nbytes)``."""
        offset, nbytes = self.entry(n)
        if scratch.size < nbytes:
            scratch = np.empty(nbytes, dtype=np.uint8)
        self._pread(offset, scratch[:nbytes])
        if google_crc32c.value(scratch[: nbytes - 4]) != int(scratch[nbytes - 4 : nbytes].view("<u4")[0]):
            raise self._damaged([n], "chunk checksum mismatch (corrupt data)")
        return scratch, nbytes

    def _damaged(self, rows: Iterable[int], what: str) -> StoreError:
        return self.store.damaged(self.path, rows, what)

    def _pread(self, offset: int, out: np.ndarray) -> None:
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            got = self.blob.pread(offset + done, view[done:])
            if got == 0:
                raise self._damaged(self.rows, f"unexpected end of file at byte {offset + done}")
            done += got


def open_store(path: Path | str, expect: dict | None = None, complete: bool = True) -> FeatureStore:
    """Open a feature store for reading: a folder, or a URL (``s3://bucket/prefix/x.zarr``).

    Raises `StoreError` if ``path`` is not a feature store (or, with ``complete``, not a
    finished one, or one with a missing shard file: a stat, or a HEAD, of each) and
    `StoreMismatch` naming every key whose value differs from ``expect``. Messages name the
    file that is wrong and the ``semcorr extract`` call that rebuilds the store.
    """
    path = location(path).root
    store = _open(path, consolidated=complete, writable=False)
    if complete and not store.attrs.get("complete"):
        done = int(np.count_nonzero(store.done()))
        raise StoreError(
            f"{path}: incomplete feature store ({done} of {len(store)} images written); "
            f"rerun `{extract_command(path, store.attrs)}` to finish it"
        )
    if complete:
        store.check_files()
    check_attrs(path, dict(store.attrs), expect or {})
    return store


def _open(path: Path | str, consolidated: bool, writable: bool) -> FeatureStore:
    """The store at ``path`` with its metadata checked; `StoreError` naming what is wrong."""
    files = location(path)
    path = files.root
    try:
        present = files.exists("zarr.json")
    except OSError as exc:
        raise StoreUnreachable(f"{path}: cannot reach the store ({exc})") from None
    if not present:
        raise StoreError(f"{path}: not a feature store (no zarr.json); run `{extract_command(path)}` to make it")
    try:
        group = zarr.open_group(store=files.zarr_store(read_only=not writable), mode="r+" if writable else "r",
                                use_consolidated=consolidated, zarr_format=3)
        attrs = dict(group.attrs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{files.path('zarr.json')}: unreadable store metadata ({exc}); "
                         f"rebuild the store with `{extract_command(path)}`") from None
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a semcorr feature store of this version (format {attrs.get('format')!r}, "
                         f"expected {FORMAT!r}); rebuild it with `{extract_command(path, attrs)}`")
    try:
        return FeatureStore(path, group)
    except StoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: unreadable store metadata or transforms ({type(exc).__name__}: {exc}); "
                         f"rebuild the store with `{extract_command(path, attrs)}`") from None


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


# -- verification -------------------------------------------------------------------------


@dataclass
class StoreReport:
    """What `verify_store` found. ``problems``: one line each, naming the file and what is
    wrong; ``bad_images``: the image ids to re-extract (``bad_shards``: their shards)."""

    path: Path | str
    attrs: dict = field(default_factory=dict)
    images: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)
    bad_shards: list[int] = field(default_factory=list)
    rebuild: bool = False  # the store cannot be opened at all: every image is re-extracted
    unreachable: bool = False  # its storage cannot be reached: nothing was checked

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def repair(self) -> str:
        """How to repair the store (the ``semcorr extract`` call that re-extracts what is bad)."""
        command = extract_command(self.path, self.attrs)
        if self.unreachable:
            return ("nothing was checked: make the storage reachable (for a URL: the endpoint and credentials "
                    "in the AWS environment), then verify again")
        if self.rebuild:
            return f"rebuild the whole store: `{command}`"
        if self.bad_images:
            return (f"re-extract the {len(self.bad_images)} damaged images (shards "
                    f"{', '.join(map(str, self.bad_shards))}; intact shards are kept): `{command}`")
        return f"finish the store: `{command}`"


def verify_store(path: Path | str) -> StoreReport:
    """Check a store (a folder or a URL) end to end: metadata, every shard file present, every
    index and chunk checksum, the ``done`` flags against the data, and completeness."""
    path = location(path).root
    report = StoreReport(path)
    try:
        store = _open(path, consolidated=False, writable=False)
    except StoreError as exc:
        report.problems.append(str(exc))
        report.unreachable = isinstance(exc, StoreUnreachable)
        report.rebuild = not report.unreachable
        return report
    report.attrs, report.images, report.shards = store.attrs, len(store), store.n_shards
    done = store.done()
    bad: dict[int, set[str]] = {}
    for shard in range(store.n_shards):
        rows = store.shard_range(shard)
        problems = store.check_shard(shard)
        for problem in problems:
            report.problems.append(problem.problem + (" [marked done]" if done[rows.start : rows.stop].any() else ""))
            bad.setdefault(shard, set()).update(problem.images)
        if not problems and not done[rows.start : rows.stop].all():
            report.problems.append(f"{store.files.path('done')}: shard {shard} is intact but not marked done")
    if not store.attrs.get("complete"):
        report.problems.append(f"{store.files.path('zarr.json')}: store not marked complete "
                               f"({int(done.sum())} of {len(store)} images done)")
    else:
        try:
            _open(path, consolidated=True, writable=False)
        except StoreError as exc:
            report.problems.append(f"consolidated metadata: {exc}")
            report.rebuild = True
    report.bad_shards = sorted(bad)
    report.bad_images = [store.image_ids[n] for s in report.bad_shards for n in store.shard_range(s)
                         if store.image_ids[n] in bad[s]]
    return report


# -- creating -----------------------------------------------------------------------------


def create_store(
    path: Path | str,
    attrs: dict,
    image_ids: Sequence[str],
    transforms: Sequence[CellTransform],
    shard_images: int = 16,
    replace_stale: bool = False,
    codec: str = DEFAULT_CODEC,
) -> FeatureStore:
    """Create an empty store (all ``done`` flags 0), or open the existing one if it was made
    with the same attrs, images and transforms (so that resumed and parallel writers share it).

    A store with another configuration raises `StoreMismatch`; with ``replace_stale`` it
    (or an unreadable leftover) is deleted and recreated. Creation is atomic: the skeleton
    is built in a temp folder and renamed into place (on object storage: uploaded, its
    ``zarr.json`` first, created only if absent); a concurrent creator that loses the race
    opens the winner's store.
    """
    files = location(path)
    path = files.root
    layout = store_layout(path, attrs, image_ids, shard_images, codec)
    table = _transform_table(transforms)
    if files.remote:
        return _create_object_store(files, layout, table, shard_images, replace_stale)
    if path.exists():
        try:
            return open_matching(path, layout, table)
        except StoreError:  # StoreMismatch, or not a readable store
            if not replace_stale:
                raise
            shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
            return open_matching(path, layout, table)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return _open(path, consolidated=False, writable=True)


def _create_object_store(files: ObjectFiles, layout: dict, table: np.ndarray, shard_images: int,
                         replace_stale: bool) -> FeatureStore:
    """`create_store` on object storage. ``zarr.json`` is uploaded first with ``If-None-Match: *``:
    exactly one creator wins and fixes the store's configuration; the rest of the skeleton
    follows. A writer that finds a store waits (up to `_SKELETON_WAIT_S`) for its skeleton to
    be whole, then opens it if it holds this configuration."""
    deadline = time.monotonic() + _SKELETON_WAIT_S
    while True:
        if files.exists("zarr.json"):
            try:
                return open_matching(files.root, layout, table)
            except StoreMismatch:
                if not replace_stale:
                    raise
            except StoreError:
                if time.monotonic() < deadline:  # its creator may still be uploading the skeleton
                    time.sleep(0.2)
                    continue
                if not replace_stale:
                    raise
            files.remove()
        with tempfile.TemporaryDirectory(prefix="semcorr-skeleton-") as tmp:
            group = _create_group(Path(tmp), layout, len(layout["image_ids"]), table, shard_images)
            group.attrs["complete"] = False
            _consolidate(tmp)
            if files.create_exclusive("zarr.json", (Path(tmp) / "zarr.json").read_bytes()):
                keys = sorted(f.relative_to(tmp).as_posix() for f in Path(tmp).rglob("*") if f.is_file())
                # array metadata, then the transforms chunks: a store opens once those exist
                for key in sorted(set(keys) - {"zarr.json"}, key=lambda k: (k.startswith("transforms/c/"), k)):
                    files.put(key, (Path(tmp) / key).read_bytes())
                return _open(files.root, consolidated=False, writable=True)


def store_layout(path: Path | str, attrs: dict, image_ids: Sequence[str], shard_images: int, codec: str) -> dict:
    """The attrs a store made from these arguments holds (``versions`` aside, its configuration)."""
    _check_required(path, attrs)
    if codec not in CODECS:
        raise ValueError(f"{path}: unknown chunk codec {codec!r}; one of {sorted(CODECS)}")
    layout = dict(attrs, format=FORMAT, image_ids=list(image_ids), shard_images=int(shard_images),
                  dtype="float16", codec=codec)
    return _jsonable(layout)


def open_matching(path: Path | str, layout: dict, transforms: np.ndarray, writable: bool = True) -> FeatureStore:
    """Open an existing (possibly incomplete) store if it holds the configuration ``layout``
    (`store_layout`) and per-image ``transforms: [N, 8]``; else `StoreMismatch` (or
    `StoreError` when it is not a readable store)."""
    store = _open(path, consolidated=False, writable=writable)
    found = dict(store.attrs, image_ids=store.image_ids)
    check_attrs(path, found, {k: v for k, v in layout.items() if k != "versions"})
    if not np.array_equal(store._transforms, transforms):
        raise StoreMismatch(f"{path}: feature store made with other per-image transforms (image sizes differ)")
    return store


def write_store(
    path: Path,
    attrs: dict,
    items: Iterable[tuple],
    shard_images: int = 16,
    codec: str = DEFAULT_CODEC,
) -> Path:
    """Write a whole store at once from ``(image_id, feats [C, h, w], CellTransform)`` items
    (plus ``feats_flip [C, h, w]`` as a 4th element when ``attrs['flips']``).

    Streams shard by shard (memory: one shard); grids are at most
    ``ceil(input_size / patch_size)`` cells a side. Atomic: the store appears complete
    and verified, replacing what was at ``path`` in one rename, or not at all. ``path``
    is local (stores on object storage are built by `pipeline.extract.extract_features`).
    """
    if is_url(path):
        raise ValueError(f"{path}: write_store writes local stores; a store on object storage is built "
                         "in place by extract (`semcorr extract --store URL`)")
    path = Path(path)
    attrs = dict(attrs)
    attrs.setdefault("versions", library_versions())
    layout = store_layout(path, attrs, [], shard_images, codec)
    grid_max = math.ceil(attrs["input_size"] / attrs["patch_size"])
    items = iter(items)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
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
        replace_store(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def replace_store(src: Path, dst: Path) -> None:
    """Move the store folder ``src`` to ``dst``, replacing any store there in one step
    (``renameat2(RENAME_EXCHANGE)``, then the old store, now at ``src``, is deleted).
    Where the filesystem cannot exchange, the old store is first renamed to ``src.old``:
    a kill between the two renames leaves ``dst`` absent and ``src`` complete."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.rename(src, dst)
    elif _exchange(src, dst):
        shutil.rmtree(src)
    else:
        old = src.with_name(src.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def _check_layout(path: Path | str, array: zarr.Array, codec: str) -> None:
    """The array must have the exact layout `_create_group` writes for ``codec`` (the one
    `_ShardFile` reads): one cell-major chunk per image, crc32c last, index at the end."""
    c, g = array.shape[1], array.shape[2]
    expected = ShardingCodec(chunk_shape=(1, c, g, g), codecs=[CELL_MAJOR, BytesCodec(), *CODECS[codec], Crc32cCodec()],
                             index_codecs=[BytesCodec(), Crc32cCodec()], index_location="end")
    codecs = array.metadata.codecs
    if (array.dtype != np.float16 or array.shape[2] != array.shape[3] or len(codecs) != 1
            or codecs[0].to_dict() != expected.to_dict()):
        raise StoreError(f"{path}/{array.path}/zarr.json: unexpected chunk layout for codec {codec!r}; "
                         f"rebuild the store with `{extract_command(path)}`")


def _read_transforms(files: LocalFiles | ObjectFiles, group: zarr.Group) -> np.ndarray:
    """``[N, 8]`` transforms; every chunk file must exist (zarr would read a missing one as zeros)."""
    array = group["transforms"]
    rows = array.chunks[0]
    path = files.root
    for k in range(math.ceil(array.shape[0] / rows)):
        key = f"transforms/c/{k}/0"
        if not files.exists(key):
            raise StoreError(f"{path}: transforms chunk file is missing: {files.path(key)}; "
                             f"rebuild the store with `{extract_command(path, dict(group.attrs))}`",
                             file=files.path(key))
    try:
        return array[:]
    except ValueError as exc:  # crc32c mismatch
        raise StoreError(f"{files.path('transforms')}: corrupt transforms ({exc}); "
                         f"rebuild the store with `{extract_command(path, dict(group.attrs))}`") from None


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
            shards=(shard_images, c, grid_max, grid_max), filters=(CELL_MAJOR,),
            compressors=(*CODECS[layout["codec"]], Crc32cCodec()), fill_value=0, config=_WRITE,
        )
    # One chunk per store shard: each writer only ever touches the flags of its own shards.
    group.create_array("done", shape=(n,), dtype="uint8", chunks=(shard_images,), fill_value=0,
                       compressors=Crc32cCodec())
    group.create_array("transforms", shape=(n, 8), dtype="float64", chunks=(max(n, 1024), 8), fill_value=0,
                       compressors=Crc32cCodec())
    if n:
        group["transforms"][:] = transforms
    return group


def _transform_table(transforms: Sequence[CellTransform]) -> np.ndarray:
    """``[N, 8]`` float64."""
    return np.stack([t.to_array() for t in transforms]) if transforms else np.zeros((0, 8))


def _check_required(path: Path, attrs: dict) -> None:
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise ValueError(f"{path}: feature store attrs lack {missing}")
    reserved = [key for key in _INTERNAL_ATTRS if key in attrs]
    if reserved:
        raise ValueError(f"{path}: attrs {reserved} are managed by the store")


def _consolidate(store) -> None:
    """One metadata read for readers (``store``: a folder path or a zarr store). zarr warns
    that consolidated metadata is not in the v3 spec yet; semcorr reads its stores only with
    zarr-python, which supports it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store, zarr_format=3)


def _numpy(feats) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        return feats.detach().cpu().float().numpy()
    return np.asarray(feats)


def _jsonable(value):
    """The value as it reads back from zarr attrs (tuples -> lists, numpy -> python)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else v.tolist()))
