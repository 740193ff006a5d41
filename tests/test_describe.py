"""The descriptor API: `semcorr.describe` (one image through a backbone) and
`semcorr.describe_store` (a store by image id) sample through `pipeline.coords`, so they
equal `FeatureStore.sample`, a one-hot map's known answers, and each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import semcorr
from semcorr.pipeline.datasets import synthetic
from semcorr.pipeline.describe import describe, describe_store
from semcorr.pipeline.store import open_store, write_store
from semcorr.pipeline.tables import write_tables
from test_matching import store_attrs, transform
from tiny import TINY_SPECS

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_api_is_lazy_and_the_library_function(tmp_path):
    assert semcorr.describe is describe and semcorr.describe_store is describe_store
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        semcorr.nothing  # noqa: B018
    code = "import sys, semcorr; assert 'torch' not in sys.modules, 'import semcorr loaded torch'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_one_hot_map_gives_the_cell_under_each_keypoint(tmp_path):
    """Channel k is 1 at cell k of a 7 x 9 grid: the descriptor of a cell centre is e_k; halfway
    between two cells it is half each; outside the grid, the border cell's."""
    t = transform((70, 90), "pad")  # 56 px input, patch 8: 7 x 5 cells... of the resized image
    gh, gw = t.grid_h, t.grid_w
    feats = torch.eye(gh * gw).reshape(gh * gw, gh, gw)
    store = open_store(write_store(tmp_path / "hot.zarr", store_attrs(feat_dim=gh * gw), [("a", feats, t)]))
    cells = np.array([[0, 0], [2, 1], [gw - 1, gh - 1], [0.5, 0], [-3, 0]], dtype=np.float64)
    xy = t.cells_to_pixels(cells)
    desc = describe_store(store, "a", xy, normalize=False)
    expected = torch.zeros(len(cells), gh * gw)
    expected[0, 0] = expected[1, 1 * gw + 2] = expected[2, gh * gw - 1] = 1
    expected[3, 0] = expected[3, 1] = 0.5
    expected[4, 0] = 1
    torch.testing.assert_close(desc, expected, rtol=0, atol=1e-3)  # the store holds float16
    torch.testing.assert_close(describe_store(store, "a", xy), F.normalize(expected, dim=-1), rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("describe")
    raw = synthetic.generate(root / "raw", {"categories": 1, "images_per_category": 6, "image_size": 64, "keypoints": 6})
    pairs, images = synthetic.parse(raw)
    return write_tables(root / "prepared", pairs, images)


def test_describe_equals_the_store_and_its_sample(dataset, tmp_path):
    """describe(image) from a backbone = describe_store on the store `extract` made with it
    (float16 apart) = FeatureStore.sample, L2-normalised."""
    from semcorr.stages import extract

    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "synthetic").symlink_to(dataset)
    (tmp_path / "weights" / "tiny").mkdir(parents=True)
    (tmp_path / "weights" / "tiny" / "weights.json").write_text(json.dumps({"file": None, "sha256": None, "random_init": True}))
    spec = TINY_SPECS["dinov2"]
    model = {k: spec[k] for k in ("family", "variant", "input_size", "resize", "arch")} | {"layer": None}
    conf = {"batch_size": 4, "num_workers": 0, "device": "cpu", "flips": False, "shard_images": 16}
    store = open_store(extract.main("synthetic", "tiny", model, conf, data_root=tmp_path, progress=False))
    from semcorr.pipeline.backbones import build_backbone

    net = build_backbone(spec)
    image_id = store.image_ids[2]
    path = dataset.parent / "raw" / image_id
    xy = np.array([[0.0, 0.0], [10.3, 40.7], [63.0, 63.0], [31.5, 12.25]])
    from_store = describe_store(store.path, image_id, xy)
    raw = describe_store(store, image_id, xy, normalize=False)
    torch.testing.assert_close(raw, store.sample(image_id, xy))
    torch.testing.assert_close(from_store, F.normalize(store.sample(image_id, xy), dim=-1))
    from_path = semcorr.describe(path, xy, backbone=net)
    from_pixels = describe(np.array(Image.open(path).convert("RGB")), torch.tensor(xy), backbone=spec)
    assert from_path.shape == (4, net.feat_dim)
    torch.testing.assert_close(from_path, from_pixels)
    torch.testing.assert_close(from_path, from_store, rtol=0, atol=2e-3)  # float16 store


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"keypoints must be \[N, 2\]"):
        describe(np.zeros((8, 8, 3), np.uint8), [1.0, 2.0], backbone=TINY_SPECS["dinov2"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        describe(np.zeros((8, 8)), [[1.0, 2.0]], backbone=TINY_SPECS["dinov2"])
    with pytest.raises(ValueError, match="nowhere.png: cannot read image"):
        describe(tmp_path / "nowhere.png", [[1.0, 2.0]], backbone=TINY_SPECS["dinov2"])
