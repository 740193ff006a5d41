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

Scale-out (`pipeline.distributed`): under torchrun, each rank is a part (rank r of K takes
part ``(i + n*r, n*K)`` of ``--shard i/n``); rank 0 prepares the store before the others plan
and finalises it after a barrier. A SLURM job array (`extract_by_tasks`) has its tasks
extract their parts without finalising, and the process that submitted them prepares and
finalises. On object storage (``out`` a URL, `pipeline.objectstore`) there is no flock and
no rename: the store is built in place, see `_ObjectSite`.
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
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from semcorr.pipeline.backbones.base import Backbone
from semcorr.pipeline.distributed import Team
from semcorr.pipeline.io import WORK_DIR
from semcorr.pipeline.objectstore import is_url
from semcorr.pipeline.store import (DEFAULT_CODEC, FeatureStore, ShardMissing, StoreError, StoreMismatch,
                                    create_store, library_versions, open_matching, replace_store, store_layout)

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
    path: Path | str
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


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto`` = cuda when available, else cpu; plain ``cuda`` under torchrun = the rank's own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(device)


def partial_path(work_root: Path, out: Path) -> Path:
    """Where the store for ``out = .../<variant>/<dataset>.zarr`` is built: ``<work_root>/partial/<variant>/<dataset>.zarr``."""
    return Path(work_root) / "partial" / Path(out).parent.name / Path(out).name


def extract_features(
    backbone: Backbone,
    images: pd.DataFrame,
    out: Path | str,
    attrs: dict,
    conf: dict | None = None,
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
    work_root: Path | None = None,
    team: Team | None = None,
    finish: bool = True,
    replace: bool = False,
) -> ExtractResult:
    """Make ``out`` the store of the features of every row of ``images`` (columns image_id,
    path, width, height), extracting the shards of ``part = (i, n)``.

    ``attrs`` from `store_attrs`. ``work_root`` holds the partial store and the locks
    (default: ``out.parent.parent.parent / ".semcorr"``, i.e. ``data/.semcorr`` for
    ``data/features/<variant>/<dataset>.zarr``); it must be on the filesystem of ``out``.
    Raises `ExtractError` while another extract writes the store with another configuration.

    ``team``: the ranks of one torchrun (`pipeline.distributed.torchrun_team`); rank r of K
    extracts part ``(i + n*r, n*K)``. ``finish=False``: write this part's shards only and leave
    the finalising to the process that started this one (`extract_by_tasks`). ``out`` may be
    a URL (``s3://bucket/prefix/<dataset>.zarr``), built in place (`_ObjectSite`); ``replace``
    then deletes a store of another configuration found there (locally the finished store
    always replaces the old one).
    """
    conf = {**default_conf, **(conf or {})}
    team = team or Team()
    index, n_parts = part
    if not 0 <= index < n_parts:
        raise ValueError(f"part {index}/{n_parts}: expected 0 <= i < n")
    part = (index + n_parts * team.rank, n_parts * team.size)
    start = time.perf_counter()
    config = _config(backbone, images, out, attrs, conf)
    console = Console(stderr=True, quiet=not progress)
    with _site(out, work_root, config, replace) as site:
        alone = any(team.gather(site.alone))
        if team.on_leader(lambda: site.prepare(alone)):
            return ExtractResult(out, len(images), config.part_images(part), 0, time.perf_counter() - start, True)
        plan = site.plan(part, console)
        if plan.store is None:
            return ExtractResult(out, len(images), plan.skipped, 0, time.perf_counter() - start, True)
        extracted = _run(backbone, images["path"].tolist(), plan.store, plan.todo, conf, console, team.local_rank)
        complete = False
        if finish:
            team.barrier()  # every rank has written its shards
            complete = team.on_leader(site.promote)
    return ExtractResult(out, len(images), plan.skipped, extracted, time.perf_counter() - start, complete)


def extract_by_tasks(
    backbone: Backbone,
    images: pd.DataFrame,
    out: Path | str,
    attrs: dict,
    launch: Callable[[], list[dict]],
    conf: dict | None = None,
    part: tuple[int, int] = (0, 1),
    work_root: Path | None = None,
    replace: bool = False,
) -> ExtractResult:
    """`extract_features` with the shards of ``part`` extracted by other processes, e.g. the
    tasks of a SLURM job array: this process prepares the store (holding the write lock
    throughout, which the tasks share), ``launch()`` starts the tasks (each an
    ``extract_features(..., finish=False)`` of a share of ``part``), waits for all and returns
    their results (dicts of `ExtractResult`'s ``extracted`` and ``skipped``), then this
    process finalises the store."""
    conf = {**default_conf, **(conf or {})}
    start = time.perf_counter()
    config = _config(backbone, images, out, attrs, conf)
    with _site(out, work_root, config, replace) as site:
        if site.prepare(site.alone):
            return ExtractResult(out, len(images), config.part_images(part), 0, time.perf_counter() - start, True)
        results = launch()
        complete = site.promote()
    return ExtractResult(out, len(images), sum(r["skipped"] for r in results), sum(r["extracted"] for r in results),
                         time.perf_counter() - start, complete)


