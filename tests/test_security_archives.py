"""Dataset archives may hold only regular files and folders: the PATH_MAX symlink chain of
CVE-2025-4517 (which slips past ``filter='data'`` on Python 3.11.7), any other link and any
special member are refused before anything is written; a failed extraction leaves nothing."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from semcorr.pipeline import download as dl
from semcorr.pipeline.download import ArchiveError, DownloadError

NAME = "d" * 247  # 16 nested names of this length overflow PATH_MAX in os.path.realpath
STEPS = "abcdefghijklmnop"


def cve_2025_4517_tar(path: Path, payload: bytes = b"pwned") -> Path:
    """dir chain NAME/NAME/... with a one-letter symlink to each level, a link ``l`` through
    all of them back up to the extraction root, ``escape`` -> that link's parent (one level
    above the root, lexically inside), then the file ``escape/pwned``."""
    with tarfile.open(path, "w") as tf:
        prefix = ""
        for step in STEPS:
            tf.addfile(_info(os.path.join(prefix, NAME), tarfile.DIRTYPE))
            tf.addfile(_info(os.path.join(prefix, step), tarfile.SYMTYPE, NAME))
            prefix = os.path.join(prefix, NAME)
        chain = os.path.join(*STEPS, "l" * 254)
        tf.addfile(_info(chain, tarfile.SYMTYPE, "../" * len(STEPS)))
        tf.addfile(_info("escape", tarfile.SYMTYPE, chain + "/.."))
        info = _info("escape/pwned", tarfile.REGTYPE)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return path


def _info(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info


def everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_cve_2025_4517_chain_is_refused_before_writing(tmp_path):
    archive = cve_2025_4517_tar(tmp_path / "SPair-71k.tar")
    work = tmp_path / "work"
    dest = work / "dest"
    with pytest.raises(ArchiveError) as err:
        dl.extract(archive, dest)
    assert str(archive) in str(err.value) and "link" in str(err.value)
    assert not (work / "pwned").exists()
    assert everything_under(work) == []  # no escaping file and nothing left inside


def test_cve_2025_4517_chain_as_a_dataset_source_writes_nothing(tmp_path):
    archive = cve_2025_4517_tar(tmp_path / "SPair-71k.tar")
    raw = tmp_path / "data" / "raw"
    with pytest.raises(DownloadError, match="SPair-71k.tar"):
        dl.download_dataset("spair", raw / "spair", archive, tmp_path / "data" / "downloads")
    assert not (raw / "pwned").exists() and not (raw / "spair").exists()
    assert everything_under(tmp_path / "data") == ["raw"]


def tar_with(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tf:
        ok = _info("d/f.txt", tarfile.REGTYPE)
        ok.size = 5
        tf.addfile(ok, io.BytesIO(b"hello"))
        tf.addfile(member)
    return path


@pytest.mark.parametrize("kind, link", [
    (tarfile.SYMTYPE, "f.txt"),  # pointing inside: refused all the same
    (tarfile.LNKTYPE, "d/f.txt"),
    (tarfile.FIFOTYPE, ""),
    (tarfile.CHRTYPE, ""),
], ids=["inner-symlink", "inner-hard-link", "fifo", "char-device"])
def test_tar_links_and_special_members_are_refused(tmp_path, kind, link):
    archive = tar_with(tmp_path / "a.tar", _info("d/x", kind, link))
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=r"a\.tar.*'d/x'"):
        dl.extract(archive, dest)
    assert not dest.exists()


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("d/f.txt", b"hello")
        link = zipfile.ZipInfo("d/l")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "f.txt")
    with pytest.raises(ArchiveError, match=r"a\.zip.*'d/l'"):
        dl.extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_zip_failing_midway_leaves_nothing(tmp_path):
    """A corrupt second member fails after the first was written: the first goes too."""
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/first.txt", b"first member")
        zf.writestr("a/second.txt", b"SECOND MEMBER DATA")
    data = archive.read_bytes()
    archive.write_bytes(data.replace(b"SECOND MEMBER DATA", b"second member data"))  # CRC now wrong
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=r"a\.zip"):
        dl.extract(archive, dest)
    assert not dest.exists()


def test_extracted_tree_is_checked_for_links(tmp_path):
    """The check run after every extraction, on a real folder holding a link."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("x")
    dl.check_extracted(Path("a.tar"), root)
    (root / "d" / "l").symlink_to(tmp_path)
    with pytest.raises(ArchiveError, match=r"a\.tar.*d/l"):
        dl.check_extracted(Path("a.tar"), root)
