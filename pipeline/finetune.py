"""Fine-tuning the last N transformer blocks of a backbone with Gaussian cross-entropy.

The backbone is split at block ``L - N`` (`Backbone.forward_prefix` / `forward_tail`).
The prefix stays frozen, so its tokens are either cached once (`pipeline.prefix_cache`,
``cached_prefix``) or recomputed from the images without gradients; training runs the
tail. Two modes:

- ``blocks``: the last N blocks train, plus whatever follows them in `forward_tail` (the
  final norm of DINOv2/DINOv3/CLIP, SAM's neck);
- ``lora``: only LoRA adapters (`peft`, rank ``lora.rank``, ``lora_alpha`` ``lora.alpha``)
  on the attention projections (``lora.targets``: ``qkv``, the fused input projection, and
  ``proj``, the output one) of the last N blocks (``depth: None`` = every block) train;
  the result is merged into the weights (`merge_and_unload`), a plain state dict. peft
  adapts CLIP's ``nn.MultiheadAttention`` as a whole, so CLIP takes both targets or none.

The only augmentation is the one a cache can hold: horizontally flipped copies of both
images of a pair.

Validation runs the extract -> match -> evaluate path on the val pairs with the current
weights (a temporary `pipeline.store`, `pipeline.matching.match_pairs` argmax,
`pipeline.pck`); the epoch
with the best val PCK@0.1 per image is kept. A state file per finished epoch (tail
weights, optimizer, scheduler, RNG, curve, best) lets a killed run continue, and a
finished run return at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from semcorr.pipeline.backbones import code_digest
from semcorr.pipeline.backbones.base import Backbone
from semcorr.pipeline.coords import CellTransform, flip_points
from semcorr.pipeline.io import atomic_path, staged, write_json
from semcorr.pipeline.losses import KeypointTargets, batch_loss, keypoint_targets
from semcorr.pipeline.extract import store_attrs
from semcorr.pipeline.matching import match_pairs
from semcorr.pipeline.pck import evaluate_predictions
from semcorr.pipeline.prefix_cache import Entry, build_prefix_cache
from semcorr.pipeline.store import open_store, write_store
from semcorr.pipeline.tables import keypoints
from semcorr.pipeline.weights import sha256_file

default_conf = {
    "mode": "blocks",  # blocks: train the last N blocks and the head; lora: LoRA adapters only
    "depth": 2,  # N: number of last transformer blocks trained or adapted (None: every block)
    "lora": {"rank": 4, "alpha": 4.0, "targets": ["qkv", "proj"]},  # mode lora: peft r, lora_alpha, projections
    "epochs": 3,
    "lr": 1.0e-5,  # AdamW learning rate
    "weight_decay": 0.05,  # AdamW weight decay
    "batch_size": 8,  # pairs per optimizer step
    "milestones": [1, 2],  # epochs after which the lr is multiplied by gamma (MultiStepLR)
    "gamma": 0.5,
    "temperature": 0.03,  # softmax temperature of the Gaussian cross-entropy
    "kernel_size": 7,  # Gaussian target support, cells (odd)
    "sigma": 1.5,  # Gaussian target std, cells
    "seed": 0,  # data order and flips; same seed -> same weights (CPU)
    "cached_prefix": True,  # train the tail from cached prefix tokens instead of images
    "cache_dtype": "bfloat16",  # storage type of the prefix cache: bfloat16 | float16 | float32
    "flip_augment": True,  # each pair, each epoch: both images mirrored with probability 1/2
    "max_train_pairs": None,  # a seeded random subset of the trn pairs (None = all)
    "max_val_pairs": None,  # a seeded random subset of the val pairs (None = all)
    "val_alpha": 0.1,  # checkpoint selection: PCK@val_alpha per image, argmax matching
    "prefix_batch_size": 8,  # images per forward_prefix call when building the cache
}

LORA_KEYS = ("rank", "alpha", "targets")
MODES = ("blocks", "lora")
# Attention projections per family: target -> module name inside a block. CLIP's is one
# nn.MultiheadAttention, which peft adapts whole (input and output projections together).
ATTENTION = {
    "dinov2": {"qkv": "attn.qkv", "proj": "attn.proj"},
    "dinov3": {"qkv": "attn.qkv", "proj": "attn.proj"},
    "sam": {"qkv": "attn.qkv", "proj": "attn.proj"},
    "clip": {("qkv", "proj"): "attn"},
}
LOG_EVERY = 50  # steps between progress lines within an epoch
TRAIN_KEYS = tuple(k for k in default_conf if k not in ("prefix_batch_size",))
CURVE_COLUMNS = ["epoch", "step", "loss", "val_pck", "lr", "seconds"]


class FinetuneError(ValueError):
    """Fine-tuning cannot run with this backbone, data or state; the message says why."""


@dataclass
class Pair:
    """One training pair; ``src_xy, trg_xy: [N, 2]`` pixels of the unflipped images."""

    source_id: str
    target_id: str
    src_xy: np.ndarray
    trg_xy: np.ndarray
    visible: np.ndarray


@dataclass
class FinetuneResult:
    best_epoch: int
    best_val_pck: float
    base_val_pck: float  # val PCK of the untuned backbone (curve row epoch 0)
    curve: list[dict]
    trainable: list[str]  # names of the trained parameters (mode lora: the adapters')
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # full backbone, best epoch's tail (lora: merged)
    adapted: list[str] = field(default_factory=list)  # mode lora: the modules that carried adapters


# -- data -------------------------------------------------------------------------------


def load_image(path: str | Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB; raises `FinetuneError` naming the file if unreadable."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except Exception as err:  # PIL raises many types
        raise FinetuneError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def subset(pairs: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of ``limit`` rows (all rows if None), in table order."""
    if limit is None or limit >= len(pairs):
        return pairs.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).permutation(len(pairs))[: int(limit)])
    return pairs.iloc[keep].reset_index(drop=True)


