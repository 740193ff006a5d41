"""Stage `download`: one dataset -> ``data/raw/<name>/``, one backbone's weights ->
``data/weights/<name>/``, or an embedded set (synthetic, synthvideo) -> ``data/raw/<name>/``.

Copies of a local ``source`` are reflinks where the file system supports them, else
plain copies, so nothing under ``data/`` shares its bytes with the user's mirror.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console
from semcorr.stages.params import DEFAULT_PARAMS, load_params


def main(name: str, conf: dict, data_root: Path = DATA, force: bool = False) -> Path:
    """``conf``: params ``download.<name>`` for a dataset (or an embedded set), ``backbone.<name>.weights``
    for a backbone (keys checkpoint, source, sha256, random_init)."""
    from semcorr.pipeline.datasets import GENERATED, generator
    from semcorr.pipeline.download import DATASETS, VIDEO_DATASETS, download_dataset, download_weights

    data_root = Path(data_root)
    if name in GENERATED:
        from semcorr.pipeline.io import staged, work_root

        out = data_root / "raw" / name
        with staged(out, work_root(data_root)) as tmp:
            generator(name).generate(tmp, conf)
        return out
    source = Path(conf["source"]) if conf.get("source") else None
    if name in DATASETS or name in VIDEO_DATASETS:
        return download_dataset(name, data_root / "raw" / name, source, data_root / "downloads", force=force)
    return download_weights(name, data_root / "weights" / name, conf.get("checkpoint"), source,
                            bool(conf.get("random_init")), sha256=conf.get("sha256"),
                            cache_dir=data_root / "downloads", force=force)


def command(
    name: Annotated[str, typer.Argument(help="dataset key (download.<name>, e.g. spair, davis, synthetic) or backbone key (backbone.<name>)")],
    force: Annotated[bool, typer.Option(help="fetch or copy again even if the output looks complete")] = False,
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Download (or copy from its `source`) one dataset or one backbone's weights, checksummed."""
    with clean_errors():
        p = load_params(params)
        datasets = [d for d in type(p.download).model_fields if getattr(p.download, d) is not None]
        if name in datasets:
            conf = getattr(p.download, name).model_dump()
        elif name in p.backbone:
            conf = p.backbone[name].weights.model_dump()
        else:
            raise KeyError(f"{params}: {name!r} is neither a dataset with a `download.<name>` section "
                           f"({', '.join(datasets)}) nor a backbone with a `backbone.<name>` section "
                           f"({', '.join(p.backbone)})")
        out = main(name, conf, force=force)
        console.print(f"wrote {out}")
