"""A self-contained git + DVC workspace running the project's DAG under another params file.

`make demo` and the DVC tests use it: the workspace gets copies of dvc.yaml and the code
that dvc.yaml lists as deps (so DVC hashes them as in the project), a params.yaml made of
a params file plus ``--set key=value`` overrides, and its own git + DVC repo so that
`dvc repro`, `dvc exp run -S ...` and `dvc metrics diff` work inside it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COPIED = ("dvc.yaml", ".dvcignore", "pipeline", "stages")
IGNORED = "__pycache__"
# dvc from the same environment as this interpreter, activated or not
DVC = str(Path(sys.executable).with_name("dvc"))


def apply_override(params: dict, assignment: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) -> ``params['a']['b']['c'] = value``."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"override {assignment!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(raw)


def main(target: Path, params_file: Path, overrides: list[str], project_root: Path = PROJECT_ROOT) -> Path:
    target = Path(target).resolve()
    params = yaml.safe_load(Path(params_file).read_text())
    for assignment in overrides:
        apply_override(params, assignment)

    target.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, dest = project_root / name, target / name
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(IGNORED))
        else:
            shutil.copy2(source, dest)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=target, check=True, stdout=subprocess.DEVNULL)

    if not (target / ".git").exists():
        run("git", "init", "-q")
        run("git", "config", "user.email", "semcorr@localhost")
        run("git", "config", "user.name", "semcorr")
    if not (target / ".dvc").exists():
        run(DVC, "init", "-q")
        run(DVC, "config", "core.autostage", "true")
        run(DVC, "config", "core.analytics", "false")
    shutil.copy2(project_root / ".gitignore", target / ".gitignore")
    run("git", "add", "-A")
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=target).returncode != 0:
        run("git", "commit", "-q", "-m", "semcorr workspace: code and params")
    return target


def command(
    target: Annotated[Path, typer.Argument(help="Workspace folder (created if missing, refreshed if present).")],
    params: Annotated[Path, typer.Option(help="Params file the workspace's params.yaml is made from.")] = Path("configs/demo.yaml"),
    set_: Annotated[list[str], typer.Option("--set", help="Override, key.path=yaml_value; repeatable.")] = [],
) -> None:
    path = main(target, params, set_)
    typer.echo(f"workspace ready: {path}  (cd there and run `dvc repro`)")
