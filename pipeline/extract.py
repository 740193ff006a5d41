"""Dense features of every image of a dataset, into a feature store (`pipeline.store`).

One forward per unique image of the images table. DataLoader workers decode (PIL) and
resize (`backbone.preprocess`); the main thread runs the model under
``torch.inference_mode`` (bf16 autocast on GPU); a writer thread turns finished shards
into zarr shard files while the next batches compute, through a bounded queue, so
memory stays a few shards whatever the dataset size.

Work is split by store shard: a run skips shards already done (resume after a kill)
and, with ``part=(i, n)``, handles only shards ``s % n == i`` (several processes
filling one store never touch the same file). Batches never cross shard boundaries,
so an image is computed in the same batch whatever was skipped: resumed and split
runs give bitwise the same store as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from semcorr.pipeline.backbones.base import Backbone
from semcorr.pipeline.store import FeatureStore, create_store, library_versions

default_conf = {
    "batch_size": 8,  # images per forward (a batch never spans two store shards)
    "num_workers": 2,  # DataLoader processes that decode and resize; 0 = in the main process
    "device": "auto",  # auto = cuda when available, else cpu
    "flips": False,  # also store the features of each horizontally mirrored image
    "shard_images": 16,  # images per zarr shard file: the unit of resume and of parallel parts
}


class ExtractError(RuntimeError):
    """Bad input to extraction; the message names the image file."""


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    images: int  # images in the store
    skipped: int  # images of this part found done on disk
    extracted: int  # images forwarded by this run
    seconds: float
    complete: bool  # every image of the store is done (by this or other parts)


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


def extract_features(
    backbone: Backbone,
    images: pd.DataFrame,
    out: Path,
    attrs: dict,
    conf: dict | None = None,
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> ExtractResult:
    """Fill the store at ``out`` with the features of every row of ``images``
    (columns image_id, path, width, height), or of the shards of ``part = (i, n)``.

    ``attrs`` from `store_attrs`. A store made with other attrs is replaced when
    ``n == 1`` and refused (`StoreMismatch`) when several parts share it.
    """
    conf = {**default_conf, **(conf or {})}
    index, n_parts = part
    if not 0 <= index < n_parts:
        raise ValueError(f"part {index}/{n_parts}: expected 0 <= i < n")
    start = time.perf_counter()
    transforms = [backbone.transform((int(h), int(w))) for h, w in zip(images["height"], images["width"])]
    store = create_store(out, attrs, images["image_id"].tolist(), transforms,
                         shard_images=conf["shard_images"], replace_stale=n_parts == 1)
    done = store.done()
    mine = [s for s in range(store.n_shards) if s % n_parts == index]
    todo = [s for s in mine if not done[store.shard_range(s).start : store.shard_range(s).stop].all()]
    skipped = sum(len(store.shard_range(s)) for s in mine) - sum(len(store.shard_range(s)) for s in todo)
    console = Console(stderr=True, quiet=not progress)
    if skipped:
        console.print(f"{out}: skipping {skipped} images already extracted ({len(mine) - len(todo)} shards)")

    extracted = _run(backbone, images["path"].tolist(), store, todo, conf, console)
    complete = store.finalize()
    return ExtractResult(Path(out), len(store), skipped, extracted, time.perf_counter() - start, complete)


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
