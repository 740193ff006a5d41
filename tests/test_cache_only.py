"""match, evaluate and report (without pictures) read only the feature cache and tables:
run them in a fresh interpreter that refuses image readers, backbones and image files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_report import build_project

ROOT = Path(__file__).resolve().parents[1]

GUARD = textwrap.dedent(
    """
    import os, sys
    BLOCKED = ("PIL", "imageio", "skimage", "cv2", "matplotlib", "torchvision", "timm", "open_clip",
               "segment_anything", "semcorr.pipeline.backbones", "semcorr.pipeline.extract") + tuple(sys.argv[3:])
    IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
    violations = []

    def blocked(name):
        return any(name == b or name.startswith(b + ".") for b in BLOCKED)

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                violations.append("import " + name)
                raise ImportError("cache-only stage imported " + name)
            return None

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0]).lower()
            if path.endswith(IMAGE_SUFFIXES):
                violations.append("open " + path)
                raise PermissionError("cache-only stage opened an image: " + path)

    sys.meta_path.insert(0, Refuse())
    sys.addaudithook(audit)
    data = sys.argv[1]
    try:
        exec(sys.argv[2])
    finally:
        loaded = sorted(m for m in sys.modules if blocked(m))
        if violations or loaded:
            print("VIOLATIONS", violations, "LOADED", loaded)
            sys.exit(3)
    print("CLEAN")
    """
)

PRELUDE = textwrap.dedent(
    """
    from pathlib import Path
    data = Path(data)
    conf = {"argmax": {"upsample": 2, "mutual": True, "max_window": 3},
            "softargmax": {"window": 3, "temperature": 0.1, "zero_outside": False}}
    """
)
MATCH = PRELUDE + textwrap.dedent(
    """
    from semcorr.stages import match
    for method in ("argmax", "softargmax"):
        match.main("toy", "toy_bb", method, conf, "test", data_root=data)
    """
)
# evaluate and report run from tables alone: not even torch (nor zarr) may load
EVALUATE_REPORT = PRELUDE + textwrap.dedent(
    """
    from semcorr.stages import evaluate, report
    for method in ("argmax", "softargmax"):
        evaluate.main("toy", "toy_bb", method, [0.05, 0.1], "test", conf, data_root=data)
    report.main([("toy_bb", "toy", m) for m in ("argmax", "softargmax")], data, data.parent / "results",
                pictures_per_category=0, max_pair_pictures=0)
    """
)


def run_guarded(data: Path, code: str, *also_blocked: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", GUARD, str(data), code, *also_blocked], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return build_project(tmp_path_factory.mktemp("cache_only"), variants=("toy_bb",))


def test_match_evaluate_report_load_no_image_and_no_backbone(project):
    done = run_guarded(project, MATCH)
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stdout + done.stderr
    done = run_guarded(project, EVALUATE_REPORT, "torch", "zarr")
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stdout + done.stderr
    assert (project / "eval" / "toy_bb" / "toy" / "softargmax" / "metrics.json").is_file()
    assert (project.parent / "results" / "summary.csv").is_file()
    assert not any((project.parent / "results" / "pictures").iterdir())


@pytest.mark.parametrize(
    "sabotage",
    [
        "import semcorr.pipeline.backbones",
        "import torch",
        "from PIL import Image",
        "open(next(Path(data).parent.glob('images/*.png')), 'rb')",
        "import numpy; numpy.load(str(next(Path(data).parent.glob('images/*.png'))), allow_pickle=False)",
    ],
)
def test_the_guard_catches_a_stage_that_reads_an_image_or_backbone(project, sabotage):
    code = "from pathlib import Path\ntry:\n    " + sabotage + "\nexcept Exception:\n    pass\n"
    done = run_guarded(project, code, "torch")
    assert done.returncode == 3 and "VIOLATIONS" in done.stdout, done.stdout + done.stderr