def to_pairs(table: pd.DataFrame) -> list[Pair]:
    return [
        Pair(r.source_id, r.target_id, keypoints(r.source_kps), keypoints(r.target_kps), np.asarray(r.visible, bool))
        for r in table.itertuples(index=False)
    ]


class PrefixSource:
    """Tokens entering block ``L - depth`` for (image_id, flip) entries: from the prefix
    cache, or computed from the images without gradients."""

    def __init__(self, backbone: Backbone, depth: int, images: pd.DataFrame, device: torch.device, cache=None):
        self.backbone, self.depth, self.device, self.cache = backbone, depth, device, cache
        self.paths = dict(zip(images["image_id"], images["path"]))

    def image(self, image_id: str) -> np.ndarray:
        return load_image(self.paths[image_id])

    def tokens(self, entries: Sequence[Entry]) -> torch.Tensor:
        """-> ``[len(entries), *token_shape]`` on the device."""
        if self.cache is not None:
            return self.cache.tokens(entries).to(self.device)
        inputs = []
        for image_id, flip in entries:
            image = self.image(image_id)
            inputs.append(self.backbone.preprocess(np.ascontiguousarray(image[:, ::-1]) if flip else image)[0])
        with torch.no_grad(), autocast(self.device):
            return self.backbone.forward_prefix(torch.stack(inputs).to(self.device), self.depth).float()


