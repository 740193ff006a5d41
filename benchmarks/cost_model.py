"""The cost model of the study's extraction, written down: measured costs on this machine,
and the projected wall time, storage and object count on a target cluster.

Measured here (each line prints its setting):

1. ``semcorr extract`` under torchrun with 1 and with 2 processes on CPU (gloo): the ratio of
   their throughputs (a random-init ViT-S/14 at 224 px on PF-WILLOW's 100 images, or the
   synthetic set without it);
2. store write and read throughput (create, write every shard, finalise; `iter_maps` over
   every image, every checksum checked) on the local disk and on S3 through moto's server on
   127.0.0.1 (a Python server on the same 2 cores: a floor for the client, not a figure of S3);
3. the resume overhead: a run killed (SIGKILL) when half its shards were written, then
   resumed, against an uninterrupted run (the resumed run verifies every written shard);
4. the CPU cost of decoding and resizing one image to 840 px on one core (PF-WILLOW's PNGs,
   about 300 x 225 px: what the DataLoader workers that feed a GPU must sustain).

Projected from ``--gpus``, ``--anchor`` rates and ``--bandwidth`` (extraction only: the
forward of every image once per store and the store writes; fine-tuning and matching are
not in it):

- every family and size at its standard input (DINOv2 840 px, DINOv3 800 px, SAM 1024 px,
  CLIP 448 px) on SPair-71k, PF-PASCAL, PF-WILLOW and AP-10K, each a baseline and two tuned
  depths (three stores per backbone and dataset);
- a 1M-image corpus at DINOv2-B/14, 840 px.

A model's rate is its family's anchor (DINOv2-B/14 at 840 px: 285 img/s on one H100; SAM-B at
1024 px: 37.5 img/s) scaled by forward FLOPs (``12·L·T·D²·2 + attention``); DINOv3 and CLIP
use the DINOv2 anchor. A GPU runs at that rate or at the rate its ``--cpus-per-gpu`` workers
decode images (measured here), whichever is lower; the wall time is the larger of compute and
storage time (the writer thread overlaps them).

``python benchmarks/cost_model.py [--quick] [--gpus 16] [--bandwidth 2.0] [--cpus-per-gpu 8]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
WILLOW = ROOT.parent / "shared" / "data" / "pf-willow"
MB = 1e6

# (family, patch, width D, depth L, input px, feature channels) at each family's standard input
MODELS = {
    "dinov2_vits14": ("dinov2", 14, 384, 12, 840, 384),
    "dinov2_vitb14": ("dinov2", 14, 768, 12, 840, 768),
    "dinov2_vitl14": ("dinov2", 14, 1024, 24, 840, 1024),
    "dinov2_vitg14": ("dinov2", 14, 1536, 40, 840, 1536),
    "dinov3_vits16": ("dinov3", 16, 384, 12, 800, 384),
    "dinov3_vitb16": ("dinov3", 16, 768, 12, 800, 768),
    "dinov3_vitl16": ("dinov3", 16, 1024, 24, 800, 1024),
    "sam_vit_b": ("sam", 16, 768, 12, 1024, 256),
    "sam_vit_l": ("sam", 16, 1024, 24, 1024, 256),
    "sam_vit_h": ("sam", 16, 1280, 32, 1024, 256),
    "clip_vitb32": ("clip", 32, 768, 12, 448, 768),
    "clip_vitb16": ("clip", 16, 768, 12, 448, 768),
    "clip_vitl14": ("clip", 14, 1024, 24, 448, 1024),
}
SAM_WINDOW, SAM_GLOBAL_BLOCKS = 14, 4  # SAM: 14x14 windowed attention but in 4 global blocks
DATASETS = {"spair": 1800, "pfpascal": 1351, "pfwillow": 100, "ap10k": 10015}  # images (PF-PASCAL: ~, see --help)
STORES_PER_PAIR = 3  # baseline + 2 tuned depths, per backbone and dataset
SHARD_IMAGES = 16
METADATA_OBJECTS = 7  # zarr.json of the group and of 4 arrays, the transforms chunk, a little slack


def flops(name: str) -> float:
    """Forward FLOPs of one image (multiply-adds x 2): QKV, projection and MLP ``24·T·D²`` per
    block, attention ``4·T·S·D`` (S tokens attended: all, or a SAM window)."""
    family, patch, d, depth, size, _ = MODELS[name]
    t = math.ceil(size / patch) ** 2
    dense = depth * 24 * t * d * d
    if family == "sam":
        attention = (depth - SAM_GLOBAL_BLOCKS) * 4 * t * SAM_WINDOW**2 * d + SAM_GLOBAL_BLOCKS * 4 * t * t * d
    else:
        attention = depth * 4 * t * t * d
    return float(dense + attention)


def rate(name: str, anchors: dict[str, float]) -> float:
    """img/s of one GPU, FLOP-scaled from its family's anchor."""
    anchor = "sam_vit_b" if MODELS[name][0] == "sam" else "dinov2_vitb14"
    return anchors[anchor] * flops(anchor) / flops(name)


