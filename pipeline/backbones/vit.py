"""What the transformer families share: the embed -> blocks -> head split used by
`forward`, `forward_prefix` and `forward_tail`, and strict checkpoint loading."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from semcorr.pipeline.backbones.base import Backbone, BackboneSpec
from semcorr.pipeline.weights import WeightsError, load_verified

StateDict = dict[str, torch.Tensor]


class TransformerBackbone(Backbone):
    """A ViT seen as ``embed`` (patchify + positions) -> ``blocks`` -> ``head`` (final
    norm/neck + reshape to a grid). Families wrap a library model in ``self.model``
    and implement `embed`, `head`, `all_blocks` (and `run_blocks` when blocks need
    extra inputs, e.g. rotary embeddings)."""

    model: nn.Module
    num_prefix_tokens: int = 0  # extra tokens (class, registers) before the patch tokens

    def __init__(self, spec: BackboneSpec, model: nn.Module, patch_size: int, feat_dim: int):
        super().__init__(spec)
        self.model = model
        self.patch_size = patch_size
        self.feat_dim = feat_dim
        depth = len(self.all_blocks())
        if spec.layer is not None and not 1 <= spec.layer <= depth:
            raise ValueError(f"layer must be in 1..{depth} for {spec.family}/{spec.variant}, got {spec.layer}")
        if spec.input_size % patch_size:
            raise ValueError(
                f"input_size {spec.input_size} of {spec.family}/{spec.variant} is not a multiple of its patch {patch_size}"
            )
        self.num_blocks = spec.layer or depth  # blocks actually run

    # -- family hooks -------------------------------------------------------------
    def all_blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, 3, H, W]`` -> tokens entering block 0 (family layout)."""
        raise NotImplementedError

    def run_blocks(self, tokens: torch.Tensor, blocks: Sequence[nn.Module], grid_hw: tuple[int, int]) -> torch.Tensor:
        for block in blocks:
            tokens = block(tokens)
        return tokens

    def head(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Tokens leaving the last block run -> ``[B, C, h, w]``."""
        raise NotImplementedError

    def token_grid(self, tokens: torch.Tensor) -> tuple[int, int]:
        """Patch grid of ``[B, T, D]`` tokens with `num_prefix_tokens` leading extra
        tokens, assuming a square grid (network inputs are ``S x S``)."""
        n = tokens.shape[1] - self.num_prefix_tokens
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patch tokens do not form a square grid; pass grid_hw to forward_tail")
        return side, side

    # -- protocol -----------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        """The `num_blocks` blocks that run (those up to `spec.layer`)."""
        return nn.ModuleList(list(self.all_blocks())[: self.num_blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, 3, H, W]`` (H, W multiples of the patch) -> ``[B, C, H/p, W/p]``."""
        grid_hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.run_blocks(self.embed(x), self.blocks(), grid_hw)
        return self.head(tokens, grid_hw)

    def forward_prefix(self, x: torch.Tensor, n_tail: int) -> torch.Tensor:
        """``x: [B, 3, H, W]`` -> tokens entering block ``num_blocks - n_tail``."""
        split = self._split(n_tail)
        grid_hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return self.run_blocks(self.embed(x), self.blocks()[:split], grid_hw)

    def forward_tail(self, tokens: torch.Tensor, n_tail: int, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens from `forward_prefix` -> ``[B, C, h, w]``; ``grid_hw`` only for non-square inputs."""
        split = self._split(n_tail)
        grid_hw = grid_hw or self.token_grid(tokens)
        tokens = self.run_blocks(tokens, self.blocks()[split:], grid_hw)
        return self.head(tokens, grid_hw)

    def _split(self, n_tail: int) -> int:
        if not 0 <= n_tail <= self.num_blocks:
            raise ValueError(f"n_tail must be in 0..{self.num_blocks}, got {n_tail}")
        return self.num_blocks - n_tail


def random_init(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a model with a fixed seed (random-init backbones give the same
    features on every run) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def check_and_load(target: nn.Module, state: StateDict, path: str | Path, what: str) -> None:
    """Strictly load ``state`` into ``target``: any missing, unexpected or misshaped
    key is a `WeightsError` naming the file."""
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state) if state[k].shape != own[k].shape
    )
    if missing or unexpected or misshaped:
        problems = [
            f"{name} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshaped))
            if keys
        ]
        raise WeightsError(f"checkpoint {path} does not fit {what}: " + "; ".join(problems))
    target.load_state_dict(state, strict=True)


def load_weights(backbone: TransformerBackbone, convert: Callable[[StateDict], StateDict]) -> None:
    """Verify and load ``backbone.spec.weights``: either a semcorr state dict
    (`backbone.state_dict()` keys, e.g. from fine-tuning) or an official checkpoint,
    which ``convert`` maps to ``backbone.model``'s keys."""
    spec = backbone.spec
    state = load_verified(spec.weights, spec.sha256)
    what = f"{spec.family}/{spec.variant} (arch {spec.arch})"
    if set(state) & set(backbone.state_dict()):
        check_and_load(backbone, state, spec.weights, what)
    else:
        check_and_load(backbone.model, convert(state), spec.weights, what)


def finish(backbone: Backbone) -> Backbone:
    """Eval mode, frozen: fine-tuning unfreezes what it trains."""
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone
