"""A self-contained git + DVC workspace running the project's DAG under another params file.

`make demo` and the DVC tests use it. The workspace gets copies of dvc.yaml and the code
(`pipeline/`, `stages/`), a params.yaml made of a params file plus ``--set key=value``
overrides (validated), and its own git + DVC repo, so that `dvc repro`, `dvc exp run`,
`dvc metrics diff` and `dvc plots show` (offline) work inside it. Every dvc.yaml command
is ``python -m stages ...``, which runs the workspace's own copy of the code: the code that
runs is the code DVC hashes there (edit it there; refresh the workspace to take the
project's code).

A refresh replaces the code copies and params.yaml and commits exactly those files; any
other uncommitted change in the workspace is reported, never committed.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE = ("pipeline", "stages")
FILES = ("dvc.yaml", ".dvcignore", ".gitignore")
IGNORED = ("__pycache__", "*.pyc")
PLOTS_TEMPLATE = "offline_plots.html"  # under .dvc/, DVC's plots.html_template
DVC_CONFIG = {
    "core.autostage": "true",
    "core.analytics": "false",
    # link outputs to the cache instead of copying them: one copy of every store on disk
    "cache.type": "hardlink,symlink,copy",
    "plots.html_template": PLOTS_TEMPLATE,
}
# dvc from the same environment as this interpreter, activated or not
DVC = str(Path(sys.executable).with_name("dvc"))


class WorkspaceError(ValueError):
    """Bad workspace arguments; the message names the argument."""


def apply_override(params: dict, assignment: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) -> ``params['a']['b']['c'] = value``."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise WorkspaceError(f"--set {assignment!r}: expected key.path=value")
    *parents, leaf = key.split(".")
    node = params
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise WorkspaceError(f"--set {assignment!r}: {'.'.join(parents[: depth + 1])} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise WorkspaceError(f"--set {assignment!r}: the value is not YAML ({exc})") from None


def main(target: Path, params_file: Path, overrides: list[str], project_root: Path = PROJECT_ROOT) -> Path:
    """Create or refresh the workspace at ``target``; returns its resolved path."""
    from semcorr.pipeline.plots import write_offline_template
    from semcorr.stages.params import validate

    target = Path(target).resolve()
    params_file = Path(params_file)
    if not params_file.is_file():
        raise WorkspaceError(f"--params {params_file}: no such file")
    params = yaml.safe_load(params_file.read_text()) or {}
    for assignment in overrides:
        apply_override(params, assignment)
    validate(params, f"{params_file} with {len(overrides)} override(s)")
    if target.exists() and not target.is_dir():
        raise WorkspaceError(f"{target}: exists and is not a folder")

    target.mkdir(parents=True, exist_ok=True)
    fresh = not (target / ".git").exists()
    if fresh:
        _run(target, "git", "init", "-q")
        _run(target, "git", "config", "user.email", "semcorr@localhost")
        _run(target, "git", "config", "user.name", "semcorr")
    if not (target / ".dvc").exists():
        _run(target, DVC, "init", "-q")
    dirty_before = _dirty(target)
    for name in CODE:
        _sync_tree(project_root / name, target / name)
    for name in FILES:
        shutil.copy2(project_root / name, target / name)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for key, value in DVC_CONFIG.items():
        _run(target, DVC, "config", key, value)
    template = target / ".dvc" / PLOTS_TEMPLATE
    if not template.is_file():
        write_offline_template(template)

    ours = [*CODE, *FILES, "params.yaml", ".dvc/config", ".dvc/.gitignore"]
    _run(target, "git", "add", "-A", "--", *ours)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=target).returncode != 0:
        _run(target, "git", "commit", "-q", "-m", "semcorr workspace: code and params", "--", *ours)
    others = [line for line in dirty_before if not any(_within(line, path) for path in ours)]
    if others and not fresh:
        typer.echo(f"{target}: left uncommitted (not made by this refresh):\n  " + "\n  ".join(others), err=True)
    return target


def _sync_tree(source: Path, dest: Path) -> None:
    """Make ``dest`` a copy of ``source`` (files that are gone from ``source`` are removed)."""
    if dest.exists():
        compare = filecmp.dircmp(source, dest, ignore=list(IGNORED))
        if _same(compare):
            return
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*IGNORED))


def _same(compare: filecmp.dircmp) -> bool:
    if compare.left_only or compare.right_only or compare.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(compare.left, compare.right, compare.common_files, shallow=False)
    return not mismatch and not errors and all(_same(sub) for sub in compare.subdirs.values())


def _dirty(target: Path) -> list[str]:
    """``git status --porcelain`` paths of the workspace."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=target,
                         capture_output=True, text=True, check=True).stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def _within(path: str, prefix: str) -> bool:
    path = path.strip('"').rstrip("/")
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _run(cwd: Path, *cmd: str) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def command(
    target: Annotated[Path, typer.Argument(help="Workspace folder (created if missing, refreshed if present).")],
    params: Annotated[Path, typer.Option(help="Params file the workspace's params.yaml is made from.")] = Path("configs/demo.yaml"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, key.path=yaml_value; repeatable.")] = None,
) -> None:
    from semcorr.stages.common import clean_errors

    with clean_errors():
        path = main(target, params, set_ or [])
        typer.echo(f"workspace ready: {path}  (cd there and run `dvc repro`)")