def store_bytes(name: str, images: int) -> float:
    """fp16 maps of ``images`` images at the full grid (padding of non-square images is
    compressed away by lz4, so real stores are up to ~25% smaller)."""
    _, patch, _, _, size, channels = MODELS[name]
    return images * channels * math.ceil(size / patch) ** 2 * 2


def objects(images: int) -> int:
    """Objects (files) of one store: a shard and a done-flags chunk per 16 images, plus metadata."""
    return 2 * math.ceil(images / SHARD_IMAGES) + METADATA_OBJECTS


def projection(title: str, work: list[tuple[str, int]], gpus: int, anchors: dict[str, float], bandwidth: float,
               decode_s: float, cpus_per_gpu: int) -> None:
    """``work``: (model, images) per store. A GPU runs at its FLOP-scaled rate, or at the rate its
    ``cpus_per_gpu`` DataLoader workers decode and resize, whichever is lower."""
    feed = cpus_per_gpu / decode_s
    gpu = sum(images / (gpus * rate(name, anchors)) for name, images in work)
    compute = sum(images / (gpus * min(rate(name, anchors), feed)) for name, images in work)
    fed = sum(images for name, images in work if rate(name, anchors) > feed)
    size = sum(store_bytes(name, images) for name, images in work)
    storage = size / bandwidth
    count = sum(objects(images) for _, images in work)
    print(f"\n{title}: {len(work)} stores, {sum(i for _, i in work):,} image forwards on {gpus} GPUs")
    print(f"  GPU time {gpu / 3600:.2f} h at the FLOP-scaled rates; with {cpus_per_gpu} CPU cores per GPU decoding at "
          f"{decode_s * 1000:.1f} ms per image (measured here: {feed:.0f} img/s per GPU) {compute / 3600:.2f} h "
          f"({100 * fed / sum(i for _, i in work):.0f}% of the images are decode-bound)")
    print(f"  storage writes {storage / 3600:.2f} h at {bandwidth / 1e9:.1f} GB/s -> "
          f"wall ~{max(compute, storage) / 3600:.2f} h "
          f"({'storage' if storage > compute else 'compute'}-bound; the writer thread overlaps the two)")
    print(f"  storage {size / 1e12:.2f} TB (fp16, full grid), {count:,} objects "
          f"({count / len(work):,.0f} per store on average)")
    print(f"  resume after a kill re-reads (verifies) what was written: at most {size / bandwidth / 3600:.2f} h at "
          f"the same bandwidth if reads run at write speed")


# -- measurements ---------------------------------------------------------------------------------


