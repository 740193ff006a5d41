"""Stage `extract`: ``data/prepared/<dataset>/images.parquet`` + ``data/weights/<variant>/``
-> ``data/features/<variant>/<dataset>.zarr`` (variant = backbone key, or ``<key>_ft<N>``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from semcorr.pipeline.backbones import BackboneSpec, build_backbone
from semcorr.pipeline.extract import ExtractError, extract_features, store_attrs
from semcorr.pipeline.store import StoreError, store_path
from semcorr.pipeline.tables import TableError, read_images
from semcorr.pipeline.weights import WeightsError
from semcorr.stages.params import DEFAULT_PARAMS, load_params, section

console = Console(stderr=True)


def backbone_spec(key: str, conf: dict, weights_dir: Path) -> tuple[BackboneSpec, str | None]:
    """``backbone.<key>`` params + ``<weights_dir>/weights.json`` -> (spec, weights sha256)."""
    info_path = Path(weights_dir) / "weights.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{info_path}: not found; run `semcorr download {key}` (or `semcorr finetune` for tuned weights)"
        )
    info = json.loads(info_path.read_text())
    weights = str(Path(weights_dir) / info["file"]) if info.get("file") else None
    spec = BackboneSpec(
        family=conf["family"], variant=conf["variant"], weights=weights, sha256=info.get("sha256"),
        random_init=bool(conf.get("random_init", False) or info.get("random_init", False)),
        layer=conf.get("layer"), input_size=int(conf["input_size"]), resize=conf["resize"],
        arch=dict(conf.get("arch") or {}),
    )
    return spec, info.get("sha256") if weights else None


def parse_part(text: str) -> tuple[int, int]:
    """``'i/n'`` -> (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: expected 0 <= i < n")
    return i, n


def main(
    dataset: str,
    backbone: str,
    backbone_conf: dict,
    extract_conf: dict,
    tuned: int | None = None,
    part: tuple[int, int] = (0, 1),
    data_root: Path = Path("data"),
    progress: bool = True,
) -> Path:
    """Extract the features of every image of ``dataset`` with backbone ``backbone``
    (``backbone_conf`` = ``backbone.<key>`` params, ``extract_conf`` = ``extract`` params)."""
    data_root = Path(data_root)
    variant = backbone if tuned is None else f"{backbone}_ft{tuned}"
    spec, sha256 = backbone_spec(backbone, backbone_conf, data_root / "weights" / variant)
    images = read_images(data_root / "prepared" / dataset)
    model = build_backbone(spec)
    attrs = store_attrs(model, backbone, variant, dataset, sha256, extract_conf.get("flips", False), tuned)
    out = store_path(data_root / "features", variant, dataset)
    result = extract_features(model, images, out, attrs, extract_conf, part=part, progress=progress)
    status = "complete" if result.complete else "waiting for other parts"
    console.print(f"{out}: {result.extracted} images extracted, {result.skipped} already there, "
                  f"{result.images} in the store ({status}) in {result.seconds:.1f} s")
    return out


def command(
    dataset: Annotated[str, typer.Option(help="dataset key (data/prepared/<dataset>)")],
    backbone: Annotated[str, typer.Option(help="backbone key (backbone.<key> in params)")],
    tuned: Annotated[int | None, typer.Option(help="use the weights tuned on the last N blocks (<key>_ft<N>)")] = None,
    shard: Annotated[str, typer.Option(help="i/n: fill only the store shards s with s % n == i")] = "0/1",
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Dense features of every image of a dataset into a zarr feature store."""
    config = load_params(params)
    try:
        main(dataset, backbone, section(config, "backbone", backbone), section(config, "extract"),
             tuned, parse_part(shard))
    except (ExtractError, StoreError, TableError, WeightsError, FileNotFoundError, KeyError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
