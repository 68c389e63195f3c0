"""Policy for every committed notebook (lessons in notebooks/, assignments in solutions/) and for exercises/.

nbval (`make notebooks-test`) re-runs the notebooks and compares outputs; this file checks what nbval cannot:
that the committed files were executed top to bottom without errors, that most outputs are really compared,
that every ignored output is backed by an assert, that committed outputs are clean (no machine paths, warnings,
stderr or tracebacks: what a learner sees is what the lesson teaches), and that exercises/ is what `make exercises`
generates.
"""

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest

from minidit.grading.exercises import make_exercises

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
NOTEBOOKS = LESSONS + SOLUTIONS
MIN_COMPARED = 0.60  # share of the code cells with outputs whose outputs nbval compares
MARKERS = {"NBVAL_IGNORE_OUTPUT", "NBVAL_CHECK_OUTPUT", "NBVAL_SKIP", "NBVAL_RAISES_EXCEPTION",
           "PYTEST_VALIDATE_IGNORE_OUTPUT"}
TAGS = {"nbval-ignore-output": "NBVAL_IGNORE_OUTPUT", "nbval-skip": "NBVAL_SKIP",
        "nbval-raises-exception": "NBVAL_RAISES_EXCEPTION", "raises-exception": "NBVAL_RAISES_EXCEPTION",
        "nbval-check-output": "NBVAL_CHECK_OUTPUT"}


