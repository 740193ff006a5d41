"""params.yaml: its one schema, validated once, whole, before a stage does any work.

The only place (with the stage modules) that knows params.yaml exists. `load_params`
returns a validated `Params`; every problem is reported at once, each line naming the
param path and what is allowed, and an unknown key names the closest known one.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")

# Kept here (not imported from the library) so that reading params imports no torch;
# tests/test_params.py checks they equal the library's registries.
DATASETS = ("spair", "pfpascal", "pfwillow", "synthetic", "hpatches", "ap10k", "ap10k_cross_species",
            "ap10k_cross_family")
FAMILIES = ("dinov2", "dinov3", "sam", "clip", "daisy")
METHODS = ("argmax", "softargmax", "valtuned")
PROTOCOLS = ("native", "spair", "pfpascal", "pfwillow", "seed_study")
SPLITS = ("trn", "val", "test")
HOMOGRAPHY_DATASETS = ("synthetic", "hpatches")  # pairs with a known homography: the sparse benchmark
SOURCE_DATASETS = ("spair", "pfpascal", "pfwillow", "hpatches", "ap10k", "ap10k_cross_species", "ap10k_cross_family")
VIDEO_DATASETS = ("davis", "jhmdb", "synthvideo")  # label propagation sets (`video_datasets`): no pairs

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names every bad param."""


def odd_cells(value: int) -> int:
    """A Gaussian target's support in cells: odd, so that it is centred on a cell."""
    if value % 2 == 0:
        raise ValueError("must be odd (the Gaussian target is centred on a cell)")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DatasetSource(Section):
    source: str | None  # local directory or archive; null = the official URL


class SyntheticData(Section):
    seed: int
    categories: Annotated[int, Field(ge=1, le=8)]
    images_per_category: Annotated[int, Field(ge=6)]
    image_size: Annotated[int, Field(ge=32)]
    keypoints: PositiveInt


class SyntheticVideoData(Section):
    """The embedded video set (`pipeline.datasets.synthetic_video`)."""

    seed: int  # fixes every frame, path, mask and keypoint
    sequences: Annotated[int, Field(ge=1, le=4)]  # videos, each with its own photographs
    frames: Annotated[int, Field(ge=3)]  # per video (DAVIS scores frames 1..T-2)
    width: Annotated[int, Field(ge=64)]  # frame size in pixels
    height: Annotated[int, Field(ge=48)]
    keypoints: PositiveInt  # tracked points on the moving object


class Download(Section):
    """One section per dataset that the study may download; absent = not used."""

    spair: DatasetSource | None = None
    pfpascal: DatasetSource | None = None
    pfwillow: DatasetSource | None = None
    synthetic: SyntheticData | None = None
    hpatches: DatasetSource | None = None
    ap10k: DatasetSource | None = None  # AP-10k intra-species pairs (GeoAware-SC's settings)
    ap10k_cross_species: DatasetSource | None = None  # the same archive, cross-species pairs
    ap10k_cross_family: DatasetSource | None = None  # the same archive, cross-family pairs
    davis: DatasetSource | None = None
    jhmdb: DatasetSource | None = None
    synthvideo: SyntheticVideoData | None = None


class BackboneWeights(Section):
    """Read by the weights stage only: where the checkpoint comes from and what vouches for it."""

    checkpoint: str | None  # weights registry key; null = weight-free or random-init
    source: str | None  # local copy of the checkpoint file (or its folder)
    sha256: Sha256 | None  # pin for a checkpoint without a registry hash
    random_init: bool


class BackboneModel(Section):
    """Read by extract, finetune and match: what the network is and how it sees an image."""

    family: Literal[FAMILIES]  # type: ignore[valid-type]
    variant: str
    layer: PositiveInt | None
    input_size: PositiveInt
    resize: Literal["pad", "squash"]
    arch: dict[str, Any]


class Backbone(Section):
    weights: BackboneWeights
    model: BackboneModel

    @model_validator(mode="after")
    def _weights_or_random(self):
        w = self.weights
        if w.checkpoint is None and not w.random_init and self.model.family != "daisy":
            raise ValueError("weights.checkpoint is null and weights.random_init is false: set `weights.checkpoint` "
                             "to a registry key (with `weights.source` for a local file) or `weights.random_init: true`")
        return self


