"""AP-10k (Yu et al., NeurIPS 2021 Datasets and Benchmarks) as GeoAware-SC's correspondence
benchmark (Zhang et al., CVPR 2024, Sec. 5; their ``prepare_ap10k.ipynb``).

Raw layout (``data/raw/ap10k``, the official ``ap-10k.zip`` unpacked): ``annotations/
ap10k-{train,val,test}-split1.json`` (COCO keypoints: ``images`` with id, file_name, width,
height; ``annotations`` with image_id, category_id, bbox ``[x, y, w, h]``, 17 keypoints as
``[x, y, v] * 17`` and num_keypoints; ``categories`` with id, name = species, supercategory =
family) and the images ``data/<file_name>``. The 17 joints and their left/right pairs are
`pipeline.symmetry.AP10K`.

The rules, GeoAware-SC's:

1. The three split-1 files are merged (``images`` and ``annotations`` concatenated,
   ``categories`` from the first); an image with more than one animal is left out (GeoAware-SC
   keeps one annotation per image and lists such images in ``ap-10k_is_crowd.txt``, 1,847 of
   them), as is an annotation with fewer than 3 labelled keypoints (``num_keypoints``).
2. Per species, the images (ascending id) are split: the last 30 test, the 20 before them
   val, the rest trn (with fewer images: test first, then val).
3. A pair needs at least 3 keypoints visible in both images, counting each as (v_src / 2) *
   (v_trg / 2) (so v = 1 counts a half). Intra-species: per species and split, the unordered
   pairs of its images (source = the earlier in a seeded shuffle); trn samples 50 x the
   species' trn images of them, val and test keep all. Cross-species: per family with more
   than one species, every (image of one species, image of another) product of each species
   pair, 900 (test) / 400 (val) sampled per family. Cross-family: every product of two
   families' images, 30 (test) / 20 (val) sampled per family pair, category ``all``. The trn
   split is the intra-species trn pairs in every setting.
4. A keypoint is visible where v > 0; its coordinates are COCO's pixel indices, which are
   the 0-based pixel centres of `pipeline.coords` (no shift); v = 0 gives NaN. PCK normaliser:
   max side of the target's bbox (``norm_kind='bbox'``).

Departures, because the notebook's result depends on directory listing order (``os.walk``)
and one global RNG stream: images are ordered by id and every (setting, split, group) draws
from its own generator seeded by ``seed`` and its name, so a table is reproducible but its
pairs are not GeoAware-SC's exact ones (their counts per group are).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline.datasets import DatasetError
from semcorr.pipeline.datasets.common import (SPLITS, check_pair_images, images_table, pair_row, pairs_table,
                                              read_json, relative_image)
from semcorr.pipeline.symmetry import AP10K, flip_index, geo_aware_flags

ANNOTATIONS = ("ap10k-train-split1.json", "ap10k-test-split1.json", "ap10k-val-split1.json")  # GeoAware-SC's order
SETTINGS = ("intra-species", "cross-species", "cross-family")
N_KEYPOINTS = 17
MIN_LABELLED = 3  # num_keypoints of an annotation
MIN_MUTUAL = 3  # sum of (v_src / 2) * (v_trg / 2) of a pair
TEST_PER_SPECIES, VAL_PER_SPECIES = 30, 20
TRN_PAIRS_PER_IMAGE = 50
CROSS_SPECIES_PAIRS = {"val": 400, "test": 900}  # per family
CROSS_FAMILY_PAIRS = {"val": 20, "test": 30}  # per pair of families
SEED = 42


def read_coco(path: Path) -> dict:
    """One COCO keypoints file -> its ``images``, ``annotations``, ``categories`` lists."""
    data = read_json(path, "annotation file not found")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DatasetError(f"{path}: not a COCO keypoints file (lacks {missing})")
    return data


def load_annotations(raw_dir: Path) -> pd.DataFrame:
    """The merged split-1 annotations after rule 1: one row per kept image with image_id
    (``data/<file_name>``), id, width, height, species, family, bbox ``[4]``, keypoints
    ``[17, 2]`` (NaN where v = 0) and v ``[17]``."""
    images, annotations, categories = {}, [], None
    for name in ANNOTATIONS:
        path = Path(raw_dir) / "annotations" / name
        coco = read_coco(path)
        categories = categories if categories is not None else coco["categories"]
        for image in coco["images"]:
            images.setdefault(image["id"], (image, path))
        annotations += [(a, path) for a in coco["annotations"]]
    try:
        species = {c["id"]: (c["name"], c["supercategory"]) for c in categories}
    except (KeyError, TypeError):
        raise DatasetError(f"{Path(raw_dir) / 'annotations' / ANNOTATIONS[0]}: categories need id, name and "
                           "supercategory") from None
    per_image: dict[int, list] = {}
    for ann, path in annotations:
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DatasetError(f"{path}: an annotation without image_id ({str(ann)[:80]})")
        if ann["image_id"] not in images:
            raise DatasetError(f"{path}: annotation {ann.get('id')} is for image {ann['image_id']}, which no "
                               "annotation file lists")
        per_image.setdefault(ann["image_id"], []).append((ann, path))
    rows = []
    for image_id, anns in sorted(per_image.items()):
        unique = {json.dumps(a, sort_keys=True) for a, _ in anns}  # the same animal listed by two files
        if len(unique) > 1:
            continue  # more than one animal: left out (rule 1)
        ann, path = anns[0]
        row = _annotation_row(ann, path, images[image_id][0], species)
        if row["labelled"] >= MIN_LABELLED:
            rows.append(row)
    return pd.DataFrame(rows)


def _annotation_row(ann: dict, path: Path, image: dict, species: dict) -> dict:
    where = f"{path}: annotation {ann.get('id')} (image {ann.get('image_id')})"
    try:
        kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(N_KEYPOINTS, 3)
        bbox = np.asarray(ann["bbox"], dtype=np.float64).reshape(4)
        name, family = species[ann["category_id"]]
        width, height = int(image["width"]), int(image["height"])
        file_name = relative_image(str(image["file_name"]), where)
    except KeyError as exc:
        raise DatasetError(f"{where}: lacks {exc} (or its category is unknown)") from None
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: keypoints are not 17 x (x, y, v) or bbox not [x, y, w, h] ({exc})") from None
    v = kps[:, 2]
    if not np.isin(v, (0, 1, 2)).all() or not np.isfinite(kps).all() or not (bbox[2:] > 0).all():
        raise DatasetError(f"{where}: visibility must be 0, 1 or 2, coordinates finite, and the bbox have extent")
    xy = np.where((v > 0)[:, None], kps[:, :2], np.nan)
    labelled = int(ann.get("num_keypoints", int((v > 0).sum())))
    return {"image_id": f"data/{file_name}", "id": int(ann["image_id"]), "width": width, "height": height,
            "species": name, "family": family, "bbox": bbox, "keypoints": xy, "v": v, "labelled": labelled}


def species_splits(annotations: pd.DataFrame) -> dict[str, str]:
    """image id -> split, per species in ascending id order (rule 2)."""
    split = {}
    for _, group in annotations.sort_values("id").groupby("species", sort=True):
        ids = group["image_id"].tolist()
        n_test = min(TEST_PER_SPECIES, len(ids))
        n_val = min(VAL_PER_SPECIES, len(ids) - n_test)
        n_trn = len(ids) - n_test - n_val
        for k, image_id in enumerate(ids):
            split[image_id] = "trn" if k < n_trn else "val" if k < n_trn + n_val else "test"
    return split


def _rng(seed: int, *names: str) -> np.random.Generator:
    digest = hashlib.sha256("/".join(names).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _possible(v: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``candidates: [K, 2]`` row pairs of ``v: [n, 17]`` -> those with enough mutual keypoints (rule 3)."""
    if not len(candidates):
        return candidates
    mutual = (v[candidates[:, 0]] / 2 * v[candidates[:, 1]] / 2).sum(axis=1)
    return candidates[mutual >= MIN_MUTUAL]


