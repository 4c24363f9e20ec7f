"""notebooks/alpacare_colab.ipynb runs top to bottom on CPU: install (skipped), data, training, answer, HF export.

The kernel inherits this process's environment (tests/conftest.py: CPU backend, 8 fake devices), so the
notebook meets the same 8-device mesh as the other trainer tests. Parameters are overridden the way
papermill does it: a cell inserted after the one tagged "parameters".
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "alpacare_colab.ipynb"
STEPS = 150  # the full demo (fewer steps may leave a model that answers with EOS at once)


def with_parameters(nb, **values):
    [index] = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def cell_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path):
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), NUM_TRAIN_STEPS=STEPS)
    # Errors raise CellExecutionError naming the cell; the working directory is the temporary one.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "\n".join(cell_text(cell) for cell in nb.cells if cell.cell_type == "code")
    assert "alpacare_jax from" in outputs and "backend: cpu" in outputs

    metrics = [json.loads(line) for line in (tmp_path / "workdirs/demo/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == STEPS
    assert metrics[-1]["loss"] < 0.9 * metrics[0]["loss"], [m["loss"] for m in metrics]

    [answer_cell] = [cell for cell in nb.cells if "reply = answer(" in cell.source]
    answer = cell_text(answer_cell).split("### Response:\n", 1)[1].strip()
    assert answer, "no answer was generated"
    assert f"answer from the export: {answer}\n" in outputs

    hf_dir = tmp_path / "workdirs/demo-hf"
    assert (hf_dir / "config.json").exists() and list(hf_dir.glob("*.safetensors"))
    assert "same as JAX:" in outputs  # transformers (a test dependency) loaded the export
