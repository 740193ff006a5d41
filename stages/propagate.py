"""Stage `propagate`: a video dataset's feature store + its frames and first-frame labels ->
``data/predictions/<V>/<D>/propagation/`` (the video sets' one method), written as one unit::

    masks.parquet       segmentation sets: the predicted label map of every frame after the first
                        (original pixels; the masks-table layout of `pipeline.tables`)
    keypoints.parquet   pose sets: the predicted joints of every frame after the first (original
                        pixels; ``visible`` = tracked, i.e. the joint's first-frame heatmap is on the grid)
    setting.json        what made it: propagation params, store attrs, the tables' and every file's sha256

The rule and its params are `pipeline.propagation`'s. Reads only the feature cache and the
prepared tables, and of the label tables only the first frame's rows: never an image, a
backbone or a later frame's ground truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, steps, variant_store_attrs
from semcorr.stages.params import DEFAULT_PARAMS, load_params

# Store attrs copied into the setting every report states (as the match stage's).
SETTING_ATTRS = ("backbone", "family", "model", "random_init", "weights_sha256", "layer", "input_size", "resize",
                 "patch_size", "tuned_depth")
LABEL_TABLES = ("masks", "keypoints")
RULE_KEYS = ("n_context", "radius", "topk", "temperature")  # the params a propagation depends on


METHOD = "propagation"  # the method slot of the predictions / eval layout


def propagation_dir(data_root: Path, variant: str, dataset: str) -> Path:
    return Path(data_root) / "predictions" / variant / dataset / METHOD


def table_hashes(prepared: Path) -> dict[str, str]:
    """sha256 of the frames table and of each label table the prepared folder has."""
    from semcorr.pipeline.weights import sha256_file

    names = ("frames", *LABEL_TABLES)
    return {name: sha256_file(prepared / f"{name}.parquet") for name in names
            if (prepared / f"{name}.parquet").is_file()}


def main(dataset: str, variant: str, conf: dict, expect: dict | None = None, data_root: Path = DATA) -> Path:
    """Propagate frame 0's labels through every sequence of ``dataset`` with the ``variant``
    features; returns the output folder. ``conf``: params ``propagate`` (n_context, radius,
    topk, temperature, device); ``expect``: store attrs the store must have."""
    import time

    import numpy as np
    import pandas as pd
    import torch

    from semcorr.pipeline import propagation
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.store import open_store
    from semcorr.pipeline.tables import (MASK_COLUMNS, VIDEO_KEYPOINT_COLUMNS, TableError, decode_mask, encode_mask,
                                         flatten, keypoints, mask_objects, read_frames, read_video_labels)
    from semcorr.pipeline.weights import sha256_file
    from semcorr.stages.match import _train_dataset

    data_root = Path(data_root)
    prepared = data_root / "prepared" / dataset
    frames = read_frames(prepared)
    labels = {kind: read_video_labels(prepared, kind) for kind in LABEL_TABLES}
    if all(table is None for table in labels.values()):
        raise TableError(f"{prepared}: no masks or keypoints table; run `semcorr prepare {dataset}` first")
    first = {kind: table[table["frame"] == 0].set_index("sequence")  # frame 0's labels: all the rule may read
             for kind, table in labels.items() if table is not None}
    device = conf.get("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    lib_conf = propagation.check_conf({**{k: conf[k] for k in RULE_KEYS}, "device": device})
    store = open_store(data_root / "features" / variant / f"{dataset}.zarr", expect=expect)
    out_rows: dict[str, list[dict]] = {kind: [] for kind in first}
    sequences = list(frames.groupby("sequence", sort=True))
    started, n_frames = time.perf_counter(), 0
    for sequence, group in steps(sequences, f"propagate {variant}/{dataset}", label=lambda item: item[0]):
        ids = group["image_id"].tolist()
        transform = store.transform(ids[0])
        for frame, image_id in enumerate(ids):
            if store.transform(image_id) != transform:
                raise ValueError(f"{store.path}: frame {frame} of {sequence!r} ({image_id}) has another grid or "
                                 f"image size than frame 0; a sequence's frames must share one")
        channels, n_labels = [], 0
        if "masks" in first:
            row = first["masks"].loc[sequence]
            mask = decode_mask(row["mask"], row["height"], row["width"])
            n_labels = mask_objects(mask) + 1
            channels.append(propagation.mask_to_grid(mask, n_labels, transform))
        if "keypoints" in first:
            row = first["keypoints"].loc[sequence]
            channels.append(propagation.keypoints_to_grid(keypoints(row["kps"]), np.asarray(row["visible"]), transform))
        stacked = torch.cat(channels)
        for t, soft in propagation.propagate(lambda t: store.features(ids[t]), len(ids), stacked, lib_conf):
            base = {"sequence": sequence, "frame": t, "image_id": ids[t]}
            if "masks" in first:
                out_rows["masks"].append({**base, "height": transform.image_h, "width": transform.image_w,
                                          "mask": encode_mask(propagation.grid_to_mask(soft[:n_labels], transform))})
            if "keypoints" in first:
                xy, tracked = propagation.grid_to_keypoints(soft[n_labels:], transform)
                out_rows["keypoints"].append({**base, "kps": flatten(xy), "visible": tracked.tolist()})
        n_frames += len(ids) - 1
    seconds = time.perf_counter() - started
    columns = {"masks": MASK_COLUMNS, "keypoints": VIDEO_KEYPOINT_COLUMNS}
    setting = {
        "variant": variant, "dataset": dataset, "propagate": {k: conf[k] for k in RULE_KEYS},
        "rule": {"select": lib_conf["select"], "first_frame": "all cells", "recent_frames": "cells closer than radius",
                 "keypoint_sigma": propagation.KEYPOINT_SIGMA, "keypoint_window": propagation.KEYPOINT_WINDOW},
        "tables": table_hashes(prepared), "sequences": len(sequences), "frames": n_frames,
        **{k: store.attrs.get(k) for k in SETTING_ATTRS},
        "train_dataset": _train_dataset(data_root, variant),
    }
    out = propagation_dir(data_root, variant, dataset)
    with staged(out, work_root(data_root)) as folder:
        folder.mkdir(parents=True)
        for kind, rows in out_rows.items():
            pd.DataFrame(rows, columns=columns[kind]).to_parquet(folder / f"{kind}.parquet", index=False)
        files = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
        write_json(folder / "setting.json", {**setting, "files": files})
    console.print(f"propagate {variant}/{dataset}: {len(sequences)} sequences, {n_frames} frames in {seconds:.1f} s "
                  f"({seconds / max(n_frames, 1):.3f} s per frame on {device}); wrote {out}")
    return out


def command(
    dataset: Annotated[str, typer.Option(help="video dataset key (video_datasets), e.g. davis")],
    variant: Annotated[str, typer.Option(help="feature variant: backbone key or <backbone>_ft<N>")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Propagate first-frame masks / joints through each video by feature affinities."""
    with clean_errors():
        p = load_params(params)
        p.video_dataset(dataset)
        expect = variant_store_attrs(p, variant, dataset)
        main(dataset, variant, p.propagate.model_dump(), expect)
