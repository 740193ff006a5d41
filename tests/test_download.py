"""Downloads against a local HTTP server (with Range support), checksums, resume, archive
safety and the offline message."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from semcorr.pipeline import download as dl
from semcorr.pipeline.download import ArchiveError, DownloadError, Resource


class Server:
    """Serves ``files`` (url path -> bytes) on 127.0.0.1; honours ``Range: bytes=N-`` unless
    ``ignore_range``; with ``cut_after`` set, the next full response stops after that many bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.cut_after: int | None = None
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_after is not None:
                    payload, server.cut_after = payload[: server.cut_after], None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def closed_port_url() -> str:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/SPair-71k.tar.gz"


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_verifies_checksum(server, tmp_path):
    server.files["/w.pth"] = PAYLOAD
    good = Resource(f"{server.url}/w.pth", "w.pth", sha(PAYLOAD))
    path = dl.fetch(good, tmp_path / "ok", "backbone.x.source")
    assert path.read_bytes() == PAYLOAD

    bad = Resource(f"{server.url}/w.pth", "w.pth", sha(b"something else"))
    with pytest.raises(DownloadError, match="w.pth.*checksum mismatch"):
        dl.fetch(bad, tmp_path / "bad", "backbone.x.source")
    assert not (tmp_path / "bad" / "w.pth").exists()


def test_fetch_resumes_after_interruption(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.cut_after = 300_000
    resource = Resource(f"{server.url}/big.bin", "big.bin", sha(PAYLOAD))
    with pytest.raises(DownloadError, match="resume"):
        dl.fetch(resource, tmp_path, "download.spair.source")
    partial = tmp_path / "big.bin.part"
    kept = partial.stat().st_size
    assert 200_000 <= kept <= 300_000  # all but the last unfinished chunk
    assert not (tmp_path / "big.bin").exists()

    path = dl.fetch(resource, tmp_path, "download.spair.source")
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert not partial.exists()
    # a complete verified file is not fetched again
    count = len(server.requests)
    dl.fetch(resource, tmp_path, "download.spair.source")
    assert len(server.requests) == count


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "big.bin.part").write_bytes(b"stale bytes")
    path = dl.fetch(Resource(f"{server.url}/big.bin", "big.bin", sha(PAYLOAD)), tmp_path, "p")
    assert path.read_bytes() == PAYLOAD


def test_offline_without_source_names_the_param_fast(monkeypatch, tmp_path):
    spec = dl.DATASETS["spair"]
    offline = dl.DatasetSource((Resource(closed_port_url(), "SPair-71k.tar.gz", None, extract=True),),
                               spec.markers, spec.homepage)
    monkeypatch.setitem(dl.DATASETS, "spair", offline)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"download\.spair\.source"):
        dl.download_dataset("spair", tmp_path / "raw" / "spair", None, tmp_path / "cache", connect_timeout=2)
    assert time.monotonic() - start < 5
    assert not (tmp_path / "raw" / "spair").exists()


def test_gated_weights_point_to_the_licence_page(tmp_path):
    with pytest.raises(DownloadError) as info:
        dl.download_weights("dinov3_vitb16", tmp_path / "w", "dinov3_vitb16")
    assert "backbone.dinov3_vitb16.source" in str(info.value)
    assert dl.DINOV3_DOWNLOADS in str(info.value)
    assert not (tmp_path / "w").exists()


def test_registry_is_complete():
    for key in ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vitb14_reg4",
                "sam_vit_b", "sam_vit_l", "sam_vit_h", "clip_vitb32", "clip_vitb16", "clip_vitl14"]:
        resource = dl.WEIGHTS[key]
        assert resource.url.endswith(resource.filename)
        assert resource.sha256 is not None and len(resource.sha256) == 64
    for key in ["clip_vitb32", "clip_vitb16", "clip_vitl14"]:  # OpenAI's URL carries the hash
        assert dl.WEIGHTS[key].sha256 in dl.WEIGHTS[key].url
    assert set(dl.DATASETS) == {"spair", "pfpascal", "pfwillow"}


# -- archives ---------------------------------------------------------------------------------


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def tar_member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "/abs/evil.txt"])
def test_zip_slip_is_refused(tmp_path, name):
    archive = write_zip(tmp_path / "a.zip", {"fine.txt": b"x", name: b"evil"})
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ArchiveError, match="a.zip"):
        dl.extract(archive, dest)
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (dest / "fine.txt").exists()  # checked before anything is written


@pytest.mark.parametrize("member", [
    tar_member("../evil.txt"),
    tar_member("link", tarfile.SYMTYPE, "../../outside"),
    tar_member("deep/link", tarfile.SYMTYPE, "/etc/passwd"),
    tar_member("hard", tarfile.LNKTYPE, "../outside"),
])
def test_tar_escapes_are_refused(tmp_path, member):
    archive = write_tar(tmp_path / "a.tar.gz", [tar_member("fine.txt"), member],
                        {"fine.txt": b"x", "../evil.txt": b"evil"})
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ArchiveError, match="a.tar.gz"):
        dl.extract(archive, dest)
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not (dest / "link").exists() and not (dest / "fine.txt").exists()


