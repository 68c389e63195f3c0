"""Checks: what an assignment tests, how a probe's raw output travels back from the sandbox, how it is judged.

A `Check` has two halves that never run in the same process:
- `probe(**names)` runs in the sandbox, next to the student's code. Its parameters name the notebook objects it
  needs (`def probe(patchify): ...`); it returns raw outputs (tensors, numbers, strings, lists, dicts).
- `expect()` (and optionally `judge(got, want)`) run in the grader. `expect` computes the reference answer with
  the package on the same deterministic inputs; `judge` returns None for a pass or a message saying what is wrong
  (default: `compare`, an `allclose` that explains the first difference).
The sandbox's output is data (JSON: tensors as shape + flat list), never pickles or code, so nothing a
submission does in its own process can decide a check: it can only send numbers, and the grader compares them.
"""

from __future__ import annotations

import inspect
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

VISIBILITIES = ("visible", "hidden", "after_due_date", "after_published")  # Gradescope's values
MAX_ELEMENTS = 1_000_000  # largest tensor a probe may send back
FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


@dataclass
class Check:
    """One graded check: `probe` runs in the sandbox on notebook names, `expect`/`judge` in the grader."""

    name: str
    points: float
    probe: Callable[..., Any]
    expect: Callable[[], Any] | None = None
    judge: Callable[[Any, Any], str | None] | None = None
    timeout: float = 10.0
    visibility: str = "visible"
    atol: float = 1e-5
    rtol: float = 1e-4

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a check needs a non-empty name, got {self.name!r}")
        if not isinstance(self.points, (int, float)) or self.points < 0:
            raise ValueError(f"check {self.name!r}: points must be a number ≥ 0, got {self.points!r}")
        if not callable(self.probe):
            raise ValueError(f"check {self.name!r}: probe must be callable, got {type(self.probe).__name__}")
        if self.expect is None and self.judge is None:
            raise ValueError(f"check {self.name!r}: give expect (a reference answer), judge, or both")
        if not self.timeout > 0:
            raise ValueError(f"check {self.name!r}: timeout must be > 0 seconds, got {self.timeout!r}")
        if self.visibility not in VISIBILITIES:
            raise ValueError(f"check {self.name!r}: visibility must be one of {VISIBILITIES}, got {self.visibility!r}")

    @property
    def needs(self) -> tuple[str, ...]:
        """The notebook names the probe takes (its parameter names)."""
        return tuple(inspect.signature(self.probe).parameters)

    def verdict(self, got: Any, want: Any) -> str | None:
        """None when `got` passes, else a short message (runs in the grader)."""
        if self.judge is not None:
            return self.judge(got, want)
        if isinstance(want, Answer):
            return want.explain(got, self.atol, self.rtol)
        return compare(got, want, self.atol, self.rtol)


