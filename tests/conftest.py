"""Shared fixtures: a real S3 API on 127.0.0.1 (moto's standalone server) for the tests that
ask for it; the PF-WILLOW subset and the store of one uninterrupted slow extraction, which
the extract, torchrun and S3 tests compare against; the ``slow`` marker (slow tests run in
CI like every other: never skipped)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a real multi-process or object-storage test (seconds); runs in CI")


@dataclass(frozen=True)
class S3Server:
    """A running moto server: ``endpoint``, the AWS ``env`` that points s3fs, boto3 and dvc at it
    (fake credentials, no instance-metadata lookups), and its request ``log``."""

    endpoint: str
    env: dict
    log: Path

    def requests(self) -> list[str]:
        """The request lines the server logged so far (``"GET /bucket/key HTTP/1.1" 200``)."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if '" ' in line and "HTTP/" in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """moto's S3 server on a free port of 127.0.0.1, started once and stopped at the end."""
    folder = tmp_path_factory.mktemp("moto")
    log = folder / "requests.log"
    for _ in range(3):  # another process may take the port between probing and binding
        port = _free_port()
        with open(log, "w") as out:
            server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                      stdout=out, stderr=subprocess.STDOUT, cwd=folder)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        if server.poll() is None and time.monotonic() < deadline:
            break
        server.kill()
        server.wait()
    else:
        pytest.fail(f"moto server did not start: {log.read_text()}")
    env = {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(folder / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(folder / "none"),
    }
    try:
        yield S3Server(endpoint, env, log)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Server:
    """The moto server with this process's AWS environment pointing at it (for this test only)."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def bucket(s3) -> str:
    """A new, empty bucket on the moto server."""
    import boto3

    name = f"semcorr-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def willow_root(tmp_path_factory) -> Path:
    """A data root holding PF-WILLOW prepared, cut to a subset that spans the sub-classes
    (and their image sizes)."""
    from semcorr.pipeline.datasets import prepare
    from semcorr.pipeline.tables import read_images
    from test_extract import N_IMAGES, WILLOW

    root = tmp_path_factory.mktemp("data")
    prepared = prepare("pfwillow", WILLOW, root / "prepared" / "pfwillow")
    images = read_images(prepared)
    images.iloc[:: len(images) // N_IMAGES].head(N_IMAGES).to_parquet(prepared / "images.parquet", index=False)
    return root


@pytest.fixture(scope="session")
def images(willow_root) -> pd.DataFrame:
    from semcorr.pipeline.tables import read_images

    return read_images(willow_root / "prepared" / "pfwillow")


@pytest.fixture(scope="session")
def reference(images, tmp_path_factory) -> Path:
    """The store of one uninterrupted slow run (in this process: same code, one start-up less)."""
    from semcorr.pipeline.backbones import build_backbone
    from semcorr.pipeline.extract import extract_features, store_attrs
    from test_extract import SLOW_BACKBONE, SLOW_EXTRACT, slow_out

    net = build_backbone(SLOW_BACKBONE)
    attrs = store_attrs(net, "slow", "slow", "pfwillow", None, SLOW_EXTRACT["flips"])
    return extract_features(net, images, slow_out(tmp_path_factory.mktemp("reference")), attrs, SLOW_EXTRACT,
                            progress=False).path
