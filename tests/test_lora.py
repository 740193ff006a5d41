"""LoRA fine-tuning through peft: only the adapters train, for every family; the merge into a
plain state dict is exact; an adapter the forward bypasses is refused; resume and the
cached prefix hold as for block fine-tuning; the stage's checkpoint loads like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from semcorr.pipeline.backbones import BackboneSpec, build_backbone
from semcorr.pipeline.finetune import (FinetuneError, PrefixSource, add_lora, check_adapters_run, finetune, load_image,
                                      lora_modules, to_pairs, train_step)
from semcorr.pipeline.prefix_cache import build_prefix_cache
from test_finetune import EXTRACT, FAMILIES, _workspace, prepared, tables, tiny  # noqa: F401  (prepared: fixture)
from tiny import TINY_SPECS

# 2 epochs over the 4 trn pairs; an lr large enough that the adapters move the output visibly
LORA = {"mode": "lora", "depth": 1, "epochs": 2, "lr": 2e-2, "batch_size": 2, "cache_dtype": "float32",
        "lora": {"rank": 4, "alpha": 4.0, "targets": ["qkv", "proj"]}}
ADAPTED_WEIGHTS = ("attn.qkv.weight", "attn.proj.weight", "attn.in_proj_weight", "attn.out_proj.weight")


def _inputs(family: str, n: int = 2) -> torch.Tensor:
    size = tiny(family).spec.input_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _adapter_model(family: str, work: Path, conf: dict):
    """A fresh tiny backbone carrying the best epoch's adapters (not merged)."""
    backbone = tiny(family)
    add_lora(backbone, conf["depth"] or len(backbone.blocks()), conf["lora"])
    state = torch.load(work / "state" / "state.pt", weights_only=True)
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        for name, value in state["best"]["tail"].items():
            params[name].copy_(value)
    return backbone


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_adapters_and_its_merge_is_exact(prepared, tmp_path, family):  # noqa: F811
    train, val, images = tables(prepared)
    result = finetune(tiny(family), train, val, images, tmp_path, LORA)
    assert result.trainable and all(".lora_A." in n or ".lora_B." in n for n in result.trainable)
    base = tiny(family).state_dict()
    assert result.state_dict.keys() == base.keys()  # merged: the plain layout, loadable like any checkpoint
    changed = {k for k, v in result.state_dict.items() if not torch.equal(v, base[k])}
    last = lora_modules(tiny(family), 1, ["qkv", "proj"])
    assert changed and all(k.endswith(ADAPTED_WEIGHTS) and any(k.startswith(m) for m in last) for k in changed), changed

    x = _inputs(family)
    adapter = _adapter_model(family, tmp_path, LORA)
    merged = tiny(family)
    merged.load_state_dict(result.state_dict)
    with torch.no_grad():
        with_adapters, plain, untuned = adapter(x), merged(x), tiny(family)(x)
    torch.testing.assert_close(plain, with_adapters, rtol=0, atol=1e-5)
    assert (with_adapters - untuned).abs().max() > 1e-3  # the adapters did change the features


def test_all_blocks_and_targets(prepared, tmp_path):  # noqa: F811
    clip = tiny("clip")
    assert lora_modules(clip, 2, ["qkv", "proj"]) == [f"model.transformer.resblocks.{i}.attn" for i in (0, 1)]
    with pytest.raises(FinetuneError, match=r"peft adapts \['proj', 'qkv'\] together"):
        lora_modules(clip, 1, ["qkv"])
    assert lora_modules(tiny("sam"), 1, ["qkv"]) == ["model.blocks.1.attn.qkv"]
    with pytest.raises(FinetuneError, match="subset"):
        lora_modules(tiny("sam"), 1, ["mlp"])
    with pytest.raises(FinetuneError, match="daisy"):
        lora_modules(build_backbone({"family": "daisy", "variant": "daisy", "input_size": 112, "arch": {"patch": 7}}),
                     1, ["qkv"])
    train, val, images = tables(prepared)
    result = finetune(tiny("dinov2"), train, val, images, tmp_path, {**LORA, "depth": None, "epochs": 1})
    assert result.adapted == ["model.blocks.0.attn.qkv", "model.blocks.0.attn.proj",
                              "model.blocks.1.attn.qkv", "model.blocks.1.attn.proj"]
    assert {n.split(".attn.")[0] for n in result.trainable} == {"model.blocks.0", "model.blocks.1"}


def test_an_adapter_the_forward_bypasses_is_refused():
    """timm's Eva (DINOv3) adds its q/v biases through F.linear on qkv.weight unless
    qkv_bias_separate: add_lora switches that on, and the check catches a bypass."""
    backbone = tiny("dinov3")
    add_lora(backbone, 1, {"rank": 4, "alpha": 4.0, "targets": ["qkv"]})
    tokens = backbone.forward_prefix(_inputs("dinov3", 1), 1)
    assert check_adapters_run(backbone, 1, tokens) == ["model.blocks.1.attn.qkv"]
    backbone.model.blocks[1].attn.qkv_bias_separate = False
    with pytest.raises(FinetuneError, match="never calls the LoRA layers"):
        check_adapters_run(backbone, 1, tokens)


