"""Stages `keypoints` and `sparse`: sparse matching with semantic features on pairs with a
known homography (the synthetic set's warps, HPatches' ``H_1_k``); see `pipeline.sparse`.

``semcorr keypoints --dataset D`` reads the images of the ``evaluate.split`` pairs once and
writes ``data/keypoints/<D>/``::

    features.h5      hloc features file: SIFT keypoints, RootSIFT descriptors, scores, image_size
    pairs.parquet    pair_id, source_id, target_id, kind (illumination | viewpoint), homography (9 floats, row-major)
    setting.json     split, detector settings, the pair table's sha256, OpenCV's version

``semcorr sparse --dataset D --variant V`` reads that folder and the feature store (never an
image) and writes ``data/sparse/<V>/<D>/``::

    features-semantic.h5, features-fused.h5   hloc features files (the local one is the keypoints stage's)
    matches-{local,semantic,fused}.h5          hloc matches files (matches0, matching_scores0)
    per_pair.csv     descriptor, pair_id, kind, n_matches, mma@1..10, corner_error
    metrics.json     numbers only: {descriptor: {kind: mma@t, h_acc@e, n_pairs, matches}}
    setting.json     what made it: match settings, detector settings, store attrs
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, variant_store_attrs
from semcorr.stages.params import DEFAULT_PARAMS, load_params

HOMOGRAPHY_DATASETS = ("synthetic", "hpatches")  # datasets whose pairs have a known homography
SETTING_ATTRS = ("backbone", "family", "model", "random_init", "weights_sha256", "layer", "input_size", "resize",
                 "patch_size", "tuned_depth")


def keypoints_dir(data_root: Path, dataset: str) -> Path:
    return Path(data_root) / "keypoints" / dataset


def sparse_dir(data_root: Path, variant: str, dataset: str) -> Path:
    return Path(data_root) / "sparse" / variant / dataset


def pair_homographies(dataset: str, raw_dir: Path, pairs) -> tuple[list, list[str]]:
    """(``[3, 3]`` source -> target homography, sequence kind) of every pair of ``pairs``."""
    import numpy as np

    if dataset == "synthetic":
        from semcorr.pipeline.datasets.synthetic import homographies

        h = homographies(raw_dir)
        missing = sorted((set(pairs["source_id"]) | set(pairs["target_id"])) - set(h))
        if missing:
            raise KeyError(f"{raw_dir}: no homography for images {missing[:3]} (raw data and prepared tables differ?)")
        return [h[t] @ np.linalg.inv(h[s]) for s, t in zip(pairs["source_id"], pairs["target_id"])], \
            ["viewpoint"] * len(pairs)
    if dataset == "hpatches":
        from semcorr.pipeline.datasets.hpatches import homographies

        h = homographies(raw_dir)
        keys = list(zip(pairs["source_id"], pairs["target_id"]))
        missing = [k for k in keys if k not in h]
        if missing:
            raise KeyError(f"{raw_dir}: no homography for pair {missing[0]} (raw data and prepared tables differ?)")
        return [h[k] for k in keys], list(pairs["category"])
    raise ValueError(f"dataset {dataset!r} has no known homographies; sparse matching needs one of "
                     f"{', '.join(HOMOGRAPHY_DATASETS)}")


def keypoints_main(dataset: str, split: str, conf: dict, data_root: Path = DATA) -> Path:
    """Detect SIFT on every image of the ``split`` pairs of ``dataset`` (``conf``: params
    ``sparse.detect``); returns ``data/keypoints/<dataset>``."""
    import cv2
    import numpy as np
    import pandas as pd
    from PIL import Image

    from semcorr.pipeline.export import ImageFeatures, write_features_h5
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.sparse import check_conf, default_detect_conf, detect_sift
    from semcorr.pipeline.tables import TableError, read_images, read_pairs
    from semcorr.pipeline.weights import sha256_file

    data_root = Path(data_root)
    conf = check_conf(conf, default_detect_conf)
    prepared = data_root / "prepared" / dataset
    pairs = read_pairs(prepared, split)
    if pairs.empty:
        raise TableError(f"{prepared / 'pairs.parquet'}: no pairs in split {split!r}")
    h, kinds = pair_homographies(dataset, data_root / "raw" / dataset, pairs)
    images = read_images(prepared).set_index("image_id")
    used = sorted(set(pairs["source_id"]) | set(pairs["target_id"]))
    console.print(f"keypoints {dataset}: SIFT on {len(used)} images of {len(pairs)} {split} pairs")

    def features():
        for image_id in used:
            path = Path(images.loc[image_id, "path"])
            try:
                with Image.open(path) as opened:
                    pixels = np.array(opened.convert("RGB"))
            except OSError as exc:
                raise ValueError(f"{path}: cannot read image ({exc})") from None
            found = detect_sift(pixels, conf["max_keypoints"])
            yield image_id, ImageFeatures(found.xy, found.scores, (pixels.shape[1], pixels.shape[0]), found.descriptors)

    out = keypoints_dir(data_root, dataset)
    with staged(out, work_root(data_root)) as folder:
        folder.mkdir(parents=True)
        write_features_h5(folder / "features.h5", features())
        table = pd.DataFrame({"pair_id": pairs["pair_id"], "source_id": pairs["source_id"],
                              "target_id": pairs["target_id"], "kind": kinds,
                              "homography": [np.asarray(m, dtype=np.float64).reshape(-1).tolist() for m in h]})
        table.to_parquet(folder / "pairs.parquet", index=False)
        write_json(folder / "setting.json", {
            "dataset": dataset, "split": split, "detect": conf, "pairs_sha256": sha256_file(prepared / "pairs.parquet"),
            "n_pairs": len(pairs), "n_images": len(used), "detector": "SIFT (OpenCV, enable_precise_upscale)",
            "opencv": cv2.__version__,
        })
    console.print(f"wrote {out}")
    return out


def main(dataset: str, variant: str, conf: dict, expect: dict | None = None, data_root: Path = DATA) -> Path:
    """Match the keypoints of ``data/keypoints/<dataset>`` with the local, semantic
    (``variant``'s feature store) and fused descriptors and evaluate them (``conf``: params
    ``sparse.match``; ``expect``: store attrs, `expected_store_attrs`); returns the folder."""
    import h5py
    import numpy as np
    import pandas as pd

    from semcorr.pipeline.export import ImageFeatures, PairMatches, write_features_h5, write_pair_matches_h5
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.sparse import (DESCRIPTORS, check_conf, default_match_conf, descriptors, evaluate_pair,
                                         metrics_dict, mutual_nearest, summarize)
    from semcorr.pipeline.store import open_store

    data_root = Path(data_root)
    conf = check_conf(conf, default_match_conf)
    source = keypoints_dir(data_root, dataset)
    if not (source / "setting.json").is_file():
        raise FileNotFoundError(f"{source}: no keypoints (no setting.json); run `semcorr keypoints --dataset {dataset}` first")
    detected = json.loads((source / "setting.json").read_text())
    pairs = pd.read_parquet(source / "pairs.parquet")
    kp: dict[str, tuple] = {}
    with h5py.File(source / "features.h5", "r") as f:
        for image_id in sorted(set(pairs["source_id"]) | set(pairs["target_id"])):
            group = f[image_id]
            kp[image_id] = (group["keypoints"][()].astype(np.float64), group["scores"][()],
                            group["descriptors"][()].T, tuple(int(v) for v in group["image_size"][()]))
    store = open_store(data_root / "features" / variant / f"{dataset}.zarr", expect=expect)
    console.print(f"sparse {variant}/{dataset}: {len(pairs)} pairs, descriptors {', '.join(DESCRIPTORS)}")
    semantic = {i: store.sample(i, xy).numpy() if len(xy) else np.zeros((0, store.attrs["feat_dim"]), np.float32)
                for i, (xy, *_rest) in kp.items()}
    desc = {kind: {i: descriptors(kind, kp[i][2], semantic[i], conf["weight"]) for i in kp} for kind in DESCRIPTORS}

    rows, matches = [], {kind: [] for kind in DESCRIPTORS}
    for pair in pairs.itertuples(index=False):
        h = np.asarray(pair.homography, dtype=np.float64).reshape(3, 3)
        for kind in DESCRIPTORS:
            m0, s0 = mutual_nearest(desc[kind][pair.source_id], desc[kind][pair.target_id], conf["ratio"])
            matches[kind].append(PairMatches(pair.source_id, pair.target_id, m0, s0, pair.pair_id))
            row = evaluate_pair(kp[pair.source_id][0], kp[pair.target_id][0], m0, h, kp[pair.source_id][3], conf)
            rows.append({"descriptor": kind, "pair_id": pair.pair_id, "kind": pair.kind, **row})
    per_pair = pd.DataFrame(rows)
    summary = summarize(per_pair)
    setting = {"variant": variant, "dataset": dataset, "split": detected["split"], "match": conf,
               **detected["detect"], **{k: conf[k] for k in ("weight", "ratio", "ransac_threshold")},
               "pairs_sha256": detected["pairs_sha256"], **{k: store.attrs.get(k) for k in SETTING_ATTRS}}

    out = sparse_dir(data_root, variant, dataset)
    with staged(out, work_root(data_root)) as folder:
        folder.mkdir(parents=True)
        for kind in ("semantic", "fused"):
            write_features_h5(folder / f"features-{kind}.h5",
                              ((i, ImageFeatures(kp[i][0], kp[i][1], kp[i][3], desc[kind][i])) for i in kp))
        for kind in DESCRIPTORS:
            write_pair_matches_h5(folder / f"matches-{kind}.h5", matches[kind])
        per_pair.to_csv(folder / "per_pair.csv", index=False)
        write_json(folder / "metrics.json", metrics_dict(summary))
        write_json(folder / "setting.json", setting)
    for row in summary[summary["kind"] == "all"].to_dict("records"):
        console.print(f"sparse {variant}/{dataset}/{row['descriptor']}: MMA@3 {100 * row['mma@3']:.1f}%, "
                      f"H-acc@3 {100 * row['h_acc@3']:.1f}% over {row['n_pairs']} pairs", highlight=False)
    console.print(f"wrote {out}")
    return out


def keypoints_command(
    dataset: Annotated[str, typer.Option(help=f"dataset with known homographies ({', '.join(HOMOGRAPHY_DATASETS)})")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """SIFT keypoints of the evaluation pairs' images into an hloc features file."""
    with clean_errors():
        p = load_params(params)
        p.dataset(dataset)
        keypoints_main(dataset, p.evaluate.split, p.sparse.detect.model_dump())


def command(
    dataset: Annotated[str, typer.Option(help=f"dataset with known homographies ({', '.join(HOMOGRAPHY_DATASETS)})")],
    variant: Annotated[str, typer.Option(help="feature variant: a backbone key")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Sparse matching (local, semantic, fused descriptors) and its MMA / homography accuracy."""
    with clean_errors():
        p = load_params(params)
        p.dataset(dataset)
        expect = variant_store_attrs(p, variant, dataset)
        main(dataset, variant, p.sparse.match.model_dump(), expect)
