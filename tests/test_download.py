"""Downloads against a local HTTP server (with Range support), checksums, resume, archive
safety and the offline message."""

from __future__ import annotations

import hashlib
import io
import json
import os
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
    assert "backbone.dinov3_vitb16.weights.source" in str(info.value)
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
    assert {"spair", "pfpascal", "pfwillow", "hpatches"} <= set(dl.DATASETS)
    for source in dl.DATASETS.values():
        for resource in source.resources:
            assert resource.url.startswith("http") and resource.url.endswith(resource.filename) == (
                "?" not in resource.url)
            assert resource.sha256 is None or len(resource.sha256) == 64


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


def test_inner_links_are_refused_too(tmp_path):
    """Dataset archives hold no links: one pointing inside is refused like one pointing out."""
    archive = write_tar(tmp_path / "a.tar.gz", [tar_member("d/f.txt"), tar_member("d/l", tarfile.SYMTYPE, "f.txt")],
                        {"d/f.txt": b"hello"})
    with pytest.raises(ArchiveError, match=r"a\.tar\.gz.*'d/l'.*link"):
        dl.extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


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
    assert manifest["inputs"]["SPair-71k.tar.gz"]["sha256"] == sha(archive.read_bytes())
    assert manifest["files"]["Layout/large/test.txt"] == {"size": 2, "sha256": sha(b"p\n")}


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
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["PF-dataset.zip"] == {"sha256": sha(zipped.getvalue()), "verified": False,
                                                    "from": f"{server.url}/PF-dataset.zip"}
    assert manifest["files"] == {"PF-dataset/car(G)/a.png": {"size": 3, "sha256": sha(b"png")},
                                 "test_pairs.csv": {"size": 14, "sha256": sha(b"imageA,imageB\n")}}
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
        "file": None, "sha256": None, "source": None, "random_init": True, "verified": False,
        "verified_by": "none"}


# -- local sources: copies, manifests, re-imports -----------------------------------------------


