"""The paper's comparison on the embedded benchmark: SFT alone vs PPO with a final reward vs StepTool, 3 seeds.

    python experiment.py [--seeds 0 1 2] [--out runs/experiment] [train.py flags...]

Every RL run starts from the same cached SFT warm start (sft.py; its seed is fixed, the RL seed varies), gets the
same budget (iterations x episodes, PPO epochs, learning rate) and is evaluated greedily on the same test split.
Writes `results.md` (mean ± std over seeds of pass rate and recall per group), `results.json`, and, when
matplotlib is installed, `val_pass.png` (validation pass rate against iteration for both RL methods).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

METHODS = {"PPO (final reward)": ["--reward", "final"], "StepTool": ["--reward", "step"]}


def run(out: str, seed: int, flags: list, extra: list) -> dict:
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):                       # finished runs are reused: the experiment resumes
        cmd = [sys.executable, "train.py", "--out", out, "--seed", str(seed), "--resume", *flags, *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(path) as f:
        return json.load(f)


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: dict) -> str:
    groups = ["G1", "G2", "G3", "all"]
    head = "| method | " + " | ".join(f"{g} pass | {g} recall" for g in groups) + " |"
    lines = [head, "|---" * (1 + 2 * len(groups)) + "|"]
    for name, results in rows.items():
        cells = []
        for g in groups:
            for key in ("pass_rate", "recall"):
                m, s = mean_std([r[g][key] for r in results])
                cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(histories: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, color) in zip(histories, ("tab:blue", "tab:red")):
        for i, (start, history) in enumerate(histories[name]):
            points = [(-1, start)] + [(h["iter"], h["val_pass"]) for h in history if "val_pass" in h]
            ax.plot([p[0] + 1 for p in points], [p[1] for p in points], color=color, alpha=0.8,
                    label=name if i == 0 else None, marker="o", markersize=3)
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("validation pass rate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/experiment")
    args, extra = parser.parse_known_args()
    os.makedirs(args.out, exist_ok=True)
    rows, histories = {"SFT": []}, {}
    for name, flags in METHODS.items():
        rows[name], histories[name] = [], []
        for seed in args.seeds:
            tag = name.split()[0].lower().replace("(", "")
            result = run(os.path.join(args.out, f"{tag}-seed{seed}"), seed, flags, extra)
            rows[name].append(result["test"])
            histories[name].append((result["sft_val"]["all"]["pass_rate"], result["history"]))
            if name == "StepTool":
                rows["SFT"].append(result["sft_test"])
    md = table(rows)
    print(md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Test split, mean ± std over seeds {args.seeds} (pass rate and recall, %)\n\n{md}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if plot(histories, os.path.join(args.out, "val_pass.png")):
        print(f"wrote {os.path.join(args.out, 'val_pass.png')}")


if __name__ == "__main__":
    main()
