"""Re-execute and re-save the lessons and solutions with nbclient (maintainers and instructors: `make notebooks`).

    minidit notebooks notebooks solutions      # folders (every *.ipynb) or single files

Each notebook runs top to bottom in a fresh kernel of *this* Python environment (not whatever kernel named
"python3" Jupyter finds first), with its own folder as the working directory and a fixed environment
(PYTHONHASHSEED=0, OMP_NUM_THREADS=2; matplotlib's inline backend). A notebook is saved only when every cell ran without
an error, so a failing run never replaces a good committed version. Timings are printed (limit: 3 minutes each).
"""

from __future__ import annotations

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


def run_notebook(path: Path, timeout: int = 600) -> float:
    """Execute `path` in place (saved only on success); returns the seconds it took."""
    import ipykernel.kernelspec  # the course extras (Jupyter): only maintainers run notebooks from the command line
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    class CurrentEnv(KernelSpecManager):  # 'python3' = ipykernel in this interpreter, not whatever Jupyter finds
        def get_kernel_spec(self, kernel_name):
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                          **ipykernel.kernelspec.get_kernel_dict())

    nb = nbformat.read(path, as_version=4)
    os.environ.update(FIXED_ENV)  # the kernel inherits this process's environment
    km = KernelManager(kernel_name="python3", kernel_spec_manager=CurrentEnv())
    client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    return seconds


def run_notebooks(paths: list[str], timeout: int = 600) -> int:
    """Run every notebook named (folders expanded); 0 when all ran, 1 when any failed (failures are not saved)."""
    from nbclient.exceptions import CellExecutionError

    failed = 0
    for path in notebook_paths(paths):
        try:
            seconds = run_notebook(path, timeout)
        except CellExecutionError as e:
            failed += 1
            print(f"FAILED {path} (not saved):\n{str(e)[-3000:]}", file=sys.stderr)
            continue
        print(f"{path}: {seconds:.1f} s" + ("  (over the 3-minute budget!)" if seconds > 180 else ""))
    return 1 if failed else 0
