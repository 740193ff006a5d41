"""A light post-processor ("head") trained from the feature cache alone: no backbone runs.

The head maps a cached feature map ``[C, h, w]`` to a new one ``[C', h, w]``: a few
bottleneck blocks as in GeoAware-SC's aggregation network (Zhang et al. CVPR 2024,
``model_utils/projection_network.py``: detectron2 bottleneck blocks, kernel sizes 1-3-1, inner
width a quarter of the output, GroupNorm with 32 groups), scaled to one backbone's map instead
of four. Two departures keep it a refinement of the backbone's features: no ReLU after a
block's sum (the output stays signed, as the backbone's is), and the last norm of each block
starts at zero, so an untrained head with ``C' = C`` is the identity (epoch 0 = the baseline).

Training: the Gaussian cross-entropy of `pipeline.losses` (softmax of cosine similarities of
each source keypoint's descriptor over the target map, against a Gaussian around the
ground-truth cell) on the training pairs, AdamW with a one-cycle schedule (GeoAware-SC: lr
1.25e-3, weight decay 1e-3, 30% warm-up, feature-map dropout 0.2). A step takes up to
``batch_images`` images of one category and every training pair among them: each image is run
through the head once per step, whatever the number of its pairs (`epoch_batches`); an epoch
counts every training pair once. Flip augmentation reads the store's mirrored maps: with a
left/right table (the pair table's ``flip_index``) each image of a step is mirrored with
probability 1/2 and a pair with one image mirrored alone has its keypoints permuted to their
counterparts (keypoints whose counterpart the pair lacks are left out of that step);
without one, a step's images are all mirrored or none. After each epoch the head's
features of the val images (in memory) are matched by argmax (`matching.match_keypoints`)
and scored (`pipeline.pck`); the epoch with the best val PCK per image is kept (epoch 0, the
identity, included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from semcorr.pipeline.coords import flip_points, sample_cells
from semcorr.pipeline.losses import gaussian_cross_entropy, keypoint_targets
from semcorr.pipeline.matching import match_keypoints
from semcorr.pipeline.pck import evaluate_predictions
from semcorr.pipeline.tables import keypoints

default_conf = {
    "blocks": 1,  # bottleneck blocks (GeoAware-SC: one per feature source)
    "out_dim": None,  # output channels; None = the input's (the untrained head is the identity)
    "bottleneck_ratio": 4,  # inner width = out_dim / ratio (GeoAware-SC: 4)
    "groups": 32,  # GroupNorm groups, at most (the largest divisor of the width up to this)
    "dropout": 0.2,  # feature-map dropout while training (GeoAware-SC: 0.2)
    "epochs": 2,  # GeoAware-SC: 2 epochs on SPair-71k
    "lr": 1.25e-3,  # AdamW peak learning rate of the one-cycle schedule (GeoAware-SC)
    "weight_decay": 1.0e-3,  # AdamW (GeoAware-SC)
    "warmup": 0.3,  # fraction of the steps spent warming up (GeoAware-SC: 0.3)
    "batch_images": 96,  # images per step (SPair-71k: a whole category's trn images); all pairs among them count
    "temperature": 0.03,  # softmax temperature of the Gaussian cross-entropy
    "kernel_size": 7,  # Gaussian target support, cells (odd)
    "sigma": 1.5,  # Gaussian target std, cells
    "flip_augment": True,  # mirrored maps from the store (needs a store with flips)
    "seed": 0,  # weights, dropout, step order and flips
    "max_train_pairs": None,  # a seeded random subset of the trn pairs (None = all)
    "max_val_pairs": None,  # a seeded random subset of the val pairs (None = all)
    "val_alpha": 0.1,  # epoch choice: val PCK@val_alpha per image, argmax
    "threads": None,  # torch CPU threads while training (None = torch's default; 1 suits small maps)
}
ARCH_KEYS = ("blocks", "out_dim", "bottleneck_ratio", "groups")
CURVE_COLUMNS = ["epoch", "steps", "loss", "val_pck", "lr", "seconds"]


class HeadError(ValueError):
    """The head cannot be trained or applied with this store, table or setting."""


# -- the network ------------------------------------------------------------------------------


def _groups(channels: int, most: int) -> int:
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions (GroupNorm, ReLU inside) plus a shortcut (a 1x1
    convolution when the width changes). ``x: [B, Cin, h, w]`` -> ``[B, Cout, h, w]``."""

    def __init__(self, cin: int, cout: int, inner: int, groups: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, inner, 1, bias=False), nn.GroupNorm(_groups(inner, groups), inner), nn.ReLU(),
            nn.Conv2d(inner, inner, 3, padding=1, bias=False), nn.GroupNorm(_groups(inner, groups), inner), nn.ReLU(),
            nn.Conv2d(inner, cout, 1, bias=False), nn.GroupNorm(_groups(cout, groups), cout),
        )
        nn.init.zeros_(self.branch[-1].weight)  # the branch starts at zero: the block is its shortcut
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(_groups(cout, groups), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.branch(x)


class Head(nn.Module):
    """``blocks`` bottleneck blocks: ``feats: [B, C, h, w]`` (any float dtype) -> ``[B, out_dim, h, w]``
    float32. While training, ``keep`` (bool, ``feats``' shape) is the dropout mask to apply
    (`dropout_mask`); without it, a fresh one is drawn."""

    def __init__(self, in_dim: int, conf: dict | None = None):
        super().__init__()
        conf = {**default_conf, **(conf or {})}
        self.in_dim = int(in_dim)
        self.out_dim = int(conf["out_dim"] or in_dim)
        inner = max(1, self.out_dim // int(conf["bottleneck_ratio"]))
        dims = [self.in_dim] + [self.out_dim] * int(conf["blocks"])
        self.blocks = nn.Sequential(*[Bottleneck(a, b, inner, int(conf["groups"])) for a, b in zip(dims, dims[1:])])
        self.dropout = float(conf["dropout"])

    def dropout_mask(self, feats: torch.Tensor) -> torch.Tensor | None:
        """A feature-map dropout mask for ``feats`` (None when not training or no dropout)."""
        if not self.training or not self.dropout:
            return None
        return torch.rand(feats.shape) >= self.dropout

    def forward(self, feats: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        feats = feats.float()
        keep = self.dropout_mask(feats) if keep is None else keep
        if keep is not None:
            feats = feats * keep / (1.0 - self.dropout)
        return self.blocks(feats)


def build_head(in_dim: int, conf: dict) -> Head:
    conf = check_conf(conf)
    torch.manual_seed(int(conf["seed"]))
    return Head(in_dim, conf)


def check_conf(conf: dict | None) -> dict:
    """``default_conf`` updated by ``conf``; `HeadError` on unknown keys or bad values."""
    conf = dict(conf or {})
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise HeadError(f"unknown head settings {sorted(unknown)}; known: {sorted(default_conf)}")
    conf = {**default_conf, **conf}
    for key in ("blocks", "bottleneck_ratio", "groups", "epochs", "batch_images"):
        if int(conf[key]) < 1:
            raise HeadError(f"head {key} must be >= 1, got {conf[key]!r}")
    if int(conf["batch_images"]) < 2:
        raise HeadError(f"head batch_images must be >= 2 (a pair has two images), got {conf['batch_images']!r}")
    if int(conf["kernel_size"]) % 2 == 0:
        raise HeadError(f"head kernel_size must be odd, got {conf['kernel_size']!r}")
    return conf


# -- the data of a step ----------------------------------------------------------------------


@dataclass
class Batch:
    """One step: ``images`` (image id -> mirrored?) and the positions of its ``pairs``."""

    images: dict[str, bool]
    pairs: np.ndarray


def epoch_batches(pairs: pd.DataFrame, conf: dict, epoch: int) -> list[Batch]:
    """The steps of one epoch, a function of (seed, epoch) only: per category, its images in a
    seeded order cut into blocks of ``batch_images // 2`` (one block when they all fit in
    ``batch_images``); a step is every pair between two blocks (or within one); steps run in
    a seeded order across categories. Every pair is in exactly one step."""
    rng = np.random.default_rng([int(conf["seed"]), int(epoch)])
    size = int(conf["batch_images"])
    sources, targets = pairs["source_id"].to_numpy(), pairs["target_id"].to_numpy()
    permutable = _has_flip_index(pairs)
    batches = []
    for category in sorted(pairs["category"].unique()):
        rows = np.flatnonzero(pairs["category"].to_numpy() == category)
        images = np.array(sorted(set(sources[rows]) | set(targets[rows])))
        images = images[rng.permutation(len(images))]
        n_blocks = 1 if len(images) <= size else math.ceil(len(images) / (size // 2))
        block = {image: b for b, chunk in enumerate(np.array_split(images, n_blocks)) for image in chunk}
        bs = np.array([block[i] for i in sources[rows]])
        bt = np.array([block[i] for i in targets[rows]])
        lo, hi = np.minimum(bs, bt), np.maximum(bs, bt)
        for key in sorted(set(zip(lo.tolist(), hi.tolist()))):
            members = rows[(lo == key[0]) & (hi == key[1])]
            ids = sorted(set(sources[members]) | set(targets[members]))
            if not conf["flip_augment"]:
                flips = dict.fromkeys(ids, False)
            elif permutable[members].all():
                flips = dict(zip(ids, (rng.random(len(ids)) < 0.5).tolist()))
            else:
                flips = dict.fromkeys(ids, bool(rng.random() < 0.5))
            batches.append(Batch(flips, members))
    return [batches[k] for k in rng.permutation(len(batches))]


def _has_flip_index(pairs: pd.DataFrame) -> np.ndarray:
    """``[P]`` bool: the pair has a left/right permutation (``flip_index``)."""
    if "flip_index" not in pairs.columns:
        return np.zeros(len(pairs), dtype=bool)
    return np.array([v is not None and not (np.ndim(v) == 0 and pd.isna(v)) for v in pairs["flip_index"]])


def posed_keypoints(xy: np.ndarray, visible: np.ndarray, index: np.ndarray | None, flip: bool, other_flip: bool,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's keypoints ``xy: [N, 2]`` as seen in its (mirrored if ``flip``) map, and the
    keypoints still usable ``[N]``. Mirrored together with the other image of the pair, the
    points are just mirrored; mirrored alone, keypoint i is its counterpart ``index[i]``
    mirrored (a keypoint whose counterpart the pair lacks is unusable)."""
    if not flip:
        return xy, visible
    if flip == other_flip or index is None:
        return flip_points(xy, width), visible
    known = index >= 0
    source = np.where(known, index, 0)
    return flip_points(xy[source], width), visible & known & visible[source]


# -- training --------------------------------------------------------------------------------


@dataclass
class HeadResult:
    best_epoch: int
    best_val_pck: float
    base_val_pck: float  # the untrained (identity) head: the backbone's own features
    curve: list[dict]
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # the best epoch's weights
    conf: dict = field(default_factory=dict)
    in_dim: int = 0


def train_head(store, train_pairs: pd.DataFrame, val_pairs: pd.DataFrame, conf: dict | None = None,
               log: Callable[[str], None] = lambda line: None, val_store=None) -> HeadResult:
    """Train a `Head` on ``train_pairs`` from the cached maps of ``store`` (a `FeatureStore`)
    and choose its epoch on ``val_pairs`` (from ``val_store``, default ``store``); returns the
    best epoch's weights. Reads only the store and the tables."""
    conf = check_conf(conf)
    if conf["flip_augment"] and not store.attrs.get("flips"):
        raise HeadError(f"{store.path}: head flip augmentation (head.flip_augment) reads the mirrored maps: "
                        "set `extract.flips: true` and re-run extract, or `head.flip_augment: false`")
    train_pairs = _subset(train_pairs, conf["max_train_pairs"], conf["seed"])
    val_pairs = _subset(val_pairs, conf["max_val_pairs"], conf["seed"])
    if train_pairs.empty or val_pairs.empty:
        raise HeadError(f"training the head needs trn and val pairs; got {len(train_pairs)} trn and {len(val_pairs)} val")
    val_store = store if val_store is None else val_store
    threads = torch.get_num_threads()
    if conf["threads"]:
        torch.set_num_threads(int(conf["threads"]))
    try:
        return _train(store, val_store, train_pairs, val_pairs, conf, log)
    finally:
        torch.set_num_threads(threads)


def _train(store, val_store, train_pairs: pd.DataFrame, val_pairs: pd.DataFrame, conf: dict,
           log: Callable[[str], None]) -> HeadResult:
    head = build_head(int(store.attrs["feat_dim"]), conf)
    schedule = [epoch_batches(train_pairs, conf, epoch) for epoch in range(1, int(conf["epochs"]) + 1)]
    optimizer = torch.optim.AdamW(head.parameters(), lr=float(conf["lr"]), weight_decay=float(conf["weight_decay"]))
    total = sum(len(batches) for batches in schedule)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=float(conf["lr"]), total_steps=max(total, 2),
                                                    pct_start=float(conf["warmup"]))
    data = PairData(train_pairs, store)
    base = validation_pck(head, val_store, val_pairs, float(conf["val_alpha"]))
    log(f"head: untrained (identity) head, val PCK@{conf['val_alpha']:g} {base:.4f}")
    curve = [{"epoch": 0, "steps": 0, "loss": float("nan"), "val_pck": base, "lr": 0.0, "seconds": 0.0}]
    best = (0, base, _copy(head))
    steps = 0
    for epoch, batches in enumerate(schedule, 1):
        started, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        losses = train_epoch(head, data, batches, optimizer, scheduler, conf,
                             lambda k, loss: log(f"head: epoch {epoch}/{conf['epochs']}, step {k}/{len(batches)}, "
                                                 f"loss {loss:.4f}"))
        steps += len(batches)
        val = validation_pck(head, val_store, val_pairs, float(conf["val_alpha"]))
        curve.append({"epoch": epoch, "steps": steps, "loss": float(np.mean(losses)) if losses else float("nan"),
                      "val_pck": val, "lr": lr, "seconds": round(time.perf_counter() - started, 3)})
        log(f"head: epoch {epoch}: loss {curve[-1]['loss']:.4f}, val PCK@{conf['val_alpha']:g} {val:.4f}")
        if val > best[1]:
            best = (epoch, val, _copy(head))
    return HeadResult(best_epoch=best[0], best_val_pck=best[1], base_val_pck=base, curve=curve, state_dict=best[2],
                      conf=conf, in_dim=int(store.attrs["feat_dim"]))


def train_epoch(head: Head, data: "PairData", batches: list[Batch], optimizer, scheduler, conf: dict,
                progress: Callable[[int, float], None] = lambda step, loss: None) -> list[float]:
    """One optimizer step per batch (`batch_backward`); returns the steps' losses. ``progress(step,
    mean loss)`` is called at every tenth of the steps."""
    head.train()
    losses = []
    for k, batch in enumerate(batches, 1):
        optimizer.zero_grad(set_to_none=True)
        loss, count = batch_backward(head, data, batch, conf)
        if count:
            optimizer.step()
            losses.append(loss)
            if not np.isfinite(losses[-1]):
                raise HeadError(f"head loss is {losses[-1]} at step {k} (head.lr {conf['lr']}); lower head.lr")
        scheduler.step()
        if k == len(batches) or k % max(1, len(batches) // 10) == 0:
            progress(k, float(np.mean(losses)) if losses else float("nan"))
    return losses


class PairData:
    """What a step needs of the training pairs: image ids, keypoints, flags, permutations and
    the store's maps."""

    def __init__(self, pairs: pd.DataFrame, store):
        self.pairs = pairs.reset_index(drop=True)
        self.store = store
        self.source_id = self.pairs["source_id"].tolist()
        self.target_id = self.pairs["target_id"].tolist()
        self.src = [keypoints(k) for k in self.pairs["source_kps"]]
        self.trg = [keypoints(k) for k in self.pairs["target_kps"]]
        self.visible = [np.asarray(v, dtype=bool) for v in self.pairs["visible"]]
        permutable = _has_flip_index(self.pairs)
        self.index = [np.asarray(v, dtype=np.int64) if ok else None
                      for v, ok in zip(self.pairs.get("flip_index", [None] * len(self.pairs)), permutable)]

    def maps(self, images: dict[str, bool]) -> dict[str, torch.Tensor]:
        """image id -> ``[1, C, h, w]`` float16 cached map (mirrored where ``images`` says)."""
        return {image_id: self.store.features(image_id, flip=flip).half()[None] for image_id, flip in images.items()}


def batch_backward(head: Head, data: PairData, batch: Batch, conf: dict) -> tuple[float, int]:
    """Gradients (accumulated into the head's parameters) of the mean Gaussian cross-entropy
    over the usable keypoints of ``batch``'s pairs; returns (loss, number of keypoints).

    Each image goes through the head once without autograd; memory holds the batch's maps and
    outputs (and dropout masks), not their activations. The loss is differentiated with respect
    to the outputs one target image at a time, then each image's output gradient flows back
    through the head, its forward recomputed with the same dropout mask."""
    maps = data.maps(batch.images)
    masks = {image_id: head.dropout_mask(feats) for image_id, feats in maps.items()}
    with torch.no_grad():
        leaves = {image_id: head(feats, masks[image_id])[0].requires_grad_() for image_id, feats in maps.items()}
    cells: dict[str, list[torch.Tensor]] = {}  # source image -> the cells of its pairs' keypoints
    peaks: dict[str, list[tuple[str, int, torch.Tensor]]] = {}  # target -> (source, slot, peak cells)
    for p in batch.pairs:
        source_id, target_id = data.source_id[p], data.target_id[p]
        fs, ft = batch.images[source_id], batch.images[target_id]
        t_src, t_trg = data.store.transform(source_id), data.store.transform(target_id)
        src_xy, ok_s = posed_keypoints(data.src[p], data.visible[p], data.index[p], fs, ft, t_src.image_w)
        trg_xy, ok_t = posed_keypoints(data.trg[p], data.visible[p], data.index[p], ft, fs, t_trg.image_w)
        targets = keypoint_targets(src_xy, trg_xy, ok_s & ok_t, t_src, t_trg)
        if bool(targets.valid.any()):
            slots = cells.setdefault(source_id, [])
            peaks.setdefault(target_id, []).append((source_id, len(slots), targets.trg_peak[targets.valid]))
            slots.append(targets.src_cells[targets.valid])
    count = sum(len(c) for slots in cells.values() for c in slots)
    if not count:
        return 0.0, 0
    descs = {}  # source -> its descriptors, a leaf per slot: the loss is differentiated target by target
    for source_id, slots in cells.items():
        with torch.no_grad():
            sampled = sample_cells(leaves[source_id][None], torch.cat(slots)[None])[0]
        descs[source_id] = [d.clone().requires_grad_() for d in torch.split(sampled, [len(c) for c in slots])]
    total = 0.0
    for target_id, items in peaks.items():
        desc = torch.cat([descs[source][slot] for source, slot, _ in items])
        losses = gaussian_cross_entropy(desc, leaves[target_id], torch.cat([pk for _, _, pk in items]),
                                        float(conf["temperature"]), int(conf["kernel_size"]), float(conf["sigma"]))
        loss = losses.sum() / count
        loss.backward()
        total += float(loss.detach())
    for source_id, slots in cells.items():
        sampled = sample_cells(leaves[source_id][None], torch.cat(slots)[None])[0]
        sampled.backward(torch.cat([d.grad for d in descs[source_id]]))
    for image_id, feats in maps.items():
        if leaves[image_id].grad is not None:
            head(feats, masks[image_id])[0].backward(leaves[image_id].grad)
    return total, count


# -- applying ----------------------------------------------------------------------------------


def apply_head(head: Head, store, image_ids=None, flips: bool | None = None) -> Iterator[tuple]:
    """``(image_id, [C', h, w] float32, CellTransform[, mirrored map])`` for every image of
    ``store`` (or ``image_ids``): the items `pipeline.store.write_store` takes, with the
    mirrored maps when ``flips`` (default: when the store has them)."""
    head.eval()
    flips = bool(store.attrs.get("flips")) if flips is None else flips
    with torch.no_grad():
        for image_id in store.image_ids if image_ids is None else image_ids:
            out = head(store.features(image_id)[None])[0]
            item = (image_id, out, store.transform(image_id))
            if flips:
                item += (head(store.features(image_id, flip=True)[None])[0],)
            yield item


def head_store_attrs(base: dict, variant: str, out_dim: int, weights_sha256: str, flips: bool) -> dict:
    """Attrs of a head variant's store: the base store's backbone description, with the
    variant, width and the head's weights (``weights_sha256``; the base's is ``base_weights_sha256``)."""
    keep = ("backbone", "family", "model", "arch", "random_init", "layer", "patch_size", "input_size",
            "resize", "dataset", "versions")
    return {**{k: base.get(k) for k in keep}, "variant": variant, "tuned_depth": "head", "feat_dim": int(out_dim),
            "weights_sha256": weights_sha256, "base_weights_sha256": base.get("weights_sha256"),
            "base_variant": base.get("variant"), "flips": bool(flips)}


def validation_pck(head: Head, store, val_pairs: pd.DataFrame, alpha: float) -> float:
    """PCK@``alpha`` per image (`pipeline.pck`) of argmax matches (`matching.match_keypoints`)
    with the head's features of the val images, held in memory."""
    ids = sorted(set(val_pairs["source_id"]) | set(val_pairs["target_id"]))
    maps = {image_id: feats for image_id, feats, _ in apply_head(head, store, ids, flips=False)}
    head.train()
    tables = []
    for row in val_pairs.itertuples(index=False):
        xy = keypoints(row.source_kps)
        ok = np.isfinite(xy).all(axis=1)
        pred = np.full_like(xy, np.nan)
        if ok.any():
            g = torch.from_numpy(store.transform(row.source_id).pixels_to_cells(xy[ok])).float()
            desc = sample_cells(maps[row.source_id][None], g[None])
            cells, _ = match_keypoints(desc, maps[row.target_id])
            pred[ok] = store.transform(row.target_id).cells_to_pixels(cells[0].double().numpy())
        tables.append(pd.DataFrame({"pair_id": row.pair_id, "kp_index": np.arange(len(xy)), "x": pred[:, 0],
                                    "y": pred[:, 1]}))
    overall, _ = evaluate_predictions(val_pairs, pd.concat(tables, ignore_index=True), alphas=[alpha])
    return float(overall.image[float(alpha)])


def load_head(path: Path, in_dim: int, conf: dict) -> Head:
    """A `Head` with the weights of ``path`` (a state dict, read weights-only)."""
    head = Head(in_dim, check_conf(conf))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head.load_state_dict(state)
    except (RuntimeError, KeyError, OSError) as exc:
        raise HeadError(f"{path}: not the weights of a head with {in_dim} input channels and "
                        f"{ {k: conf.get(k) for k in ARCH_KEYS} } ({exc})") from None
    return head.eval()


def _copy(head: Head) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def _subset(pairs: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    if limit is None or limit >= len(pairs):
        return pairs.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).permutation(len(pairs))[: int(limit)])
    return pairs.iloc[keep].reset_index(drop=True)

