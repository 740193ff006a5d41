"""The DVC DAG in a real temp git + DVC workspace, judged from DVC's own output: the full
demo, a no-op repro, exact param deps (one table), queued experiments that re-run only
what changed, checkout and push/pull that restore without recomputing, readable
metrics and plots, and the workspace running the code DVC hashes. The tests build on
each other and run in file order."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from semcorr.stages import workspace

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The demo, made smaller: fewer synthetic images and one epoch.
SMALL = [
    "download.synthetic.categories=2",
    "download.synthetic.images_per_category=6",
    "finetune.epochs=1",
    "finetune.milestones=[1]",
    "head.epochs=2",
    "head_backbones=[daisy]",
    "report.max_pair_pictures=1",
    "report.pictures_per_category=1",
]
ALL_GROUPS = {"download", "weights", "prepare", "extract", "finetune", "extract_tuned", "match", "match_tuned",
              "softargmax", "softargmax_tuned", "tune", "tune_tuned", "valtuned", "valtuned_tuned", "evaluate",
              "evaluate_tuned", "keypoints", "sparse", "download_video", "prepare_video", "extract_video", "propagate",
              "video_eval", "head", "head_apply", "match_head", "softargmax_head", "evaluate_head", "report"}
READ_STORES = ("match", "match_tuned", "tune", "tune_tuned", "valtuned", "valtuned_tuned",  # check its attrs
               "match_lora", "tune_lora", "valtuned_lora", "sparse", "propagate", "head", "head_apply", "match_head")


def dvc(ws: Path, *args: str, columns: int | None = None, check: bool = True,
        aws: dict | None = None) -> subprocess.CompletedProcess:
    """``aws``: the AWS environment of an S3 remote (credentials never go into .dvc/config)."""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(ws.parent), "DVC_NO_ANALYTICS": "1", "LANG": "C.UTF-8",
           **(aws or {})}
    if columns:
        env["COLUMNS"] = str(columns)
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=ws, env=env, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def repro(ws: Path, *args: str) -> set[str]:
    """Run `dvc repro`; return the names of the stages that ran."""
    return ran(dvc(ws, "repro", *args).stdout)


def groups(stage_names: set[str]) -> set[str]:
    return {name.split("@")[0] for name in stage_names}


def edit_params(ws: Path, change) -> None:
    path = ws / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def status(ws: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    return set(json.loads(dvc(ws, "status", "--json").stdout or "{}"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return workspace.main(tmp_path_factory.mktemp("dvc") / "demo", ROOT / "configs" / "demo.yaml", SMALL)


def test_full_demo_repro(ws):
    assert groups(repro(ws)) == ALL_GROUPS
    summary = (ws / "results" / "summary.csv").read_text()
    for variant in ("daisy", "tinyvit", "tinyvit_ft2", "daisy_head"):
        assert variant in summary
    # pose alignment (no masks in the synthetic set: the whole image) and the head, each with its paired CI
    text = (ws / "results" / "summary.md").read_text()
    assert "| daisy | argmax | flip |" in text and "whole image (no masks)" in text
    assert "Geometry-aware subset (GeoAware-SC): not defined for this dataset (the synthetic keypoints" in text
    compared = {(r["comparison"], r["variant"], r["method"]) for r in csv.DictReader(
        (ws / "results" / "comparisons.csv").open())}
    assert {("head − baseline", "daisy_head", "argmax"), ("pose-aligned − unaligned", "daisy", "argmax")} <= compared
    # the synthetic video, propagated from the cache: DAISY tracks it far better than copying frame 0
    video = {r["variant"]: r for r in csv.DictReader((ws / "results" / "video.csv").open())}
    assert set(video) == {"daisy", "tinyvit"} and {r["dataset"] for r in video.values()} == {"synthvideo"}
    daisy = {k: float(v) for k, v in video["daisy"].items() if k.startswith(("jf_mean", "copy_", "pck@0.1"))}
    assert daisy["jf_mean"] > daisy["copy_jf_mean"] + 0.2 and daisy["pck@0.1"] > daisy["copy_pck@0.1"] + 0.2, daisy
    assert daisy["jf_mean_low"] <= daisy["jf_mean"] <= daisy["jf_mean_high"]
    assert "## Video label propagation" in (ws / "results" / "summary.md").read_text()
    compact = json.loads((ws / "results" / "metrics.json").read_text())
    assert set(compact["daisy"]["synthvideo"]["propagation"]) == {"jf_mean", "pck@0.1"}
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "demo results")
    assert git(ws, "status", "--porcelain") == ""


def test_noop_repro_runs_nothing(ws):
    assert repro(ws) == set()
    assert status(ws) == set()


def test_outputs_are_links_into_the_cache(ws):
    """No second copy of a feature store: its files are links to DVC's cache (hardlinks here)."""
    store = ws / "data" / "features" / "tinyvit" / "synthetic.zarr"
    shards = [f for f in (store / "feats" / "c").rglob("*") if f.is_file()]
    assert shards and all(f.stat().st_nlink >= 2 or f.is_symlink() for f in shards)
    cached = {f.stat().st_ino for f in (ws / ".dvc" / "cache").rglob("*") if f.is_file()}
    assert all(f.stat().st_ino in cached for f in shards)