class Extract(Section):
    batch_size: PositiveInt
    num_workers: NonNegativeInt
    device: Device
    flips: bool
    shard_images: PositiveInt


class Finetune(Section):
    train_dataset: str
    epochs: PositiveInt
    lr: PositiveFloat
    weight_decay: Annotated[float, Field(ge=0)]
    batch_size: PositiveInt
    milestones: list[PositiveInt]
    gamma: PositiveFloat
    temperature: PositiveFloat
    kernel_size: PositiveInt
    sigma: PositiveFloat
    seed: int
    cached_prefix: bool
    cache_dtype: Literal["bfloat16", "float16", "float32"]
    flip_augment: bool
    max_train_pairs: PositiveInt | None
    max_val_pairs: PositiveInt | None
    val_alpha: Annotated[float, Field(gt=0, le=1)]
    prefix_batch_size: PositiveInt
    device: Device

    _odd = field_validator("kernel_size")(odd_cells)


class Argmax(Section):
    """Read by the match stage: the similarity, its argmax, and the windows kept for soft-argmax."""

    upsample: PositiveInt
    mutual: bool
    max_window: NonNegativeInt
    pose_align: Literal["none", "flip"]  # flip: each pair matched from its original or mirrored source (needs extract.flips)


class SoftArgmax(Section):
    """Read by the soft-argmax stage, which refines the argmax from the kept windows."""

    window: NonNegativeInt
    temperature: PositiveFloat
    zero_outside: bool


class ValTuned(Section):
    """Read by the tune stage: the grid searched on val; the valtuned match uses its choice."""

    upsample: Annotated[list[PositiveInt], Field(min_length=1)]
    window: Annotated[list[NonNegativeInt], Field(min_length=1)]
    temperature: Annotated[list[PositiveFloat], Field(min_length=1)]
    zero_outside: Annotated[list[bool], Field(min_length=1)]
    alpha: Annotated[float, Field(gt=0, le=1)]


class Match(Section):
    argmax: Argmax
    softargmax: SoftArgmax
    valtuned: ValTuned

    @model_validator(mode="after")
    def _window_kept(self):
        if self.softargmax.window > self.argmax.max_window:
            raise ValueError(f"softargmax.window {self.softargmax.window} exceeds argmax.max_window "
                             f"{self.argmax.max_window}, the radius of the similarity windows the match stage keeps")
        return self


class Bootstrap(Section):
    resamples: Annotated[int, Field(ge=100)]
    seed: int
    confidence: Annotated[float, Field(gt=0, lt=1)]


class Evaluate(Section):
    split: Literal[SPLITS]  # type: ignore[valid-type]
    alphas: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]
    protocols: Annotated[list[Literal[PROTOCOLS]], Field(min_length=1)]  # type: ignore[valid-type]
    bootstrap: Bootstrap

    @field_validator("alphas")
    @classmethod
    def _has_the_summary_alpha(cls, value: list[float]) -> list[float]:
        if 0.1 not in value:
            raise ValueError("must include 0.1: the summary, comparisons and charts report PCK@0.1")
        return value


class Lora(Section):
    """Read by the LoRA fine-tuning stages (peft); each rank in `lora_ranks` is one variant ``<key>_lora<R>``."""

    alpha: PositiveFloat  # peft lora_alpha: the update is scaled by alpha / rank
    targets: Annotated[list[Literal["qkv", "proj"]], Field(min_length=1)]  # attention projections adapted
    depth: PositiveInt | None  # the last N blocks (their prefix cached); null: every block


