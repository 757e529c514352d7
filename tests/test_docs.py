"""The examples in the docstrings, the README and the documentation pages run and print what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the pages whose ```python blocks run: the README and every page of the documentation site
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

#: a fenced python block (indented ones too: a block inside a list item), with the line before it
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n(?P<indent>[ ]*)```python\n(?P<code>.*?)\n(?P=indent)```", flags=re.S)


def _blocks() -> list[tuple[str, int, str]]:
    """``(page, index, code)`` of every ```python block of :data:`PAGES` that runs as written.

    Two kinds are run elsewhere or not at all, each marked on the line before the block: ``<!-- file: NAME -->``
    (a ``torchrun`` script, launched by tests/distributed/test_docs_torchrun.py) and ``<!-- fragment -->`` (an
    excerpt that needs the program around it, e.g. a model built in an earlier block).
    """
    found = []
    for page in PAGES:
        for i, m in enumerate(_BLOCK.finditer("\n" + (ROOT / page).read_text())):
            if m["before"].strip().startswith(("<!-- file:", "<!-- fragment")):
                continue
            code = "\n".join(line[len(m["indent"]):] for line in m["code"].split("\n"))
            found.append((page, i, code + "\n"))
    return found


def test_the_pages_have_examples() -> None:
    pages = {page for page, _, _ in _blocks()}
    assert {"README.md", "docs/mxnet-system.md", "docs/kernels.md", "docs/torch.md"} <= pages


#: an import of an optional extra (or of the compiled kernels, which need llvmlite): such a block is a
#: `frameworks` test (the NumPy-only run skips it)
_EXTRA_IMPORT = re.compile(
    r"^\s*(?:import|from)\s+(?:torch|jax|optax|flax|keras|lightning|transformers|numba|triton|sklearn|matplotlib"
    r"|llvmlite|ftmlopt\.kernels)\b",
    flags=re.M,
)


@pytest.mark.parametrize(
    ("page", "code"),
    [
        pytest.param(page, code, id=f"{page}-{i}", marks=[pytest.mark.frameworks] if _EXTRA_IMPORT.search(code) else [])
        for page, i, code in _blocks()
    ],
)
def test_python_blocks_run(page: str, code: str, tmp_path: Path) -> None:
    """Every ```python block of the README and of docs/*.md runs as it is, in a fresh interpreter."""
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"a block of {page} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
