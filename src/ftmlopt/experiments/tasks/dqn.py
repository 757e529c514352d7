"""§4.5 at CPU scale: DQN on gymnasium's CartPole-v1 with Adam, RMSprop and FTML (epsilon 1e-2 for all).

The paper trains the ``Kaixhin/Atari`` DQN on Breakout and Asterix, with every optimizer's epsilon set
to 1e-2, and reports the average score per episode: FTML ≈ RMSprop on Breakout with Adam lower and
noisier; on Asterix FTML best and RMSprop collapsing. Atari does not fit a CPU; CartPole keeps what
makes DQN a test of an optimizer: the regression targets move as the target network is refreshed and
as the policy changes which states are visited.

Agent (the same for every optimizer): Q-network 4 -> 64 -> 64 -> 2 (ReLU), a target network copied
every ``TARGET_EVERY`` steps, replay memory of ``MEMORY`` transitions, batch 32 (the paper's), discount
0.99, Huber loss, one update per environment step after ``LEARN_START`` steps, epsilon-greedy
exploration decaying linearly from 1.0 to 0.05 over ``EXPLORE`` steps. A run is ``STEPS`` environment
steps. Optimizers: ``ftmlopt.torch.FTML(lr, eps=1e-2)`` (other settings at the front end's defaults,
betas (0.6, 0.999)), ``torch.optim.Adam(lr, eps=1e-2)``, ``torch.optim.RMSprop(lr, eps=1e-2)``.

Protocol: every rate of each optimizer's grid is run on the first ``GRID_SEEDS`` seeds and scored by
the mean return over all episodes of the run (the area under the learning curve, so a rate that learns
and then collapses scores low); the best rate is then run on the remaining seeds, for ``SEEDS`` in all.
A seed fixes the network's initial weights, the environment's resets and the exploration stream, and is
the same for every optimizer. Recorded per run: the return of every episode and the step at which it
ended; the figure bins episodes by the ``BIN``-step block in which they end and shows the mean over
seeds with the min-max band.

Example (shell; seconds):
    $ ftmlopt reproduce dqn --quick --out runs/quick
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftmlopt.experiments import harness

OPTIMIZERS: tuple[str, ...] = ("FTML", "Adam", "RMSprop")
EPS = 1e-2  # the paper's optimizer epsilon for DQN, for every method
GRIDS: dict[str, tuple[float, ...]] = {
    "FTML": (0.005, 0.0025, 0.001), "Adam": (0.0025, 0.001, 0.0005), "RMSprop": (0.0025, 0.001, 0.0005),
}
QUICK_GRIDS: dict[str, tuple[float, ...]] = {"FTML": (0.0025,), "Adam": (0.001,), "RMSprop": (0.001,)}
STEPS, QUICK_STEPS = 20_000, 600
SEEDS, GRID_SEEDS = 5, 2
HIDDEN = 64
BATCH = 32
GAMMA = 0.99
MEMORY = 20_000
TARGET_EVERY = 250
LEARN_START, QUICK_LEARN_START = 500, 100
EXPLORE = 5_000
BIN = 1_000
NOTES: dict[str, str] = {
    "FTML": "ftmlopt.torch.FTML(params, lr, eps=1e-2, foreach=True, fused=False), defaults otherwise",
    "Adam": "torch.optim.Adam(params, lr, eps=1e-2), betas (0.9, 0.999)",
    "RMSprop": "torch.optim.RMSprop(params, lr, eps=1e-2), alpha 0.99",
}


#: the one optimizer factory (:func:`ftmlopt.experiments.harness.make_optimizer`) with the DQN settings:
#: epsilon 1e-2 for every optimizer (the paper's setting for DQN), FTML's multi-tensor path (see PATH_NOTE)
make_optimizer = functools.partial(harness.make_optimizer, eps=EPS, ftml_foreach=True)


def train_dqn(name: str, lr: float, seed: int, steps: int = STEPS, learn_start: int = LEARN_START) -> dict[str, Any]:
    """One DQN run on CartPole-v1; returns ``{"seed", "returns", "ends"}`` (episode returns, end steps).

    Only complete episodes are recorded. Uses torch's global generator under a saved/restored state,
    so a run gives the same curve whatever ran before it.

    Example:
        >>> from ftmlopt.experiments.tasks.dqn import train_dqn
        >>> run = train_dqn("FTML", 2.5e-3, seed=0, steps=300, learn_start=50)
        >>> len(run["returns"]) == len(run["ends"]) > 0 and sum(run["returns"]) <= 300
        True
    """
    import gymnasium as gym
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    outer = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        q = nn.Sequential(nn.Linear(4, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))
        target = nn.Sequential(
            nn.Linear(4, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2)
        )
        target.load_state_dict(q.state_dict())
        opt = make_optimizer(name, q.parameters(), lr)
        rng = np.random.default_rng(seed)
        env = gym.make("CartPole-v1")
        obs_buf = np.zeros((MEMORY, 4), np.float32)
        next_buf = np.zeros((MEMORY, 4), np.float32)
        act_buf = np.zeros(MEMORY, np.int64)
        rew_buf = np.zeros(MEMORY, np.float32)
        done_buf = np.zeros(MEMORY, np.float32)
        obs, _ = env.reset(seed=seed)
        returns: list[float] = []
        ends: list[int] = []
        ep_return = 0.0
        for t in range(steps):
            explore = max(0.05, 1.0 - 0.95 * t / EXPLORE)
            if rng.random() < explore:
                action = int(rng.integers(2))
            else:
                with torch.no_grad():
                    action = int(q(torch.from_numpy(obs)).argmax())
            nxt, reward, terminated, truncated, _ = env.step(action)
            i = t % MEMORY
            obs_buf[i], next_buf[i], act_buf[i], rew_buf[i] = obs, nxt, action, reward
            done_buf[i] = float(terminated)  # a time-limit truncation still bootstraps
            ep_return += float(reward)
            obs = nxt
            if terminated or truncated:
                returns.append(ep_return)
                ends.append(t + 1)
                ep_return = 0.0
                obs, _ = env.reset()
            if t + 1 >= learn_start:
                idx = rng.integers(0, min(t + 1, MEMORY), BATCH)
                o, a = torch.from_numpy(obs_buf[idx]), torch.from_numpy(act_buf[idx])
                with torch.no_grad():
                    best = target(torch.from_numpy(next_buf[idx])).max(1).values
                    y = torch.from_numpy(rew_buf[idx]) + GAMMA * (1.0 - torch.from_numpy(done_buf[idx])) * best
                pred = q(o).gather(1, a[:, None]).squeeze(1)
                loss = F.smooth_l1_loss(pred, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if not math.isfinite(loss.item()):
                    break  # diverged: the run keeps the episodes it finished
            if (t + 1) % TARGET_EVERY == 0:
                target.load_state_dict(q.state_dict())
        env.close()
        return {"seed": seed, "returns": returns, "ends": ends}
    finally:
        torch.set_rng_state(outer)


def score(run: Mapping[str, Any]) -> float:
    """Mean return over all of a run's episodes (0 if none finished)."""
    return statistics.fmean(run["returns"]) if run["returns"] else 0.0


