"""Stage `video_eval`: ``data/predictions/<V>/<D>/propagation/`` + the prepared label tables
-> ``data/eval/<V>/<D>/propagation/``, written as one unit::

    metrics.json       numbers only: jf_mean, j_*, f_* (segmentation sets), pck@0.1, pck@0.2 (pose
                       sets), bootstrap bounds over sequences (``*_low``, ``*_high``), the
                       copy-first-frame baseline (``copy_*``) and counts
    setting.json       what they were measured under: protocol, propagation params, store attrs
    scores/per_object.csv  segmentation sets: J and F mean / recall / decay per (sequence, object)
    scores/per_joint.csv   pose sets: PCK per joint and its number of distances

The protocols are `pipeline.video_metrics`'. Refuses propagations whose recorded params or
tables differ from params and the prepared folder. Reads only tables: never an image, a
feature or a backbone (nor torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console
from semcorr.stages.params import DEFAULT_PARAMS, load_params


def video_eval_dir(data_root: Path, variant: str, dataset: str) -> Path:
    return Path(data_root) / "eval" / variant / dataset / "propagation"


def main(dataset: str, variant: str, conf: dict | None = None, bootstrap: dict | None = None,
         data_root: Path = DATA) -> Path:
    """Score one propagation folder; returns the evaluation folder. ``conf``: params ``propagate``
    (its rule keys must be the recorded ones); ``bootstrap``: params ``evaluate.bootstrap``
    (resamples, seed, confidence; None: no intervals)."""
    import numpy as np
    import pandas as pd

    from semcorr.pipeline import video_metrics as vm
    from semcorr.pipeline.bootstrap import resample_counts
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.tables import TableError, decode_mask, keypoints, read_frames, read_video_labels
    from semcorr.stages.match import read_setting
    from semcorr.stages.propagate import RULE_KEYS, propagation_dir, table_hashes

    data_root = Path(data_root)
    prepared = data_root / "prepared" / dataset
    frames = read_frames(prepared)
    expect = {"dataset": dataset, "tables": table_hashes(prepared)}
    if conf is not None:
        expect["propagate"] = {k: conf[k] for k in RULE_KEYS}
    folder = propagation_dir(data_root, variant, dataset)
    setting = read_setting(folder, expect)
    sequences = sorted(frames["sequence"].unique())
    counts = None if bootstrap is None else resample_counts(np.zeros(len(sequences)), int(bootstrap["resamples"]),
                                                            int(bootstrap["seed"]))
    metrics: dict = {"n_sequences": len(sequences)}
    tables = {}
    gt_masks = read_video_labels(prepared, "masks")
    if gt_masks is not None:
        predicted = pd.read_parquet(folder / "masks.parquet")
        scores, copied = {}, {}
        for sequence, group in gt_masks.groupby("sequence", sort=True):
            gt = [decode_mask(r.mask, r.height, r.width) for r in group.itertuples()]
            pred = {int(r.frame): decode_mask(r.mask, r.height, r.width)
                    for r in predicted[predicted["sequence"] == sequence].itertuples()}
            try:
                scores[sequence] = vm.score_sequence(gt, pred)
            except (KeyError, ValueError) as exc:
                raise TableError(f"{folder / 'masks.parquet'}: sequence {sequence!r}: {exc}") from None
            copied[sequence] = vm.score_sequence(gt, {t: gt[0] for t in range(1, len(gt))})
        tables["per_object"] = objects = vm.object_table(scores)
        metrics.update(vm.davis_summary(objects))
        if counts is not None:
            metrics["jf_mean_low"], metrics["jf_mean_high"] = vm.davis_interval(objects, counts,
                                                                                float(bootstrap["confidence"]))
        metrics.update({f"copy_{k}": v for k, v in vm.davis_summary(vm.object_table(copied)).items()
                        if k in ("jf_mean", "j_mean", "f_mean")})
        metrics.update(n_objects=len(objects), n_frames=int(objects["frames"].sum()))
    gt_kps = read_video_labels(prepared, "keypoints")
    if gt_kps is not None:
        predicted = pd.read_parquet(folder / "keypoints.parquet")
        distances, copied, tracks = [], [], 0
        for sequence, group in gt_kps.groupby("sequence", sort=True):
            gt = np.stack([keypoints(k) for k in group["kps"]])
            visible = np.stack([np.asarray(v, dtype=bool) for v in group["visible"]])
            rows = predicted[predicted["sequence"] == sequence].sort_values("frame")
            if rows["frame"].tolist() != list(range(1, len(group))):
                raise TableError(f"{folder / 'keypoints.parquet'}: sequence {sequence!r} lacks predictions for "
                                 f"frames 1..{len(group) - 1}")
            pred = np.concatenate([gt[:1], np.stack([keypoints(k) for k in rows["kps"]])])
            tracked = np.asarray(rows["visible"].iloc[0], dtype=bool)  # fixed by frame 0's heatmaps
            distances.append(vm.pck_distances(gt, pred, visible & tracked[None]))
            copied.append(vm.pck_distances(gt, np.repeat(gt[:1], len(gt), 0), visible & visible[:1]))
            tracks += int(tracked.sum())
        tables["per_joint"] = vm.joint_pck(distances)
        metrics.update(vm.pck_summary(tables["per_joint"]))
        if counts is not None:
            for key, (low, high) in vm.pck_interval(distances, counts, float(bootstrap["confidence"])).items():
                metrics[f"{key}_low"], metrics[f"{key}_high"] = low, high
        metrics.update({f"copy_{k}": v for k, v in vm.pck_summary(vm.joint_pck(copied)).items()})
        metrics.update(n_joints=tracks, n_points=int(tables["per_joint"]["n"].sum()))
    setting.pop("files", None)
    setting["protocol"] = {
        "davis": "semi-supervised; objects = labels of frame 0; frames 1..T-2; J = IoU; F = boundary F-measure "
                 f"within ceil({vm.BOUNDARY_TOLERANCE} x diagonal) px; mean over objects",
        "pck": f"frames 1..T-1; tracked joints; distance / ({vm.PCK_BOX} x diagonal of the frame's ground-truth "
               f"joints' box); alphas {list(vm.PCK_ALPHAS)}; mean over joints",
        "bootstrap": None if bootstrap is None else {**bootstrap, "unit": "sequence"},
    }
    out = video_eval_dir(data_root, variant, dataset)
    with staged(out, work_root(data_root)) as tmp:
        (tmp / "scores").mkdir(parents=True)
        write_json(tmp / "metrics.json", {k: None if v != v else v for k, v in metrics.items()})  # NaN -> null
        write_json(tmp / "setting.json", setting)
        for name, table in tables.items():
            table.to_csv(tmp / "scores" / f"{name}.csv", index=False)
    shown = [f"{name} {100 * metrics[key]:.2f} (copy-first {100 * metrics['copy_' + key]:.2f})"
             for name, key in (("J&F", "jf_mean"), ("PCK@0.1", "pck@0.1")) if metrics.get(key) == metrics.get(key)
             and key in metrics]
    console.print(f"video_eval {variant}/{dataset}: {', '.join(shown)}; wrote {out}")
    return out


def command(
    dataset: Annotated[str, typer.Option(help="video dataset key (video_datasets), e.g. davis")],
    variant: Annotated[str, typer.Option(help="feature variant: backbone key or <backbone>_ft<N>")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """DAVIS J&F and JHMDB PCK of one propagation, with the copy-first-frame baseline."""
    with clean_errors():
        p = load_params(params)
        p.video_dataset(dataset)
        p.variant(variant)
        main(dataset, variant, p.propagate.model_dump(), p.evaluate.bootstrap.model_dump())
