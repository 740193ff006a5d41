"""Left/right keypoint symmetry and the geometry-aware subset (GeoAware-SC, Zhang et al.,
CVPR 2024, "Telling Left from Right", Sec. 3.1).

Data, per dataset and category, in the dataset's own keypoint ids:

- ``sides``: 0 centre, 1 left, 2 right, per keypoint id;
- ``flip_pairs``: the (left, right) id pairs that trade places when the image is mirrored;
- ``geo_groups``: the groups of ids whose members look alike up to left/right (or front/back)
  pose, the ones GeoAware-SC counts as geometry-aware;
- ``names``: keypoint names where the source gives them.

Sources. SPair-71k: GeoAware-SC's ``utils/utils_geoware.py`` (github.com/Junyi42/GeoAware-SC,
commit 99fd6b6): ``SPAIR_LR`` (sides), ``SPAIR_FLIP_TRN`` (flip pairs, raw SPair ids, the
dummy ids 11-12 of bicycle and 8-9 of bus skipped), ``SPAIR_GEO_AWARE`` (groups; singletons
dropped) and the names its comments give (SPair-71k ships no keypoint names). AP-10k: the
17 joints and their ``swap`` pairs of AP-10k's own mmpose config
(github.com/AlexTheBad/AP-10K, ``configs/_base_/datasets/ap10k.py``), and GeoAware-SC's
``AP10K_GEO_AWARE`` groups. GeoAware-SC's groups are a subset of the flip pairs: face parts
(eyes, mouth corners, nose sides, ears of some categories) mirror into each other but are
not counted as geometry-aware; the tables keep both as published.

Not defined: PF-PASCAL and PF-WILLOW pair lists give coordinates without keypoint ids, and the
synthetic set's keypoints are image corners with no left or right, so no keypoint has a known
counterpart there (`UNDEFINED` says why).

The geometry-aware rule (GeoAware-SC ``pck_train.compute_pck``): keypoint k of a pair is
geometry-aware when it is visible in both images and at least two members of its group
(k included) are visible in the target image. `geo_aware_pck` scores that subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from semcorr.pipeline.pck import PCK, evaluate_predictions


@dataclass(frozen=True)
class KeypointSet:
    """The keypoints of one category: ``sides[i]`` of id i, ``flip_pairs`` (left, right) ids,
    ``geo_groups`` of ids, ``names`` id -> name (partial)."""

    sides: tuple[int, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    geo_groups: tuple[tuple[int, ...], ...]
    names: dict[int, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.sides)

    def counterpart(self) -> np.ndarray:
        """``[n]`` int: the id each keypoint becomes in the mirrored image (itself if central)."""
        out = np.arange(self.n)
        for a, b in self.flip_pairs:
            out[a], out[b] = b, a
        return out

    def group_of(self) -> np.ndarray:
        """``[n]`` int: index of the geometry-aware group of each id, -1 for none."""
        out = np.full(self.n, -1)
        for g, members in enumerate(self.geo_groups):
            out[list(members)] = g
        return out


def _pairs(*ids: int) -> tuple[tuple[int, int], ...]:
    """``_pairs(4, 5, 6, 7)`` -> ((4, 5), (6, 7))."""
    return tuple(zip(ids[::2], ids[1::2]))


def _names(**groups: str) -> dict[int, str]:
    """``_names(k4_5="landing gear")`` -> {4: "landing gear", 5: "landing gear"}."""
    out = {}
    for key, name in groups.items():
        for i in key.removeprefix("k").split("_"):
            out[int(i)] = name
    return out


_SIDES = {  # GeoAware-SC SPAIR_LR: 0 centre, 1 left, 2 right
    "aeroplane": (0, 0, 0, 0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0, 0, 0),
    "bicycle": (0, 0, 2, 1, 0, 0, 2, 1, 0, 2, 1, 0, 0, 0),
    "bird": (0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 2, 1, 2, 1, 0),
    "boat": (0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0),
    "bottle": (1, 2, 1, 2, 1, 2, 1, 2, 1, 2),
    "bus": (2, 1, 2, 1, 0, 2, 1, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1),
    "car": (2, 1, 2, 1, 0, 0, 2, 1, 0, 0, 2, 2, 2, 2, 2, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1),
    "cat": (2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0),
    "chair": (2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1),
    "cow": (2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 2, 1),
    "dog": (2, 1, 2, 1, 2, 1, 0, 0, 0, 2, 1, 2, 1, 0, 0, 0),
    "horse": (2, 1, 2, 1, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1),
    "motorbike": (2, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "person": (2, 1, 2, 1, 0, 0, 0, 0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1),
    "pottedplant": (2, 0, 1, 0, 2, 1, 2, 0, 1),
    "sheep": (2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 2, 1),
    "train": (1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2),
    "tvmonitor": (2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 1, 2, 2, 0, 1, 1),
}
_ANIMAL_FLIPS = _pairs(0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 17, 18, 19, 20)  # cow, sheep
_ANIMAL_GROUPS = ((2, 3), (9, 10, 11, 12), (15, 16, 17, 18), (19, 20))
_ANIMAL_NAMES = _names(k0_1="below ear", k2_3="ear", k4_5="eye", k6_7="nose", k9_10_11_12="hoof",
                       k15_16_17_18="knee", k19_20="horn")
_VEHICLE_FLIPS = ((0, 1), (2, 3), (10, 20), (13, 23), (11, 21), (14, 24), (12, 22), (15, 25), (16, 17), (26, 27),
                  (18, 19), (28, 29))  # bus and car share these; each adds its own lights

SPAIR: dict[str, KeypointSet] = {
    "aeroplane": KeypointSet(
        _SIDES["aeroplane"], _pairs(*range(4, 22)), _pairs(*range(4, 22)),
        _names(k4_5="landing gear", k6_7="engine front", k8_9="wing end", k10_11="engine back",
               k12_13="wing foot front", k14_15="wing foot back", k16_17="tailplane end",
               k18_19="tailplane foot front", k20_21="tailplane foot back")),
    "bicycle": KeypointSet(
        _SIDES["bicycle"], _pairs(2, 3, 6, 7, 9, 10), _pairs(2, 3, 6, 7, 9, 10),
        _names(k2_3="handle", k6_7="seat back end", k9_10="pedal")),
    "bird": KeypointSet(
        _SIDES["bird"], _pairs(1, 2, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15), _pairs(1, 2, 10, 11, 12, 13, 14, 15),
        _names(k1_2="wing end", k4_5="mouth", k7_8="eye", k10_11="foot", k12_13="knee", k14_15="hip")),
    "boat": KeypointSet(
        _SIDES["boat"], _pairs(*range(1, 13)), _pairs(*range(1, 13)),
        _names(k1_2="upper front", k3_4="upper side", k5_6="upper back", k7_8="lower front", k9_10="lower side",
               k11_12="lower back")),
    "bottle": KeypointSet(
        _SIDES["bottle"], _pairs(*range(10)), _pairs(*range(10)),
        _names(k0_1="cap", k2_3="neck", k4_5="shoulder", k6_7="body", k8_9="base")),
    "bus": KeypointSet(
        _SIDES["bus"], ((5, 6),) + _VEHICLE_FLIPS,
        ((0, 1), (2, 3, 5, 6), (4, 7), (10, 13, 20, 23), (11, 14, 21, 24), (12, 15, 22, 25), (16, 17, 26, 27),
         (18, 19, 28, 29)),
        _names(k0_1="rearview mirror", k2_3_5_6="light", k4_7="licence plate", k10_13_20_23="front fender",
               k11_14_21_24="wheel", k12_15_22_25="rear fender", k16_17_26_27="window top corner",
               k18_19_28_29="window bottom corner")),
    "car": KeypointSet(
        _SIDES["car"], ((6, 7),) + _VEHICLE_FLIPS,
        ((0, 1), (2, 3, 6, 7), (4, 8), (5, 9), (10, 13, 20, 23), (11, 14, 21, 24), (12, 15, 22, 25),
         (16, 17, 26, 27), (18, 19, 28, 29)),
        _names(k0_1="rearview mirror", k2_3_6_7="light", k4_8="licence plate", k5_9="brand logo",
               k10_13_20_23="rear fender", k11_14_21_24="wheel", k12_15_22_25="front fender",
               k16_17_26_27="window bottom corner", k18_19_28_29="window top corner")),
    "cat": KeypointSet(
        _SIDES["cat"], _pairs(0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12), ((2, 3), (9, 10, 11, 12)),
        _names(k0_1="below ear", k2_3="ear", k4_5="eye", k6_7="nose", k9_10_11_12="paw")),
    "chair": KeypointSet(
        _SIDES["chair"], _pairs(*range(14)), ((0, 1), (2, 3), (4, 5, 6, 7), (8, 9), (10, 11), (12, 13)),
        _names(k0_1="cushion front", k2_3="cushion back", k4_5_6_7="leg", k8_9="backrest top",
               k10_11="armrest front", k12_13="armrest back")),
    "cow": KeypointSet(_SIDES["cow"], _ANIMAL_FLIPS, _ANIMAL_GROUPS, _ANIMAL_NAMES),
    "dog": KeypointSet(
        _SIDES["dog"], _pairs(0, 1, 2, 3, 4, 5, 9, 10, 11, 12), ((2, 3), (9, 10, 11, 12)),
        _names(k0_1="below ear", k2_3="ear", k4_5="eye", k9_10_11_12="paw")),
    "horse": KeypointSet(
        _SIDES["horse"], _pairs(0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 16, 17, 18, 19),
        ((2, 3), (10, 11, 12, 13), (16, 17, 18, 19)),
        _names(k0_1="below ear", k2_3="ear", k4_5="eye", k6_7="nose", k10_11_12_13="hoof", k16_17_18_19="knee")),
    "motorbike": KeypointSet(
        _SIDES["motorbike"], _pairs(0, 1, 2, 3), _pairs(0, 1, 2, 3), _names(k0_1="rearview mirror", k2_3="handle")),
    "person": KeypointSet(
        _SIDES["person"], _pairs(0, 1, 2, 3, *range(8, 20)), _pairs(*range(8, 20)),
        _names(k0_1="eye", k2_3="ear", k8_9="shoulder", k10_11="elbow", k12_13="wrist", k14_15="knee",
               k16_17="ankle", k18_19="foot")),
    "pottedplant": KeypointSet(
        _SIDES["pottedplant"], _pairs(0, 2, 4, 5, 6, 8), ((0, 1, 2, 3), (4, 5), (6, 8)),
        _names(k0_1_2_3="top", k4_5="side wall", k6_8="bottom")),
    "sheep": KeypointSet(_SIDES["sheep"], _ANIMAL_FLIPS, _ANIMAL_GROUPS, _ANIMAL_NAMES),
    "train": KeypointSet(
        _SIDES["train"], _pairs(*range(18)), _pairs(*range(18)),
        _names(k0_1="front top", k2_3="front bottom", k4_5="back top", k6_7="back bottom",
               k8_9="window corner top outer", k10_11="window corner bottom outer",
               k12_13="window corner top inner", k14_15="window corner bottom inner", k16_17="front light")),
    "tvmonitor": KeypointSet(
        _SIDES["tvmonitor"], _pairs(0, 2, 4, 6, 3, 7, 8, 10, 12, 14, 11, 15),
        ((0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15)),
        _names(k0_2_4_6="outer corner", k1_3_5_7="outer side", k8_10_12_14="inner corner",
               k9_11_13_15="inner side")),
}

AP10K_NAMES = ("left eye", "right eye", "nose", "neck", "root of tail", "left shoulder", "left elbow",
               "left front paw", "right shoulder", "right elbow", "right front paw", "left hip", "left knee",
               "left back paw", "right hip", "right knee", "right back paw")
AP10K = KeypointSet(
    tuple(1 if name.startswith("left") else 2 if name.startswith("right") else 0 for name in AP10K_NAMES),
    ((0, 1), (5, 8), (6, 9), (7, 10), (11, 14), (12, 15), (13, 16)),
    ((5, 8), (6, 9, 12, 15), (7, 10, 13, 16), (11, 14)),
    dict(enumerate(AP10K_NAMES)),
)

UNDEFINED = {
    "pfpascal": "PF-PASCAL pair lists give keypoint coordinates without keypoint ids",
    "pfwillow": "PF-WILLOW pair lists give keypoint coordinates without keypoint ids",
    "synthetic": "the synthetic keypoints are image corners: none has a left/right counterpart",
}


def keypoint_set(dataset: str, category: str) -> KeypointSet | None:
    """The table of ``category`` of ``dataset`` (``spair``: per category; ``ap10k``: one for
    every species); None where the dataset or category has none."""
    if dataset == "spair":
        return SPAIR.get(category)
    if dataset == "ap10k":
        return AP10K
    return None


def flip_index(kset: KeypointSet, kp_ids) -> list[int]:
    """Position, within a pair's keypoint list ``kp_ids`` (``[N]`` ids), of each keypoint's
    mirror counterpart: its own position for a central keypoint, -1 when the counterpart is
    not among ``kp_ids``."""
    kp_ids = [int(i) for i in kp_ids]
    _check_ids(kset, kp_ids)
    position = {kp: n for n, kp in enumerate(kp_ids)}
    mirror = kset.counterpart()
    return [position.get(int(mirror[kp]), -1) for kp in kp_ids]


def geo_aware_flags(kset: KeypointSet, kp_ids, visible, target_visible_ids) -> list[bool]:
    """Geometry-aware flag of each keypoint of a pair: visible in both images (``visible``)
    and in a group with at least two members visible in the target (``target_visible_ids``:
    every id annotated in the target image, whether or not the source has it)."""
    kp_ids = [int(i) for i in kp_ids]
    _check_ids(kset, kp_ids)
    group = kset.group_of()
    in_target = np.zeros(kset.n, dtype=np.int64)
    target_ids = [int(i) for i in target_visible_ids]
    _check_ids(kset, target_ids)
    for g in group[target_ids]:
        if g >= 0:
            in_target[g] += 1
    return [bool(v) and group[kp] >= 0 and in_target[group[kp]] >= 2 for kp, v in zip(kp_ids, visible)]


def _check_ids(kset: KeypointSet, ids: list[int]) -> None:
    bad = [i for i in ids if not 0 <= i < kset.n]
    if bad:
        raise ValueError(f"keypoint ids {bad} outside 0..{kset.n - 1} of this category's table")


# -- PCK on the geometry-aware subset ---------------------------------------------------------


@dataclass
class GeoAwarePCK:
    """PCK of a predictions table on the geometry-aware subset of its pairs.

    ``defined``: whether the pair table carries flags (else ``reason`` says why not and the
    rest is empty). ``pck``: PCK with only geometry-aware keypoints counted (per image: over
    the ``pck.n_pairs`` pairs that have one; per point: over ``pck.n_points``);
    ``n_pairs_flagged``: pairs whose flags are known (pairs without keypoint ids have none);
    ``n_points_visible``: the visible keypoints of those pairs (the full set's denominator).
    GeoAware-SC reports the per-point figure.
    """

    defined: bool
    reason: str = ""
    pck: PCK | None = None
    per_category: dict[str, PCK] = field(default_factory=dict)
    n_pairs_flagged: int = 0
    n_points_visible: int = 0


def geo_aware_pck(pairs: pd.DataFrame, predictions: pd.DataFrame, alphas, dataset: str | None = None) -> GeoAwarePCK:
    """PCK of ``predictions`` (pair_id, kp_index, x, y) on the geometry-aware keypoints of
    ``pairs`` (a prepared pair table with a ``geo_aware`` column); only pairs with flags
    count. Without flags (the column absent or all null) the result is not ``defined`` and
    ``reason`` says why (from `UNDEFINED` when ``dataset`` is given)."""
    if "geo_aware" not in pairs.columns or pairs["geo_aware"].isna().all():
        reason = UNDEFINED.get(dataset or "", "the pair table has no geometry-aware flags (no keypoint ids, "
                               "or no target image annotations to tell which counterparts are visible)")
        return GeoAwarePCK(defined=False, reason=reason)
    flagged = pairs[pairs["geo_aware"].notna()].reset_index(drop=True)
    subset = flagged.copy()
    subset["visible"] = [list(np.asarray(v, bool) & np.asarray(g, bool))
                         for v, g in zip(flagged["visible"], flagged["geo_aware"])]
    wanted = predictions[predictions["pair_id"].isin(set(flagged["pair_id"]))]
    overall, per_category = evaluate_predictions(subset, wanted, alphas)
    n_visible = int(sum(np.asarray(v, bool).sum() for v in flagged["visible"]))
    return GeoAwarePCK(defined=True, pck=overall, per_category=per_category, n_pairs_flagged=len(flagged),
                       n_points_visible=n_visible)
