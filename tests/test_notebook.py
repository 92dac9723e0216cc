"""notebooks/quickstart.ipynb runs end to end (smoke mode: tiny random Llama, offline) and is stored clean."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")


def test_notebook_is_committed_with_the_outputs_of_a_demo_run():
    """Readers on GitHub see the tables and figures of a real SmolLM2 run (not the smoke mode's numbers)."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    missing = [i for i, c in enumerate(code) if not c.get("outputs") or c.get("execution_count") is None]
    assert not missing, f"code cells {missing} have no stored output: re-execute the notebook in demo mode (see its first cell)"
    text = "\n".join("".join(_text(o)) for c in code for o in c["outputs"])  # stored JSON: text as lists of lines
    assert "mode: demo" in text and "mode: smoke" not in text
    assert not [o for c in code for o in c["outputs"] if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    assert len(code[0]["source"]) == 1, "the setup cell is one line"


def test_quickstart_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="notebook test needs nbformat (pip install nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="notebook test needs nbclient (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="notebook test needs a Jupyter kernel (pip install ipykernel)")
    pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib")

    # The kernel is a child process: it inherits these (monkeypatch restores them afterwards).
    monkeypatch.setenv("DPRUNER_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("DPRUNER_REPO", str(REPO))
    monkeypatch.setenv("DPRUNER_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("DPRUNER_NOTEBOOK_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # The kernel runs in an empty folder: make it import this checkout, installed or not.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    work = tmp_path / "cwd"
    work.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    client.execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "some code cells did not run"
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    text = "\n".join(_text(o) for c in code for o in c.outputs)

    assert "mode: smoke" in text
    dense = float(re.search(r"dense perplexity on held-out medical text: ([\d.]+)", text).group(1))
    pruned = re.search(r"^pruned\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    assert pruned, text
    assert math.isfinite(dense) and dense > 1 and float(pruned.group(2)) > 1
    assert float(pruned.group(1)) == pytest.approx(0.5)
    assert "kept weights equal the original ones: True; pruned weights are zero: True" in text
    assert "same logits as the in-memory pruned model: True" in text
    sparsity = float(re.search(r"reloaded decoder-linear sparsity: ([\d.]+)", text).group(1))
    assert sparsity == pytest.approx(0.5, abs=0.01)

    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the plot cell produced no inline image/png output"
    out = tmp_path / "out"
    assert (out / "mask_distribution.png").is_file()
    assert (out / "pruned_model" / "masks.safetensors").is_file()
    assert not list(work.iterdir()), "the notebook wrote into the working directory instead of DPRUNER_NOTEBOOK_OUT"

