"""Stage `finetune`: train the last N blocks of ``backbone.<B>`` on ``finetune.train_dataset``.

Outputs (each written as one unit when training ends)::

    data/weights/<B>_ft<N>/      model.pth (full state dict), weights.json (sha256, best epoch, base)
    data/finetune/<B>_ft<N>/state/  state.pt (last epoch's training state), curve.csv
    data/finetune/<B>_ft<N>/live/   dvclive: metrics.json and plots/metrics/*.tsv, written every epoch

Work in progress (per-epoch resume state, prefix cache) lives in
``data/.semcorr/partial/finetune/<B>_ft<N>/``: a killed run resumes from its last epoch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console
from semcorr.stages.params import DEFAULT_PARAMS, load_params

# finetune params that belong to the stage, not to the training loop
STAGE_KEYS = ("train_dataset", "device")


def tuned_variant(backbone: str, depth: int) -> str:
    return f"{backbone}_ft{depth}"


def main(backbone: str, depth: int, model: dict, ft: dict, data_root: Path = DATA) -> Path:
    """Fine-tune ``backbone`` (``model`` = params ``backbone.<key>.model``, ``ft`` = params
    ``finetune``) at ``depth``; returns the tuned weights folder."""
    from semcorr.pipeline.backbones import build_backbone
    from semcorr.pipeline.extract import resolve_device
    from semcorr.pipeline.finetune import finetune, save_tuned, write_curve
    from semcorr.pipeline.io import staged, work_root
    from semcorr.pipeline.tables import read_images, read_pairs
    from semcorr.stages.extract import backbone_spec

    data_root = Path(data_root)
    variant = tuned_variant(backbone, depth)
    spec, _ = backbone_spec(model, data_root / "weights" / backbone)
    prepared = data_root / "prepared" / ft["train_dataset"]
    pairs, images = read_pairs(prepared), read_images(prepared)
    conf = {k: v for k, v in ft.items() if k not in STAGE_KEYS} | {"depth": int(depth)}
    work = work_root(data_root) / "partial" / "finetune" / variant
    live_dir = data_root / "finetune" / variant / "live"
    live = DvcLiveCurve(live_dir)
    result = finetune(
        build_backbone(spec), pairs[pairs["split"] == "trn"], pairs[pairs["split"] == "val"], images, work, conf,
        resolve_device(ft["device"]), on_row=live, log=lambda line: console.print(line, highlight=False),
    )
    meta = {
        "source": "finetune", "base": backbone, "base_sha256": spec.sha256, "depth": int(depth),
        "random_init": spec.random_init,  # tuned from an untrained base: still not a trained model
        "train_dataset": ft["train_dataset"], "best_epoch": result.best_epoch, "best_val_pck": result.best_val_pck,
        "base_val_pck": result.base_val_pck, "trained_parameters": result.trainable,
    }
    out = save_tuned(data_root / "weights" / variant, result.state_dict, meta, work_root(data_root))
    with staged(data_root / "finetune" / variant / "state", work_root(data_root)) as state:
        state.mkdir(parents=True)
        shutil.copy2(work / "state" / "state.pt", state / "state.pt")
        write_curve(state / "curve.csv", result.curve)
    shutil.rmtree(work)  # finished: the outputs hold it now; a re-run trains afresh
    console.print(f"wrote {out}: best epoch {result.best_epoch}, val PCK {result.best_val_pck:.4f} "
                  f"(untuned {result.base_val_pck:.4f})")
    return out


class DvcLiveCurve:
    """dvclive logger of the curve: one step per epoch (epoch 0 = the untuned backbone)."""

    def __init__(self, folder: Path):
        import warnings

        with warnings.catch_warnings():  # dvclive imports pynvml, which warns about itself
            warnings.simplefilter("ignore", FutureWarning)
            from dvclive import Live
        if folder.exists():
            shutil.rmtree(folder)  # the run's rows are replayed from the resume state
        self.live = Live(dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)

    def __call__(self, row: dict) -> None:
        self.live.step = int(row["epoch"])
        for name in ("val_pck", "loss", "lr"):
            value = row[name]
            if value == value:  # the untuned row has no loss
                self.live.log_metric(name, float(value))
        self.live.next_step()


def command(
    backbone: Annotated[str, typer.Option(help="backbone key (backbone.<key> in params)")],
    depth: Annotated[int, typer.Option(help="number of last transformer blocks to train (2, 4, 6)")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Fine-tune the last N blocks of a backbone with Gaussian cross-entropy."""
    with clean_errors():
        p = load_params(params)
        p.variant(tuned_variant(backbone, depth))
        main(backbone, depth, p.backbone_conf(backbone).model.model_dump(), p.finetune.model_dump())