def autocast(device: torch.device):
    """bf16 autocast on GPU; nothing on CPU (keeps CPU runs exact and reproducible)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# -- model split ----------------------------------------------------------------------


def trainable_parameters(backbone: Backbone, depth: int, tokens: torch.Tensor) -> list[str]:
    """Names of the parameters `forward_tail` uses (the last ``depth`` blocks and what
    follows them), found by one backward pass from ``tokens: [1, *token_shape]``."""
    try:
        blocks = backbone.blocks()
    except NotImplementedError as err:
        raise FinetuneError(f"{backbone.spec.family}: {err}") from err
    if not 1 <= depth <= len(blocks):
        raise FinetuneError(f"depth must be in 1..{len(blocks)} for {backbone.spec.family}/{backbone.spec.variant}, got {depth}")
    named = list(backbone.named_parameters())
    frozen_before = {id(p) for block in list(blocks)[: len(blocks) - depth] for p in block.parameters()}
    flags = [p.requires_grad for _, p in named]
    try:
        backbone.requires_grad_(True)
        with torch.enable_grad():
            out = backbone.forward_tail(tokens, depth)
            grads = torch.autograd.grad(out.float().square().sum(), [p for _, p in named], allow_unused=True)
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
    names = [name for (name, p), g in zip(named, grads) if g is not None]
    shared = [name for name, p in named if name in names and id(p) in frozen_before]
    if shared:
        raise FinetuneError(f"parameters {shared[:3]} run in both the frozen prefix and the tail; cannot split")
    return names


def lora_modules(backbone: Backbone, depth: int, targets: Sequence[str]) -> list[str]:
    """Full names of the attention projections ``targets`` (`ATTENTION`) of the last ``depth`` blocks."""
    family = backbone.spec.family
    if family not in ATTENTION:
        raise FinetuneError(f"{family}: LoRA needs transformer attention; known families: {', '.join(ATTENTION)}")
    wanted = set(targets)
    unknown = wanted - {"qkv", "proj"}
    if unknown or not wanted:
        raise FinetuneError(f"lora targets {sorted(targets)}: expected a non-empty subset of ['proj', 'qkv']")
    names: list[str] = []
    for key, module in ATTENTION[family].items():
        group = set(key) if isinstance(key, tuple) else {key}
        if group & wanted and not group <= wanted:
            raise FinetuneError(f"{family}: peft adapts {sorted(group)} together (one nn.MultiheadAttention); "
                                f"set lora targets to {sorted(group)}, got {sorted(targets)}")
        if group <= wanted:
            names.append(module)
    blocks = _blocks(backbone, depth)
    prefix = {id(m): n for n, m in backbone.named_modules()}
    return [f"{prefix[id(block)]}.{module}" for block in blocks for module in names]


def _blocks(backbone: Backbone, depth: int) -> list[torch.nn.Module]:
    try:
        blocks = list(backbone.blocks())
    except NotImplementedError as err:
        raise FinetuneError(f"{backbone.spec.family}: {err}") from err
    if not 1 <= depth <= len(blocks):
        raise FinetuneError(f"depth must be in 1..{len(blocks)} for {backbone.spec.family}/{backbone.spec.variant}, got {depth}")
    return blocks[len(blocks) - depth :]


def add_lora(backbone: Backbone, depth: int, lora: dict, seed: int = 0):
    """Put peft LoRA adapters (frozen base, trainable adapters, B = 0: the output is
    unchanged) on the ``lora['targets']`` projections of the last ``depth`` blocks, in
    place; returns the `peft.PeftModel` whose `merge_and_unload` folds them back in. The
    A matrices are drawn from ``seed`` without touching the global RNG."""
    from peft import LoraConfig, get_peft_model

    modules = lora_modules(backbone, depth, lora["targets"])
    for name in modules:  # timm's Eva adds the q/v biases with F.linear on qkv.weight, which
        attention = backbone.get_submodule(name.rsplit(".", 1)[0])  # would bypass an adapter on qkv:
        if getattr(attention, "q_bias", None) is not None and hasattr(attention, "qkv_bias_separate"):
            attention.qkv_bias_separate = True  # call qkv, then add the same biases
    config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=0.0, bias="none",
                        target_modules=modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(backbone, config)


def check_adapters_run(backbone: Backbone, depth: int, tokens: torch.Tensor) -> list[str]:
    """Names of the LoRA layers; `FinetuneError` if one of them is not called by
    `forward_tail` on ``tokens: [1, *token_shape]`` (an adapter a forward bypasses never trains)."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in backbone.named_modules() if isinstance(m, LoraLayer)}
    outer = [n for n in layers if not any(n != o and n.startswith(o + ".") for o in layers)]
    called: set[str] = set()
    hooks = [layers[n].register_forward_hook(lambda *_, n=n: called.add(n)) for n in outer]
    try:
        with torch.no_grad():
            backbone.forward_tail(tokens, depth)
    finally:
        for hook in hooks:
            hook.remove()
    skipped = sorted(set(outer) - called)
    if skipped:
        raise FinetuneError(f"{backbone.spec.family}: the forward never calls the LoRA layers {skipped[:3]}")
    return outer


