"""Checksummed, resumable downloads of datasets and backbone weights, imports from local
sources, and safe archive extraction.

All official sources live in `DATASETS`, `VIDEO_DATASETS` and `WEIGHTS` (name -> url,
filename, sha256).
A ``sha256`` of ``None`` means no published hash was found: that one file is fetched
unverified, with a warning, and its computed hash is recorded in the output manifest.

Every resource can instead come from a local ``source`` (a mirror): a directory or an
archive. Without network and without a source, fetching fails at once, naming the
param to set.

Copies, never links. A file taken from a local source is copied into ``data/``: as a reflink
(a copy-on-write clone through ``ioctl(FICLONE)``, no data duplicated) where the file system
supports it (Btrfs, XFS, bcachefs, ...), else as a plain byte copy. Never a hard link or a
symlink, so an edit under ``data/`` never edits the source.

Archives. Dataset archives may hold only regular files and folders: a symlink, hard link or
special member, an absolute name or a ``..`` component is refused before anything is
written. After extraction every path must be a plain file or folder inside the target;
on any failure what was extracted is removed.

Bookkeeping. ``data/raw/<name>/manifest.json`` records the ``source``, its ``source_state``
(the relative path, size and mtime_ns of every source file, taken before the import; null
for the official download), the ``inputs`` (every downloaded, unpacked or registered file:
sha256, ``verified`` by a published hash, ``from`` where) and the ``files`` (every file of
the folder: relative path -> size and sha256). ``data/weights/<key>/weights.json`` records
the checkpoint ``file``, its ``sha256`` and ``size``, ``source``, ``source_state``, the user's
``pin``, and ``verified`` / ``verified_by``: ``registry`` (the registry's hash), ``pin`` (the
user's ``sha256``) or ``none``. A re-run does nothing only when the source state (and, for a
dataset, the folder's file paths and sizes; for weights, the pin and the file size) is as
recorded; otherwise it imports again. ``force=True`` always imports again. Outputs appear
only when complete (`pipeline.io.atomic_path`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pooch
import requests
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from semcorr.pipeline.io import atomic_path, write_json
from semcorr.pipeline.weights import WeightsError, check_torchscript, is_torchscript, sha256_file

console = Console(stderr=True, soft_wrap=True)  # messages name long paths: never wrap them

CONNECT_TIMEOUT = 5.0  # seconds: how long an unreachable host may stall before we call it offline
READ_TIMEOUT = 60.0
CHUNK = 1 << 16  # streamed bytes per write: an interrupted download loses at most this much
COPY_CHUNK = 1 << 20
FICLONE = 0x40049409  # <linux/fs.h>: _IOW(0x94, 9, int), clone a whole file (reflink)
MANIFEST = "manifest.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A resource could not be fetched or verified; the message names the file or the param."""


class ArchiveError(DownloadError):
    """An archive holds a member that is not a plain file or folder inside the target, or
    cannot be unpacked."""


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
    "hpatches": DatasetSource(
        resources=(Resource("http://icvl.ee.ic.ac.uk/vbalnt/hpatches/hpatches-sequences-release.tar.gz",
                            "hpatches-sequences-release.tar.gz", None, extract=True),),
        markers=("hpatches-sequences-release",),
        homepage="https://github.com/hpatches/hpatches-dataset",
    ),
}
# AP-10k: the official ap-10k.zip (AP-10K's README links this Google Drive file; GeoAware-SC fetches the
# same); no sha256 is published. One archive, three pair settings (`pipeline.datasets.ap10k`): each
# key downloads it into its own data/raw/<key>/ (one copy in DVC's cache, one fetch in data/downloads).
_AP10K = DatasetSource(
    resources=(Resource("https://drive.usercontent.google.com/download?id=1-FNNGcdtAQRehYYkGY1y4wzFNg4iWNad"
                        "&export=download&confirm=t", "ap-10k.zip", None, extract=True),),
    markers=("annotations", "data"),
    homepage="https://github.com/AlexTheBad/AP-10K",
)
DATASETS.update({"ap10k": _AP10K, "ap10k_cross_species": _AP10K, "ap10k_cross_family": _AP10K})

