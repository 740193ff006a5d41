"""Stage `match`: feature store + pair table -> ``data/predictions/<V>/<D>/<method>/``.

``--method argmax`` reads ``data/features/<V>/<D>.zarr`` (refusing a store made with other
settings than params say), computes the similarities once and writes the argmax matches
plus the similarity windows around each (``windows.npz``). ``--method softargmax`` refines
those from the windows alone: no feature is read, so a soft-argmax setting never re-runs
the argmax. ``--method valtuned`` matches with the settings the tune stage chose on a val
split (``data/tuning/<V>/<D>/chosen.json``). Each method's folder is written as one unit::

    predictions.parquet  pair_id, kp_index, x, y (original target pixels), score, reliable, visible;
                         with pose alignment also pose_flip (the pair's source was mirrored) and
                         source_flip (the keypoint's descriptor came from the mirrored source)
    unaligned.parquet    argmax with pose alignment only: pair_id, kp_index, x, y without it
    matches.h5, features.h5  the same as hloc match and feature files (`pipeline.export`)
    windows.npz          argmax only: peaks, windows, grids, transforms (`pipeline.matching.Matches`)
    setting.json         what made it: match params, store attrs, split, pair table and file sha256s

Reads only the feature cache and the pair table: never an image or a backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, variant_store_attrs
from semcorr.stages.params import DEFAULT_PARAMS, METHODS, load_params

# Store attrs copied into the setting every report states.
SETTING_ATTRS = ("backbone", "family", "model", "random_init", "weights_sha256", "layer", "input_size", "resize",
                 "patch_size", "tuned_depth")


def predictions_dir(data_root: Path, variant: str, dataset: str, method: str) -> Path:
    return Path(data_root) / "predictions" / variant / dataset / method


def main(dataset: str, variant: str, method: str, conf: dict, split: str = "test", expect: dict | None = None,
         data_root: Path = DATA) -> Path:
    """Match the ``split`` pairs of ``dataset`` with the ``variant`` features; returns the
    method's folder. ``conf``: ``{"argmax": {...}, "softargmax": {...}}`` (params ``match``);
    ``expect``: store attrs the store must have (`expected_store_attrs`)."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    data_root = Path(data_root)
    if method == "argmax":
        return _argmax(dataset, variant, dict(conf["argmax"]), split, expect, data_root)
    if method == "valtuned":
        return _valtuned(dataset, variant, conf, split, expect, data_root)
    return _softargmax(dataset, variant, conf, split, data_root)


def _argmax(dataset: str, variant: str, conf: dict, split: str, expect: dict | None, data_root: Path) -> Path:
    import numpy as np

    from semcorr.pipeline.matching import check_conf, match_pairs
    from semcorr.pipeline.store import open_store

    from semcorr.pipeline.pose import check_store
    from semcorr.pipeline.tables import read_images

    conf = check_conf(conf)
    pairs, pairs_sha = _pairs(data_root, dataset, split)
    store = open_store(data_root / "features" / variant / f"{dataset}.zarr", expect=expect)
    if conf["pose_align"] != "none":
        check_store(store)
    console.print(f"match {variant}/{dataset}: argmax over {len(pairs)} {split} pairs"
                  + (f", pose alignment {conf['pose_align']}" if conf["pose_align"] != "none" else ""))
    matches = match_pairs(store, pairs, conf, log=lambda line: console.print(line, highlight=False),
                          images=read_images(data_root / "prepared" / dataset))
    setting = {
        "variant": variant, "dataset": dataset, "method": "argmax", "split": split, "pairs_sha256": pairs_sha,
        "match": {"argmax": conf},
        **{k: store.attrs.get(k) for k in SETTING_ATTRS},
        "train_dataset": _train_dataset(data_root, variant),
    }
    if matches.pose is not None:
        setting["pose"] = pose_setting(conf["pose_align"], matches.pose, pairs)

    def extra(folder: Path) -> None:
        np.savez(folder / "windows.npz", **matches.arrays())
        if matches.unaligned is not None:
            matches.unaligned.to_parquet(folder / "unaligned.parquet", index=False)

    return _write(data_root, variant, dataset, "argmax", pairs, matches.table, setting, extra=extra)


def pose_setting(align: str, choice, pairs) -> dict:
    """What the report states of a pose alignment: the setting, the foreground it measured
    (the dataset's masks, or the whole image where there are none), how many pairs it
    mirrored, and how keypoints found their mirrored counterparts."""
    tables = "flip_index" in pairs.columns and pairs["flip_index"].notna().any()
    return {"align": align, "foreground": choice.foreground, "flipped_pairs": int(choice.flip.sum()),
            "pairs": int(len(choice.flip)),
            "counterparts": "left/right table (flip_index)" if tables else "identity (no left/right table)"}


def _softargmax(dataset: str, variant: str, conf: dict, split: str, data_root: Path) -> Path:
    import numpy as np
    import pandas as pd

    from semcorr.pipeline.matching import Matches, check_conf, default_soft_conf, refine

    soft = check_conf(dict(conf["softargmax"]), default_soft_conf)
    pairs, pairs_sha = _pairs(data_root, dataset, split)
    source = predictions_dir(data_root, variant, dataset, "argmax")
    argmax = read_setting(source, expect={"split": split, "pairs_sha256": pairs_sha,
                                          "match": {"argmax": dict(conf["argmax"])}})
    with np.load(source / "windows.npz", allow_pickle=False) as arrays:
        matches = Matches.from_arrays(pd.read_parquet(source / "predictions.parquet"), arrays)
    console.print(f"match {variant}/{dataset}: soft-argmax of {len(matches.table)} argmax matches")
    setting = {**argmax, "method": "softargmax", "match": {**argmax["match"], "softargmax": soft}}
    return _write(data_root, variant, dataset, "softargmax", pairs, refine(matches, soft), setting)


