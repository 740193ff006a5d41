"""Checkpoint files: sha256 verification and safe reading.

Every checkpoint is verified against its expected sha256 before it is read, and
read with ``torch.load(weights_only=True)`` (no pickled code runs). OpenAI's CLIP
``.pt`` files are TorchScript archives; they are opened with ``torch.jit.load``,
which deserialises tensors and TorchScript code but no Python pickles.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path

import torch

CHUNK = 1 << 20


class WeightsError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, expected: str | None) -> str:
    """Check ``path`` hashes to ``expected``; return the hash. Raises `WeightsError`
    naming the file, the expected and the actual hash."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if not expected:
        raise WeightsError(f"checkpoint {path} has no expected sha256; refusing to load unverified weights")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise WeightsError(f"checkpoint {path} has sha256 {actual}, expected {expected}")
    return actual


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (a zip holding compiled ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapping ``{'model': ...}``/``{'state_dict': ...}``."""
    path = Path(path)
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is how OpenAI ships CLIP
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: say which
        raise WeightsError(f"checkpoint {path} could not be read: {err}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state dict of tensors")
    return dict(state)


def load_verified(path: str | Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """`verify` then `read_state_dict`."""
    verify(path, expected_sha256)
    return read_state_dict(path)
