"""AP-10k as GeoAware-SC builds it, on a fixture in AP-10k's real COCO layout written here
(``annotations/ap10k-*-split1.json`` + ``data/<12-digit id>.jpg``), bad inputs included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semcorr.pipeline.datasets import DatasetError, ap10k
from semcorr.pipeline.symmetry import AP10K
from semcorr.pipeline.tables import keypoints, validate

SPECIES = [(1, "cat", "Felidae"), (2, "lion", "Felidae"), (3, "dog", "Canidae")]
PER_SPECIES = 53  # 3 trn + 20 val + 30 test
W, H = 40, 30


def animal(rng, n_visible: int = 17, ones: int = 0) -> list[float]:
    """17 x (x, y, v): ``n_visible`` keypoints labelled (the first ``ones`` with v = 1), the rest 0."""
    kps = []
    for k in range(17):
        v = 0 if k >= n_visible else 1 if k < ones else 2
        x, y = (rng.uniform(0, W - 1), rng.uniform(0, H - 1)) if v else (0.0, 0.0)
        kps += [round(x, 2), round(y, 2), v]
    return kps


def write_ap10k(root: Path, edit=None) -> Path:
    """The fixture; ``edit(files)`` may change the three COCO dicts before they are written."""
    rng = np.random.default_rng(0)
    files = {name: {"images": [], "annotations": [], "categories": [
        {"id": c, "name": n, "supercategory": f, "keypoints": [], "skeleton": []} for c, n, f in SPECIES]}
        for name in ap10k.ANNOTATIONS}
    (root / "data").mkdir(parents=True)
    image_id = 0
    for category, _, _ in SPECIES:
        for k in range(PER_SPECIES):
            image_id += 1
            name = f"{image_id:012d}.jpg"
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "data" / name)
            target = files[ap10k.ANNOTATIONS[k % 3]]
            target["images"].append({"id": image_id, "file_name": name, "width": W, "height": H})
            labelled = 2 if k == 5 else 17  # image 6 of each species: too few keypoints
            target["annotations"].append({
                "id": 1000 + image_id, "image_id": image_id, "category_id": category, "iscrowd": 0,
                "bbox": [1.0, 2.0, 30.0 + k % 5, 20.0], "keypoints": animal(rng, labelled, ones=1 if k == 7 else 0),
                "num_keypoints": labelled})
    # image 4 shows two animals (the second annotation in another file): left out
    files[ap10k.ANNOTATIONS[1]]["annotations"].append({
        "id": 99999, "image_id": 4, "category_id": 1, "bbox": [0, 0, 10, 10], "keypoints": animal(rng),
        "num_keypoints": 17})
    if edit:
        edit(files)
    (root / "annotations").mkdir()
    for name, data in files.items():
        (root / "annotations" / name).write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_ap10k(tmp_path_factory.mktemp("ap10k") / "raw")


def test_annotations_splits_and_intra_species_pairs(raw):
    ann = ap10k.load_annotations(raw)
    assert 4 not in set(ann["id"]) and not ({6, 59, 112} & set(ann["id"]))  # two animals; 2 keypoints
    assert len(ann) == 3 * PER_SPECIES - 4
    split = ap10k.species_splits(ann)
    for species, group in ann.groupby("species"):
        counts = group["image_id"].map(split).value_counts().to_dict()
        assert counts == {"test": 30, "val": 20, "trn": len(group) - 50}
        test_ids = group.sort_values("id")["image_id"].tolist()[-30:]
        assert all(split[i] == "test" for i in test_ids)  # the last 30 by id
    pairs, images = ap10k.parse(raw)
    validate(pairs, images, "fixture")
    for (name, species), group in pairs.groupby(["split", "category"]):
        n_images = int((ann["species"] == species).sum()) - 50 if name == "trn" else 20 if name == "val" else 30
        assert len(group) == n_images * (n_images - 1) // 2  # every pair passes: all keypoints labelled
        assert len(set(map(frozenset, zip(group["source_id"], group["target_id"])))) == len(group)  # unordered
    assert set(pairs["category"]) == {"cat", "lion", "dog"} and set(pairs["split"]) == {"trn", "val", "test"}
    assert len(images) == len(ann) - 1  # the one cat left in trn has no pair: not in the images table


def test_keypoints_visibility_normaliser_and_left_right_columns(raw):
    pairs, _ = ap10k.parse(raw)
    ann = ap10k.load_annotations(raw).set_index("image_id")
    row = pairs.iloc[0]
    src, trg = ann.loc[row.source_id], ann.loc[row.target_id]
    np.testing.assert_allclose(keypoints(row.source_kps), src.keypoints)  # COCO pixel indices, unshifted
    assert row.pck_norm == max(trg.bbox[2:]) and row.norm_kind == "bbox"
    assert list(row.kp_ids) == list(range(17))
    assert list(row.flip_index) == AP10K.counterpart().tolist()
    # geo-aware: shoulders, elbows/knees, paws, hips (their group visible twice in the target); not eyes
    assert np.flatnonzero(row.geo_aware).tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    # an image whose first keypoint has v = 1: visible (GeoAware-SC counts v / 2 > 0)
    half = ann[ann["id"] == 8].index[0]
    with_half = pairs[(pairs["source_id"] == half) | (pairs["target_id"] == half)]
    assert len(with_half) and all(v[0] for v in with_half["visible"])


def test_invisible_keypoints_are_nan_and_pairs_need_three_mutual(tmp_path):
    def few(files):  # two test cats: image 50 keeps keypoints 0-3, image 51 keypoints 3-16
        for data in files.values():
            for a in data["annotations"]:
                if a["image_id"] == 50:
                    a["keypoints"] = [v if k // 3 < 4 else 0 for k, v in enumerate(a["keypoints"])]
                    a["num_keypoints"] = 4
                if a["image_id"] == 51:
                    a["keypoints"] = [0 if k // 3 < 3 else v for k, v in enumerate(a["keypoints"])]
                    a["num_keypoints"] = 14
    raw = write_ap10k(tmp_path / "raw", few)
    pairs, _ = ap10k.parse(raw)
    one, two = "data/000000000050.jpg", "data/000000000051.jpg"
    assert not ((pairs["source_id"].isin([one, two])) & (pairs["target_id"].isin([one, two]))).any()  # 1 mutual
    row = pairs[(pairs["source_id"] == one) | (pairs["target_id"] == one)].iloc[0]
    xy = keypoints(row.source_kps if row.source_id == one else row.target_kps)
    assert np.isnan(xy[4:]).all() and np.isfinite(xy[:4]).all()
    assert sum(row.visible) <= 4


def test_cross_species_and_cross_family_settings(raw):
    ann = ap10k.load_annotations(raw).set_index("image_id")
    cross, _ = ap10k.parse(raw, "cross-species")
    assert set(cross.loc[cross["split"] != "trn", "category"]) == {"Felidae"}  # the one family with two species
    test = cross[cross["split"] == "test"]
    assert len(test) == 900  # 30 cats x 30 lions, all passing, 900 sampled
    assert all(ann.loc[s, "species"] != ann.loc[t, "species"] for s, t in zip(test["source_id"], test["target_id"]))
    family, _ = ap10k.parse(raw, "cross-family")
    test = family[family["split"] == "test"]
    assert len(test) == 30 and set(test["category"]) == {"all"}  # one pair of families, 30 sampled
    assert len(family[family["split"] == "val"]) == 20
    assert all(ann.loc[s, "family"] != ann.loc[t, "family"] for s, t in zip(test["source_id"], test["target_id"]))
    intra, _ = ap10k.parse(raw)
    assert cross[cross["split"] == "trn"]["pair_id"].tolist() == intra[intra["split"] == "trn"]["pair_id"].tolist()
    again, _ = ap10k.parse(raw, "cross-family")
    assert again["pair_id"].tolist() == family["pair_id"].tolist()  # seeded: reproducible
    assert ap10k.parse(raw, "cross-family", seed=1)[0]["pair_id"].tolist() != family["pair_id"].tolist()
    with pytest.raises(DatasetError, match="setting 'cross-genus'"):
        ap10k.parse(raw, "cross-genus")


def test_a_missing_image_is_named(tmp_path):
    raw = write_ap10k(tmp_path / "raw")
    (raw / "data" / "000000000060.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image 60 \(data/000000000060\.jpg\) is not there"):
        ap10k.parse(raw)


def test_an_annotation_for_an_unlisted_image_is_named(tmp_path):
    def orphan(files):
        files[ap10k.ANNOTATIONS[2]]["annotations"].append({"id": 7777, "image_id": 4242, "category_id": 1,
                                                           "bbox": [0, 0, 5, 5], "keypoints": [0] * 51})
    raw = write_ap10k(tmp_path / "raw", orphan)
    with pytest.raises(DatasetError, match=r"ap10k-val-split1\.json: annotation 7777 is for image 4242, which no "):
        ap10k.parse(raw)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(keypoints=a["keypoints"][:-3]), "not 17 x"),
    (lambda a: a["keypoints"].__setitem__(2, 3), "visibility must be 0, 1 or 2"),
    (lambda a: a.update(bbox=[0, 0, 0, 4]), "bbox have extent"),
    (lambda a: a.update(category_id=9), "category is unknown"),
], ids=["short-keypoints", "visibility-3", "flat-bbox", "unknown-species"])
def test_malformed_annotations_are_named(tmp_path, change, message):
    def bad(files):
        change(files[ap10k.ANNOTATIONS[0]]["annotations"][10])
    raw = write_ap10k(tmp_path / "raw", bad)
    with pytest.raises(DatasetError, match=rf"ap10k-train-split1\.json: annotation \d+ .*{message}"):
        ap10k.parse(raw)


def test_a_missing_annotation_file_is_named(tmp_path):
    raw = write_ap10k(tmp_path / "raw")
    (raw / "annotations" / "ap10k-test-split1.json").unlink()
    with pytest.raises(DatasetError, match="ap10k-test-split1.json: annotation file not found"):
        ap10k.parse(raw)



def test_the_three_settings_download_from_a_local_archive_and_prepare(raw, tmp_path):
    """ap-10k.zip as published (one `ap-10k/` folder) as `download.<key>.source`: each of the three
    dataset keys imports it and prepares its own setting."""
    import zipfile

    from semcorr.pipeline.datasets import prepare
    from semcorr.pipeline.download import DATASETS, download_dataset
    from semcorr.pipeline.tables import read_pairs

    archive = tmp_path / "ap-10k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(raw.rglob("*")):
            if path.is_file():
                z.write(path, f"ap-10k/{path.relative_to(raw)}")
    assert DATASETS["ap10k"] is DATASETS["ap10k_cross_species"] is DATASETS["ap10k_cross_family"]
    settings = {"ap10k": "intra-species", "ap10k_cross_species": "cross-species", "ap10k_cross_family": "cross-family"}
    for key, setting in settings.items():
        folder = download_dataset(key, tmp_path / "raw" / key, archive, tmp_path / "downloads")
        assert (folder / "annotations" / "ap10k-train-split1.json").is_file() and (folder / "data").is_dir()
        pairs = read_pairs(prepare(key, folder, tmp_path / "prepared" / key))
        expected, _ = ap10k.parse(raw, setting)
        assert pairs["pair_id"].tolist() == expected["pair_id"].tolist()
    assert set(read_pairs(tmp_path / "prepared" / "ap10k_cross_family", "test")["category"]) == {"all"}
