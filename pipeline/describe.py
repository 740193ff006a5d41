"""Descriptors at keypoints: the library API for people who use semcorr as a library.

`describe` runs a backbone on one image; `describe_store` reads a feature store by image id.
Both sample the dense map bilinearly at the keypoints through `pipeline.coords` (the
image's `CellTransform` and `sample_map`), the sampling the matcher uses, so the descriptor
of a keypoint is the one `pipeline.matching` compares (which L2-normalises it, as
``normalize=True`` does here)::

    import semcorr
    from semcorr.pipeline.backbones import build_backbone

    net = build_backbone({"family": "dinov2", "variant": "vitb14", "weights": "dinov2_vitb14_pretrain.pth",
                          "input_size": 840})
    desc = semcorr.describe("cat.jpg", [[120.0, 80.5], [300.0, 210.0]], backbone=net)  # [2, 768]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semcorr.pipeline.backbones import Backbone, BackboneSpec, build_backbone
from semcorr.pipeline.coords import sample_map
from semcorr.pipeline.store import FeatureStore, open_store

ImageLike = np.ndarray | str | Path


def describe(image: ImageLike, keypoints, backbone: Backbone | BackboneSpec | Mapping, normalize: bool = True,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Descriptors of ``keypoints`` in one image -> ``[N, C]`` float32 (on the CPU).

    image: ``[H, W, 3]`` uint8 RGB array or an image file; keypoints: ``[N, 2]`` (x, y) in
    original pixels, 0-based pixel centres; backbone: a built backbone (`build_backbone`),
    or its spec (built for this call). ``normalize``: L2-normalise each descriptor (as the
    matcher does before its cosine similarity); False gives the bilinear sample itself.
    Points outside the feature grid take the border cell's value (``grid_sample`` border).
    """
    net = backbone if isinstance(backbone, Backbone) else build_backbone(backbone)
    pixels = _read(image)
    x, transform = net.preprocess(pixels)
    device = torch.device(device)
    with torch.inference_mode():
        feats = net.to(device)(x[None].to(device))[0, :, : transform.grid_h, : transform.grid_w].float().cpu()
    return _finish(sample_map(feats, transform.pixels_to_cells(_points(keypoints))), normalize)


def describe_store(store: FeatureStore | str | Path, image_id: str, keypoints, normalize: bool = True,
                   flip: bool = False) -> torch.Tensor:
    """Descriptors of ``keypoints`` of image ``image_id`` from a feature store -> ``[N, C]``
    float32: `FeatureStore.sample` (the stored float16 map, bilinear), L2-normalised with
    ``normalize``. ``store``: an open store or its path (opened and checked: `open_store`);
    ``flip``: from the mirrored image's features (``keypoints`` are then its pixels)."""
    store = store if isinstance(store, FeatureStore) else open_store(Path(store))
    return _finish(store.sample(image_id, _points(keypoints), flip=flip), normalize)


def _points(keypoints) -> np.ndarray:
    xy = np.asarray(keypoints.cpu() if isinstance(keypoints, torch.Tensor) else keypoints, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"keypoints must be [N, 2] (x, y) pixels, got shape {xy.shape}")
    return xy


def _read(image: ImageLike) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be [H, W, 3] uint8 RGB, got {image.dtype} {image.shape}")
        return image
    from PIL import Image

    path = Path(image)
    try:
        with Image.open(path) as opened:
            return np.array(opened.convert("RGB"))
    except (OSError, ValueError) as exc:  # missing, unreadable or not an image
        raise ValueError(f"{path}: cannot read image ({exc})") from None


def _finish(desc: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(desc, dim=-1) if normalize else desc
