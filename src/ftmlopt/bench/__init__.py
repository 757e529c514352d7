r"""``ftmlopt bench``: every FTML implementation against ``torch.optim.Adam``, in one interleaved run.

An optimizer step is memory-bound, so every figure is a *ratio* taken round by round on the
same machine at the same time (see ``docs/benchmarks.md``): in each round every implementation
steps once, A B C A B C ..., and the table reports

* the median and min-max time per step (ms) and the throughput (G elements/s, and GB/s from the
  traffic model of each implementation: bytes read and written per element, by dtype);
* ``x fused Adam``: the median over rounds of (time / time of ``Adam(fused=True)``);
* ``% floor``: the median over rounds of (floor time / time), where the floor is a kernel that
  moves exactly that form's bytes and computes nothing (:mod:`ftmlopt.bench.floors`): ``floor``
  for the three-state form (read w, g, d, v, z; write w, d, v, z), ``floor compact`` for the
  compact form and ``floor adam`` for Adam's traffic (read w, g, m, v; write w, m, v);
* ``state B/param``: optimizer state bytes per parameter after the step (Adam: 8 in float32);
* ``peak extra``: memory allocated during one step beyond what is already held (torch's
  allocation events and ``tracemalloc`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

``--dtype`` takes a comma-separated list (default ``float32,bfloat16,float16``); float16/bfloat16
runs add the ``multi_precision=True`` rows (float32 master copy and state). After the tables come,
unless ``--no-extras``: the first fused step of a new process (two fresh interpreters, kernel
compilation included), and a model's forward+backward time after fused FTML steps against after
fused Adam steps (fresh interpreters, ``--threads`` honoured), with the thread counts before/after.
The load average is printed with the numbers.

Workloads (``--sizes``, comma separated): ``16m`` (16 tensors of 2**20), ``resnet18`` (its 62
parameter shapes, 11.7M elements), ``tiny`` (2,000 tensors of 1-64 elements) or ``NxM`` (N
tensors of M elements). ``--mxnet`` also times MXNet 1.9.1's own ``ftml_update`` operator
(per tensor, as its optimizer calls it) in an interpreter where ``import mxnet`` works; that
process is driven round by round, so its times are interleaved with the others.

The modules, one job each:

* :mod:`.cli`: the options, :func:`run` and :func:`main`;
* :mod:`.workloads`: the shapes and the implementations timed (add a provider there to time more);
* :mod:`.timing`: the interleaved rounds, peak memory, and the per-row summaries;
* :mod:`.report`: the printed tables and the machine facts;
* :mod:`.probes`: the fresh-process measurements (first step, forward+backward);
* :mod:`.mxnet_server`: MXNet's operator in its own interpreter, driven over JSON lines;
* :mod:`.floors`: the traffic floors; :mod:`.gpu_check`: the one-shot GPU validation script.

Example (``main(argv)`` runs the whole benchmark; the options are checked first):
    >>> from ftmlopt.bench import parse_dtypes, parse_sizes
    >>> {name: len(shapes) for name, shapes in parse_sizes("16m,tiny,3x1000").items()}, parse_dtypes("float32")
    ({'16m': 16, 'tiny': 2000, '3x1000': 3}, ['float32'])
"""

from __future__ import annotations

from ftmlopt._json import strict, write_json
from ftmlopt.bench.cli import add_arguments, main, parse_dtypes, parse_sizes, run
from ftmlopt.bench.workloads import WORKLOADS

__all__ = ["WORKLOADS", "add_arguments", "main", "parse_dtypes", "parse_sizes", "run", "strict", "write_json"]
