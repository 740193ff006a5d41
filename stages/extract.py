"""Stage `extract`: ``data/prepared/<dataset>/images.parquet`` + ``data/weights/<variant>/``
-> ``data/features/<variant>/<dataset>.zarr`` (variant = backbone key, or ``<key>_ft<N>``).

The store is built in ``data/.semcorr/partial`` (resumed there after a kill) and moved into
place only when complete and verified; see `pipeline.extract.extract_features`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, weights_info
from semcorr.stages.params import DEFAULT_PARAMS, load_params


def backbone_spec(model: dict, weights_dir: Path):
    """``backbone.<key>.model`` params + ``<weights_dir>/weights.json`` -> (BackboneSpec, weights sha256)."""
    from semcorr.pipeline.backbones import BackboneSpec

    info = weights_info(Path(weights_dir).parent.parent, Path(weights_dir).name)
    weights = str(Path(weights_dir) / info["file"]) if info.get("file") else None
    spec = BackboneSpec(
        family=model["family"], variant=model["variant"], weights=weights, sha256=info.get("sha256"),
        random_init=bool(info.get("random_init", False)), layer=model["layer"], input_size=int(model["input_size"]),
        resize=model["resize"], arch=dict(model["arch"] or {}),
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


def main(dataset: str, backbone: str, model: dict, extract_conf: dict, tuned: int | None = None,
         part: tuple[int, int] = (0, 1), data_root: Path = DATA, progress: bool = True) -> Path:
    """Extract the features of every image of ``dataset`` with backbone ``backbone``
    (``model`` = params ``backbone.<key>.model``, ``extract_conf`` = params ``extract``)."""
    from semcorr.pipeline.backbones import build_backbone
    from semcorr.pipeline.extract import extract_features, store_attrs
    from semcorr.pipeline.io import work_root
    from semcorr.pipeline.store import store_path
    from semcorr.pipeline.tables import read_images

    data_root = Path(data_root)
    variant = backbone if tuned is None else f"{backbone}_ft{tuned}"
    spec, sha256 = backbone_spec(model, data_root / "weights" / variant)
    images = read_images(data_root / "prepared" / dataset)
    net = build_backbone(spec)
    attrs = store_attrs(net, backbone, variant, dataset, sha256, extract_conf["flips"], tuned)
    out = store_path(data_root / "features", variant, dataset)
    result = extract_features(net, images, out, attrs, extract_conf, part=part, progress=progress,
                              work_root=work_root(data_root))
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
    with clean_errors():
        p = load_params(params)
        p.dataset(dataset)
        model = p.backbone_conf(backbone).model.model_dump()
        if tuned is not None:
            p.variant(f"{backbone}_ft{tuned}")
        main(dataset, backbone, model, p.extract.model_dump(), tuned, parse_part(shard))
