"""Draw `benchmarks/speed.py`'s JSON: a bar chart (ms per batch, log scale) and a markdown table.

    python benchmarks/plot_speed.py benchmarks/results/speed_h100.json --out docs/img/speed.png
    python benchmarks/plot_speed.py B.json L.json XL.json --merged-json benchmarks/results/speed_h100.json

Several files (one `speed.py` call per model, as a device with a per-command time limit needs) are merged:
rows and checks in the order given, a later file's rows replacing an earlier file's for the same model.

Needs matplotlib (the `bench` extra). The table goes to stdout, ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: (JSON key, legend label) of the samplers, in the order they are drawn
SAMPLERS = [("llamagen_eager", "LlamaGen generate() eager"),
            ("llamagen_sample_c2i", "LlamaGen compiled as sample_c2i.py"),
            ("llamagen_compiled", "LlamaGen generate() compiled"),
            ("plain", "ours, plain"), ("tensorar", "ours, TensorAR")]


def sampler_times(row: dict, window: int) -> dict[str, float]:
    """Seconds per batch for every sampler the row measured (TensorAR under the key "tensorar")."""
    times = {key: row[key] for key, _ in SAMPLERS if isinstance(row.get(key), (int, float))}
    if isinstance(row.get(f"tensorar_k{window}"), (int, float)):
        times["tensorar"] = row[f"tensorar_k{window}"]
    return times


def kernel_cell(row: dict, window: int) -> str:
    """Kernel launches per decode step, plain / TensorAR / LlamaGen compiled ('-' where not counted)."""
    counts = row.get("kernels_per_step") or {}
    return " / ".join(str(counts.get(key) or "-") for key in ("plain", f"tensorar_k{window}", "llamagen_compiled"))


def markdown_table(data: dict) -> str:
    window = data["meta"]["window"]
    kernels = any(row.get("kernels_per_step") for row in data["rows"])  # counted by runs since 2026-11-23
    extra = " kernels per step (plain / TensorAR / LlamaGen) |" if kernels else ""
    # sample_c2i.py's whole-model compile, timed by runs since 2026-12-04: its columns only where a row has it
    shipped = any("llamagen_sample_c2i" in row for row in data["rows"])
    lines = ["| model | batch | LlamaGen eager (ms) | " + ("LlamaGen sample_c2i.py compile (ms) | " if shipped else "")
             + f"LlamaGen compiled (ms) | ours plain (ms) | TensorAR k={window} (ms) | TensorAR tok/s | floor (ms) | "
             + ("sample_c2i.py / TensorAR | " if shipped else "")
             + "LlamaGen compiled / TensorAR | TensorAR / plain | plain / floor |" + extra,
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if shipped else "")
             + ("---|" if kernels else "")]
    for row in data["rows"]:
        t = sampler_times(row, window)

        def ms(key, t=t):
            return f"{t[key] * 1e3:.1f}" if key in t else "-"

        def ratio(a, b, t=t):
            return f"{t[a] / t[b]:.2f}x" if a in t and b in t else "-"

        per_second = f"{row['batch'] * row['tokens'] / t['tensorar']:.0f}" if "tensorar" in t else "-"
        over_floor = f"{t['plain'] / row['floor_s']:.2f}x" if "plain" in t else "-"
        lines.append(f"| {row['model']} | {row['batch']} | {ms('llamagen_eager')} | "
                     + (f"{ms('llamagen_sample_c2i')} | " if shipped else "")
                     + f"{ms('llamagen_compiled')} | {ms('plain')} | {ms('tensorar')} | {per_second} | "
                     f"{row['floor_s'] * 1e3:.1f} | "
                     + (f"{ratio('llamagen_sample_c2i', 'tensorar')} | " if shipped else "")
                     + f"{ratio('llamagen_compiled', 'tensorar')} | {ratio('tensorar', 'plain')} | {over_floor} |"
                     + (f" {kernel_cell(row, window)} |" if kernels else ""))
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window, rows = data["meta"]["window"], data["rows"]
    width = 0.8 / len(SAMPLERS)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.0))
    for i, (key, label) in enumerate(SAMPLERS):
        xs = [j + (i - (len(SAMPLERS) - 1) / 2) * width for j in range(len(rows))]
        ys = [sampler_times(row, window).get(key, float("nan")) * 1e3 for row in rows]
        ax.bar(xs, ys, width, label=label if key != "tensorar" else f"ours, TensorAR k={window}")
    ax.scatter(range(len(rows)), [row["floor_s"] * 1e3 for row in rows], marker="_", s=600, color="black",
               label="weight-read floor", zorder=3)
    ax.set_xticks(range(len(rows)), [f"{row['model']}\nbatch {row['batch']}" for row in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms per batch of 256-token images")
    meta = data["meta"]
    ax.set_title(f"sampling time, cfg {meta['cfg_scale']}, {meta['dtype']}, {meta['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def merge(results: list[dict]) -> dict:
    """One result from several `speed.py` files: same device, torch, dtype and window required; the meta of
    the first, with every file's command; targets re-evaluated over the merged rows."""
    first = results[0]["meta"]
    for result in results[1:]:
        differing = [key for key in ("device", "torch", "dtype", "window", "cfg_scale")
                     if result["meta"].get(key) != first.get(key)]
        if differing:
            raise SystemExit(f"error: the files differ in {', '.join(differing)}: their rows are not comparable")
    rows: list[dict] = []
    checks: dict = {}
    for result in results:
        models = {row["model"] for row in result["rows"]}
        rows = [row for row in rows if row["model"] not in models] + result["rows"]
        checks.update(result.get("checks", {}))
    meta = {**first, "commands": [result["meta"].get("command") for result in results]}
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import evaluate_targets

    return {"meta": meta, "rows": rows, "checks": checks, "targets": evaluate_targets(rows, first["window"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="file(s) written by benchmarks/speed.py")
    parser.add_argument("--out", type=Path, default=Path("docs/img/speed.png"))
    parser.add_argument("--merged-json", type=Path, default=None, help="also write the merged result here")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.json]
    data = results[0] if len(results) == 1 else merge(results)
    if args.merged_json is not None:
        args.merged_json.parent.mkdir(parents=True, exist_ok=True)
        args.merged_json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.merged_json}")
    print(markdown_table(data))
    plot(data, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
