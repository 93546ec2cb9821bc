"""Running a two-rank Lightning Fabric script for the integration tests: the script is rank 0 (``fabric.launch()``
starts rank 1 in its session), writes ``rank<r>.json`` into the folder it is given and prints ``rank <r> done``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_fabric_ranks(tmp_path: Path, name: str, source: str, timeout_s: float = 240) -> list[dict]:
    """Write ``source`` as ``tmp_path/name`` and run it with ``tmp_path`` as its argument; on a hang both ranks are
    killed (rank 1 lives in rank 0's session). Asserts both ranks finished; returns their JSON results."""
    script = tmp_path / name
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}  # Fabric picks a free port
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 too: Fabric started it in rank 0's session
        stdout, stderr = proc.communicate()
    assert "rank 0 done" in stdout and "rank 1 done" in stdout, stdout[-3000:] + stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
