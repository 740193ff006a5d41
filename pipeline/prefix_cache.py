"""Cache of the frozen prefix of a backbone: the tokens entering block ``L - N``.

Fine-tuning the last N blocks never changes what the first ``L - N`` blocks compute, so
their output is computed once per image (and per horizontally flipped copy, the one
augmentation the cache can hold) and training runs `Backbone.forward_tail` from it.

Layout (zarr v3 group): ``tokens`` [E, *token_shape] (one chunk per entry, uncompressed;
``bfloat16`` is stored as its uint16 bit pattern), ``done`` [E] bool, and attrs
``fingerprint`` (backbone spec, n_tail, dtype, entries: what the tokens depend on) and
``complete``. A build writes an entry's tokens before its ``done`` flag, so a killed
build resumes with the entries still missing; a cache whose fingerprint differs is
rebuilt; readers refuse an incomplete cache.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from semcorr.pipeline.backbones.base import Backbone

default_conf = {
    "dtype": "bfloat16",  # bfloat16 | float16 | float32: storage type of the tokens
    "batch_size": 8,  # images per forward_prefix call
}

LOG_EVERY = 25  # batches between progress lines
STORAGE = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}

Entry = tuple[str, bool]  # (image_id, horizontally flipped)


class PrefixCacheError(RuntimeError):
    """The cache on disk cannot be used; the message names its path."""


class PrefixCache:
    """Read access to a complete cache. ``index[(image_id, flip)]`` -> row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except Exception as err:  # missing or not a zarr group
            raise PrefixCacheError(f"{self.path}: not a prefix cache ({err})") from err
        if not self.group.attrs.get("complete", False):
            raise PrefixCacheError(f"{self.path}: prefix cache is incomplete; rebuild it with build_prefix_cache")
        fingerprint = self.group.attrs["fingerprint"]
        self.dtype: str = fingerprint["dtype"]
        self.entries: list[Entry] = [(image_id, bool(flip)) for image_id, flip in fingerprint["entries"]]
        self.index = {entry: row for row, entry in enumerate(self.entries)}
        self.tokens_array = self.group["tokens"]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.tokens_array.shape)) * self.tokens_array.dtype.itemsize

    def tokens(self, entries: Sequence[Entry]) -> torch.Tensor:
        """Tokens of ``entries`` -> ``[len(entries), *token_shape]`` float32."""
        missing = [e for e in entries if e not in self.index]
        if missing:
            raise PrefixCacheError(f"{self.path}: no cached tokens for {missing[:3]}")
        rows = [self.index[e] for e in entries]
        return decode(np.stack([self.tokens_array[r] for r in rows]), self.dtype)


def encode(tokens: torch.Tensor, dtype: str) -> np.ndarray:
    """``[B, ...]`` float tensor -> numpy array in the storage type of ``dtype``."""
    if dtype == "bfloat16":
        return tokens.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tokens.detach().to("cpu", getattr(torch, dtype)).numpy()


def decode(array: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def build_prefix_cache(
    path: Path,
    backbone: Backbone,
    n_tail: int,
    entries: Sequence[Entry],
    load_image: Callable[[str], np.ndarray],
    fingerprint: dict,
    conf: dict | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda message: None,
) -> PrefixCache:
    """Compute (or complete) the cache of ``backbone.forward_prefix(x, n_tail)`` at ``path``.

    entries: (image_id, flip) pairs; load_image(image_id) -> ``[H, W, 3]`` uint8, flipped
    here for ``flip``. fingerprint: what else the tokens depend on (weights, spec, image
    table); a cache built with a different fingerprint is discarded and rebuilt.
    """
    conf = {**default_conf, **(conf or {})}
    if conf["dtype"] not in STORAGE:
        raise ValueError(f"prefix cache dtype must be one of {list(STORAGE)}, got {conf['dtype']!r}")
    if not entries:
        raise ValueError(f"{path}: no images to cache")
    path = Path(path)
    full_fingerprint = {
        **fingerprint,
        "n_tail": int(n_tail),
        "dtype": conf["dtype"],
        "entries": [[image_id, bool(flip)] for image_id, flip in entries],
    }
    group = _open_matching(path, full_fingerprint)
    if group is not None and group.attrs.get("complete", False):
        return PrefixCache(path)

    todo = list(range(len(entries))) if group is None else np.flatnonzero(~group["done"][:]).tolist()
    device = torch.device(device)
    log(f"prefix cache {path}: {len(entries) - len(todo)} of {len(entries)} entries cached, computing {len(todo)}")
    for start in range(0, len(todo), conf["batch_size"]):
        if start and start % (LOG_EVERY * conf["batch_size"]) == 0:
            log(f"prefix cache {path}: {start} of {len(todo)} entries computed")
        rows = todo[start : start + conf["batch_size"]]
        tokens = encode(_prefix_tokens(backbone, n_tail, [entries[r] for r in rows], load_image, device), conf["dtype"])
        if group is None:
            group = _create(path, full_fingerprint, len(entries), tokens)
        for row, value in zip(rows, tokens):
            group["tokens"][row] = value
        done = group["done"][:]
        done[rows] = True  # only after the tokens are on disk
        group["done"][:] = done
    group.attrs["complete"] = True
    return PrefixCache(path)


@torch.no_grad()
def _prefix_tokens(
    backbone: Backbone, n_tail: int, entries: Sequence[Entry], load_image: Callable[[str], np.ndarray], device: torch.device
) -> torch.Tensor:
    images = []
    for image_id, flip in entries:
        image = load_image(image_id)
        x, _ = backbone.preprocess(np.ascontiguousarray(image[:, ::-1]) if flip else image)
        images.append(x)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return backbone.forward_prefix(torch.stack(images).to(device), n_tail).float()


def _open_matching(path: Path, fingerprint: dict):
    """The existing group at ``path`` if it was built with ``fingerprint``; else None
    (after removing whatever is there)."""
    if not path.exists():
        return None
    try:
        group = zarr.open_group(str(path), mode="r+")
        if group.attrs.get("fingerprint") == _jsonable(fingerprint) and "done" in group:
            return group
    except Exception:  # unreadable leftovers are rebuilt
        pass
    shutil.rmtree(path)
    return None


def _create(path: Path, fingerprint: dict, n_entries: int, sample: np.ndarray):
    group = zarr.open_group(str(path), mode="w")
    group.create_array(
        "tokens", shape=(n_entries, *sample.shape[1:]), chunks=(1, *sample.shape[1:]), dtype=sample.dtype, compressors=None
    )
    group.create_array("done", shape=(n_entries,), dtype="bool", fill_value=False)
    group.attrs["fingerprint"] = _jsonable(fingerprint)
    group.attrs["complete"] = False
    return group


def _jsonable(obj):
    """What the attrs round trip gives back (tuples -> lists)."""
    return json.loads(json.dumps(obj, default=str))
