"""FSDP2 through ``Trainer.fit`` on this machine's devices against a plain run of the same prune.

Runs D-PRUNER on a random Llama of a named shape (``scale.py``'s shapes) twice in this process: a plain
single-device fit, then ``ModelParallelStrategy(data_parallel_size=N)`` (N = ``--devices``; 1 shards over a
mesh of one rank, which saves nothing but runs the FSDP2 code path). Prints, for scripts to read::

    masks_differ <fraction of mask entries that differ>
    general_max_rel <largest relative difference of G>  dual_max_rel <... of S>   (one device only)
    seconds plain <s> fsdp <s>

On the CPU in fp32 the masks are equal (the tests check that); on a GPU the reductions run in another
order, so a few entries at the threshold may flip. Several devices relaunch this script per rank (Lightning's
launcher), so run it as a script:

    python benchmarks/fsdp_check.py --accelerator cuda --devices 1 --shape llama-100m --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from scale import SHAPES

from dpruner_lightning.config import MaskSpec, ModelSpec, OutputSpec
from dpruner_lightning.data import CalibrationDataModule
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.quiet import install_known_filters


def fit(spec: ModelSpec, dm: CalibrationDataModule, accelerator: str, strategy, devices: int) -> tuple[DPrunerModule, float]:
    module = DPrunerModule(model=spec, method=DPrunerMethod(alpha=3e-4, lambda_reg=0.1), mask=MaskSpec(sparsity=0.5),
                           output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
    with tempfile.TemporaryDirectory(prefix="dpruner-fsdp-check-") as root:
        trainer = L.Trainer(**module.trainer_kwargs(), accelerator=accelerator, devices=devices, strategy=strategy,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root)
        t0 = time.perf_counter()
        trainer.fit(module, dm)
        return module, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    install_known_filters()
    torch.manual_seed(0)
    spec = ModelSpec(name_or_path="random:llama", tokenizer="bytes", config_overrides=dict(SHAPES[args.shape]), dtype=args.dtype)
    vocab = SHAPES[args.shape]["vocab_size"]
    general, domain = (torch.randint(0, vocab, (args.sequences, args.seq_len)) for _ in range(2))
    dm = CalibrationDataModule.from_token_blocks(general, domain, general[:1], domain[:1], batch_size=1)
    plain, t_plain = fit(spec, dm, args.accelerator, "auto", 1)
    strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    sharded, t_fsdp = fit(spec, dm, args.accelerator, strategy, args.devices)
    if not sharded.trainer.is_global_zero:
        return
    assert sharded.method.sharded, "the FSDP run was not sharded"
    differ = sum(int((plain.result.masks[n].cpu() != m.cpu()).sum()) for n, m in sharded.result.masks.items())
    total = sum(m.numel() for m in plain.result.masks.values())
    print(f"shape {args.shape}, {args.dtype} on {args.accelerator}, FSDP over {args.devices} device(s)")
    print(f"masks_differ {differ / total:.3g}")
    if args.devices == 1:  # one rank holds every row: G and S compare directly
        rel = {name: max(float(((ours[n].cpu() - r.cpu()).abs() / r.cpu().abs().clamp_min(1e-12)).max()) for n, r in ref.items())
               for name, ours, ref in (("general", sharded.method.general, plain.method.general),
                                       ("dual", sharded.method.dual, plain.method.dual))}
        print(f"general_max_rel {rel['general']:.3g}  dual_max_rel {rel['dual']:.3g}")
    print(f"seconds plain {t_plain:.1f} fsdp {t_fsdp:.1f}")


if __name__ == "__main__":
    main()
