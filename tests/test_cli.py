"""`semcorr --help` lists every stage; each stage is reachable by name, starts without its
heavy libraries, and fails in one line."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from semcorr.stages.cli import STAGES

SEMCORR = Path(sys.executable).with_name("semcorr")
HEAVY = ("torch", "zarr", "pandas", "timm", "open_clip", "segment_anything", "skimage", "matplotlib", "dvclive")


def test_help_lists_every_stage():
    out = subprocess.run([SEMCORR, "--help"], capture_output=True, text=True, check=True).stdout
    for name in STAGES:
        assert f"  {name} " in out


def loaded_after(*argv: str) -> set[str]:
    code = textwrap.dedent(f"""
        import sys
        from semcorr.stages.cli import main
        try:
            main({list(argv)!r})
        except SystemExit:
            pass
        print("LOADED", " ".join(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split("LOADED", 1)[1].split())


@pytest.mark.parametrize("argv", [("--help",), *((name, "--help") for name in STAGES)])
def test_help_imports_no_heavy_library(argv):
    loaded = loaded_after(*argv)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}, argv


def test_a_stage_runs_by_name_and_fails_cleanly_on_missing_input(tmp_path):
    result = subprocess.run(
        [SEMCORR, "evaluate", "--dataset", "nope", "--variant", "x", "--method", "argmax", "--params", "missing.yaml"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr
    unknown = subprocess.run([SEMCORR, "evalute"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown stage 'evalute'" in unknown.stderr


@pytest.mark.parametrize("args, message", [
    (["--params", "missing.yaml"], "--params missing.yaml: no such file"),
    (["--set", "novalue"], "--set 'novalue': expected key.path=value"),
    (["--set", "extract.flipz=true"], "`extract.flipz`: unknown key (did you mean 'flips'?)"),
    (["--set", "evaluate.split.x=1"], "--set 'evaluate.split.x=1': evaluate.split is not a section"),
])
def test_bad_workspace_arguments_fail_in_one_line(tmp_path, args, message):
    root = Path(__file__).resolve().parents[1]
    params = [] if "--params" in args else ["--params", str(root / "configs" / "demo.yaml")]
    done = subprocess.run([SEMCORR, "workspace", str(tmp_path / "ws"), *params, *args], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "ws").exists()
