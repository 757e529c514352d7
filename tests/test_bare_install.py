"""``import ftmlopt`` and the MXNet system need nothing but NumPy: no extra is imported, even where installed.

Run in a fresh interpreter in which every optional extra is made unimportable, so the check is the same
in the full environment and in the NumPy-only one.
"""

from __future__ import annotations

import subprocess
import sys

EXTRAS = ("torch", "jax", "jaxlib", "optax", "flax", "keras", "numba", "llvmlite", "triton", "sklearn", "scipy",
          "matplotlib", "tqdm", "tensorflow", "lightning", "transformers", "pooch", "requests")

SCRIPT = f"""
import sys
EXTRAS = {EXTRAS!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ImportError(f"extra {{name}} imported")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
import ftmlopt, ftmlopt.optimizer, ftmlopt.lr_scheduler, ftmlopt.rule, ftmlopt.mxnet, ftmlopt.datasets
import ftmlopt.experiments.data
from ftmlopt import ftml_update

assert ftmlopt.lr_scheduler.FactorScheduler(step=10, factor=0.5, base_lr=0.1)(25) == 0.025
opt = ftmlopt.optimizer.create("ftml", learning_rate=0.1)
updater = ftmlopt.optimizer.get_updater(opt)
w = np.ones(3, dtype=np.float32)
updater(0, np.full(3, 0.5, dtype=np.float32), w)
assert np.all(w < 1), w
w2, g = np.ones(3, dtype=np.float32), np.full(3, 0.5, dtype=np.float32)
d, v, z = (np.zeros(3, dtype=np.float32) for _ in range(3))
ftml_update(w2, g, d, v, z, lr=0.1, t=1, out=w2)
assert np.array_equal(w, w2), (w, w2)
print(sorted(m for m in sys.modules if m.split(".")[0] in EXTRAS))
"""


def test_core_imports_no_extra() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
