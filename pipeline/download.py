"""Checksummed, resumable downloads of datasets and backbone weights, and safe archive extraction.

All official sources live in `DATASETS` and `WEIGHTS` (name -> url, filename, sha256).
A ``sha256`` of ``None`` means no published hash was found: that one file is fetched
unverified, with a warning, and its computed hash is recorded in the output manifest.

Every resource can instead come from a local ``source`` (a mirror): a directory or an
archive. Without network and without a source, fetching fails at once, naming the
param to set.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pooch
import requests
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from semcorr.pipeline.io import atomic_path, write_json

console = Console(stderr=True)

CONNECT_TIMEOUT = 5.0  # seconds: how long an unreachable host may stall before we call it offline
READ_TIMEOUT = 60.0
CHUNK = 1 << 16  # streamed bytes per write: an interrupted download loses at most this much


class DownloadError(RuntimeError):
    """A resource could not be fetched or verified; the message names the file or the param."""


class ArchiveError(DownloadError):
    """An archive holds a member that would land outside the target folder."""


@dataclass(frozen=True)
class Resource:
    url: str | None  # official URL; None = no public URL (licence-gated): local source only
    filename: str  # file name of the download (and of the checkpoint in data/weights/<key>/)
    sha256: str | None  # published sha256; None = none published (verified by nothing, recorded)
    extract: bool = False  # archive to unpack into the dataset folder


@dataclass(frozen=True)
class DatasetSource:
    resources: tuple[Resource, ...]
    markers: tuple[str, ...]  # top-level entries of data/raw/<name>/ the parser expects
    homepage: str


_WILLOW = "https://www.di.ens.fr/willow/research/proposalflow/dataset"
_SD4MATCH = "https://www.robots.ox.ac.uk/~xinghui/sd4match"

# No published sha256 was found for any dataset archive (searched public code for SPair-71k.tar.gz,
# PF-dataset*.zip and the SD4Match pair lists): all are recorded as None and hashed on download.
DATASETS: dict[str, DatasetSource] = {
    "spair": DatasetSource(
        resources=(Resource("http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz",
                            "SPair-71k.tar.gz", None, extract=True),),
        markers=("JPEGImages", "PairAnnotation", "Layout"),
        homepage="https://cvlab.postech.ac.kr/research/SPair-71k/",
    ),
    "pfpascal": DatasetSource(
        resources=(
            Resource(f"{_WILLOW}/PF-dataset-PASCAL.zip", "PF-dataset-PASCAL.zip", None, extract=True),
            # trn/val/test pair lists used by SD4Match (and CATs/DHPF before it)
            Resource(f"{_SD4MATCH}/pf-pascal_image_pairs.zip", "pf-pascal_image_pairs.zip", None, extract=True),
        ),
        markers=("PF-dataset-PASCAL", "trn_pairs.csv", "val_pairs.csv", "test_pairs.csv"),
        homepage="https://www.di.ens.fr/willow/research/proposalflow/",
    ),
    "pfwillow": DatasetSource(
        resources=(
            Resource(f"{_WILLOW}/PF-dataset.zip", "PF-dataset.zip", None, extract=True),
            Resource(f"{_SD4MATCH}/test_pairs.csv", "test_pairs.csv", None),
        ),
        markers=("PF-dataset", "test_pairs.csv"),
        homepage="https://www.di.ens.fr/willow/research/proposalflow/",
    ),
}

_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything"
_CLIP = "https://openaipublic.azureedge.net/clip/models"
DINOV3_DOWNLOADS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


def _dinov2(arch: str, reg: bool, sha256: str) -> Resource:
    name = f"dinov2_{arch}{'_reg4' if reg else ''}_pretrain.pth"
    return Resource(f"{_DINOV2}/dinov2_{arch}/{name}", name, sha256)


def _clip(sha256: str, name: str) -> Resource:
    # OpenAI publishes the sha256 as a path segment of each URL.
    return Resource(f"{_CLIP}/{sha256}/{name}.pt", f"{name}.pt", sha256)


# sha256 values found in public code that verifies these files (several independent repos each,
# except vitg14_reg4, seen in one). CLIP's come from OpenAI's URLs.
WEIGHTS: dict[str, Resource] = {
    "dinov2_vits14": _dinov2("vits14", False, "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9"),
    "dinov2_vitb14": _dinov2("vitb14", False, "0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73"),
    "dinov2_vitl14": _dinov2("vitl14", False, "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428"),
    "dinov2_vitg14": _dinov2("vitg14", False, "baf8467e50af277596bbbafa06887c177ee899ab46033649c383577d7e9309d3"),
    "dinov2_vits14_reg4": _dinov2("vits14", True, "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb"),
    "dinov2_vitb14_reg4": _dinov2("vitb14", True, "73182a088cf94833c94b1666d1c99e02fe87e2007bff57b564fb6206e25dba71"),
    "dinov2_vitl14_reg4": _dinov2("vitl14", True, "36e4deffbaef061a2576705b0c36f93621e2ae20bf6274694821b0b492551b51"),
    "dinov2_vitg14_reg4": _dinov2("vitg14", True, "746ecb8c6301c645c5c855be91687d274587d6e48fdaec4a729753160b34a283"),
    "sam_vit_b": Resource(f"{_SAM}/sam_vit_b_01ec64.pth", "sam_vit_b_01ec64.pth",
                          "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "sam_vit_l": Resource(f"{_SAM}/sam_vit_l_0b3195.pth", "sam_vit_l_0b3195.pth",
                          "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "sam_vit_h": Resource(f"{_SAM}/sam_vit_h_4b8939.pth", "sam_vit_h_4b8939.pth",
                          "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "clip_vitb32": _clip("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32"),
    "clip_vitb16": _clip("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16"),
    "clip_vitl14": _clip("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14"),
    # DINOv3 is licence-gated: no public URL, local `source` only. Meta's file names end in
    # the first 8 hex digits of the file's sha256 (torch.hub convention); we check that prefix.
    **{
        f"dinov3_{arch}": Resource(None, f"dinov3_{arch}_pretrain_lvd1689m-{prefix}.pth", None)
        for arch, prefix in {"vits16": "08c60483", "vits16plus": "4057cbaa", "vitb16": "73cec8be",
                             "vitl16": "8aa4cbdd", "vith16plus": "7c1da9a5", "vit7b16": "a955f4ea"}.items()
    },
}


# -- hashing and fetching -----------------------------------------------------------------


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class ResumingDownloader:
    """pooch downloader that keeps a ``.part`` file next to the target and resumes it with an
    HTTP Range request; the server's 206 answer is appended, a 200 restarts from zero."""

    def __init__(self, partial: Path, connect_timeout: float = CONNECT_TIMEOUT, progress: bool = True):
        self.partial = Path(partial)
        self.timeout = (connect_timeout, READ_TIMEOUT)
        self.progress = progress

    def __call__(self, url: str, output_file: str, pooch_obj=None, check_only: bool = False):
        if check_only:
            return requests.head(url, timeout=self.timeout, allow_redirects=True).status_code == 200
        done = self.partial.stat().st_size if self.partial.exists() else 0
        headers = {"Range": f"bytes={done}-"} if done else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if response.status_code == 416:  # the partial file is already complete
                response.close()
            else:
                response.raise_for_status()
                if response.status_code != 206:
                    done = 0
                total = done + int(response.headers.get("content-length", 0))
                with open(self.partial, "ab" if done else "wb") as f, _progress(self.progress) as bar:
                    task = bar.add_task(self.partial.name.removesuffix(".part"), total=total or None, completed=done)
                    for block in response.iter_content(CHUNK):
                        f.write(block)
                        bar.advance(task, len(block))
        os.replace(self.partial, output_file)


