"""The low-bit tables of docs/results.md from the JSON files next to this script.

Run from the checkout: python docs/figures/lowbit/summarize.py
Per task: FTML's score per seed with state_bits 32, 8 and 4 at the same rate, the mean and [min, max]
over seeds, and the paired difference (low-bit minus float, seed by seed).
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def runs(names: tuple[str, ...], variant: str) -> list[dict]:
    out = []
    for name in names:
        out += json.loads((HERE / f"{name}.json").read_text())["variants"][variant]["optimizers"]["FTML"]["runs"]
    return out


def score(run: dict, task: str) -> float:
    # timeseries: the mean online loss over the pass; transformer: the final training loss
    return statistics.fmean(run["losses"]) if task == "timeseries" else run["losses"][-1]


def row(label: str, per_bits: dict[int, dict[int, float]], extra: dict[int, str]) -> None:
    base = per_bits[32]
    for bits, sc in per_bits.items():
        seeds = sorted(sc)
        vals = [sc[s] for s in seeds]
        diffs = [sc[s] - base[s] for s in seeds]
        print(f"| {label} | {bits} | {statistics.fmean(vals):.4f} | [{min(vals):.4f}, {max(vals):.4f}] | "
              f"{statistics.fmean(diffs):+.4f} | {max(abs(d) for d in diffs):.4f} |{extra.get(bits, ' — |')}")


print("| task | state_bits | mean | [min, max] | paired diff (mean) | paired diff (max abs) | val loss |")
print("|---|---|---|---|---|---|---|")
for lr in ("0.025", "0.01"):
    for variant in ("changing", "stationary"):
        per = {b: {r["seed"]: score(r, "timeseries") for r in runs((f"ts-{lr}-{b}",), variant)} for b in (32, 8, 4)}
        row(f"timeseries {variant}, lr {lr}, 5 seeds", per, {})
per, val = {}, {}
for b in (32, 8, 4):
    rs = runs((f"tffull-{b}", f"tfmore-{b}"), "default")
    per[b] = {r["seed"]: score(r, "transformer") for r in rs}
    val[b] = f" {statistics.fmean(r['metrics']['val_loss'] for r in rs):.4f} |"
row("transformer, lr 0.01, 600 steps, 8 seeds", per, val)

print()
print("| regime | state_bits | chosen lr | mean at it (10 seeds) | [min, max] | mean per rate of FTML's grid |")
print("|---|---|---|---|---|---|")
for regime in ("stationary", "shifting"):
    for b in (32, 8, 4):
        f = json.loads((HERE / f"demo10-{b}.json").read_text())["results"][regime]["FTML"]
        s = [r["score"] for r in f["runs"]]
        grid = ", ".join(f"{k}: {v:.4f}" for k, v in f["grid"].items())
        print(f"| {regime} | {b} | {f['lr']} | {statistics.fmean(s):.4f} | [{min(s):.4f}, {max(s):.4f}] | {grid} |")
