"""One fine-tuning step end to end (images -> frozen prefix -> tail) against one step from
the cached prefix (`pipeline.prefix_cache`), plus the cache's build time and size.

Random-init weights (the architecture is what costs); random images of mixed aspect
ratios written as PNGs, so the end-to-end step decodes and preprocesses as training does.
A step = tokens for 2 x batch images, tail forward, Gaussian cross-entropy, backward,
AdamW step (`pipeline.finetune.train_step`).

    .venv/bin/python benchmarks/finetune_step.py                      # CPU: ViT-B/14 at 224, batch 4, ft2
    .venv/bin/python benchmarks/finetune_step.py --device cuda --input-size 840 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semcorr.pipeline.backbones import build_backbone  # noqa: E402
from semcorr.pipeline.finetune import Pair, PrefixSource, train_step, trainable_parameters  # noqa: E402
from semcorr.pipeline.prefix_cache import build_prefix_cache  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="dinov2", help="backbone family (a ViT family)")
    parser.add_argument("--model", default="vitb14", help="family variant, e.g. vitb14, vits14, vit_b, ViT-B-16")
    parser.add_argument("--input-size", type=int, default=224, help="network input side S")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (2x images)")
    parser.add_argument("--depth", type=int, default=2, help="trained blocks N")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def make_images(folder: Path, count: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for k in range(count):
        h, w = (int(v) for v in rng.integers(180, 400, size=2))
        path = folder / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": str(k), "path": str(path), "width": w, "height": h, "category": "x"})
    return pd.DataFrame(rows)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = {"family": args.family, "variant": args.model, "random_init": True, "input_size": args.input_size, "resize": "pad"}
    backbone = build_backbone(spec).to(device)
    rng = np.random.default_rng(0)
    n_images = 2 * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), n_images, rng)
        pairs = [
            Pair(str(2 * b), str(2 * b + 1), rng.uniform(0, 170, (10, 2)), rng.uniform(0, 170, (10, 2)), np.ones(10, bool))
            for b in range(args.batch)
        ]
        transforms = {r.image_id: backbone.transform((r.height, r.width)) for r in images.itertuples()}
        widths = dict(zip(images.image_id, images.width))
        live = PrefixSource(backbone, args.depth, images, device)

        entries = [(i, f) for i in images.image_id for f in (False, True)]
        start = time.perf_counter()
        cache = build_prefix_cache(Path(tmp) / "prefix.zarr", backbone, args.depth, entries, live.image, {},
                                   {"dtype": args.cache_dtype, "batch_size": 8}, device)
        build_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (Path(tmp) / "prefix.zarr").rglob("*") if f.is_file())
        cached = PrefixSource(backbone, args.depth, images, device, cache)

        names = trainable_parameters(backbone, args.depth, cached.tokens(entries[:1]))
        params = dict(backbone.named_parameters())
        for n in names:
            params[n].requires_grad_(True)
        optimizer = torch.optim.AdamW([params[n] for n in names], lr=1e-5, weight_decay=0.05)
        conf = {"temperature": 0.03, "kernel_size": 7, "sigma": 1.5}
        flips = [b % 2 == 1 for b in range(args.batch)]

        def step(source):
            return lambda: train_step(backbone, source, pairs, flips, transforms, widths, optimizer, conf)

        e2e = timed(step(live), args.repeats, device)
        from_cache = timed(step(cached), args.repeats, device)

    n_params = sum(params[n].numel() for n in names)
    token_shape = tuple(cache.tokens_array.shape[1:])
    print(f"finetune step: {args.family}/{args.model} ft{args.depth}, input {args.input_size}, batch {args.batch} pairs, "
          f"device {device}, threads {torch.get_num_threads()}, random init, {n_params / 1e6:.1f} M trained parameters")
    print()
    print("| mode | s / step | ratio |")
    print("|---|---|---|")
    print(f"| end to end (images -> prefix -> tail) | {e2e:.3f} | 1.00 |")
    print(f"| cached prefix (zarr tokens -> tail) | {from_cache:.3f} | {from_cache / e2e:.2f} |")
    print()
    print(f"prefix cache: {len(entries)} entries ({n_images} images + flips), tokens {token_shape} {args.cache_dtype}, "
          f"{size / 2**20:.1f} MiB ({size / len(entries) / 2**20:.2f} MiB per entry), built in {build_s:.2f} s "
          f"({build_s / len(entries) * 1e3:.0f} ms per entry)")


if __name__ == "__main__":
    main()
