"""SAM (Meta) image encoder through segment-anything: vit_b, vit_l, vit_h. Features
are the neck output (256 channels). The absolute positional embedding stays at
the pretraining grid (64 x 64 for 1024 px) and is interpolated to the input grid;
segment-anything's `get_rel_pos` interpolates the relative-position tables of the
global-attention blocks to the grid, and windowed blocks pad to their window."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from semcorr.pipeline.backbones.base import BackboneSpec
from semcorr.pipeline.backbones.vit import StateDict, TransformerBackbone, finish, load_weights, random_init

# Encoder sizes of segment_anything/build_sam.py.
SIZES = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}
COMMON = {
    "img_size": 1024,
    "patch_size": 16,
    "mlp_ratio": 4,
    "qkv_bias": True,
    "use_rel_pos": True,
    "window_size": 14,
    "out_chans": 256,
}
PREFIX = "image_encoder."


class SamBackbone(TransformerBackbone):
    """Tokens are ``[B, H, W, D]`` (SAM's layout); `head` is the conv neck."""

    def all_blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.patch_embed(x)
        pos = resample_abs_pos_embed_nhwc(self.model.pos_embed, tokens.shape[1:3])
        return tokens + pos

    def head(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        return self.model.neck(tokens.permute(0, 3, 1, 2))

    def token_grid(self, tokens: torch.Tensor) -> tuple[int, int]:
        return tokens.shape[1], tokens.shape[2]


def convert_official(state: StateDict) -> StateDict:
    """The full Sam state dict -> the image encoder's keys (prompt encoder and mask decoder dropped)."""
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def build(spec: BackboneSpec) -> SamBackbone:
    """``spec.arch``: keyword overrides of ImageEncoderViT (depth, embed_dim, num_heads,
    global_attn_indexes, patch_size, img_size = pretraining size, window_size, out_chans)."""
    if spec.variant not in SIZES:
        raise ValueError(f"unknown sam variant {spec.variant!r}; expected one of {list(SIZES)}")
    kwargs = {**COMMON, **SIZES[spec.variant], **spec.arch}
    kwargs["global_attn_indexes"] = tuple(kwargs["global_attn_indexes"])
    model = random_init(lambda: ImageEncoderViT(norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs))
    backbone = SamBackbone(spec, model, patch_size=kwargs["patch_size"], feat_dim=kwargs["out_chans"])
    if spec.weights is not None:
        load_weights(backbone, convert_official)
    return finish(backbone)
