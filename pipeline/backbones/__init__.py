"""Backbone families behind one protocol (`pipeline.backbones.base.Backbone`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

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


__all__ = ["Backbone", "BackboneSpec", "FAMILIES", "build_backbone", "default_spec"]
