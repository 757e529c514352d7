"""``ftmlopt reproduce TASK``: re-run one of the paper's experiments at CPU scale.

TASK is ``timeseries`` (§4.6), ``mnist`` (§4.1a), ``babi`` (§4.3) or ``charlm`` (stand-in for §4.4);
each lives in :mod:`ftmlopt.experiments.tasks`. For every optimizer the learning rate is chosen from a
grid by training loss (see :mod:`ftmlopt.experiments.harness`), the chosen rate is re-run on
``--seeds`` seeds, and the Theorem 1 control (Adam with ``betas=(0, 0.999)`` at ``0.4 * lr_FTML``) is
added. Writes ``OUT/TASK.json`` (every curve, grid runs included) and ``OUT/TASK.png`` (mean over
seeds, min-max band shaded, log scale), and prints a table ranked by final training loss.

Example (shell; a few seconds):
    $ ftmlopt reproduce timeseries --quick --out runs/quick
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ftmlopt._json import write_json
from ftmlopt.experiments.tasks import TASKS

#: extras the experiments need, checked before anything runs
REQUIRED = ("torch", "matplotlib", "tqdm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``TASK`` and the options of ``ftmlopt reproduce`` to ``parser``."""
    from ftmlopt.experiments import harness

    parser.add_argument("task", choices=TASKS, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny grid, one seed, few epochs")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1); default per task")
    parser.add_argument(
        "--first-seed", type=int, default=0,
        help="seeds are FIRST..FIRST+N-1 (default 0): lets separate processes share out the seeds of a long run",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs (iterations for timeseries); default per task")
    parser.add_argument(
        "--grid", choices=("cpu", "paper"), default="cpu",
        help="'cpu': the task's documented subset of the paper's grid (default); 'paper': all 15 rates",
    )
    parser.add_argument(
        "--rates", default=None, metavar="NAME=LR,...",
        help="train these optimizers at one given rate each, no search (e.g. 'FTML=0.025,Adam=0.01'); "
        "optimizers not named keep their grid",
    )
    parser.add_argument(
        "--optimizers", default=None, metavar="NAME,...", help="run only these optimizers (default: the task's list)"
    )
    parser.add_argument(
        "--no-control", action="store_true", help="skip the Theorem 1 control curve Adam(b1=0) (saves its runs)"
    )
    parser.add_argument("--steps", type=int, default=None, help="dqn only: environment steps per run (default 20000)")
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="JSON",
        help="combine the results of runs made separately (e.g. one process per optimizer) into OUT/TASK.json "
        "and OUT/TASK.png; nothing is trained",
    )
    parser.add_argument("--data", default=None, help="data folder (default: <shared data>/<task's folder>)")
    parser.add_argument("--out", default="runs/reproduce", help="output folder for TASK.json and TASK.png")
    harness.add_run_arguments(
        parser, state_bits_help="FTML's state: 32 (float, default), 8 or 4 (low-bit v: ftmlopt.lowbit)"
    )


def parse_rates(text: str | None) -> dict[str, float]:
    """Parse ``--rates``: ``'FTML=0.025,Adam=0.01'`` -> ``{'FTML': 0.025, 'Adam': 0.01}``.

    Example:
        >>> from ftmlopt.experiments.reproduce import parse_rates
        >>> parse_rates("FTML=0.025, Adam=1e-2")
        {'FTML': 0.025, 'Adam': 0.01}
    """
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = math.nan
        if not sep or not name.strip() or not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"Invalid --rates entry: {item.strip()!r} (expected NAME=LR with LR > 0)")
        out[name.strip()] = rate
    return out


def _missing() -> list[str]:
    import importlib.util

    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