def _progress(enabled: bool) -> Progress:
    return Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=console, disable=not enabled, transient=True)


def fetch(resource: Resource, folder: Path, param: str, connect_timeout: float = CONNECT_TIMEOUT) -> Path:
    """Download ``resource`` into ``folder`` (resuming a partial download), verify its sha256.

    An existing complete, verified file is not downloaded again. ``param`` names the
    `source` param that would replace the download; errors name it.
    """
    if resource.url is None:
        raise DownloadError(f"{resource.filename} has no public URL; set `{param}` to a local copy")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if resource.sha256 is None:
        console.print(f"[yellow]warning:[/] no published sha256 for {resource.filename}; "
                      "downloading unverified (its computed sha256 goes into the manifest)")
    try:
        path = pooch.retrieve(
            resource.url,
            known_hash=None if resource.sha256 is None else f"sha256:{resource.sha256}",
            fname=resource.filename,
            path=folder,
            downloader=ResumingDownloader(folder / f"{resource.filename}.part", connect_timeout),
            progressbar=False,
        )
    except requests.HTTPError as exc:
        raise DownloadError(f"cannot fetch {resource.url}: {exc}; set `{param}` to a local copy") from exc
    except requests.RequestException as exc:  # unreachable host, timeout, connection cut mid-way
        if (folder / f"{resource.filename}.part").exists():
            hint = "run again to resume the partial download, or "
        else:
            hint = "no network? "
        raise DownloadError(f"cannot fetch {resource.url} ({type(exc).__name__}); {hint}"
                            f"set `{param}` to a local directory or archive holding {resource.filename}") from exc
    except ValueError as exc:  # pooch: hash mismatch (the bad file is already deleted)
        raise DownloadError(f"{resource.filename} from {resource.url}: checksum mismatch: {exc}") from exc
    return Path(path)


