"""Outputs that appear whole: staged in a private folder, then renamed into place.

A stage builds its output (a file or a folder holding all of its files) in
``<work_root>/staging/<name>-<id>`` and renames it over the target when complete, so a
later stage never sees half an output, or new files beside old ones. The staging folder
sits outside every result tree (``work_root`` is ``data/.semcorr``, ignored by git and
DVC), and is locked by its process while in use: any later stage removes the staging
folders of dead processes (`remove_stale`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

WORK_DIR = ".semcorr"  # under the data root: staging, partial stores, locks


def work_root(data_root: Path) -> Path:
    """``<data_root>/.semcorr``: the pipeline's private working folder."""
    return Path(data_root) / WORK_DIR


@contextmanager
def staged(target: Path, work: Path) -> Iterator[Path]:
    """Yield a fresh path (not yet created) to build ``target`` in; on success, ``target``
    is replaced by it with a rename. On error ``target`` is left as it was."""
    target = Path(target)
    root = Path(work) / "staging"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    key = f"{target.name}-{uuid.uuid4().hex[:12]}"
    with _held(root / f"{key}.lock"):
        tmp = root / key
        try:
            yield tmp
            replace(tmp, target, root / f"{key}.old")
        finally:
            _remove(tmp)
            _remove(root / f"{key}.old")


def replace(source: Path, target: Path, trash: Path) -> None:
    """Put ``source`` (file or folder) at ``target``; an old ``target`` goes to ``trash``
    first (one rename each, so a reader sees the old output or the new one, never a mix)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        os.replace(target, trash)
    try:
        os.replace(source, target)
    except OSError:
        if trash.exists() and not target.exists():
            os.replace(trash, target)  # put the old output back
        raise
    _remove(trash)


def remove_stale(root: Path) -> list[Path]:
    """Remove staging folders whose process is gone (their lock is free); returns them."""
    removed = []
    if not root.is_dir():
        return removed
    for lock in root.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # in use by a live stage
        try:
            for leftover in (lock.with_suffix(""), lock.with_suffix(".old")):
                if leftover.exists() or leftover.is_symlink():
                    _remove(leftover)
                    removed.append(leftover)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    for orphan in root.iterdir():  # folders whose lock file is already gone
        if not orphan.name.endswith(".lock") and not (root / f"{orphan.name.removesuffix('.old')}.lock").exists():
            _remove(orphan)
            removed.append(orphan)
    return removed


@contextmanager
def _held(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        Path(lock_path).unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target`` (a file or a folder); on success it replaces
    ``target``. Temp paths of dead processes (the pid is in the name) are removed first.

    For the library's own outputs (tables, downloads, state files); stages build theirs
    with `staged`, outside every result tree.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        pid = stale.name.removeprefix(f".tmp-{target.name}-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, obj) -> Path:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