def reproduce(
    task: str,
    *,
    quick: bool = False,
    seeds: int | None = None,
    epochs: int | None = None,
    grid: str = "cpu",
    data: str | None = None,
    out: str | Path = "runs/reproduce",
    progress: bool = True,
    command: str | None = None,
    rates: dict[str, float] | None = None,
    optimizers: tuple[str, ...] | None = None,
    control: bool = True,
    steps: int | None = None,
    first_seed: int = 0,
) -> dict[str, Any]:
    """Run ``task`` and write ``out/task.json`` and ``out/task.png``; return the JSON object.

    Example:
        >>> from ftmlopt.experiments.reproduce import reproduce
        >>> res = reproduce("timeseries", quick=True, epochs=5, out="/tmp/ftml-doc", progress=False)
        >>> [row["optimizer"] for row in res["variants"]["changing"]["summary"]].count("FTML")
        1
    """
    from ftmlopt.experiments import harness
    from ftmlopt.experiments.tasks import get_spec

    if first_seed < 0:
        raise ValueError(f"Invalid --first-seed: {first_seed} (expected >= 0)")
    if task == "dqn":
        if first_seed:
            raise ValueError("Invalid --first-seed for dqn: its grid always runs on seeds 0 and 1")
        return _reproduce_dqn(
            quick=quick, seeds=seeds, steps=steps, out=Path(out), progress=progress, rates=rates,
            optimizers=optimizers, command=command,
        )
    spec = get_spec(task)
    if not control:
        spec = dataclasses.replace(spec, control=False)
    if optimizers is not None:
        unknown = [n for n in optimizers if n not in spec.optimizers]
        if unknown:
            raise ValueError(f"Invalid optimizers for {task}: {unknown} (expected some of {list(spec.optimizers)})")
        spec = dataclasses.replace(spec, optimizers=tuple(optimizers))  # in the order given
    n_epochs = epochs if epochs is not None else (spec.quick_epochs if quick else spec.epochs)
    n_seeds = seeds if seeds is not None else (1 if quick else spec.seeds)
    if n_epochs < 1 or n_seeds < 1:
        raise ValueError(f"epochs and seeds must be >= 1, got epochs={n_epochs}, seeds={n_seeds}")
    grids = None
    if grid == "paper" and not quick:
        grids = {n: (g if n == "Adadelta" else harness.PAPER_GRID) for n, g in spec.grids.items()}
    elif grid not in ("cpu", "paper"):
        raise ValueError(f"grid must be 'cpu' or 'paper', got {grid!r}")
    if rates:
        unknown = [n for n in rates if n not in spec.optimizers]
        if unknown:
            raise ValueError(f"Invalid --rates names for {task}: {unknown} (expected some of {list(spec.optimizers)})")
        base = grids or (spec.quick_grids if quick else spec.grids)
        grids = {n: ((rates[n],) if n in rates else tuple(g)) for n, g in base.items()}
    t0 = time.perf_counter()
    loaded = spec.load(Path(data) if data is not None else None, quick)
    if spec.with_horizon:
        loaded = {**loaded, "units": n_epochs}
    result: dict[str, Any] = {
        "task": task,
        "title": spec.title,
        "paper_claim": spec.paper,
        "command": command or f"ftmlopt reproduce {task}" + (" --quick" if quick else ""),
        "config": {
            "quick": quick, "epochs": n_epochs, "seeds": list(range(first_seed, first_seed + n_seeds)),
            "selection": spec.selection,
            "grids": {n: list(g) for n, g in (grids or (spec.quick_grids if quick else spec.grids)).items()},
            "prune_after": None if quick else spec.prune_after, "keep": spec.keep,
            "optimizers": {
                n: (spec.optimizer_notes or harness.OPTIMIZER_NOTES)[n]
                for n in (*spec.optimizers, *((harness.CONTROL,) if spec.control else ()))
            },
            "fixed_rates": dict(rates or {}),
            "notes": list(spec.notes),
        },
        "environment": harness.environment(),
        # which files the run used: source (--data, $FTMLOPT_DATA, cache, download), sizes, sha256
        "data": loaded.get("provenance") if isinstance(loaded, dict) else None,
        "variants": {},
    }
    out = Path(out)

    def save(complete: bool) -> None:
        result["complete"] = complete
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(result, out / f"{task}.json")
        _plot(spec, result, out / f"{task}.png")

    for variant in spec.variants:

        def partial(curves: dict[str, Any], variant: str = variant) -> None:
            result["variants"][variant] = {"optimizers": curves, "summary": harness.summarize(curves, spec.selection)}
            save(complete=False)

        curves = harness.search_and_train(
            spec, loaded, variant, n_epochs, list(range(first_seed, first_seed + n_seeds)), quick, progress=progress,
            grids=grids,
            checkpoint=partial,
        )
        result["variants"][variant] = {"optimizers": curves, "summary": harness.summarize(curves, spec.selection)}
    save(complete=True)
    return result