def verify(path: Path, resource: Resource) -> str:
    """sha256 of ``path``; raises `DownloadError` naming the file if a known hash disagrees."""
    digest = sha256sum(path)
    if resource.sha256 is not None and digest != resource.sha256:
        raise DownloadError(f"{path}: checksum mismatch: sha256 {digest}, expected {resource.sha256}")
    if resource.sha256 is None and resource.url is None and "-" in resource.filename:
        prefix = resource.filename.rsplit("-", 1)[1].split(".")[0]
        if not digest.startswith(prefix):
            console.print(f"[yellow]warning:[/] {path}: sha256 {digest} does not start with {prefix}, "
                          f"the hash prefix in the official name {resource.filename}")
    return digest


# -- archives ---------------------------------------------------------------------------------


def is_archive(path: Path) -> bool:
    return path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


def extract(archive: Path, dest: Path) -> Path:
    """Unpack a zip or tar archive into ``dest``, refusing members that would land outside it:
    absolute paths, ``..`` components, and links pointing out of ``dest``."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member(archive, dest, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    target = zf.read(info).decode()
                    _check_member(archive, dest, str(PurePosixPath(info.filename).parent / target), link=info.filename)
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                _check_member(archive, dest, member.name)
                if member.issym():
                    _check_member(archive, dest, str(PurePosixPath(member.name).parent / member.linkname),
                                  link=member.name)
                elif member.islnk():
                    _check_member(archive, dest, member.linkname, link=member.name)
            try:
                tf.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                raise ArchiveError(f"{archive}: unsafe member refused: {exc}") from exc
    else:
        raise ArchiveError(f"{archive}: not a zip or tar archive")
    return dest


def _check_member(archive: Path, dest: Path, name: str, link: str | None = None) -> None:
    what = f"link {link!r} -> {name!r}" if link else f"member {name!r}"
    name = name.replace("\\", "/")
    # a link target is judged where it points (a/../b is b); a member name must not contain '..'
    pure = PurePosixPath(posixpath.normpath(name) if link else name)
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive}: {what} has an absolute path; refusing to extract")
    root = dest.resolve()
    if ".." in pure.parts or not (root / pure).resolve().is_relative_to(root):
        raise ArchiveError(f"{archive}: {what} escapes the target folder ('..'); refusing to extract")


# -- local sources --------------------------------------------------------------------------


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a folder, hard-linking files where the file system allows (no data duplicated)."""
    shutil.copytree(src, dest, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def place(path: Path, dest: Path) -> None:
    """Put one file at ``dest``: hard link or copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _link_or_copy(str(path), str(dest))


# -- datasets and weights -------------------------------------------------------------------


def download_dataset(name: str, out_dir: Path, source: Path | None = None,
                     cache_dir: Path = Path("data/downloads"), connect_timeout: float = CONNECT_TIMEOUT) -> Path:
    """Fill ``out_dir`` (``data/raw/<name>``) with dataset ``name`` in the layout its parser
    expects, from the official URLs or from ``source`` (a local directory or archive).

    The folder appears only when complete; ``manifest.json`` records each file's sha256.
    """
    spec = DATASETS[name]
    param = f"download.{name}.source"
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    manifest = {"dataset": name, "source": str(source) if source else "official", "files": {}}
    if _done(out_dir / "manifest.json", source=manifest["source"]):
        console.print(f"{out_dir}: already complete")
        return out_dir
    fetched: list[Path] = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if source is None:
            for resource in spec.resources:
                path = fetch(resource, cache_dir / name, param, connect_timeout)
                fetched.append(path)
                manifest["files"][resource.filename] = _record(path, resource, resource.url)
                _unpack(path, resource, tmp)
        else:
            _from_source(Path(source), spec, tmp, manifest, param)
        _hoist(tmp, spec.markers)
        missing = [m for m in spec.markers if not (tmp / m).exists()]
        if missing:
            raise DownloadError(f"{source or 'the official download'}: dataset {name!r} lacks {missing}; "
                                f"expected top-level entries {list(spec.markers)} (see {spec.homepage})")
        write_json(tmp / "manifest.json", manifest)
    for path in fetched:  # the archives are unpacked; the cache only holds unfinished downloads
        path.unlink(missing_ok=True)
    return out_dir


def _from_source(source: Path, spec: DatasetSource, tmp: Path, manifest: dict, param: str) -> None:
    if not source.exists():
        raise DownloadError(f"`{param}` = {source}: no such file or directory")
    by_name = {r.filename: r for r in spec.resources}
    entries = sorted(source.iterdir()) if source.is_dir() else [source]
    for entry in entries:
        resource = by_name.get(entry.name)
        if entry.is_dir():
            copy_tree(entry, tmp / entry.name)
        elif resource is not None or is_archive(entry):
            resource = resource or Resource(None, entry.name, None, extract=True)
            manifest["files"][entry.name] = _record(entry, resource, str(entry))
            _unpack(entry, resource, tmp)
        else:
            place(entry, tmp / entry.name)


def _record(path: Path, resource: Resource, origin: str | None) -> dict:
    return {"sha256": verify(path, resource), "verified": resource.sha256 is not None, "from": origin}


def _unpack(path: Path, resource: Resource, tmp: Path) -> None:
    if resource.extract:
        extract(path, tmp)
    else:
        place(path, tmp / resource.filename)


def _hoist(root: Path, markers: tuple[str, ...], max_depth: int = 3) -> None:
    """Archives often wrap the dataset in a folder (``SPair-71k/``): move the contents of the
    folder holding each missing marker up to ``root``."""
    for marker in markers:
        if (root / marker).exists():
            continue
        found = sorted(p for p in root.rglob(marker)
                       if "__MACOSX" not in p.parts and len(p.relative_to(root).parts) <= max_depth)
        if not found:
            continue
        wrapper = found[0].parent
        for child in list(wrapper.iterdir()):
            if not (root / child.name).exists():
                os.replace(child, root / child.name)
        if not any(wrapper.iterdir()):
            wrapper.rmdir()


def download_weights(key: str, out_dir: Path, checkpoint: str | None, source: Path | None = None,
                     random_init: bool = False, cache_dir: Path = Path("data/downloads"),
                     connect_timeout: float = CONNECT_TIMEOUT) -> Path:
    """Fill ``out_dir`` (``data/weights/<key>``) with the verified checkpoint of registry entry
    ``checkpoint`` and ``weights.json`` {file, sha256, source, random_init}.

    Weight-free backbones (``checkpoint`` None) and ``random_init`` ones get only weights.json.
    """
    out_dir = Path(out_dir)
    param = f"backbone.{key}.source"
    if checkpoint is None or random_init:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            write_json(tmp / "weights.json", {"file": None, "sha256": None, "source": None,
                                              "random_init": bool(random_init), "verified": False})
        return out_dir
    if checkpoint not in WEIGHTS:
        raise DownloadError(f"backbone.{key}.checkpoint = {checkpoint!r} is not in the weights registry; "
                            f"known: {sorted(WEIGHTS)}")
    resource = WEIGHTS[checkpoint]
    origin = str(source) if source is not None else resource.url
    if _done(out_dir / "weights.json", source=origin, file=resource.filename) and (out_dir / resource.filename).is_file():
        console.print(f"{out_dir}: already complete")
        return out_dir
    if source is None and resource.url is None:
        raise DownloadError(
            f"{checkpoint} weights are licence-gated and cannot be downloaded automatically: request "
            f"{resource.filename} at {DINOV3_DOWNLOADS}, then set `{param}` to that file (or its folder)")
    if source is not None:
        path = _local_checkpoint(Path(source), resource, param)
    else:
        path = fetch(resource, Path(cache_dir) / "weights", param, connect_timeout)
    digest = verify(path, resource)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if source is None:
            os.replace(path, tmp / resource.filename)  # the download cache keeps no second copy
        else:
            place(path, tmp / resource.filename)
        write_json(tmp / "weights.json", {"file": resource.filename, "sha256": digest, "source": origin,
                                          "random_init": False, "verified": resource.sha256 is not None})
    return out_dir


def _local_checkpoint(source: Path, resource: Resource, param: str) -> Path:
    path = source / resource.filename if source.is_dir() else source
    if not path.is_file():
        raise DownloadError(f"`{param}` = {source}: {path} not found (expected {resource.filename})")
    return path


def _done(record: Path, **expected) -> bool:
    """An earlier run finished this output with the same inputs (its record is written last)."""
    if not record.is_file():
        return False
    found = json.loads(record.read_text())
    return all(found.get(key) == value for key, value in expected.items())
