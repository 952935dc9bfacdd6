"""Regenerate every benchmark and stitch bench/results/*.md into bench/RESULTS.md.

    python bench/run_all.py                 # everything (under an hour on a 2-core machine)
    python bench/run_all.py --quick         # smaller settings where a script has them
    python bench/run_all.py --only speed    # one step (repeatable), then re-stitch everything
    python bench/run_all.py --stitch-only   # just rebuild RESULTS.md from bench/results/

Steps, in order (each a subprocess, ``python bench/<script>``; a missing script is reported
and skipped):

    lowrank      bench/lowrank.py                  -> bench/results/lowrank*.md
    pruning      bench/pruning.py                  -> bench/results/pruning*.md
    speed        bench/speed.py                    -> bench/results/speed.md + speed_*.png
    peer         bench/peer_onnxsim.py             -> bench/results/peer.md + peer.png
    linalg       bench/bench_linalg.py             -> bench/results/linalg.md
    calibration  bench/bench_calibration_memory.py -> bench/results/calibration_memory.md

Every step runs with one BLAS thread unless OPENBLAS_NUM_THREADS/OMP_NUM_THREADS are set
(on a small machine a multi-threaded BLAS next to onnxruntime's thread pool is many times
slower). ``--budget`` (default 3600 s) bounds the whole run: each step may use its share of
it (``SHARES``; time a step leaves unused goes to the next ones), a step still running at
its deadline is stopped and marked as timed out, and RESULTS.md says so (its older results,
if any, are kept and flagged as stale). The header lists wall and CPU time per step: on a
shared machine the wall time says more about the other jobs than about the benchmarks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
OUTPUT = HERE / "RESULTS.md"
LEDGER = RESULTS / "run_all.json"     # the last run of every step, and the last full run
sys.path.insert(0, str(HERE))

# name: (script, arguments, quick arguments, result files it writes (globs in bench/results))
STEPS = {
    "lowrank": ("lowrank.py", [], ["--quick"], ["lowrank*.md"]),
    "spatial": ("spatial_split.py", [], ["--quick"], ["spatial_split*.md"]),
    "pruning": ("pruning.py", [], ["--quick"], ["pruning*.md"]),
    "speed": ("speed.py", [], ["--quick"], ["speed.md"]),
    "peer": ("peer_onnxsim.py", [], ["--quick"], ["peer.md"]),
    "planner": ("planner.py", [], ["--quick"], ["planner.md"]),
    # speed.md already has the full width sweep (256 ... 4096); here the quality table matters
    "linalg": ("bench_linalg.py", ["--widths", "256", "512", "1024", "--out", "bench/results/linalg.md"],
               ["--widths", "256", "512", "--out", "bench/results/linalg.md"], ["linalg.md"]),
    "calibration": ("bench_calibration_memory.py",
                    ["--count", "100", "--batch-size", "32", "8", "--repeats", "1",
                     "--out", "bench/results/calibration_memory.md"],
                    ["--count", "48", "--batch-size", "16", "--repeats", "1",
                     "--out", "bench/results/calibration_memory.md"], ["calibration_memory.md"]),
}
# Share of the time budget each step may use; time a step leaves unused passes to the next.
SHARES = {"lowrank": 0.17, "spatial": 0.03, "pruning": 0.17, "speed": 0.17, "peer": 0.17, "planner": 0.23, "linalg": 0.02,
          "calibration": 0.04}
ORDER = list(STEPS)


def supports(script: Path, flag: str) -> bool:
    """Whether a script mentions ``flag`` (colleagues' scripts may not have --quick)."""
    try:
        return flag in script.read_text()
    except OSError:
        return False


def run_step(name: str, quick: bool, deadline: float) -> dict:
    script_name, args, quick_args, _ = STEPS[name]
    script = HERE / script_name
    if not script.exists():
        print(f"[run_all] {name}: bench/{script_name} does not exist (yet) -- skipped", file=sys.stderr, flush=True)
        return {"step": name, "status": f"skipped: bench/{script_name} missing", "seconds": 0.0}
    if quick:
        if quick_args == ["--quick"] and not supports(script, "--quick"):
            print(f"[run_all] {name}: bench/{script_name} has no --quick; running it in full", file=sys.stderr)
            quick_args = []
        args = quick_args
    cmd = [sys.executable, str(script), *args]
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    shown = "python bench/" + " ".join([script_name, *args])
    remaining = deadline - time.time()
    if remaining <= 0:
        print(f"[run_all] {name}: no time left in the budget -- not run", file=sys.stderr, flush=True)
        return {"step": name, "command": shown, "status": "not run: budget spent", "seconds": 0.0}
    print(f"[run_all] {name}: {shown}  (at most {remaining / 60:.0f} min left)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # own process group, so a timed-out step is stopped with every process it started
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=remaining)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        status = "timed out (budget spent)"
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    seconds = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"[run_all] {name}: {status} in {seconds:.0f} s (CPU {cpu:.0f} s)", file=sys.stderr, flush=True)
    return {"step": name, "command": shown, "status": status, "seconds": seconds, "cpu": cpu}