def test_safe_archive_with_inner_link_extracts(tmp_path):
    archive = write_tar(tmp_path / "a.tar.gz", [tar_member("d/f.txt"), tar_member("d/l", tarfile.SYMTYPE, "f.txt")],
                        {"d/f.txt": b"hello"})
    dest = dl.extract(archive, tmp_path / "dest")
    assert (dest / "d" / "l").read_bytes() == b"hello"


# -- datasets and weights end to end ----------------------------------------------------------


def spair_skeleton_tar(path: Path) -> Path:
    files = {"SPair-71k/JPEGImages/cat/a.jpg": b"img", "SPair-71k/PairAnnotation/test/p.json": b"{}",
             "SPair-71k/Layout/large/test.txt": b"p\n", "SPair-71k/ImageAnnotation/cat/a.json": b"{}"}
    return write_tar(path, [tar_member(name) for name in files], files)


def test_dataset_from_local_archive_is_unwrapped_and_recorded(tmp_path):
    archive = spair_skeleton_tar(tmp_path / "SPair-71k.tar.gz")
    out = dl.download_dataset("spair", tmp_path / "raw" / "spair", archive, tmp_path / "cache")
    assert (out / "PairAnnotation" / "test" / "p.json").is_file()
    assert (out / "ImageAnnotation").is_dir() and not (out / "SPair-71k").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["SPair-71k.tar.gz"]["sha256"] == sha(archive.read_bytes())


def test_dataset_source_lacking_the_layout_fails_and_writes_nothing(tmp_path):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "readme.txt").write_text("nothing here")
    with pytest.raises(DownloadError, match="PF-dataset"):
        dl.download_dataset("pfwillow", tmp_path / "raw" / "pfwillow", tmp_path / "mirror")
    assert not (tmp_path / "raw" / "pfwillow").exists()


def test_dataset_download_over_http_records_unpublished_hashes(server, monkeypatch, tmp_path, capsys):
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("PF-dataset/car(G)/a.png", b"png")
    server.files["/PF-dataset.zip"] = zipped.getvalue()
    server.files["/test_pairs.csv"] = b"imageA,imageB\n"
    source = dl.DatasetSource((Resource(f"{server.url}/PF-dataset.zip", "PF-dataset.zip", None, extract=True),
                               Resource(f"{server.url}/test_pairs.csv", "test_pairs.csv", None)),
                              dl.DATASETS["pfwillow"].markers, "")
    monkeypatch.setitem(dl.DATASETS, "pfwillow", source)
    out = dl.download_dataset("pfwillow", tmp_path / "raw" / "pfwillow", None, tmp_path / "cache")
    assert (out / "PF-dataset" / "car(G)" / "a.png").read_bytes() == b"png"
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert files["PF-dataset.zip"] == {"sha256": sha(zipped.getvalue()), "verified": False,
                                       "from": f"{server.url}/PF-dataset.zip"}
    assert "no published sha256" in capsys.readouterr().err
    assert not list((tmp_path / "cache" / "pfwillow").glob("*.zip"))  # unpacked archives are not kept
    count = len(server.requests)
    dl.download_dataset("pfwillow", out, None, tmp_path / "cache")  # finished: nothing fetched again
    assert len(server.requests) == count


def test_weights_download_and_local_source(server, monkeypatch, tmp_path):
    server.files["/ckpt.pth"] = PAYLOAD
    monkeypatch.setitem(dl.WEIGHTS, "tiny", Resource(f"{server.url}/ckpt.pth", "ckpt.pth", sha(PAYLOAD)))
    out = dl.download_weights("tiny_b", tmp_path / "weights" / "tiny_b", "tiny", cache_dir=tmp_path / "cache")
    record = json.loads((out / "weights.json").read_text())
    assert record["file"] == "ckpt.pth" and record["sha256"] == sha(PAYLOAD) and record["random_init"] is False
    assert (out / "ckpt.pth").read_bytes() == PAYLOAD

    wrong = tmp_path / "mirror" / "ckpt.pth"
    wrong.parent.mkdir()
    wrong.write_bytes(b"not the checkpoint")
    with pytest.raises(DownloadError, match=r"mirror/ckpt.pth: checksum mismatch"):
        dl.download_weights("tiny_c", tmp_path / "weights" / "tiny_c", "tiny", source=wrong.parent)
    assert not (tmp_path / "weights" / "tiny_c").exists()

    local = dl.download_weights("tiny_d", tmp_path / "weights" / "tiny_d", "tiny", source=out / "ckpt.pth")
    assert json.loads((local / "weights.json").read_text())["source"] == str(out / "ckpt.pth")


def test_weight_free_and_random_init_get_only_a_record(tmp_path):
    daisy = dl.download_weights("daisy", tmp_path / "daisy", None)
    rand = dl.download_weights("dinov2_rand", tmp_path / "rand", "dinov2_vitb14", random_init=True)
    assert [p.name for p in daisy.iterdir()] == ["weights.json"]
    assert json.loads((rand / "weights.json").read_text()) == {
        "file": None, "sha256": None, "source": None, "random_init": True, "verified": False}