def _lora_step(prepared: Path, family: str, cached: bool, tmp_path: Path) -> tuple[float, dict]:  # noqa: F811
    """(loss, adapters) after one SGD step with LoRA on the last block, from cached prefix
    tokens or from the images (SGD: Adam's first step would amplify rounding noise)."""
    train, _, images = tables(prepared)
    backbone = tiny(family)
    source = PrefixSource(backbone, 1, images, torch.device("cpu"))
    pairs = to_pairs(train)[:2]
    if cached:
        entries = sorted({(i, f) for p in pairs for i in (p.source_id, p.target_id) for f in (False, True)})
        cache = build_prefix_cache(tmp_path / f"{family}.zarr", backbone, 1, entries, source.image, {}, {"dtype": "float32"})
        source = PrefixSource(backbone, 1, images, torch.device("cpu"), cache)
    add_lora(backbone, 1, LORA["lora"])
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if ".lora_B." in name:  # B = 0 would leave A's first gradient exactly 0
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    adapters = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(adapters.values()), lr=0.1)
    transforms = {r.image_id: backbone.transform((r.height, r.width)) for r in images.itertuples()}
    widths = dict(zip(images.image_id, images.width))
    conf = {"temperature": 0.03, "kernel_size": 7, "sigma": 1.5}
    loss = train_step(backbone, source, pairs, [True, False], transforms, widths, optimizer, conf)
    return loss, {n: p.detach().clone() for n, p in adapters.items()}


@pytest.mark.parametrize("family", ["dinov2", "sam"])
def test_lora_step_from_cached_prefix_equals_step_from_images(prepared, tmp_path, family):  # noqa: F811
    loss, from_images = _lora_step(prepared, family, False, tmp_path)
    cached_loss, from_cache = _lora_step(prepared, family, True, tmp_path)
    assert cached_loss == pytest.approx(loss, rel=1e-5) and from_images.keys() == from_cache.keys()
    for name, value in from_images.items():
        torch.testing.assert_close(from_cache[name], value, rtol=1e-5, atol=1e-6)


def test_lora_resumes_and_a_finished_run_is_merged_again(prepared, tmp_path):  # noqa: F811
    train, val, images = tables(prepared)
    reference = finetune(tiny("sam"), train, val, images, tmp_path / "ref", LORA)
    same = finetune(tiny("sam"), train, val, images, tmp_path / "same", LORA)
    assert all(torch.equal(v, same.state_dict[k]) for k, v in reference.state_dict.items())  # seeded adapters
    def kill_after_first(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    work = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny("sam"), train, val, images, work, LORA, on_epoch_end=kill_after_first)
    epochs = []
    resumed = finetune(tiny("sam"), train, val, images, work, LORA, on_epoch_end=epochs.append)
    assert epochs == [2]
    assert all(torch.equal(v, resumed.state_dict[k]) for k, v in reference.state_dict.items())
    again = finetune(tiny("sam"), train, val, images, work, LORA, on_epoch_end=epochs.append)  # finished: merged again
    assert epochs == [2] and all(torch.equal(v, again.state_dict[k]) for k, v in reference.state_dict.items())


def test_stage_writes_a_plain_checkpoint_that_extract_loads(prepared, tmp_path):  # noqa: F811
    from semcorr.pipeline.store import open_store
    from semcorr.stages import extract
    from semcorr.stages import finetune as finetune_stage

    model, ft = _workspace(prepared, tmp_path, "clip")
    lora = {"alpha": 8.0, "targets": ["qkv", "proj"], "depth": None}
    out = finetune_stage.main_lora("tiny", 2, model, {**ft, "lr": 2e-2}, lora, data_root=tmp_path)
    assert out == tmp_path / "weights" / "tiny_lora2"
    info = json.loads((out / "weights.json").read_text())
    assert info["mode"] == "lora" and info["lora"] == {"rank": 2, "alpha": 8.0, "targets": ["qkv", "proj"]}
    assert info["adapted_modules"] == [f"model.transformer.resblocks.{i}.attn" for i in (0, 1)]
    assert all(".lora_" in n for n in info["trained_parameters"])
    curve = pd.read_csv(tmp_path / "finetune" / "tiny_lora2" / "state" / "curve.csv")
    assert curve.epoch.tolist() == [0, 1]

    # loaded through build_backbone (sha256-checked, strict keys), as `extract --tuned` loads any checkpoint
    spec = BackboneSpec(**{**TINY_SPECS["clip"], "random_init": False, "weights": str(out / "model.pth"),
                           "sha256": info["sha256"]})
    tuned = build_backbone(spec)
    state = torch.load(out / "model.pth", weights_only=True)
    assert state.keys() == tuned.state_dict().keys() and not any("lora" in k for k in state)
    store = open_store(extract.main("synthetic", "tiny", model, EXTRACT, data_root=tmp_path, progress=False))
    assert store.attrs["variant"] == "tiny"  # the base store, for comparison below
    image = store.image_ids[0]
    path = pd.read_parquet(prepared / "images.parquet").set_index("image_id").loc[image, "path"]
    x, tf = tuned.preprocess(load_image(path))
    with torch.no_grad():
        expected = tuned(x[None])[0, :, : tf.grid_h, : tf.grid_w]
    assert (expected - store.features(image)).abs().max() > 1e-3  # tuned features differ from the base store's
