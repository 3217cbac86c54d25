"""The example notebook runs end to end (offline mode: tiny random models, synthetic codes)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "finetune_llamagen.ipynb"
KERNEL = "tensorar-test-python"


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    """A kernel spec that runs this interpreter (the venv's), found first through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tensorar tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"),
                                                                   os.environ.get("JUPYTER_PATH")])))
    return KERNEL


def test_notebook_runs_offline(tmp_path, monkeypatch, venv_kernel):
    monkeypatch.setenv("TENSORAR_OFFLINE_DEMO", "1")
    monkeypatch.setenv("TENSORAR_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("TENSORAR_CODES", "TENSORAR_IMAGES"):
        monkeypatch.delenv(name, raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=180, kernel_name=venv_kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.data]
    assert len(images) >= 2  # the sample grids before and after fine-tuning
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "reloaded weights identical: True" in text
    assert (tmp_path / "demo" / "run" / "final" / "tensorar_config.json").is_file()
    metrics = (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert losses[-1] < losses[0]
