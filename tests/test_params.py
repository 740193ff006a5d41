"""params.yaml has one schema, checked whole before any stage works: each bad param is one
clear line naming its path and what is allowed; unknown keys name the closest known one."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from semcorr.stages.params import (DATASETS, FAMILIES, METHODS, PROTOCOLS, VIDEO_DATASETS, ParamsError, load_params,
                                   validate)

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
SEMCORR = Path(sys.executable).with_name("semcorr")


def test_the_shipped_params_are_valid():
    for path in (ROOT / "params.yaml", ROOT / "configs" / "demo.yaml"):
        load_params(path)


def test_registries_match_the_library():
    from semcorr.pipeline.backbones import FAMILIES as LIBRARY_FAMILIES
    from semcorr.pipeline.datasets import GENERATED, NAMES, VIDEO_NAMES
    from semcorr.pipeline.download import VIDEO_DATASETS as VIDEO_SOURCES
    from semcorr.pipeline.matching import METHODS as LIBRARY_METHODS
    from semcorr.pipeline.protocols import PRESETS

    assert set(DATASETS) == set(NAMES)
    assert set(VIDEO_DATASETS) == set(VIDEO_NAMES) == set(VIDEO_SOURCES) | set(GENERATED) - set(NAMES)
    assert set(FAMILIES) == set(LIBRARY_FAMILIES)
    assert METHODS == (*LIBRARY_METHODS, "valtuned")  # valtuned: the matcher's methods with settings chosen on val
    assert set(PROTOCOLS) == set(PRESETS)


def _set(path: str, value):
    def change(params):
        *parents, leaf = path.split(".")
        node = params
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return change


DELETE = object()
# (change, every line that must appear in the error)
BAD = [
    (_set("backbone.tinyvit.model.input_size", DELETE), ["`backbone.tinyvit.model.input_size`: missing (required)"]),
    (_set("backbone.tinyvit.model.inptu_size", 112), ["`backbone.tinyvit.model.inptu_size`: unknown key (did you mean 'input_size'?)"]),
    (_set("extract.flipz", True), ["`extract.flipz`: unknown key (did you mean 'flips'?)", "known keys here: batch_size"]),
    (_set("download.pfwilow", {"source": None}), ["`download.pfwilow`: unknown key (did you mean 'pfwillow'?)"]),
    (_set("backbone.tinyvit.weights.chekpoint", None), ["did you mean 'checkpoint'?"]),
    (_set("backbone.tinyvit.model.input_size", -112), ["`backbone.tinyvit.model.input_size`: Input should be greater than 0 (got -112)"]),
    (_set("finetune.temperature", 0), ["`finetune.temperature`: Input should be greater than 0 (got 0)"]),
    (_set("match.softargmax.temperature", None), ["`match.softargmax.temperature`: Input should be a valid number (got None)"]),
    (_set("evaluate.alphas", [0, -0.1, 1.5, 100]), ["`evaluate.alphas[0]`: Input should be greater than 0 (got 0)",
                                                    "`evaluate.alphas[1]`", "`evaluate.alphas[2]`: Input should be less than or equal to 1 (got 1.5)",
                                                    "`evaluate.alphas[3]`"]),
    (_set("evaluate.alphas", []), ["`evaluate.alphas`: List should have at least 1 item"]),
    (_set("evaluate.split", "tset"), ["`evaluate.split`: Input should be 'trn', 'val' or 'test' (got 'tset')"]),
    (_set("datasets", []), ["`datasets`: List should have at least 1 item"]),
    (_set("datasets", ["synthetic", "pfwilow"]), ["datasets[1] = 'pfwilow': unknown dataset (did you mean 'pfwillow'?)"]),
    (_set("backbone.tinyvit.weights.random_init", False), ["`backbone.tinyvit`: weights.checkpoint is null and weights.random_init is false"]),
    (_set("backbone.tinyvit.model.resize", "crop"), ["`backbone.tinyvit.model.resize`: Input should be 'pad' or 'squash'"]),
    (_set("backbone.tinyvit.model.family", "dino"), ["`backbone.tinyvit.model.family`: Input should be 'dinov2', 'dinov3', 'sam', 'clip' or 'daisy'"]),
    (_set("backbone.tinyvit.weights.sha256", "abc"), ["`backbone.tinyvit.weights.sha256`: String should match pattern"]),
    (_set("match.softargmax.window", 9), ["`match`: softargmax.window 9 exceeds argmax.max_window 7"]),
    (_set("finetune.kernel_size", 4), ["`finetune.kernel_size`: must be odd"]),
    (_set("finetune.train_dataset", "spair"), ["finetune.train_dataset = 'spair' is not in `datasets`"]),
    (_set("finetune_backbones", ["daisy"]), ["finetune_backbones[0] = 'daisy' is weight-free"]),
    (_set("backbones", ["daisy", "tinyvti"]), ["backbones[1] = 'tinyvti' has no `backbone.tinyvti` section (did you mean 'tinyvit'?)"]),
    (_set("methods", ["argmax", "soft"]), ["`methods[1]`: Input should be 'argmax', 'softargmax' or 'valtuned'"]),
    (_set("evaluate.protocols", ["spair", "pf-pascal"]), ["`evaluate.protocols[1]`: Input should be 'native', 'spair'"]),
    (_set("evaluate.alphas", [0.05, 0.2]), ["`evaluate.alphas`: must include 0.1"]),
    (_set("evaluate.bootstrap", {"resamples": 10, "seed": 0, "confidence": 0.95}), ["`evaluate.bootstrap.resamples`: Input should be greater than or equal to 100"]),
    (_set("match.valtuned.window", []), ["`match.valtuned.window`: List should have at least 1 item"]),
    (_set("launch", {"launcher": "sge", "jobs": 0}), ["`launch.launcher`: Input should be 'none' or 'slurm' (got 'sge')",
                                                    "`launch.jobs`: Input should be greater than 0 (got 0)"]),
    (_set("extract.device", "gpu"), ["`extract.device`: String should match pattern"]),
    (_set("datasets", ["synthetic", "davis"]), ["datasets[1] = 'davis' is a video dataset (no pairs): list it in `video_datasets`"]),
    (_set("video_datasets", ["synthvidoe"]), ["video_datasets[0] = 'synthvidoe': unknown video dataset (did you mean 'synthvideo'?)"]),
    (_set("video_datasets", ["synthvideo", "davis"]), ["video_datasets[1] = 'davis' has no `download.davis` section"]),
    (_set("propagate.topk", 0), ["`propagate.topk`: Input should be greater than 0 (got 0)"]),
    (_set("propagate.radius", DELETE), ["`propagate.radius`: missing (required)"]),
    (_set("download.synthvideo.sequences", 5), ["`download.synthvideo.sequences`: Input should be less than or equal to 4"]),
]


@pytest.mark.parametrize("change, lines", BAD, ids=[lines[0][:40] for _, lines in BAD])
def test_each_bad_param_is_named(change, lines):
    raw = copy.deepcopy(DEMO)
    change(raw)
    with pytest.raises(ParamsError) as err:
        validate(raw, "demo.yaml")
    message = str(err.value)
    assert message.startswith("demo.yaml: invalid params:")
    for line in lines:
        assert line in message


def test_several_problems_are_reported_at_once():
    raw = copy.deepcopy(DEMO)
    raw["finetune"]["lr"] = -1
    raw["report"]["pictures"] = 3
    message = str(pytest.raises(ParamsError, validate, raw).value)
    assert "`finetune.lr`" in message and "`report.pictures`: unknown key" in message


def test_unreadable_params_files(tmp_path):
    with pytest.raises(ParamsError, match="missing.yaml: params file not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("datasets: [a\n")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(tmp_path / "list.yaml")


def test_lookups_name_the_known_values():
    p = validate(copy.deepcopy(DEMO))
    with pytest.raises(ParamsError, match=r"unknown dataset 'synthetc' \(did you mean 'synthetic'\?\): `datasets` lists synthetic"):
        p.dataset("synthetc")
    with pytest.raises(ParamsError, match="unknown variant 'tinyvit_ft3'.*variants of this study: daisy, tinyvit, tinyvit_ft2"):
        p.variant("tinyvit_ft3")
    assert p.variant("tinyvit_ft2") == ("tinyvit", 2) and p.variant("daisy") == ("daisy", None)
    with pytest.raises(ParamsError, match="unknown video dataset 'davis'.*lists synthvideo .it is known but not in"):
        p.video_dataset("davis")
    assert p.any_dataset("synthvideo") == "synthvideo" and p.any_dataset("synthetic") == "synthetic"
    with pytest.raises(ParamsError, match="unknown dataset 'synthvideo'"):
        p.dataset("synthvideo")  # the pair stages never take a video set


def test_a_stage_refuses_bad_params_before_any_work(tmp_path):
    """Through the CLI: one line naming the param, exit 1, no traceback, nothing touched."""
    raw = copy.deepcopy(DEMO)
    raw["backbone"]["tinyvit"]["model"]["input_size"] = -112
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    store = tmp_path / "data" / "features" / "tinyvit" / "synthetic.zarr"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    done = subprocess.run([SEMCORR, "extract", "--dataset", "synthetic", "--backbone", "tinyvit"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "`backbone.tinyvit.model.input_size`: Input should be greater than 0 (got -112)" in done.stderr
    assert "Traceback" not in done.stderr
    assert (store / "zarr.json").read_text() == "{}"  # the store that was there is untouched


def test_an_unknown_dataset_is_named_with_the_known_ones(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEMO))
    done = subprocess.run([SEMCORR, "match", "--dataset", "pfwilow", "--variant", "daisy"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "unknown dataset 'pfwilow'" in done.stderr and "`datasets` lists synthetic" in done.stderr
    assert "not a feature store" not in done.stderr and "Traceback" not in done.stderr