def _sample(candidates: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    n = len(candidates) if n is None else min(n, len(candidates))
    return candidates[rng.choice(len(candidates), size=n, replace=False)] if n else candidates[:0]


def sample_pairs(annotations: pd.DataFrame, split: dict[str, str], setting: str, seed: int = SEED) -> list[tuple]:
    """``(split, category, source row, target row)`` of ``setting`` (rule 3); rows index ``annotations``."""
    if setting not in SETTINGS:
        raise DatasetError(f"AP-10k setting {setting!r}: one of {', '.join(SETTINGS)}")
    ann = annotations.reset_index(drop=True)
    v = np.stack(ann["v"].to_numpy()) if len(ann) else np.zeros((0, N_KEYPOINTS))
    splits = ann["image_id"].map(split).to_numpy()
    out = []
    wanted = SPLITS if setting == "intra-species" else ("trn",)
    for name in wanted:  # intra-species: the trn pairs of every setting, val and test of this one
        for species, group in ann[splits == name].groupby("species", sort=True):
            rng = _rng(seed, "intra-species", name, species)
            rows = group.index.to_numpy()[rng.permutation(len(group))]
            candidates = np.array(list(itertools.combinations(rows, 2)), dtype=np.int64).reshape(-1, 2)
            n = TRN_PAIRS_PER_IMAGE * len(rows) if name == "trn" else None
            out += [(name, species, s, t) for s, t in _sample(_possible(v, candidates), n, rng)]
    if setting == "cross-species":
        for name in ("val", "test"):
            for family, group in ann[splits == name].groupby("family", sort=True):
                members = [g.index.to_numpy() for _, g in group.groupby("species", sort=True)]
                if len(members) < 2:
                    continue
                candidates = np.array([(s, t) for a, b in itertools.combinations(members, 2)
                                       for s, t in itertools.product(a, b)], dtype=np.int64).reshape(-1, 2)
                rng = _rng(seed, setting, name, family)
                out += [(name, family, s, t) for s, t in
                        _sample(_possible(v, candidates), CROSS_SPECIES_PAIRS[name], rng)]
    elif setting == "cross-family":
        for name in ("val", "test"):
            families = [(f, g.index.to_numpy()) for f, g in ann[splits == name].groupby("family", sort=True)]
            for (fa, a), (fb, b) in itertools.combinations(families, 2):
                candidates = np.array(list(itertools.product(a, b)), dtype=np.int64).reshape(-1, 2)
                rng = _rng(seed, setting, name, fa, fb)
                out += [(name, "all", s, t) for s, t in _sample(_possible(v, candidates), CROSS_FAMILY_PAIRS[name], rng)]
    return out


def parse(raw_dir: Path, setting: str = "intra-species", seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``raw_dir`` -> (pairs, images) of one AP-10k ``setting`` (trn/val/test; see the rules)."""
    raw_dir = Path(raw_dir)
    if setting not in SETTINGS:
        raise DatasetError(f"AP-10k setting {setting!r}: one of {', '.join(SETTINGS)}")
    annotations = load_annotations(raw_dir)
    if annotations.empty:
        raise DatasetError(f"{raw_dir / 'annotations'}: no image with one animal and >= {MIN_LABELLED} keypoints")
    chosen = sample_pairs(annotations, species_splits(annotations), setting, seed)
    used = sorted({r for _, _, s, t in chosen for r in (s, t)})
    image_files = {}
    for r in used:
        row = annotations.iloc[r]
        path = raw_dir / row.image_id
        if not path.is_file():
            raise DatasetError(f"{raw_dir / 'annotations'}: image {row.id} ({row.image_id}) is not there ({path})")
        image_files[row.image_id] = (path, row.species)
    image_table = images_table(image_files)
    sizes = image_table.set_index("image_id")[["width", "height"]]
    mirror = flip_index(AP10K, range(N_KEYPOINTS))
    rows, extra = [], []
    for name, category, s, t in chosen:
        src, trg = annotations.iloc[s], annotations.iloc[t]
        for row in (src, trg):
            if (int(sizes.loc[row.image_id, "width"]), int(sizes.loc[row.image_id, "height"])) != (row.width, row.height):
                raise DatasetError(f"{raw_dir / 'annotations'}: image {row.id} is listed as {row.width}x{row.height}, "
                                   f"the file is {sizes.loc[row.image_id, 'width']}x{sizes.loc[row.image_id, 'height']}")
        visible = (src.v > 0) & (trg.v > 0)
        stem = lambda r: Path(r.image_id).stem  # noqa: E731
        rows.append(pair_row(f"{name}/{stem(src)}-{stem(trg)}:{category}", name, category, src.image_id,
                             trg.image_id, src.keypoints, trg.keypoints, visible, float(max(trg.bbox[2:])), "bbox"))
        extra.append((list(range(N_KEYPOINTS)), mirror,
                      geo_aware_flags(AP10K, range(N_KEYPOINTS), visible, np.flatnonzero(trg.v > 0))))
    for name in SPLITS:
        if not any(r["split"] == name for r in rows):
            raise DatasetError(f"{raw_dir / 'annotations'}: no {setting} pairs in split {name!r}")
    check_pair_images(rows, image_table, str(raw_dir / "annotations"))
    pairs = pairs_table(rows)
    pairs["kp_ids"], pairs["flip_index"], pairs["geo_aware"] = (list(c) for c in zip(*extra))
    return pairs, image_table
