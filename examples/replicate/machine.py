"""The machine a run trained on, as a JSON object for its ``run.json`` extras (``extras["machine"]``).

Training amplifies last-bit differences of the CPU's kernels: the committed toy run's last checkpoint
moved when the CI machine changed from an Intel Xeon to an AMD EPYC (same code, same torch wheel), and
nothing in the files said so. Recording the CPU model, the OS, Python, torch, its BLAS and CPU kernel
level and the thread count lets a reader tell a machine change from a code change. Reading these
changes no number the run computes.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_model", "machine_info"]

#: Environment variables that choose CPU kernels or threads (``MKL_CBWR`` moves results by an ULP or more).
KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "ATEN_CPU_CAPABILITY")


#: ``/proc/cpuinfo`` fields that name an ARM core where Linux writes no ``model name`` (Graviton 2 and 3 differ
#: only in them).
ARM_FIELDS = ("CPU implementer", "CPU part", "CPU variant", "CPU revision")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name: the first ``model name`` line of ``/proc/cpuinfo`` (Linux; ``cpuinfo`` is its
    text, read when ``None``), else its ARM core fields (:data:`ARM_FIELDS`), else on macOS ``sysctl``'s
    ``machdep.cpu.brand_string`` (e.g. ``Apple M2 Pro``), else ``platform.processor()``, else ``"unknown"``.
    ``platform.processor()`` alone names only the architecture (``arm``, ``aarch64``), the same for every chip."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    arm = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if sep and key.lower() in ("model name", "hardware", "cpu model") and value:
            return value
        if sep and key in ARM_FIELDS and value:
            arm.setdefault(key, value)  # the first core's
    if arm:
        return ", ".join(f"{k} {arm[k]}" for k in ARM_FIELDS if k in arm)
    if platform.system() == "Darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "unknown"


def _blas(config: str) -> list[str]:
    """The lines of ``torch.__config__.show()`` that name the BLAS / math libraries (MKL, OpenBLAS, ...)."""
    out = []
    for line in config.splitlines():
        line = line.strip(" -\t")
        if line.startswith("Build settings:"):
            out += [s.strip() for s in line.split(":", 1)[1].split(",")
                    if s.strip().split("=")[0] in ("BLAS_INFO", "LAPACK_INFO")]
        elif any(k in line for k in ("Math Kernel Library", "MKL-DNN", "OpenBLAS", "BLAS")):
            out.append(line)
    return out


def machine_info() -> dict:
    """CPU model, machine, OS, Python, torch version and build's BLAS, CPU kernel level, torch threads and the
    kernel-choosing environment variables that are set (a few milliseconds; no number of a run changes)."""
    import torch

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch; a diagnostic never stops the run it describes
        capability = None
    try:
        blas = _blas(torch.__config__.show())
    except Exception:  # a build without the config, or one that fails to print it
        blas = []
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "blas": blas,
        "cpu_capability": capability,
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }
