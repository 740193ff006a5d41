"""Stage `match`: ``data/features/<V>/<D>.zarr`` + ``data/prepared/<D>/pairs.parquet`` ->
``data/predictions/<V>/<D>/<method>.{parquet,h5,json}``.

Reads only the feature cache and the pair table: never an image or a backbone.
The ``.json`` sidecar records the setting (match params, store attrs, training dataset
of tuned weights) for the evaluate stage's reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from semcorr.pipeline.export import write_matches_h5
from semcorr.pipeline.io import atomic_path, write_json
from semcorr.pipeline.matching import METHODS, check_conf, match_pairs
from semcorr.pipeline.store import StoreError, open_store
from semcorr.pipeline.tables import TableError, read_pairs
from semcorr.stages.params import DEFAULT_PARAMS, load_params, section

console = Console(stderr=True)
# Store attrs copied into the setting every report states.
SETTING_ATTRS = ("backbone", "family", "random_init", "weights_sha256", "layer", "input_size", "resize", "patch_size")


def predictions_dir(data_root: Path, variant: str, dataset: str) -> Path:
    return Path(data_root) / "predictions" / variant / dataset


def train_dataset(data_root: Path, variant: str, store_attrs: dict) -> str | None:
    """Dataset the variant's weights were fine-tuned on (store attrs, else its weights.json); None if not tuned."""
    if store_attrs.get("train_dataset"):
        return str(store_attrs["train_dataset"])
    weights_json = Path(data_root) / "weights" / variant / "weights.json"
    if weights_json.is_file():
        return json.loads(weights_json.read_text()).get("train_dataset")
    return None


def main(
    dataset: str, variant: str, method: str, conf: dict, split: str = "test", data_root: Path = Path("data")
) -> Path:
    """Match every ``split`` pair of ``dataset`` with the ``variant`` features; returns the parquet path."""
    conf = check_conf({**conf, "method": method})
    data_root = Path(data_root)
    store = open_store(data_root / "features" / variant / f"{dataset}.zarr")
    pairs = read_pairs(data_root / "prepared" / dataset, split)
    if pairs.empty:
        raise TableError(f"{data_root / 'prepared' / dataset / 'pairs.parquet'}: no pairs in split {split!r}")
    predictions = match_pairs(store, pairs, conf)
    out_dir = predictions_dir(data_root, variant, dataset)
    out = out_dir / f"{method}.parquet"
    with atomic_path(out) as tmp:
        predictions.to_parquet(tmp, index=False)
    write_matches_h5(out_dir / f"{method}.h5", pairs, predictions)
    setting = {
        "variant": variant, "dataset": dataset, "method": method, "split": split,
        "match": {k: v for k, v in conf.items() if k != "method"},
        **{k: store.attrs.get(k) for k in SETTING_ATTRS},
        "train_dataset": train_dataset(data_root, variant, store.attrs),
    }
    write_json(out_dir / f"{method}.json", setting)
    return out


def command(
    dataset: Annotated[str, typer.Option(help="dataset key, e.g. spair")],
    variant: Annotated[str, typer.Option(help="feature variant: backbone key or <backbone>_ft<N>")],
    method: Annotated[str, typer.Option(help=f"one of {', '.join(METHODS)}")] = "argmax",
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Predict target keypoints of every pair from cached features."""
    try:
        p = load_params(params)
        out = main(dataset, variant, method, dict(section(p, "match")), str(section(p, "evaluate", "split")))
    except (StoreError, TableError, KeyError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")
