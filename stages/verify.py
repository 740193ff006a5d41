"""`semcorr verify STORE`: check a feature store end to end (`pipeline.store.verify_store`).

Prints every problem (each naming the file and what is wrong) and how to repair it, the
``semcorr extract`` call that re-extracts just the damaged images' shards, and exits 1;
prints one ``OK`` line and exits 0 when the store is complete and intact. ``STORE`` may be a
URL (``s3://...``: credentials from the AWS environment); it is read without listing the bucket.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

console = Console(soft_wrap=True, highlight=False)


def command(
    store: Annotated[str, typer.Argument(help="feature store folder, e.g. data/features/<variant>/<dataset>.zarr, "
                                              "or URL, e.g. s3://bucket/features/<variant>/<dataset>.zarr")],
) -> None:
    """Check a feature store: every shard file, index and chunk checksum, done flags, completeness."""
    from semcorr.pipeline.store import verify_store

    report = verify_store(store)
    if report.ok:
        console.print(f"{store}: OK ({report.images} images in {report.shards} shards, every checksum verified)")
        return
    console.print(f"{store}: {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}")
    for problem in report.problems:
        console.print(f"  - {problem}", markup=False)
    if report.bad_images:
        shown = ", ".join(report.bad_images[:10]) + (" ..." if len(report.bad_images) > 10 else "")
        console.print(f"damaged images: {shown}", markup=False)
    console.print(f"repair: {report.repair}", markup=False)
    raise typer.Exit(1)
