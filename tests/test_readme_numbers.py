"""The READMEs' benchmark numbers are the ones `make bench` wrote, to the digits they print.

    python -m pytest -q tests/test_readme_numbers.py

Checked: the Benchmarks table of both READMEs and the English paragraphs that say they were
"Measured by" a benchmark. Each number there must be a number of `benchmarks/results.md` (a value,
a note or a row's name; never a target) rounded to the digits the README prints, or that number
as a percentage. With `reports/report.json` present (after `make run`), the results table's
parameters and sizes are checked against it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.md"
REPORT = ROOT / "reports" / "report.json"
NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])\d+(?:\.\d+)?")


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def value(token: str) -> float:
    return float(token.replace(",", ""))


def results_numbers(section: str = "") -> list[float]:
    """Every number of results.md, or of the sections written by the benchmark file ``section``."""
    text = RESULTS.read_text(encoding="utf-8")
    if section:
        text = "\n".join(s for s in text.split("\n## ") if f"`{section}`" in s)
    out = []
    for line in text.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 5:
            del cells[4]  # the target column: a bound, not a measurement
        out += [value(t) for t in numbers("|".join(cells))]
    return out


def matches(token: str, pool: list[float]) -> bool:
    decimals = len(token.split(".")[1]) if "." in token else 0
    half = 0.5 * 10 ** -decimals + 1e-9
    x = value(token)
    return any(abs(r - x) <= half or abs(100 * r - x) <= half for r in pool)


def benchmark_table(readme: Path) -> list[str]:
    """The "measured" cells of the table under the Benchmarks heading."""
    text = readme.read_text(encoding="utf-8")
    section = re.split(r"\n## (?:Benchmarks|基准测试)\n", text)[1].split("\n## ")[0]
    return [row.split("|")[2] for row in section.splitlines() if row.startswith("| ") and "---" not in row][1:]


def measured_paragraphs(readme: Path) -> list[str]:
    text = readme.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if re.match(r"Measured by (`make bench`|`benchmarks/bench_)", p)]


@pytest.mark.parametrize("readme", ["README.md", "README_python3_distillation.md"])
def test_benchmark_table_numbers_come_from_results(readme):
    pool = results_numbers()
    cells = benchmark_table(ROOT / readme)
    assert len(cells) >= 10
    wrong = [(cell.strip(), t) for cell in cells for t in numbers(cell) if not matches(t, pool)]
    assert not wrong, f"{readme}: numbers not in benchmarks/results.md: {wrong}"


def test_measured_paragraphs_numbers_come_from_results():
    """Each paragraph against the sections of the benchmark files it names."""
    paragraphs = measured_paragraphs(ROOT / "README.md")
    assert len(paragraphs) >= 3
    wrong = []
    for p in paragraphs:
        pool = [x for f in set(re.findall(r"bench_\w+\.py", p)) for x in results_numbers(f)]
        assert pool, p[:80]
        wrong += [(p[:60], t) for t in numbers(p.split(":", 1)[1]) if not matches(t, pool)]
    assert not wrong, f"README.md: numbers not in benchmarks/results.md: {wrong}"


def test_the_check_catches_a_drifted_number():
    pool = [5.437, 1.289, 173730.2]
    assert matches("5.4", pool) and matches("1.29", pool) and matches("173,730", pool) and matches("544", pool)
    assert not matches("3.8", pool) and not matches("0.91", pool) and not matches("164", pool)


@pytest.mark.skipif(not REPORT.exists(), reason="no reports/report.json (make run writes it)")
def test_results_table_matches_the_report():
    """The results table's shape columns (parameters, MB) against a report of this checkout. Not the
    perplexities or speeds: bf16 kernels round differently from one CPU to another (the README
    names the machine its table comes from), so those are checked only on results.md above."""
    report = json.loads(REPORT.read_text(encoding="utf-8"))
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("\n| model |", 1)[1].split("\n\n", 1)[0]
    header = [c.strip() for c in ("| model |" + table.splitlines()[0]).split("|")]
    rows = {r.split("|")[1].strip(" *").split()[0].strip("*"): [c.strip(" *") for c in r.split("|")]
            for r in table.splitlines()[2:] if r.startswith("| ")}
    checked = 0
    for label, m in report["models"].items():
        if label in rows:
            cells = dict(zip(header, rows[label]))
            assert cells["params"] == f"{m['n_params'] / 1e6:.2f}M", label
            assert cells["size MB"] == f"{m['size_mb']:.1f}", label
            checked += 1
    assert checked >= 2
