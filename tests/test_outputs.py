"""A stage's outputs appear whole: killed (SIGKILL) half-way, a stage leaves the old outputs
as they were and nothing where a later stage looks; the next stage clears what it left."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from semcorr.pipeline.io import remove_stale, staged
from semcorr.stages import evaluate, match, report
from test_report import MATCH, build_project

ROOT = Path(__file__).resolve().parents[1]


def run_killed(data: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (``data`` defined); it kills itself with SIGKILL."""
    prelude = f"import os, signal\nfrom pathlib import Path\ndata = Path({str(data)!r})\n"
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT / "tests",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stdout + done.stderr  # killed where the code says
    return done


@pytest.fixture()
def project(tmp_path) -> Path:
    return build_project(tmp_path, variants=("toy_bb",))


def test_staged_folder_replaces_the_old_one_or_nothing(tmp_path):
    target, work = tmp_path / "out", tmp_path / ".semcorr"
    with staged(target, work) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged(target, work) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("failed half-way")
    assert (target / "a.txt").read_text() == "old" and list((work / "staging").iterdir()) == []


def test_a_killed_stage_leaves_staging_that_the_next_one_removes(tmp_path):
    target, work = tmp_path / "out", tmp_path / ".semcorr"
    run_killed(tmp_path, f"""
        from semcorr.pipeline.io import staged
        with staged(Path({str(target)!r}), Path({str(work)!r})) as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    assert not target.exists() and len(list((work / "staging").iterdir())) == 2  # the folder and its lock
    assert sorted(p.name for p in remove_stale(work / "staging")) and list((work / "staging").iterdir()) == []


def test_kill_between_match_outputs_keeps_the_old_predictions_consistent(project):
    match.main("toy", "toy_bb", "argmax", MATCH, "test", data_root=project)
    folder = project / "predictions" / "toy_bb" / "toy" / "argmax"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = {**MATCH, "argmax": {**MATCH["argmax"], "upsample": 2}}
    # killed after the new predictions table is written, before the h5 and the setting
    run_killed(project, f"""
        import semcorr.pipeline.export as export
        export.write_matches_h5 = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        from semcorr.stages import match
        match.main("toy", "toy_bb", "argmax", {other!r}, "test", data_root=data)
        """)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # evaluate reads the old, consistent predictions and labels them with their own settings...
    out = evaluate.main("toy", "toy_bb", "argmax", [0.1], "test", MATCH, data_root=project)
    assert json.loads((out / "setting.json").read_text())["match"]["argmax"]["upsample"] == 1
    # ...and refuses them under the params the killed run had
    with pytest.raises(ValueError, match="match.argmax.upsample: made with 1, params say 2"):
        evaluate.main("toy", "toy_bb", "argmax", [0.1], "test", other, data_root=project)
    assert list((project / ".semcorr" / "staging").iterdir()) == []  # evaluate cleared the leftover


def test_a_killed_evaluate_adds_no_summary_row(project, tmp_path):
    wanted = [("toy_bb", "toy", m) for m in ("argmax", "softargmax")]
    for _, _, method in wanted:
        match.main("toy", "toy_bb", method, MATCH, "test", data_root=project)
        evaluate.main("toy", "toy_bb", method, [0.1], "test", MATCH, data_root=project)
    run_killed(project, f"""
        import semcorr.pipeline.report as r
        r.text_report = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        from semcorr.stages import evaluate
        evaluate.main("toy", "toy_bb", "argmax", [0.2], "test", {MATCH!r}, data_root=data)
        """)
    staging = project / ".semcorr" / "staging"
    assert any((p / "metrics.json").is_file() for p in staging.iterdir() if p.is_dir())  # killed half-way
    results = report.main(wanted, project, tmp_path / "results", 0, 0)
    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == 2 and list(summary["method"]) == ["argmax", "softargmax"]
    assert list(staging.iterdir()) == []
