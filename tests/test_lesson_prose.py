"""Prose cannot drift from outputs: a measured-looking figure in a lesson's markdown must come from that lesson.

A figure is a decimal number (0.975, 19.47), a percentage (85 %, 0.4 %) or a ratio (1.63×). Each one in a markdown
cell of a lesson must be found in the same lesson: printed by an output (text, or Markdown a cell displayed — the
usual way to put a computed number in a sentence), or written in a code cell (a setting, not a measurement), at the
precision the prose shows. Numbers from papers are listed, with their source, in tests/lesson_facts.toml under the
lesson that quotes them; a listed number that the lesson no longer quotes is an error too, so the list stays true.
"""

import math
import re
from pathlib import Path

import nbformat
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FACTS = tomllib.loads((ROOT / "tests" / "lesson_facts.toml").read_text())
# a number not inside a word, a version or a section number (§5.3.2), with its unit; 28×28 is a size, not a ratio
NUMBER = re.compile(r"(?<![\w.,/§])(\d+(?:,\d{3})*(?:\.\d+)?)(?![.\d])(\s?%|\s?×(?!\s?\d)|x(?![\w]))?")


def figures(text: str) -> set[str]:
    """The figures of a markdown text: decimals, percentages and ratios (plain integers are settings: not checked)."""
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"`[^`]*`", "", text)  # inline code: names and commands, not figures
    found = set()
    for m in NUMBER.finditer(text):
        number, unit = m.group(1), (m.group(2) or "").strip()
        if "." in number or unit in ("%", "×", "x"):
            found.add(number + ("%" if unit == "%" else "×" if unit in ("×", "x") else ""))
    return found


def values(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?", text)]


def lesson_numbers(nb) -> list[float]:
    """Every number an output of the lesson shows or a code cell writes."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        out += values(cell.source)
        for o in cell.get("outputs", []):
            out += values("".join(o.get("text", "")))
            for kind in ("text/plain", "text/markdown", "text/html", "text/latex"):
                out += values("".join(o.get("data", {}).get(kind, "")))
    return out


def found(figure: str, numbers: list[float]) -> bool:
    """Is `figure` (as written in the prose) one of the numbers, at the precision the prose shows?"""
    text = figure.rstrip("%×").replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    want = float(text)
    scales = (1, 100, 0.01) if figure.endswith("%") else (1,)  # 85 % may be printed as 0.85
    tol = 0.5 * 10**-decimals + 1e-9
    return any(math.isclose(v * s, want, abs_tol=tol) or abs(v * s - want) <= tol for v in numbers for s in scales)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_prose_figures_come_from_the_lesson(path):
    nb = nbformat.read(path, as_version=4)
    numbers = lesson_numbers(nb)
    facts = FACTS.get(path.stem, {})
    quoted = set()
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            quoted |= figures(cell.source)
    missing = sorted(f for f in quoted if f not in facts and not found(f, numbers))
    assert not missing, (f"{path.name}: the prose quotes {missing}, which no output or code cell of the lesson shows; "
                         "print it from the cell that computes it (IPython.display.Markdown), or, for a paper's "
                         f"number, list it with its source under [{path.stem}] in tests/lesson_facts.toml")
    stale = sorted(set(facts) - quoted)
    assert not stale, f"{path.name}: tests/lesson_facts.toml lists {stale}, which the lesson no longer quotes"


def test_figures_and_matching():
    assert figures("FID 19.47 vs 25.21, 1.63× the floor, 85 % of peak, 1,000 digits, DiT-XL/2, `lr=3e-3`") == \
        {"19.47", "25.21", "1.63×", "85%"}
    assert figures("28×28 pixels, a 96×40 crop, §5.3.2, SD3 section 5.3.2, version 2.14.1") == set()
    assert found("0.975", [0.97501]) and not found("0.975", [0.9744])
    assert found("85%", [0.851]) and found("1.63×", [1.6269]) and not found("2.00×", [1.93])
