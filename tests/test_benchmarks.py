"""The speed benchmark runs end to end on a micro model and its fast-path token check holds; its plot reads it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_table_json_check_and_plot(tmp_path, capsys):
    speed, plot = load_script("speed"), load_script("plot_speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--models", "micro", "--batch-sizes", "1", "2", "--repeats", "1", "--compile-ours",
                       "--compile-backend", "aot_eager", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["batch"]) for r in data["rows"]] == [("micro", 1), ("micro", 2)]
    assert all(r["plain"] > 0 and r["tensorar_k4"] > 0 and not r["errors"] for r in data["rows"])
    checks = data["checks"]["micro"]
    assert set(checks) == {"plain_greedy", "tensorar_greedy", "tensorar_sampled"}
    assert all(check["tokens_equal"] for check in checks.values())
    assert [t["target"].startswith("TensorAR <= 1.10x") for t in data["targets"]] == [True, True]
    assert "micro" in capsys.readouterr().out

    # --append replaces the rows of the models it measures and keeps the others
    data["rows"].append({**data["rows"][0], "model": "other"})
    out.write_text(json.dumps(data))
    speed.main(["--models", "micro", "--batch-sizes", "1", "--repeats", "1", "--check-models", "--json", str(out),
                "--append"])
    assert [(r["model"], r["batch"]) for r in json.loads(out.read_text())["rows"]] == [("other", 1), ("micro", 1)]

    pytest.importorskip("matplotlib")
    assert plot.main([str(out), "--out", str(tmp_path / "speed.png")]) == 0
    table = capsys.readouterr().out
    assert "| micro | 1 |" in table and "| other | 1 |" in table
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_speed_benchmark_rejects_unknown_models(capsys):
    with pytest.raises(SystemExit):
        load_script("speed").main(["--models", "GPT-B", "GPT-Q"])
    assert "--models: unknown model(s) ['GPT-Q']" in capsys.readouterr().err
