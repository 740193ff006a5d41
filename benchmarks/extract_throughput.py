"""Extract throughput: the full stage (decode, preprocess, forward, zarr write) against the
bare model forward, for the same backbone, input size, batch and device.

    python benchmarks/extract_throughput.py                # GPU: DINOv2-B/14 at 840; CPU: ViT-S/14 at 224
    python benchmarks/extract_throughput.py --images 512 --batch 16 --workers 8

Targets (GPU): stage / forward >= 0.8, peak host RSS <= 4 GB whatever the dataset size,
store bytes <= 1.0 x raw fp16 bytes. The backbone is random-init (throughput does not
depend on the weights); images are JPEGs generated from scikit-image's sample pictures
at several sizes and aspect ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from skimage import data as samples
from skimage.transform import resize

from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import extract_features, resolve_device, store_attrs
from semcorr.pipeline.store import open_store

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
SIZES = ((480, 640), (640, 480), (500, 500), (375, 500), (600, 900))  # (h, w)


def make_images(folder: Path, n: int) -> pd.DataFrame:
    """``n`` JPEGs of various sizes -> an images table."""
    rows = []
    for k in range(n):
        picture = getattr(samples, SAMPLES[k % len(SAMPLES)])()
        h, w = SIZES[k % len(SIZES)]
        image = (resize(picture, (h, w), anti_aliasing=True) * 255).astype(np.uint8)
        path = folder / f"img{k:05d}.jpg"
        Image.fromarray(image[:, ::-1] if k % 2 else image).save(path, quality=90)
        rows.append({"image_id": path.stem, "path": str(path), "width": w, "height": h, "category": "bench"})
    return pd.DataFrame(rows)


def forward_rate(backbone, images: pd.DataFrame, batch: int, device: torch.device) -> float:
    """img/s of the model alone on preprocessed inputs already on the device."""
    x = torch.stack([backbone.preprocess(np.array(Image.open(p).convert("RGB")))[0] for p in images["path"][:batch]])
    x = x.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    steps = max(1, len(images) // batch)
    with torch.inference_mode(), autocast:
        backbone(x)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            backbone(x).to(torch.float16)
        _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--family", default="dinov2")
    parser.add_argument("--variant", default=None, help="default: vitb14 on GPU, vits14 on CPU")
    parser.add_argument("--input-size", type=int, default=None, help="default: 840 on GPU, 224 on CPU")
    parser.add_argument("--resize", default="pad")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    parser.add_argument("--images", type=int, default=None, help="default: 256 on GPU, 64 on CPU")
    parser.add_argument("--flips", action="store_true")
    parser.add_argument("--shard-images", type=int, default=16)
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    variant = args.variant or ("vitb14" if gpu else "vits14")
    input_size = args.input_size or (840 if gpu else 224)
    workers = args.workers if args.workers is not None else (8 if gpu else 2)
    n_images = args.images or (256 if gpu else 64)
    spec = {"family": args.family, "variant": variant, "random_init": True, "input_size": input_size,
            "resize": args.resize}
    backbone = build_backbone(spec).to(device).eval()

    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), n_images)
        fwd = forward_rate(backbone, images, args.batch, device)
        backbone.cpu()
        attrs = store_attrs(backbone, "bench", "bench", "bench", None, args.flips)
        conf = {"batch_size": args.batch, "num_workers": workers, "device": str(device), "flips": args.flips,
                "shard_images": args.shard_images}
        result = extract_features(backbone, images, Path(tmp) / "features" / "bench" / "bench.zarr", attrs, conf,
                                  progress=False, work_root=Path(tmp) / "work")
        stage = result.extracted / result.seconds
        store = open_store(result.path)
        copies = 2 if args.flips else 1
        raw = copies * sum(2 * backbone.feat_dim * t.grid_h * t.grid_w for t in map(store.transform, store.image_ids))
        stored = sum(f.stat().st_size for f in result.path.rglob("*") if f.is_file())
        start = time.perf_counter()
        for _ in store.iter_features():
            pass
        read = raw / copies / (time.perf_counter() - start)

    rss_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    rows = [
        ("device", f"{device} ({torch.cuda.get_device_name() if gpu else f'{torch.get_num_threads()} threads'})"),
        ("backbone", f"{args.family}/{variant} @ {input_size} ({args.resize}), random init, feat_dim {backbone.feat_dim}"),
        ("images / batch / workers / flips", f"{n_images} / {args.batch} / {workers} / {args.flips}"),
        ("model forward", f"{fwd:8.1f} img/s"),
        ("extract stage", f"{stage:8.1f} img/s  (decode, preprocess, forward, zarr write; {result.seconds:.1f} s)"),
        ("stage / forward", f"{stage / fwd:8.2f}   (target >= 0.8 on GPU)"),
        ("peak RSS main / worker", f"{rss_main:8.2f} GiB / {rss_workers:.2f} GiB   (target <= 4 GB)"),
        ("store / raw fp16", f"{stored / raw:8.3f}   ({stored / 2**20:.1f} MiB / {raw / 2**20:.1f} MiB, codec "
                             f"{store.codec} + crc32c; target <= 1.0)"),
        ("store read (iter_features)", f"{read / 2**20:8.1f} MiB/s of fp16 features (checksums verified)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
