"""Checkpoint files: sha256 verification and safe reading."""

from __future__ import annotations

import hashlib

import pytest
import torch

from semcorr.pipeline.download import WEIGHTS, Resource
from semcorr.pipeline.weights import (WeightsError, is_torchscript, load_verified, official_hashes, read_state_dict,
                                     sha256_file, verify)
from tiny import write_official_checkpoint


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000  # several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_verify_accepts_the_right_hash(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert verify(path, digest) == digest
    assert verify(path, digest.upper()) == digest


def test_verify_refuses_a_wrong_hash_naming_file_expected_and_actual(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    actual = sha256_file(path)
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        verify(path, wrong)
    message = str(err.value)
    assert str(path) in message and wrong in message and actual in message


def test_verify_refuses_missing_file_and_missing_hash(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        verify(tmp_path / "nope.pth", "0" * 64)
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(WeightsError, match="no expected sha256"):
        verify(path, None)


def test_read_state_dict_unwraps_model_and_state_dict(tmp_path):
    tensors = {"x": torch.arange(3.0), "y": torch.eye(2)}
    for wrapped in (tensors, {"model": tensors}, {"state_dict": tensors}):
        path = tmp_path / "w.pth"
        torch.save(wrapped, path)
        got = read_state_dict(path)
        assert got.keys() == tensors.keys()
        assert all(torch.equal(got[k], tensors[k]) for k in tensors)


class Payload:
    """A pickled object that ``weights_only=True`` must refuse to build."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_read_state_dict_refuses_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(WeightsError, match=str(path)):
        read_state_dict(path)
    assert "code ran" not in capsys.readouterr().out


def test_read_state_dict_refuses_garbage_and_non_tensor_content(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read"):
        read_state_dict(garbage)
    numbers = tmp_path / "numbers.pth"
    torch.save({"x": 1}, numbers)
    with pytest.raises(WeightsError, match="state dict of tensors"):
        read_state_dict(numbers)


def test_torchscript_archive_is_read_with_its_tensors_when_registered(monkeypatch, tmp_path):
    """OpenAI's CLIP ``.pt`` files are TorchScript archives, not torch.save pickles: read
    through ``torch.jit.load`` only because their sha256 is in the registry."""
    scripted, plain = tmp_path / "clip.pt", tmp_path / "clip.pth"
    sha = write_official_checkpoint("clip", scripted, torchscript=True)
    write_official_checkpoint("clip", plain)
    assert is_torchscript(scripted) and not is_torchscript(plain)
    with pytest.raises(WeightsError, match="TorchScript"):
        load_verified(scripted, sha)
    monkeypatch.setitem(WEIGHTS, "clip_tiny", Resource(None, "clip.pt", sha))
    assert sha in official_hashes()
    got, expected = load_verified(scripted, sha), read_state_dict(plain)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
