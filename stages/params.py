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
DATASETS = ("spair", "pfpascal", "pfwillow", "synthetic")
FAMILIES = ("dinov2", "dinov3", "sam", "clip", "daisy")
METHODS = ("argmax", "softargmax")
SPLITS = ("trn", "val", "test")
SOURCE_DATASETS = ("spair", "pfpascal", "pfwillow")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names every bad param."""


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


class Download(Section):
    """One section per dataset that the study may download; absent = not used."""

    spair: DatasetSource | None = None
    pfpascal: DatasetSource | None = None
    pfwillow: DatasetSource | None = None
    synthetic: SyntheticData | None = None


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

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd (the Gaussian target is centred on a cell)")
        return value


class Argmax(Section):
    """Read by the match stage: the similarity, its argmax, and the windows kept for soft-argmax."""

    upsample: PositiveInt
    mutual: bool
    max_window: NonNegativeInt


class SoftArgmax(Section):
    """Read by the soft-argmax stage, which refines the argmax from the kept windows."""

    window: NonNegativeInt
    temperature: PositiveFloat
    zero_outside: bool


class Match(Section):
    argmax: Argmax
    softargmax: SoftArgmax

    @model_validator(mode="after")
    def _window_kept(self):
        if self.softargmax.window > self.argmax.max_window:
            raise ValueError(f"softargmax.window {self.softargmax.window} exceeds argmax.max_window "
                             f"{self.argmax.max_window}, the radius of the similarity windows the match stage keeps")
        return self


class Evaluate(Section):
    split: Literal[SPLITS]  # type: ignore[valid-type]
    alphas: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]


class Report(Section):
    pictures_per_category: NonNegativeInt
    max_pair_pictures: NonNegativeInt


class Params(Section):
    datasets: Annotated[list[str], Field(min_length=1)]
    backbones: Annotated[list[str], Field(min_length=1)]
    finetune_backbones: list[str]
    finetune_depths: list[PositiveInt]
    methods: Annotated[list[Literal[METHODS]], Field(min_length=1)]  # type: ignore[valid-type]
    download: Download
    backbone: dict[str, Backbone]
    extract: Extract
    finetune: Finetune
    match: Match
    evaluate: Evaluate
    report: Report

    @model_validator(mode="after")
    def _lists_refer_to_sections(self):
        problems = []
        for position, name in enumerate(self.datasets):
            if name not in DATASETS:
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
        for list_name in ("datasets", "backbones", "finetune_backbones", "finetune_depths", "methods"):
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

    def backbone_conf(self, key: str) -> Backbone:
        if key not in self.backbone:
            raise ParamsError(f"unknown backbone {key!r}{_suggest(key, list(self.backbone))}: params has "
                              f"`backbone.<key>` for {', '.join(self.backbone)}")
        return self.backbone[key]

    def variant(self, name: str) -> tuple[str, int | None]:
        """Feature variant ``<key>`` or ``<key>_ft<N>`` -> (backbone key, tuned depth or None)."""
        found = re.fullmatch(r"(?P<key>.+)_ft(?P<depth>\d+)", name)
        if found and found["key"] in self.finetune_backbones and int(found["depth"]) in self.finetune_depths:
            return found["key"], int(found["depth"])
        if name in self.backbones:
            return name, None
        tuned = [f"{k}_ft{d}" for k in self.finetune_backbones for d in self.finetune_depths]
        raise ParamsError(f"unknown variant {name!r}{_suggest(name, self.backbones + tuned)}; variants of this "
                          f"study: {', '.join(self.backbones + tuned)}")


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