class Head(Section):
    """Read by the head stage (`pipeline.head`): a light post-processor per `head_backbones` key,
    trained on cached features; its output is the variant ``<key>_head``."""

    train_dataset: str  # trained on its trn pairs, epoch chosen on its val pairs
    blocks: PositiveInt  # bottleneck blocks (GeoAware-SC: one per feature source)
    out_dim: PositiveInt | None  # output channels; null: the input's (the untrained head is the identity)
    bottleneck_ratio: PositiveInt  # inner width = out_dim / ratio (GeoAware-SC: 4)
    groups: PositiveInt  # GroupNorm groups, at most
    dropout: Annotated[float, Field(ge=0, lt=1)]  # feature-map dropout while training (GeoAware-SC: 0.2)
    epochs: PositiveInt
    lr: PositiveFloat  # AdamW peak lr of the one-cycle schedule (GeoAware-SC: 1.25e-3)
    weight_decay: Annotated[float, Field(ge=0)]
    warmup: Annotated[float, Field(gt=0, lt=1)]  # fraction of the steps warming up
    batch_images: Annotated[int, Field(ge=2)]  # images per step; every training pair among them counts
    temperature: PositiveFloat  # softmax temperature of the Gaussian cross-entropy
    kernel_size: PositiveInt  # Gaussian target support, cells (odd)
    sigma: PositiveFloat  # Gaussian target std, cells
    flip_augment: bool  # mirrored maps from the store (needs extract.flips)
    seed: int  # weights, dropout, step order and flips
    max_train_pairs: PositiveInt | None  # a seeded subset of the trn pairs; null: all
    max_val_pairs: PositiveInt | None  # a seeded subset of the val pairs; null: all
    val_alpha: Annotated[float, Field(gt=0, le=1)]  # epoch choice: val PCK@val_alpha per image, argmax
    threads: PositiveInt | None  # torch CPU threads while training; null: torch's default

    _odd = field_validator("kernel_size")(odd_cells)


class Propagate(Section):
    """Read by the propagate and video_eval stages: the label-propagation rule (`pipeline.propagation`)."""

    n_context: PositiveInt  # recent frames each target frame attends to, besides the first frame
    radius: PositiveFloat  # cells: a recent frame's keys lie closer than this to the target cell
    topk: PositiveInt  # affinities kept per target cell
    temperature: PositiveFloat  # softmax temperature over the kept affinities


class SparseDetect(Section):
    """Read by the keypoints stage."""

    max_keypoints: PositiveInt  # SIFT keypoints kept per image


class SparseMatch(Section):
    """Read by the sparse stage."""

    weight: Annotated[float, Field(ge=0)]  # fused: the semantic descriptor's weight against the local one
    ratio: Annotated[float, Field(gt=0, le=1)] | None  # ratio test on descriptor distances; null: off
    ransac_threshold: PositiveFloat  # px, OpenCV RANSAC reprojection threshold
    seed: int  # OpenCV's RNG seed before each RANSAC


class Sparse(Section):
    detect: SparseDetect
    match: SparseMatch


class Report(Section):
    pictures_per_category: NonNegativeInt
    max_pair_pictures: NonNegativeInt


class Slurm(Section):
    """submitit's parameters of each array task (`pipeline.distributed.default_slurm_conf`)."""

    cluster: Literal["slurm", "local"]  # local: submitit's local executor, the tasks run on this machine
    partition: str | None  # null = the cluster's default
    account: str | None
    gpus_per_task: NonNegativeInt
    cpus_per_task: PositiveInt
    mem_gb: PositiveInt
    time_min: PositiveInt
    setup: list[str]  # shell lines each task runs first (module load ..., source .venv/bin/activate)


class Launch(Section):
    """How the extract stages run, not what they compute: they read it, but dvc.yaml lists it
    for no stage (a store is bitwise the same however it was run: tests/test_torchrun.py,
    tests/test_slurm.py), so changing it re-runs nothing."""

    launcher: Literal["none", "slurm"]  # none: this process (each rank under torchrun); slurm: a job array
    jobs: PositiveInt  # slurm: tasks of the array, each a share of the shards
    slurm: Slurm = Slurm(cluster="slurm", partition=None, account=None, gpus_per_task=1, cpus_per_task=8, mem_gb=32,
                         time_min=240, setup=[])


