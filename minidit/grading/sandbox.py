"""The sandbox side of the grader (`python -m minidit.grading.sandbox`, started by the grader); it decides nothing.

Process tree (all Linux processes, all talking JSON lines over two pipes):

    grader (trusted: judges, writes results.json)
      └─ zygote: imports torch, IPython, minidit once, runs no student code; a child subreaper
           └─ sandbox (one per notebook run, forked): own session, memory/file-size limits, optional drop to
              `nobody`; executes the notebook's code cells in an IPython shell, continuing past errors
                └─ check child (one per check, forked from the executed sandbox): switches off the package's
                   answers (DISABLED), runs one probe, sends its raw output, exits; killed after the check's timeout

The grader enforces every time limit again from outside (and kills the whole sandbox session), so a
submission that breaks this side (kills it, patches it, floods the pipe) only loses its own points.
Cells run with the execution counts of Restart & Run All, so a frame in a cell is named <ipython-input-N-…> and
errors are reported as "In [N], line L, in f", with the student's frames only.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import sys
import time
import traceback
import types

import torch

import minidit.grading.checks as checks
from minidit.assignments import ASSIGNMENTS
from minidit.attention import CrossAttention, attention

NOBODY = 65534
PR_SET_CHILD_SUBREAPER = 36
# what notebooks and probes import, loaded once in the zygote (with every assignment module) before any fork
PRELOAD = ("minidit.tokens", "minidit.embed", "minidit.models", "minidit.flow", "minidit.guidance", "minidit.ddpm",
           "minidit.vae", "minidit.data", "minidit.mmdit")


class Pipe:
    """Newline-delimited JSON over a pair of file descriptors (blocking; the grader has its own reader)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd, self.buf = read_fd, write_fd, b""
        # bound before any student code runs (a notebook may patch os or json in its own process)
        self._write, self._read, self._dumps, self._loads = os.write, os.read, json.dumps, json.loads

    def send(self, msg: dict) -> None:
        data = (self._dumps(msg) + "\n").encode()
        while data:
            data = data[self._write(self.write_fd, data):]

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self._read(self.read_fd, 1 << 16)
            if not chunk:
                os._exit(0)  # the grader is gone
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return self._loads(line)