def workspace(folder: Path, n_images: int) -> tuple[Path, str]:
    """A folder to run ``python -m stages extract`` in: params (the demo's, plus a random-init
    ViT-S/14 at 224 px and PF-WILLOW), the prepared dataset cut to ``n_images``, the weights record."""
    from semcorr.pipeline.datasets import prepare
    from semcorr.pipeline.download import download_weights
    from semcorr.pipeline.tables import read_images

    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    dataset = "pfwillow" if (WILLOW / "test_pairs.csv").is_file() else "synthetic"
    if dataset == "pfwillow":
        params["download"]["pfwillow"] = {"source": str(WILLOW)}
        raw = WILLOW
    else:
        from semcorr.pipeline.datasets import synthetic

        raw = folder / "data" / "raw" / "synthetic"
        synthetic.generate(raw, {**params["download"]["synthetic"], "categories": 4, "images_per_category": 25})
    params["datasets"] = [d for d in params["datasets"] if d != dataset] + [dataset]
    params["backbones"] = params["backbones"] + ["vits"]
    params["extract"] = {**params["extract"], "batch_size": 8, "num_workers": 0, "device": "cpu", "flips": False,
                         "shard_images": SHARD_IMAGES}
    params["backbone"]["vits"] = {
        "weights": {"checkpoint": None, "source": None, "sha256": None, "random_init": True},
        "model": {"family": "dinov2", "variant": "vits14", "layer": None, "input_size": 224, "resize": "pad",
                  "arch": {"img_size": 224}}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = prepare(dataset, raw, folder / "data" / "prepared" / dataset)
    images = read_images(prepared)
    images.head(n_images).to_parquet(prepared / "images.parquet", index=False)
    download_weights("vits", folder / "data" / "weights" / "vits", None, None, True)
    return folder, dataset


def run_stage(ws: Path, dataset: str, nproc: int) -> tuple[float, list[float]]:
    """Wall seconds of ``torchrun --nproc_per_node=nproc -m stages extract`` and each rank's extract seconds."""
    shutil.rmtree(ws / "data" / "features", ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages", "extract", "--dataset", dataset, "--backbone", "vits"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"torchrun failed:\n{done.stderr[-3000:]}")
    seconds = [float(m) for m in re.findall(r"\) in ([\d.]+) s", " ".join(done.stderr.split()))]
    return wall, seconds


def measure_torchrun(folder: Path, n_images: int, repeats: int) -> None:
    """Alternating 1- and 2-process runs (the machine may be shared: the median of each)."""
    ws, dataset = workspace(folder / "ws", n_images)
    print(f"\n[1] semcorr extract under torchrun on CPU (gloo): {n_images} {dataset} images, random-init ViT-S/14 "
          f"at 224 px, batch 8, 2 cores, {repeats} runs each, alternating; load {os.getloadavg()[0]:.1f}")
    rates: dict[int, list[float]] = {1: [], 2: []}
    walls: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for nproc in (1, 2):
            wall, seconds = run_stage(ws, dataset, nproc)
            rates[nproc].append(n_images / max(seconds))
            walls[nproc].append(wall)
    for nproc in (1, 2):
        threads = "2 threads" if nproc == 1 else "1 thread each: torchrun's OMP_NUM_THREADS=1"
        print(f"  {nproc} process{'es' if nproc > 1 else ''} ({threads}): {np.median(rates[nproc]):.2f} img/s in the "
              f"stage (runs: {', '.join(f'{r:.2f}' for r in rates[nproc])}), {np.median(walls[nproc]):.1f} s wall "
              f"with start-up")
    print(f"  2 processes / 1 process throughput: {np.median(rates[2]) / np.median(rates[1]):.2f}x "
          f"(load {os.getloadavg()[0]:.1f} at the end)")


def moto_server(folder: Path) -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, env


def store_io(path, n_images: int, channels: int, grid: int) -> dict[str, float]:
    """MB/s of writing a store shard by shard (create, write, finalise), of reading it back
    (`iter_maps`, checksums checked) and of verifying it (every chunk's crc32c, as a resume does)."""
    from semcorr.pipeline.coords import CellTransform
    from semcorr.pipeline.store import create_store, open_store

    patch = 14
    t = CellTransform.from_resize((grid * patch, grid * patch), (grid * patch, grid * patch), (0.0, 0.0), patch,
                                  (grid, grid))
    attrs = dict(backbone="bench", family="dinov2", variant="bench", weights_sha256=None, random_init=True,
                 layer=None, patch_size=patch, input_size=grid * patch, resize="pad", feat_dim=channels,
                 dataset="bench", flips=False)
    ids = [f"i{k}" for k in range(n_images)]
    maps = np.random.default_rng(0).standard_normal((SHARD_IMAGES, channels, grid, grid)).astype(np.float16)
    size = n_images * maps[0].nbytes
    start = time.perf_counter()
    store = create_store(path, attrs, ids, [t] * n_images, shard_images=SHARD_IMAGES)
    for shard in range(store.n_shards):
        store.write_shard(shard, list(maps[: len(store.shard_range(shard))]))
    assert store.finalize()
    write = time.perf_counter() - start
    start = time.perf_counter()
    reader = open_store(path)
    count = sum(1 for _ in reader.iter_maps())
    read = time.perf_counter() - start
    assert count == n_images
    start = time.perf_counter()
    assert not any(reader.check_shard(s) for s in range(reader.n_shards))
    verify = time.perf_counter() - start
    return {"write": size / write / MB, "read": size / read / MB, "verify": size / verify / MB, "mb": size / MB}


def measure_store_io(folder: Path, n_images: int) -> None:
    channels, grid = 384, 32
    server, _ = moto_server(folder)
    try:
        local = store_io(folder / "io" / "local.zarr", n_images, channels, grid)
        remote = store_io(f"s3://bench/io/{uuid.uuid4().hex[:8]}.zarr", n_images, channels, grid)
    finally:
        server.terminate()
        server.wait()
    print(f"\n[2] store I/O: {n_images} maps of {channels} x {grid} x {grid} fp16 ({local['mb']:.0f} MB, lz4 + crc32c, "
          f"{SHARD_IMAGES} a shard); local disk (page cache warm) vs S3 through moto on 127.0.0.1; "
          f"load {os.getloadavg()[0]:.1f}")
    for what in ("write", "read", "verify"):
        print(f"  {what:<6}  local {local[what]:7.0f} MB/s   S3 via moto {remote[what]:6.0f} MB/s   "
              f"ratio {remote[what] / local[what]:.2f}")


RESUME_DRIVER = """
import json, sys
import pandas as pd
from semcorr.pipeline.backbones import build_backbone
from semcorr.pipeline.extract import extract_features, store_attrs
spec, conf, images, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
net = build_backbone(spec)
attrs = store_attrs(net, "vits", "vits", "bench", None, False)
extract_features(net, pd.read_parquet(images), out, attrs, conf, progress=False)
"""


def measure_resume(folder: Path, n_images: int) -> None:
    import pandas as pd

    from semcorr.pipeline.backbones import build_backbone
    from semcorr.pipeline.extract import extract_features, store_attrs
    from semcorr.pipeline.store import open_store

    ws, dataset = workspace(folder / "resume", n_images)
    images_file = ws / "data" / "prepared" / dataset / "images.parquet"
    images = pd.read_parquet(images_file)
    spec = {"family": "dinov2", "variant": "vits14", "random_init": True, "input_size": 224, "resize": "pad",
            "arch": {"img_size": 224}}
    conf = {"batch_size": 8, "num_workers": 0, "device": "cpu", "flips": False, "shard_images": SHARD_IMAGES}
    net = build_backbone(spec)
    attrs = store_attrs(net, "vits", "vits", "bench", None, False)
    full = extract_features(net, images, ws / "data" / "features" / "vits" / "full.zarr", attrs, conf, progress=False)
    out = ws / "data" / "features" / "vits" / "resumed.zarr"
    partial = ws / "data" / ".semcorr" / "partial" / "vits" / "resumed.zarr"
    n_shards = math.ceil(n_images / SHARD_IMAGES)
    killed = subprocess.Popen([sys.executable, "-c", RESUME_DRIVER, json.dumps(spec), json.dumps(conf),
                               str(images_file), str(out)])
    while len(list((partial / "done" / "c").glob("[0-9]*"))) < max(1, n_shards // 2) and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    start = time.perf_counter()  # what a resumed run does before its first forward: verify every written shard
    store = open_store(partial, complete=False)
    written = [s for s in range(store.n_shards) if not store.check_shard(s)]
    check = time.perf_counter() - start
    resumed = extract_features(net, images, out, attrs, conf, progress=False)
    per_image = full.seconds / n_images
    expected = per_image * resumed.extracted
    print(f"\n[3] resume overhead: {n_images} {dataset} images, random-init ViT-S/14 at 224 px on CPU; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"  uninterrupted: {full.seconds:.1f} s ({1 / per_image:.2f} img/s)")
    print(f"  killed (SIGKILL) with {len(written)} of {n_shards} shards written ({resumed.skipped} images); "
          f"verifying them, as the resumed run does first: {check * 1000:.0f} ms "
          f"({100 * check / full.seconds:.2f}% of an uninterrupted run)")
    print(f"  the resumed run: {resumed.seconds:.1f} s for the other {resumed.extracted} images "
          f"({expected:.1f} s at the uninterrupted pace)")


def measure_decode(n_images: int) -> float:
    """Seconds per image to decode and resize to an 840 px input on one core (DINOv2's preprocessing)."""
    import torch
    from PIL import Image

    from semcorr.pipeline.backbones import build_backbone

    torch.set_num_threads(1)
    net = build_backbone({"family": "dinov2", "variant": "vits14", "random_init": True, "input_size": 840,
                          "resize": "pad", "arch": {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 56}})
    paths = sorted(WILLOW.glob("PF-dataset/*/*.png"))[:n_images]
    if not paths:
        from skimage import data

        paths = [None] * n_images
        pictures = [data.astronaut()] * n_images
    start = time.perf_counter()
    for k, path in enumerate(paths):
        rgb = np.array(Image.open(path).convert("RGB")) if path is not None else pictures[k]
        net.preprocess(rgb)
    seconds = (time.perf_counter() - start) / len(paths)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"\n[4] decode + resize to 840 px on 1 core: {seconds * 1000:.1f} ms per image "
          f"({len(paths)} {'PF-WILLOW PNGs' if paths[0] is not None else 'synthetic pictures'})")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=16, help="GPUs of the target cluster")
    parser.add_argument("--anchor", type=json.loads, default={"dinov2_vitb14": 285.0, "sam_vit_b": 37.5},
                        help="img/s of one GPU for dinov2_vitb14 at 840 px and sam_vit_b at 1024 px (JSON)")
    parser.add_argument("--bandwidth", type=float, default=2.0, help="aggregate storage write bandwidth, GB/s")
    parser.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores (DataLoader workers) per GPU")
    parser.add_argument("--quick", action="store_true", help="fewer images in the measurements")
    args = parser.parse_args()
    n = 32 if args.quick else 96
    with tempfile.TemporaryDirectory(prefix="semcorr-cost-") as tmp:
        folder = Path(tmp)
        measure_torchrun(folder, n, 1 if args.quick else 3)
        measure_store_io(folder, 2 * n)
        measure_resume(folder, n)
        decode_s = measure_decode(20)
    anchors = {k: float(v) for k, v in args.anchor.items()}
    print(f"\nGPU rates (img/s, FLOP-scaled from {anchors['dinov2_vitb14']:g} for DINOv2-B/14 at 840 px and "
          f"{anchors['sam_vit_b']:g} for SAM-B at 1024 px):")
    print("  " + ", ".join(f"{name} {rate(name, anchors):.0f}" for name in MODELS))
    study = [(name, images) for name in MODELS for images in DATASETS.values() for _ in range(STORES_PER_PAIR)]
    projection(f"Full study ({len(MODELS)} backbones x {len(DATASETS)} datasets {tuple(DATASETS)} x "
               f"{STORES_PER_PAIR} variants)", study, args.gpus, anchors, args.bandwidth * 1e9, decode_s,
               args.cpus_per_gpu)
    projection("1M-image corpus at DINOv2-B/14, 840 px", [("dinov2_vitb14", 1_000_000)], args.gpus, anchors,
               args.bandwidth * 1e9, decode_s, args.cpus_per_gpu)


if __name__ == "__main__":
    main()
