"""Stage level: a prepared video dataset + its feature store -> propagate -> video_eval, on a
panning scene whose features move with its labels (so propagation must track them and
copying frame 0 must not); propagate and video_eval read only the cache and the tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semcorr.pipeline.coords import CellTransform
from semcorr.pipeline.store import StoreMismatch, write_store
from semcorr.pipeline.tables import decode_mask, encode_mask, flatten, keypoints, write_video_tables
from semcorr.stages import propagate, report, video_eval
from test_cache_only import GUARD, run_guarded

C, PATCH, GRID_H, GRID_W, T = 32, 8, 8, 12, 6
H, W = GRID_H * PATCH, GRID_W * PATCH
CONF = {"n_context": 20, "radius": 12.0, "topk": 10, "temperature": 0.05, "device": "cpu"}
BOOTSTRAP = {"resamples": 200, "seed": 0, "confidence": 0.95}


def build_video_project(root: Path, sequences=("pan_a", "pan_b")) -> Path:
    """A data root with the prepared video set ``toyvideo`` (frames on disk as PNGs) and the
    feature store of variant ``toy_bb``: each frame's features are a random pattern shifted one
    cell left per frame, and a 4 x 4-cell object and two keypoints on it shift with it."""
    rng = np.random.default_rng(0)
    data = root / "data"
    transform = CellTransform.from_resize((H, W), (H, W), (0.0, 0.0), PATCH, (GRID_H, GRID_W))
    images, frames, masks, kps, items = [], [], [], [], []
    for s, sequence in enumerate(sequences):
        pattern = rng.standard_normal((C, GRID_H, GRID_W + T)).astype(np.float32)
        for t in range(T):
            image_id = f"{sequence}/{t:05d}.png"
            path = root / "frames" / image_id
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
            labels = np.zeros((H, W), dtype=np.uint8)
            left = (6 + s - t) * PATCH  # the object: pattern columns 6+s .. 9+s, rows 2..5
            labels[2 * PATCH:6 * PATCH, left:left + 4 * PATCH] = 1
            xy = np.array([[left + 3.5, 2 * PATCH + 3.5], [left + 2 * PATCH + 3.5, 4 * PATCH + 3.5]])
            images.append({"image_id": image_id, "path": str(path), "width": W, "height": H, "category": sequence})
            frames.append({"sequence": sequence, "frame": t, "image_id": image_id})
            masks.append({"sequence": sequence, "frame": t, "image_id": image_id, "height": H, "width": W,
                          "mask": encode_mask(labels)})
            kps.append({"sequence": sequence, "frame": t, "image_id": image_id, "kps": flatten(xy),
                        "visible": [True, True]})
            items.append((image_id, pattern[:, :, t:t + GRID_W], transform))
    write_video_tables(data / "prepared" / "toyvideo", pd.DataFrame(images), pd.DataFrame(frames),
                       pd.DataFrame(masks), pd.DataFrame(kps))
    attrs = {"backbone": "toy_bb", "family": "daisy", "variant": "toy_bb", "weights_sha256": None, "random_init": True,
             "layer": None, "patch_size": PATCH, "input_size": W, "resize": "pad", "feat_dim": C,
             "dataset": "toyvideo", "flips": False, "versions": {"test": "0"}}
    write_store(data / "features" / "toy_bb" / "toyvideo.zarr", attrs, items)
    return data


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    data = build_video_project(tmp_path_factory.mktemp("video"))
    propagate.main("toyvideo", "toy_bb", CONF, expect={"backbone": "toy_bb", "dataset": "toyvideo"}, data_root=data)
    video_eval.main("toyvideo", "toy_bb", CONF, BOOTSTRAP, data_root=data)
    return data


def test_propagation_tracks_the_panning_object_and_copying_frame_0_does_not(project):
    folder = propagate.propagation_dir(project, "toy_bb", "toyvideo")
    predicted = pd.read_parquet(folder / "masks.parquet")
    assert len(predicted) == 2 * (T - 1) and set(predicted["frame"]) == set(range(1, T))
    last = predicted[(predicted["sequence"] == "pan_a") & (predicted["frame"] == T - 1)].iloc[0]
    labels = decode_mask(last["mask"], last["height"], last["width"])
    left = (6 - (T - 1)) * PATCH  # moved 5 cells left; cell labels upsample bilinearly: corners round off
    inner, outer = labels[2 * PATCH + 4:6 * PATCH - 4, left + 4:left + 4 * PATCH - 4], labels.copy()
    outer[2 * PATCH - 4:6 * PATCH + 4, max(0, left - 4):left + 4 * PATCH + 4] = 0
    assert inner.all() and not outer[:, :(GRID_W - (T - 1)) * PATCH].any()  # right of that: content never seen
    joints = pd.read_parquet(folder / "keypoints.parquet")
    row = joints[(joints["sequence"] == "pan_b") & (joints["frame"] == 3)].iloc[0]
    np.testing.assert_allclose(keypoints(row["kps"]), [[(7 - 3) * PATCH + 3.5, 19.5], [(9 - 3) * PATCH + 3.5, 35.5]],
                               atol=0.5)
    metrics = json.loads((video_eval.video_eval_dir(project, "toy_bb", "toyvideo") / "metrics.json").read_text())
    assert metrics["jf_mean"] > 0.85 and metrics["copy_jf_mean"] < 0.4
    assert metrics["pck@0.1"] == 1.0 and metrics["copy_pck@0.1"] < 0.5
    assert metrics["jf_mean_low"] <= metrics["jf_mean"] <= metrics["jf_mean_high"]
    assert (metrics["n_sequences"], metrics["n_objects"], metrics["n_joints"]) == (2, 2, 4)
    assert all(isinstance(v, (int, float)) for v in metrics.values() if v is not None)


def test_settings_state_the_rule_the_store_and_the_protocol(project):
    setting = json.loads((video_eval.video_eval_dir(project, "toy_bb", "toyvideo") / "setting.json").read_text())
    assert setting["propagate"] == {k: CONF[k] for k in propagate.RULE_KEYS}
    assert setting["rule"]["select"] == "int8" and setting["random_init"] is True and setting["patch_size"] == PATCH
    assert "0.008" in setting["protocol"]["davis"] and "0.6" in setting["protocol"]["pck"]
    assert setting["protocol"]["bootstrap"]["unit"] == "sequence"
    scores = video_eval.video_eval_dir(project, "toy_bb", "toyvideo") / "scores"
    assert len(pd.read_csv(scores / "per_object.csv")) == 2 and len(pd.read_csv(scores / "per_joint.csv")) == 2


def test_video_eval_refuses_a_propagation_made_with_other_params(project):
    with pytest.raises(ValueError, match="propagate.topk: made with 10, params say 5"):
        video_eval.main("toyvideo", "toy_bb", {**CONF, "topk": 5}, data_root=project)


def test_propagate_refuses_a_store_made_with_other_settings(project):
    with pytest.raises(StoreMismatch, match="backbone"):
        propagate.main("toyvideo", "toy_bb", CONF, expect={"backbone": "other"}, data_root=project)


def test_the_report_adds_the_video_table_and_names_a_missing_evaluation(project):
    table, text = report._video(project, [("toy_bb", "toyvideo")])
    assert len(table) == 1 and table.loc[0, "jf_mean"] > table.loc[0, "copy_jf_mean"] + 0.4
    assert "## Video label propagation" in text and "| toyvideo | toy_bb | random-init" in text
    compact = report.compact_metrics(pd.DataFrame(), table)
    assert compact == {"toy_bb": {"toyvideo": {"propagation": {"jf_mean": table.loc[0, "jf_mean"], "pck@0.1": 1.0}}}}
    with pytest.raises(FileNotFoundError, match="run `semcorr video_eval --dataset toyvideo --variant other` first"):
        report._video(project, [("other", "toyvideo")])
    assert report._video(project, [])[1] == ""


PROPAGATE = """
from pathlib import Path
from semcorr.stages import propagate
propagate.main("toyvideo", "toy_bb", {conf!r}, data_root=Path(data))
"""
EVALUATE = """
from pathlib import Path
from semcorr.stages import video_eval
video_eval.main("toyvideo", "toy_bb", {conf!r}, {bootstrap!r}, data_root=Path(data))
"""


def test_propagate_and_video_eval_read_only_the_cache_and_tables(tmp_path):
    data = build_video_project(tmp_path, sequences=("pan_a",))
    done = run_guarded(data, PROPAGATE.format(conf=CONF))
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stdout + done.stderr
    # the evaluation needs scikit-image's morphology, nothing else of it: no torch, zarr or image reader
    guard = GUARD.replace('"skimage", ', "")
    done = subprocess.run([sys.executable, "-c", guard, str(data), EVALUATE.format(conf=CONF, bootstrap=BOOTSTRAP),
                           "torch", "zarr", "skimage.io", "imageio"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stdout + done.stderr
    assert (video_eval.video_eval_dir(data, "toy_bb", "toyvideo") / "metrics.json").is_file()