def _preload() -> None:
    """Import everything a notebook and the probes use, once, before any fork (and before dropping privileges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    from IPython.core.interactiveshell import InteractiveShell  # noqa: F401

    torch.set_num_threads(1)  # forking after a multi-threaded OpenMP region hangs the child
    for name in (*PRELOAD, *ASSIGNMENTS.values()):
        importlib.import_module(name)
    # Warm up what notebooks and probes use, so that lazy imports (a masked nn.MultiheadAttention imports sympy:
    # 0.6 s) happen once here, not in every check's process, and not after dropping privileges.
    x, mask = torch.randn(2, 4, 8, requires_grad=True), torch.tensor([[True, True, False, False]] * 2)
    mha = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
    mha(x, x[..., :4], x[..., :4], key_padding_mask=~mask)[0].sum().backward()
    with torch.no_grad():
        mha.eval()(x, x[..., :4], x[..., :4], key_padding_mask=~mask)
    CrossAttention(8, 4, 2)(x, x[..., :4], mask).sum().backward()
    attention(x[:, None], x[:, None], x[:, None], mask, return_weights=True)
    torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask[:, None, :]).sum().backward()
    shell = _new_shell()  # IPython imports a lot on first use (tracebacks, magics): warm it up, then discard it
    warm_up = ["import torch\nx = torch.ones(2)\nx", "raise ValueError('warm-up')", "def f(:\n    pass", "%time y = 1",
               "import sys\nsys.exit(0)", "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"]
    for cell in warm_up:
        shell.run_cell(cell, store_history=False)
    type(shell).clear_instance()


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def kill_children() -> None:
    """SIGKILL and reap every child of this process (as a subreaper: every orphaned descendant) until none is left."""
    for _ in range(100):
        kids = _children(os.getpid())
        if not kids:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        _reap()
        time.sleep(0.005)


def _reap() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def become_subreaper() -> bool:
    """Orphaned descendants (a submission's daemons) are re-parented to this process, which can then kill them."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# ---- zygote --------------------------------------------------------------------------------------------------
def zygote(pipe: Pipe) -> None:
    trusted = {"source": open(checks.__file__, encoding="utf-8").read(), "filename": checks.__file__}
    become_subreaper()
    pipe.send({"type": "zygote", "pid": os.getpid()})
    while True:
        req = pipe.recv()
        if req.get("type") == "quit":
            kill_children()
            os._exit(0)
        if req.get("type") != "spawn":
            continue  # a request meant for a sandbox that died before reading it
        kill_children()
        pid = os.fork()
        if pid == 0:
            _sandbox(req, pipe, trusted)  # never returns
        pipe.send({"type": "spawned", "pid": pid})
        _, status = os.waitpid(pid, 0)
        kill_children()  # escaped daemons were re-parented here
        pipe.send({"type": "sandbox_exit", "pid": pid, "status": status})


# ---- sandbox -------------------------------------------------------------------------------------------------
def _limit(memory_mb: int) -> None:
    budget = _vm_bytes() + memory_mb * (1 << 20)  # torch's CUDA build maps GBs of address space it never uses
    resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with an error instead of a kill
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # if the machine runs out of memory, the kernel kills the sandbox first
    except OSError:
        pass


def _drop_privileges(workdir: str) -> None:
    os.chown(workdir, NOBODY, NOBODY)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _new_shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    cfg = Config()
    cfg.HistoryManager.enabled = False
    cfg.InteractiveShell.colors = "nocolor"
    return InteractiveShell.instance(config=cfg)


def _make_shell():
    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None  # keep one thread: forking after a parallel region hangs the check
    torch.set_num_interop_threads = lambda n: None
    return _new_shell()


CELL_FILE = "<ipython-input-"  # IPython names a cell's code <ipython-input-N-hash>, N = its execution count


def cell_number(filename: str) -> int | None:
    """The N of In [N] for a frame of a notebook cell (cells run with execution counts 1, 2, … in order), else None."""
    if not filename.startswith(CELL_FILE):
        return None
    try:
        return int(filename[len(CELL_FILE):].split("-")[0])
    except ValueError:
        return None


def student_frames(tb) -> list[str]:
    """The traceback's frames in the notebook's own cells, as "In [N], line L, in f: `code`" (no torch, no grader)."""
    out = []
    for f in traceback.extract_tb(tb):
        n = cell_number(f.filename)
        if n is not None:
            where = "" if f.name == "<module>" else f", in {f.name}"
            code = (f.line or "").strip()
            shown = code and not code.startswith("raise ")  # a raise line repeats the message
            out.append(f"In [{n}], line {f.lineno}{where}" + (f": `{code[:160]}`" if shown else ""))
    return out


def describe_error(e: BaseException) -> str:
    """'Type: message', then where it was raised in the student's code (the last frames in their cells only)."""
    try:
        head = f"{type(e).__name__}: {e}".strip()
        head = head[:700] + (" …" if len(head) > 700 else "")
        return head + "".join(f"\n  at {f}" for f in student_frames(e.__traceback__)[-3:])
    except BaseException:  # noqa: BLE001 — a hostile __str__
        return type(e).__name__[:100]


def _run_cell(shell, source: str, number: int) -> str | None:
    shell.execution_count = number  # the cell's code is named <ipython-input-number-…>: In [number] in Jupyter
    try:
        r = shell.run_cell(source, store_history=False)
        err = r.error_before_exec or r.error_in_exec
    except BaseException as e:  # noqa: BLE001 — IPython itself failed; report and go on
        err = e
    if err is None:
        return None
    return describe_error(err)[:600]


# ---- the package's own answers, switched off while a check runs ------------------------------------------------
def resolve(targets: list[str]) -> list[tuple[str, types.FunctionType]]:
    """'module:name' or 'module:Class.method' (a class: each method of its own) → (label, function) pairs.

    Resolved before any student code runs, so that a notebook cannot hide a function by rebinding a name."""
    out = []
    for target in targets:
        modname, _, qual = str(target).partition(":")
        obj = importlib.import_module(modname)
        for part in qual.split("."):
            obj = getattr(obj, part)
        label = f"{modname}.{qual}"
        fns = [v for v in vars(obj).values() if isinstance(v, types.FunctionType)] if isinstance(obj, type) else [obj]
        for fn in fns:
            while isinstance(fn, types.FunctionType):  # decorated functions: the wrapper and what it wraps
                out.append((label, fn))
                fn = getattr(fn, "__wrapped__", None)
    return out


def _disabled_code(label: str, nfree: int) -> types.CodeType:
    """The code of a function that raises, with `nfree` free variables (a function's closure must keep its size)."""
    free = [f"_free{i}" for i in range(nfree)]
    message = (f"{label} is switched off while the grader runs this check: the check grades your own code, "
               f"so write it without calling the package's version")
    src = ("def _outer():\n" + "".join(f"    {v} = None\n" for v in free) + "    def disabled(*args, **kwargs):\n"
           + (f"        {', '.join(free)}\n" if free else "") + f"        raise RuntimeError({message!r})\n"
           + "    return disabled\n")
    ns: dict = {}
    exec(compile(src, "<disabled>", "exec"), ns)
    return ns["_outer"]().__code__


def disable(functions: list[tuple[str, types.FunctionType]]) -> None:
    """Make every listed function raise, through whatever name or alias it is called (its code is replaced)."""
    for label, fn in functions:
        fn.__code__ = _disabled_code(label, len(fn.__code__.co_freevars))


def _sandbox(req: dict, pipe: Pipe, checks_spec: dict) -> None:
    """Execute the notebook, then serve check requests until told to quit (runs in the forked sandbox).

    `checks_spec` is the source of minidit.grading.checks as read before any student code ran: each check's
    process executes it afresh, so patching the checks module (or the assignment's) in the notebook changes nothing.
    """
    try:
        os.setsid()
        _limit(int(req["memory_mb"]))
        if req.get("drop"):
            _drop_privileges(req["workdir"])
        os.chdir(req["workdir"])
        os.environ["HOME"] = req["workdir"]
        shell = _make_shell()
        run_check, load = _check_child, load_check_module  # bound now: the notebook may patch this module
        answers = resolve(req.get("disabled", []))  # the package's versions of what the student writes
        # their code objects, before any student code ran (not a decorator's wrapper: torch.no_grad's is shared)
        package = os.path.dirname(os.path.dirname(os.path.abspath(checks.__file__)))
        codes = [(fn.__code__, label) for label, fn in answers if fn.__code__.co_filename.startswith(package)]
        skip = set(req["skip"])
        for i, src in enumerate(req["cells"]):
            if i in skip:
                continue
            pipe.send({"type": "cell", "index": i, "event": "start"})
            pipe.send({"type": "cell", "index": i, "event": "end", "error": _run_cell(shell, src, i + 1)})
        pipe.send({"type": "executed"})
        fork, waitpid, monotonic, sleep = os.fork, os.waitpid, time.monotonic, time.sleep
        while True:
            r = pipe.recv()
            if r.get("type") != "check":
                os._exit(0)
            pid = fork()
            if pid == 0:
                run_check(r, shell.user_ns, req["modules"], pipe, checks_spec, load, answers, codes)
            deadline, timed_out = monotonic() + float(r["timeout"]), False
            while True:
                done, status = waitpid(pid, os.WNOHANG)
                if done:
                    break
                if monotonic() > deadline:
                    _kill_group(pid)
                    _, status = waitpid(pid, 0)
                    timed_out = True
                    break
                sleep(0.002)
            pipe.send({"type": "check_exit", "seq": r["seq"], "status": status, "timed_out": timed_out})
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    os._exit(70)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def load_check_module(key: str, spec: dict) -> types.ModuleType:
    """A fresh module object executed from the check module's source (as read by the grader)."""
    mod = types.ModuleType(key)
    mod.__file__ = spec["filename"]
    sys.modules[key] = mod
    exec(compile(spec["source"], spec["filename"], "exec"), mod.__dict__)
    return mod


def _check_child(r: dict, ns: dict, modules: dict, pipe: Pipe, checks_spec: dict, load,
                 answers: list[tuple[str, types.FunctionType]], codes: list[tuple[types.CodeType, str]]) -> None:
    """Run one probe and send its raw output (runs in the forked check child; never returns)."""
    msg = {"type": "result", "seq": r["seq"]}
    try:
        os.setpgid(0, 0)
        encode = load("minidit.grading.checks", checks_spec).encode  # fresh: the notebook may have patched it
        check = load(r["module"], modules[r["module"]]).CHECKS[r["index"]]
        if check.name != r["name"]:
            raise RuntimeError(f"check #{r['index']} of {r['module']} is {check.name!r}, not {r['name']!r}")
        args = {}
        for name in check.needs:
            if name not in ns:
                msg["missing"] = name
                break
            obj = ns[name]
            origin = getattr(obj, "__module__", "__main__") if isinstance(obj, (type, types.FunctionType)) else None
            if origin not in (None, "__main__"):
                msg["foreign"] = [name, str(origin)]
                break
            copied = _shares_code(obj, codes)
            if copied:
                msg["copied"] = [name, copied]
                break
            args[name] = obj
        else:
            disable(answers)
            torch.manual_seed(0)
            msg["value"] = encode(check.probe(**args))
    except BaseException as e:  # noqa: BLE001 — SystemExit, KeyboardInterrupt … are the submission's errors too
        msg["error"] = describe_error(e)[:1500]
    try:
        pipe.send(msg)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0)


def _shares_code(obj, codes: list[tuple[types.CodeType, str]]) -> str | None:
    """The label of a package function whose very code object `obj` (a function or a class's method) runs."""
    fns = [v for v in vars(obj).values() if isinstance(v, types.FunctionType)] if isinstance(obj, type) else [obj]
    for fn in fns:
        while isinstance(fn, types.FunctionType):  # a decorated function: the wrapper, then what it wraps
            for original, label in codes:
                if fn.__code__ is original:
                    return label
            fn = getattr(fn, "__wrapped__", None)
    return None


def main(argv: list[str]) -> None:
    read_fd, write_fd = int(argv[0]), int(argv[1])
    _preload()
    zygote(Pipe(read_fd, write_fd))


if __name__ == "__main__":
    main(sys.argv[1:])
