"""Stages `head` and `head_apply`: a light post-processor trained from the feature cache, and
its features as the variant ``<B>_head`` (`pipeline.head`).

``semcorr head --backbone B`` trains on the trn pairs of ``head.train_dataset`` from
``data/features/<B>/<train_dataset>.zarr`` (epoch chosen on its val pairs) and writes, as one
unit::

    data/weights/<B>_head/   head.pth (state dict), weights.json (sha256, head settings, base
                             store, best epoch and val PCK), curve.csv (one row per epoch)

``semcorr head_apply --dataset D --backbone B`` runs it over every map (mirrored maps too, if
the store has them) of ``data/features/<B>/<D>.zarr`` into ``data/features/<B>_head/<D>.zarr``,
a feature store like any other (match, pose alignment, evaluate and report read it as they
read ``<B>``). Both read only the cache and the tables: never an image, never a backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, expected_store_attrs, weights_info
from semcorr.stages.params import DEFAULT_PARAMS, load_params

STAGE_KEYS = ("train_dataset",)  # head params that belong to the stage, not to the training loop


def head_variant(backbone: str) -> str:
    return f"{backbone}_head"


def _base_store(data_root: Path, backbone: str, dataset: str, model: dict, flips: bool):
    """The backbone's store of ``dataset``, refused if made with other settings than params say."""
    from semcorr.pipeline.store import open_store

    expect = expected_store_attrs(backbone, backbone, None, model, weights_info(data_root, backbone), dataset, flips)
    return open_store(data_root / "features" / backbone / f"{dataset}.zarr", expect=expect)


def main(backbone: str, model: dict, flips: bool, head_conf: dict, data_root: Path = DATA) -> Path:
    """Train the head of ``backbone`` (``model``: params ``backbone.<key>.model``; ``flips``:
    ``extract.flips``; ``head_conf``: params ``head``); returns its weights folder."""
    import pandas as pd
    import torch

    from semcorr.pipeline.head import train_head
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.tables import read_pairs
    from semcorr.pipeline.weights import sha256_file

    data_root = Path(data_root)
    dataset = head_conf["train_dataset"]
    conf = {k: v for k, v in head_conf.items() if k not in STAGE_KEYS}
    store = _base_store(data_root, backbone, dataset, model, flips)
    pairs = read_pairs(data_root / "prepared" / dataset)
    console.print(f"head {head_variant(backbone)}: training on {dataset} trn from {store.path}")
    result = train_head(store, pairs[pairs["split"] == "trn"], pairs[pairs["split"] == "val"], conf,
                        log=lambda line: console.print(line, highlight=False))
    out = data_root / "weights" / head_variant(backbone)
    with staged(out, work_root(data_root)) as folder:
        folder.mkdir(parents=True)
        torch.save(result.state_dict, folder / "head.pth")
        pd.DataFrame(result.curve).to_csv(folder / "curve.csv", index=False)
        write_json(folder / "weights.json", {
            "file": "head.pth", "sha256": sha256_file(folder / "head.pth"), "source": "head",
            "base": backbone, "base_sha256": store.attrs.get("weights_sha256"),
            "random_init": bool(store.attrs.get("random_init")),  # a head on random-init features is no trained model
            "train_dataset": dataset, "head": result.conf, "in_dim": result.in_dim, "best_epoch": result.best_epoch,
            "best_val_pck": result.best_val_pck, "base_val_pck": result.base_val_pck,
        })
    console.print(f"wrote {out}: best epoch {result.best_epoch}, val PCK {result.best_val_pck:.4f} "
                  f"(untrained head = backbone: {result.base_val_pck:.4f})")
    return out


def apply(dataset: str, backbone: str, model: dict, flips: bool, data_root: Path = DATA) -> Path:
    """``data/features/<B>/<D>.zarr`` through the trained head -> ``data/features/<B>_head/<D>.zarr``."""
    import torch

    from semcorr.pipeline.head import apply_head, head_store_attrs, load_head
    from semcorr.pipeline.io import staged, work_root
    from semcorr.pipeline.store import write_store

    data_root = Path(data_root)
    variant = head_variant(backbone)
    store = _base_store(data_root, backbone, dataset, model, flips)
    folder = data_root / "weights" / variant
    info = weights_info(data_root, variant)
    head = load_head(folder / info["file"], int(info["in_dim"]), info["head"])
    if int(store.attrs["feat_dim"]) != head.in_dim:
        raise ValueError(f"{store.path}: {store.attrs['feat_dim']}-channel features, the head in {folder} takes "
                         f"{head.in_dim}; re-run `semcorr head --backbone {backbone}`")
    attrs = head_store_attrs(store.attrs, variant, head.out_dim, info["sha256"], bool(store.attrs["flips"]))
    out = data_root / "features" / variant / f"{dataset}.zarr"
    console.print(f"head {variant}: {len(store)} images of {store.path}")
    threads = torch.get_num_threads()
    if info["head"].get("threads"):  # the head's own setting: one thread is ~5x faster on small maps
        torch.set_num_threads(int(info["head"]["threads"]))
    try:
        with staged(out, work_root(data_root)) as tmp:
            write_store(tmp, attrs, apply_head(head, store), shard_images=store.shard_images)
    finally:
        torch.set_num_threads(threads)
    console.print(f"wrote {out}")
    return out


def _head_params(params: Path, backbone: str):
    p = load_params(params)
    if backbone not in p.head_backbones:
        raise ValueError(f"--backbone {backbone!r}: not in `head_backbones` ({', '.join(p.head_backbones) or 'empty'})")
    return p, p.backbone_conf(backbone).model.model_dump()


def command(
    backbone: Annotated[str, typer.Option(help="backbone key (in head_backbones)")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Train a light post-processor on cached features (no backbone runs)."""
    with clean_errors():
        p, model = _head_params(params, backbone)
        main(backbone, model, p.extract.flips, p.head.model_dump())


def apply_command(
    dataset: Annotated[str, typer.Option(help="dataset key")],
    backbone: Annotated[str, typer.Option(help="backbone key (in head_backbones)")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Run the trained head over a cached store: the feature variant <backbone>_head."""
    with clean_errors():
        p, model = _head_params(params, backbone)
        p.dataset(dataset)
        apply(dataset, backbone, model, p.extract.flips)

