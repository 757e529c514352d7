"""Every docstring example in the package runs for real: one test per module, found by walking ``src/``.

Modules are found from the files (not by importing), so a module that fails to import fails here
instead of being silently left out. A module whose source imports an optional framework, in its code
or in its examples, is a ``frameworks`` test: the NumPy-only run (``make test-bare``) deselects it
and the full run (``make test``) imports it and runs its examples.

``ftmlopt.keras`` is the one module not run here: Keras fixes its backend when it is first imported,
so its examples run once per backend in ``tests/keras/keras_backend_cases.py``.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: run per Keras backend by tests/keras (see the module docstring)
ELSEWHERE = {"ftmlopt.keras": "tests/keras/keras_backend_cases.py runs it under every backend"}

#: an import of something the NumPy-only install does not have (in code or in an example)
_OPTIONAL = re.compile(
    r"^\s*(?:>>>\s*|\.\.\.\s*)?(?:import|from)\s+(?:torch|jax|optax|flax|keras|llvmlite|triton|sklearn|matplotlib"
    r"|tqdm|gymnasium|pooch|ml_dtypes|tensorflow|lightning|transformers"
    r"|ftmlopt\.(?:torch|optax|keras|kernels|bench|experiments))\b",
    flags=re.M,
)


def _modules() -> list[tuple[str, bool]]:
    """``(dotted name, needs a framework)`` for every module under src/ftmlopt."""
    found = []
    for path in sorted((SRC / "ftmlopt").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name in ELSEWHERE:
            continue
        heavy = parts[1:2] in (["torch"], ["kernels"], ["bench"], ["experiments"], ["optax"], ["keras"])
        found.append((name, heavy or bool(_OPTIONAL.search(path.read_text()))))
    return found


MODULES = _modules()

#: modules whose examples are the user's first runnable contact with them: each must have some
MUST_HAVE_EXAMPLES = {
    "ftmlopt.rule", "ftmlopt.lowbit", "ftmlopt.mxnet.operator", "ftmlopt.mxnet._kernel", "ftmlopt.mxnet.optimizer",
    "ftmlopt.mxnet.lr_scheduler", "ftmlopt.torch", "ftmlopt.torch.ftml", "ftmlopt.torch.functional",
    "ftmlopt.torch._fused", "ftmlopt.optax", "ftmlopt.kernels.cpu", "ftmlopt.kernels.triton_cuda",
    "ftmlopt.bench", "ftmlopt.bench.floors", "ftmlopt.bench.gpu_check", "ftmlopt.datasets",
    "ftmlopt.experiments.datasets", "ftmlopt.experiments.data", "ftmlopt.experiments.harness", "ftmlopt._json",
    "ftmlopt.bench.cli", "ftmlopt.bench.workloads", "ftmlopt.bench.timing", "ftmlopt.bench.report",
    "ftmlopt.bench.probes", "ftmlopt.bench.mxnet_server",
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[pytest.mark.frameworks] if heavy else []) for name, heavy in MODULES],
)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in finder.find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert result.attempted > 0 or name not in MUST_HAVE_EXAMPLES, f"{name} lost its examples"


def test_the_walk_finds_the_package() -> None:
    """The walk sees the modules that carry examples, so an empty walk cannot pass."""
    names = {name for name, _ in MODULES}
    assert MUST_HAVE_EXAMPLES <= names
    with_examples = sum(">>>" in p.read_text() for p in (SRC / "ftmlopt").rglob("*.py"))
    assert with_examples >= 20
