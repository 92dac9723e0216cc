"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo) gives the masks and pruned weights of one process.

Each rank holds a slice of rows of every target; every rank reads the same micro-batches, so FSDP's
averaged gradient is that micro-batch's gradient and each rank accumulates its rows' importance
(:mod:`dpruner_lightning.algorithms.sharding`). Masks are chosen on the gathered scores. The reference is the
same model, batches and method on one process, computed inside each worker.
"""

from __future__ import annotations

import ast
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpruner_lightning.algorithms.sharding import full_tensor, shard_model
from dpruner_lightning.algorithms.targets import find_decoder_blocks, find_targets
from dpruner_lightning.config import MaskSpec
from dpruner_lightning.methods import DPrunerMethod, MagnitudeMethod, WandaMethod
from dpruner_lightning.pruning import DenseReference, calibrate, prune

from .conftest import tiny_model
from .helpers import token_batches

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORLD = 2
METHODS = {
    "dpruner_taylor": lambda: DPrunerMethod(general_estimator="taylor", alpha=0.05, lambda_reg=0.1),
    "dpruner_clip": lambda: DPrunerMethod(general_estimator="taylor", alpha=0.05, lambda_reg=0.1, max_grad_norm=0.5),
    "wanda": lambda: WandaMethod(),
    "magnitude": lambda: MagnitudeMethod(),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune(model, method, batches, spec):
    targets = find_targets(model)
    dense = DenseReference.of(model, targets)
    method.prepare(model, targets)
    calibrate(model, targets, method, batches)
    return targets, prune(model, targets, method, spec, dense)


def _worker(rank: int, port: int, out: str, method_name: str, granularity: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        # vocab 257 / hidden 64 / ffn 128: rows split evenly over 2 ranks
        reference = tiny_model("llama")
        model = copy.deepcopy(reference)
        batches = {"general": token_batches(1, 3), "domain": token_batches(2, 3)}
        spec = MaskSpec(sparsity=0.5, granularity=granularity)
        ref_targets, ref = _prune(reference, METHODS[method_name](), batches, spec)

        _, blocks = find_decoder_blocks(model)
        shard_model(model, blocks, init_device_mesh("cpu", (WORLD,)))
        targets, result = _prune(model, METHODS[method_name](), batches, spec)
        report = {
            "masks_equal": all(torch.equal(result.masks[n], ref.masks[n]) for n in ref.masks),
            "weights_err": max(float((full_tensor(t.weight_view().detach(), t.weight) - ref_targets[n].weight_view()).abs().max())
                               for n, t in targets.items()),
            "sparsity": (result.sparsity_realised, ref.sparsity_realised),
            "per_matrix_equal": result.per_matrix == ref.per_matrix,
            "local_rows": {n: t.shape[0] for n, t in list(targets.items())[:1]},
        }
        torch.save(report, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method_name,granularity", [("dpruner_taylor", "layer"), ("dpruner_clip", "row"),
                                                     ("wanda", "row"), ("magnitude", "global"), ("dpruner_taylor", "2:4")])
def test_fsdp_on_two_processes_prunes_as_one_process(tmp_path, method_name, granularity):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), method_name, granularity), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        report = torch.load(tmp_path / f"rank{rank}.pt")
        assert report["masks_equal"], f"rank {rank}: masks differ from one process"
        assert report["per_matrix_equal"] and report["sparsity"][0] == report["sparsity"][1]
        assert report["weights_err"] < 1e-6, report["weights_err"]
        assert all(rows < 128 for rows in report["local_rows"].values()), "the targets were not sharded"


FIT_SCRIPT = '''
import sys
import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from dpruner_lightning.config import MaskSpec, OutputSpec
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.quiet import install_known_filters
from tests.helpers import smoke_data, tiny_spec

devices, out, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
install_known_filters()
module = DPrunerModule(model=tiny_spec(), method=DPrunerMethod(alpha=0.05, lambda_reg=0.1, max_grad_norm=1.0),
                       mask=MaskSpec(sparsity=0.5),
                       output=OutputSpec(export_model=True, save_importance=True, save_masks=True))
strategy = {"fsdp": ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1), "plain": "auto",
            "ddp": "ddp"}[how]
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **module.trainer_kwargs(), logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, default_root_dir=out)
trainer.fit(module, smoke_data(batch_size=1))
trainer.validate(module, smoke_data(batch_size=1), verbose=False)
if trainer.is_global_zero:
    print("PPL", module.perplexities)
    print("SHARDED", module.method.sharded)
'''


def test_lightning_fsdp_fit_on_two_processes_equals_one_process(tmp_path):
    """``ModelParallelStrategy`` (FSDP2) on 2 CPU processes, and on one (a mesh of one rank: how one GPU
    checks the FSDP code), and DDP on one process: the same masks, importance, exported model and
    perplexities as a plain process (the script runs as its own program: the strategy relaunches it per
    rank). Under a distributed strategy on one process Lightning used to shuffle the calibration order."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from .conftest import REPO

    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    ppl = {}
    for key, devices, how in (("plain", 1, "plain"), ("fsdp1", 1, "fsdp"), ("fsdp2", 2, "fsdp"), ("ddp1", 1, "ddp")):
        run = subprocess.run([sys.executable, str(script), str(devices), str(tmp_path / key), how], env=env,
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        ppl[key] = ast.literal_eval(next(line[4:] for line in run.stdout.splitlines() if line.startswith("PPL ")))
        assert f"SHARDED {how == 'fsdp'}" in run.stdout  # the FSDP2 path really ran (one rank included)
    for key in ("fsdp1", "fsdp2", "ddp1"):
        for name in ("masks.safetensors", "general_importance.safetensors", "dual_importance.safetensors",
                     "pruned_model/model.safetensors"):
            a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / key / name)
            assert a.keys() == b.keys(), name
            for k in a:
                if a[k].dtype == torch.bool or "masks" in name:
                    assert torch.equal(a[k], b[k]), f"{key} {name}: {k}"
                else:
                    torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{key} {name}: {k}")
        # dense and pruned perplexities agree exactly; the tuned model (after the SGD steps) up to the order of
        # the clip norm's sum over the ranks' rows
        assert ppl[key]["dense"] == ppl["plain"]["dense"] and ppl[key]["pruned"] == ppl["plain"]["pruned"], ppl
        assert ppl[key]["tuned"] == pytest.approx(ppl["plain"]["tuned"], rel=1e-5), ppl
