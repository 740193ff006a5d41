"""Backbone families behind one protocol (`pipeline.backbones.base.Backbone`)."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping
from pathlib import Path

from semcorr.pipeline.backbones.base import Backbone, BackboneSpec, default_spec

FAMILIES = {
    "dinov2": "semcorr.pipeline.backbones.dinov2",
    "dinov3": "semcorr.pipeline.backbones.dinov3",
    "sam": "semcorr.pipeline.backbones.sam",
    "clip": "semcorr.pipeline.backbones.clip",
    "daisy": "semcorr.pipeline.backbones.daisy",
}


def build_backbone(spec: BackboneSpec | Mapping) -> Backbone:
    """Build a backbone in eval mode with frozen parameters.

    Weights (``spec.weights``) are sha256-checked and loaded strictly, either from the
    official checkpoint layout of the family or from a semcorr state dict
    (``backbone.state_dict()``); without weights ``spec.random_init`` must be True.
    """
    if not isinstance(spec, BackboneSpec):
        spec = BackboneSpec(**spec)
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown backbone family {spec.family!r}; expected one of {list(FAMILIES)}")
    return importlib.import_module(FAMILIES[spec.family]).build(spec)


def code_digest() -> str:
    """sha256 over the source of the backbone families and the coordinate convention: a
    cache of backbone outputs built by other code than this is stale."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")) + [here.parent / "coords.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


__all__ = ["Backbone", "BackboneSpec", "FAMILIES", "build_backbone", "code_digest", "default_spec"]