# Video datasets for label propagation (no pairs: kept apart from the correspondence sets).
# No published sha256 was found for these archives either: recorded as None, hashed on download.
VIDEO_DATASETS: dict[str, DatasetSource] = {
    "davis": DatasetSource(
        resources=(Resource("https://data.vision.ee.ethz.ch/csergi/share/davis/DAVIS-2017-trainval-480p.zip",
                            "DAVIS-2017-trainval-480p.zip", None, extract=True),),
        markers=("JPEGImages", "Annotations", "ImageSets"),
        homepage="https://davischallenge.org/davis2017/code.html",
    ),
    "jhmdb": DatasetSource(
        resources=(
            Resource("http://files.is.tue.mpg.de/jhmdb/Rename_Images.tar.gz", "Rename_Images.tar.gz", None, extract=True),
            Resource("http://files.is.tue.mpg.de/jhmdb/joint_positions.zip", "joint_positions.zip", None, extract=True),
            # the official train/test splits; the parser reads <action>_test_split1.txt wherever they land
            Resource("http://files.is.tue.mpg.de/jhmdb/splits.zip", "splits.zip", None, extract=True),
        ),
        markers=("Rename_Images", "joint_positions"),
        homepage="http://jhmdb.is.tue.mpg.de/",
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


def verify(path: Path, expected: str | None, name: str | Path | None = None) -> str:
    """sha256 of ``path``; raises `DownloadError` naming ``name`` (default: the path), the
    expected and the actual hash if ``expected`` is given and disagrees."""
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise DownloadError(f"{name or path}: checksum mismatch: sha256 {digest}, expected {expected}")
    return digest


# -- archives ---------------------------------------------------------------------------------


def is_archive(path: Path) -> bool:
    return path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


def extract(archive: Path, dest: Path) -> Path:
    """Unpack the zip or tar ``archive`` into ``dest`` (absent or an empty folder).

    Every member must be a regular file or a folder with a relative name free of ``..``;
    all are checked before anything is written, and the result is checked by
    `check_extracted`. On any failure ``dest`` is removed and `ArchiveError` names the archive.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{archive}: cannot unpack into {dest}, which is not an empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest)
        else:
            raise ArchiveError(f"{archive}: not a zip or tar archive")
        check_extracted(archive, dest)
    except BaseException as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, ArchiveError) or not isinstance(exc, Exception):
            raise
        raise ArchiveError(f"{archive}: cannot be unpacked ({type(exc).__name__}: {exc}); "
                           "nothing of it was kept") from exc
    return dest


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_name(archive, info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                _refuse(archive, info.filename, "symbolic link" if kind == stat.S_IFLNK else "special file")
        zf.extractall(dest)


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            _check_name(archive, member.name)
            if not (member.isreg() or member.isdir()):
                _refuse(archive, member.name, "symbolic link" if member.issym() else
                        "hard link" if member.islnk() else "special file")
        tf.extractall(dest, members=members, filter="data")


def _check_name(archive: Path, name: str) -> None:
    clean = name.replace("\\", "/")
    pure = PurePosixPath(clean)
    if pure.is_absolute() or (len(clean) > 1 and clean[1] == ":"):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if ".." in pure.parts:
        raise ArchiveError(f"{archive}: member {name!r} escapes the target folder ('..'); refusing to extract")


def _refuse(archive: Path, name: str, kind: str) -> None:
    raise ArchiveError(f"{archive}: member {name!r} is a {kind}; dataset archives hold only files and "
                       "folders, so links and special files are refused (nothing was extracted)")


def check_extracted(archive: Path, root: Path) -> None:
    """Raise `ArchiveError` naming ``archive`` unless every path under ``root`` is a regular
    file or a folder (no link) that resolves inside ``root``."""
    base = Path(root).resolve()
    for folder, dirs, files in os.walk(root):  # links are listed, never followed
        for name in dirs + files:
            path = Path(folder, name)
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or not path.resolve().is_relative_to(base):
                raise ArchiveError(f"{archive}: unpacked {path.relative_to(root)} is a link or special file, "
                                   "or lies outside the target folder")


def _merge(src: Path, dest: Path, origin: Path) -> None:
    """Move the contents of folder ``src`` into folder ``dest`` (folders merge, files replace
    files), then remove ``src``; ``origin`` (the archive) is named on a file/folder clash."""
    for child in sorted(src.iterdir()):
        target = dest / child.name
        if child.is_dir() and target.is_dir():
            _merge(child, target, origin)
        elif target.exists() and (child.is_dir() or target.is_dir()):
            raise ArchiveError(f"{origin}: {child.name} clashes with a file or folder of the same name "
                               f"from another part of the source ({target})")
        else:
            os.replace(child, target)
    src.rmdir()


# -- local sources --------------------------------------------------------------------------


def clone_file(src: Path, dest: Path) -> None:
    """Copy file ``src`` to ``dest``: a reflink where the file system supports one, else a
    byte copy; never a link (see the module docstring)."""
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except OSError:  # no reflinks here (ext4, tmpfs, another file system, ...)
            shutil.copyfileobj(fin, fout, COPY_CHUNK)


def copy_tree(src: Path, dest: Path) -> None:
    """`clone_file` every file under folder ``src`` to the same relative path under ``dest``."""
    for rel, path in _walk_files(src):
        clone_file(path, dest / rel)


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    """(posix path relative to ``root``, path) of every file under folder ``root``, sorted;
    links to files and folders are followed (a mirror may use them)."""
    def fail(err: OSError) -> None:
        raise err

    found = []
    for folder, _, files in os.walk(root, onerror=fail, followlinks=True):
        found += [(Path(folder, name).relative_to(root).as_posix(), Path(folder, name)) for name in files]
    return sorted(found)


def source_state(source: Path, param: str) -> dict[str, dict[str, int]]:
    """Relative path -> {size, mtime_ns} of every file of ``source`` (a folder, or one file
    keyed by its name). Raises `DownloadError` naming ``param`` if it is missing, unreadable
    or holds something other than regular files."""
    source = Path(source)
    if not source.exists():
        raise DownloadError(f"`{param}` = {source}: no such file or directory")
    try:
        entries = _walk_files(source) if source.is_dir() else [(source.name, source)]
        state = {rel: os.stat(path) for rel, path in entries}
    except OSError as exc:
        raise DownloadError(f"`{param}` = {source}: cannot be read ({exc})") from exc
    for rel, st in state.items():
        if not stat.S_ISREG(st.st_mode):
            raise DownloadError(f"`{param}` = {source}: {rel} is not a regular file")
    return {rel: {"size": st.st_size, "mtime_ns": st.st_mtime_ns} for rel, st in state.items()}


def tree_files(root: Path) -> dict[str, dict]:
    """Relative path -> {size, sha256} of every file under ``root`` but the manifest."""
    return {rel: {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for rel, path in _walk_files(root) if rel != MANIFEST}


# -- datasets and weights -------------------------------------------------------------------


def download_dataset(name: str, out_dir: Path, source: Path | None = None,
                     cache_dir: Path = Path("data/downloads"), connect_timeout: float = CONNECT_TIMEOUT,
                     force: bool = False) -> Path:
    """Fill ``out_dir`` (``data/raw/<name>``) with dataset ``name`` in the layout its parser
    expects, from the official URLs or from ``source`` (a local directory or archive).

    The folder appears only when complete, with ``manifest.json`` (see the module docstring).
    A finished folder whose source is unchanged is kept, unless ``force``.
    """
    if name not in DATASETS and name not in VIDEO_DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; known: {sorted(DATASETS) + sorted(VIDEO_DATASETS)}")
    spec = DATASETS.get(name) or VIDEO_DATASETS[name]
    param = f"download.{name}.source"
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    origin = str(source) if source is not None else "official"
    state = None if source is None else source_state(Path(source), param)
    if not force and _dataset_done(out_dir, origin, state):
        console.print(f"{out_dir}: already complete ({origin}, unchanged since it was imported); "
                      "force (`semcorr download --force`) imports it again")
        return out_dir
    manifest = {"dataset": name, "source": origin, "source_state": state, "inputs": {}}
    fetched: list[Path] = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if source is None:
            for resource in spec.resources:
                path = fetch(resource, cache_dir / name, param, connect_timeout)
                fetched.append(path)
                manifest["inputs"][resource.filename] = _record(path, resource, resource.url)
                _unpack(path, resource, tmp)
        else:
            _from_source(Path(source), spec, tmp, manifest["inputs"])
        _hoist(tmp, spec.markers)
        missing = [m for m in spec.markers if not (tmp / m).exists()]
        if missing:
            raise DownloadError(f"{source or 'the official download'}: dataset {name!r} lacks {missing}; "
                                f"expected top-level entries {list(spec.markers)} (see {spec.homepage})")
        manifest["files"] = tree_files(tmp)
        write_json(tmp / MANIFEST, manifest)
    for path in fetched:  # the archives are unpacked; the cache only holds unfinished downloads
        path.unlink(missing_ok=True)
    return out_dir


def _dataset_done(out_dir: Path, origin: str, state: dict | None) -> bool:
    """An earlier run imported this source, unchanged since, and its files are all there."""
    manifest = _read_record(out_dir / MANIFEST)
    if manifest is None or manifest.get("source") != origin or manifest.get("source_state") != state:
        return False
    sizes = {rel: path.stat().st_size for rel, path in _walk_files(out_dir) if rel != MANIFEST}
    return sizes == {rel: entry.get("size") for rel, entry in manifest.get("files", {}).items()}


def _from_source(source: Path, spec: DatasetSource, tmp: Path, inputs: dict) -> None:
    by_name = {r.filename: r for r in spec.resources}
    entries = sorted(source.iterdir()) if source.is_dir() else [source]
    for entry in entries:
        resource = by_name.get(entry.name)
        if entry.is_dir():
            copy_tree(entry, tmp / entry.name)
        elif resource is not None or is_archive(entry):
            resource = resource or Resource(None, entry.name, None, extract=True)
            inputs[entry.name] = _record(entry, resource, str(entry))
            _unpack(entry, resource, tmp)
        else:
            clone_file(entry, tmp / entry.name)


def _record(path: Path, resource: Resource, origin: str | None) -> dict:
    return {"sha256": verify(path, resource.sha256), "verified": resource.sha256 is not None, "from": origin}


def _unpack(path: Path, resource: Resource, tmp: Path) -> None:
    """Extract an archive resource into ``tmp`` (through a fresh folder, then merged), or copy a file."""
    if resource.extract:
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=tmp))
        extract(path, staging)
        _merge(staging, tmp, path)
    else:
        clone_file(path, tmp / resource.filename)


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
                     random_init: bool = False, sha256: str | None = None,
                     cache_dir: Path = Path("data/downloads"), connect_timeout: float = CONNECT_TIMEOUT,
                     force: bool = False) -> Path:
    """Fill ``out_dir`` (``data/weights/<key>``) with the checkpoint of registry entry
    ``checkpoint`` (from its URL or from ``source``, a file or its folder) and ``weights.json``.

    ``sha256`` pins the file (param ``backbone.<key>.weights.sha256``): it must match, and
    must equal the registry's hash where there is one. A TorchScript file is refused unless
    its sha256 is an official file's (`pipeline.weights.check_torchscript`). A finished folder whose source and pin are unchanged is
    kept, unless ``force``. Weight-free backbones (``checkpoint`` None) and ``random_init``
    ones get only weights.json.
    """
    out_dir = Path(out_dir)
    param = f"backbone.{key}.weights"
    if checkpoint is None or random_init:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            write_json(tmp / "weights.json", {"file": None, "sha256": None, "source": None,
                                              "random_init": bool(random_init), "verified": False,
                                              "verified_by": "none"})
        return out_dir
    if checkpoint not in WEIGHTS:
        raise DownloadError(f"`{param}.checkpoint` = {checkpoint!r} is not in the weights registry; "
                            f"known: {sorted(WEIGHTS)}")
    resource = WEIGHTS[checkpoint]
    pin = _pin(sha256, resource, param)
    expected = resource.sha256 or pin
    verified_by = "registry" if resource.sha256 else "pin" if pin else "none"
    if source is None and resource.url is None:
        raise DownloadError(
            f"{checkpoint} weights are licence-gated and cannot be downloaded automatically: request "
            f"{resource.filename} at {DINOV3_DOWNLOADS}, then set `{param}.source` to that file (or its folder)")
    local = None if source is None else _local_checkpoint(Path(source), resource, f"{param}.source")
    origin = str(source) if source is not None else resource.url
    state = None if local is None else source_state(local, f"{param}.source")
    if not force and _weights_done(out_dir, resource.filename, origin, pin, state):
        console.print(f"{out_dir}: already complete ({origin}, unchanged since it was imported); "
                      "force (`semcorr download --force`) imports it again")
        return out_dir
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        target = tmp / resource.filename
        if local is None:
            os.replace(fetch(resource, Path(cache_dir) / "weights", f"{param}.source", connect_timeout), target)
        else:
            clone_file(local, target)  # hashed and checked as copied: the source may change meanwhile
        name = local or resource.url
        digest = verify(target, expected, name)
        if is_torchscript(target):
            try:
                check_torchscript(name, digest)
            except WeightsError as exc:
                raise DownloadError(str(exc)) from exc
        if verified_by == "none":
            _check_name_prefix(name, digest, resource)
        write_json(tmp / "weights.json", {
            "file": resource.filename, "sha256": digest, "size": target.stat().st_size, "source": origin,
            "source_state": state, "random_init": False, "pin": pin, "verified": verified_by != "none",
            "verified_by": verified_by})
    return out_dir


def _pin(sha256: str | None, resource: Resource, param: str) -> str | None:
    """The user's pin, lower-cased; it must be a sha256 and agree with the registry's."""
    if not sha256:
        return None
    pin = sha256.lower()
    if not SHA256.fullmatch(pin):
        raise DownloadError(f"`{param}.sha256` = {sha256!r} is not a sha256 (64 hex digits)")
    if resource.sha256 is not None and pin != resource.sha256:
        raise DownloadError(f"`{param}.sha256` = {pin} disagrees with the registry's sha256 {resource.sha256} "
                            f"of {resource.filename}; remove the pin or correct it")
    return pin


def _check_name_prefix(name: str | Path, digest: str, resource: Resource) -> None:
    """Meta names DINOv3 files after the first hex digits of their sha256: warn on a mismatch."""
    if resource.url is None and "-" in resource.filename:
        prefix = resource.filename.rsplit("-", 1)[1].split(".")[0]
        if not digest.startswith(prefix):
            console.print(f"[yellow]warning:[/] {name}: sha256 {digest} does not start with {prefix}, "
                          f"the hash prefix in the official name {resource.filename}")


def _weights_done(out_dir: Path, filename: str, origin: str | None, pin: str | None, state: dict | None) -> bool:
    """An earlier run imported this source with this pin, unchanged since, and its file is there."""
    record = _read_record(out_dir / "weights.json")
    if record is None or (record.get("file"), record.get("source"), record.get("pin"),
                          record.get("source_state")) != (filename, origin, pin, state):
        return False
    path = out_dir / filename
    return path.is_file() and path.stat().st_size == record.get("size")


def _local_checkpoint(source: Path, resource: Resource, param: str) -> Path:
    path = source / resource.filename if source.is_dir() else source
    if not path.is_file():
        raise DownloadError(f"`{param}` = {source}: {path} not found (expected {resource.filename})")
    return path


def _read_record(path: Path) -> dict | None:
    """The JSON record an earlier run wrote last, or None if there is none (or it is unreadable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
