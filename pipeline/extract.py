"""Dense features of every image of a dataset, into a feature store (`pipeline.store`).

One forward per unique image of the images table. DataLoader workers decode (PIL) and
resize (`backbone.preprocess`); the main thread runs the model under
``torch.inference_mode`` (bf16 autocast on GPU); a writer thread turns finished shards
into zarr shard files while the next batches compute, through a bounded queue, so
memory stays a few shards whatever the dataset size.

The store is built in a private partial folder, ``<work_root>/partial/<variant>/<dataset>.zarr``,
and renamed onto ``out`` only once complete and verified: ``out`` stays as it was (old and
readable) until then, and nothing ever opens one of its files for writing (they may be
read-only hard links into DVC's cache). Work is split by store shard. A run trusts a
shard only if it verifies (file present, index and every chunk checksum): one in the
partial store (resume after a kill), or one of a complete ``out`` with the same
configuration (hard-linked into the partial store, so a repair re-extracts only the bad
shards); any other shard is extracted, whatever its ``done`` flags say. With
``part=(i, n)`` a run handles only shards ``s % n == i``: several processes fill one
partial store, and whoever finishes last promotes it. A lock under
``<work_root>/locks`` lets writers of one configuration share a store and refuses others.
Batches never cross shard boundaries, so an image is computed in the same batch whatever
was skipped: resumed and split runs give bitwise the same store as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from semcorr.pipeline.backbones.base import Backbone
from semcorr.pipeline.io import WORK_DIR
from semcorr.pipeline.store import (DEFAULT_CODEC, FeatureStore, StoreError, create_store, library_versions,
                                    open_matching, replace_store, store_layout)

default_conf = {
    "batch_size": 8,  # images per forward (a batch never spans two store shards)
    "num_workers": 2,  # DataLoader processes that decode and resize; 0 = in the main process
    "device": "auto",  # auto = cuda when available, else cpu
    "flips": False,  # also store the features of each horizontally mirrored image
    "shard_images": 16,  # images per zarr shard file: the unit of resume and of parallel parts
}


class ExtractError(RuntimeError):
    """Bad input to extraction; the message names the image file (or the store and what blocks it)."""


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    images: int  # images in the store
    skipped: int  # images of this part found intact on disk (partial store or the old store)
    extracted: int  # images forwarded by this run
    seconds: float
    complete: bool  # every image of the store is done (by this or other parts) and ``path`` holds it


def store_attrs(backbone: Backbone, key: str, variant: str, dataset: str, weights_sha256: str | None,
                flips: bool, tuned: int | None = None) -> dict:
    """The attrs of a store: everything a reader needs to trust and use the features."""
    spec = backbone.spec
    return {
        "backbone": key,  # params key, e.g. dinov2_vitb14
        "variant": variant,  # key, or <key>_ft<N> for tuned weights
        "tuned_depth": tuned,
        "family": spec.family,
        "model": spec.variant,  # family-specific model name, e.g. vitb14
        "arch": spec.arch,
        "weights_sha256": weights_sha256,
        "random_init": bool(spec.random_init),
        "layer": spec.layer,
        "patch_size": int(backbone.patch_size),
        "input_size": int(spec.input_size),
        "resize": spec.resize,
        "feat_dim": int(backbone.feat_dim),
        "dataset": dataset,
        "flips": bool(flips),
        "versions": library_versions(),
    }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def partial_path(work_root: Path, out: Path) -> Path:
    """Where the store for ``out = .../<variant>/<dataset>.zarr`` is built: ``<work_root>/partial/<variant>/<dataset>.zarr``."""
    return Path(work_root) / "partial" / Path(out).parent.name / Path(out).name


def extract_features(
    backbone: Backbone,
    images: pd.DataFrame,
    out: Path,
    attrs: dict,
    conf: dict | None = None,
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
    work_root: Path | None = None,
) -> ExtractResult:
    """Make ``out`` the store of the features of every row of ``images`` (columns image_id,
    path, width, height), extracting the shards of ``part = (i, n)``.

    ``attrs`` from `store_attrs`. ``work_root`` holds the partial store and the locks
    (default: ``out.parent.parent.parent / ".semcorr"``, i.e. ``data/.semcorr`` for
    ``data/features/<variant>/<dataset>.zarr``); it must be on the filesystem of ``out``.
    Raises `ExtractError` while another extract writes the store with another configuration.
    """
    conf = {**default_conf, **(conf or {})}
    index, n_parts = part
    if not 0 <= index < n_parts:
        raise ValueError(f"part {index}/{n_parts}: expected 0 <= i < n")
    start = time.perf_counter()
    out = Path(out)
    ids = images["image_id"].tolist()
    layout = store_layout(out, attrs, ids, conf["shard_images"], DEFAULT_CODEC)
    if int(attrs["input_size"]) <= 0:
        raise ValueError(f"{out}: input_size {attrs['input_size']!r}: expected a positive number of pixels")
    work_root = Path(work_root) if work_root is not None else out.parent.parent.parent / WORK_DIR
    transforms = [backbone.transform((int(h), int(w))) for h, w in zip(images["height"], images["width"])]
    config = _Config(attrs, layout, transforms)
    console = Console(stderr=True, quiet=not progress)
    with _WriteLock(work_root, out, config.fingerprint()) as lock:
        with lock.gate():
            plan = _plan(out, partial_path(work_root, out), config, part, lock.alone, console)
        if plan.store is None:
            return ExtractResult(out, len(ids), plan.skipped, 0, time.perf_counter() - start, True)
        extracted = _run(backbone, images["path"].tolist(), plan.store, plan.todo, conf, console)
        with lock.gate():
            complete = _promote(plan.store, out, config)
    return ExtractResult(out, len(ids), plan.skipped, extracted, time.perf_counter() - start, complete)


@dataclass(frozen=True)
class _Config:
    """What a store is made from: ``attrs`` (`store_attrs`), their `store_layout`, and the per-image transforms."""

    attrs: dict
    layout: dict
    transforms: list

    @property
    def table(self) -> np.ndarray:
        """``[N, 8]`` float64 transforms."""
        return np.stack([t.to_array() for t in self.transforms]) if self.transforms else np.zeros((0, 8))

    def fingerprint(self) -> str:
        """sha256 of the configuration (layout but versions, transforms)."""
        config = json.dumps({k: v for k, v in self.layout.items() if k != "versions"}, sort_keys=True)
        return hashlib.sha256(config.encode() + np.ascontiguousarray(self.table, dtype="<f8").tobytes()).hexdigest()


@dataclass(frozen=True)
class _Plan:
    store: FeatureStore | None  # the partial store to fill; None: ``out`` is complete and intact
    todo: list[int]  # shards of this part to extract
    skipped: int  # images of this part found intact


def _plan(out: Path, partial: Path, config: _Config, part: tuple[int, int], alone: bool, console: Console) -> _Plan:
    """Under the gate lock: decide which shards of this part to extract, keeping every shard
    that verifies, in the partial store or else in ``out`` (hard-linked into the partial store)."""
    if alone:  # leftovers: of a kill during a promotion (see `replace_store`), of another configuration
        shutil.rmtree(partial.with_name(partial.name + ".old"), ignore_errors=True)
        if partial.exists() and _reusable(partial, config) is None:
            shutil.rmtree(partial)
    source = _reusable(out, config)
    index, n_parts = part
    if source is not None and not (partial / "zarr.json").is_file():
        if source.attrs.get("complete") and not any(source.check_shard(s) for s in range(source.n_shards)):
            mine = sum(len(source.shard_range(s)) for s in range(source.n_shards) if s % n_parts == index)
            return _Plan(None, [], mine)
    layout = config.layout
    store = create_store(partial, config.attrs, layout["image_ids"], config.transforms, layout["shard_images"],
                         replace_stale=True, codec=layout["codec"])
    done = store.done()
    todo, skipped, adopted = [], 0, 0
    for shard in range(store.n_shards):
        rows = store.shard_range(shard)
        mine, flagged = shard % n_parts == index, bool(done[rows.start : rows.stop].all())
        if mine and not store.check_shard(shard):
            if not flagged:  # written, then killed before its flags
                store.mark_done(shard)
        elif (mine or not flagged) and source is not None and not source.check_shard(shard):
            store.adopt_shard(source, shard)
            adopted += len(rows) if mine else 0
        elif mine:
            store.discard_shard(shard)
            todo.append(shard)
            continue
        skipped += len(rows) if mine else 0
    if skipped:
        console.print(f"{out}: skipping {skipped} images already extracted "
                      f"({adopted} of them kept from the existing store)")
    return _Plan(store, todo, skipped)


def _reusable(path: Path, config: _Config) -> FeatureStore | None:
    """The store at ``path`` opened read-only, if it is one of this configuration."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        return open_matching(path, config.layout, config.table, writable=False)
    except StoreError:
        return None


