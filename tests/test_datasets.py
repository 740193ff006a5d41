"""Dataset parsers: the real PF-WILLOW / PF-PASCAL copies, a generated SPair-71k fixture, and
every kind of bad input (one error naming the file, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semcorr.pipeline.coords import from_matlab
from semcorr.pipeline.datasets import DatasetError, pfpascal, prepare
from semcorr.pipeline.tables import keypoints, read_images, read_pairs
from semcorr.stages import download as download_stage
from semcorr.stages import prepare as prepare_stage

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_willow = pytest.mark.skipif(not (SHARED / "pf-willow").is_dir(), reason="shared PF-WILLOW copy absent")
needs_pascal = pytest.mark.skipif(not (SHARED / "pf-pascal").is_dir(), reason="shared PF-PASCAL list absent")


def test_from_matlab_shifts_one_based_to_pixel_centres():
    assert np.array_equal(from_matlab(np.array([[1.0, 1.0], [10.5, 3.0]])), [[0.0, 0.0], [9.5, 2.0]])


# -- PF-WILLOW (real) ----------------------------------------------------------------------------


@needs_willow
def test_pfwillow_real_copy(tmp_path):
    out = prepare("pfwillow", SHARED / "pf-willow", tmp_path / "prepared")
    pairs, images = read_pairs(out), read_images(out)
    assert len(pairs) == 900 and pairs["category"].nunique() == 10
    assert len(images) == 100 and set(pairs["split"]) == {"test"}
    csv = pd.read_csv(SHARED / "pf-willow" / "test_pairs.csv")
    first = csv.iloc[0]
    expected_src = np.stack([[first[f"XA{i}"] for i in range(1, 11)], [first[f"YA{i}"] for i in range(1, 11)]], 1) - 1
    expected_trg = np.stack([[first[f"XB{i}"] for i in range(1, 11)], [first[f"YB{i}"] for i in range(1, 11)]], 1) - 1
    row = pairs.iloc[0]
    assert row["source_id"] == first["imageA"] and row["target_id"] == first["imageB"]
    np.testing.assert_allclose(keypoints(row["source_kps"]), expected_src)
    np.testing.assert_allclose(keypoints(row["target_kps"]), expected_trg)
    assert row["norm_kind"] == "kpts"
    assert row["pck_norm"] == pytest.approx((expected_trg.max(0) - expected_trg.min(0)).max())
    with Image.open(SHARED / "pf-willow" / first["imageB"]) as image:
        target = images.set_index("image_id").loc[first["imageB"]]
        assert (target["width"], target["height"]) == image.size


@needs_willow
def test_download_then_prepare_stages_on_real_pfwillow(tmp_path):
    raw = download_stage.main("pfwillow", {"source": str(SHARED / "pf-willow")}, data_root=tmp_path)
    assert raw == tmp_path / "raw" / "pfwillow" and (raw / "test_pairs.csv").is_file()
    assert json.loads((raw / "manifest.json").read_text())["source"] == str(SHARED / "pf-willow")
    out = prepare_stage.main("pfwillow", data_root=tmp_path)
    assert out == tmp_path / "prepared" / "pfwillow"
    pairs, images = read_pairs(out), read_images(out)
    assert len(pairs) == 900
    assert all(Path(p).is_file() and str(raw) in p for p in images["path"])


# -- PF-PASCAL ---------------------------------------------------------------------------------


@needs_pascal
def test_pfpascal_real_test_list():
    csv_path = SHARED / "pf-pascal" / "test_pairs.csv"
    pairs = pfpascal.read_pair_list(csv_path)
    raw = pd.read_csv(csv_path)
    assert len(pairs) == 299
    counts = [len(p["source_xy"]) for p in pairs]
    assert counts == [len(str(v).split(";")) for v in raw["XA"]]
    assert counts == [len(str(v).split(";")) for v in raw["YB"]]
    assert len({p["source"] for p in pairs} | {p["target"] for p in pairs}) == 506
    assert pairs[0]["category"] == pfpascal.CLASSES[int(raw["class"][0]) - 1]
    first_x = float(raw["XA"][0].split(";")[0])
    assert pairs[0]["source_xy"][0, 0] == pytest.approx(first_x - 1)


def write_image(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path, fmt)
    return path


def make_pfpascal(root: Path) -> Path:
    names = {"a": (60, 40), "b": (50, 70), "c": (64, 64), "d": (30, 30)}
    for name, size in names.items():
        write_image(root / "PF-dataset-PASCAL" / "JPEGImages" / f"{name}.jpg", size)
    header = "source_image,target_image,class,XA,YA,XB,YB\n"
    line = "PF-dataset-PASCAL/JPEGImages/{}.jpg,PF-dataset-PASCAL/JPEGImages/{}.jpg,8,1;10;20,1;5;30,2;3;4,5;6;7\n"
    (root / "trn_pairs.csv").write_text(header + line.format("a", "b") + line.format("a", "b"))
    (root / "val_pairs.csv").write_text(header + line.format("b", "c"))
    (root / "test_pairs.csv").write_text(header + line.format("c", "a"))
    return root


def test_pfpascal_fixture_tables(tmp_path):
    out = prepare("pfpascal", make_pfpascal(tmp_path / "raw"), tmp_path / "prepared")
    pairs = read_pairs(out)
    assert list(pairs["split"]) == ["trn", "val", "test"]  # the duplicate trn row is dropped
    assert list(pairs["category"].unique()) == ["cat"]
    assert list(pairs["pck_norm"]) == [70.0, 64.0, 60.0]  # max side of the target image
    np.testing.assert_allclose(keypoints(pairs["source_kps"][0]), [[0, 0], [9, 4], [19, 29]])


# -- SPair-71k fixture -------------------------------------------------------------------------


def spair_annotation(src="a.jpg", trg="b.jpg", **overrides) -> dict:
    ann = {"pair_id": 1, "src_imname": src, "trg_imname": trg, "category": "cat",
           "src_imsize": [80, 60, 3], "trg_imsize": [70, 90, 3],
           "src_kps": [[0, 0], [79, 59], [10.5, 20]], "trg_kps": [[5, 5], [69, 89], [30, 40]],
           "src_bndbox": [0, 0, 70, 50], "trg_bndbox": [10, 20, 40, 80], "kps_ids": ["1", "4", "7"],
           "viewpoint_variation": 1, "scale_variation": 2, "truncation": 0, "occlusion": 3, "mirror": 1}
    ann.update(overrides)
    return ann


def make_spair(root: Path, annotations: dict[str, dict[str, dict]] | None = None) -> Path:
    write_image(root / "JPEGImages" / "cat" / "a.jpg", (80, 60))
    write_image(root / "JPEGImages" / "cat" / "b.jpg", (70, 90))
    """``annotations``: split -> pair name -> annotation, replacing the default pairs of those splits."""
    annotations = {
        "trn": {"000001-a-b:cat": spair_annotation()},
        "val": {"000002-b-a:cat": spair_annotation("b.jpg", "a.jpg", src_kps=[[5, 5]], trg_kps=[[1, 2]],
                                                   trg_bndbox=[0, 0, 50, 40], mirror=0)},
        "test": {"000003-a-b:cat": spair_annotation()},
        **(annotations or {}),
    }
    for split, pairs in annotations.items():
        (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
        (root / "Layout" / "large" / f"{split}.txt").write_text("".join(f"{name}\n" for name in pairs))
        for name, ann in pairs.items():
            path = root / "PairAnnotation" / split / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ann))
    return root


def test_spair_fixture_tables(tmp_path):
    out = prepare("spair", make_spair(tmp_path / "raw"), tmp_path / "prepared")
    pairs, images = read_pairs(out), read_images(out)
    assert list(pairs["split"]) == ["trn", "val", "test"]
    assert list(pairs["pair_id"]) == ["trn/000001-a-b:cat", "val/000002-b-a:cat", "test/000003-a-b:cat"]
    assert sorted(images["image_id"]) == ["JPEGImages/cat/a.jpg", "JPEGImages/cat/b.jpg"]
    first = pairs.iloc[0]
    np.testing.assert_allclose(keypoints(first["source_kps"]), [[0, 0], [79, 59], [10.5, 20]])  # already 0-based
    assert first["pck_norm"] == 60.0 and first["norm_kind"] == "bbox"  # max(40-10, 80-20)
    assert (first["viewpoint_variation"], first["scale_variation"], first["truncation"], first["occlusion"]) == (1, 2, 0, 3)
    assert bool(first["flip"]) and not bool(pairs.iloc[1]["flip"])
    assert pairs.iloc[1]["pck_norm"] == 50.0
    assert list(first["source_bbox"]) == [0, 0, 70, 50] and list(first["target_bbox"]) == [10, 20, 40, 80]


# -- bad input: one clear error naming the file, nothing written ----------------------------------


def expect_failure(tmp_path: Path, name: str, raw: Path, *fragments: str) -> None:
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError) as info:
        prepare(name, raw, out)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".tmp-prepared-*"))


def test_corrupt_image(tmp_path):
    raw = make_spair(tmp_path / "raw")
    (raw / "JPEGImages" / "cat" / "b.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    expect_failure(tmp_path, "spair", raw, str(raw / "JPEGImages" / "cat" / "b.jpg"), "corrupt")


def test_truncated_png(tmp_path):
    raw = make_pfpascal(tmp_path / "raw")
    path = write_image(raw / "PF-dataset-PASCAL" / "JPEGImages" / "c.jpg", (64, 64), "PNG")
    path.write_bytes(path.read_bytes()[:-30])
    expect_failure(tmp_path, "pfpascal", raw, str(path), "corrupt")


def test_missing_image(tmp_path):
    raw = make_spair(tmp_path / "raw")
    (raw / "JPEGImages" / "cat" / "b.jpg").unlink()
    expect_failure(tmp_path, "spair", raw, "PairAnnotation/trn/000001-a-b:cat.json", "JPEGImages/cat/b.jpg",
                   "not there")


def test_missing_annotation_file(tmp_path):
    raw = make_spair(tmp_path / "raw")
    (raw / "PairAnnotation" / "val" / "000002-b-a:cat.json").unlink()
    expect_failure(tmp_path, "spair", raw, "PairAnnotation/val/000002-b-a:cat.json", "not found")


def test_missing_split_list(tmp_path):
    raw = make_spair(tmp_path / "raw")
    (raw / "Layout" / "large" / "test.txt").unlink()
    expect_failure(tmp_path, "spair", raw, "Layout/large/test.txt", "not found")


def test_nan_keypoints(tmp_path):
    bad = spair_annotation(trg_kps=[[5, 5], [float("nan"), 3], [30, 40]])
    raw = make_spair(tmp_path / "raw", {"trn": {"p:cat": bad}})
    expect_failure(tmp_path, "spair", raw, "PairAnnotation/trn/p:cat.json", "NaN")


def test_keypoints_outside_the_image(tmp_path):
    bad = spair_annotation(trg_kps=[[5, 5], [69, 95], [30, 40]])  # image b is 70 x 90
    raw = make_spair(tmp_path / "raw", {"trn": {"p:cat": bad}})
    expect_failure(tmp_path, "spair", raw, "PairAnnotation/trn/p:cat.json", "outside the 70x90 image")


def test_keypoints_within_tolerance_pass(tmp_path):
    ok = spair_annotation(trg_kps=[[5, 5], [70.5, 90], [-1, 40]])
    raw = make_spair(tmp_path / "raw", {"trn": {"p:cat": ok}})
    assert len(read_pairs(prepare("spair", raw, tmp_path / "prepared"), "trn")) == 1


def test_pair_pointing_at_a_missing_image_in_a_pair_list(tmp_path):
    raw = make_pfpascal(tmp_path / "raw")
    (raw / "PF-dataset-PASCAL" / "JPEGImages" / "c.jpg").unlink()
    expect_failure(tmp_path, "pfpascal", raw, str(raw / "val_pairs.csv"), "JPEGImages/c.jpg", "not there")


def test_pair_list_with_mismatched_keypoints(tmp_path):
    raw = make_pfpascal(tmp_path / "raw")
    (raw / "test_pairs.csv").write_text("source_image,target_image,class,XA,YA,XB,YB\n"
                                        "PF-dataset-PASCAL/JPEGImages/c.jpg,PF-dataset-PASCAL/JPEGImages/a.jpg,"
                                        "8,1;2,1;2,1,1\n")
    expect_failure(tmp_path, "pfpascal", raw, str(raw / "test_pairs.csv"), "row 2", "differ in length")


def test_willow_list_with_nan(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "test_pairs.csv").write_text("imageA,imageB,XA1,YA1,XB1,YB1\na.png,b.png,1,,3,4\n")
    expect_failure(tmp_path, "pfwillow", raw, str(raw / "test_pairs.csv"), "row 2", "NaN", "YA1")


# -- malformed and empty pair lists: DatasetError naming the file and the row ----------------------

WILLOW_HEADER = "imageA,imageB,XA1,XA2,YA1,YA2,XB1,XB2,YB1,YB2\n"
WILLOW_ROW = "a.png,b.png,1,2,3,4,5,6,7,8\n"
PASCAL_HEADER = "source_image,target_image,class,XA,YA,XB,YB\n"
PASCAL_ROW = "PF-dataset-PASCAL/JPEGImages/c.jpg,PF-dataset-PASCAL/JPEGImages/a.jpg,8,1;2,1;2,1;2,1;2\n"


def willow_raw(tmp_path: Path, text: str) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "test_pairs.csv").write_text(text)
    return raw


@pytest.mark.parametrize("text, fragments", [
    (WILLOW_HEADER + WILLOW_ROW + "a.png,b.png,1,2,3,4,5,6,7,8,9\n", ["row 3", "11 fields", "expected 10"]),
    (WILLOW_HEADER + WILLOW_ROW + "a.png,b.png,1,2,3,4,5,6\n", ["row 3", "8 fields", "expected 10"]),
    (WILLOW_HEADER + "a.png,b.png,1,2,3,x,5,6,7,8\n", ["row 2", "YA2", "'x'"]),
    ("", ["empty"]),
    (WILLOW_HEADER, ["no pairs"]),
    ("imageA,imageB,XA1,YA1\n" + "a.png,b.png,1,2\n", ["expected columns"]),
], ids=["long-row", "short-row", "not-a-number", "empty", "header-only", "no-target-columns"])
def test_bad_willow_pair_list(tmp_path, text, fragments):
    raw = willow_raw(tmp_path, text)
    expect_failure(tmp_path, "pfwillow", raw, str(raw / "test_pairs.csv"), *fragments)


@pytest.mark.parametrize("text, fragments", [
    (PASCAL_HEADER + PASCAL_ROW + PASCAL_ROW.replace(",8,", ",8,extra,"), ["row 3", "8 fields", "expected 7"]),
    (PASCAL_HEADER + PASCAL_ROW.replace(",1;2,1;2\n", "\n"), ["row 2", "5 fields", "expected 7"]),
    ("", ["empty"]),
    (PASCAL_HEADER, ["no pairs"]),
], ids=["long-row", "short-row", "empty", "header-only"])
def test_bad_pascal_pair_list(tmp_path, text, fragments):
    raw = make_pfpascal(tmp_path / "raw")
    (raw / "val_pairs.csv").write_text(text)
    expect_failure(tmp_path, "pfpascal", raw, str(raw / "val_pairs.csv"), *fragments)


@needs_willow
def test_real_willow_list_with_a_short_row(tmp_path):
    lines = (SHARED / "pf-willow" / "test_pairs.csv").read_text().splitlines(keepends=True)
    lines[5] = lines[5].rsplit(",", 1)[0] + "\n"  # the last field (YB10) of row 6 is gone
    raw = willow_raw(tmp_path, "".join(lines))
    expect_failure(tmp_path, "pfwillow", raw, str(raw / "test_pairs.csv"), "row 6", "41 fields", "expected 42")


@needs_pascal
def test_real_pascal_list_with_a_broken_row(tmp_path):
    lines = (SHARED / "pf-pascal" / "test_pairs.csv").read_text().splitlines(keepends=True)
    lines[10] = lines[10].replace(",", ";", 1)  # source and target image run together
    path = tmp_path / "test_pairs.csv"
    path.write_text("".join(lines))
    with pytest.raises(DatasetError, match=rf"{path}: row 11: 6 fields, expected 7"):
        pfpascal.read_pair_list(path)


def test_empty_spair_split_list(tmp_path):
    raw = make_spair(tmp_path / "raw", {"test": {}})
    expect_failure(tmp_path, "spair", raw, "Layout/large/test.txt", "no pairs")


@pytest.mark.parametrize("field, value", [("viewpoint_variation", "high"), ("trg_bndbox", [1, 2]),
                                          ("trg_bndbox", [5, 5, 5, 5]), ("src_bndbox", [0, 0, "x", 1]),
                                          ("category", ["cat"]), ("src_imname", "../../a.jpg")],
                         ids=["flag", "short-box", "point-box", "source-box", "category", "image-path"])
def test_spair_annotation_with_a_bad_field(tmp_path, field, value):
    raw = make_spair(tmp_path / "raw", {"val": {"p:cat": spair_annotation(**{field: value})}})
    expect_failure(tmp_path, "spair", raw, "PairAnnotation/val/p:cat.json", field)


def test_spair_annotation_that_is_not_an_object(tmp_path):
    raw = make_spair(tmp_path / "raw")
    (raw / "PairAnnotation" / "val" / "000002-b-a:cat.json").write_text("[1, 2]")
    expect_failure(tmp_path, "spair", raw, "PairAnnotation/val/000002-b-a:cat.json", "not a JSON object")


# -- the package ---------------------------------------------------------------------------------


def test_package_imports_without_image_libraries():
    code = ("import sys; from semcorr.pipeline.datasets import NAMES, DatasetError, prepare; "
            "print(','.join(NAMES), [m for m in ('skimage', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, loaded = out.strip().split(" ", 1)
    assert {"spair", "pfpascal", "pfwillow", "synthetic"} <= set(names.split(","))
    assert loaded == "[]"


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'pfwilow'.*spair.*pfpascal.*pfwillow.*synthetic"):
        prepare("pfwilow", tmp_path, tmp_path / "out")


def test_pair_list_pointing_outside_the_raw_folder(tmp_path):
    write_image(tmp_path / "outside.png", (30, 30), "PNG")
    raw = willow_raw(tmp_path, WILLOW_HEADER + "../outside.png,../outside.png,1,2,3,4,5,6,7,8\n")
    expect_failure(tmp_path, "pfwillow", raw, str(raw / "test_pairs.csv"), "row 2", "'../outside.png'",
                   "outside the raw dataset folder")
