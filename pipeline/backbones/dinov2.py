"""DINOv2 (Meta) through timm's VisionTransformer: vits14, vitb14, vitl14, vitg14 and
their 4-register variants (``vitb14_reg4``, ...). Positional embeddings stay at the
pretraining grid (518 px) and are interpolated to the input grid on the fly."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from semcorr.pipeline.backbones.base import BackboneSpec
from semcorr.pipeline.backbones.vit import StateDict, TransformerBackbone, finish, load_weights, random_init

SIZES = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}
PRETRAIN_SIZE = 518  # Meta's pos_embed grid: 37 x 37 patches of 14 px

# A tiny DINOv2-architecture ViT for the offline demo (random init, trains on CPU):
# use with family dinov2, variant vits14, random_init true, input_size 112.
# init_values 1: random blocks with DINO's layer-scale init (1e-5) would be ~identity.
DEMO_ARCH = {"depth": 4, "embed_dim": 96, "num_heads": 3, "patch_size": 8, "img_size": 112, "init_values": 1.0}


class TimmViTBackbone(TransformerBackbone):
    """A timm ViT (``[B, T, D]`` tokens, prefix tokens first) with dynamic input size."""

    def all_blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def head(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        patches = self.model.norm(tokens)[:, self.num_prefix_tokens :]
        return patches.unflatten(1, grid_hw).permute(0, 3, 1, 2)


def timm_name(variant: str) -> str:
    size, _, extra = variant.partition("_")
    if size not in SIZES or extra not in ("", "reg4"):
        names = [*SIZES, *(f"{s}_reg4" for s in SIZES)]
        raise ValueError(f"unknown dinov2 variant {variant!r}; expected one of {names}")
    return f"vit_{SIZES[size]}_patch14{'_reg4' if extra else ''}_dinov2"


def convert_official(state: StateDict, model: nn.Module) -> StateDict:
    """Meta's ``dinov2_*_pretrain.pth`` keys -> timm keys (drops ``mask_token``,
    folds registers into timm's layout, renames SwiGLU ``w12``/``w3``)."""
    return checkpoint_filter_fn(dict(state), model)


def build(spec: BackboneSpec) -> TimmViTBackbone:
    """``spec.arch``: keyword overrides of timm's VisionTransformer (depth, embed_dim,
    num_heads, patch_size, img_size = pretraining size of pos_embed, ...)."""
    kwargs = {"img_size": PRETRAIN_SIZE, **spec.arch, "dynamic_img_size": True, "num_classes": 0}
    model = random_init(lambda: timm.create_model(timm_name(spec.variant), pretrained=False, **kwargs))
    backbone = TimmViTBackbone(spec, model, patch_size=model.patch_embed.patch_size[0], feat_dim=model.embed_dim)
    if spec.weights is not None:
        load_weights(backbone, lambda state: convert_official(state, model))
    return finish(backbone)