def _config(backbone: Backbone, images: pd.DataFrame, out: Path | str, attrs: dict, conf: dict) -> _Config:
    layout = store_layout(out, attrs, images["image_id"].tolist(), conf["shard_images"], DEFAULT_CODEC)
    if int(attrs["input_size"]) <= 0:
        raise ValueError(f"{out}: input_size {attrs['input_size']!r}: expected a positive number of pixels")
    transforms = [backbone.transform((int(h), int(w))) for h, w in zip(images["height"], images["width"])]
    return _Config(attrs, layout, transforms)


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

    def create(self, path: Path | str, replace_stale: bool) -> FeatureStore:
        """Create the (empty) store at ``path``, or join the one there (`create_store`)."""
        layout = self.layout
        return create_store(path, self.attrs, layout["image_ids"], self.transforms, layout["shard_images"],
                            replace_stale=replace_stale, codec=layout["codec"])

    def part_images(self, part: tuple[int, int]) -> int:
        """Images in the shards of ``part``."""
        n, size = len(self.transforms), self.layout["shard_images"]
        index, n_parts = part
        return sum(min(size, n - s * size) for s in range(-(-n // size)) if s % n_parts == index)


@dataclass(frozen=True)
class _Plan:
    store: FeatureStore | None  # the partial store to fill; None: ``out`` is complete and intact
    todo: list[int]  # shards of this part to extract
    skipped: int  # images of this part found intact


def _site(out: Path | str, work_root: Path | None, config: _Config, replace: bool) -> "_LocalSite | _ObjectSite":
    if is_url(out):
        return _ObjectSite(str(out), config, replace)
    out = Path(out)
    return _LocalSite(out, Path(work_root) if work_root is not None else out.parent.parent.parent / WORK_DIR, config)


class _LocalSite:
    """A store on a POSIX filesystem (local, or shared between nodes): built in
    ``<work_root>/partial/...`` under the flock `_WriteLock`, renamed onto ``out`` once complete."""

    def __init__(self, out: Path, work_root: Path, config: _Config):
        self.out, self.partial, self.config = out, partial_path(work_root, out), config
        self.lock = _WriteLock(work_root, out, config.fingerprint())

    def __enter__(self) -> "_LocalSite":
        self.lock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)

    @property
    def alone(self) -> bool:
        return self.lock.alone

    def prepare(self, alone: bool) -> bool:
        """Once per run, before any part plans: remove leftovers (when no other writer holds
        the store) and create the partial store. True when ``out`` already holds the complete,
        intact store: nothing to do."""
        with self.lock.gate():
            if alone:  # leftovers: of a kill during a promotion (see `replace_store`), of another configuration
                shutil.rmtree(self.partial.with_name(self.partial.name + ".old"), ignore_errors=True)
                if self.partial.exists() and _reusable(self.partial, self.config) is None:
                    shutil.rmtree(self.partial)
            if not (self.partial / "zarr.json").is_file() and self._intact_out():
                return True
            self.config.create(self.partial, replace_stale=True)
            return False

    def _intact_out(self) -> bool:
        source = _reusable(self.out, self.config)
        return bool(source is not None and source.attrs.get("complete")
                    and not any(source.check_shard(s) for s in range(source.n_shards)))

    def plan(self, part: tuple[int, int], console: Console) -> _Plan:
        """Under the gate lock: decide which shards of this part to extract, keeping every shard
        that verifies, in the partial store or else in ``out`` (hard-linked into the partial store)."""
        with self.lock.gate():
            return self._plan(part, console)

    def _plan(self, part: tuple[int, int], console: Console) -> _Plan:
        out, partial, config = self.out, self.partial, self.config
        source = _reusable(out, config)
        index, n_parts = part
        if source is not None and not (partial / "zarr.json").is_file():  # another part promoted it
            if source.attrs.get("complete") and not any(source.check_shard(s) for s in range(source.n_shards)):
                return _Plan(None, [], config.part_images(part))
        store = config.create(partial, replace_stale=True)
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

    def promote(self) -> bool:
        """Under the gate lock: if every shard is done, verify, finalize and rename the partial
        store onto ``out``; returns whether ``out`` now holds the complete store."""
        with self.lock.gate():
            if not (self.partial / "zarr.json").is_file():  # another part promoted it
                source = _reusable(self.out, self.config)
                return source is not None and bool(source.attrs.get("complete"))
            store = open_matching(self.partial, self.config.layout, self.config.table)
            if not store.finalize():
                return False
            replace_store(store.path, self.out)
            return True


class _ObjectSite:
    """A store on object storage, built in place at its URL: there is no rename to swap a
    finished store in, and no lock. What replaces them:

    - the store's ``zarr.json`` is created by an exclusive PUT (``If-None-Match: *``,
      `store.create_store`): one writer creates the store and fixes its configuration;
      writers of this configuration share it, another configuration is refused (``replace``
      deletes it first: no lock can tell whether its writer still runs, so only when none does);
    - each part writes only its own shards, each shard object whole, its ``done`` flags after it;
    - readers (`open_store`) need the ``complete`` marker, written last, after every shard
      verified; a complete store that turns out damaged is marked incomplete before a shard of
      it is written again, so a reader never trusts a store in repair.

    Finalising is idempotent (verify every shard, then write the marker), so parts that finish
    at once may both do it.
    """

    alone = True  # nothing to clean up: no partial folder, no leftover renames

    def __init__(self, out: str, config: _Config, replace: bool):
        self.out, self.config, self.replace = out, config, replace

    def __enter__(self) -> "_ObjectSite":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _join(self, replace: bool) -> FeatureStore:
        try:
            return self.config.create(self.out, replace_stale=replace)
        except StoreMismatch as exc:
            raise ExtractError(f"{exc}; extract to another URL, or delete it first (`--replace`, only while no "
                               "extract of it runs: object storage has no lock that could tell)") from None

    def prepare(self, alone: bool) -> bool:
        """Create or join the store; True when it is complete and every shard verifies."""
        store = self._join(self.replace)
        if store.attrs.get("complete"):
            if not any(store.check_shard(s) for s in range(store.n_shards)):
                return True
            store.mark_incomplete()
        return False

    def plan(self, part: tuple[int, int], console: Console) -> _Plan:
        """Keep this part's shards that verify (marking them done), discard the others."""
        store = self._join(False)
        if store.attrs.get("complete"):  # finalised by another part since `prepare`
            return _Plan(None, [], self.config.part_images(part))
        done = store.done()
        index, n_parts = part
        todo, skipped = [], 0
        for shard in range(index, store.n_shards, n_parts):
            rows = store.shard_range(shard)
            problems, flagged = store.check_shard(shard), done[rows.start : rows.stop]
            if not problems:
                if not flagged.all():  # written, then killed before its flags
                    store.mark_done(shard)
                skipped += len(rows)
                continue
            never_written = sum(isinstance(p, ShardMissing) for p in problems) == len(store.array_names)
            if flagged.any() or not never_written:  # a request per object: skipped for the shards of a new store
                store.discard_shard(shard)
            todo.append(shard)
        if skipped:
            console.print(f"{self.out}: skipping {skipped} images already extracted")
        return _Plan(store, todo, skipped)

    def promote(self) -> bool:
        """If every shard is done: verify them all and write the ``complete`` marker."""
        return self._join(False).finalize()


def _reusable(path: Path, config: _Config) -> FeatureStore | None:
    """The store at ``path`` opened read-only, if it is one of this configuration."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        return open_matching(path, config.layout, config.table, writable=False)
    except StoreError:
        return None


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
         console: Console, local_rank: int | None = None) -> int:
    batches = [list(rows[k : k + conf["batch_size"]]) for rows in map(store.shard_range, shards)
               for k in range(0, len(rows), conf["batch_size"])]
    total = sum(map(len, batches))
    if not total:
        return 0
    device = resolve_device(conf["device"], local_rank)
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
    except ExtractError as exc:  # from a DataLoader worker: torch wraps the message in the worker's traceback
        raise ExtractError(_own_message(exc)) from None
    finally:
        writer.close()
    return total


def _own_message(exc: ExtractError) -> str:
    """An `ExtractError`'s own one-line message, also when a DataLoader worker raised it (torch then
    re-raises it with the worker's traceback as the message, the original on its last line)."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ExtractError"):
        return lines[-1].partition("ExtractError: ")[2] or lines[-1]
    return str(exc)


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
