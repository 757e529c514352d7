"""The ``torchrun`` examples of docs/distributed.md run as written (CPU, gloo, 2 processes).

Each fenced block preceded by ``<!-- file: NAME -->`` is written to NAME and launched with
``python -m torch.distributed.run --standalone --nproc-per-node 2 NAME`` (what ``torchrun`` runs);
the scripts assert their own results (ranks agree; a resumed run is bit-identical).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
BLOCK = re.compile(r"<!-- file: (?P<name>[\w.]+) -->\n```python\n(?P<code>.*?)```", re.S)


def _examples() -> dict[str, str]:
    return {m["name"]: m["code"] for m in BLOCK.finditer(DOC.read_text())}


def test_the_page_has_the_examples() -> None:
    assert set(_examples()) == {"ddp_ftml.py", "fsdp2_dcp.py"}


def _launch(script: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(tmp_path / "ckpt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


# A rank that finished its work (its asserts passed and rank 0 printed the result) can still be
# aborted by libstdc++ while the interpreter shuts down ("terminate called without an active
# exception"): a known teardown race of gloo's worker threads, seen here about once in ten loaded
# runs and never reproduced in isolation. Only that exact case is launched a second time.
_EXIT_ABORT = "terminate called without an active exception"


@pytest.mark.parametrize("name", ["ddp_ftml.py", "fsdp2_dcp.py"])
def test_torchrun_example_runs(name: str, tmp_path: Path) -> None:
    script = tmp_path / name
    script.write_text(_examples()[name])
    proc = _launch(script, tmp_path)
    if proc.returncode != 0 and " ok" in proc.stdout and _EXIT_ABORT in proc.stderr:
        proc = _launch(script, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " ok" in proc.stdout
