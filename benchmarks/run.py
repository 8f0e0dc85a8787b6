"""`make bench`: run every ``benchmarks/bench_*.py`` section and write ``benchmarks/results.md`` / ``.json``.

    python benchmarks/run.py                    # all sections (distill, losses, … cache, others, engines last)
    python benchmarks/run.py --quick            # smoke run: small shapes, few rounds
    python benchmarks/run.py --only distill --only losses   # reruns those sections, keeps the others

A section is a module with ``run(quick: bool = False) -> dict`` returning
``{"section": str, "rows": [{"metric", "value", "unit", "target", "met", "note"}]}``. A section that
raises (or returns something else) is recorded with its error and the others still run; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

ORDER = ["distill", "losses", "generate", "compiled", "server", "data", "cache"]  # then any other bench_*.py, alphabetically,
LAST = ["engines"]  # then these: llama.cpp against this project (builds llama.cpp once, ~10 min)
ROW_KEYS = ("metric", "value", "unit", "target", "met", "note")


def discover(bench_dir: Path) -> dict[str, Path]:
    """``{name: file}`` for ``bench_<name>.py`` in ``bench_dir``, in report order."""
    found = {p.stem.removeprefix("bench_"): p for p in sorted(bench_dir.glob("bench_*.py"))}
    names = ([n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER + LAST)
             + [n for n in LAST if n in found])
    return {n: found[n] for n in names}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result) -> dict:
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise TypeError(f"run() must return {{'section': str, 'rows': [...]}}, got {type(result).__name__}")
    for row in result["rows"]:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise TypeError(f"row {row!r} lacks {missing}")
    return result


def run_section(name: str, path: Path, quick: bool) -> dict:
    """Import and run one section; never raises (the error is recorded instead)."""
    t0 = time.perf_counter()
    entry = {"name": name, "file": str(path), "section": name, "rows": [], "error": None}
    try:
        result = _check(_load(name, path).run(quick=quick))
        entry.update(section=str(result.get("section") or name), rows=result["rows"])
    except Exception as e:  # a broken section must not hide the others
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc(limit=-6)
    except KeyboardInterrupt:
        entry["error"] = "interrupted"
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return entry


def merge(previous: dict | None, results: dict) -> dict:
    """``--only`` reruns replace their sections in the previous results and keep the others (each
    section carries the date it ran); a full run, or a quick/full mismatch, starts afresh."""
    if not previous or previous.get("quick") != results["quick"]:
        return results
    fresh = {s["name"]: s for s in results["sections"]}
    sections = [fresh.pop(s["name"], s) for s in previous.get("sections", [])] + list(fresh.values())
    return {**results, "sections": sections}


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"{m['date']} · {m['cpu']} · {m['cpu_count']} CPUs ({m['cpus_usable']} usable, torch threads "
        f"{m['torch_threads']}) · device {m['device']} · torch {m['torch']} · Python {m['python']} · "
        f"GLIBC_TUNABLES={m['glibc_tunables'] or '(unset)'}" + (" · **quick run**" if results["quick"] else ""),
        "",
        "Compared things are measured side by side in one process, interleaved; values are medians.",
        "",
    ]
    for s in results["sections"]:
        when = f", run {s['date']}" if s.get("date") else ""
        lines += [f"## {s['section']}", "", f"`{Path(s['file']).name}`, {s['seconds']} s{when}", ""]
        if s["error"]:
            lines += [f"**FAILED**: `{_cell(s['error'])}`", ""]
        if s["rows"]:
            lines += ["| metric | value | unit | target | met | note |", "|---|---:|---|---|:-:|---|"]
            for r in s["rows"]:
                met = {True: "✓", False: "✗"}.get(r.get("met"), "")
                lines.append(f"| {_cell(r['metric'])} | {_cell(r['value'])} | {_cell(r['unit'])} | "
                             f"{_cell(r['target'])} | {met} | {_cell(r['note'])} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few rounds (a smoke run)")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only this section (distill, losses, generate, server, engines…); repeatable")
    ap.add_argument("--bench-dir", default=str(HERE), help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=str(HERE), help="where results.md / results.json go (default: benchmarks/)")
    args = ap.parse_args(argv)

    available = discover(Path(args.bench_dir))
    wanted = [n.removeprefix("bench_").removesuffix(".py") for n in (args.only or [])]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        print(f"error: no section {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    names = wanted or list(available)

    sections = []
    for name in names:
        print(f"== {name} ({available[name].name})", file=sys.stderr, flush=True)
        entry = run_section(name, available[name], args.quick)
        if entry["error"]:
            print(f"   FAILED after {entry['seconds']} s: {entry['error']}", file=sys.stderr)
        for r in entry["rows"]:
            met = {True: " ✓", False: " ✗"}.get(r.get("met"), "")
            print(f"   {r['metric']}: {_cell(r['value'])} {r['unit']}{met}", file=sys.stderr)
        sections.append(entry)

    results = {"machine": machine_info(), "quick": args.quick, "sections": sections}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if wanted and (out / "results.json").is_file():
        try:
            results = merge(json.loads((out / "results.json").read_text(encoding="utf-8")), results)
        except (ValueError, OSError) as e:
            print(f"warning: previous {out / 'results.json'} unreadable ({e}); writing these sections only",
                  file=sys.stderr)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    failed = [s["name"] for s in sections if s["error"]]
    print(f"wrote {out / 'results.md'} and results.json" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
