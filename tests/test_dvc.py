"""The DVC DAG in a real temp git + DVC workspace: full demo repro, no-op, precise
invalidation, experiments. The tests build on each other and run in file order."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from semcorr.stages import workspace

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The demo, made smaller: fewer synthetic images and one epoch.
SMALL = [
    "download.synthetic.categories=2",
    "download.synthetic.images_per_category=6",
    "finetune.epochs=1",
    "finetune.milestones=[1]",
    "report.max_pair_pictures=2",
    "report.pictures_per_category=1",
]


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(ws.parent), "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(BIN / "dvc"), *args], cwd=ws, env=env, capture_output=True, text=True)


def repro(ws: Path) -> set[str]:
    """Run `dvc repro`; return the names of the stages that ran."""
    result = dvc(ws, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    return set(re.findall(r"Running stage '([^']+)'", result.stdout))


def edit_params(ws: Path, change) -> None:
    path = ws / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def groups(stage_names: set[str]) -> set[str]:
    return {name.split("@")[0] for name in stage_names}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return workspace.main(tmp_path_factory.mktemp("dvc") / "demo", ROOT / "configs" / "demo.yaml", SMALL)


def test_full_demo_repro(ws):
    ran = repro(ws)
    assert groups(ran) == {
        "download", "weights", "prepare", "extract", "finetune", "extract_tuned",
        "match", "match_tuned", "evaluate", "evaluate_tuned", "report",
    }
    summary = (ws / "results" / "summary.csv").read_text()
    for variant in ("daisy", "tinyvit", "tinyvit_ft2"):
        assert variant in summary
    metrics = json.loads((ws / "results" / "metrics.json").read_text())
    assert any(key.startswith("tinyvit_ft2/synthetic/") for key in metrics)


def test_noop_repro_runs_nothing(ws):
    result = dvc(ws, "repro")
    assert result.returncode == 0
    assert "Running stage" not in result.stdout
    assert dvc(ws, "status", "--json").stdout.strip() in ("{}", "")


def test_match_param_change_reruns_only_match_evaluate_report(ws):
    edit_params(ws, lambda p: p["match"].update(window=2))
    ran = repro(ws)
    assert "match@synthetic-tinyvit-softargmax" in ran
    assert groups(ran) <= {"match", "match_tuned", "evaluate", "evaluate_tuned", "report"}


def test_finetune_param_change_reruns_only_that_branch(ws):
    edit_params(ws, lambda p: p["finetune"].update(lr=5.0e-4))
    ran = repro(ws)
    assert "finetune@tinyvit-2" in ran
    assert "extract_tuned@synthetic-tinyvit-2" in ran
    assert groups(ran) <= {"finetune", "extract_tuned", "match_tuned", "evaluate_tuned", "report"}


def test_adding_a_backbone_runs_only_its_branch(ws):
    def add(p):
        p["backbones"].append("daisy_squash")
        p["backbone"]["daisy_squash"] = {**p["backbone"]["daisy"], "resize": "squash"}

    edit_params(ws, add)
    ran = repro(ws)
    assert {name for name in ran if name != "report"} == {
        "weights@daisy_squash",
        "extract@synthetic-daisy_squash",
        "match@synthetic-daisy_squash-argmax",
        "match@synthetic-daisy_squash-softargmax",
        "evaluate@synthetic-daisy_squash-argmax",
        "evaluate@synthetic-daisy_squash-softargmax",
    }


def test_experiment_changes_metrics(ws):
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=ws, check=True)
    result = dvc(ws, "exp", "run", "-S", "match.window=0", "-S", "match.upsample=2")
    assert result.returncode == 0, result.stdout + result.stderr
    diff = json.loads(dvc(ws, "metrics", "diff", "--json").stdout)
    changed = {path for path, values in diff.items() if values}
    assert any("softargmax" in path for path in changed), diff
    shown = dvc(ws, "exp", "show", "--no-pager", "--csv")
    assert shown.returncode == 0 and "match.window" in shown.stdout