def _promote(store: FeatureStore, out: Path, config: _Config) -> bool:
    """Under the gate lock: if every shard is done, verify, finalize and rename the partial
    store onto ``out``; returns whether ``out`` now holds the complete store."""
    if not (store.path / "zarr.json").is_file():  # another part promoted it
        source = _reusable(out, config)
        return source is not None and bool(source.attrs.get("complete"))
    if not store.finalize():
        return False
    replace_store(store.path, out)
    return True


# Lock fds open in this process. A forked child (a DataLoader worker) would keep an flock
# alive after its parent is killed, so children close them at once.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _open_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _HELD_LOCKS.add(fd)
    return fd


def _close_lock(fd: int) -> None:
    _HELD_LOCKS.discard(fd)
    os.close(fd)


class _WriteLock:
    """Who may write the store at ``out``: writers of one configuration share it, others are refused.

    Two flock(2) files under ``<work_root>/locks/<variant>/``: the gate, held exclusively and
    briefly (joining, planning and promotion happen under it, so exactly one writer
    promotes), and the writers file, held shared by every writer for its whole run and
    holding their configuration's fingerprint. The kernel releases both when a writer dies.
    """

    def __init__(self, work_root: Path, out: Path, fingerprint: str):
        folder = Path(work_root) / "locks" / out.parent.name
        self.out, self.fingerprint = out, fingerprint
        self.gate_path, self.writers_path = folder / f"{out.name}.gate", folder / f"{out.name}.writers"
        self.fd: int | None = None
        self.alone = False  # no other writer held the store when this one joined

    def __enter__(self) -> "_WriteLock":
        self.gate_path.parent.mkdir(parents=True, exist_ok=True)
        out_dir = next(p for p in self.out.parents if p.exists())
        if os.stat(out_dir).st_dev != os.stat(self.gate_path.parent).st_dev:
            raise ExtractError(f"{self.gate_path.parent.parent.parent} and {self.out} are on different filesystems: "
                               "the finished store is moved into place with a rename; put the work folder next to the data")
        with self.gate():
            fd = _open_lock(self.writers_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.alone = True
                os.ftruncate(fd, 0)
                os.pwrite(fd, self.fingerprint.encode(), 0)
            except BlockingIOError:
                theirs = os.pread(fd, 128, 0).decode(errors="replace")
                if theirs != self.fingerprint:
                    _close_lock(fd)
                    raise ExtractError(
                        f"{self.out}: another extract is writing this store with another configuration "
                        f"(lock {self.writers_path}); wait for it to finish or stop it, then run this one again"
                    ) from None
            fcntl.flock(fd, fcntl.LOCK_SH)  # under the gate: no other writer can slip in between
            self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _close_lock(self.fd)
            self.fd = None

    @contextlib.contextmanager
    def gate(self) -> Iterator[None]:
        fd = _open_lock(self.gate_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            _close_lock(fd)


def _run(backbone: Backbone, paths: list[str], store: FeatureStore, shards: list[int], conf: dict,
         console: Console) -> int:
    batches = [list(rows[k : k + conf["batch_size"]]) for rows in map(store.shard_range, shards)
               for k in range(0, len(rows), conf["batch_size"])]
    total = sum(map(len, batches))
    if not total:
        return 0
    device = resolve_device(conf["device"])
    loader = DataLoader(
        _Images(paths, backbone, conf["flips"]), batch_sampler=batches, num_workers=conf["num_workers"],
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    batches_iter = iter(loader)  # workers fork here, before the model moves to the device
    backbone = backbone.to(device).eval()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    writer = _ShardWriter(store)
    writer.start()
    columns = (TextColumn("extract"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, disable=console.quiet) as bar:
            task = bar.add_task("extract", total=total)
            for rows, x, x_flip, t in batches_iter:
                _check_transforms(store, paths, rows, t)
                with torch.inference_mode(), autocast:
                    x = x.to(device, non_blocking=True)
                    if conf["flips"]:
                        x = torch.cat([x, x_flip.to(device, non_blocking=True)])
                    feats = backbone(x).to(torch.float16).cpu().numpy()
                writer.put(rows.tolist(), feats[: len(rows)], feats[len(rows) :] if conf["flips"] else None)
                bar.advance(task, len(rows))
    finally:
        writer.close()
    return total


def _check_transforms(store: FeatureStore, paths: list[str], rows: torch.Tensor, t: torch.Tensor) -> None:
    """The decoded image must be the size the images table says (the store's transforms come from it)."""
    for n, got in zip(rows.tolist(), t.numpy()):
        expected = store.transform(store.image_ids[n])
        if not np.array_equal(got, expected.to_array()):
            h, w = int(got[6]), int(got[7])
            raise ExtractError(
                f"{paths[n]}: image is {w}x{h} px but the images table says "
                f"{expected.image_w}x{expected.image_h}; re-run `semcorr prepare`"
            )


class _Images(Dataset):
    """Image ``n`` -> (n, ``[3, S, S]`` input, mirrored input or empty, ``[8]`` transform)."""

    def __init__(self, paths: list[str], backbone: Backbone, flips: bool):
        self.paths, self.backbone, self.flips = paths, backbone, flips

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, n: int):
        try:
            with Image.open(self.paths[n]) as image:
                rgb = np.array(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ExtractError(f"{self.paths[n]}: cannot read image ({exc})") from None
        x, transform = self.backbone.preprocess(rgb)
        x_flip = self.backbone.preprocess(rgb[:, ::-1])[0] if self.flips else torch.empty(0)
        return n, x, x_flip, torch.from_numpy(transform.to_array())


class _ShardWriter(threading.Thread):
    """Collects per-image features until a shard is whole, then writes it. The queue is
    bounded, so compute waits when the disk falls behind instead of piling up memory."""

    def __init__(self, store: FeatureStore, max_batches: int = 4):
        super().__init__(name="shard-writer", daemon=True)
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self.pending: dict[int, dict[int, tuple[np.ndarray, np.ndarray | None]]] = {}

    def put(self, rows: list[int], feats: np.ndarray, feats_flip: np.ndarray | None) -> None:
        """``feats: [B, C, S/p, S/p]`` for images ``rows``."""
        if self.error is not None:
            raise self.error
        self.queue.put((rows, feats, feats_flip))

    def close(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain so that `put` never blocks after a failure
            try:
                self._add(*item)
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc

    def _add(self, rows: list[int], feats: np.ndarray, feats_flip: np.ndarray | None) -> None:
        store = self.store
        for k, n in enumerate(rows):
            t = store.transform(store.image_ids[n])
            crop = (slice(None), slice(0, t.grid_h), slice(0, t.grid_w))
            shard = n // store.shard_images
            self.pending.setdefault(shard, {})[n] = (
                feats[k][crop], None if feats_flip is None else feats_flip[k][crop]
            )
            if len(self.pending[shard]) == len(store.shard_range(shard)):
                images = self.pending.pop(shard)
                order = list(store.shard_range(shard))
                flips = None if feats_flip is None else [images[i][1] for i in order]
                store.write_shard(shard, [images[i][0] for i in order], flips)


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} img/s", style="cyan")
