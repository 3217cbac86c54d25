"""FID and class accuracy against fine-tuning steps, from the JSON files `benchmarks/quality.py` wrote.

    python benchmarks/plot_quality_steps.py --out docs/img/quality_steps.png

Reads every `benchmarks/results/quality*.json` (or the files given), sorts each run into a series by
arm and TensorAR settings (plain; TensorAR with the paper's defaults; TensorAR with model-sampled drafts
and slot weights 1 / 0.1 / 0.1 / 0.1; other settings are left out), prints a markdown table of
mean ± std over seeds per step count and draws both metrics. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: series drawn, in order: label -> (draft_source, slot_weights) of the TensorAR runs ("plain": plain runs)
SERIES = {
    "plain next-token": None,
    "TensorAR, paper defaults": ("noise", None),
    "TensorAR, model drafts, slot weights 1/0.1/0.1/0.1": ("model", [1.0, 0.1, 0.1, 0.1]),
}


def series_of(run: dict, settings: dict) -> str | None:
    """The series a run belongs to, or None (argmax-draft sampling, other schedules, frozen backbone...)."""
    if run["arm"] == "plain":
        return "plain next-token"
    if run["arm"] != "tensorar" or settings.get("freeze_backbone"):
        return None
    if (settings.get("noise_schedule") or "exponential") != "exponential":  # older files: None = default
        return None
    key = (settings.get("draft_source") or "noise", settings.get("slot_weights"))
    return next((label for label, wanted in SERIES.items() if wanted == key), None)


def collect(paths: list[Path]) -> dict[str, dict[int, dict[int, dict]]]:
    """series -> steps -> seed -> run. The same run found in two files is an error, not a silent pick."""
    table: dict[str, dict[int, dict[int, dict]]] = {label: {} for label in SERIES}
    for path in paths:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "settings" not in data or data["settings"].get("tiny"):
            continue  # partial files (a list of runs) and --tiny smoke runs
        settings = data["settings"]
        for run in data["runs"]:
            label = series_of(run, settings)
            if label is None:
                continue
            seeds = table[label].setdefault(int(settings["steps"]), {})
            if run["seed"] in seeds:
                raise ValueError(f"{path}: {label}, {settings['steps']} steps, seed {run['seed']} is also in "
                                 f"another file")
            seeds[run["seed"]] = run
    return table


def summary(runs: dict[int, dict], key: str) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (as `quality.py` reports them; 0 for one seed)."""
    values = [run[key] for run in runs.values()]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(table: dict[str, dict[int, dict[int, dict]]]) -> str:
    lines = ["| fine-tuning | steps | seeds | FID ↓ | class accuracy ↑ |", "|---|---|---|---|---|"]
    for label, by_steps in table.items():
        for steps in sorted(by_steps):
            runs = by_steps[steps]
            fid, fid_sd = summary(runs, "fid")
            acc, acc_sd = summary(runs, "class_acc")
            lines.append(f"| {label} | {steps} | {', '.join(map(str, sorted(runs)))} | {fid:.1f} ± {fid_sd:.1f} | "
                         f"{acc:.3f} ± {acc_sd:.3f} |")
    return "\n".join(lines)


def plot(table: dict[str, dict[int, dict[int, dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in ((axes[0], "fid", "FID (Inception @96px) ↓"), (axes[1], "class_acc", "class accuracy ↑")):
        for label, by_steps in table.items():
            steps = sorted(by_steps)
            if not steps:
                continue
            stats = [summary(by_steps[s], key) for s in steps]
            ax.errorbar(steps, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3,
                        label=label)
        ax.set_xscale("log")
        ax.set_xticks(sorted({s for by_steps in table.values() for s in by_steps}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # log-scale minor labels overlap
        ax.set_xlabel("fine-tuning steps (batch 48)")
        ax.set_ylabel(name)
    axes[0].legend(fontsize=8)
    fig.suptitle("tiny MNIST LlamaGen, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="quality JSON files (default: benchmarks/results/)")
    parser.add_argument("--out", type=Path, default=None, help="where to draw the plot (default: table only)")
    args = parser.parse_args(argv)
    table = collect(args.files or sorted(RESULTS.glob("quality*.json")))
    print(markdown_table(table))
    if args.out:
        plot(table, args.out)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
