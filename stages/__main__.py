"""`python -m stages <stage> ...`: `semcorr <stage>` running THIS repository's code.

dvc.yaml runs every stage this way, from the repository root, so the code that runs is
the code DVC hashes (the `pipeline/` and `stages/` files it lists as deps) — in the
project, in a `semcorr workspace` and in a queued experiment's temporary clone alike —
whatever `semcorr` package the environment has installed.
"""

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_package(name: str, folder: Path) -> None:
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


if "semcorr" not in sys.modules:
    init = ROOT / "semcorr" / "__init__.py"  # the package's lazy descriptor API (a workspace copy has none)
    if init.is_file():
        spec = importlib.util.spec_from_file_location("semcorr", init, submodule_search_locations=[])
        namespace = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(namespace)
    else:
        namespace = types.ModuleType("semcorr")
    namespace.__path__ = []  # subpackages are registered below, never searched for
    sys.modules["semcorr"] = namespace
for package in ("pipeline", "stages"):
    _load_package(f"semcorr.{package}", ROOT / package)
    setattr(sys.modules["semcorr"], package, sys.modules[f"semcorr.{package}"])

from semcorr.stages.cli import main  # noqa: E402

main()
