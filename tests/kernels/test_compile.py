"""``torch.compile`` sees the fused CPU step as one registered op and gives the eager results bit for bit."""

from __future__ import annotations

import pytest
import torch

from ftmlopt.torch import FTML
from ftmlopt.torch._constants import StepOptions, StepTensors
from ftmlopt.torch._fused import _fused_ftml


def _pair(compact: bool, fused: bool | None) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(1 + compact)
    out = []
    for _ in range(2):
        gen.manual_seed(1 + compact)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((70,), (3, 5))]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        out.append((ps, FTML(ps, lr=0.01, weight_decay=0.1, clip_gradient=0.5, fused=fused, compact=compact)))
    return out[0], out[1]


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("fused", [True, None])  # None: the default dispatch, which is fused on the CPU
def test_compiled_step_matches_eager_fused(compact, fused) -> None:
    (ps, opt), (qs, ref) = _pair(compact, fused)
    step = torch.compile(opt.step, backend="eager")
    for _ in range(3):
        step()
        ref.step()  # eager (fused=None dispatches to the fused kernel on the CPU)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, ref.state[q][key]), key


def _functional(ps, gs, vs, steps) -> None:
    _fused_ftml(StepTensors(ps, gs, [], vs, [], steps),
                StepOptions(lr=0.01, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
                            decoupled_weight_decay=False, compact=True, maximize=True))


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_fullgraph_compile_of_the_fused_step(backend) -> None:
    gen = torch.Generator().manual_seed(4)
    lists = [[torch.randn(33, generator=gen) for _ in range(3)] for _ in range(2)]
    lists += [[torch.zeros(33) for _ in range(3)], [torch.zeros(()) for _ in range(3)]]
    ref = [[t.clone() for t in lst] for lst in lists]
    compiled = torch.compile(_functional, backend=backend, fullgraph=True)  # one op: no graph break allowed
    for _ in range(3):
        compiled(*lists)
        _functional(*ref)
    for got, want in zip(lists, ref):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert float(lists[3][0]) == 3.0


def test_the_step_is_one_registered_op() -> None:
    gen = torch.Generator().manual_seed(5)
    lists = [[torch.randn(9, generator=gen)] for _ in range(2)] + [[torch.zeros(9)], [torch.zeros(())]]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(_functional, backend=backend, fullgraph=True)(*lists)
    calls = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.ftmlopt.fused_ftml_.default]
