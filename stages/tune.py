"""Stage `tune`: matching settings chosen on a val split -> ``data/tuning/<V>/<D>/``
(``chosen.json``, ``grid.csv``), written as one unit.

The val split is the evaluated dataset's own, or, where it has none (PF-WILLOW), that of
``finetune.train_dataset``. Reads only the feature store and the pair tables; the test
split is never read. `semcorr match --method valtuned` then matches the test split with
the chosen settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semcorr.stages.common import DATA, clean_errors, console, expected_store_attrs, weights_info
from semcorr.stages.params import DEFAULT_PARAMS, load_params


def tuning_dir(data_root: Path, variant: str, dataset: str) -> Path:
    return Path(data_root) / "tuning" / variant / dataset


def val_dataset(data_root: Path, dataset: str, train_dataset: str) -> str:
    """``dataset`` if it has val pairs, else ``train_dataset`` (which must have them)."""
    from semcorr.pipeline.tables import read_pairs

    for candidate in (dataset, train_dataset):
        if (read_pairs(Path(data_root) / "prepared" / candidate)["split"] == "val").any():
            return candidate
    raise ValueError(f"neither {dataset} nor finetune.train_dataset = {train_dataset} has val pairs to tune on")


def main(dataset: str, variant: str, grid_conf: dict, train_dataset: str, expect=None, data_root: Path = DATA) -> Path:
    """Grid-search the matching settings of ``variant`` for ``dataset`` on val pairs;
    ``expect(val_dataset) -> store attrs`` checks the store read."""
    from semcorr.pipeline.io import staged, work_root, write_json
    from semcorr.pipeline.store import open_store
    from semcorr.pipeline.tables import read_pairs
    from semcorr.pipeline.tuning import grid_search

    data_root = Path(data_root)
    source = val_dataset(data_root, dataset, train_dataset)
    pairs = read_pairs(data_root / "prepared" / source, "val")
    store = open_store(data_root / "features" / variant / f"{source}.zarr", expect=expect(source) if expect else None)
    console.print(f"tune {variant}/{dataset}: {len(pairs)} val pairs of {source}")
    grid, chosen = grid_search(store, pairs, grid_conf, log=lambda line: console.print(line, highlight=False))
    out = tuning_dir(data_root, variant, dataset)
    with staged(out, work_root(data_root)) as folder:
        folder.mkdir(parents=True)
        grid.to_csv(folder / "grid.csv", index=False)
        write_json(folder / "chosen.json", {"setting": chosen, "tuned_on": {"dataset": source, "split": "val",
                                                                            "pairs": len(pairs)},
                                            "grid": grid_conf})
    console.print(f"tune {variant}/{dataset}: chose {chosen} on {source} val; wrote {out}")
    return out


def command(
    dataset: Annotated[str, typer.Option(help="dataset whose test split the settings are for")],
    variant: Annotated[str, typer.Option(help="feature variant: backbone key or <backbone>_ft<N>")],
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Choose matching settings (upsampling, window, temperature) on a val split."""
    with clean_errors():
        p = load_params(params)
        p.dataset(dataset)
        key, tuned = p.variant(variant)
        model = p.backbone_conf(key).model.model_dump()
        info = weights_info(DATA, variant)
        expect = lambda source: expected_store_attrs(key, variant, tuned, model, info, source, p.extract.flips)  # noqa: E731
        main(dataset, variant, p.match.valtuned.model_dump(), p.finetune.train_dataset, expect)