def _merged_state(peft_model, params: dict[str, torch.nn.Parameter], tail: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load the adapter weights ``tail`` and merge them into the base weights
    (`merge_and_unload`): the plain state dict of the backbone, which is left merged."""
    with torch.no_grad():
        for name, value in tail.items():
            params[name].copy_(value)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().cpu().clone() for k, v in merged.state_dict().items()}


# -- training ---------------------------------------------------------------------------


def finetune(
    backbone: Backbone,
    train_pairs: pd.DataFrame,
    val_pairs: pd.DataFrame,
    images: pd.DataFrame,
    work_dir: Path,
    conf: dict | None = None,
    device: torch.device | str = "cpu",
    on_epoch_end: Callable[[int], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> FinetuneResult:
    """Train the last ``conf['depth']`` blocks of ``backbone`` in place (mode ``blocks``), or
    LoRA adapters on their attention projections (mode ``lora``), merged in at the end.

    train_pairs, val_pairs: prepared pair tables (their 'trn' and 'val' rows); images:
    the images table. work_dir (private: the stage keeps it outside DVC's outputs) receives
    ``prefix.zarr``, ``state/state.pt`` and ``curve.csv``. Returns the best epoch's weights
    as a full backbone state dict (semcorr layout; mode lora: merged, plain keys). ``on_row(row)`` gets every curve row
    (`CURVE_COLUMNS`), those of epochs finished before a resume included, in order;
    ``on_epoch_end(epoch)`` runs after each epoch's state is saved (tests use it to
    interrupt a run); ``log`` gets one line per step of the work.
    """
    conf = check_conf(backbone, conf)
    device = torch.device(device)
    work_dir = Path(work_dir)
    depth = int(conf["depth"])
    lora = conf["mode"] == "lora"
    adapted = lora_modules(backbone, depth, conf["lora"]["targets"]) if lora else []
    train_pairs = subset(train_pairs, conf["max_train_pairs"], conf["seed"])
    val_pairs = subset(val_pairs, conf["max_val_pairs"], conf["seed"])
    if train_pairs.empty or val_pairs.empty:
        raise FinetuneError(f"fine-tuning needs trn and val pairs; got {len(train_pairs)} trn and {len(val_pairs)} val")
    used = sorted(set(train_pairs["source_id"]) | set(train_pairs["target_id"]) | set(val_pairs["source_id"]) | set(val_pairs["target_id"]))
    images = images[images["image_id"].isin(used)].sort_values("image_id").reset_index(drop=True)
    missing = sorted(set(used) - set(images["image_id"]))
    if missing:
        raise FinetuneError(f"pairs refer to images missing from the images table: {missing[:3]}")
    transforms = {r.image_id: backbone.transform((int(r.height), int(r.width))) for r in images.itertuples(index=False)}
    widths = dict(zip(images["image_id"], images["width"].astype(int)))

    fingerprint = run_fingerprint(backbone, conf, train_pairs, val_pairs, images)
    state_path = work_dir / "state" / "state.pt"
    state = load_state(state_path, fingerprint)
    if state is not None and state["epoch"] >= conf["epochs"]:  # finished before: nothing to redo
        log(f"finetune: finished before ({state['epoch']} epochs); nothing to redo")
        write_curve(work_dir / "curve.csv", state["curve"])
        for row in state["curve"]:
            (on_row or (lambda r: None))(row)
        peft_model = add_lora(backbone, depth, conf["lora"], conf["seed"]) if lora else None
        return _result(backbone, state, peft_model, adapted)

    backbone.to(device)
    cache = None
    if conf["cached_prefix"]:
        train_ids = sorted(set(train_pairs["source_id"]) | set(train_pairs["target_id"]))
        entries = [(i, False) for i in used] + ([(i, True) for i in train_ids] if conf["flip_augment"] else [])
        source = PrefixSource(backbone, depth, images, device)
        log(f"finetune: prefix cache of {len(entries)} entries (tokens entering block {len(backbone.blocks()) - depth})")
        cache = build_prefix_cache(
            work_dir / "prefix.zarr", backbone, depth, entries, source.image,
            fingerprint={"backbone": fingerprint["backbone"], "images": fingerprint["images"], "code": code_digest()},
            conf={"dtype": conf["cache_dtype"], "batch_size": conf["prefix_batch_size"]}, device=device, log=log,
        )
    source = PrefixSource(backbone, depth, images, device, cache)
    validate = lambda: validation_pck(  # noqa: E731
        backbone, source, val_pairs, transforms, work_dir / "val.zarr", conf["val_alpha"], conf["prefix_batch_size"]
    )

    pairs = to_pairs(train_pairs)
    probe = source.tokens([(pairs[0].source_id, False)])
    peft_model = None
    if lora:
        peft_model = add_lora(backbone, depth, conf["lora"], conf["seed"])
        check_adapters_run(backbone, depth, probe)
        trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]  # peft's adapters only
    else:
        trainable = trainable_parameters(backbone, depth, probe)
    params = dict(backbone.named_parameters())
    for name in trainable:
        params[name].requires_grad_(True)
    optimizer = torch.optim.AdamW([params[n] for n in trainable], lr=conf["lr"], weight_decay=conf["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(conf["milestones"]), gamma=conf["gamma"])
    torch.manual_seed(conf["seed"])

    if state is None:
        log(f"finetune: validating the untuned backbone on {len(val_pairs)} val pairs")
        base = validate()
        curve = [{"epoch": 0, "step": 0, "loss": float("nan"), "val_pck": base, "lr": conf["lr"], "seconds": 0.0}]
        state = {"epoch": 0, "step": 0, "curve": curve, "best": None, "fingerprint": fingerprint}
    else:
        for name in trainable:
            params[name].data.copy_(state["tail"][name].to(device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        log(f"finetune: resuming after epoch {state['epoch']}")
    write_curve(work_dir / "curve.csv", state["curve"])
    for row in state["curve"]:
        (on_row or (lambda r: None))(row)

    step = state["step"]
    for epoch in range(state["epoch"] + 1, conf["epochs"] + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        losses = []
        batches = epoch_batches(len(pairs), conf, epoch)
        for k, batch in enumerate(batches, 1):
            loss = train_step(backbone, source, [pairs[i] for i, _ in batch], [f for _, f in batch], transforms, widths, optimizer, conf)
            step += 1
            if not np.isfinite(loss):
                raise FinetuneError(f"loss is {loss} at epoch {epoch}, step {step} (finetune.lr {conf['lr']}, "
                                    f"finetune.temperature {conf['temperature']}); lower finetune.lr")
            losses.append(loss)
            if k == len(batches) or k % LOG_EVERY == 0:
                log(f"finetune: epoch {epoch}/{conf['epochs']}, step {k}/{len(batches)}, loss {np.mean(losses):.4f}")
        scheduler.step()
        val = validate()
        row = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)), "val_pck": val, "lr": lr,
               "seconds": round(time.perf_counter() - started, 3)}
        state["curve"].append(row)
        log(f"finetune: epoch {epoch}/{conf['epochs']}: loss {row['loss']:.4f}, val PCK@{conf['val_alpha']:g} {val:.4f}")
        tail = {name: params[name].detach().cpu().clone() for name in trainable}
        if state["best"] is None or val > state["best"]["val_pck"]:
            state["best"] = {"epoch": epoch, "val_pck": val, "tail": tail}
        state.update(
            epoch=epoch, step=step, tail=tail, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng=torch.get_rng_state(), trainable=trainable,
        )
        save_state(state_path, state)
        write_curve(work_dir / "curve.csv", state["curve"])
        if on_row is not None:
            on_row(row)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    for name in trainable:
        params[name].requires_grad_(False)
    return _result(backbone, state, peft_model, adapted)


def epoch_batches(n_pairs: int, conf: dict, epoch: int) -> list[list[tuple[int, bool]]]:
    """Batches of (pair index, flip) for one epoch; a function of (seed, epoch) only, so
    a resumed run sees the same order as an uninterrupted one."""
    generator = torch.Generator().manual_seed(int(conf["seed"]) * 1_000_003 + epoch)
    order = torch.randperm(n_pairs, generator=generator).tolist()
    flips = (torch.rand(n_pairs, generator=generator) < 0.5).tolist() if conf["flip_augment"] else [False] * n_pairs
    items = [(i, bool(flips[i])) for i in order]
    size = int(conf["batch_size"])
    return [items[k : k + size] for k in range(0, n_pairs, size)]


def train_step(
    backbone: Backbone,
    source: PrefixSource,
    pairs: Sequence[Pair],
    flips: Sequence[bool],
    transforms: dict[str, CellTransform],
    widths: dict[str, int],
    optimizer: torch.optim.Optimizer,
    conf: dict,
) -> float:
    """One optimizer step on a batch of pairs (``flips[b]``: both images mirrored)."""
    entries = [(p.source_id, f) for p, f in zip(pairs, flips)] + [(p.target_id, f) for p, f in zip(pairs, flips)]
    tokens = source.tokens(entries)
    with autocast(source.device):
        feats = backbone.forward_tail(tokens, source.depth)
    targets: list[KeypointTargets] = []
    for p, f in zip(pairs, flips):
        src_xy = flip_points(p.src_xy, widths[p.source_id]) if f else p.src_xy
        trg_xy = flip_points(p.trg_xy, widths[p.target_id]) if f else p.trg_xy
        targets.append(keypoint_targets(src_xy, trg_xy, p.visible, transforms[p.source_id], transforms[p.target_id]))
    grids = lambda ids: [(transforms[i].grid_h, transforms[i].grid_w) for i in ids]  # noqa: E731
    b = len(pairs)
    loss, _ = batch_loss(
        feats[:b], feats[b:], targets, grids([p.source_id for p in pairs]), grids([p.target_id for p in pairs]),
        {k: conf[k] for k in ("temperature", "kernel_size", "sigma")},
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def validation_pck(
    backbone: Backbone,
    source: PrefixSource,
    val_pairs: pd.DataFrame,
    transforms: dict[str, CellTransform],
    store_path: Path,
    alpha: float,
    batch_size: int = 8,
) -> float:
    """PCK@alpha per image of argmax matches, computed as the extract, match and evaluate
    stages do: the current weights' features of the val images go into a temporary
    feature store (`pipeline.store`, float16), `pipeline.matching.match_pairs` matches
    from it and `pipeline.pck` scores; the store is removed afterwards."""
    image_ids = sorted(set(val_pairs["source_id"]) | set(val_pairs["target_id"]))

    def items():
        for start in range(0, len(image_ids), batch_size):
            chunk = image_ids[start : start + batch_size]
            with torch.no_grad(), autocast(source.device):
                feats = backbone.forward_tail(source.tokens([(i, False) for i in chunk]), source.depth).float().cpu()
            for image_id, f in zip(chunk, feats):
                tf = transforms[image_id]
                yield image_id, f[:, : tf.grid_h, : tf.grid_w], tf

    attrs = store_attrs(backbone, "finetune-val", "finetune-val", "val", backbone.spec.sha256, flips=False)
    try:
        write_store(store_path, attrs, items())
        predictions = match_pairs(open_store(store_path), val_pairs, {"max_window": 0}).table
    finally:
        shutil.rmtree(store_path, ignore_errors=True)
    overall, _ = evaluate_predictions(val_pairs, predictions, alphas=[alpha])
    return float(overall.image[float(alpha)])


# -- state, curve, outputs ------------------------------------------------------------------


def check_conf(backbone: Backbone, conf: dict | None) -> dict:
    """``conf`` over `default_conf`, checked, with ``depth: None`` resolved to every block."""
    conf = {**default_conf, **(conf or {})}
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise FinetuneError(f"unknown finetune settings {sorted(unknown)}; known: {sorted(default_conf)}")
    if conf["mode"] not in MODES:
        raise FinetuneError(f"finetune mode {conf['mode']!r}: expected one of {', '.join(MODES)}")
    conf["lora"] = {**default_conf["lora"], **(conf["lora"] or {})}
    unknown = set(conf["lora"]) - set(LORA_KEYS)
    if unknown:
        raise FinetuneError(f"unknown lora settings {sorted(unknown)}; known: {sorted(LORA_KEYS)}")
    if conf["depth"] is None:
        try:
            conf["depth"] = len(backbone.blocks())
        except NotImplementedError as err:
            raise FinetuneError(f"{backbone.spec.family}: {err}") from err
    return conf


def run_fingerprint(backbone: Backbone, conf: dict, train_pairs: pd.DataFrame, val_pairs: pd.DataFrame, images: pd.DataFrame) -> dict:
    """What a run's results depend on: training settings (the LoRA ones in mode lora), the
    base backbone (its weights by sha256, not by path), the pairs and the images."""
    spec = {k: v for k, v in backbone.spec.to_dict().items() if k != "weights"}
    image_rows = images[["image_id", "path", "width", "height"]].astype(str).to_numpy().tolist()
    pair_ids = [train_pairs["pair_id"].tolist(), val_pairs["pair_id"].tolist()]
    keys = [k for k in TRAIN_KEYS if k != "lora" or conf["mode"] == "lora"]
    return {
        "conf": json.loads(json.dumps({k: conf[k] for k in keys})),
        "backbone": json.loads(json.dumps(spec)),
        "images": _digest(image_rows),
        "pairs": _digest(pair_ids),
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def load_state(path: Path, fingerprint: dict) -> dict | None:
    """The saved state if it belongs to a run with this fingerprint, else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # written atomically, so only a foreign file lands here: start over
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == fingerprint else None


def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def write_curve(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=CURVE_COLUMNS).to_csv(tmp, index=False)


def _result(backbone: Backbone, state: dict, peft_model=None, adapted: Sequence[str] = ()) -> FinetuneResult:
    """The best epoch's weights, loaded into ``backbone`` (mode lora: into the adapters of
    ``peft_model``, then merged)."""
    best = state["best"]
    if peft_model is not None:
        full = _merged_state(peft_model, dict(backbone.named_parameters()), best["tail"])
    else:
        full = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
        full.update({k: v.clone() for k, v in best["tail"].items()})
        backbone.load_state_dict(full)
    return FinetuneResult(
        best_epoch=int(best["epoch"]),
        best_val_pck=float(best["val_pck"]),
        base_val_pck=float(state["curve"][0]["val_pck"]),
        curve=list(state["curve"]),
        trainable=list(state["trainable"]),
        state_dict=full,
        adapted=list(adapted),
    )


def save_tuned(out_dir: Path, state_dict: dict[str, torch.Tensor], meta: dict, work: Path) -> Path:
    """Write ``out_dir/model.pth`` (the full backbone state dict) and ``weights.json``
    ({file, sha256, random_init, verified, **meta}) as one folder, staged under ``work``."""
    out_dir = Path(out_dir)
    with staged(out_dir, work) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state_dict, tmp / "model.pth")
        info = {"file": "model.pth", "sha256": sha256_file(tmp / "model.pth"), "random_init": False,
                "verified": True, **meta}
        write_json(tmp / "weights.json", info)
    return out_dir
