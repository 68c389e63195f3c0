"""What every measurement records beside its figures: the command that reproduces it and the machine it ran on."""

from __future__ import annotations

import os
import platform
import shlex
import sys

import torch

from minidit.checkpoint import write_json


def command_line(program: str, argv: list[str] | None = None) -> str:
    """The shell command `<program> <arguments>`, quoted where an argument needs it (program: e.g. "minidit",
    "python benchmarks/throughput.py"); the arguments given as argv, or this process's own when argv is None."""
    return shlex.join([*shlex.split(program), *(sys.argv[1:] if argv is None else argv)])


def machine(device: torch.device | str | None = None) -> dict:
    """Platform, CPU, Python and torch versions, intra-op threads, the device (if given) and the load average now."""
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            **({"device": str(device)} if device is not None else {})}


def save_result(path: str | os.PathLike | None, result: dict) -> None:
    """Write `result` as JSON to `path` (atomically, minidit.checkpoint.write_json) and say so; nothing if None."""
    if path is not None:
        print(f"wrote {write_json(path, result)}", file=sys.stderr)