def _valtuned(dataset: str, variant: str, conf: dict, split: str, expect: dict | None, data_root: Path) -> Path:
    """The ``split`` pairs matched with the settings the tune stage chose on val."""
    from semcorr.pipeline.store import open_store
    from semcorr.pipeline.tuning import predict
    from semcorr.stages.tune import tuning_dir

    path = tuning_dir(data_root, variant, dataset) / "chosen.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `semcorr tune --dataset {dataset} --variant {variant}` first")
    tuned = json.loads(path.read_text())
    if tuned["grid"] != dict(conf["valtuned"]):
        raise ValueError(f"{path}: chosen from another grid than params `match.valtuned`; re-run `semcorr tune`")
    pairs, pairs_sha = _pairs(data_root, dataset, split)
    store = open_store(data_root / "features" / variant / f"{dataset}.zarr", expect=expect)
    chosen = tuned["setting"]
    console.print(f"match {variant}/{dataset}: {len(pairs)} {split} pairs with the settings chosen on "
                  f"{tuned['tuned_on']['dataset']} val: {chosen}")
    from semcorr.pipeline.tables import read_images

    mutual, align = bool(conf["argmax"]["mutual"]), conf["argmax"].get("pose_align", "none")
    table, pose = predict(store, pairs, chosen, mutual=mutual, log=lambda line: console.print(line, highlight=False),
                          pose_align=align, images=read_images(data_root / "prepared" / dataset))
    setting = {
        "variant": variant, "dataset": dataset, "method": "valtuned", "split": split, "pairs_sha256": pairs_sha,
        "match": {"argmax": dict(conf["argmax"]), "valtuned": dict(conf["valtuned"]), "chosen": chosen},
        "tuned_on": tuned["tuned_on"],
        **{k: store.attrs.get(k) for k in SETTING_ATTRS},
        "train_dataset": _train_dataset(data_root, variant),
    }
    if pose is not None:
        setting["pose"] = pose_setting(align, pose, pairs)
    return _write(data_root, variant, dataset, "valtuned", pairs, table, setting)


def _pairs(data_root: Path, dataset: str, split: str):
    from semcorr.pipeline.tables import TableError, read_pairs
    from semcorr.pipeline.weights import sha256_file

    prepared = data_root / "prepared" / dataset
    pairs = read_pairs(prepared, split)
    if pairs.empty:
        raise TableError(f"{prepared / 'pairs.parquet'}: no pairs in split {split!r}")
    return pairs, sha256_file(prepared / "pairs.parquet")


def _write(data_root: Path, variant: str, dataset: str, method: str, pairs, table, setting: dict, extra=None) -> Path:
    from semcorr.pipeline.export import write_matches_h5
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.tables import read_images
    from semcorr.pipeline.weights import sha256_file

    out = predictions_dir(data_root, variant, dataset, method)
    images = read_images(data_root / "prepared" / dataset)
    with staged(out, work_root(data_root)) as folder:
        folder.mkdir(parents=True)
        table.to_parquet(folder / "predictions.parquet", index=False)
        write_matches_h5(folder / "matches.h5", pairs, table, images, folder / "features.h5")
        if extra is not None:
            extra(folder)
        files = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
        write_json(folder / "setting.json", {**setting, "files": files})
    console.print(f"wrote {out}")
    return out


def read_setting(folder: Path, expect: dict) -> dict:
    """``folder/setting.json`` of a predictions folder, after checking that every file it
    lists has its recorded sha256 and that the settings in ``expect`` are the recorded ones."""
    from semcorr.pipeline.weights import sha256_file

    path = Path(folder) / "setting.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no predictions (no setting.json); run `semcorr match` for it first")
    setting = json.loads(path.read_text())
    for name, digest in setting.get("files", {}).items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise ValueError(f"{folder / name}: missing or not the file {path.name} describes; re-run `semcorr match`")
    recorded = _flatten(setting)
    differing = [f"{key}: made with {recorded.get(key)!r}, params say {value!r}"
                 for key, value in _flatten(expect).items() if recorded.get(key) != value]
    if differing:
        raise ValueError(f"{folder}: predictions made with other settings than params ({'; '.join(differing)}); "
                         "re-run `semcorr match` first")
    return setting


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _train_dataset(data_root: Path, variant: str) -> str | None:
    """Dataset the variant's weights were fine-tuned on (its weights record); None if not tuned."""
    path = Path(data_root) / "weights" / variant / "weights.json"
    return json.loads(path.read_text()).get("train_dataset") if path.is_file() else None


def command(
    dataset: Annotated[str, typer.Option(help="dataset key, e.g. spair")],
    variant: Annotated[str, typer.Option(help="feature variant: backbone key or <backbone>_ft<N>")],
    method: Annotated[str, typer.Option(help=f"one of {', '.join(METHODS)} (softargmax refines the argmax)")] = "argmax",
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Predict target keypoints of every pair from cached features."""
    with clean_errors():
        p = load_params(params)
        p.dataset(dataset)
        p.variant(variant)
        expect = variant_store_attrs(p, variant, dataset) if method in ("argmax", "valtuned") else None
        main(dataset, variant, method, p.match.model_dump(), p.evaluate.split, expect)
