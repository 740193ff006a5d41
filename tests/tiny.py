"""Tiny backbones for tests: one small random-init spec per family (`TINY_SPECS`,
dicts of BackboneSpec fields) and `write_official_checkpoint`, which writes random
weights in each family's official checkpoint key layout, at tiny sizes.

The official layouts are written out by hand here (not derived from the models),
so loading them tests the conversion for real.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from semcorr.pipeline.weights import sha256_file

_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
_LAYER_SCALE = {"init_values": 1.0}  # DINO's 1e-5 would leave random blocks ~identity

TINY_SPECS: dict[str, dict] = {
    "dinov2": {  # pos_embed for 56 px (4 x 4), run at 112 px (8 x 8): interpolated
        "family": "dinov2", "variant": "vits14", "random_init": True, "input_size": 112, "resize": "pad",
        "arch": {**_VIT, **_LAYER_SCALE, "img_size": 56},
    },
    "dinov2_reg4": {
        "family": "dinov2", "variant": "vits14_reg4", "random_init": True, "input_size": 84, "resize": "squash",
        "arch": {**_VIT, **_LAYER_SCALE, "img_size": 56},
    },
    "dinov3": {
        "family": "dinov3", "variant": "vits16", "random_init": True, "input_size": 96, "resize": "pad",
        "arch": {**_VIT, **_LAYER_SCALE},
    },
    "sam": {  # pos_embed and global rel-pos for 48 px (6 x 6), run at 64 px; window 3 pads 8 -> 9
        "family": "sam", "variant": "vit_b", "random_init": True, "input_size": 64, "resize": "squash",
        "arch": {**_VIT, "patch_size": 8, "img_size": 48, "global_attn_indexes": (1,), "window_size": 3, "out_chans": 16},
    },
    "clip": {  # positional embedding for 32 px (4 x 4), run at 64 px
        "family": "clip", "variant": "ViT-B-16", "random_init": True, "input_size": 64, "resize": "pad",
        "arch": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32, "embed_dim": 16},
    },
    "daisy": {
        "family": "daisy", "variant": "daisy", "input_size": 112, "resize": "pad",
        "arch": {"patch": 7, "radius": 10, "rings": 2, "histograms": 6, "orientations": 8},
    },
}


def write_official_checkpoint(
    family: str, path: Path, arch: dict | None = None, seed: int = 0, torchscript: bool = False
) -> str:
    """Write random tensors in the official checkpoint layout of ``family`` (a
    `TINY_SPECS` key) with the sizes of ``arch`` (default: the tiny spec's) to ``path``;
    return the file's sha256. ``torchscript``: write a TorchScript archive holding the
    tensors, as OpenAI ships CLIP, instead of a plain state dict."""
    arch = dict(TINY_SPECS[family]["arch"] if arch is None else arch)
    shapes = LAYOUTS[family](arch)
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    for k in shapes:
        if k.endswith("bias_mask"):  # DINOv3: k-bias switched off
            d = state[k].shape[0] // 3
            state[k] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if torchscript:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(_module_tree(state)).save(str(path))
    else:
        torch.save(state, path)
    return sha256_file(path)


def _module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """Modules nested along the dotted keys, holding the tensors as parameters."""
    root = nn.Module()
    for key, value in state.items():
        *names, leaf = key.split(".")
        module = root
        for name in names:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    return root


def _dinov2(arch: dict, registers: int = 0) -> dict[str, tuple]:
    """Meta's ``dinov2_vit*14[_reg4]_pretrain.pth``."""
    d, p = arch["embed_dim"], arch.get("patch_size", 14)
    grid = arch.get("img_size", 518) // p
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, d)
    return shapes | _meta_blocks(arch["depth"], d)


