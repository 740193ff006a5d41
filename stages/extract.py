"""Stage `extract`: ``data/prepared/<dataset>/images.parquet`` + ``data/weights/<variant>/``
-> ``data/features/<variant>/<dataset>.zarr`` (variant = backbone key, or ``<key>_ft<N>``).

The store is built in ``data/.semcorr/partial`` (resumed there after a kill) and moved into
place only when complete and verified; see `pipeline.extract.extract_features`.

Scale-out, same command: under ``torchrun --nproc_per_node=K -m stages extract ...`` each rank
extracts its share of the shards and rank 0 finalises; with ``--launcher slurm --jobs N``
(or params ``launch``) the stage submits a SLURM job array of N tasks (submitit), waits for
it and finalises, so ``dvc repro`` stays one command. ``--store s3://bucket/prefix/...``
writes the store on object storage instead (outside DVC; credentials from the AWS environment).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, weights_info
from semcorr.stages.params import DEFAULT_PARAMS, load_params

LAUNCHERS = ("none", "slurm")


def backbone_spec(model: dict, weights_dir: Path):
    """``backbone.<key>.model`` params + ``<weights_dir>/weights.json`` -> (BackboneSpec, weights sha256)."""
    from semcorr.pipeline.backbones import BackboneSpec

    info = weights_info(Path(weights_dir).parent.parent, Path(weights_dir).name)
    weights = str(Path(weights_dir) / info["file"]) if info.get("file") else None
    spec = BackboneSpec(
        family=model["family"], variant=model["variant"], weights=weights, sha256=info.get("sha256"),
        random_init=bool(info.get("random_init", False)), layer=model["layer"], input_size=int(model["input_size"]),
        resize=model["resize"], arch=dict(model["arch"] or {}),
    )
    return spec, info.get("sha256") if weights else None


def parse_part(text: str) -> tuple[int, int]:
    """``'i/n'`` -> (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: expected 0 <= i < n")
    return i, n


def main(dataset: str, backbone: str, model: dict, extract_conf: dict, tuned: int | str | None = None,
         part: tuple[int, int] = (0, 1), data_root: Path = DATA, progress: bool = True, store: str | None = None,
         launch: dict | None = None, params: Path = DEFAULT_PARAMS, finish: bool = True,
         replace: bool = False) -> Path | str:
    """Extract the features of every image of ``dataset`` with backbone ``backbone``
    (``model`` = params ``backbone.<key>.model``, ``extract_conf`` = params ``extract``).

    ``store``: the store path or URL (default ``<data_root>/features/<variant>/<dataset>.zarr``).
    ``launch``: params ``launch``; with ``launcher: slurm`` the shards of ``part`` are extracted
    by ``jobs`` array tasks, each running this stage (``params`` is the file they read) with
    ``finish=False``, which prints its counts as a JSON line on stdout for the submitter.
    Under torchrun every rank takes its share of ``part``.
    """
    from semcorr.pipeline.backbones import build_backbone
    from semcorr.pipeline.distributed import torchrun_team, under_torchrun
    from semcorr.pipeline.extract import extract_by_tasks, extract_features, store_attrs
    from semcorr.pipeline.io import work_root
    from semcorr.pipeline.store import store_path
    from semcorr.pipeline.tables import read_images

    data_root = Path(data_root)
    launch = launch or {"launcher": "none"}
    if launch["launcher"] not in LAUNCHERS:
        raise ValueError(f"--launcher {launch['launcher']!r}: expected one of {', '.join(LAUNCHERS)}")
    variant = backbone if tuned is None else f"{backbone}_ft{tuned}" if isinstance(tuned, int) else f"{backbone}_{tuned}"
    spec, sha256 = backbone_spec(model, data_root / "weights" / variant)
    images = read_images(data_root / "prepared" / dataset)
    net = build_backbone(spec)
    attrs = store_attrs(net, backbone, variant, dataset, sha256, extract_conf["flips"], tuned)
    out = store or store_path(data_root / "features", variant, dataset)
    work = work_root(data_root)
    if launch["launcher"] == "slurm":
        if under_torchrun():
            raise ValueError("--launcher slurm submits a job array: run it once, not under torchrun")
        command = _task_command(dataset, backbone, tuned, params, data_root, store)

        def run_tasks() -> list[dict]:
            from semcorr.pipeline.distributed import run_array

            i, n, jobs = *part, int(launch["jobs"])
            outputs = run_array(command, [["--shard", f"{i + n * j}/{n * jobs}"] for j in range(jobs)],
                                work / "slurm" / f"{variant}-{dataset}", launch["slurm"], cwd=_code_root(),
                                name=f"extract-{variant}-{dataset}")
            return [json.loads(output.strip().splitlines()[-1]) for output in outputs]

        result = extract_by_tasks(net, images, out, attrs, run_tasks, extract_conf, part=part, work_root=work,
                                  replace=replace)
        who = f"{launch['jobs']} array tasks: "
    else:
        with torchrun_team() as team:
            result = extract_features(net, images, out, attrs, extract_conf, part=part, progress=progress,
                                      work_root=work, team=team, finish=finish, replace=replace)
        who = f"rank {team.rank}/{team.size}: " if team.size > 1 else ""
    status = "complete" if result.complete else "waiting for other parts"
    console.print(f"{out}: {who}{result.extracted} images extracted, {result.skipped} already there, "
                  f"{result.images} in the store ({status}) in {result.seconds:.1f} s", highlight=False)
    if not finish:
        print(json.dumps({"extracted": result.extracted, "skipped": result.skipped}), flush=True)
    return out


def _task_command(dataset: str, backbone: str, tuned: int | str | None, params: Path, data_root: Path,
                  store: str | None) -> list[str]:
    """What an array task runs: this stage on its shard range (``--shard`` is appended per task),
    from the code this process runs (``python -m stages`` in its repository: the code DVC hashes)."""
    command = [sys.executable, "-m", "stages", "extract", "--dataset", dataset, "--backbone", backbone,
               "--params", str(Path(params).resolve()), "--data-root", str(Path(data_root).resolve()),
               "--launcher", "none", "--no-finish"]
    if tuned is not None:
        command += ["--tuned", str(tuned)]
    if store is not None:
        command += ["--store", store]
    return command


def _code_root() -> Path:
    """The repository whose ``stages`` package runs now (a task's working directory)."""
    from semcorr import stages

    return Path(stages.__file__).resolve().parent.parent


def command(
    dataset: Annotated[str, typer.Option(help="dataset key (data/prepared/<dataset>)")],
    backbone: Annotated[str, typer.Option(help="backbone key (backbone.<key> in params)")],
    tuned: Annotated[str | None, typer.Option(help="use tuned weights: N (the last N blocks, <key>_ft<N>) or "
                                                   "loraR (LoRA of rank R, <key>_lora<R>)")] = None,
    shard: Annotated[str, typer.Option(help="i/n: fill only the store shards s with s % n == i")] = "0/1",
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
    launcher: Annotated[str | None, typer.Option(
        help="none: this process (under torchrun: each rank takes its share); slurm: a job array of --jobs "
             "tasks, waited for, then finalised here [default: params launch.launcher]")] = None,
    jobs: Annotated[int | None, typer.Option(
        min=1, help="slurm: tasks of the job array [default: params launch.jobs]")] = None,
    store: Annotated[str | None, typer.Option(
        help="write the store here instead of data/features/<variant>/<dataset>.zarr, e.g. "
             "s3://bucket/features/<variant>/<dataset>.zarr (credentials from the AWS environment)")] = None,
    replace: Annotated[bool, typer.Option(
        help="with --store URL: delete a store of another configuration there first (only while no extract "
             "of it runs)")] = False,
    finish: Annotated[bool, typer.Option(
        hidden=True, help="finalise the store (array tasks leave it to their submitter)")] = True,
    data_root: Annotated[Path, typer.Option(hidden=True, help="data folder (array tasks run elsewhere)")] = DATA,
) -> None:
    """Dense features of every image of a dataset into a zarr feature store."""
    with clean_errors():
        p = load_params(params)
        p.any_dataset(dataset)
        model = p.backbone_conf(backbone).model.model_dump()
        if tuned is not None:
            _, tuned = p.variant(f"{backbone}_ft{tuned}" if tuned.isdigit() else f"{backbone}_{tuned}")
        launch = p.launch.model_dump()
        launch.update({k: v for k, v in (("launcher", launcher), ("jobs", jobs)) if v is not None})
        main(dataset, backbone, model, p.extract.model_dump(), tuned, parse_part(shard), data_root=data_root,
             store=store, launch=launch, params=params, finish=finish, replace=replace)