class Params(Section):
    datasets: Annotated[list[str], Field(min_length=1)]
    backbones: Annotated[list[str], Field(min_length=1)]
    finetune_backbones: list[str]
    finetune_depths: list[PositiveInt]
    lora_ranks: list[PositiveInt]
    head_backbones: list[str]
    sparse_datasets: list[str]
    video_datasets: list[str]
    methods: Annotated[list[Literal[METHODS]], Field(min_length=1)]  # type: ignore[valid-type]
    download: Download
    backbone: dict[str, Backbone]
    extract: Extract
    finetune: Finetune
    lora: Lora
    head: Head
    match: Match
    evaluate: Evaluate
    propagate: Propagate
    sparse: Sparse
    report: Report
    launch: Launch = Launch(launcher="none", jobs=1)  # optional: without it, extract runs in one process

    @model_validator(mode="after")
    def _lists_refer_to_sections(self):
        problems = []
        for position, name in enumerate(self.datasets):
            if name in VIDEO_DATASETS:
                problems.append(f"datasets[{position}] = {name!r} is a video dataset (no pairs): list it in "
                                "`video_datasets`")
            elif name not in DATASETS:
                problems.append(f"datasets[{position}] = {name!r}: unknown dataset{_suggest(name, DATASETS)}; "
                                f"known: {', '.join(DATASETS)}")
            elif getattr(self.download, name) is None:
                problems.append(f"datasets[{position}] = {name!r} has no `download.{name}` section")
        for list_name in ("backbones", "finetune_backbones"):
            for position, key in enumerate(getattr(self, list_name)):
                if key not in self.backbone:
                    problems.append(f"{list_name}[{position}] = {key!r} has no `backbone.{key}` section"
                                    f"{_suggest(key, list(self.backbone))}")
        for position, key in enumerate(self.finetune_backbones):
            if key not in self.backbones:
                problems.append(f"finetune_backbones[{position}] = {key!r} is not in `backbones`")
            elif self.backbone[key].model.family == "daisy":
                problems.append(f"finetune_backbones[{position}] = {key!r} is weight-free (daisy): nothing to tune")
        if self.finetune_backbones and self.finetune.train_dataset not in self.datasets:
            problems.append(f"finetune.train_dataset = {self.finetune.train_dataset!r} is not in `datasets` "
                            f"({', '.join(self.datasets)})")
        for position, key in enumerate(self.head_backbones):
            if key not in self.backbones:
                problems.append(f"head_backbones[{position}] = {key!r} is not in `backbones`")
        if self.head_backbones and self.head.train_dataset not in self.datasets:
            problems.append(f"head.train_dataset = {self.head.train_dataset!r} is not in `datasets` "
                            f"({', '.join(self.datasets)})")
        if self.head_backbones and self.head.flip_augment and not self.extract.flips:
            problems.append("head.flip_augment reads the mirrored maps: set `extract.flips: true` "
                            "(or `head.flip_augment: false`)")
        if self.match.argmax.pose_align != "none" and not self.extract.flips:
            problems.append(f"match.argmax.pose_align = {self.match.argmax.pose_align!r} needs the mirrored "
                            "images' features: set `extract.flips: true`")
        for position, name in enumerate(self.sparse_datasets):
            if name not in HOMOGRAPHY_DATASETS:
                problems.append(f"sparse_datasets[{position}] = {name!r} has no known homographies; "
                                f"sparse matching needs one of {', '.join(HOMOGRAPHY_DATASETS)}")
            elif name not in self.datasets:
                problems.append(f"sparse_datasets[{position}] = {name!r} is not in `datasets`")
        for position, name in enumerate(self.video_datasets):
            if name not in VIDEO_DATASETS:
                problems.append(f"video_datasets[{position}] = {name!r}: unknown video dataset"
                                f"{_suggest(name, VIDEO_DATASETS)}; known: {', '.join(VIDEO_DATASETS)}")
            elif getattr(self.download, name) is None:
                problems.append(f"video_datasets[{position}] = {name!r} has no `download.{name}` section")
        for list_name in ("datasets", "backbones", "finetune_backbones", "finetune_depths", "lora_ranks",
                          "head_backbones", "sparse_datasets", "video_datasets", "methods"):
            values = getattr(self, list_name)
            if len(set(values)) != len(values):
                problems.append(f"{list_name}: lists a value twice ({values})")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- lookups the stages use ------------------------------------------------------------
    def dataset(self, name: str) -> str:
        """``name`` if it is a dataset of this study; else `ParamsError` listing them."""
        if name not in self.datasets:
            known = f"{DATASETS} are known" if name not in DATASETS else "it is known but not in `datasets`"
            raise ParamsError(f"unknown dataset {name!r}{_suggest(name, self.datasets)}: `datasets` lists "
                              f"{', '.join(self.datasets)} ({known})")
        return name

    def video_dataset(self, name: str) -> str:
        """``name`` if it is a video dataset of this study; else `ParamsError` listing them."""
        if name not in self.video_datasets:
            known = (f"{VIDEO_DATASETS} are known" if name not in VIDEO_DATASETS
                     else "it is known but not in `video_datasets`")
            raise ParamsError(f"unknown video dataset {name!r}{_suggest(name, self.video_datasets)}: `video_datasets` "
                              f"lists {', '.join(self.video_datasets) or 'none'} ({known})")
        return name

    def any_dataset(self, name: str) -> str:
        """``name`` if it is in `datasets` or `video_datasets` (what download, prepare and extract serve)."""
        return self.video_dataset(name) if name in self.video_datasets else self.dataset(name)

    def backbone_conf(self, key: str) -> Backbone:
        if key not in self.backbone:
            raise ParamsError(f"unknown backbone {key!r}{_suggest(key, list(self.backbone))}: params has "
                              f"`backbone.<key>` for {', '.join(self.backbone)}")
        return self.backbone[key]

    def tuned_variants(self) -> list[str]:
        """``<key>_ft<N>`` (blocks) and ``<key>_lora<R>`` (LoRA) of every `finetune_backbones` key,
        then ``<key>_head`` (post-processor) of every `head_backbones` key."""
        return [f"{k}_ft{d}" for k in self.finetune_backbones for d in self.finetune_depths] + \
            [f"{k}_lora{r}" for k in self.finetune_backbones for r in self.lora_ranks] + \
            [f"{k}_head" for k in self.head_backbones]

    def variant(self, name: str) -> tuple[str, int | str | None]:
        """Feature variant ``<key>``, ``<key>_ft<N>``, ``<key>_lora<R>`` or ``<key>_head`` -> (backbone
        key, tuned: the depth N, the tag ``lora<R>``, the tag ``head``, or None)."""
        if name.endswith("_head") and name.removesuffix("_head") in self.head_backbones:
            return name.removesuffix("_head"), "head"
        found = re.fullmatch(r"(?P<key>.+)_(?P<mode>ft|lora)(?P<n>\d+)", name)
        if found and found["key"] in self.finetune_backbones:
            n = int(found["n"])
            if found["mode"] == "ft" and n in self.finetune_depths:
                return found["key"], n
            if found["mode"] == "lora" and n in self.lora_ranks:
                return found["key"], f"lora{n}"
        if name in self.backbones:
            return name, None
        known = self.backbones + self.tuned_variants()
        raise ParamsError(f"unknown variant {name!r}{_suggest(name, known)}; variants of this "
                          f"study: {', '.join(known)}")


