"""Typed configuration shared by the Lightning layer, the CLI and the Python API.

Each dataclass maps 1:1 onto a YAML section (``model.init_args.model``, ``model.init_args.mask``, ...);
``tests/test_configs.py`` validates every file in ``configs/`` against these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .algorithms.masks import check_sparsity, parse_granularity


@dataclass
class ModelSpec:
    """Which causal LM to prune, and how to load it."""

    name_or_path: str = "smollm2-135m"
    """A Hugging Face hub id, a local folder, a demo alias (``smollm2-135m``), or ``random:<model_type>``
    for a randomly initialised model built from ``config_overrides`` (tests, smoke runs)."""
    dtype: str = "float32"
    """Weights dtype at load time: ``float32``, ``bfloat16`` or ``float16``."""
    tokenizer: Optional[str] = None
    """Tokenizer to use; default: the model's own. ``bytes`` is the built-in byte-level tokenizer."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the HF config (for ``random:*`` models, or to override a loaded config)."""
    gguf_file: Optional[str] = None
    """A GGUF file inside ``name_or_path`` to dequantise on load."""
    seed: int = 0
    """Seed of the random initialisation of ``random:*`` models."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward passes (less memory, ~30% more time)."""
    attn_implementation: Optional[str] = None
    """Passed to ``from_pretrained`` (``sdpa``, ``eager``, ...); default: the library's choice."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model dtype must be float32, bfloat16 or float16; got {self.dtype!r}")


@dataclass
class TargetSpec:
    """Which weight matrices are pruned (regexes on the full dotted module name, as in peft)."""

    target_modules: Optional[str] = None
    """Regex of the linear layers to prune; default: every linear inside the decoder blocks."""
    exclude_modules: Optional[str] = None
    """Regex of layers never pruned; default: embeddings, lm_head, norms."""


@dataclass
class MaskSpec:
    """How scores become masks."""

    sparsity: float = 0.5
    """Fraction of the target weights to remove, in [0, 1). Ignored for N:M patterns (sparsity = N/M)."""
    granularity: str = "auto"
    """``layer`` | ``row`` | ``block`` | ``global`` | an N:M pattern such as ``2:4``; ``auto`` takes the
    method's own default (D-PRUNER and magnitude: layer, Wanda: row)."""
    block_size: int = 128
    """Input columns per block for ``block`` (the paper's iterative blocking) and for SparseGPT."""
    allocation: str = "uniform"
    """``uniform`` (every block at ``sparsity``) or ``owl`` (outlier-weighted layerwise sparsity)."""
    owl_m: float = 5.0
    """OWL: a score above ``owl_m`` times its block's mean counts as an outlier."""
    owl_lambda: float = 0.08
    """OWL: block sparsities span ``sparsity +- owl_lambda``."""

    def __post_init__(self) -> None:
        if self.granularity != "auto":
            kind, n, m = parse_granularity(self.granularity)
        else:
            kind = "auto"
        if kind != "n:m":
            check_sparsity(self.sparsity)
        if self.allocation not in ("uniform", "owl"):
            raise ValueError(f"allocation must be 'uniform' or 'owl'; got {self.allocation!r}")
        if self.allocation == "owl" and kind == "global":
            raise ValueError("allocation 'owl' sets one sparsity per block: it cannot be combined with 'global'")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive; got {self.block_size}")

    def resolved_granularity(self, method_default: str) -> str:
        return method_default if self.granularity == "auto" else self.granularity

    def target_sparsity(self, method_default: str = "layer") -> float:
        kind, n, m = parse_granularity(self.resolved_granularity(method_default))
        return n / m if kind == "n:m" else self.sparsity


@dataclass
class OutputSpec:
    """What the run writes into its log directory."""

    save_importance: bool = True
    """Write the importance scores as safetensors (one fp32 tensor per target)."""
    save_masks: bool = True
    """Write the keep-masks as safetensors (uint8)."""
    export_model: bool = True
    """Write the pruned model as a Hugging Face folder (``pruned_model/``)."""
    export_sparse: bool = False
    """Also write our sparse format (``sparse_model/``: bitmask + kept values per target, 56% of dense
    bf16 at 50% sparsity); ``dpruner_lightning.export.load_sparse_model`` restores it."""
    export_compressed_24: bool = False
    """Also write the model in compressed-tensors' 2:4 layout (``compressed_24_model/``, ``sparse-24-bitmask``:
    kept values + bitmask per target, metadata in ``config.json``). Needs ``mask.granularity: "2:4"`` and
    the ``[deploy]`` extra; readers: compressed-tensors <= 0.14 / vLLM before 2026-03, and
    ``dpruner_lightning.deploy.load_compressed_24`` (see :mod:`dpruner_lightning.deploy`)."""
    histogram_samples: int = 1_000_000
    """Values subsampled per tensor for TensorBoard histograms."""
    overwrite: bool = False
    """A run folder that already holds a run (a fixed logger ``version``) is refused; ``true`` removes
    what that run wrote (summary, importance, masks, exports, event files) and keeps anything else."""

    def check_mask(self, granularity: str, structured: bool = False) -> None:
        """Raise (before any compute) if an export asked for cannot be made from these masks:
        ``granularity`` is the resolved mask granularity, ``structured`` a method that removes whole
        heads / channels instead of masking."""
        if not self.export_compressed_24:
            return
        if structured or granularity.strip().lower() != "2:4":
            got = "a structured method (shapes shrink, no masks)" if structured else f"granularity {granularity!r}"
            raise ValueError(f"output.export_compressed_24 writes 2:4 weights: it needs mask.granularity '2:4', got {got}. "
                             "Set --model.mask.granularity 2:4, or turn export_compressed_24 off.")
        import importlib.util

        if importlib.util.find_spec("compressed_tensors") is None:
            raise ImportError("output.export_compressed_24 needs the compressed-tensors package: pip install -e '.[deploy]'")
