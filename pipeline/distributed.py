"""Scale-out on the engines a cluster already runs: torchrun ranks and SLURM job arrays.

`Team` is the set of processes that share one extraction's shards: this process alone, or
the ranks of a torchrun (`torchrun_team`: one or many nodes). Rank r of K takes every K-th
shard, rank 0 prepares the store before the others plan, and finalises it after a barrier
(`pipeline.extract.extract_features`). The process group is gloo whatever the device: it
carries only a barrier and a few small messages, never features.

`run_array` runs one command per shard range as the tasks of a SLURM job array, through
submitit (or submitit's local executor, which runs them as processes here: the tests), and
waits for all of them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

default_slurm_conf = {
    "cluster": "slurm",  # slurm; local = submitit's local executor: the tasks run on this machine
    "partition": None,  # sbatch --partition; None = the cluster's default
    "account": None,  # sbatch --account; None = the user's default
    "gpus_per_task": 1,  # GPUs of each task (a task extracts one shard range)
    "cpus_per_task": 8,  # for the DataLoader workers that decode and resize
    "mem_gb": 32,  # memory of each task
    "time_min": 240,  # wall-time limit of each task, minutes
    "setup": [],  # shell lines each task runs first, e.g. module load cuda, source .venv/bin/activate
}


class Team:
    """This process alone: rank 0 of 1, barriers and broadcasts are no-ops."""

    rank: int = 0
    size: int = 1
    local_rank: int | None = None  # the GPU index on its node, under torchrun

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def broadcast(self, value):
        """``value`` of rank 0, on every rank."""
        return value

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        return [value]

    def on_leader(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 and hand its result, or its exception, to every rank (so that
        no rank waits forever for a rank 0 that failed)."""
        outcome = None
        if self.leader:
            try:
                outcome = (True, work())
            except Exception as exc:
                outcome = (False, _portable(exc))
        ok, value = self.broadcast(outcome)
        if not ok:
            raise value
        return value


class TorchTeam(Team):
    """The ranks of a torch.distributed process group."""

    def __init__(self, rank: int, size: int, local_rank: int):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, value):
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out


def under_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (or another launcher of the same
    ``env://`` convention)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextlib.contextmanager
def torchrun_team(timeout_s: float = 24 * 3600) -> Iterator[Team]:
    """The ranks of this torchrun as a `Team` (a gloo process group from torchrun's ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), or this process alone
    when not under torchrun. ``timeout_s`` bounds a barrier: the ranks that finish first wait
    there for the slowest (a rank that dies ends the others at once: torchrun stops them)."""
    if not under_torchrun():
        yield Team()
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield TorchTeam(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    finally:
        dist.destroy_process_group()


class ArrayError(RuntimeError):
    """A task of a job array failed; the message names each failed task and its log files."""


def run_array(command: Sequence[str], task_args: Sequence[Sequence[str]], folder: Path, conf: dict | None = None,
              cwd: Path | None = None, name: str = "semcorr") -> list[str]:
    """Run ``command + task_args[j]`` for every j as task j of one job array and wait for all of
    them; returns each task's stdout. ``conf``: `default_slurm_conf` keys. Logs and submitit's
    files go to ``folder``. The tasks inherit the job's environment (credentials stay there,
    never in the pickled submission). Raises `ArrayError` once every task has ended if any
    failed; an interrupted wait cancels the tasks still queued or running."""
    import submitit
    from submitit.helpers import CommandFunction

    conf = {**default_slurm_conf, **(conf or {})}
    executor = submitit.AutoExecutor(folder=Path(folder), cluster=conf["cluster"])
    params = dict(name=name, timeout_min=conf["time_min"], mem_gb=conf["mem_gb"], cpus_per_task=conf["cpus_per_task"],
                  gpus_per_node=conf["gpus_per_task"], tasks_per_node=1, nodes=1)
    if conf["cluster"] == "slurm":
        params.update(slurm_setup=list(conf["setup"]), slurm_array_parallelism=len(task_args),
                      **{f"slurm_{k}": conf[k] for k in ("partition", "account") if conf[k] is not None})
    else:
        params.update(local_setup=list(conf["setup"]))
    executor.update_parameters(**params)
    function = CommandFunction([str(part) for part in command], verbose=False, cwd=cwd)
    with executor.batch():
        jobs = [executor.submit(function, *args) for args in task_args]
    outputs, failures = [], []
    try:
        for job, args in zip(jobs, task_args):
            try:
                outputs.append(job.result())
            except Exception as exc:  # submitit's FailedJobError / UncompletedJobError
                failures.append(f"task {job.job_id} ({' '.join(map(str, args))}): {_last_error(job, exc)} "
                                f"(log: {job.paths.stderr})")
    except BaseException:
        for job in jobs:
            job.cancel(check=False)
        raise
    if failures:
        raise ArrayError(f"{len(failures)} of {len(jobs)} array tasks failed: " + "; ".join(failures))
    return outputs


def _last_error(job, exc: Exception) -> str:
    """The failed task's own last ``error:`` line (semcorr's one-line errors), else the last line
    of its log or of submitit's exception."""
    lines = [line.strip() for line in (job.stderr() or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    fallback = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (errors or lines or fallback or [type(exc).__name__])[-1]


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (to be sent to the other ranks), else a RuntimeError with its message."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(str(exc))