def _dinov3(arch: dict) -> dict[str, tuple]:
    """Meta's DINOv3 ``dinov3_vit*16_pretrain_*.pth`` (4 storage tokens, RoPE periods,
    qkv bias with a mask that zeroes the k part)."""
    d, p, heads = arch["embed_dim"], arch.get("patch_size", 16), arch["num_heads"]
    shapes = {
        "cls_token": (1, 1, d),
        "storage_tokens": (1, 4, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "rope_embed.periods": (d // heads // 4,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    return shapes | _meta_blocks(arch["depth"], d, qkv_bias_mask=True)


def _meta_blocks(depth: int, d: int, qkv_bias_mask: bool = False) -> dict[str, tuple]:
    """Transformer blocks in Meta's DINOv2 / DINOv3 key layout (layer scale, MLP ratio 4)."""
    shapes = {}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "ls2.gamma": (d,),
        }  # fmt: skip
        if qkv_bias_mask:  # DINOv3 zeroes the k bias through a stored mask
            shapes[b + "attn.qkv.bias_mask"] = (3 * d,)
    return shapes


def _sam(arch: dict) -> dict[str, tuple]:
    """Meta's ``sam_vit_*.pth``: the whole Sam model; only ``image_encoder.*`` is used,
    a few prompt-encoder / mask-decoder keys prove the rest is ignored."""
    d, p, heads = arch["embed_dim"], arch.get("patch_size", 16), arch["num_heads"]
    grid, window, c = arch.get("img_size", 1024) // p, arch.get("window_size", 14), arch.get("out_chans", 256)
    e = "image_encoder."
    shapes = {
        e + "pos_embed": (1, grid, grid, d),
        e + "patch_embed.proj.weight": (d, 3, p, p),
        e + "patch_embed.proj.bias": (d,),
        e + "neck.0.weight": (c, d, 1, 1),
        e + "neck.1.weight": (c,), e + "neck.1.bias": (c,),
        e + "neck.2.weight": (c, c, 3, 3),
        e + "neck.3.weight": (c,), e + "neck.3.bias": (c,),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "prompt_encoder.no_mask_embed.weight": (1, 256),
        "mask_decoder.iou_token.weight": (1, 256),
    }  # fmt: skip
    for i in range(arch["depth"]):
        b = f"{e}blocks.{i}."
        rel = 2 * (grid if i in tuple(arch.get("global_attn_indexes", ())) else window) - 1
        shapes |= {
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "attn.rel_pos_h": (rel, d // heads), b + "attn.rel_pos_w": (rel, d // heads),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.lin1.weight": (4 * d, d), b + "mlp.lin1.bias": (4 * d,),
            b + "mlp.lin2.weight": (d, 4 * d), b + "mlp.lin2.bias": (d,),
        }  # fmt: skip
    return shapes


def _clip(arch: dict) -> dict[str, tuple]:
    """OpenAI CLIP (the state dict of the ``.pt`` archive; open_clip's ``.bin`` files
    use the same keys): ``visual.*`` plus the text tower."""
    w, p, e = arch["width"], arch["patch_size"], arch["embed_dim"]
    grid, text = arch["image_size"] // p, 24
    shapes = {
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (grid * grid + 1, w),
        "visual.proj": (w, e),
        "visual.conv1.weight": (w, 3, p, p),
        "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
        "visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,),
        "positional_embedding": (77, text),
        "text_projection": (text, e),
        "logit_scale": (),
        "token_embedding.weight": (100, text),
        "ln_final.weight": (text,), "ln_final.bias": (text,),
        "transformer.resblocks.0.attn.in_proj_weight": (3 * text, text),
    }  # fmt: skip
    for i in range(arch["layers"]):
        b = f"visual.transformer.resblocks.{i}."
        shapes |= {
            b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_1.weight": (w,), b + "ln_1.bias": (w,),
            b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
            b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
        }  # fmt: skip
    return shapes


LAYOUTS = {
    "dinov2": _dinov2,
    "dinov2_reg4": lambda arch: _dinov2(arch, registers=4),
    "dinov3": _dinov3,
    "sam": _sam,
    "clip": _clip,
}