def _reproduce_dqn(
    *, quick: bool, seeds: int | None, steps: int | None, out: Path, progress: bool,
    rates: dict[str, float] | None, optimizers: tuple[str, ...] | None, command: str | None,
) -> dict[str, Any]:
    from ftmlopt.experiments import harness
    from ftmlopt.experiments.tasks import dqn

    names = tuple(optimizers) if optimizers is not None else dqn.OPTIMIZERS
    grids = {n: (rates[n],) if rates and n in rates else (dqn.QUICK_GRIDS if quick else dqn.GRIDS)[n] for n in names}
    if rates and any(n not in names for n in rates):
        raise ValueError(f"Invalid --rates names for dqn: {sorted(set(rates) - set(names))}")
    info = {"command": command or "ftmlopt reproduce dqn" + (" --quick" if quick else ""),
            "environment": harness.environment()}

    def save(result: dict[str, Any]) -> None:
        result.update(info)
        write_json(result, out / "dqn.json")
        dqn.plot(result, out / "dqn.png")

    return dqn.run_protocol(
        quick=quick, seeds=seeds, steps=steps, grids=grids, optimizers=names, progress=progress, checkpoint=save
    )


def _finite(obj: Any) -> Any:
    """JSON ``null`` (a diverged value) back to NaN, in the loss curves of a saved result."""
    if obj is None:
        return math.nan
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, dict):
        return {k: (_finite(v) if k in ("losses", "curves") or isinstance(v, dict) else v) for k, v in obj.items()}
    return obj


def merge(task: str, paths: list[str], out: str | Path) -> dict[str, Any]:
    """Combine saved results of ``task`` (each holding different optimizers) into ``out/task.json`` and ``.png``.

    The results must come from the same task and settings except the optimizers; the merged JSON lists
    the commands of its parts under ``"merged_from"`` and is ``"complete"`` only if every part is.
    """
    import json

    from ftmlopt.experiments import harness

    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    for p, part in zip(paths, parts):
        if part.get("task") != task:
            raise ValueError(f"Invalid --merge file {p}: task {part.get('task')!r}, expected {task!r}")
    out = Path(out)
    merged = dict(parts[0])
    merged["merged_from"] = [
        {"file": str(p), "command": part.get("command"), "complete": part.get("complete", True),
         "seconds": part.get("seconds")}
        for p, part in zip(paths, parts)
    ]
    merged["complete"] = all(part.get("complete", True) for part in parts)
    merged["command"] = " && ".join(str(part.get("command")) for part in parts)
    if task == "dqn":
        from ftmlopt.experiments.tasks import dqn

        opts: dict[str, Any] = {}
        for part in parts:
            for name, rec in part["optimizers"].items():
                if name not in opts:
                    opts[name] = {**rec, "grid": dict(rec["grid"])}
                    continue
                # the same optimizer searched over more rates in another part (e.g. a grid extended
                # upwards): pool the grids, keep the best-scoring rate and the runs made at it
                into = opts[name]
                into["grid"].update(rec["grid"])
                best = max(into["grid"].values(), key=lambda g: g["score"])["lr"]
                if rec["lr"] == best and (into["lr"] != best or len(rec["runs"]) > len(into["runs"])):
                    into["lr"], into["runs"] = rec["lr"], rec["runs"]
                lrs = [g["lr"] for g in into["grid"].values()]
                into["at_grid_edge"] = len(lrs) > 1 and into["lr"] in (min(lrs), max(lrs))
        for name, rec in opts.items():
            best = max(rec["grid"].values(), key=lambda g: g["score"])["lr"]
            if rec["lr"] != best:
                raise ValueError(f"Invalid --merge: {name}'s best grid rate {best} has no runs in the parts")
        merged["optimizers"] = opts
        merged["config"] = {**parts[0]["config"], "grids": {}, "optimizers": {}}
        for part in parts:
            for name, grid in part["config"]["grids"].items():
                merged["config"]["grids"][name] = sorted({*merged["config"]["grids"].get(name, []), *grid})
            merged["config"]["optimizers"].update(part["config"]["optimizers"])
        merged["summary"] = dqn.summarize(opts, merged["config"]["steps"])
        write_json(merged, out / "dqn.json")
        dqn.plot(merged, out / "dqn.png")
        return merged
    from ftmlopt.experiments.tasks import get_spec

    spec = get_spec(task)
    merged["config"] = {**parts[0]["config"], "grids": {}, "optimizers": {}}
    merged["config"]["seeds"] = sorted({s for part in parts for s in part["config"]["seeds"]})
    variants: dict[str, Any] = {}
    for part in parts:
        merged["config"]["grids"].update(part["config"]["grids"])
        merged["config"]["optimizers"].update(part["config"]["optimizers"])
        for v, res in part["variants"].items():
            into = variants.setdefault(v, {})
            for name, rec in _finite(res["optimizers"]).items():
                if name not in into:
                    into[name] = rec
                    continue
                if rec["lr"] != into[name]["lr"]:
                    raise ValueError(f"Invalid --merge: {name} at lr {rec['lr']} and at {into[name]['lr']}")
                seen = {r["seed"] for r in into[name]["runs"]}  # the first file's run of a seed wins
                into[name]["runs"] = sorted(
                    into[name]["runs"] + [r for r in rec["runs"] if r["seed"] not in seen], key=lambda r: r["seed"]
                )
    merged["variants"] = {
        v: {"optimizers": curves, "summary": harness.summarize(curves, spec.selection)}
        for v, curves in variants.items()
    }
    write_json(merged, out / f"{task}.json")
    _plot(spec, merged, out / f"{task}.png")
    return merged


