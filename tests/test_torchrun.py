"""`semcorr extract` under torchrun (``python -m torch.distributed.run --nproc_per_node=2 -m
stages extract ...``, gloo on CPU): the ranks split the shards, rank 0 finalises, and the
store is bitwise the single-process one, on S3 (moto, tests/conftest.py) as on disk; a rank
killed mid-run, then a rerun, gives the same store again, redoing only the unfinished
shards. Real processes, real SIGKILL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from semcorr.pipeline.download import download_weights
from semcorr.pipeline.store import StoreError, open_store
from semcorr.stages.params import load_params
from test_extract import N_IMAGES, N_SHARDS, REPO, SLOW_BACKBONE, SLOW_EXTRACT, WILLOW, assert_same_store

pytestmark = pytest.mark.slow


def stage_workspace(folder: Path, willow_root: Path, **sections) -> Path:
    """A folder to run ``python -m stages extract --dataset pfwillow --backbone slow`` in: params
    (the demo's, plus PF-WILLOW and the slow backbone, so that every cross-check of the demo's
    still holds; ``sections`` override top-level keys), the prepared PF-WILLOW subset, and the
    slow backbone's weights record (random init)."""
    params = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    params["datasets"] = [d for d in params["datasets"] if d != "pfwillow"] + ["pfwillow"]
    params["backbones"] = params["backbones"] + ["slow"]
    params["extract"] = {**params["extract"], **SLOW_EXTRACT}
    params["download"]["pfwillow"] = {"source": str(WILLOW)}
    params["backbone"]["slow"] = {
        "weights": {"checkpoint": None, "source": None, "sha256": None, "random_init": True},
        "model": {k: SLOW_BACKBONE[k] for k in ("family", "variant", "layer", "input_size", "resize", "arch")},
    }
    params.update(sections)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(folder / "params.yaml")  # valid
    shutil.copytree(willow_root / "prepared" / "pfwillow", folder / "data" / "prepared" / "pfwillow")
    download_weights("slow", folder / "data" / "weights" / "slow", None, None, True)
    return folder


def stage_env() -> dict:
    """The environment of a stage run from a workspace folder: `python -m stages` finds this
    repository's code; gloo talks over the loopback interface."""
    return {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}


def torchrun(ws: Path, *args: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages", "extract", "--dataset", "pfwillow", "--backbone", "slow", *args]
    return subprocess.Popen(cmd, cwd=ws, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun started (its direct children with RANK set)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher.pid:
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


def store_of(ws: Path) -> Path:
    return ws / "data" / "features" / "slow" / "pfwillow.zarr"


def partial_of(ws: Path) -> Path:
    return ws / "data" / ".semcorr" / "partial" / "slow" / "pfwillow.zarr"


def test_two_ranks_give_the_single_process_store_on_s3(tmp_path, willow_root, reference, s3, bucket):
    ws = stage_workspace(tmp_path / "ws", willow_root)
    url = f"s3://{bucket}/features/slow/pfwillow.zarr"
    run = torchrun(ws, "--store", url)  # the ranks get this process's AWS environment (moto)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    text = " ".join(err.split())
    counts = sorted(int(n) for n in re.findall(r"rank \d/2: (\d+) images extracted", text))
    assert counts == [8, 12], text  # shards 1, 3 and shards 0, 2, 4 of 4 images
    assert text.count("(complete)") == 2 and not (ws / "data" / "features").exists()
    assert_same_store(url, reference)


def test_a_killed_rank_then_a_rerun_give_the_same_store(tmp_path, willow_root, reference):
    """On disk: the partial store under data/.semcorr keeps the dead rank's finished shards."""
    ws = stage_workspace(tmp_path / "ws", willow_root)
    run = torchrun(ws)
    deadline = time.monotonic() + 180
    while len(list((partial_of(ws) / "done" / "c").glob("[0-9]*"))) < 2 and run.poll() is None:
        assert time.monotonic() < deadline, "extract made no progress"
        time.sleep(0.02)
    ranks = ranks_of(run)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0  # torchrun stops the other rank and fails
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(store_of(ws))  # nothing at the output until complete
    partial = open_store(partial_of(ws), complete=False)
    intact = [s for s in range(partial.n_shards) if not partial.check_shard(s)]
    assert 2 <= len(intact) < N_SHARDS, "the run finished before the kill; make the slow backbone slower"

    rerun = torchrun(ws)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    text = " ".join(err.split())
    extracted = sum(int(n) for n in re.findall(r"rank \d/2: (\d+) images extracted", text))
    assert extracted == N_IMAGES - len(intact) * SLOW_EXTRACT["shard_images"], text  # only the unfinished shards
    assert text.count("(complete)") == 2 and not partial_of(ws).exists()  # rank 0 promoted it
    assert_same_store(store_of(ws), reference)
