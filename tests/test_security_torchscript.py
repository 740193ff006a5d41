"""A TorchScript checkpoint carries code that runs on load: semcorr runs it only for an
official file whose sha256 is in the weights registry. Everything else is read weights-only."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from semcorr.pipeline import download as dl
from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.download import DownloadError, Resource
from semcorr.pipeline.weights import WeightsError, load_verified, read_state_dict, sha256_file
from tiny import LAYOUTS, TINY_SPECS, _module_tree, write_official_checkpoint


class Hook(nn.Module):
    """No parameters; its TorchScript ``__setstate__`` creates and maps the file ``target``."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.mapped = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(state[0], shared=True, size=8)


def write_trojan(path: Path, sentinel: Path) -> Path:
    """A TorchScript archive holding exactly the tiny DINOv3 checkpoint's tensors, plus a
    hook that writes ``sentinel`` when the archive is loaded."""
    shapes = LAYOUTS["dinov3"](TINY_SPECS["dinov3"]["arch"])
    generator = torch.Generator().manual_seed(0)
    root = _module_tree({k: torch.randn(shape, generator=generator) for k, shape in shapes.items()})
    root.add_module("hook", Hook(str(sentinel)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(root).save(str(path))
    return path


@pytest.fixture
def trojan(tmp_path) -> tuple[Path, Path]:
    """(archive, sentinel): the archive is shown to be live, then the sentinel is reset."""
    sentinel = tmp_path / "sentinel"
    path = write_trojan(tmp_path / "dinov3_vits16.pth", sentinel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.jit.load(str(path)).state_dict()  # what semcorr used to do
    assert sentinel.is_file(), "the payload did not run: the test would prove nothing"
    assert set(state) == set(LAYOUTS["dinov3"](TINY_SPECS["dinov3"]["arch"]))
    sentinel.unlink()
    return path, sentinel


def assert_refused(err: Exception, path: Path) -> None:
    message = str(err)
    assert str(path) in message and "TorchScript" in message, message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message, message


def test_read_state_dict_refuses_an_unregistered_torchscript(trojan):
    path, sentinel = trojan
    with pytest.raises(WeightsError) as err:
        read_state_dict(path)
    assert_refused(err.value, path)
    with pytest.raises(WeightsError) as err:
        load_verified(path, sha256_file(path))  # the right hash is identity, not trust
    assert_refused(err.value, path)
    assert not sentinel.exists()


def test_download_weights_refuses_it_as_a_local_dinov3_source_even_pinned(trojan, tmp_path):
    path, sentinel = trojan
    out = tmp_path / "weights" / "dinov3_vits16"
    for pin in (None, sha256_file(path)):
        with pytest.raises(DownloadError) as err:
            dl.download_weights("dinov3_vits16", out, "dinov3_vits16", source=path, sha256=pin)
        assert_refused(err.value, path)
        assert not out.exists() and not sentinel.exists()


def test_a_backbone_built_from_it_is_refused(trojan):
    """A weights folder written before this check (weights.json pointing at the file)
    must not run the payload either."""
    path, sentinel = trojan
    spec = {**TINY_SPECS["dinov3"], "weights": str(path), "sha256": sha256_file(path), "random_init": False}
    with pytest.raises(WeightsError) as err:
        build_backbone(spec)
    assert_refused(err.value, path)
    assert not sentinel.exists()


def test_a_registered_torchscript_file_loads(monkeypatch, tmp_path):
    """The one way TorchScript loads: its sha256 is an official file's, in the registry."""
    path = tmp_path / "ViT-B-16.pt"
    sha = write_official_checkpoint("clip", path, torchscript=True)
    with pytest.raises(WeightsError, match="TorchScript"):
        read_state_dict(path)
    monkeypatch.setitem(dl.WEIGHTS, "clip_tiny", Resource(None, path.name, sha))
    assert "visual.conv1.weight" in load_verified(path, sha)
    out = dl.download_weights("clip_tiny", tmp_path / "weights" / "clip_tiny", "clip_tiny", source=path)
    record = json.loads((out / "weights.json").read_text())
    assert record["sha256"] == sha and record["verified"] is True and record["verified_by"] == "registry"


def test_weights_only_refusal_does_not_repeat_torch_advice(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(WeightsError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert str(path) in message and "weights only" in message
    assert re.search(r"Python object (builtins\.)?print\b", message), message
    assert "weights_only=False" not in message and "False" not in message, message


def test_safetensors_checkpoint_is_read_whatever_its_name(tmp_path):
    """A local ``.safetensors`` source is stored under the official ``.pth`` name: the format
    is recognised by its header, not by the suffix."""
    from safetensors.torch import save_file

    shapes = LAYOUTS["dinov3"](TINY_SPECS["dinov3"]["arch"])
    tensors = {k: torch.randn(shape) for k, shape in shapes.items()}
    source = tmp_path / "dinov3.safetensors"
    save_file(tensors, str(source))
    got = load_verified(source, sha256_file(source))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    out = dl.download_weights("dinov3_vits16", tmp_path / "w", "dinov3_vits16", source=source)
    record = json.loads((out / "weights.json").read_text())
    assert record["file"].endswith(".pth") and record["verified_by"] == "none"
    spec = {**TINY_SPECS["dinov3"], "weights": str(out / record["file"]), "sha256": record["sha256"],
            "random_init": False}
    assert torch.equal(build_backbone(spec).model.cls_token, tensors["cls_token"])
