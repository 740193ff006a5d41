"""Stage `finetune`: fine-tune ``backbone.<B>`` on ``finetune.train_dataset``, in one of two modes:

- ``--depth N``: train the last N blocks (and the head) -> variant ``<B>_ft<N>``;
- ``--lora-rank R``: train only LoRA adapters (peft) of rank R on the attention projections
  of params ``lora.depth`` last blocks (null: every block), then merge them in -> ``<B>_lora<R>``.

Outputs (each written as one unit when training ends; ``<V>`` the variant)::

    data/weights/<V>/          model.pth (full plain state dict), weights.json (sha256, best epoch, base, mode)
    data/finetune/<V>/state/   state.pt (last epoch's training state), curve.csv
    data/finetune/<V>/live/    dvclive: metrics.json and plots/metrics/*.tsv, written every epoch

Work in progress (per-epoch resume state, prefix cache) lives in
``data/.semcorr/partial/finetune/<V>/``: a killed run resumes from its last epoch.
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


def lora_variant(backbone: str, rank: int) -> str:
    return f"{backbone}_lora{rank}"


def main(backbone: str, depth: int, model: dict, ft: dict, data_root: Path = DATA) -> Path:
    """Fine-tune the last ``depth`` blocks of ``backbone`` (``model`` = params
    ``backbone.<key>.model``, ``ft`` = params ``finetune``); returns the tuned weights folder."""
    conf = {k: v for k, v in ft.items() if k not in STAGE_KEYS} | {"mode": "blocks", "depth": int(depth)}
    return _run(backbone, tuned_variant(backbone, depth), model, ft, conf, {"mode": "blocks", "depth": int(depth)},
                data_root)


def main_lora(backbone: str, rank: int, model: dict, ft: dict, lora: dict, data_root: Path = DATA) -> Path:
    """LoRA fine-tuning of ``backbone`` at ``rank`` (``lora`` = params ``lora``: alpha,
    targets, depth); returns the tuned (merged) weights folder ``<backbone>_lora<rank>``."""
    adapters = {"rank": int(rank), "alpha": float(lora["alpha"]), "targets": list(lora["targets"])}
    conf = {k: v for k, v in ft.items() if k not in STAGE_KEYS} | {"mode": "lora", "depth": lora["depth"],
                                                                  "lora": adapters}
    return _run(backbone, lora_variant(backbone, rank), model, ft, conf,
                {"mode": "lora", "depth": lora["depth"], "lora": adapters}, data_root)


def _run(backbone: str, variant: str, model: dict, ft: dict, conf: dict, record: dict, data_root: Path) -> Path:
    from semcorr.pipeline.backbones import build_backbone
    from semcorr.pipeline.extract import resolve_device
    from semcorr.pipeline.finetune import finetune, save_tuned, write_curve
    from semcorr.pipeline.io import staged, work_root
    from semcorr.pipeline.tables import read_images, read_pairs
    from semcorr.stages.extract import backbone_spec

    data_root = Path(data_root)
    spec, _ = backbone_spec(model, data_root / "weights" / backbone)
    prepared = data_root / "prepared" / ft["train_dataset"]
    pairs, images = read_pairs(prepared), read_images(prepared)
    work = work_root(data_root) / "partial" / "finetune" / variant
    live_dir = data_root / "finetune" / variant / "live"
    live = DvcLiveCurve(live_dir)
    result = finetune(
        build_backbone(spec), pairs[pairs["split"] == "trn"], pairs[pairs["split"] == "val"], images, work, conf,
        resolve_device(ft["device"]), on_row=live, log=lambda line: console.print(line, highlight=False),
    )
    meta = {
        "source": "finetune", "base": backbone, "base_sha256": spec.sha256, **record,
        "random_init": spec.random_init,  # tuned from an untrained base: still not a trained model
        "train_dataset": ft["train_dataset"], "best_epoch": result.best_epoch, "best_val_pck": result.best_val_pck,
        "base_val_pck": result.base_val_pck, "trained_parameters": result.trainable,
    }
    if result.adapted:
        meta["adapted_modules"] = result.adapted  # merged into model.pth: it loads as a plain checkpoint
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
    depth: Annotated[int | None, typer.Option(help="train the last N transformer blocks -> <backbone>_ft<N>")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="train LoRA adapters of this rank (params `lora`) -> "
                                                       "<backbone>_lora<R>")] = None,
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Fine-tune a backbone with Gaussian cross-entropy: its last N blocks, or LoRA adapters."""
    with clean_errors():
        if (depth is None) == (lora_rank is None):
            raise ValueError("give exactly one of --depth N (block fine-tuning) and --lora-rank R (LoRA)")
        p = load_params(params)
        model = p.backbone_conf(backbone).model.model_dump()
        if depth is not None:
            p.variant(tuned_variant(backbone, depth))
            main(backbone, depth, model, p.finetune.model_dump())
        else:
            p.variant(lora_variant(backbone, lora_rank))
            main_lora(backbone, lora_rank, model, p.finetune.model_dump(), p.lora.model_dump())
