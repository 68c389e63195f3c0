"""Exercises from solutions: `solutions/*.ipynb` → `exercises/*.ipynb` (`make exercises`).

Markers (nbgrader's), on lines of their own inside a cell:

    ### BEGIN SOLUTION          code the student writes; in the exercise the block becomes
    # HINT: one line of hint    # YOUR CODE HERE
    ...solution code...         raise NotImplementedError("one line of hint")
    ### END SOLUTION            (indented like the BEGIN marker; several HINT lines are joined)

    ### BEGIN EXERCISE          the starting code of the exercise, for when it is not a blank
    #> def f(x):                (e.g. the seed's broken DiTBlock to be fixed): each `#> ` line, prefix
    #>     return x + 1         removed, replaces the solution block that must follow right after
    ### END EXERCISE            ### END EXERCISE. In the solution notebook these lines are comments.

In markdown cells a SOLUTION region (a written answer) becomes "*Your answer here.*".
Everything else is kept as is; code cells lose their outputs, execution counts and execution timing.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_EX, END_EX = "### BEGIN EXERCISE", "### END EXERCISE"
HINT = "# HINT:"
DEFAULT_HINT = "write this part (see the instructions above)"
ANSWER = "*Your answer here.*\n"


class ExerciseError(ValueError):
    """A solution notebook's markers are malformed."""


def _exercise_lines(lines: list[str], where: str) -> list[str]:
    out = []
    for line in lines:
        body = line.lstrip(" ")
        indent = line[: len(line) - len(body)]
        if not body.startswith("#>"):
            raise ExerciseError(f"{where}: inside {BEGIN_EX}, every line must start with '#>', got {line!r}")
        text = body[2:]
        text = text[1:] if text.startswith(" ") else text
        out.append(indent + text if text.strip() else "\n")
    return out


def exercise_code(source: str, where: str = "cell") -> str:
    """One code cell's source with each solution block replaced (see the module docstring)."""
    lines = source.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    out, i, starting = [], 0, None
    while i < len(lines):
        s = lines[i].strip()
        if s == BEGIN_EX:
            j = _find(lines, i, END_EX, where)
            starting = _exercise_lines(lines[i + 1 : j], where)
            i = j + 1
            if i >= len(lines) or lines[i].strip() != BEGIN:
                raise ExerciseError(f"{where}: {END_EX} must be followed directly by {BEGIN}")
            continue
        if s == BEGIN:
            j = _find(lines, i, END, where)
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            if starting is not None:
                out += starting
                starting = None
            else:
                hints = [ln.strip()[len(HINT):].strip() for ln in lines[i + 1 : j] if ln.strip().startswith(HINT)]
                hint = " ".join(hints) or DEFAULT_HINT
                message = json.dumps(hint, ensure_ascii=False)  # a valid Python string literal
                out += [f"{indent}# YOUR CODE HERE\n", f"{indent}raise NotImplementedError({message})\n"]
            i = j + 1
            continue
        if s in (END, END_EX):
            raise ExerciseError(f"{where}: {s} without a matching BEGIN")
        out.append(lines[i])
        i += 1
    text = "".join(out)
    return text[:-1] if not source.endswith("\n") and text.endswith("\n") else text


def _find(lines: list[str], start: int, marker: str, where: str) -> int:
    for j in range(start + 1, len(lines)):
        s = lines[j].strip()
        if s == marker:
            return j
        if s in (BEGIN, BEGIN_EX, END, END_EX):
            raise ExerciseError(f"{where}: {s} inside a block opened on line {start + 1} (expected {marker})")
    raise ExerciseError(f"{where}: {lines[start].strip()} on line {start + 1} is never closed by {marker}")


def exercise_markdown(source: str, where: str = "cell") -> str:
    """A markdown cell with each SOLUTION region replaced by a placeholder for the student's answer."""
    lines = source.splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        s = lines[i].strip()
        if s == BEGIN:
            i = _find(lines, i, END, where) + 1
            out.append(ANSWER)
            continue
        if s in (END, BEGIN_EX, END_EX):
            raise ExerciseError(f"{where}: unexpected {s} in a markdown cell")
        out.append(lines[i])
        i += 1
    return "".join(out)


def _compiles(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except SyntaxError:
        from IPython.core.inputtransformer2 import TransformerManager  # magics, `!cmd`

        try:
            ast.parse(TransformerManager().transform_cell(source))
            return True
        except SyntaxError:
            return False


def make_exercise(nb, name: str = "notebook"):
    """The exercise version of a solution notebook (a new nbformat notebook; `nb` is not modified)."""
    import nbformat

    ex = nbformat.from_dict(json.loads(json.dumps(nb)))
    for k, cell in enumerate(ex.cells):
        where = f"{name} cell {k + 1}"
        if cell.cell_type == "code":
            cell.source = exercise_code(cell.source, where)
            if not _compiles(cell.source):
                raise ExerciseError(f"{where}: the exercise's code does not compile:\n{cell.source}")
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
        elif cell.cell_type == "markdown":
            cell.source = exercise_markdown(cell.source, where)
    return ex


def notebook_text(nb) -> str:
    """The text Jupyter writes for a notebook (nbformat's layout, trailing newline)."""
    import nbformat

    return nbformat.writes(nb) + "\n"


def make_exercises(solutions: str | Path = "solutions", exercises: str | Path = "exercises",
                   check: bool = False) -> list[str]:
    """Regenerate `exercises/` from `solutions/`; returns the files that were (or, with check, would be) changed."""
    import nbformat

    src, dst = Path(solutions), Path(exercises)
    if not src.is_dir():
        raise ExerciseError(f"no solutions folder at {src}")
    changed = []
    wanted = {}
    for path in sorted(src.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        wanted[path.name] = notebook_text(make_exercise(nb, path.name))
    for name, text in wanted.items():
        target = dst / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            changed.append(str(target))
            if not check:
                dst.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    for extra in sorted(dst.glob("*.ipynb")) if dst.is_dir() else []:
        if extra.name not in wanted:
            changed.append(str(extra))
            if not check:
                extra.unlink()
    return changed
