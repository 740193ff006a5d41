"""Atomic outputs: write to a temp path beside the target, rename when complete.

A later stage never sees a half-written file or folder, and an interrupted run
leaves only a ``.tmp-*`` sibling that the next run removes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a fresh temp path next to ``target``; on success replace ``target`` by it.

    Works for files and folders. On error the temp path is removed and ``target``
    is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        _remove(stale)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            _remove(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_json(path: Path, obj) -> Path:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
