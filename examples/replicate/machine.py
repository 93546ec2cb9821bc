"""The machine a run trained on, as a JSON object for its ``run.json`` extras (``extras["machine"]``).

Training amplifies last-bit differences of the CPU's kernels: the committed toy run's last checkpoint
moved when the CI machine changed from an Intel Xeon to an AMD EPYC (same code, same torch wheel), and
nothing in the files said so. Recording the CPU model, the OS, Python, torch, its BLAS and CPU kernel
level and the thread count lets a reader tell a machine change from a code change. Reading these
changes no number the run computes.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_model", "machine_info", "machine_section"]

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


def machine_info(device=None) -> dict:
    """CPU model, machine, OS, Python, torch version and build's BLAS, CPU kernel level, torch threads and the
    kernel-choosing environment variables that are set (a few milliseconds; no number of a run changes); for a
    CUDA ``device`` (the speedrun's) also ``gpu``: its name, compute capability and CUDA version, as the GPU's
    kernels are then the ones that train."""
    import torch

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch; a diagnostic never stops the run it describes
        capability = None
    try:
        blas = _blas(torch.__config__.show())
    except Exception:  # a build without the config, or one that fails to print it
        blas = []
    info = {
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
    if device is not None and torch.device(device).type == "cuda":
        try:
            major, minor = torch.cuda.get_device_capability(device)
            info["gpu"] = (f"{torch.cuda.get_device_name(device)}; compute capability {major}.{minor}; "
                           f"CUDA {torch.version.cuda}")
        except Exception:  # a diagnostic never stops the run it describes
            info["gpu"] = None
    return info


#: The ``extras["machine"]`` fields that choose the kernels (the OS string, with its kernel release, does not).
_KERNEL_FIELDS = ("cpu", "torch", "blas", "cpu_capability", "threads", "env", "gpu")


def machine_section(runs) -> str:
    """A report section (Markdown) naming the machine(s) the runs trained on (``extras["machine"]``, see
    :func:`machine_info`), and saying so when they differ: a job resumed on another machine keeps its finished
    runs (trained on the first) and trains the rest on the second, and nothing else in the report would tell.
    Empty when no run recorded one (records made before review 26). Shared by the toy's and the speedrun's
    reports."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for r in runs:
        m = (r.info.extras or {}).get("machine")
        if isinstance(m, dict):
            key = json.dumps([m.get(k) for k in _KERNEL_FIELDS], sort_keys=True)
            env = m.get("env") or {}
            shown = ((f"GPU {m['gpu']}; " if m.get("gpu") else "")
                     + f"{m.get('cpu')}; torch {m.get('torch')}; CPU kernels {m.get('cpu_capability')}; "
                     f"torch threads {m.get('threads')}; BLAS {' / '.join(map(str, m.get('blas') or [])) or 'n/a'}; env "
                     + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) if isinstance(env, dict) and env
                        else "none"))
            groups.setdefault(key, (shown, []))[1].append(r.run_id)
    if not groups:
        return ""
    lines = ["## Machine", "", "What trained the runs (`run.json` `extras[\"machine\"]`; GPU if any, CPU, torch, its "
             "BLAS, CPU kernel level, threads, kernel-choosing environment variables):", ""]
    lines += [f"- {shown}: {', '.join(sorted(ids))}" for shown, ids in sorted(groups.values())]
    if len(groups) > 1:
        lines += ["", f"The runs were trained on {len(groups)} different machines or kernel settings (a job resumed "
                  "elsewhere?): their last digits may differ from a sweep trained on one."]
    return "\n".join(lines)
