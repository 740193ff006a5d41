"""Checkpoint files: sha256 verification and safe reading.

Every checkpoint is verified against its expected sha256 before it is read, and no code in
it runs unless the weights registry vouches for the file:

- safetensors files (recognised by their header, whatever their name) are read with the
  ``safetensors`` package;
- TorchScript archives carry compiled code that ``torch.jit.load`` runs. One is loaded only
  when its sha256 is the registry's hash of an official file (`official_hashes`: today only
  OpenAI ships CLIP as TorchScript). A user's pin proves identity, not safety: it does not
  admit TorchScript;
- everything else is read with ``torch.load(weights_only=True)``: tensors in plain
  containers, never a pickled Python object.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a checkpoint is read: the download stage runs without it
    import torch

CHUNK = 1 << 20
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class WeightsError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not fit the model."""


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


def official_hashes() -> frozenset[str]:
    """sha256 of every official checkpoint in the weights registry (`pipeline.download.WEIGHTS`)."""
    from semcorr.pipeline.download import WEIGHTS  # not at the top: download imports this module

    return frozenset(resource.sha256.lower() for resource in WEIGHTS.values() if resource.sha256)


def check_torchscript(name: str | Path, digest: str) -> None:
    """Raise `WeightsError` unless ``digest`` (the sha256 of TorchScript archive ``name``) is
    an official file's."""
    if digest.lower() not in official_hashes():
        raise WeightsError(
            f"checkpoint {name} is a TorchScript archive: it carries code that runs when it is loaded. "
            f"semcorr loads weights only, and runs TorchScript only for an official file whose sha256 is "
            f"in the weights registry; this file's sha256 {digest} is not (a pin proves identity, not "
            "safety). Where you trust it, save its state dict with torch.save or as .safetensors instead")


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive: a zip holding compiled ``code/`` or, as torch itself
    tells them apart, ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] or name.split("/")[1:] == ["constants.pkl"]
                   for name in archive.namelist())


def is_safetensors(path: str | Path) -> bool:
    """True for a safetensors file: a little-endian u64 header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + struct.unpack("<Q", head[:8])[0] <= Path(path).stat().st_size


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapping ``{'model': ...}``/``{'state_dict': ...}``;
    TorchScript only when registered (see the module docstring)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if is_torchscript(path):
        state = _read_torchscript(path)
    elif is_safetensors(path):
        state = _read_safetensors(path)
    else:
        state = _read_weights_only(path)
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


def _read_torchscript(path: Path) -> dict:
    import torch

    data = path.read_bytes()  # hashed and loaded from the same bytes: the file cannot change between
    check_torchscript(path, hashlib.sha256(data).hexdigest())
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is how OpenAI ships CLIP
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
    except Exception as err:  # corrupt archive: say which
        raise WeightsError(f"checkpoint {path} could not be read as TorchScript: {_reason(err)}") from err


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as err:
        raise WeightsError(f"checkpoint {path} could not be read as safetensors: {_reason(err)}") from err


def _read_weights_only(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, foreign or code-bearing file: say which, in our words
        raise WeightsError(f"checkpoint {path} could not be read as weights only (semcorr loads tensors "
                           f"in plain containers, never code): {_reason(err)}") from err


def _reason(err: Exception) -> str:
    """Why torch refused a file, without its advice to load it unsafely."""
    text = str(err)
    if found := _GLOBAL.search(text):
        return f"this file holds the Python object {found.group(1)}"
    detail = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0]
    return detail if detail and "weights_only" not in detail else type(err).__name__