def _plot(spec: Any, result: dict[str, Any], path: Path) -> None:
    from ftmlopt.experiments import harness

    panels: dict[str, dict[str, list[list[float]]]] = {}
    for v, res in result["variants"].items():
        prefix = f"{v}: " if len(result["variants"]) > 1 else ""
        label = f"{prefix}training loss" if spec.extra_panels else v
        panels[label] = {n: [r["losses"] for r in rec["runs"]] for n, rec in res["optimizers"].items()}
        for extra in spec.extra_panels:
            panels[f"{prefix}{extra}"] = {
                n: [r.get("curves", {}).get(extra, []) for r in rec["runs"]] for n, rec in res["optimizers"].items()
            }
    harness.plot_curves(panels, path, spec.title, spec.x_label, spec.y_label)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ftmlopt reproduce``: check the extras, run, print the tables and the paths."""
    missing = _missing()
    if missing:
        print(
            f"ftmlopt reproduce needs {', '.join(missing)}: pip install 'ftmlopt[demo]' (or '.[demo]' in a checkout)",
            file=sys.stderr,
        )
        return 2
    import torch


    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting back (main() may be called from Python)


def _run(args: argparse.Namespace) -> int:
    from ftmlopt.experiments import harness

    argv = ["ftmlopt", "reproduce", args.task]
    for flag, val in (("--seeds", args.seeds), ("--first-seed", args.first_seed or None), ("--epochs", args.epochs),
                      ("--steps", args.steps),
                      ("--data", args.data)):
        if val is not None:
            argv += [flag, str(val)]
    argv += ["--rates", args.rates] if args.rates else []
    argv += ["--optimizers", args.optimizers] if args.optimizers else []
    argv += ["--no-control"] if args.no_control else []
    argv += ["--quick"] if args.quick else []
    argv += ["--grid", args.grid] if args.grid != "cpu" else []
    argv += ["--state-bits", str(args.state_bits)] if args.state_bits != 32 else []
    argv += ["--out", args.out]
    out = Path(args.out)
    try:
        if args.merge:
            res = merge(args.task, args.merge, out)
        else:
            names = tuple(n.strip() for n in args.optimizers.split(",") if n.strip()) if args.optimizers else None
            with harness.ftml_state_bits(args.state_bits):
                res = reproduce(
                    args.task, quick=args.quick, seeds=args.seeds, epochs=args.epochs, grid=args.grid, data=args.data,
                    out=out, progress=not args.no_progress, command=shlex.join(argv),
                    rates=parse_rates(args.rates), optimizers=names, control=not args.no_control, steps=args.steps,
                    first_seed=args.first_seed,
                )
    except (FileNotFoundError, ValueError) as exc:
        print(f"ftmlopt reproduce {args.task}: {exc}", file=sys.stderr)
        return 2
    print(f"{res['title']}  ({res['seconds']} s{'' if res.get('complete', True) else ', INCOMPLETE'})")
    print(f"paper: {res['paper_claim']}")
    if args.task == "dqn":
        from ftmlopt.experiments.tasks import dqn

        print(dqn.format_table(res["summary"]))
    else:
        selection = res["config"]["selection"]
        for variant, vres in res["variants"].items():
            if len(res["variants"]) > 1:
                print(f"\n[{variant}]")
            print(harness.format_table(vres["summary"], selection))
    print(f"\ncurves: {out / (args.task + '.json')}\nplot:   {out / (args.task + '.png')}")
    return 0