# Committed outputs must not show where or how they were made, nor anything that went wrong while making them.
MACHINE_PATH = re.compile(r"/work/|/tmp/|/root/|/home/|/Users/|site-packages|dist-packages|[A-Za-z]:\\Users\\")
WARNING = re.compile(r"Warning\b|warn\(|IProgress not found")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")  # a printed one; error outputs are reported anyway
TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/javascript", "application/json")
EMBEDDED = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=\\n]*|[A-Za-z0-9+/=]{120,}")  # images, animation frames


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _read(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def markers(cell) -> set[str]:
    """nbval's markers on a cell: `# NBVAL_…` comment lines (as nbval reads them) and cell tags."""
    found = set()
    for line in cell.source.splitlines():
        line = line.strip()
        if line.startswith("#") and line.lstrip("#").strip() in MARKERS:
            found.add(line.lstrip("#").strip().replace("PYTEST_VALIDATE_IGNORE_OUTPUT", "NBVAL_IGNORE_OUTPUT"))
    for tag in cell.get("metadata", {}).get("tags", []):
        if tag in TAGS:
            found.add(TAGS[tag])
    return found


def has_assert(source: str) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        from IPython.core.inputtransformer2 import TransformerManager

        tree = ast.parse(TransformerManager().transform_cell(source))
    return any(isinstance(node, ast.Assert) for node in ast.walk(tree))


def _code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebooks_found():
    """The policy runs on whatever exists (lessons are written in parallel); the assignments must exist."""
    assert {p.stem.split("_")[0] for p in SOLUTIONS} >= {"A1", "A2", "A3", "A4", "A5"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_executed_top_to_bottom_without_errors(path):
    nb = _read(path)
    code = _code(nb)
    empty = [i + 1 for i, c in enumerate(code) if not c.source.strip()]
    assert not empty, f"{_id(path)}: empty code cells {empty} (delete them)"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{_id(path)}: execution counts {counts} are not 1..{len(code)}: restart the kernel and run all cells "
        f"(make notebooks)")
    errors = [(i + 1, o.get("ename")) for i, c in enumerate(code) for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{_id(path)}: error outputs in code cells {errors}"


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_lessons_skip_nothing(path):
    skipped = [i + 1 for i, c in enumerate(_code(_read(path))) if "NBVAL_SKIP" in markers(c)]
    assert not skipped, f"{_id(path)}: NBVAL_SKIP in code cells {skipped}; lessons run every cell under nbval"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_most_outputs_are_compared(path):
    with_outputs = [c for c in _code(_read(path)) if c.outputs]
    if not with_outputs:
        return
    ignored = [c for c in with_outputs if markers(c) & {"NBVAL_IGNORE_OUTPUT", "NBVAL_SKIP"}]
    share = 1 - len(ignored) / len(with_outputs)
    assert share >= MIN_COMPARED, (
        f"{_id(path)}: only {share:.0%} of the {len(with_outputs)} code cells with outputs are compared by nbval "
        f"(need ≥ {MIN_COMPARED:.0%}); print rounded, deterministic summaries instead of ignoring outputs")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_ignored_outputs_are_asserted(path):
    bare = [i + 1 for i, c in enumerate(_code(_read(path)))
            if "NBVAL_IGNORE_OUTPUT" in markers(c) and not has_assert(c.source)]
    assert not bare, (f"{_id(path)}: code cells {bare} ignore their output without an assert; assert the property "
                      "that matters (e.g. `assert acc > 0.9`)")


def output_texts(output) -> list[tuple[str, str]]:
    """(what, text) for every text an output shows: a stream, an error, each text MIME type of a display or result.

    Embedded binary data (base64 images and animation frames inside HTML) is cut out: it is not text a learner reads.
    """
    if output.output_type == "stream":
        return [(f"{output.name} stream", output.text)]
    texts = []
    for mime in TEXT_MIMES:
        value = output.get("data", {}).get(mime)
        if value is not None:
            value = value if isinstance(value, str) else json.dumps(value)
            texts.append((mime, EMBEDDED.sub("", value)))
    return texts


def output_problems(nb) -> list[str]:
    """Every committed output that shows a machine path, a warning, stderr or a traceback, by code cell number."""
    problems = []
    for i, cell in enumerate(_code(nb)):
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                problems.append(f"code cell {i + 1}: a stderr stream: {output.text.strip()[:200]!r}")
                continue
            if output.output_type == "error":
                problems.append(f"code cell {i + 1}: a traceback (error output): {output.ename}: {output.evalue}")
                continue
            for what, text in output_texts(output):
                for name, pattern in (("a machine path", MACHINE_PATH), ("a warning", WARNING),
                                      ("a traceback", TRACEBACK)):
                    match = pattern.search(text)
                    if match:  # quote the line it is on
                        start, end = text.rfind("\n", 0, match.start()) + 1, text.find("\n", match.end())
                        line = text[start:end if end >= 0 else None].strip()
                        problems.append(f"code cell {i + 1}: {name} in its {what}: {line[:200]!r}")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_outputs_are_clean(path):
    """No machine paths (/work/, /tmp/, /root/, /home/, site-packages), warnings, stderr or tracebacks in outputs.

    Remove the cause (a deprecated call, a print of a path) rather than filtering the warning or hiding the stream.
    """
    problems = output_problems(_read(path))
    assert not problems, f"{_id(path)}: committed outputs that a learner should not see:\n  " + "\n  ".join(problems)


WARNING_FILTER = re.compile(r"\b(?:warnings\.(?:filterwarnings|simplefilter|catch_warnings)|filterwarnings\()")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_no_warning_filters(path):
    """Warnings are fixed at their cause, never filtered: a filter would also hide the next, real warning."""
    filtered = [f"code cell {i + 1}: {line.strip()}" for i, c in enumerate(_code(_read(path)))
                for line in c.source.splitlines() if WARNING_FILTER.search(line) and not line.lstrip().startswith("#")]
    assert not filtered, (f"{_id(path)}: warning filters (remove the cause of the warning instead; tqdm's "
                          "'IProgress not found' is gone now that ipywidgets is installed):\n  "
                          + "\n  ".join(filtered))


def test_output_problems_are_detected():
    """The output scan can fail: it sees paths, warnings, stderr and tracebacks, and skips embedded images."""
    out = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("x = 1", outputs=[
        out("stream", name="stdout", text="saved to /tmp/abc/run.png\n"),
        out("stream", name="stderr", text="train: 100%\n"),
        out("display_data", data={"text/plain": "/root/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: "
                                                "TqdmWarning: IProgress not found"}),
        out("stream", name="stdout", text="ValueError: a message the lesson prints on purpose\n"),
        out("error", ename="ValueError", evalue="bad", traceback=["Traceback (most recent call last)", "ValueError"]),
        out("display_data", data={"text/html": '<img src="data:image/png;base64,AAAA/tmp/Warning+/home/AAAA">'}),
    ])
    nb = nbformat.v4.new_notebook(cells=[cell])
    found = output_problems(nb)
    assert [p.split(":")[1].strip() for p in found] == [
        "a machine path in its stdout stream", "a stderr stream", "a machine path in its text/plain",
        "a warning in its text/plain", "a traceback (error output)"], found
    assert all(p.startswith("code cell 1:") for p in found)


def test_exercises_are_up_to_date():
    stale = make_exercises(ROOT / "solutions", ROOT / "exercises", check=True)
    assert not stale, (f"exercises/ is stale ({', '.join(Path(s).name for s in stale)}): regenerate it with "
                       "`make exercises` (minidit exercises)")


def test_markers_and_asserts_are_detected():
    """The helpers above can fail: they see comment markers, tags and asserts."""
    cell = nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nacc = 0.95\nprint(acc)")
    assert markers(cell) == {"NBVAL_IGNORE_OUTPUT"} and not has_assert(cell.source)
    tagged = nbformat.v4.new_code_cell("%time x = 1\nassert x == 1", metadata={"tags": ["nbval-skip"]})
    assert markers(tagged) == {"NBVAL_SKIP"} and has_assert(tagged.source)
