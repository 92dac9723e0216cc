"""2:4 end to end: prune to 2:4, write compressed-tensors' sparse-24-bitmask layout and read it back
exactly; the run option that writes it; the in-memory GPU form (to_semi_structured) and its checks."""

from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch
from torch import nn

from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import MaskSpec, OutputSpec
from dpruner_lightning.export import MANIFEST, Not24Error, semi_structured_plan, to_semi_structured
from dpruner_lightning.methods import DPrunerMethod, LLMPrunerMethod, WandaMethod
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.pruning import DenseReference, calibrate, prune

from .conftest import tiny_model
from .helpers import smoke_data, tiny_spec, token_batches

CT_REASON = "compressed-tensors is not installed (pip install -e '.[deploy]' installs it)"


@pytest.fixture
def ct():
    return pytest.importorskip("compressed_tensors", reason=CT_REASON)


def _pruned_24(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random Llama pruned to 2:4 by Wanda through the pruning core."""
    model = tiny_model("llama", dtype=dtype)
    targets = find_targets(model)
    dense = DenseReference.of(model, targets)
    method = WandaMethod()
    method.prepare(model, targets)
    calibrate(model, targets, method, {"general": token_batches(0, 2), "domain": token_batches(1, 2)})
    result = prune(model, targets, method, MaskSpec(granularity="2:4"), dense)
    assert result.granularity == "2:4"
    return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, with -0.0 made +0.0: the layout stores no pruned entry, so a zero comes back +0.0."""
    return (t + 0).contiguous().view(torch.uint8) if t.is_floating_point() else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_24_layout_round_trips_exactly(tmp_path, ct, dtype):
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.utils import unpack_bitmasks
    from safetensors.torch import load_file

    from dpruner_lightning.deploy import WEIGHTS_FILE, export_compressed_24, load_compressed_24

    model = _pruned_24(dtype)
    targets = sorted(find_targets(model))
    folder = export_compressed_24(model, None, tmp_path / "c24")
    assert (folder / MANIFEST).is_file()
    meta = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert meta["quant_method"] == "compressed-tensors" and meta["version"] == ct.__version__
    # the metadata, as compressed-tensors' own config registry reads it
    sparsity = SparsityCompressionConfig.load_from_registry(meta["sparsity_config"]["format"], **meta["sparsity_config"])
    assert (sparsity.format, sparsity.sparsity_structure, sparsity.targets) == ("sparse-24-bitmask", "2:4", targets)
    assert 0.3 < sparsity.global_sparsity < 0.5  # half of the targets; embeddings, head and norms dense
    # decoded here, from the file, with compressed-tensors' unpack_bitmasks (not through our reader)
    stored = load_file(str(folder / WEIGHTS_FILE))
    reference = model.state_dict()
    decoded = {}
    for name in targets:
        rows, cols = stored[f"{name}.shape"].flatten().tolist()
        assert stored[f"{name}.compressed"].shape == (rows, cols // 2) and stored[f"{name}.compressed"].dtype == dtype
        keep = unpack_bitmasks(stored[f"{name}.bitmask"], [rows, cols])
        dense = torch.zeros(rows, cols, dtype=dtype)
        dense[keep] = stored[f"{name}.compressed"].flatten()
        decoded[f"{name}.weight"] = dense
    decoded.update({k: v for k, v in stored.items() if k.rpartition(".")[0] not in targets})
    assert set(decoded) == set(reference)  # every tensor, target or not, is in the file
    for key, value in reference.items():
        assert torch.equal(_bits(decoded[key]), _bits(value)), key
    # our reader (used by `load_compressed_24`) gives the same model
    reloaded = load_compressed_24(folder)
    ids = torch.randint(0, 257, (2, 16))
    assert reloaded.dtype == dtype and torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # targets take 1/2 (values) + 1/16 (bits) of dense at bf16 (+1/32 at fp32)
    packed = sum(stored[f"{n}.{p}"].numel() * stored[f"{n}.{p}"].element_size() for n in targets for p in ("compressed", "bitmask"))
    dense_bytes = sum(reference[f"{n}.weight"].numel() * reference[f"{n}.weight"].element_size() for n in targets)
    assert packed / dense_bytes == pytest.approx(0.5 + 1 / torch.finfo(dtype).bits, rel=1e-6)


def test_the_last_compressed_tensors_with_a_2_4_compressor_reads_it(tmp_path, ct):
    """compressed-tensors 0.15+ removed its sparse compressors; where one is installed (<= 0.14), its
    ModelCompressor must decompress our folder into the pruned weights, every tensor."""
    try:
        from compressed_tensors.compressors import ModelCompressor, Sparse24BitMaskCompressor  # noqa: F401
    except ImportError:
        pytest.skip(f"compressed-tensors {ct.__version__} has no 2:4 compressor (removed after 0.14); to run this check: "
                    "pip install --target /tmp/ct014 --no-deps compressed-tensors==0.14.0.1 and PYTHONPATH=/tmp/ct014")
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpruner_lightning.deploy import export_compressed_24

    model = _pruned_24(torch.bfloat16)
    folder = export_compressed_24(model, None, tmp_path / "c24")
    compressor = ModelCompressor.from_pretrained(str(folder))
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    empty = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in empty.parameters():
            p.fill_(7.0)  # nothing may survive from here
    compressor.decompress(str(folder), empty)
    got = empty.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(_bits(got[key]), _bits(value)), key


def test_plain_from_pretrained_does_not_decompress_it(tmp_path, ct):
    """The README says current transformers / compressed-tensors do not restore these weights: the folder
    loads with the targets freshly initialised. If this starts failing, upstream reads the layout again."""
    try:
        from compressed_tensors.compressors import Sparse24BitMaskCompressor  # noqa: F401
        pytest.skip("this compressed-tensors still has the 2:4 compressor")
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM

    from dpruner_lightning.deploy import export_compressed_24

    model = _pruned_24()
    folder = export_compressed_24(model, None, tmp_path / "c24")
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    name = next(iter(find_targets(model)))
    assert torch.equal(loaded["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])
    assert not torch.equal(loaded[f"{name}.weight"], model.get_submodule(name).weight)


def test_export_refuses_weights_that_are_not_2_4(tmp_path, ct):
    from dpruner_lightning.deploy import export_compressed_24

    model = _pruned_24()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 8:12] = 1.0  # one group of 4 inputs fully dense
    with pytest.raises(Not24Error, match=r"model\.layers\.1\.mlp\.up_proj: weight 128 x 64 is not 2:4.*row 3, inputs 8\.\.11"):
        export_compressed_24(model, None, tmp_path / "c24")
    assert not (tmp_path / "c24").exists()  # checked before anything was written


def test_a_missing_deploy_extra_says_how_to_install_it(tmp_path, monkeypatch):
    from dpruner_lightning.deploy import export_compressed_24

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import compressed_tensors -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[deploy\]'"):
        export_compressed_24(tiny_model("llama"), None, tmp_path / "c24")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[deploy\]'"):
        OutputSpec(export_compressed_24=True).check_mask("2:4")


# -- the run option ------------------------------------------------------------------------------------
def test_a_2_4_fit_run_writes_the_compressed_folder(tmp_path, ct):
    from dpruner_lightning.deploy import load_compressed_24, read_compressed_24_config

    module = DPrunerModule(model=tiny_spec("llama"), method=WandaMethod(), mask=MaskSpec(granularity="2:4"),
                           output=OutputSpec(export_model=False, save_importance=False, save_masks=False,
                                             export_compressed_24=True))
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", devices=1, enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, smoke_data())
    folder = tmp_path / "compressed_24_model"
    assert module.artifacts["compressed_24_model"] == str(folder)
    assert read_compressed_24_config(folder)["targets"] == sorted(module.targets)
    reloaded = load_compressed_24(folder).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in module.model.state_dict().items())


@pytest.mark.parametrize("method, mask, needle", [
    (DPrunerMethod(), MaskSpec(), "granularity 'layer'"),
    (WandaMethod(), MaskSpec(granularity="4:8"), "granularity '4:8'"),
    (LLMPrunerMethod(), MaskSpec(), "a structured method"),
])
def test_the_2_4_export_needs_2_4_masks_before_any_compute(method, mask, needle):
    with pytest.raises(ValueError, match=rf"export_compressed_24 .*needs mask\.granularity '2:4', got {needle}"):
        DPrunerModule(model=tiny_spec("llama"), method=method, mask=mask, output=OutputSpec(export_compressed_24=True))


# -- in memory: semi-structured weights for the GPU kernels ---------------------------------------------
def test_to_semi_structured_names_the_requirement_before_anything_else():
    model = tiny_model("llama")  # dense fp32 on a CPU: the device is what is reported, and nothing changes
    before = {n: type(m) for n, m in model.named_modules()}
    message = r"CUDA GPU of compute capability >= 8\.0 and float16 / bfloat16 weights"
    with pytest.raises(RuntimeError, match=message):
        to_semi_structured(model)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_semi_structured_plan_checks_what_needs_no_gpu():
    model = _pruned_24(torch.bfloat16)
    plan = semi_structured_plan(model)
    assert set(plan) == set(find_targets(model)) and all(isinstance(m, nn.Linear) for m in plan.values())
    assert set(semi_structured_plan(model, target_modules=r".*mlp\.(up|gate)_proj")) == {
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("up", "gate")}
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[5, :4] = 1.0
    with pytest.raises(Not24Error, match=r"model\.layers\.0\.mlp\.down_proj: weight 64 x 128 is not 2:4"):
        semi_structured_plan(model)
    # a shape the kernel's tiles do not divide (rows 24) is named
    model.model.layers[1].mlp.up_proj = nn.Linear(64, 24, bias=False, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj: weight \(24, 64\) does not fit the torch\.bfloat16"):
        semi_structured_plan(model, target_modules=r".*up_proj")
