"""Structured (LLM-Pruner-style) pruning on tiny random Hugging Face models, CPU, fp32.

The reference for "pruned correctly" is the dense model with the same heads/channels zeroed, written
here independently of the module's index maps (explicit per-architecture layouts), so a wrong layout
in an adapter shows up as a logits mismatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from dpruner_lightning.algorithms.structured import (
    StructuredPlan,
    apply_structured_pruning_,
    calibration_gradients,
    group_importance,
    load_structured_pruned,
    n_removed,
    plan_structured_pruning,
    ratio_for_target_fraction,
    removed_target_fraction,
)
from dpruner_lightning.algorithms.targets import count_parameters

H, VOCAB, LAYERS, FFN = 64, 97, 2, 96


def _llama(**kw):
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        max_position_embeddings=64, tie_word_embeddings=False, **kw,
    )


CONFIGS = {
    "llama_mha": lambda: _llama(num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa_bias": lambda: _llama(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "mistral_gqa": lambda: MistralConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
    ),
    "qwen2_gqa": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=H, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
        word_embed_proj_dim=H, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=H, n_inner=FFN, n_layer=LAYERS, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=64, attention_bias=True,
    ),
}


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    # Random init of biases is zero in HF: make them nonzero so bias slicing is really exercised.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and ("layers" in n or ".h." in n):
                p.normal_(0, 0.05)
    return model.eval()


def _batches(seed: int = 1, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- independent reference: zeroing


def _zero_rows(lin, rows):
    lin.weight[rows] = 0
    if lin.bias is not None:
        lin.bias[rows] = 0


def _blocks(model):
    mt = model.config.model_type
    return {"opt": lambda: model.model.decoder.layers, "gpt2": lambda: model.transformer.h,
            "gpt_neox": lambda: model.gpt_neox.layers}.get(mt, lambda: model.model.layers)()


@torch.no_grad()
def _zero_removed(model, plan: StructuredPlan):
    """Zero (not shrink) every group the plan drops, with hand-written layouts per architecture."""
    cfg = model.config
    mt = cfg.model_type
    nh = cfg.num_attention_heads
    d = H // nh
    for b, blk in enumerate(_blocks(model)):
        n_groups = getattr(cfg, "num_key_value_heads", None) or nh if mt in ("llama", "mistral", "qwen2") else nh
        groups = [g for g in range(n_groups) if g not in set(plan.keep_attn[b].tolist())]
        chans = [c for c in range(FFN) if c not in set(plan.keep_mlp[b].tolist())]
        if mt in ("llama", "mistral", "qwen2"):
            r = nh // cfg.num_key_value_heads
            at = blk.self_attn
            for g in groups:
                q = slice(g * r * d, (g + 1) * r * d)
                _zero_rows(at.q_proj, q)
                _zero_rows(at.k_proj, slice(g * d, (g + 1) * d))
                _zero_rows(at.v_proj, slice(g * d, (g + 1) * d))
                at.o_proj.weight[:, q] = 0
            for lin in (blk.mlp.gate_proj, blk.mlp.up_proj):
                _zero_rows(lin, chans)
            blk.mlp.down_proj.weight[:, chans] = 0
        elif mt == "opt":
            at = blk.self_attn
            for g in groups:
                for lin in (at.q_proj, at.k_proj, at.v_proj):
                    _zero_rows(lin, slice(g * d, (g + 1) * d))
                at.out_proj.weight[:, g * d:(g + 1) * d] = 0
            _zero_rows(blk.fc1, chans)
            blk.fc2.weight[:, chans] = 0
        elif mt == "gpt2":  # Conv1D: weight is in x out; c_attn outputs [q | k | v]
            at = blk.attn
            for g in groups:
                for part in range(3):
                    cols = slice(part * H + g * d, part * H + (g + 1) * d)
                    at.c_attn.weight[:, cols] = 0
                    at.c_attn.bias[cols] = 0
                at.c_proj.weight[g * d:(g + 1) * d, :] = 0
            blk.mlp.c_fc.weight[:, chans] = 0
            blk.mlp.c_fc.bias[chans] = 0
            blk.mlp.c_proj.weight[chans, :] = 0
        elif mt == "gpt_neox":  # query_key_value rows: [q_h k_h v_h] per head
            at = blk.attention
            for g in groups:
                _zero_rows(at.query_key_value, slice(g * 3 * d, (g + 1) * 3 * d))
                at.dense.weight[:, g * d:(g + 1) * d] = 0
            _zero_rows(blk.mlp.dense_h_to_4h, chans)
            blk.mlp.dense_4h_to_h.weight[:, chans] = 0
    return model


def _expected_removed(cfg, plan: StructuredPlan) -> int:
    """Parameters (weights + biases) a plan removes, from the dense config."""
    mt = cfg.model_type
    nh = cfg.num_attention_heads
    d = H // nh
    if mt in ("llama", "mistral", "qwen2"):
        r = nh // cfg.num_key_value_heads
        n_groups = cfg.num_key_value_heads
        qkv_bias = mt == "qwen2" or getattr(cfg, "attention_bias", False)
        # q rows of r heads, k and v rows of one head (+ their biases), o columns; o's bias is kept
        per_group = (r * d + 2 * d) * H + r * d * H + ((r * d + 2 * d) if qkv_bias else 0)
        per_chan = 3 * H + (2 if getattr(cfg, "mlp_bias", False) else 0)
    else:
        n_groups = nh
        per_group = 3 * d * H + 3 * d + d * H  # q,k,v rows with biases + output-projection columns
        per_chan = 2 * H + 1  # input row + its bias, output column
    total = 0
    for b in plan.keep_attn:
        total += (n_groups - plan.keep_attn[b].numel()) * per_group + (FFN - plan.keep_mlp[b].numel()) * per_chan
    return total


# ---------------------------------------------------------------- end-to-end per architecture


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prune_matches_zeroed_dense_and_reloads(name, tmp_path):
    model = _model(name)
    dense = copy.deepcopy(model)
    before = count_parameters(model)
    grads = calibration_gradients(model, _batches())
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no grads behind
    imp = group_importance(model, grads)
    ratio = 0.5
    plan = plan_structured_pruning(imp, ratio)
    n_groups = len(imp[0]["attn"])
    assert all(len(k) == n_groups - n_removed(ratio, n_groups) for k in plan.keep_attn.values())
    # Plans differ between blocks (importance is per block), so the test exercises per-block indices.
    apply_structured_pruning_(model, plan)

    ids = _batches(seed=7, n=1)[0]
    ref = _logits(_zero_removed(dense, plan), ids)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)

    assert before - count_parameters(model) == _expected_removed(dense.config, plan)
    assert model.config.head_dim == H // dense.config.num_attention_heads
    assert model.config.hidden_size == H

    model.save_pretrained(tmp_path)
    if model.config.structured_pruning["reloadable_with_from_pretrained"]:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    else:
        with pytest.raises(Exception):  # config cannot express fewer heads: must fail loudly, not silently
            AutoModelForCausalLM.from_pretrained(tmp_path)
        reloaded = load_structured_pruned(tmp_path)
    assert count_parameters(reloaded) == count_parameters(model)
    assert type(reloaded) is type(dense)
    torch.testing.assert_close(_logits(reloaded, ids), ref, atol=1e-5, rtol=1e-5)
    # The loader is the one entry point for every family.
    torch.testing.assert_close(_logits(load_structured_pruned(tmp_path), ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["opt", "gpt2", "gpt_neox"])
def test_mlp_only_pruning_reloads_with_plain_from_pretrained(name, tmp_path):
    model = _model(name)
    imp = group_importance(model, calibration_gradients(model, _batches(n=1)))
    apply_structured_pruning_(model, plan_structured_pruning(imp, 0.25, attention=False))
    assert model.config.structured_pruning["reloadable_with_from_pretrained"]
    ids = _batches(seed=3, n=1)[0]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_pruning_twice_and_generate():
    model = _model("llama_gqa_bias")
    for _ in range(2):
        imp = group_importance(model, calibration_gradients(model, _batches(n=1)))
        apply_structured_pruning_(model, plan_structured_pruning(imp, 0.25))
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.config.structured_pruning["original_num_attention_heads"] == 4
    out = model.generate(_batches(n=1)[0][:1, :4], max_new_tokens=3, do_sample=False)  # KV cache path
    assert out.shape == (1, 7)


# ---------------------------------------------------------------- importance


def test_zero_group_has_zero_importance_and_goes_first():
    model = _model("gpt2")
    d = H // 4
    with torch.no_grad():  # head 2 of block 1 entirely zero
        at = model.transformer.h[1].attn
        for part in range(3):
            at.c_attn.weight[:, part * H + 2 * d:part * H + 3 * d] = 0
            at.c_attn.bias[part * H + 2 * d:part * H + 3 * d] = 0
        at.c_proj.weight[2 * d:3 * d] = 0
        model.transformer.h[0].mlp.c_fc.weight[:, 5] = 0  # channel 5 of block 0
        model.transformer.h[0].mlp.c_fc.bias[5] = 0
        model.transformer.h[0].mlp.c_proj.weight[5] = 0
    imp = group_importance(model, calibration_gradients(model, _batches()))
    assert imp[1]["attn"][2] == 0 and (imp[1]["attn"][[0, 1, 3]] > 0).all()
    assert imp[0]["mlp"][5] == 0 and (imp[0]["mlp"] > 0).sum() == FFN - 1
    plan = plan_structured_pruning(imp, 0.25)  # one head of 4, 24 channels of 96
    assert 2 not in plan.keep_attn[1].tolist()
    assert 5 not in plan.keep_mlp[0].tolist()


def test_importance_matches_naive_sum_for_one_gqa_group():
    model = _model("llama_gqa_bias")
    grads = calibration_gradients(model, _batches())
    imp = group_importance(model, grads)
    b, g, d, r = 1, 1, H // 4, 2  # block 1, KV group 1 = query heads 2, 3
    pre = f"model.layers.{b}.self_attn."
    p = dict(model.named_parameters())

    def s(name, index):
        return (grads[name] * p[name]).abs()[index].sum()

    q, kv = slice(g * r * d, (g + 1) * r * d), slice(g * d, (g + 1) * d)
    rows = (("q_proj", q), ("k_proj", kv), ("v_proj", kv))
    expected = sum(s(pre + f"{n}.weight", idx) + s(pre + f"{n}.bias", idx) for n, idx in rows)
    expected = expected + s(pre + "o_proj.weight", (slice(None), q))
    torch.testing.assert_close(imp[b]["attn"][g], expected, rtol=1e-5, atol=0)
    # and one MLP channel: gate/up rows (+ biases) and the down column
    c, mp = 7, f"model.layers.{b}.mlp."
    naive = sum(s(mp + f"{n}.weight", c) + s(mp + f"{n}.bias", c) for n in ("gate_proj", "up_proj"))
    naive = naive + s(mp + "down_proj.weight", (slice(None), c))
    torch.testing.assert_close(imp[b]["mlp"][c], naive, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- planning helpers


def test_ratio_for_target_fraction_is_closest_and_consistent():
    model = _model("llama_gqa_bias")
    for fraction in (0.1, 0.3, 0.5):
        r = ratio_for_target_fraction(model, fraction)
        got = removed_target_fraction(model, r)
        # brute force over a fine grid must not do better
        best = min(abs(removed_target_fraction(model, x / 1000) - fraction) for x in range(1000))
        assert abs(got - fraction) <= best + 1e-12
    # the fraction is what a real plan removes (weights of target linears only)
    r = ratio_for_target_fraction(model, 0.3)
    w_before = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    imp = group_importance(model, calibration_gradients(model, _batches(n=1)))
    apply_structured_pruning_(model, plan_structured_pruning(imp, r))
    w_after = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert (w_before - w_after) / w_before == pytest.approx(removed_target_fraction(_model("llama_gqa_bias"), r))


def test_rounding_and_validation():
    assert n_removed(0.5, 4) == 2 and n_removed(0.25, 2) == 1 and n_removed(0.99, 2) == 1 and n_removed(0.0, 7) == 0
    with pytest.raises(ValueError):
        n_removed(1.0, 4)
    model = _model("llama_mha")
    imp = group_importance(model, calibration_gradients(model, _batches(n=1)))
    plan = plan_structured_pruning(imp, 0.5)
    plan.keep_attn[0] = plan.keep_attn[0][:1]
    with pytest.raises(ValueError, match="non-uniform"):
        apply_structured_pruning_(model, plan)


def test_unsupported_architecture():
    from transformers import BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=H, n_layer=1, n_head=4))
    with pytest.raises(NotImplementedError, match="Supported"):
        group_importance(model, {})
