"""Run every benchmark script and print one summary as a Markdown table, ready to paste into the README.

Each script runs in its own process (so one's threads, caches and hooks cannot skew another's timings)
with ``--json`` to hand its rows back; their own tables are printed as they go. The summary lists every
figure with its target and PASS/FAIL, how long each script took, and the machine.

    python bench/run_all.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import Row, load_rows, machine, markdown_table

SCRIPTS = ("bench_gradcam.py", "bench_cam.py", "bench_step.py", "bench_actmax.py", "bench_deepdream.py",
           "bench_metrics.py", "bench_output.py", "bench_async.py")
HERE = Path(__file__).resolve().parent


def run_script(script: str, extra: list[str]) -> tuple[list[Row], float, int]:
    """Run one script; returns its rows, its wall time and its exit code."""
    with tempfile.TemporaryDirectory(prefix="bench_rows_") as tmp:
        out = os.path.join(tmp, "rows.json")
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / script), "--json", out, *extra])
        elapsed = time.perf_counter() - start
        rows = load_rows(out) if code == 0 and os.path.exists(out) else []
    return rows, elapsed, code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every script")
    p.add_argument("--threads", type=int, help="pass --threads N to every script")
    args = p.parse_args(argv)
    extra = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    info = machine()  # load average before the runs
    rows: list[Row] = []
    durations = []
    failed = []
    for script in SCRIPTS:
        print(f"\n=== {script} {' '.join(extra)}", flush=True)
        script_rows, elapsed, code = run_script(script, extra)
        durations.append(f"{script} {elapsed:.0f} s" + ("" if code == 0 else f" (exit code {code})"))
        if code != 0:
            failed.append(script)
        rows += script_rows
    after = machine()["load average (1 min)"]

    judged = [r for r in rows if r.passed is not None]
    print("\n## Benchmarks" + (" (--quick: smoke run, not representative)" if args.quick else ""))
    print(f"\nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch threads']} threads), "
          f"Python {info['python']}; load average {info['load average (1 min)']} before, {after} after.")
    print(f"Script times: {'; '.join(durations)}.")
    print(f"Targets met: {sum(r.passed for r in judged)} of {len(judged)}.\n")
    print(markdown_table(rows))
    if failed:
        print(f"\nscripts that failed to run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
