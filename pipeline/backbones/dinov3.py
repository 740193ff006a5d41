"""DINOv3 (Meta) through timm's Eva: vits16, vitb16, vitl16. Rotary position
embeddings are built for each input grid, so any input size works."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.models.eva import checkpoint_filter_fn
from torch import nn

from semcorr.pipeline.backbones.base import BackboneSpec
from semcorr.pipeline.backbones.dinov2 import TimmViTBackbone
from semcorr.pipeline.backbones.vit import StateDict, finish, load_weights, random_init

# The *_qkvb models keep the q/v biases of Meta's checkpoints (k bias is masked to 0).
TIMM_NAMES = {
    "vits16": "vit_small_patch16_dinov3_qkvb",
    "vitb16": "vit_base_patch16_dinov3_qkvb",
    "vitl16": "vit_large_patch16_dinov3_qkvb",
}


class DinoV3Backbone(TimmViTBackbone):
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        tokens, _ = m._pos_embed(m.patch_embed(x))
        return m.norm_pre(tokens)

    def run_blocks(self, tokens: torch.Tensor, blocks: Sequence[nn.Module], grid_hw: tuple[int, int]) -> torch.Tensor:
        rope = self.model.rope.get_embed(shape=list(grid_hw))
        for block in blocks:
            tokens = block(tokens, rope=rope)
        return tokens


def convert_official(state: StateDict, model: nn.Module) -> StateDict:
    """Meta's DINOv3 ``.pth`` keys -> timm Eva keys (drops ``mask_token``, rope
    ``periods`` and ``bias_mask``; splits the qkv bias into q/v biases)."""
    return checkpoint_filter_fn(dict(state), model)


def build(spec: BackboneSpec) -> DinoV3Backbone:
    """``spec.arch``: keyword overrides of timm's Eva (depth, embed_dim, num_heads, patch_size, ...)."""
    if spec.variant not in TIMM_NAMES:
        raise ValueError(f"unknown dinov3 variant {spec.variant!r}; expected one of {list(TIMM_NAMES)}")
    kwargs = {**spec.arch, "dynamic_img_size": True, "num_classes": 0}
    model = random_init(lambda: timm.create_model(TIMM_NAMES[spec.variant], pretrained=False, **kwargs))
    backbone = DinoV3Backbone(spec, model, patch_size=model.patch_embed.patch_size[0], feat_dim=model.embed_dim)
    if spec.weights is not None:
        load_weights(backbone, lambda state: convert_official(state, model))
    return finish(backbone)