def binned(run: Mapping[str, Any], steps: int, bin_size: int = BIN) -> list[float]:
    """Mean return of the episodes ending in each ``bin_size``-step block (NaN for a block with none).

    Example:
        >>> from ftmlopt.experiments.tasks.dqn import binned
        >>> binned({"returns": [10.0, 20.0, 50.0], "ends": [10, 30, 250]}, steps=300, bin_size=100)
        [15.0, nan, 50.0]
    """
    sums = [0.0] * math.ceil(steps / bin_size)
    counts = [0] * len(sums)
    for ret, end in zip(run["returns"], run["ends"]):
        b = min((end - 1) // bin_size, len(sums) - 1)
        sums[b] += ret
        counts[b] += 1
    return [s / c if c else math.nan for s, c in zip(sums, counts)]


def run_protocol(
    *,
    quick: bool = False,
    seeds: int | None = None,
    steps: int | None = None,
    grids: Mapping[str, Sequence[float]] | None = None,
    grid_seeds: int | None = None,
    optimizers: Sequence[str] = OPTIMIZERS,
    progress: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Grid on the first seeds, best rate on the rest; returns the JSON object (without the command).

    ``checkpoint``, if given, is called with the result so far after every finished optimizer and every
    seed of a chosen rate (``"complete": False`` until the end).
    """
    from tqdm.auto import tqdm

    n_steps = steps if steps is not None else (QUICK_STEPS if quick else STEPS)
    n_seeds = seeds if seeds is not None else (1 if quick else SEEDS)
    n_grid = min(n_seeds, grid_seeds if grid_seeds is not None else (1 if quick else GRID_SEEDS))
    learn_start = min(QUICK_LEARN_START if quick else LEARN_START, max(1, n_steps // 2))
    grids = dict(grids) if grids is not None else (QUICK_GRIDS if quick else GRIDS)
    if n_steps < 1 or n_seeds < 1:
        raise ValueError(f"steps and seeds must be >= 1, got steps={n_steps}, seeds={n_seeds}")
    unknown = [n for n in optimizers if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"Invalid optimizers for dqn: {unknown} (expected some of {list(OPTIMIZERS)})")
    t0 = time.perf_counter()
    total = sum(len(grids[n]) * n_grid + (n_seeds - n_grid) for n in optimizers)
    out: dict[str, Any] = {}
    result: dict[str, Any] = {
        "task": "dqn",
        "title": "§4.5 stand-in: DQN on CartPole-v1 (gymnasium), optimizer eps 1e-2",
        "paper_claim": PAPER_CLAIM,
        "config": {
            "quick": quick, "steps": n_steps, "seeds": list(range(n_seeds)), "grid_seeds": list(range(n_grid)),
            "grids": {n: list(grids[n]) for n in optimizers}, "optimizers": {n: NOTES[n] for n in optimizers},
            "hidden": HIDDEN, "batch": BATCH, "gamma": GAMMA, "memory": MEMORY, "target_every": TARGET_EVERY,
            "learn_start": learn_start, "explore_steps": EXPLORE, "bin": BIN,
            "selection": "mean return over all episodes of a run, averaged over the grid seeds (higher is better)",
        },
        "optimizers": out,
        "complete": False,
    }

    def save() -> None:
        result["summary"] = summarize(out, n_steps)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if checkpoint is not None:
            checkpoint(result)

    with tqdm(total=total, desc="dqn", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for name in optimizers:
            grid: dict[str, Any] = {}
            for lr in grids[name]:
                runs = []
                for seed in range(n_grid):
                    bar.set_postfix_str(f"{name} lr={lr:g} seed={seed}")
                    runs.append(train_dqn(name, lr, seed, n_steps, learn_start))
                    bar.update(1)
                grid[repr(lr)] = {"lr": lr, "score": statistics.fmean(score(r) for r in runs), "runs": runs}
            best = max(grid.values(), key=lambda g: g["score"])
            runs = list(best["runs"])
            lrs = [g["lr"] for g in grid.values()]
            out[name] = {
                "lr": best["lr"],
                "at_grid_edge": len(lrs) > 1 and best["lr"] in (min(lrs), max(lrs)),
                "grid": {k: {"lr": g["lr"], "score": g["score"], "runs": g["runs"]} for k, g in grid.items()},
                "runs": runs,
            }
            for seed in range(n_grid, n_seeds):
                save()
                bar.set_postfix_str(f"{name} lr={best['lr']:g} seed={seed}")
                runs.append(train_dqn(name, best["lr"], seed, n_steps, learn_start))
                bar.update(1)
            save()
    result["complete"] = True
    save()
    return result


def summarize(result: Mapping[str, Any], steps: int) -> list[dict[str, Any]]:
    """One row per optimizer, best first: chosen rate, mean return over all episodes and over the last
    quarter of the steps (mean over seeds, with min and max), and episodes that reached 500 (the cap)."""
    rows = []
    for name, rec in result.items():
        overall = [score(r) for r in rec["runs"]]
        late = []
        for r in rec["runs"]:
            tail = [x for x, e in zip(r["returns"], r["ends"]) if e > 0.75 * steps]
            late.append(statistics.fmean(tail) if tail else 0.0)
        rows.append({
            "optimizer": name, "lr": rec["lr"], "at_grid_edge": rec["at_grid_edge"], "seeds": len(overall),
            "mean_return": statistics.fmean(overall), "mean_return_min": min(overall),
            "mean_return_max": max(overall), "late_return": statistics.fmean(late), "late_return_min": min(late),
            "late_return_max": max(late),
            "solved_episodes": sum(sum(1 for x in r["returns"] if x >= 500) for r in rec["runs"]),
        })
    rows.sort(key=lambda r: -r["mean_return"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table of :func:`summarize` rows."""
    head = (f"{'rank':>4}  {'optimizer':<9} {'lr':>9}  {'mean return':>11} {'[min, max]':>16}  "
            f"{'last-quarter return':>19} {'[min, max]':>16}  {'500s':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['rank']:>4}  {r['optimizer']:<9} {r['lr']:>8.3g}{'*' if r['at_grid_edge'] else ' '}"
            f"  {r['mean_return']:>11.1f} [{r['mean_return_min']:>6.1f}, {r['mean_return_max']:>6.1f}]"
            f"  {r['late_return']:>19.1f} [{r['late_return_min']:>6.1f}, {r['late_return_max']:>6.1f}]"
            f"  {r['solved_episodes']:>5}"
        )
    if any(r["at_grid_edge"] for r in rows):
        lines.append("* chosen rate at the edge of its grid")
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: Path) -> Path:
    """Mean return per episode, binned by the step block in which episodes end; mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftmlopt.experiments.harness import COLORS

    steps, bin_size = result["config"]["steps"], result["config"]["bin"]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for name, rec in result["optimizers"].items():
        curves = [binned(r, steps, bin_size) for r in rec["runs"]]
        xs, mean, lo, hi = [], [], [], []
        for b, col in enumerate(zip(*curves)):
            vals = [v for v in col if math.isfinite(v)]
            if vals:
                xs.append((b + 1) * bin_size)
                mean.append(statistics.fmean(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        color = COLORS.get(name)
        ax.plot(xs, mean, color=color, label=f"{name} lr={rec['lr']:g} ({len(curves)} seeds)", linewidth=1.4)
        if len(curves) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return per episode")
    ax.set_title(
        f"§4.5 stand-in: DQN on CartPole-v1, optimizer eps 1e-2\nepisodes binned by the {bin_size}-step block they "
        "end in; mean over seeds, band min-max", fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PAPER_CLAIM = (
    "§4.5 (Atari DQN, eps 1e-2): Breakout: RMSprop ≈ FTML ≈ 400, Adam lower (≈330) and noisier; "
    "Asterix: FTML best, Adam next, RMSprop collapses after ~130 epochs."
)