@dataclass
class Answer:
    """What `expect` may return: the right value, and what known mistakes would give instead (description → value).

    When `got` is not the value but matches a mistake's, the message names the mistake in words. A mistake's value
    may be given as a function of no arguments: it is computed only when needed (and ignored if it raises, e.g. when
    that mistake would not even run on the check's inputs)."""

    value: Any
    mistakes: dict[str, Any] = field(default_factory=dict)

    def explain(self, got: Any, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
        msg = compare(got, self.value, atol, rtol)
        if msg is None:
            return None
        for description, wrong in self.mistakes.items():
            try:
                if callable(wrong):
                    wrong = wrong()
                if compare(got, wrong, atol, rtol) is None:
                    return f"{description} ({msg})"
            except Exception:  # noqa: BLE001,S112 — a mistake's value that cannot be compared is no match
                continue
        return msg


# ---- the wire format: raw outputs as JSON-safe data ------------------------------------------------------
class ProtocolError(ValueError):
    """The sandbox sent something that is not a well-formed encoded value."""


@dataclass(frozen=True)
class Opaque:
    """A value the sandbox could not encode (its type name and a short repr)."""

    type_name: str
    text: str


def encode(value: Any, _depth: int = 0) -> Any:
    """Raw probe output → JSON-safe data (runs in the sandbox)."""
    if _depth > 20:
        return {"__object__": "nested too deeply", "repr": ""}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value) if isinstance(value, float) else int(value)
    if isinstance(value, torch.Tensor) and not value.is_complex():
        t = value.detach().cpu()
        if t.numel() > MAX_ELEMENTS:
            return {"__object__": "Tensor", "repr": f"a tensor with {t.numel()} elements (too large to compare)"}
        if t.dtype not in (torch.bool, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            t = t.double()
        return {"__tensor__": list(t.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "data": t.reshape(-1).tolist()}
    if isinstance(value, (list, tuple)):
        return [encode(v, _depth + 1) for v in value]
    if isinstance(value, dict):
        return {"__dict__": {str(k): encode(v, _depth + 1) for k, v in value.items()}}
    return {"__object__": type(value).__qualname__, "repr": reprlib.repr(value)[:200]}


def decode(data: Any, _depth: int = 0) -> Any:
    """JSON-parsed data from the sandbox → Python values and tensors (runs in the grader; validates everything)."""
    if _depth > 40:
        raise ProtocolError("value nested too deeply")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v, _depth + 1) for v in data]
    if not isinstance(data, dict):
        raise ProtocolError(f"unexpected {type(data).__name__}")
    if "__tensor__" in data:
        return _decode_tensor(data)
    if "__dict__" in data and isinstance(data["__dict__"], dict):
        return {str(k): decode(v, _depth + 1) for k, v in data["__dict__"].items()}
    if "__object__" in data:
        return Opaque(str(data["__object__"])[:100], str(data.get("repr", ""))[:200])
    raise ProtocolError("unknown encoded value")


def _decode_tensor(data: dict) -> torch.Tensor:
    shape, flat, dtype = data["__tensor__"], data.get("data"), str(data.get("dtype", ""))
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise ProtocolError("tensor shape must be a list of non-negative ints")
    if not isinstance(flat, list) or len(flat) != math.prod(shape) or len(flat) > MAX_ELEMENTS:
        raise ProtocolError("tensor data does not match its shape")
    if dtype == "bool":
        if not all(isinstance(v, bool) for v in flat):
            raise ProtocolError("bool tensor with non-bool data")
        return torch.tensor(flat, dtype=torch.bool).reshape(shape)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise ProtocolError("numeric tensor with non-numeric data")
    if dtype.startswith(("int", "uint")):
        return torch.tensor(flat, dtype=torch.int64).reshape(shape)
    # floats keep the sandbox's dtype (the values travelled as float64, exactly), so that checks can see it
    return torch.tensor(flat, dtype=torch.float64).reshape(shape).to(FLOAT_DTYPES.get(dtype, torch.float64))


# ---- judging -----------------------------------------------------------------------------------------------
def _kind(x: Any) -> str:
    if isinstance(x, Opaque):
        return f"{x.type_name} ({x.text})" if x.text else x.type_name
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _plain(x: Any) -> bool:
    """Only numbers, strings, None and lists of them (short enough to print)."""
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str))


