"""Backbone families: shapes and crops, the fine-tuning split, official checkpoint
layouts, semcorr state dicts, and DAISY's alignment with the cell convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.feature import daisy

from semcorr.pipeline.backbones import BackboneSpec, build_backbone
from semcorr.pipeline.download import WEIGHTS, Resource
from semcorr.pipeline.weights import WeightsError, read_state_dict, sha256_file
from tiny import TINY_SPECS, write_official_checkpoint

TRANSFORMERS = ["dinov2", "dinov2_reg4", "dinov3", "sam", "clip"]
_built: dict[str, object] = {}


def tiny(name: str, **changes):
    """A tiny backbone (cached when unchanged: building costs time on shared cores)."""
    if changes:
        return build_backbone({**TINY_SPECS[name], **changes})
    if name not in _built:
        _built[name] = build_backbone(TINY_SPECS[name])
    return _built[name]


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, size=(h, w, 3), dtype=np.uint8)


def batch(backbone, images) -> torch.Tensor:
    return torch.stack([backbone.preprocess(image)[0] for image in images])


# -- construction ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_built_frozen_in_eval_mode_with_attributes(name):
    backbone = tiny(name)
    assert not backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())
    s = backbone.spec.input_size
    feats = backbone(batch(backbone, [random_image(40, 50)]))
    assert feats.shape == (1, backbone.feat_dim, s // backbone.patch_size, s // backbone.patch_size)
    assert torch.isfinite(feats).all()
    assert backbone.num_blocks == (0 if name == "daisy" else TINY_SPECS[name]["arch"].get("depth", 2))


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_random_init_is_reproducible(name):
    x = batch(tiny(name), [random_image(40, 50)])
    assert torch.equal(tiny(name)(x), build_backbone(TINY_SPECS[name])(x))


def test_weights_required_unless_random_init():
    spec = {k: v for k, v in TINY_SPECS["dinov2"].items() if k != "random_init"}
    with pytest.raises(ValueError, match="random_init"):
        build_backbone(spec)
    with pytest.raises(ValueError, match="random_init"):
        BackboneSpec(family="sam", variant="vit_b")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"family": "resnet"}, "unknown backbone family"),
        ({"variant": "vitx14"}, "unknown dinov2 variant"),
        ({"variant": "vits14_reg8"}, "unknown dinov2 variant"),
        ({"layer": 3}, "layer must be in 1..2"),
        ({"input_size": 100}, "not a multiple of its patch 14"),
    ],
)
def test_bad_specs_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        build_backbone({**TINY_SPECS["dinov2"], **changes})


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("dinov3", {"variant": "vitb14"}, "unknown dinov3 variant"),
        ("sam", {"variant": "vit_x"}, "unknown sam variant"),
        ("clip", {"variant": "ViT-Q-99"}, "unknown clip variant"),
        ("daisy", {"arch": {"patch": 8}}, "must be odd"),
        ("daisy", {"arch": {"patches": 7}}, "unknown daisy arch keys"),
        ("daisy", {"weights": "daisy.pth", "sha256": "0" * 64}, "weight-free"),
    ],
)
def test_bad_family_specs_refused(name, changes, message):
    with pytest.raises(ValueError, match=message):
        build_backbone({**TINY_SPECS[name], **changes})


# -- features and crops ---------------------------------------------------------------
@pytest.mark.parametrize("resize", ["pad", "squash"])
@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_rectangular_images_crop_to_cells_holding_image(name, resize):
    backbone = tiny(name) if TINY_SPECS[name]["resize"] == resize else tiny(name, resize=resize)
    s, p = backbone.spec.input_size, backbone.patch_size
    for h, w in [(150, 200), (200, 130)]:
        x, transform = backbone.preprocess(random_image(h, w))
        feats = backbone(x[None])
        assert feats.shape[-2:] == (s // p, s // p)
        if resize == "squash":
            rh, rw = s, s
        else:
            rh, rw = round(h * s / max(h, w)), round(w * s / max(h, w))
        gh, gw = math.ceil(rh / p), math.ceil(rw / p)
        assert backbone.grid_hw((h, w)) == (gh, gw) == (transform.grid_h, transform.grid_w)
        assert feats[..., :gh, :gw].shape == (1, backbone.feat_dim, gh, gw)
        # the last kept row/column holds image, everything beyond is padding
        assert x[:, (gh - 1) * p : rh].abs().sum() > 0 and x[:, :, (gw - 1) * p : rw].abs().sum() > 0
        assert x[:, gh * p :].abs().sum() == 0 and x[:, :, gw * p :].abs().sum() == 0


def test_clip_positions_interpolate_to_rectangular_grids():
    backbone = tiny("clip")
    x = torch.randn(1, 3, 48, 80)
    feats = backbone(x)
    assert feats.shape == (1, backbone.feat_dim, 6, 10)
    n = backbone.num_blocks
    assert torch.allclose(backbone.forward_tail(backbone.forward_prefix(x, 1), 1, grid_hw=(6, 10)), feats, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        backbone.forward_tail(backbone.forward_prefix(x, n), n)


# -- agreement with the libraries' own forward passes at the pretraining size ---------
def test_dinov2_matches_timm_forward_features():
    backbone = tiny("dinov2")
    x = torch.randn(2, 3, 56, 56)
    tokens = backbone.model.forward_features(x)[:, backbone.model.num_prefix_tokens :]
    assert torch.allclose(backbone(x), tokens.unflatten(1, (4, 4)).permute(0, 3, 1, 2), atol=1e-5)


def test_dinov3_matches_timm_forward_features():
    backbone = tiny("dinov3")
    x = torch.randn(2, 3, 64, 48)
    tokens = backbone.model.forward_features(x)[:, backbone.model.num_prefix_tokens :]
    assert torch.allclose(backbone(x), tokens.unflatten(1, (4, 3)).permute(0, 3, 1, 2), atol=1e-5)


def test_sam_matches_image_encoder_forward():
    backbone = tiny("sam")
    x = torch.randn(2, 3, 48, 48)  # the encoder's own img_size: no interpolation needed
    assert torch.allclose(backbone(x), backbone.model(x), atol=1e-5)


def test_clip_matches_open_clip_intermediates():
    backbone = tiny("clip")
    x = torch.randn(2, 3, 32, 32)
    out = backbone.model.forward_intermediates(
        x, indices=[backbone.num_blocks - 1], normalize_intermediates=True, intermediates_only=True
    )
    assert torch.allclose(backbone(x), out["image_intermediates"][0], atol=1e-5)


def test_sam_runs_at_sizes_other_than_pretraining():
    """pos_embed (48 px grid) and the global blocks' rel-pos tables are interpolated."""
    backbone = tiny("sam")
    global_block = backbone.model.blocks[1]
    assert global_block.window_size == 0 and global_block.attn.rel_pos_h.shape[0] == 2 * 6 - 1
    for size in (64, 80):
        assert backbone(torch.randn(1, 3, size, size)).shape == (1, 16, size // 8, size // 8)


# -- fine-tuning split ----------------------------------------------------------------
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_tail_of_prefix_equals_forward(name):
    backbone = tiny(name)
    x = batch(backbone, [random_image(60, 90), random_image(90, 60, seed=1)])
    feats = backbone(x)
    for n_tail in range(backbone.num_blocks + 1):
        tokens = backbone.forward_prefix(x, n_tail)
        assert torch.allclose(backbone.forward_tail(tokens, n_tail), feats, atol=1e-5), n_tail
    with pytest.raises(ValueError, match="n_tail"):
        backbone.forward_prefix(x, backbone.num_blocks + 1)


def test_tail_runs_blocks_up_to_layer():
    full, first = tiny("dinov2"), tiny("dinov2", layer=1)
    assert first.num_blocks == 1 and len(first.blocks()) == 1 and len(full.blocks()) == 2
    x = batch(full, [random_image(60, 90)])
    feats = first(x)
    assert torch.allclose(first.forward_tail(first.forward_prefix(x, 1), 1), feats, atol=1e-5)
    assert torch.allclose(first.forward_tail(first.forward_prefix(x, 0), 0), feats, atol=1e-5)


def test_daisy_has_no_blocks_to_tune():
    with pytest.raises(NotImplementedError, match="no transformer blocks"):
        tiny("daisy").blocks()


# -- layers ---------------------------------------------------------------------------
def test_dinov2_intermediate_layer_is_block_output_then_final_norm():
    full, first = tiny("dinov2"), tiny("dinov2", layer=1)
    x = batch(full, [random_image(60, 90)])
    after_block_1 = full.forward_prefix(x, n_tail=1)  # tokens entering block 2
    patches = full.model.norm(after_block_1)[:, full.model.num_prefix_tokens :]
    expected = patches.unflatten(1, (8, 8)).permute(0, 3, 1, 2)
    assert torch.allclose(first(x), expected, atol=1e-5)
    assert not torch.allclose(first(x), full(x), atol=1e-3)


# -- checkpoints ----------------------------------------------------------------------
def expected_tensors(name: str, official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the library model must hold after loading an official checkpoint, derived
    from the published conversions (timm for DINO, key prefixes for SAM and CLIP)."""
    if name == "dinov2":
        return {k: v for k, v in official.items() if k != "mask_token"}
    if name == "dinov2_reg4":
        out = {k: v for k, v in official.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
        pos = official["pos_embed"]
        return out | {
            "reg_token": official["register_tokens"],
            "cls_token": official["cls_token"] + pos[:, :1],  # registers sit outside the positions
            "pos_embed": pos[:, 1:],
        }
    if name == "dinov3":
        out = {}
        for k, v in official.items():
            if k in ("mask_token", "rope_embed.periods") or k.endswith("bias_mask"):
                continue
            if k.endswith("qkv.bias"):
                q, _, v_ = v.chunk(3)
                out[k.replace("qkv.bias", "q_bias")] = q
                out[k.replace("qkv.bias", "v_bias")] = v_
                continue
            k = k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2").replace("storage_tokens", "reg_token")
            out[k] = v
        return out
    prefix = {"sam": "image_encoder.", "clip": "visual."}[name]
    return {k[len(prefix) :]: v for k, v in official.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_official_checkpoint_loads_strictly_with_its_tensors(name, tmp_path):
    path = tmp_path / f"{name}.pth"
    sha = write_official_checkpoint(name, path)
    backbone = build_backbone({**TINY_SPECS[name], "weights": str(path), "sha256": sha, "random_init": False})
    expected = expected_tensors(name, read_state_dict(path))
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    x = batch(backbone, [random_image(60, 90)])
    assert not torch.allclose(backbone(x), tiny(name)(x))


def test_openai_torchscript_clip_loads(monkeypatch, tmp_path):
    """TorchScript runs code on load: this file loads only because its sha256 is in the registry."""
    path = tmp_path / "ViT-B-16.pt"
    sha = write_official_checkpoint("clip", path, torchscript=True)
    monkeypatch.setitem(WEIGHTS, "clip_vitb16", Resource(None, path.name, sha))
    backbone = build_backbone({**TINY_SPECS["clip"], "weights": str(path), "sha256": sha, "random_init": False})
    assert torch.equal(backbone.model.conv1.weight, read_state_dict(path)["visual.conv1.weight"])


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("dinov2", lambda s: s.pop("blocks.1.ls2.gamma"), r"missing \(1\): blocks.1.ls2.gamma"),
        ("dinov2", lambda s: s.update({"blocks.0.attn.extra": torch.ones(1)}), r"unexpected \(1\): blocks.0.attn.extra"),
        ("sam", lambda s: s.update({"image_encoder.pos_embed": torch.ones(1, 5, 5, 32)}), "shape mismatch"),
        ("clip", lambda s: s.pop("visual.ln_post.bias"), "missing"),
        ("dinov3", lambda s: s.pop("blocks.0.attn.qkv.weight"), "missing"),
    ],
)
def test_checkpoint_that_does_not_fit_is_refused_naming_the_file(name, edit, message, tmp_path):
    path = tmp_path / f"{name}.pth"
    write_official_checkpoint(name, path)
    state = read_state_dict(path)
    edit(state)
    torch.save(state, path)
    spec = {**TINY_SPECS[name], "weights": str(path), "sha256": sha256_file(path), "random_init": False}
    with pytest.raises(WeightsError, match=message) as err:
        build_backbone(spec)
    assert str(path) in str(err.value)


def test_checkpoint_with_wrong_sha_is_refused(tmp_path):
    path = tmp_path / "dinov2.pth"
    write_official_checkpoint("dinov2", path)
    spec = {**TINY_SPECS["dinov2"], "weights": str(path), "sha256": "f" * 64, "random_init": False}
    with pytest.raises(WeightsError, match="f" * 64) as err:
        build_backbone(spec)
    assert str(path) in str(err.value) and sha256_file(path) in str(err.value)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_semcorr_state_dict_loads_through_build_backbone(name, tmp_path):
    """What fine-tuning saves (`backbone.state_dict()`) loads back through the same call."""
    tuned = tiny(name, layer=1)
    generator = torch.Generator().manual_seed(1)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in tuned.state_dict().items()}
    path = tmp_path / "model.pth"
    torch.save(state, path)
    spec = {**TINY_SPECS[name], "layer": 1, "weights": str(path), "sha256": sha256_file(path), "random_init": False}
    loaded = build_backbone(spec)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    del state[next(iter(state))]
    torch.save(state, path)
    with pytest.raises(WeightsError, match="missing"):
        build_backbone({**spec, "sha256": sha256_file(path)})


# -- DAISY ----------------------------------------------------------------------------
def test_daisy_descriptors_sit_at_cell_centres():
    """Each cell's descriptor is DAISY sampled at the pixel that pipeline.coords calls
    the cell centre (away from the border, where padding cannot matter)."""
    backbone = tiny("daisy", resize="squash")
    conf, s = backbone.conf, backbone.spec.input_size
    grey = np.random.default_rng(0).integers(0, 256, size=(s, s), dtype=np.uint8)
    x, transform = backbone.preprocess(np.repeat(grey[..., None], 3, axis=2))
    feats = backbone(x[None])[0]
    kwargs = {k: conf[k] for k in ("radius", "rings", "histograms", "orientations")}
    dense = torch.from_numpy(daisy(x[0].numpy(), step=1, normalization="off", **kwargs))  # [s-2r, s-2r, C]
    dense = torch.nn.functional.normalize(dense, dim=-1)
    r, margin = conf["radius"], 3 * conf["radius"] + 1  # ring radius + 4 sigma of the widest smoothing
    checked = 0
    for i in range(transform.grid_h):
        for j in range(transform.grid_w):
            cx, cy = transform.cells_to_pixels(np.array([j, i], dtype=float))
            assert abs(cx - round(cx)) < 1e-9 and abs(cy - round(cy)) < 1e-9  # odd patch: centres are pixels
            cx, cy = int(round(cx)), int(round(cy))
            if not (margin <= cx < s - margin and margin <= cy < s - margin):
                continue
            assert (feats[:, i, j] - dense[cy - r, cx - r]).abs().max() < 1e-5
            for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):  # one pixel off is told apart
                assert (feats[:, i, j] - dense[cy - r + dy, cx - r + dx]).abs().max() > 1e-3
            checked += 1
    assert checked >= 16


def test_daisy_bright_dot_changes_its_own_cell_most():
    backbone = tiny("daisy", resize="squash")
    s = backbone.spec.input_size
    blank = np.full((s, s, 3), 100, dtype=np.uint8)
    blank[:, : s // 2] = 60  # some structure so descriptors are not all zero
    dotted = blank.copy()
    i, j = 8, 5
    transform = backbone.transform((s, s))
    cx, cy = (int(round(v)) for v in transform.cells_to_pixels(np.array([j, i], dtype=float)))
    dotted[cy - 1 : cy + 2, cx - 1 : cx + 2] = 255
    f0, f1 = backbone(batch(backbone, [blank, dotted]))
    centre_bins = slice(0, backbone.conf["orientations"])  # the centre histogram
    change = (f1[centre_bins] - f0[centre_bins]).norm(dim=0)
    assert tuple(np.unravel_index(int(change.argmax()), change.shape)) == (i, j)
