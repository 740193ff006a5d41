"""`semcorr --help` lists every stage, and each stage is reachable by name."""

import subprocess
import sys
from pathlib import Path

from semcorr.stages.cli import STAGES

SEMCORR = Path(sys.executable).with_name("semcorr")


def test_help_lists_every_stage():
    out = subprocess.run([SEMCORR, "--help"], capture_output=True, text=True, check=True).stdout
    for name in STAGES:
        assert f" {name} " in out


def test_a_stage_runs_by_name_and_fails_cleanly_on_missing_input(tmp_path):
    result = subprocess.run(
        [SEMCORR, "evaluate", "--dataset", "nope", "--variant", "x", "--method", "argmax", "--params", "missing.yaml"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr
