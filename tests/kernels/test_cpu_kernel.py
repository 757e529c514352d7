"""The CPU kernels against the readable rule (:mod:`ftmlopt.rule`), step by step, state included.

In float64 the kernels perform the rule's operations in the rule's order without FMA contraction,
so the results must be *bit-identical* to ``rule.compact_step`` / ``rule.mxnet_step`` run with
NumPy. float32 and the half types are held to the float64 rule with a tolerance, one step at a
time from the kernel's own previous state.
"""

from __future__ import annotations

import itertools
import platform
import zlib

import numpy as np
import pytest
import torch

from ftmlopt import rule
from ftmlopt.kernels import cpu, cpu_lowbit, omp_team
from ftmlopt.torch._constants import StepOptions, StepTensors
from ftmlopt.torch._fused import _fused_ftml

OPTIONS = [
    dict(),
    dict(weight_decay=0.05),
    dict(weight_decay=0.05, decoupled=True),
    dict(clip=0.3),
    dict(maximize=True, clip=1e-3),
    dict(weight_decay=0.01, decoupled=True, maximize=True, clip=0.7),
]
SIZES = [1, 7, 100, 70_000, 200_003]  # several pieces and several threads for the larger ones
HYPER = dict(beta1=0.6, beta2=0.999, eps=1e-8)


def _arrays(rng: np.random.Generator, compact: bool, dtype: type = np.float64) -> dict[str, list[np.ndarray]]:
    out = {"w": [rng.standard_normal(n).astype(dtype) for n in SIZES]}
    out["v"] = [np.abs(rng.standard_normal(n)).astype(dtype) * 0.1 for n in SIZES]
    if not compact:
        out["d"] = [np.abs(rng.standard_normal(n)).astype(dtype) + 1.0 for n in SIZES]
        out["z"] = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    return out


@pytest.mark.parametrize(("threads", "where"), [(1, "team"), (2, "team"), (3, "team"), (2, "pool"), (3, "pool")])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_float64_kernel_is_bit_identical_to_the_rule(compact, opt, threads, where, monkeypatch) -> None:
    # "team": torch's OpenMP team where this process has one (torch is imported here); "pool": the fallback
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    if where == "pool":
        monkeypatch.setattr(omp_team, "team", lambda: None)
    rng = np.random.default_rng(10 * opt + compact)
    got = _arrays(rng, compact)
    want = {k: [a.copy() for a in v] for k, v in got.items()}
    for t, lr in zip(range(1, 5), (1e-2, 3e-3, 0.5, 1e-2)):
        gs = [rng.standard_normal(n) for n in SIZES]
        c = rule.constants(lr, t, **HYPER, **OPTIONS[opt])
        for i, g in enumerate(gs):
            if compact:
                want["w"][i], want["v"][i] = rule.compact_step(want["w"][i], g, want["v"][i], c, sqrt=np.sqrt,
                                                               clip=np.clip)
            else:
                want["w"][i], want["d"][i], want["v"][i], want["z"][i] = rule.mxnet_step(
                    want["w"][i], g, want["d"][i], want["v"][i], want["z"][i], c, sqrt=np.sqrt, clip=np.clip)
        cpu.step_arrays(got["w"], gs, got["v"], c, compact=compact, ds=got.get("d", ()), zs=got.get("z", ()),
                        threads=threads)
        for key in got:
            for a, b in zip(got[key], want[key]):
                assert a.tobytes() == b.tobytes(), (key, t)


@pytest.mark.parametrize("compact", [True, False])
def test_float32_kernel_follows_the_float64_rule_one_step_at_a_time(compact) -> None:
    rng = np.random.default_rng(3)
    arrays = _arrays(rng, compact, np.float32)
    for t in range(1, 4):
        gs = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        c = rule.constants(1e-2, t, **HYPER, weight_decay=0.01, clip=0.5)
        before = {k: [a.astype(np.float64) for a in v] for k, v in arrays.items()}
        cpu.step_arrays(arrays["w"], gs, arrays["v"], c, compact=compact, ds=arrays.get("d", ()),
                        zs=arrays.get("z", ()), threads=2)
        for i, g in enumerate(gs):
            g64 = g.astype(np.float64)
            if compact:
                ref = dict(zip("wv", rule.compact_step(before["w"][i], g64, before["v"][i], c, sqrt=np.sqrt,
                                                       clip=np.clip)))
            else:
                ref = dict(zip("wdvz", rule.mxnet_step(before["w"][i], g64, before["d"][i], before["v"][i],
                                                       before["z"][i], c, sqrt=np.sqrt, clip=np.clip)))
            for key, value in ref.items():
                # z (and w = -z/d) comes from a sum whose terms are far larger than it: the absolute
                # error scales with the terms, so the tolerance has a part relative to the array's scale
                scale = float(np.abs(value).max()) if value.size else 0.0
                np.testing.assert_allclose(arrays[key][i], value, rtol=3e-6, atol=1e-6 * scale + 1e-7,
                                           err_msg=f"{key} step {t}")


DTYPES = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
TOL = {torch.float64: (0, 0), torch.float32: (3e-6, 1e-7), torch.bfloat16: (8e-3, 1e-4), torch.float16: (1e-3, 1e-5)}


@pytest.mark.parametrize(("p_dtype", "s_dtype"), DTYPES)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("case", ["plain", "wd+clip", "decoupled+maximize", "grad_scale", "found_inf"])
def test_torch_fused_step_against_the_rule(p_dtype, s_dtype, compact, case) -> None:
    """``FTML(fused=True)``'s step (the registered op) per step from its own state, every dtype pair, no staging."""
    # a seed of its own per case that does not depend on PYTHONHASHSEED (hash() of a str does): with
    # hash(), 4 in 1,000 runs drew a gradient that nearly cancels its weight decay (|g + w * wd| ~ 3e-8,
    # near eps), where float32's g' differs from the float64 rule's by 1 % and so does the step
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}/{compact}".encode()) % 1000)
    opts = {"plain": {}, "wd+clip": dict(weight_decay=0.02, clip_gradient=0.4),
            "decoupled+maximize": dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
            "grad_scale": {}, "found_inf": {}}[case]
    kw = dict(weight_decay=0.0, clip_gradient=None, decoupled_weight_decay=False, maximize=False)
    kw.update(opts)
    sizes = [5, 70_001]
    ws = [torch.randn(n, generator=gen).to(p_dtype) for n in sizes]
    keys = ("v",) if compact else ("d", "v", "z")
    state = {k: [torch.zeros(n, dtype=s_dtype) for n in sizes] for k in keys}
    steps = [torch.zeros(()) for _ in sizes]
    addresses = [t.data_ptr() for t in itertools.chain(ws, *state.values())]
    for t in range(1, 4):
        scale = 8.0 if case == "grad_scale" else None
        gs = [(torch.randn(n, generator=gen) * (scale or 1.0)).to(p_dtype) for n in sizes]
        before = [{k: x.double().numpy().copy() for k, x in [("w", ws[i]), *((k, state[k][i]) for k in keys)]}
                  for i in range(len(sizes))]
        g_before = [g.double().numpy().copy() for g in gs]  # copies: .double() of a float64 tensor is itself
        found_inf = torch.ones(()) if case == "found_inf" and t == 2 else None
        _fused_ftml(StepTensors(ws, gs, state.get("d", []), state["v"], state.get("z", []), steps),
                    StepOptions(lr=1e-2, beta1=0.6, beta2=0.999, eps=1e-8, compact=compact, **kw),
                    grad_scale=None if scale is None else torch.tensor(scale), found_inf=found_inf)
        if found_inf is not None:
            for i in range(len(sizes)):
                for key, value in before[i].items():
                    x = ws[i] if key == "w" else state[key][i]
                    assert np.array_equal(x.double().numpy(), value), key
            assert all(float(s) == 1.0 for s in steps)
            continue
        step_t = int(float(steps[0]))
        c = rule.constants(1e-2, step_t, 0.6, 0.999, 1e-8, weight_decay=kw["weight_decay"],
                           decoupled=kw["decoupled_weight_decay"], clip=kw["clip_gradient"], maximize=kw["maximize"],
                           grad_scale=None if scale is None else 1.0 / scale)
        for i in range(len(sizes)):
            b = before[i]
            if compact:
                ref = dict(zip("wv", rule.compact_step(b["w"], g_before[i], b["v"], c, sqrt=np.sqrt, clip=np.clip)))
            else:
                ref = dict(zip("wdvz", rule.mxnet_step(b["w"], g_before[i], b["d"], b["v"], b["z"], c, sqrt=np.sqrt,
                                                       clip=np.clip)))
            for key, value in ref.items():
                x = ws[i] if key == "w" else state[key][i]
                rtol, atol = TOL[x.dtype]
                atol = atol * (1.0 + 10 * float(np.abs(value).max()))  # cancellation in z: see the float32 test
                if scale is not None and x.dtype == torch.float64:
                    rtol, atol = 1e-14, 1e-300  # g / s against g * (1/s): one rounding apart
                np.testing.assert_allclose(x.double().numpy(), value, rtol=rtol, atol=atol, err_msg=f"{key} t={t}")
            if scale is not None:  # the unscaled gradient is written back (torch's fused protocol)
                np.testing.assert_allclose(gs[i].double().numpy(), g_before[i] / scale, rtol=TOL[p_dtype][0],
                                           atol=TOL[p_dtype][1])
    # zero-copy: the step wrote into the tensors themselves
    assert addresses == [t.data_ptr() for t in itertools.chain(ws, *state.values())]
    assert all(float(s) == (2.0 if case == "found_inf" else 3.0) for s in steps)