def load_params(path: Path = DEFAULT_PARAMS) -> Params:
    """Read and validate ``path``; raises `ParamsError` naming the file and every bad param."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return validate(raw, str(path))


def validate(raw: dict, where: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error, raw) for error in exc.errors()]
        raise ParamsError(f"{where}: invalid params:\n  " + "\n  ".join(lines)) from None


def _describe(error: dict, raw: dict) -> str:
    loc = [part for part in error["loc"] if not _is_union_tag(part)]
    path = _path(loc)
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        parent = _lookup_model(loc[:-1])
        known = list(parent.model_fields) if parent else []
        return f"`{path}`: unknown key{_suggest(str(loc[-1]), known)}; known keys here: {', '.join(known)}"
    if kind == "missing":
        return f"`{path}`: missing (required)"
    if kind == "value_error":  # our own checks: the message says everything
        message = message.removeprefix("Value error, ")
        return "\n  ".join(message.splitlines()) if not path else f"`{path}`: {message}"
    value = _value_at(raw, loc)
    got = "" if value is _MISSING else f" (got {value!r})"
    return f"`{path}`: {message}{got}" if path else f"{message}{got}"


_MISSING = object()


def _value_at(raw, loc):
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _is_union_tag(part) -> bool:
    """Pydantic's names of union members and validators in an error location."""
    return isinstance(part, str) and (part[:1].isupper() or part.startswith("function-"))


def _path(loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _lookup_model(loc) -> type[BaseModel] | None:
    """The section model at ``loc`` (dict keys such as backbone names are skipped)."""
    model: type[BaseModel] | None = Params
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a dict key (backbone name, dataset name) or a list index
        model = _model_of(field.annotation)
    return model


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
