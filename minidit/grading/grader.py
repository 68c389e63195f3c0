"""The trusted half of the grader: runs the sandbox, judges each check, prints the table, writes results.json.

Student code never runs in this process. It reads the notebook as JSON, sends the code cells to a sandbox
(`minidit.grading.sandbox`), receives raw outputs as JSON, computes every reference answer itself and decides.
Every wait has a deadline: a cell that runs past the notebook's time limit, or a process that dies mid-cell, is
skipped and the notebook is run again without it; a check that hangs or crashes fails alone (the sandbox is
restarted for the next one). results.json is written last, atomically, after every sandbox process is dead.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minidit
from minidit.assignments import for_notebook, get_assignment, resolve_name
from minidit.grading.checks import Check, ProtocolError, decode
from minidit.grading.sandbox import become_subreaper, kill_children, resolve

MAX_MESSAGE = 64 << 20  # bytes in one message from the sandbox
GRACE = 5.0  # seconds the grader waits beyond a check's own timeout before it kills the sandbox
MAX_RESTARTS = 6  # sandbox restarts per notebook (each re-executes the notebook)
MAX_EXECUTIONS = 3  # notebook runs that may end early (a cell timed out or killed the process)
RUNS_CLEANLY = "your notebook runs from top to bottom without errors (a warning only: 0 points)"
CELL_ERROR_POLICY = ("Cells that raise an error cost no points by themselves: each check grades the functions your "
                     "notebook defines. But a self-check that fails almost always means a graded check fails too: "
                     "fix the first error first.")


class GradingError(Exception):
    """A problem with the grader's inputs that is the instructor's (unknown assignment, broken hidden tests)."""


class NotebookError(Exception):
    """The submitted notebook cannot be read (missing, not JSON, not a notebook)."""


# ---- reading the submission ---------------------------------------------------------------------------------
def find_notebook(path: str | Path, assignment: str | None = None) -> Path:
    """A notebook file, or the .ipynb in a directory (Gradescope's /autograder/submission): the only one, or else
    the only one whose name is the assignment's (e.g. A1_tokens.ipynb among several)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        if len(found) > 1 and assignment:
            found = [q for q in found if for_notebook(q) == assignment] or found
        if len(found) != 1:
            raise NotebookError(f"expected exactly one .ipynb in {p}, found {len(found)}"
                                + (f": {', '.join(q.name for q in found[:5])}" if found else ""))
        return found[0]
    if not p.is_file():
        raise NotebookError(f"no notebook at {p}")
    return p


def code_cells(path: Path) -> list[str]:
    """The code cells' sources, read as plain JSON (nbformat 4)."""
    try:
        if path.stat().st_size > 50 << 20:
            raise NotebookError(f"{path.name} is larger than 50 MB")
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise NotebookError(f"{path.name} is not a readable notebook (invalid JSON: {str(e)[:200]})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise NotebookError(f"{path.name} is not a Jupyter notebook (no list of cells)")
    cells = []
    for cell in nb["cells"]:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            src = cell.get("source", "")
            src = "".join(s for s in src if isinstance(s, str)) if isinstance(src, list) else src
            if not isinstance(src, str):
                raise NotebookError(f"{path.name}: a code cell's source is not text")
            cells.append(src)
    return cells


# ---- check modules ---------------------------------------------------------------------------------------------
@dataclass
class CheckModule:
    """A module of checks: its CHECKS in this process, and its source for the sandbox."""

    key: str
    checks: list[Check]
    source: str
    filename: str
    disabled: list[str] = field(default_factory=list)  # 'module:name' of the package's answers (see DISABLED)


def _disabled(mod, where: str) -> list[str]:
    """A check module's DISABLED: the package functions that implement what the student writes (validated here)."""
    targets = getattr(mod, "DISABLED", ())
    if isinstance(targets, str) or not all(isinstance(t, str) and ":" in t for t in targets):
        raise GradingError(f"{where}: DISABLED must be a list of 'module:name' strings, got {targets!r}")
    try:
        resolve(list(targets))
    except (ImportError, AttributeError) as e:
        raise GradingError(f"{where}: DISABLED names something that does not exist ({e})") from e
    return list(targets)


def assignment_module(name: str) -> CheckModule:
    try:
        mod = get_assignment(name)
    except ValueError as e:
        raise GradingError(str(e)) from None
    path = Path(mod.__file__)
    return CheckModule(mod.__name__, list(mod.CHECKS), path.read_text(encoding="utf-8"), str(path),
                       _disabled(mod, mod.__name__))


def hidden_modules(tests_dir: str | Path, assignment: str) -> list[CheckModule]:
    """Instructor checks from `tests_dir/*.py` (module-level CHECKS; optional ASSIGNMENT restricts them)."""
    d = Path(tests_dir)
    if not d.is_dir():
        raise GradingError(f"--tests {d}: not a directory")
    out = []
    for i, path in enumerate(sorted(d.glob("*.py"))):
        key = f"minidit_hidden_checks_{i}_{path.stem}"
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            raise GradingError(f"hidden tests {path}: {type(e).__name__}: {e}") from e
        target = getattr(mod, "ASSIGNMENT", None)
        if target is not None and resolve_name(str(target)) != assignment:
            continue
        checks = getattr(mod, "CHECKS", None)
        if not isinstance(checks, list) or not all(isinstance(c, Check) for c in checks):
            raise GradingError(f"hidden tests {path}: CHECKS must be a list of minidit.grading.Check")
        out.append(CheckModule(key, checks, path.read_text(encoding="utf-8"), str(path), _disabled(mod, str(path))))
    return out


# ---- talking to the sandbox -------------------------------------------------------------------------------------
class _Output(threading.Thread):
    """Drains the sandbox's stdout/stderr, keeping only the last 16 KB (a submission may print gigabytes)."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.tail, self.total = fd, b"", 0

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                os.close(self.fd)
                return
            self.total += len(chunk)
            self.tail = (self.tail + chunk)[-16384:]


@dataclass
class _Run:
    """The state of grading one notebook."""

    cells: list[str]
    modules: dict[str, dict]
    timeout: float
    disabled: list[str] = field(default_factory=list)
    skip: set[int] = field(default_factory=set)
    cell_errors: dict[int, str] = field(default_factory=dict)
    sandbox: int | None = None  # pid of the live sandbox
    restarts: int = 0
    executions: int = 0
    notes: list[str] = field(default_factory=list)


def _default_drop() -> bool:
    """Drop to `nobody` when running as root and `nobody` can read the interpreter and the packages."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    import IPython  # only the grader's environment needs it, not `import minidit.cli`

    paths = [Path(sys.executable).resolve(), Path(torch.__file__).parent, Path(minidit.__file__).parent,
             Path(IPython.__file__).parent, Path(os.__file__).parent]
    for p in paths:
        for q in [p, *p.parents]:
            try:
                mode = q.stat().st_mode
            except OSError:
                return False
            if q.is_dir() and not mode & 0o001 or q == p and not mode & 0o004:
                return False
    return True


class Grader:
    """Grades notebooks in sandboxes forked from one long-lived zygote process. Use as a context manager."""

    def __init__(self, memory_mb: int = 2048, drop_privileges: bool | None = None, reap_orphans: bool = False):
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be ≥ 64, got {memory_mb}")
        self.memory_mb = memory_mb
        self.drop = _default_drop() if drop_privileges is None else drop_privileges
        self.reap_orphans = reap_orphans  # CLI: kill any orphan re-parented to this process (see close)
        self._proc: subprocess.Popen | None = None
        self._expected: dict[tuple[str, int, int], object] = {}
        self._seq = 0
        self._workdir = tempfile.mkdtemp(prefix="minidit-grade-")
        if reap_orphans:
            become_subreaper()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- zygote -------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        out_r, out_w = os.pipe()
        root = str(Path(minidit.__file__).resolve().parents[1])
        keep = {k: os.environ[k] for k in ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "LANG")
                if k in os.environ}
        env = {**keep, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "HOME": self._workdir, "TMPDIR": self._workdir, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0",
               "MPLCONFIGDIR": os.path.join(self._workdir, ".matplotlib"), "PYTHONDONTWRITEBYTECODE": "1",
               "IPYTHONDIR": os.path.join(self._workdir, ".ipython"), "CUDA_VISIBLE_DEVICES": "",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "PYTHONIOENCODING": "utf-8"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "minidit.grading.sandbox", str(req_r), str(resp_w)],
            pass_fds=(req_r, resp_w), stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, env=env,
            cwd=self._workdir, start_new_session=True)
        for fd in (req_r, resp_w, out_w):
            os.close(fd)
        self._req, self._resp, self._buf, self._lines = req_w, resp_r, b"", collections.deque()
        self._out = _Output(out_r)
        self._out.start()
        msg = self._recv(time.monotonic() + 300)
        if not msg or msg.get("type") != "zygote":
            tail = self._out.tail.decode(errors="replace")[-2000:]
            self._kill_zygote()
            raise RuntimeError(f"the grading sandbox did not start:\n{tail}")

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._req, data):]
        except OSError:
            pass  # the zygote is gone; the next wait notices

    def _recv(self, deadline: float) -> dict | None:
        """The next message, {'type': 'zygote_died'} if the zygote is gone, or None at the deadline."""
        while True:
            if time.monotonic() >= deadline:
                return None  # a flood of messages cannot hold the grader past a deadline
            if self._lines:
                try:
                    msg = json.loads(self._lines.popleft())
                except (ValueError, RecursionError):
                    msg = None
                return msg if isinstance(msg, dict) else {"type": "garbage"}
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._resp], [], [], max(0.0, min(left, 0.25)))
            if ready:
                chunk = os.read(self._resp, 1 << 20)
                if chunk:
                    *lines, self._buf = (self._buf + chunk).split(b"\n")
                    self._lines.extend(lines)
                    if len(self._buf) > MAX_MESSAGE:  # an endless line: drop it
                        self._buf = b""
                    continue
            if not self._alive():
                return {"type": "zygote_died"}

    def _kill_zygote(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self._proc.wait()
        for fd in (self._req, self._resp):
            try:
                os.close(fd)
            except OSError:
                pass
        self._proc = None

    def close(self) -> None:
        """Stop every process this grader started (and, with reap_orphans, every orphan re-parented to it)."""
        if self._alive():
            self._send({"type": "quit"})
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._kill_zygote()
        if self.reap_orphans:
            kill_children()
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- sandboxes ------------------------------------------------------------------------------------------------
    def _ended(self, run: _Run, msg: dict) -> None:
        """The sandbox died by itself (sandbox_exit) or with the zygote: forget it."""
        if msg.get("type") == "zygote_died":
            self._kill_zygote()
        run.sandbox = None

    def _kill_sandbox(self, run: _Run) -> None:
        """Kill the sandbox's session and wait until the zygote reports it gone (it then kills escaped daemons)."""
        pid, run.sandbox = run.sandbox, None
        if pid is None:
            return
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._await_exit(pid)

    def _await_exit(self, pid: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            msg = self._recv(deadline)
            if msg is None or msg.get("type") == "zygote_died":
                self._kill_zygote()
                return
            if msg.get("type") == "sandbox_exit" and msg.get("pid") == pid:
                return

    def _spawn(self, run: _Run) -> bool:
        """Start a sandbox that executes the notebook; False when nothing can be started any more."""
        if run.restarts >= MAX_RESTARTS:
            return False
        run.restarts += 1
        if not self._alive():
            self._kill_zygote()
            self._start()
        self._send({"type": "spawn", "cells": run.cells, "skip": sorted(run.skip), "modules": run.modules,
                    "disabled": run.disabled, "memory_mb": self.memory_mb, "drop": self.drop,
                    "workdir": self._workdir})
        msg = self._recv(time.monotonic() + 60)
        if not msg or msg.get("type") != "spawned":
            self._kill_zygote()
            return False
        run.sandbox = int(msg["pid"])
        return True

    def _execute(self, run: _Run) -> bool:
        """A sandbox that has executed the notebook (skipping cells that hang or kill it); False if impossible."""
        first = run.executions == 0
        while True:
            if not self._spawn(run):
                run.notes.append("the notebook could not be executed (too many restarts)")
                return False
            run.executions += 1
            deadline, current = time.monotonic() + run.timeout, None
            while True:
                msg = self._recv(deadline)
                kind = msg.get("type") if msg else "timeout"
                if kind == "cell" and msg.get("event") == "start" and isinstance(msg.get("index"), int):
                    current = msg["index"]
                elif kind == "cell" and msg.get("event") == "end":
                    if first and isinstance(msg.get("error"), str) and isinstance(msg.get("index"), int):
                        run.cell_errors.setdefault(msg["index"], msg["error"][:600])
                    current = None
                elif kind == "executed":
                    return True
                elif kind == "zygote_died" or (kind == "sandbox_exit" and msg.get("pid") == run.sandbox):
                    self._ended(run, msg)
                    break
                elif kind == "timeout":
                    break
            why = (f"did not finish within the notebook's time limit of {run.timeout:g} s"
                   if kind == "timeout" else "ended the notebook's process (os._exit, a crash or a kill)")
            self._kill_sandbox(run)
            if current is None or current in run.skip or run.executions >= MAX_EXECUTIONS:
                run.notes.append(f"the notebook {why}; later cells were not run")
                run.skip.update(range(len(run.cells)))  # last resort: checks see an empty namespace
            else:
                run.skip.add(current)
                run.cell_errors[current] = f"this cell {why}; it was skipped"

    # -- grading ------------------------------------------------------------------------------------------------------
    def _expected_value(self, mod: CheckModule, index: int):
        key = (mod.key, index, hash(mod.source))
        if key not in self._expected:
            check = mod.checks[index]
            self._expected[key] = check.expect() if check.expect is not None else None
        return self._expected[key]

    def _run_check(self, run: _Run, mod: CheckModule, index: int, timeout: float) -> tuple[bool, str]:
        check = mod.checks[index]
        if run.sandbox is None and not self._execute(run):
            return False, "not run: the notebook could not be executed"
        self._seq += 1
        seq = self._seq
        self._send({"type": "check", "seq": seq, "module": mod.key, "index": index, "name": check.name,
                    "timeout": timeout})
        deadline, result, exit_msg = time.monotonic() + timeout + GRACE, None, None
        while True:
            msg = self._recv(deadline)
            kind = msg.get("type") if msg else "timeout"
            if kind == "result" and msg.get("seq") == seq and result is None:
                result = msg
            elif kind == "check_exit" and msg.get("seq") == seq:
                exit_msg = msg
                break
            elif kind in ("timeout", "zygote_died") or (kind == "sandbox_exit" and msg.get("pid") == run.sandbox):
                if kind == "timeout":
                    self._kill_sandbox(run)
                else:
                    self._ended(run, msg)
                if result is None:
                    return False, (f"timed out after {timeout:g} s" if kind == "timeout"
                                   else "the submission ended the grading process during this check")
                break
        if exit_msg and exit_msg.get("timed_out") is True:
            return False, f"timed out after {timeout:g} s (an infinite loop?)"
        if result is None:
            status = exit_msg.get("status") if exit_msg else None
            return False, f"the check's process exited (status {status}) without a result (sys.exit? os._exit?)"
        if isinstance(result.get("missing"), str):
            return False, f"`{result['missing'][:80]}` is not defined: run the cell that defines it (without errors)"
        if isinstance(result.get("foreign"), list) and len(result["foreign"]) == 2:
            name, origin = (str(s)[:80] for s in result["foreign"])
            return False, f"`{name}` comes from the module `{origin}`: define it yourself in the notebook"
        if isinstance(result.get("copied"), list) and len(result["copied"]) == 2:
            name, origin = (str(s)[:80] for s in result["copied"])
            return False, f"`{name}` runs the code of `{origin}`: write it yourself in the notebook"
        if "error" in result:
            return False, f"raised {str(result['error'])[:1500]}"
        if "value" not in result:
            return False, "the sandbox sent no result"
        try:
            got = decode(result["value"])
        except (ProtocolError, ValueError, TypeError, RecursionError) as e:
            return False, f"malformed result from the sandbox ({e})"
        try:
            want = self._expected_value(mod, index)
            verdict = check.verdict(got, want)
        except Exception as e:  # noqa: BLE001 — a bug in a check must not lose the whole grade
            return False, f"grader error in this check ({type(e).__name__}: {e}); please tell your instructor"
        return (True, "passed") if verdict is None else (False, str(verdict)[:2000])

    def grade(self, notebook: str | Path, assignment: str | None = None, tests_dir: str | Path | None = None,
              timeout: float = 300.0, check_timeout: float | None = None) -> dict:
        """Grade one notebook; returns Gradescope's results dict (see `write_results`)."""
        t0 = time.monotonic()
        if timeout <= 0 or (check_timeout is not None and check_timeout <= 0):
            raise GradingError("timeouts must be > 0 seconds")
        name = resolve_name(assignment) if assignment else None
        try:
            path = find_notebook(notebook, name)
        except NotebookError as e:
            path, problem = None, str(e)
        else:
            problem = None
        if name is None:
            guess = assignment or for_notebook(path or Path(notebook))
            name = resolve_name(guess) if guess else None
            if name is None:
                raise GradingError(f"unknown assignment {assignment!r}" if assignment else
                                   f"cannot tell the assignment from the notebook's name {Path(notebook).name!r}: "
                                   "pass --assignment")
        mods = [assignment_module(name)] + (hidden_modules(tests_dir, name) if tests_dir else [])
        if path is not None:
            try:
                cells = code_cells(path)
            except NotebookError as e:
                problem = str(e)
        tests = []
        if problem is not None:
            tests.append(_warning(False, f"not run: {problem}"))
            for mod in mods:
                for c in mod.checks:
                    tests.append(_test(c, False, f"not graded: {problem}"))
            return _results(name, tests, time.monotonic() - t0, f"{problem}. Nothing could be graded.")
        disabled = sorted({t for m in mods for t in m.disabled})
        run = _Run(cells, {m.key: {"source": m.source, "filename": m.filename} for m in mods}, timeout, disabled)
        try:
            self._execute(run)
            for mod in mods:
                for i, c in enumerate(mod.checks):
                    t = c.timeout if check_timeout is None else min(c.timeout, check_timeout)
                    ok, msg = self._run_check(run, mod, i, t)
                    tests.append(_test(c, ok, msg))
        finally:
            self._kill_sandbox(run)
        problems = _cell_problems(run)
        tests.insert(0, _warning(not problems, "\n".join(problems) + f"\n{CELL_ERROR_POLICY}" if problems else
                                 "every cell ran without an error"))
        summary = _summary(path.name, name, cells, run, problems)
        return _results(name, tests, time.monotonic() - t0, summary)


def _test(check: Check, ok: bool, message: str) -> dict:
    return {"name": check.name, "score": float(check.points) if ok else 0.0, "max_score": float(check.points),
            "status": "passed" if ok else "failed", "output": message, "visibility": check.visibility}


def _warning(ok: bool, message: str) -> dict:
    """The 0-point entry that flags a notebook whose own cells raise (the policy: a visible warning, no deduction)."""
    return {"name": RUNS_CLEANLY, "score": 0.0, "max_score": 0.0, "status": "passed" if ok else "failed",
            "output": message, "visibility": "visible"}


def _cell_problems(run: _Run) -> list[str]:
    """One line per cell that raised, numbered as Jupyter numbers cells after Restart & Run All (In [n])."""
    lines = [f"In [{i + 1}]: {err}" for i, err in sorted(run.cell_errors.items())]
    return lines + [f"note: {n}" for n in run.notes]


def _summary(filename: str, name: str, cells: list[str], run: _Run, problems: list[str]) -> str:
    lines = [f"Graded {filename} as {name}: {len(cells)} code cells, run from the top as Jupyter's "
             f"Restart & Run All would (In [1] … In [{len(cells)}])."]
    if problems:
        lines.append("Warning: your notebook does not run from top to bottom without errors (no points are "
                     "deducted for this by itself):")
        lines += ["  " + line.replace("\n", "\n    ") for line in problems]
    return "\n".join(lines)


def _results(name: str, tests: list[dict], seconds: float, output: str) -> dict:
    score = math.fsum(t["score"] for t in tests)
    return {"score": round(score, 4), "execution_time": int(round(seconds)), "output": output,
            "stdout_visibility": "hidden", "extra_data": {"assignment": name,
                                                          "max_score": math.fsum(t["max_score"] for t in tests)},
            "tests": tests}


def write_results(results: dict, path: str | Path) -> None:
    """Write results.json atomically (a temporary file, then rename), replacing whatever is at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    fd, tmp = tempfile.mkstemp(prefix=".results-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def format_table(results: dict) -> str:
    """The score table printed by `minidit grade`."""
    rows = [f"{'score':>6} {'max':>5}  check"]
    for t in results["tests"]:
        if t["name"] == RUNS_CLEANLY:
            if t["status"] == "failed":
                rows.append(f"{'':6} {'':5}  ⚠ {t['name']}: NO — see above")
            continue
        mark = "✓" if t["score"] >= t["max_score"] else "✗"
        rows.append(f"{t['score']:6.1f} {t['max_score']:5.1f}  {mark} {t['name']}")
        if t["score"] < t["max_score"]:
            rows += [f"{'':14}{line}" for line in t["output"].splitlines()[:6]]
    total = results["extra_data"]["max_score"]
    rows.append(f"{results['score']:6.1f} {total:5.1f}  total ({results['extra_data']['assignment']}, "
                f"{results['execution_time']} s)")
    return "\n".join([results["output"], "", *rows])


def grade_notebook(notebook: str | Path, assignment: str | None = None, tests_dir: str | Path | None = None,
                   timeout: float = 300.0, check_timeout: float | None = None, memory_mb: int = 2048,
                   json_path: str | Path | None = None) -> dict:
    """One-shot grading (the CLI): grade, stop every sandbox process, then write results.json last."""
    with Grader(memory_mb=memory_mb, reap_orphans=True) as g:
        results = g.grade(notebook, assignment, tests_dir, timeout, check_timeout)
    if json_path is not None:
        write_results(results, json_path)
    return results


def failed_checks(results: dict) -> list[str]:
    """Names of the checks that did not get full marks."""
    return [t["name"] for t in results["tests"] if t["score"] < t["max_score"]]

