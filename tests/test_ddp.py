"""Two CPU processes (``ddp_spawn``, gloo) give the same importance and masks as one process.

General pass: each rank sums its own micro-batches (local gradients, DDP's ``no_sync()``) and the sums
are totalled across ranks, so it equals one process over all batches. Dual pass: one step on N ranks
is one process with gradient accumulation over N micro-batches at the same weights; the reference is
computed here with the pure algorithm functions. ``DistributedSampler`` without shuffle gives rank r
the sequences r, r+N, ... (batch_size 1: one sequence per micro-batch).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dpruner_lightning.algorithms.importance import dual_accumulate_, regulariser_grad
from dpruner_lightning.algorithms.masks import choose_masks
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import MaskSpec, OutputSpec, TargetSpec
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.models import load_causal_lm, load_tokenizer
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.quiet import install_known_filters

from .helpers import smoke_data, tiny_spec

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORLD = 2
ALPHA, LAMBDA = 0.05, 0.1  # a large step, so that "accumulate over N" and "N sequential steps" differ


def _run(tmp_path, devices: int, estimator: str) -> DPrunerModule:
    install_known_filters()
    module = DPrunerModule(model=tiny_spec(), method=DPrunerMethod(general_estimator=estimator, alpha=ALPHA, lambda_reg=LAMBDA),
                           mask=MaskSpec(sparsity=0.5),
                           output=OutputSpec(export_model=False, save_importance=True, save_masks=True))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        **module.trainer_kwargs(), enable_checkpointing=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, smoke_data(batch_size=1))
    return module


def _assert_close(a: dict, b: dict, rtol: float) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for n in a:
        err = float((a[n] - b[n]).abs().max() / b[n].abs().max())
        worst = max(worst, err)
    assert worst < rtol, worst
    return worst


def _domain_blocks() -> torch.Tensor:
    data = smoke_data(batch_size=1)
    data._tokenizer = lambda: load_tokenizer(tiny_spec())
    data.setup("fit")
    return data.calibration["domain"]


def _reference_dual(general: dict[str, torch.Tensor]):
    """One process, gradient accumulation over WORLD micro-batches per step (proximal update)."""
    model = load_causal_lm(tiny_spec()).train()
    model.requires_grad_(False)
    targets = find_targets(model, TargetSpec().target_modules, TargetSpec().exclude_modules)
    for t in targets.values():
        t.weight.requires_grad_(True)
    original = {n: t.weight_view().detach().clone() for n, t in targets.items()}
    dual = {n: torch.zeros(t.shape) for n, t in targets.items()}
    blocks = _domain_blocks()
    for step in range(blocks.shape[0] // WORLD):
        update = {n: torch.zeros(t.shape) for n, t in targets.items()}
        for rank in range(WORLD):
            ids = blocks[rank + WORLD * step][None]
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            with torch.no_grad():
                for n, t in targets.items():
                    w = t.weight_view()
                    total = t.weight_view(t.weight.grad).float() + regulariser_grad(general[n], w, original[n], LAMBDA)
                    dual_accumulate_(dual[n], total, w)
                    update[n] += total / (1.0 + 2.0 * ALPHA * LAMBDA * general[n])
        with torch.no_grad():
            for n, t in targets.items():
                t.weight_view().sub_(ALPHA * update[n] / WORLD)
    return dual, original, model


def test_ddp_taylor_matches_one_process(tmp_path):
    one = _run(tmp_path / "one", 1, "taylor")
    ddp = _run(tmp_path / "ddp", WORLD, "taylor")
    g1 = load_file(tmp_path / "one" / "general_importance.safetensors")
    g2 = load_file(tmp_path / "ddp" / "general_importance.safetensors")
    _assert_close(g2, g1, 1e-6)

    # Dual pass: the one-process gradient-accumulation equivalent, from the pure functions.
    dual_ref, original, _ = _reference_dual(g1)
    dual_ddp = load_file(tmp_path / "ddp" / "dual_importance.safetensors")
    _assert_close(dual_ddp, dual_ref, 1e-5)
    # ... which is not what one process stepping after every micro-batch computes (the test can tell).
    dual_seq = load_file(tmp_path / "one" / "dual_importance.safetensors")
    assert max(float((dual_seq[n] - dual_ref[n]).abs().max() / dual_ref[n].abs().max()) for n in dual_ref) > 1e-4

    masks_ddp = load_file(tmp_path / "ddp" / "masks.safetensors")
    spec = MaskSpec(sparsity=0.5)
    masks_ref = choose_masks(dual_ref, spec.target_sparsity("layer"), spec.resolved_granularity("layer"),
                             block_size=spec.block_size, allocation=spec.allocation, block_of=ddp.method.block_of())
    for n in masks_ref:
        assert torch.equal(masks_ddp[n].bool(), masks_ref[n].bool()), n
    # ddp_spawn hands rank 0's weights back: the ORIGINAL weights with the masks applied.
    for n, t in ddp.targets.items():
        torch.testing.assert_close(t.weight_view().detach(), original[n] * masks_ref[n], rtol=0, atol=0)
    assert one.pruned and (tmp_path / "ddp" / "summary.json").exists()


def test_ddp_obs_general_importance_matches_one_process(tmp_path):
    _run(tmp_path / "one", 1, "obs")
    _run(tmp_path / "ddp", WORLD, "obs")
    g1 = load_file(tmp_path / "one" / "general_importance.safetensors")
    g2 = load_file(tmp_path / "ddp" / "general_importance.safetensors")
    # H agrees to fp32 round-off; the Cholesky of H^-1 amplifies it: one process with batch_size 3
    # instead of 1 (another grouping of the running average) already differs by 2.6e-5 here.
    _assert_close(g2, g1, 1e-4)


# -- the reduction hooks without processes: rank 1's tensors are recorded, then added on "rank 0" ----------
def _two_rank_reduce(reduce_rank0, reduce_rank1) -> None:
    sent: list[torch.Tensor] = []
    reduce_rank1(lambda t: sent.append(t.clone()) or t)
    it = iter(sent)
    reduce_rank0(lambda t: t.add_(next(it)))
    assert next(it, None) is None  # the same number of calls, in the same order


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 257, (1, 16), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method_name", ["wanda", "llm_pruner"])
def test_reduce_across_ranks_equals_one_process(method_name):
    from dpruner_lightning.methods import LLMPrunerMethod, WandaMethod

    from .conftest import tiny_model

    def make():
        model = tiny_model("llama")
        model.requires_grad_(False)
        m = WandaMethod() if method_name == "wanda" else LLMPrunerMethod()
        m.prepare(model, find_targets(model, TargetSpec().target_modules, TargetSpec().exclude_modules))
        p = m.passes()[0]
        m.start_pass(p)
        for t in m.targets.values():
            t.weight.requires_grad_(True)
        return m, p

    def feed(m, p, batches):
        for ids in batches:
            if p.mode == "forward":
                with torch.no_grad():
                    m.model(input_ids=ids)
            else:
                m.model(input_ids=ids, labels=ids).loss.backward()
                m.after_backward(p)
                m.model.zero_grad(set_to_none=True)

    batches = _batches()
    one, p = make()
    feed(one, p, batches)
    one.end_pass(p)
    r0, _ = make()
    r1, _ = make()
    feed(r0, p, batches[0::2])
    feed(r1, p, batches[1::2])
    _two_rank_reduce(lambda f: r0.reduce_across_ranks(p, f), lambda f: r1.reduce_across_ranks(p, f))
    r0.end_pass(p)
    if method_name == "wanda":
        _assert_close(r0.scores(), one.scores(), 1e-6)
    else:
        flat = lambda m: {f"{b}.{k}": t for b, imp in m.importance.items() for k, t in imp.items()}  # noqa: E731
        _assert_close(flat(r0), flat(one), 1e-6)


def test_input_hessian_all_reduce_converts_running_averages_to_sums():
    from dpruner_lightning.algorithms.hessian import InputStatistics

    from .conftest import tiny_model

    model = tiny_model("llama")
    targets = find_targets(model, TargetSpec().target_modules, TargetSpec().exclude_modules)
    batches = [torch.randint(0, 257, (1, n)) for n in (5, 9, 12)]  # unequal token counts per rank
    stats = {k: InputStatistics(targets, kind="hessian") for k in ("one", "r0", "r1")}
    with torch.no_grad():
        for key, part in (("one", batches), ("r0", batches[:1]), ("r1", batches[1:])):
            with stats[key]:
                for ids in part:
                    model(input_ids=ids)
    _two_rank_reduce(stats["r0"].all_reduce_, stats["r1"].all_reduce_)
    for n in targets:
        torch.testing.assert_close(stats["r0"].hessian(n), stats["one"].hessian(n), rtol=1e-5, atol=1e-6)
        assert stats["r0"].num_tokens(n) == stats["one"].num_tokens(n) == 26


def test_multi_process_refusals():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from dpruner_lightning.callbacks import check_multi_process
    from dpruner_lightning.methods import SparseGPTMethod

    ddp = SimpleNamespace(world_size=2, strategy=DDPStrategy())
    check_multi_process(ddp, SimpleNamespace(method=DPrunerMethod()))
    with pytest.raises(NotImplementedError, match="sparsegpt cannot run on several processes"):
        check_multi_process(ddp, SimpleNamespace(method=SparseGPTMethod()))
    other = SimpleNamespace(world_size=2, strategy=SingleDeviceStrategy())
    with pytest.raises(NotImplementedError, match="support Lightning's DDP strategies"):
        check_multi_process(other, SimpleNamespace(method=DPrunerMethod()))
