"""Start-up time of the CLI, the cost every DVC stage pays before it works.

Times `semcorr --help`, `semcorr evaluate --help` and `semcorr match --help` (the
median of ``--runs`` runs each) against `python -c pass`, and prints the seconds, the
ratio to `python -c pass`, and the targets (evaluate <= 1.0 s, match <= 1.5 s).

    .venv/bin/python benchmarks/cli_startup.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEMCORR = str(Path(sys.executable).with_name("semcorr"))
TARGETS = {"semcorr evaluate --help": 1.0, "semcorr match --help": 1.5}


def seconds(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "semcorr --help": [SEMCORR, "--help"],
        "semcorr evaluate --help": [SEMCORR, "evaluate", "--help"],
        "semcorr match --help": [SEMCORR, "match", "--help"],
    }
    base = None
    print(f"CLI start-up, median of {args.runs} runs")
    for name, cmd in commands.items():
        took = seconds(cmd, args.runs)
        base = base or took
        target = TARGETS.get(name)
        verdict = "" if target is None else f"   target <= {target:.1f} s: {'met' if took <= target else 'NOT met'}"
        print(f"  {name:<26} {took:6.3f} s   {took / base:5.1f}x python -c pass{verdict}")


if __name__ == "__main__":
    main()