def willow_mirror(root: Path) -> Path:
    for name, data in {"PF-dataset/car(G)/a.png": b"png-a", "PF-dataset/car(G)/b.png": b"png-bb",
                       "PF-dataset/README.txt": b"readme", "test_pairs.csv": b"imageA,imageB\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_folder_source_manifest_lists_every_file(tmp_path):
    mirror = willow_mirror(tmp_path / "mirror")
    out = dl.download_dataset("pfwillow", tmp_path / "raw", mirror)
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {p.relative_to(mirror).as_posix(): p.read_bytes() for p in mirror.rglob("*") if p.is_file()}
    assert manifest["files"] == {rel: {"size": len(data), "sha256": sha(data)} for rel, data in expected.items()}
    assert set(manifest["source_state"]) == set(expected)


def test_imported_files_are_copies_not_links(monkeypatch, tmp_path):
    mirror = willow_mirror(tmp_path / "mirror")
    out = dl.download_dataset("pfwillow", tmp_path / "raw", mirror)
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(PAYLOAD)
    monkeypatch.setitem(dl.WEIGHTS, "tiny", Resource(None, "ckpt.pth", None))
    weights = dl.download_weights("tiny", tmp_path / "weights", "tiny", source=ckpt)
    for copy, original in ((out / "test_pairs.csv", mirror / "test_pairs.csv"),
                           (out / "PF-dataset" / "car(G)" / "a.png", mirror / "PF-dataset" / "car(G)" / "a.png"),
                           (weights / "ckpt.pth", ckpt)):
        assert not copy.is_symlink() and copy.stat().st_nlink == 1
        assert copy.stat().st_ino != original.stat().st_ino
        before = original.read_bytes()
        with open(copy, "r+b") as f:  # an in-place edit under data/ ...
            f.write(b"X")
        assert original.read_bytes() == before  # ... leaves the user's mirror alone


def test_dataset_rerun_follows_the_source(tmp_path, capsys):
    mirror = willow_mirror(tmp_path / "mirror")
    raw = tmp_path / "raw"
    dl.download_dataset("pfwillow", raw, mirror)
    capsys.readouterr()
    dl.download_dataset("pfwillow", raw, mirror)
    message = capsys.readouterr().err
    assert "already complete" in message and "force" in message

    fixed = mirror / "PF-dataset" / "car(G)" / "a.png"  # the user repairs a file of the mirror
    fixed.write_bytes(b"PNG-A")
    os.utime(fixed, ns=(fixed.stat().st_atime_ns, fixed.stat().st_mtime_ns + 10**9))  # same size, newer
    dl.download_dataset("pfwillow", raw, mirror)
    assert "already complete" not in capsys.readouterr().err
    assert (raw / "PF-dataset" / "car(G)" / "a.png").read_bytes() == b"PNG-A"
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["files"]["PF-dataset/car(G)/a.png"]["sha256"] == sha(b"PNG-A")

    (mirror / "PF-dataset" / "README.txt").unlink()  # a file leaves the mirror
    dl.download_dataset("pfwillow", raw, mirror)
    assert not (raw / "PF-dataset" / "README.txt").exists()

    with open(raw / "test_pairs.csv", "r+b") as f:  # same-size edit of the copy: force restores it
        f.write(b"IMAGEA")
    dl.download_dataset("pfwillow", raw, mirror, force=True)
    assert (raw / "test_pairs.csv").read_bytes() == b"imageA,imageB\n"


def test_dataset_rerun_notices_a_replaced_archive(tmp_path):
    archive = spair_skeleton_tar(tmp_path / "SPair-71k.tar.gz")
    raw = tmp_path / "raw"
    dl.download_dataset("spair", raw, archive)
    files = {"SPair-71k/JPEGImages/cat/a.jpg": b"new image", "SPair-71k/PairAnnotation/test/p.json": b"{}",
             "SPair-71k/Layout/large/test.txt": b"p\n"}
    write_tar(archive, [tar_member(name) for name in files], files)
    dl.download_dataset("spair", raw, archive)
    assert (raw / "JPEGImages" / "cat" / "a.jpg").read_bytes() == b"new image"
    assert not (raw / "ImageAnnotation").exists()
    assert json.loads((raw / "manifest.json").read_text())["inputs"]["SPair-71k.tar.gz"]["sha256"] == sha(
        archive.read_bytes())


def test_a_removed_output_file_is_noticed(tmp_path):
    mirror = willow_mirror(tmp_path / "mirror")
    raw = dl.download_dataset("pfwillow", tmp_path / "raw", mirror)
    (raw / "PF-dataset" / "car(G)" / "b.png").unlink()
    dl.download_dataset("pfwillow", raw, mirror)
    assert (raw / "PF-dataset" / "car(G)" / "b.png").read_bytes() == b"png-bb"


# -- weights: registry hash, pins, re-imports ----------------------------------------------------


@pytest.fixture
def unregistered(monkeypatch, tmp_path) -> Path:
    """A checkpoint file for the registry entry ``free``, which has no sha256."""
    monkeypatch.setitem(dl.WEIGHTS, "free", Resource(None, "free.pth", None))
    path = tmp_path / "mirror" / "free.pth"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


def test_a_pin_verifies_an_unregistered_checkpoint(unregistered, tmp_path):
    out = tmp_path / "weights" / "free"
    wrong = "ab" * 32
    with pytest.raises(DownloadError) as err:
        dl.download_weights("free", out, "free", source=unregistered, sha256=wrong)
    assert str(unregistered) in str(err.value) and wrong in str(err.value) and sha(PAYLOAD) in str(err.value)
    assert not out.exists()
    dl.download_weights("free", out, "free", source=unregistered, sha256=sha(PAYLOAD).upper())
    record = json.loads((out / "weights.json").read_text())
    assert (record["sha256"], record["verified"], record["verified_by"]) == (sha(PAYLOAD), True, "pin")


def test_an_unpinned_unregistered_checkpoint_is_recorded_as_unverified(unregistered, tmp_path):
    out = dl.download_weights("free", tmp_path / "weights" / "free", "free", source=unregistered.parent)
    record = json.loads((out / "weights.json").read_text())
    assert (record["sha256"], record["verified"], record["verified_by"]) == (sha(PAYLOAD), False, "none")
    assert record["file"] == "free.pth" and (out / "free.pth").read_bytes() == PAYLOAD


def test_a_pin_must_equal_the_registry_hash(monkeypatch, tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(PAYLOAD)
    monkeypatch.setitem(dl.WEIGHTS, "tiny", Resource(None, "ckpt.pth", sha(PAYLOAD)))
    other = "cd" * 32
    with pytest.raises(DownloadError) as err:
        dl.download_weights("tiny_b", tmp_path / "w", "tiny", source=ckpt, sha256=other)
    message = str(err.value)
    assert "backbone.tiny_b.weights.sha256" in message and other in message and sha(PAYLOAD) in message
    assert not (tmp_path / "w").exists()
    out = dl.download_weights("tiny_b", tmp_path / "w", "tiny", source=ckpt, sha256=sha(PAYLOAD))
    assert json.loads((out / "weights.json").read_text())["verified_by"] == "registry"


def test_weights_rerun_follows_the_source(unregistered, tmp_path, capsys):
    out = tmp_path / "weights" / "free"
    dl.download_weights("free", out, "free", source=unregistered)
    capsys.readouterr()
    dl.download_weights("free", out, "free", source=unregistered)
    assert "already complete" in capsys.readouterr().err
    unregistered.write_bytes(b"a better checkpoint")
    dl.download_weights("free", out, "free", source=unregistered)
    assert (out / "free.pth").read_bytes() == b"a better checkpoint"
    assert json.loads((out / "weights.json").read_text())["sha256"] == sha(b"a better checkpoint")
    with pytest.raises(DownloadError, match="ab" * 32):  # a new pin is checked, not taken as done
        dl.download_weights("free", out, "free", source=unregistered, sha256="ab" * 32)
    with open(out / "free.pth", "r+b") as f:
        f.write(b"A")
    dl.download_weights("free", out, "free", source=unregistered, force=True)
    assert (out / "free.pth").read_bytes() == b"a better checkpoint"