# -- exact deps -------------------------------------------------------------------------------
# What each stage group reads, by params key prefix; `item` is the stage's matrix item.
EVALUATES = ("evaluate", "evaluate_tuned", "evaluate_lora", "evaluate_head")
READERS = {
    "download.": lambda group, item, key: (group in ("download", "download_video")
                                           and key.split(".")[1] == item["dataset"]),
    "backbone.": lambda group, item, key: (
        (group == "weights" and key.split(".")[2] == "weights" and item["backbone"] == key.split(".")[1])
        or (key.split(".")[2] == "model" and key.split(".")[1] == item.get("backbone", item.get("variant"))
            and group in ("extract", "finetune", "extract_tuned", "finetune_lora", "extract_lora", "extract_video",
                          *READ_STORES))),
    "extract.flips": lambda group, item, key: group in ("extract", "extract_tuned", "extract_lora", "extract_video",
                                                        *READ_STORES),
    "extract.": lambda group, item, key: group in ("extract", "extract_tuned", "extract_lora", "extract_video"),
    "finetune.train_dataset": lambda group, item, key: group in ("finetune", "finetune_lora", "tune", "tune_tuned",
                                                                 "tune_lora"),
    "finetune.": lambda group, item, key: group in ("finetune", "finetune_lora"),
    "lora.": lambda group, item, key: group == "finetune_lora",
    "head.": lambda group, item, key: group == "head",
    "sparse.detect.": lambda group, item, key: group == "keypoints",
    "sparse.match.": lambda group, item, key: group == "sparse",
    "match.argmax.": lambda group, item, key: group in (
        "match", "match_tuned", "softargmax", "softargmax_tuned", "valtuned", "valtuned_tuned", "match_lora",
        "softargmax_lora", "valtuned_lora", "match_head", "softargmax_head", *EVALUATES),
    "match.softargmax.": lambda group, item, key: group in ("softargmax", "softargmax_tuned", "softargmax_lora",
                                                            "softargmax_head") or (
        group in EVALUATES and item["method"] == "softargmax"),
    "match.valtuned.": lambda group, item, key: group in ("tune", "tune_tuned", "valtuned", "valtuned_tuned",
                                                           "tune_lora", "valtuned_lora") or (
        group in EVALUATES and item["method"] == "valtuned"),
    "evaluate.split": lambda group, item, key: group in (
        "match", "match_tuned", "softargmax", "softargmax_tuned", "valtuned", "valtuned_tuned", "match_lora",
        "softargmax_lora", "valtuned_lora", "match_head", "softargmax_head", "keypoints", *EVALUATES),
    "evaluate.bootstrap.": lambda group, item, key: group in (*EVALUATES, "video_eval", "report"),
    "evaluate.": lambda group, item, key: group in EVALUATES,
    "propagate.": lambda group, item, key: group in ("propagate", "video_eval"),  # video_eval checks the record
    "report.": lambda group, item, key: group == "report",
    "launch.": lambda group, item, key: False,  # how extract runs, not what: listed by no stage
}
MATRIX = {  # matrix keys of each group, in dvc.yaml order (stage names join their values with '-')
    "download": ["dataset"], "weights": ["backbone"], "prepare": ["dataset"], "extract": ["dataset", "backbone"],
    "finetune": ["backbone", "depth"], "extract_tuned": ["dataset", "backbone", "depth"],
    "match": ["dataset", "variant"], "match_tuned": ["dataset", "backbone", "depth"],
    "softargmax": ["dataset", "variant"], "softargmax_tuned": ["dataset", "backbone", "depth"],
    "tune": ["dataset", "variant"], "tune_tuned": ["dataset", "backbone", "depth"],
    "valtuned": ["dataset", "variant"], "valtuned_tuned": ["dataset", "backbone", "depth"],
    "evaluate": ["dataset", "variant", "method"], "evaluate_tuned": ["dataset", "backbone", "depth", "method"],
    "finetune_lora": ["backbone", "rank"], "extract_lora": ["dataset", "backbone", "rank"],
    "match_lora": ["dataset", "backbone", "rank"], "softargmax_lora": ["dataset", "backbone", "rank"],
    "tune_lora": ["dataset", "backbone", "rank"], "valtuned_lora": ["dataset", "backbone", "rank"],
    "evaluate_lora": ["dataset", "backbone", "rank", "method"],
    "keypoints": ["dataset"], "sparse": ["dataset", "variant"],
    "download_video": ["dataset"], "prepare_video": ["dataset"], "extract_video": ["dataset", "backbone"],
    "propagate": ["dataset", "variant"], "video_eval": ["dataset", "variant"],
    "head": ["backbone"], "head_apply": ["dataset", "backbone"], "match_head": ["dataset", "backbone"],
    "softargmax_head": ["dataset", "backbone"], "evaluate_head": ["dataset", "backbone", "method"],
    "report": [],
}


def leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "arch":
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + value[-1:] if value else [1]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    return "changed"


def expected_readers(key: str, stage_names: set[str]) -> set[str]:
    rule = next(rule for prefix, rule in READERS.items() if key.startswith(prefix))
    out = set()
    for name in stage_names:
        group, _, values = name.partition("@")
        item = dict(zip(MATRIX[group], values.split("-"))) if values else {}
        if rule(group, item, key):
            out.add(name)
    return out


def test_each_param_key_is_read_by_exactly_its_stages(ws):
    """Change one key at a time: `dvc status` lists exactly the stages that read it."""
    original = (ws / "params.yaml").read_text()
    params = yaml.safe_load(original)
    stage_names = set(dvc(ws, "stage", "list", "--name-only").stdout.split())
    sections = {k: v for k, v in params.items() if isinstance(v, dict)}  # top-level lists shape the DAG itself
    keys = list(leaves(sections))
    assert len(keys) > 40
    mismatches = []
    params_status = ParamsStatus(ws)
    assert params_status.deps and not params_status()
    try:
        for key, value in keys:
            edit_params(ws, lambda p: _assign(p, key, changed(value)))
            got, want = params_status(), expected_readers(key, stage_names)
            if got != want:
                mismatches.append(f"{key}: dvc status {sorted(got)}, stages that read it {sorted(want)}")
            (ws / "params.yaml").write_text(original)
    finally:
        (ws / "params.yaml").write_text(original)
        params_status.repo.close()
    assert not mismatches, "\n".join(mismatches)
    assert status(ws) == set()


class ParamsStatus:
    """The stages whose params DVC's own check (`ParamsDependency.workspace_status`, what
    `dvc status` reports for params) finds changed against dvc.lock: the stages are loaded
    once, not once per key, as a `dvc status` per key would."""

    def __init__(self, ws: Path):
        from dvc.dependency.param import ParamsDependency

        self.repo = Repo(str(ws))
        self.deps = [(stage.addressing.rpartition("dvc.yaml:")[2],
                      [d for d in stage.deps if isinstance(d, ParamsDependency)]) for stage in self.repo.index.stages]

    def __call__(self) -> set[str]:
        return {name for name, deps in self.deps if any(d.workspace_status() for d in deps)}


