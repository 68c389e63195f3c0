"""Re-execute and re-save notebooks with nbclient (maintainers: `make notebooks`).

    python -m minidit.notebooks run notebooks solutions      # folders (every *.ipynb) or single files

Each notebook runs top to bottom in a fresh kernel of *this* Python environment (not whatever kernel named
"python3" Jupyter finds first), with its own folder as the working directory and a fixed environment
(PYTHONHASHSEED=0, OMP_NUM_THREADS=2; matplotlib's inline backend). A notebook is saved only when every cell ran without
an error, so a failing run never replaces a good committed version. Timings are printed (limit: 3 minutes each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

FIXED_ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def notebook_paths(paths: list[str]) -> list[Path]:
    """Every notebook named, with folders expanded to their *.ipynb (sorted, checkpoints skipped)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.glob("*.ipynb"))
        elif p.suffix == ".ipynb" and p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"not a notebook or a folder: {p}")
    return out


def _kernel_manager():
    """A kernel manager whose 'python3' is ipykernel in this interpreter (sys.executable)."""
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    class CurrentEnv(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                          **ipykernel.kernelspec.get_kernel_dict())

    return KernelManager(kernel_name="python3", kernel_spec_manager=CurrentEnv())


def run_notebook(path: Path, timeout: int = 600) -> float:
    """Execute `path` in place (saved only on success); returns the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    os.environ.update(FIXED_ENV)  # the kernel inherits this process's environment
    client = NotebookClient(nb, km=_kernel_manager(), timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidit.notebooks", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="execute notebooks top to bottom and save them with their outputs")
    r.add_argument("paths", nargs="+", help="notebooks or folders of notebooks")
    r.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = p.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    failed = 0
    for path in notebook_paths(args.paths):
        try:
            seconds = run_notebook(path, args.timeout)
        except CellExecutionError as e:
            failed += 1
            print(f"FAILED {path} (not saved):\n{str(e)[-3000:]}", file=sys.stderr)
            continue
        slow = "  (over the 3-minute budget!)" if seconds > 180 else ""
        print(f"{path}: {seconds:.1f} s{slow}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