def test_the_kernels_vectorize_and_do_not_contract_to_fma() -> None:
    asm = cpu.assembly(cpu.Spec("compact", "float32", "float32", coupled_wd=True, clip=True))
    assert "sqrtps" in asm  # packed square roots: the loop is vectorized
    assert "vfmadd" not in asm and "vfmsub" not in asm and "vfnmadd" not in asm  # no FMA: rule order kept


def _prefetched(asm: str) -> dict[int, set[str]]:
    """The operands of the assembly's prefetch instructions, by their constant byte offset."""
    out: dict[int, set[str]] = {}
    for line in asm.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("prefetch") and "(" in parts[1]:
            offset = parts[1].split("(")[0]
            out.setdefault(int(offset or 0), set()).add(parts[1])
    return out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86-64 assembly")
def test_the_kernels_prefetch_every_stream_ahead() -> None:
    # Speed only (docs/benchmarks.md); what it must not change, the bits, the tests above hold.
    # float state: w, g and v, each PREFETCH_AHEAD float32 elements past the strip being stepped
    asm = cpu.assembly(cpu.Spec("compact", "float32", "float32"))
    assert len(_prefetched(asm).get(4 * cpu.PREFETCH_AHEAD, set())) >= 3, _prefetched(asm)
    # low-bit: w and g (float32) and the 8-bit codes (one byte each), per vector
    module = cpu._module(cpu_lowbit._codegen(cpu_lowbit.LowbitSpec(8, "float32")))
    found = _prefetched(str(cpu._target_machine().emit_assembly(module)))
    assert len(found.get(4 * cpu.PREFETCH_AHEAD, set())) >= 2 and found.get(cpu.PREFETCH_AHEAD), found


def test_kernels_import_only_the_rule_from_ftmlopt() -> None:
    """Statically: every runtime import of ftmlopt in kernels/ is ftmlopt.rule, ftmlopt.lowbit (the low-bit
    format, written once next to the rule and importing only the rule) or kernels/ itself."""
    import ast
    from pathlib import Path

    import ftmlopt.kernels
    import ftmlopt.lowbit

    found = set()
    for path in Path(ftmlopt.kernels.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        type_checking = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
        skip = {id(x) for block in type_checking for x in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftmlopt"):
                found |= {f"{node.module}.{a.name}" if node.module == "ftmlopt" else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ftmlopt")}
    assert found, "the scan found no ftmlopt import at all"
    assert {m for m in found if not m.startswith("ftmlopt.kernels")} == {"ftmlopt.rule", "ftmlopt.lowbit"}, found
    lowbit_imports = {n.module for n in ast.walk(ast.parse(Path(ftmlopt.lowbit.__file__).read_text()))
                      if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("ftmlopt")}
    assert lowbit_imports == {"ftmlopt"}  # `from ftmlopt import rule`, nothing else
