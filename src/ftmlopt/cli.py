"""The ``ftmlopt`` command line: ``ftmlopt demo``, ``ftmlopt reproduce TASK``, ``ftmlopt bench``.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
this file only wires them together, importing each lazily so that ``ftmlopt --help`` needs
nothing beyond the standard library and NumPy.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ftmlopt.experiments.demo", "train a small model with FTML and baselines, print a table, save a plot"),
    "reproduce": ("ftmlopt.experiments.reproduce", "re-run one of the paper's experiments at CPU scale"),
    "bench": ("ftmlopt.bench.cli", "time every FTML implementation against torch.optim.Adam (one interleaved run)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftmlopt", description="FTML optimizer: demo, experiments, benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # an optional extra is missing: say which
            sp.set_defaults(_missing=exc)
            continue
        mod.add_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ftmlopt`` console script and of ``python -m ftmlopt``."""
    args = build_parser().parse_args(argv)
    missing = getattr(args, "_missing", None)
    if missing is not None:
        print(
            f"ftmlopt {args.command}: missing optional dependency {missing.name!r}; "
            "install the extras with: pip install 'ftmlopt[demo]' (or '.[demo]' from a checkout)",
            file=sys.stderr,
        )
        return 2
    mod = importlib.import_module(args._module)
    return int(mod.run(args) or 0)
