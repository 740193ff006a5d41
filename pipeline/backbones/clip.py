"""CLIP (OpenAI) vision tower through open_clip: ViT-B-32, ViT-B-16, ViT-L-14 (any
open_clip model config name). Features are the patch tokens after ``ln_post``
(applied to every token, without the projection); the positional embedding is
interpolated to the input grid, rectangular included."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import _build_vision_tower
from timm.layers import resample_abs_pos_embed
from torch import nn

from semcorr.pipeline.backbones.base import BackboneSpec
from semcorr.pipeline.backbones.vit import StateDict, TransformerBackbone, finish, load_weights, random_init

PREFIX = "visual."


class ClipBackbone(TransformerBackbone):
    """Tokens are ``[B, 1 + h*w, D]`` (class token first)."""

    mean = OPENAI_DATASET_MEAN
    std = OPENAI_DATASET_STD
    num_prefix_tokens = 1

    def all_blocks(self) -> Sequence[nn.Module]:
        return self.model.transformer.resblocks

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        patches = m.conv1(x)  # [B, D, h, w]
        grid_hw = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        pos = resample_abs_pos_embed(
            m.positional_embedding[None], new_size=grid_hw, old_size=m.grid_size, num_prefix_tokens=1
        )
        cls = m.class_embedding.expand(x.shape[0], 1, -1).to(patches.dtype)
        return m.ln_pre(torch.cat([cls, patches], dim=1) + pos)

    def run_blocks(self, tokens: torch.Tensor, blocks: Sequence[nn.Module], grid_hw: tuple[int, int]) -> torch.Tensor:
        if not self.model.transformer.batch_first:
            raise NotImplementedError("open_clip transformer with batch_first=False")
        for block in blocks:
            tokens = block(tokens)
        return tokens

    def head(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        patches = self.model.ln_post(tokens)[:, 1:]
        return patches.unflatten(1, grid_hw).permute(0, 3, 1, 2)


def convert_official(state: StateDict) -> StateDict:
    """OpenAI / open_clip CLIP state dict -> the vision tower's keys (text tower dropped)."""
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def build(spec: BackboneSpec) -> ClipBackbone:
    """``spec.arch``: overrides of open_clip's CLIPVisionCfg (layers, width, head_width,
    patch_size, image_size = pretraining size, ...) plus ``embed_dim`` (projection
    width, kept only so checkpoints load strictly) and ``quick_gelu`` (default: the
    model config's, else True as OpenAI's weights were trained with QuickGELU; false
    for open_clip checkpoints trained with GELU)."""
    config = open_clip.get_model_config(spec.variant)
    if config is None or "vision_cfg" not in config:
        raise ValueError(f"unknown clip variant {spec.variant!r}; expected an open_clip model name such as ViT-B-16")
    arch = dict(spec.arch)
    quick_gelu = arch.pop("quick_gelu", config.get("quick_gelu", True))
    embed_dim = arch.pop("embed_dim", config["embed_dim"])
    vision_cfg = {**config["vision_cfg"], **arch}
    if vision_cfg.get("timm_model_name") or isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ValueError(f"clip variant {spec.variant!r} is not a plain ViT")
    model = random_init(lambda: _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu))
    backbone = ClipBackbone(spec, model, patch_size=model.patch_size[0], feat_dim=model.transformer.width)
    if spec.weights is not None:
        load_weights(backbone, convert_official)
    return finish(backbone)