# --------------------------------------------------------------------------------------
# stitching


def result_files() -> list[Path]:
    """bench/results/*.md: the known steps' files first, in step order, then any others."""
    seen, files = set(), []
    for name in ORDER:
        for pattern in STEPS[name][3]:
            for path in sorted(RESULTS.glob(pattern)):
                if path not in seen:
                    seen.add(path)
                    files.append(path)
    for path in sorted(RESULTS.glob("*.md")):
        if path not in seen:
            files.append(path)
    return files


def owner(path: Path) -> str | None:
    for name in ORDER:
        if any(path.match(pattern) for pattern in STEPS[name][3]):
            return name
    return None


def relink(text: str) -> str:
    """Links relative to bench/results/ become relative to bench/ (RESULTS.md's folder)."""
    def fix(match):
        target = match.group(2)
        if re.match(r"^[a-z]+:|^/|^#", target) or "/" in target.split("#")[0] and not target.startswith("./"):
            return match.group(0)
        return f"{match.group(1)}(results/{target.removeprefix('./')})"
    return re.sub(r"(\]\s*)\(([^)\s]+)\)", fix, text)


def demote(text: str) -> str:
    """Headings one level down (each file's '#' title becomes a '##' section)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"^#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


def strip_raw(text: str) -> str:
    """Drop <details> blocks (raw JSON dumps); they stay in the individual files."""
    return re.sub(r"<details>.*?</details>\s*", "", text, flags=re.S)


def update_ledger(runs: list[dict], *, command: str, started: datetime.datetime, wall: float,
                  quick: bool) -> dict:
    """Record this run's steps in bench/results/run_all.json (kept across runs, so RESULTS.md
    can say when and how long each step last ran, and what the last full run took)."""
    try:
        ledger = json.loads(LEDGER.read_text())
    except (OSError, ValueError):
        ledger = {}
    steps = ledger.setdefault("steps", {})
    for r in runs:
        if not r["status"].startswith("skipped"):
            steps[r["step"]] = {**r, "date": started.strftime("%Y-%m-%d %H:%M"), "quick": quick}
    if {r["step"] for r in runs} >= set(ORDER) and not quick:
        ledger["last_full_run"] = {"command": command, "date": started.strftime("%Y-%m-%d %H:%M"),
                                   "wall": wall, "ok": all(r["status"] == "ok" for r in runs)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    LEDGER.write_text(json.dumps(ledger, indent=1) + "\n")
    return ledger


def stitch(runs: list[dict], *, command: str, started: datetime.datetime, wall: float, quick: bool) -> Path:
    from common import machine

    files = result_files()
    run_names = {r["step"] for r in runs}
    lines = [
        "# onnxprune benchmark results",
        "",
        f"- Machine: {machine()}; load average now {os.getloadavg()[0]:.1f} "
        "(the machine may be shared: compare ratios measured within one run, not absolute seconds "
        "across runs)",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M')} (UTC offset {started.strftime('%z') or 'local'})",
        f"- Command: `{command}`" + (" (quick settings)" if quick else ""),
        f"- Total wall time: {wall / 60:.1f} min",
        "- Regenerate: `python bench/run_all.py` (everything), `--quick`, `--only NAME` "
        f"(NAME in {', '.join(ORDER)}), `--stitch-only`",
        "",
        "| step | command | status | wall time | CPU time (all processes) |",
        "|---|---|---|---:|---:|",
    ]
    ledger = update_ledger(runs, command=command, started=started, wall=wall, quick=quick)
    full = ledger.get("last_full_run")
    if full:
        lines[5:5] = [f"- Last full run (every step, one command `{full['command']}`): {full['date']}, "
                      f"{full['wall'] / 60:.1f} min wall, {'all steps ok' if full['ok'] else 'some steps failed'}"]
    for name in ORDER:
        r = next((x for x in runs if x["step"] == name), None)
        if r is None:
            last = ledger.get("steps", {}).get(name)
            if last:
                cpu = f"{last['cpu'] / 60:.1f} min" if "cpu" in last else "—"
                lines.append(f"| {name} | `{last.get('command', 'python bench/' + STEPS[name][0])}` | not run now; "
                             f"last run {last['date']}: {last['status']} | {last['seconds'] / 60:.1f} min | {cpu} |")
            else:
                lines.append(f"| {name} | python bench/{STEPS[name][0]} | not run | — | — |")
        else:
            cpu = f"{r['cpu'] / 60:.1f} min" if "cpu" in r else "—"
            lines.append(f"| {name} | `{r.get('command', 'python bench/' + STEPS[name][0])}` | {r['status']} | "
                         f"{r['seconds'] / 60:.1f} min | {cpu} |")
    stale = [p for p in files if owner(p) in run_names and p.stat().st_mtime < started.timestamp()
             and not next(r for r in runs if r["step"] == owner(p))["status"] == "ok"]
    if stale:
        lines += ["", "Stale (the step that writes them did not finish this time; older numbers): "
                  + ", ".join(f"`{p.name}`" for p in stale)]
    pngs = sorted(RESULTS.glob("*.png"))
    if pngs:
        lines += ["", "Plots: " + ", ".join(f"[{p.stem}](results/{p.name})" for p in pngs)]
    lines += ["", "Sections: " + ", ".join(f"[{p.stem}](results/{p.name})" for p in files), ""]
    for path in files:
        body = demote(relink(strip_raw(path.read_text())))
        lines += ["---", "", f"<!-- from bench/results/{path.name} -->", "", body.strip(), ""]
    OUTPUT.write_text("\n".join(lines).rstrip() + "\n")
    return OUTPUT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=ORDER, metavar="NAME",
                        help=f"run only this step (repeatable): {', '.join(ORDER)}")
    parser.add_argument("--quick", action="store_true", help="smaller settings where a script has them")
    parser.add_argument("--stitch-only", action="store_true", help="do not run anything; rebuild RESULTS.md")
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds for the whole run (default 3600)")
    args = parser.parse_args(argv)

    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    command = "python bench/run_all.py" + (f" {argv_text}" if argv_text else "")
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    deadline = time.time() + args.budget
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = []
    if not args.stitch_only:
        todo = [n for n in ORDER if n in (args.only or ORDER)]
        present = [n for n in todo if (HERE / STEPS[n][0]).exists()]
        total_share = sum(SHARES[n] for n in present) or 1.0
        start, cumulative = time.time(), 0.0
        for name in todo:
            if name in present:
                cumulative += SHARES[name] / total_share
            # this step may run until its cumulative share of the budget is used up
            runs.append(run_step(name, args.quick, min(deadline, start + args.budget * cumulative)))
    wall = time.perf_counter() - t0
    path = stitch(runs, command=command, started=started, wall=wall, quick=args.quick)
    print(f"[run_all] wrote {path.relative_to(ROOT)} ({wall / 60:.1f} min)", file=sys.stderr)
    failed = [r for r in runs if r["status"] != "ok" and not r["status"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