def _assign(params: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value


def test_moving_a_checkpoint_source_reruns_only_the_weights_stage(ws):
    edit_params(ws, lambda p: p["backbone"]["tinyvit"]["weights"].update(source="/elsewhere/model.pth"))
    try:
        assert status(ws) == {"weights@tinyvit"}
    finally:
        git(ws, "checkout", "params.yaml")


# -- experiments --------------------------------------------------------------------------------


def test_queued_match_variant_reruns_only_match_evaluate_report(ws):
    dvc(ws, "exp", "run", "--queue", "-n", "soft005", "-S", "match.softargmax.temperature=0.05")
    dvc(ws, "exp", "run", "--run-all", "-j", "1")
    log = dvc(ws, "queue", "logs", "soft005").stdout
    assert "softargmax@synthetic-tinyvit" in ran(log)
    assert groups(ran(log)) == {"softargmax", "softargmax_tuned", "softargmax_head", "evaluate", "evaluate_tuned",
                                "evaluate_head", "report"}, log
    shown = json.loads(dvc(ws, "exp", "show", "--json").stdout)
    assert "soft005" in json.dumps(shown)


def test_exp_apply_and_checkout_restore_outputs_without_recomputing(ws):
    metrics = ws / "data" / "eval" / "tinyvit" / "synthetic" / "softargmax" / "metrics.json"
    baseline = metrics.read_text()
    dvc(ws, "exp", "apply", "soft005")
    assert yaml.safe_load((ws / "params.yaml").read_text())["match"]["softargmax"]["temperature"] == 0.05
    assert metrics.read_text() != baseline
    applied = (ws / "data" / "predictions" / "tinyvit" / "synthetic" / "softargmax" / "predictions.parquet").read_bytes()
    assert status(ws) == set() and repro(ws) == set()
    git(ws, "checkout", "--", ".")
    dvc(ws, "checkout")
    assert metrics.read_text() == baseline
    assert (ws / "data" / "predictions" / "tinyvit" / "synthetic" / "softargmax" / "predictions.parquet").read_bytes() != applied
    assert status(ws) == set() and repro(ws) == set()


def test_push_then_pull_into_a_fresh_clone_gives_a_noop_repro(ws, tmp_path):
    remote = tmp_path / "remote"
    dvc(ws, "remote", "add", "--local", "-d", "store", str(remote))
    dvc(ws, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    dvc(clone, "remote", "add", "--local", "-d", "store", str(remote))
    dvc(clone, "pull")
    assert (clone / "data" / "features" / "tinyvit_ft2" / "synthetic.zarr" / "zarr.json").is_file()
    assert status(clone) == set() and repro(clone) == set()


@pytest.mark.slow
def test_push_to_s3_then_pull_into_a_fresh_clone_gives_a_noop_repro(ws, tmp_path, s3_server, bucket):
    """The same round trip through an S3 remote (dvc-s3) on moto's server on 127.0.0.1
    (tests/conftest.py): the endpoint and credentials come from the AWS environment, so
    .dvc/config names only the bucket."""
    url = f"s3://{bucket}/dvc-cache"
    dvc(ws, "remote", "add", "--local", "s3store", url)
    dvc(ws, "push", "-r", "s3store", aws=s3_server.env)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    dvc(clone, "remote", "add", "--local", "s3store", url)
    dvc(clone, "pull", "-r", "s3store", aws=s3_server.env)
    assert (clone / "data" / "features" / "tinyvit_ft2" / "synthetic.zarr" / "zarr.json").is_file()
    assert status(clone) == set() and repro(clone) == set()
    assert "testing" not in (clone / ".dvc" / "config.local").read_text()


def test_a_rerun_never_writes_through_a_link_into_the_cache(ws):
    """Re-extracting with linked (read-only, hard-linked) outputs in place leaves every cache
    object intact: its content still hashes to its name."""
    edit_params(ws, lambda p: p["extract"].update(batch_size=4))
    try:
        assert {"extract@synthetic-daisy", "extract@synthetic-tinyvit"} <= repro(ws, "extract@synthetic-tinyvit",
                                                                                  "extract@synthetic-daisy")
    finally:
        git(ws, "checkout", "params.yaml")
    repro(ws)
    cache = ws / ".dvc" / "cache" / "files" / "md5"
    bad = [f for f in cache.rglob("*") if f.is_file() and not f.name.endswith(".dir")
           and hashlib.md5(f.read_bytes()).hexdigest() != f.parent.name + f.name]
    assert not bad
    assert status(ws) == set()


# -- readable exp show, metrics, plots --------------------------------------------------------


def test_metrics_are_numbers_and_diff_shows_only_metrics(ws):
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    values = [v for rev in shown.values() for f in rev["data"].values() for v in _flat(f["data"]).values()]
    assert values and all(isinstance(v, (int, float)) for v in values if v is not None)
    diff = json.loads(dvc(ws, "metrics", "diff", "soft005", "--json").stdout)
    keys = {k for changes in diff.values() for k in changes}
    assert keys and all(re.search(r"(^|\.)(geo_)?(pck_(img|pt)@[\d.]+(_lo|_hi)?|mutual_reliable|n_\w+|val_pck|loss|lr|step)$", k)
                        for k in keys), keys


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("recipe, columns", [(0, 80), (1, 200)])
def test_readme_exp_show_recipes_show_pck_columns(ws, recipe, columns):
    """The README's two `dvc exp show` recipes, on the terminal width each is given for:
    every header and value shows in full (nothing cut to '…')."""
    recipes = re.findall(r"`dvc exp show ([^`]+)`", (ROOT / "README.md").read_text())
    out = dvc(ws, "exp", "show", "--no-pager", *shlex.split(recipes[recipe]), columns=columns).stdout
    assert "soft005" in out and "pck_img@0.1" in out and "…" not in out, out
    assert max(len(line) for line in out.splitlines()) <= columns
    assert out.count("pck_img@0.1") == recipe + 1  # one evaluation at 80 columns, two at 200


def test_plots_render_offline_with_a_bar_chart_and_the_pictures(ws):
    dvc(ws, "plots", "show", "--json")  # every declared plot parses
    dvc(ws, "plots", "diff", "soft005", "-o", "dvc_plots")
    page = (ws / "dvc_plots" / "index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # nothing fetched from the network
    assert "window.vegaEmbed" in page and '"mark": {"type": "bar"' in page.replace("\n", "")
    assert '"pck_img"' in page and "all \\u00b7 tinyvit_ft2" in page  # the bars' data, JSON-escaped
    assert re.search(r"<img[^>]+charts", page) and re.search(r"<img[^>]+pictures", page)
    assert "dvc_plots" not in git(ws, "status", "--porcelain")  # generated: ignored


# -- the code that runs is the code DVC hashes -------------------------------------------------


def test_the_workspace_runs_its_own_code(ws):
    """An edit of the workspace's copy is what DVC sees and what runs: both ways."""
    report_py, summary_py = ws / "stages" / "report.py", ws / "pipeline" / "summary.py"
    originals = {report_py: report_py.read_text(), summary_py: summary_py.read_text()}
    edits = {report_py: ("PCK@0.1 per image (%) [95% interval]", "EDITED IN THE WORKSPACE ["),
             summary_py: ('"# semcorr summary"', '"# semcorr summary (workspace edit)"')}
    for path, (old, new) in edits.items():
        assert old in originals[path]
        path.write_text(originals[path].replace(old, new))
    try:
        assert groups(status(ws)) == {"report"}  # the only stage with either file as a dep
        out = dvc(ws, "repro").stdout
        assert "EDITED IN THE WORKSPACE" in out
        assert "(workspace edit)" in (ws / "results" / "summary.md").read_text()
    finally:
        for path, text in originals.items():
            path.write_text(text)
    assert groups(repro(ws)) <= {"report"}
    assert status(ws) == set()


def test_a_refresh_commits_only_code_and_params_and_reports_the_rest(ws, capfd):
    dvc(ws, "exp", "apply", "soft005")  # a dirty workspace: the experiment's params, lock and metrics
    head = git(ws, "rev-parse", "HEAD").strip()
    workspace.main(ws, ROOT / "configs" / "demo.yaml", SMALL + ["match.softargmax.window=2"])
    committed = set(git(ws, "diff", "--name-only", head, "HEAD").split())
    assert committed == {"params.yaml"}
    assert "left uncommitted" in capfd.readouterr().err
    assert "dvc.lock" in git(ws, "status", "--porcelain")
    git(ws, "reset", "-q", "--hard", head)
    dvc(ws, "checkout", "--force")
