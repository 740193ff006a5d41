"""`semcorr extract --launcher slurm --jobs N`: a job array through submitit, here with
submitit's local executor (params ``launch.slurm.cluster: local``: each task a process on
this machine; a real cluster is out of reach). The tasks extract their shard ranges, the
stage waits for them and finalises: the store is bitwise the single-process one. A failed
task is named with its log, nothing is promoted, and the rerun redoes only its shards."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from semcorr.pipeline.store import StoreError, open_store
from test_extract import N_IMAGES, assert_same_store
from test_torchrun import partial_of, stage_env, stage_workspace, store_of

pytestmark = pytest.mark.slow
LOCAL_ARRAY = {"launcher": "none", "jobs": 1, "slurm": {
    "cluster": "local", "partition": None, "account": None, "gpus_per_task": 0, "cpus_per_task": 1, "mem_gb": 4,
    "time_min": 10, "setup": []}}


def extract_on_array(ws: Path, jobs: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages", "extract", "--dataset", "pfwillow", "--backbone", "slow",
           "--launcher", "slurm", "--jobs", str(jobs)]
    return subprocess.run(cmd, cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=600)


def test_a_job_array_fills_the_store_and_a_failed_task_is_redone(tmp_path, willow_root, reference):
    """A task that fails (a broken image in its shards) is named with its log and nothing is
    promoted; the other task's shards are kept. Fixed, a second array redoes only the failed
    task's shards, and the stage finalises the single-process store."""
    ws = stage_workspace(tmp_path / "ws", willow_root, launch=LOCAL_ARRAY)
    table = ws / "data" / "prepared" / "pfwillow" / "images.parquet"
    images = pd.read_parquet(table)
    broken = images.copy()
    broken.loc[5, "path"] = str(tmp_path / "broken.jpg")  # in shard 1 (4 images a shard): task 1 of 2
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    broken.to_parquet(table, index=False)
    failed = extract_on_array(ws, 2)
    assert failed.returncode == 1
    assert re.search(r"error: 1 of 2 array tasks failed: task \S+ \(--shard 1/2\): error: \S*broken.jpg: "
                     r"cannot read image .*\(log: \S+\.err\)$", " ".join(failed.stderr.split())), failed.stderr
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(store_of(ws))
    partial = open_store(partial_of(ws), complete=False)  # task 0's shards, kept for the rerun
    assert [s for s in range(partial.n_shards) if not partial.check_shard(s)] == [0, 2, 4]

    images.to_parquet(table, index=False)
    done = extract_on_array(ws, 2)
    assert done.returncode == 0, done.stderr
    assert (f"2 array tasks: 8 images extracted, 12 already there, {N_IMAGES} in the store (complete)"
            in " ".join(done.stderr.split())), done.stderr
    assert_same_store(store_of(ws), reference)
    jobs = ws / "data" / ".semcorr" / "slurm" / "slow-pfwillow"
    assert len(list(jobs.glob("*_result.pkl"))) == 4  # two arrays of two submitit jobs
