"""Hints that teach: no stub message (the exercise's NotImplementedError) and no collapsed hint gives away a line of
the solution, stub messages point to ideas rather than code, and the self-checks never import the package's answer.

These are static checks of solutions/*.ipynb and exercises/*.ipynb (fast: nothing is executed).
"""

import ast
import json
import re
from pathlib import Path

import pytest

from minidit.assignments import get_assignment
from minidit.grading.exercises import BEGIN, END, HINT

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
CODE_LIKE = re.compile(r"[A-Za-z_]\w*\(|torch\.|\w\.\w+\(|\w+ = \w+[.(\[]|==|\[:|:\]|\*\*")  # a call, a slice …


def _id(path: Path) -> str:
    return path.stem


def cells(path: Path, kind: str) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def solution_blocks(path: Path, starting: bool = False) -> list[tuple[str, list[str]]]:
    """(hint text, solution code lines) for every BEGIN/END SOLUTION block of the notebook's code cells; the blocks
    whose exercise starts from given code (### BEGIN EXERCISE, e.g. A5's seed) only when `starting`."""
    out = []
    for src in cells(path, "code"):
        lines, inside, hint, code = src.splitlines(), False, [], []
        for line in lines:
            s = line.strip()
            if s == BEGIN:
                inside, hint, code = True, [], []
            elif s == END:
                if starting or "### BEGIN EXERCISE" not in src:
                    out.append((" ".join(hint), code))
                inside = False
            elif inside and s.startswith(HINT):
                hint.append(s[len(HINT):].strip())
            elif inside and s and not s.startswith("#"):
                code.append(s)
    return out


def normalise(text: str) -> str:
    return re.sub(r"\s+", "", text)


def giveaways(text: str, lines: list[str]) -> list[str]:
    """The solution lines (of some substance) that appear in `text`, ignoring whitespace and a leading `return`."""
    flat = normalise(text)
    found = []
    for line in lines:
        body = normalise(line.removeprefix("return "))
        if len(body) >= 12 and re.search(r"[(\[+\-*/@=]", body) and body in flat:  # code with some substance
            found.append(line)
    return found


def collapsed_hints(path: Path) -> list[str]:
    return [m for src in cells(path, "markdown") for m in re.findall(r"<details><summary>Hint</summary>(.*?)</details>",
                                                                      src, flags=re.S)]


@pytest.mark.parametrize("path", SOLUTIONS, ids=_id)
def test_stub_messages_contain_no_line_of_their_solution(path):
    assert solution_blocks(path, starting=True), f"{path.name} has no solution blocks"
    for hint, code in solution_blocks(path):
        assert not giveaways(hint, code), f"{path.name}: the hint {hint!r} gives away {giveaways(hint, code)}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_id)
def test_stub_messages_point_to_ideas_not_code(path):
    """Each stub message is prose: no call, assignment, slice or `torch.` (the idea, not the code)."""
    for hint, _ in solution_blocks(path):
        assert hint, f"{path.name}: a solution block without a # HINT: line (its stub would say nothing useful)"
        assert not CODE_LIKE.search(hint), f"{path.name}: the hint reads like code: {hint!r}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_id)
def test_collapsed_hints_give_away_no_line_of_the_solution(path):
    code = [line for _, lines in solution_blocks(path) for line in lines]
    for hint in collapsed_hints(path):
        assert not giveaways(hint, code), f"{path.name}: a collapsed hint gives away {giveaways(hint, code)}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_id)
def test_exercises_show_no_line_of_the_solution(path):
    """The exercise raises NotImplementedError with each hint, and none of its code (instructions, given code,
    self-checks) repeats a line of the solution."""
    exercise = ROOT / "exercises" / path.name
    text = "\n".join(cells(exercise, "code"))
    messages = [ast.literal_eval(m) for m in re.findall(r"raise NotImplementedError\((\".*?\")\)", text)]
    blocks = solution_blocks(path)
    assert messages == [hint for hint, _ in blocks], f"{path.name}: the exercise's stubs do not carry the hints"
    code = [line for _, lines in solution_blocks(path, starting=True) for line in lines]
    seed = "\n".join(line for src in cells(path, "code") for line in src.splitlines() if line.strip().startswith("#>"))
    shown = [line for line in giveaways(text + "\n".join(cells(exercise, "markdown")), code)
             if normalise(line) not in normalise(seed)]  # the given starting code may share lines with the fix
    assert not shown, f"{path.name}: the exercise shows these lines of the solution: {shown}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_id)
def test_self_checks_do_not_import_the_package_answer(path):
    """No `import minidit.X as ref` of a module whose functions the assignment switches off while grading."""
    name = path.stem
    disabled = {t.split(":")[0] for t in getattr(get_assignment(name), "DISABLED", [])}
    for src in cells(path, "code"):
        for module in re.findall(r"^\s*import (minidit[\w.]*) as \w+", src, flags=re.M):
            assert module not in disabled, f"{path.name} imports {module}, whose answers it grades, for its self-checks"


def test_the_giveaway_detector_works():
    code = ["tb = t.reshape(-1, *[1] * (x0.ndim - 1))", "return (1 - tb) * x0 + tb * noise"]
    assert giveaways("tb = t.reshape(-1, *[1] * (x0.ndim - 1)), then (1 - tb) * x0 + tb * noise.", code) == code
    assert giveaways("t has one value per sample; make it broadcast over the other axes of x0", code) == []
    assert CODE_LIKE.search("out = model(torch.cat([x, x]))") and not CODE_LIKE.search("a (B,) tensor, one per sample")