def compare(got: Any, want: Any, atol: float = 1e-5, rtol: float = 1e-4, where: str = "") -> str | None:
    """None when `got` matches `want` (tensors/floats within atol + rtol·|want|), else what differs first."""
    at = f" at {where}" if where else ""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor of shape {tuple(want.shape)}{at}, got {_kind(got)}"
        if tuple(got.shape) != tuple(want.shape):
            return f"expected shape {tuple(want.shape)}{at}, got {tuple(got.shape)}"
        if want.dtype == torch.bool:
            bad = got.to(torch.bool) != want
            return None if not bad.any() else f"{int(bad.sum())} of {want.numel()} entries differ{at}"
        g, w = got.double(), want.double()
        if not torch.isfinite(g).all():
            return f"the result contains NaN or inf{at}"
        if g.numel() == 0:
            return None
        err = (g - w).abs()
        bad = err > atol + rtol * w.abs()
        if not bad.any():
            return None
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        return (f"values differ{at}{diagnose(g, w, atol, rtol)}: max |got − expected| = {err.max().item():.3g} "
                f"(tolerance {atol:g}); first at index {idx}: got {g[idx].item():.6g}, expected {w[idx].item():.6g}")
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"expected a dict with keys {sorted(want)}{at}, got {_kind(got)}"
        if set(got) != set(want):
            return f"expected keys {sorted(want)}{at}, got {sorted(got)}"
        for k in want:
            msg = compare(got[k], want[k], atol, rtol, f"{where}[{k!r}]" if where else repr(k))
            if msg:
                return msg
        return None
    if isinstance(want, (list, tuple)):
        if not isinstance(got, list) or len(got) != len(want):
            if _plain(want) and _plain(got) and len(repr(want)) + len(repr(got)) < 400:
                return f"expected {want!r}{at}, got {got!r}"
            n = len(got) if isinstance(got, list) else None
            return f"expected a list of {len(want)} items{at}, got {_kind(got) if n is None else f'{n} items'}"
        for i, (g, w) in enumerate(zip(got, want)):
            msg = compare(g, w, atol, rtol, f"{where}[{i}]")
            if msg:
                return msg
        return None
    if isinstance(want, float):
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return f"expected a number{at}, got {_kind(got)}"
        if math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want):
            return None
        return f"expected {want:.6g}{at}, got {got:.6g}"
    if got != want or type(got) is not type(want):
        shown = _kind(got) if isinstance(got, Opaque) else reprlib.repr(got)
        return f"expected {reprlib.repr(want)}{at}, got {shown}"
    return None


def diagnose(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> str:
    """A few words on HOW two same-shape tensors differ, when it is a simple pattern (sign, scale, offset, order)."""

    def close(a, b) -> bool:
        return bool(((a - b).abs() <= atol + rtol * b.abs()).all())

    g, w = got.detach().double().reshape(-1), want.detach().double().reshape(-1)
    if g.numel() < 2 or w.abs().max() <= atol:
        return ""
    if close(g, -w):
        return " (the sign is flipped)"
    k = int(w.abs().argmax())
    ratio = float(g[k] / w[k]) if w[k] != 0 else float("nan")
    if math.isfinite(ratio) and ratio != 0 and close(g, ratio * w):
        return f" (every value is {ratio:.4g} × the expected one: a scale factor)"
    if close(g - (g - w).mean(), w):
        return f" (every value is off by the same {float((g - w).mean()):+.4g}: a missing or extra offset)"
    if close(g.sort().values, w.sort().values):
        return " (the right values in the wrong order: check the order of axes or of the items)"
    return ""


# ---- helpers for writing checks ----------------------------------------------------------------------------
def randn(seed: int, *shape: int) -> torch.Tensor:
    """A standard-normal tensor that depends only on `seed` (the same in the sandbox and in the grader)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (std scale/√fan_in for matrices, 0.1·scale for vectors).

    Reference weights must not be zero (adaLN-Zero starts at zero, which would hide most mistakes).
    """
    g = torch.Generator().manual_seed(seed)
    for _, p in module.named_parameters():
        std = scale / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.1 * scale
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def raised(fn: Callable, *args, **kwargs) -> list[str]:
    """Names of the exception classes `fn(*args)` raised (its MRO), or [] when it returned normally."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 — the point is to see what was raised
        return [c.__name__ for c in type(e).__mro__]
    return []


def expects_error(name: str) -> Callable[[Any, Any], str | None]:
    """A judge for `raised(...)`: passes when an exception of class `name` (or a subclass) was raised."""

    def judge(got: Any, want: Any) -> str | None:
        if not isinstance(got, list) or not all(isinstance(n, str) for n in got):
            return f"expected a list of exception names, got {_kind(got)}"
        if name in got:
            return None
        return f"expected a {name}, but nothing was raised" if not got else f"expected a {name}, got {got[0]}"

    return judge
