"""How much do our importance passes cost over a bare loop on the same batches?

For each pass of D-PRUNER we time, in the same process and over the same token blocks:
  * bare: the plain PyTorch loop the pass is built on (forward+backward for gradient passes,
    forward+backward+SGD step for the dual pass, forward only for the ``obs`` general pass);
  * ours: the same pass run by ``Trainer.fit`` through the callbacks (accumulation, regulariser,
    logging, hooks: everything), read from the module's phase timers.
and print ours / bare. Goal: <= 1.15 on CPU.

    python benchmarks/importance_overhead.py                   # mid-size random Llama, ~2 min on 2 cores
    python benchmarks/importance_overhead.py --model smollm2-135m --tokenizer smollm2-135m
"""

from __future__ import annotations

import argparse
import logging

import torch
from calibration_timing import bare_loop, best_of, fit_ours

from dpruner_lightning.config import ModelSpec
from dpruner_lightning.data import CalibrationDataModule
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.models import load_causal_lm
from dpruner_lightning.quiet import install_known_filters

MID_LLAMA = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=8192, max_position_embeddings=1024)


def ours(spec: ModelSpec, dm: CalibrationDataModule, estimator: str, lr: float) -> dict[str, float]:
    return fit_ours(spec, dm, DPrunerMethod(general_estimator=estimator, alpha=lr)).phase_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama")
    ap.add_argument("--tokenizer", default="bytes")
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences per pass")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every timing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    install_known_filters()
    torch.manual_seed(0)
    overrides = MID_LLAMA if args.model == "random:llama" else {}
    spec = ModelSpec(name_or_path=args.model, tokenizer=args.tokenizer, config_overrides=overrides)
    probe = load_causal_lm(spec)
    vocab, n_params = probe.config.vocab_size, sum(p.numel() for p in probe.parameters())
    del probe
    general = torch.randint(0, vocab, (args.samples, args.seq_len))
    domain = torch.randint(0, vocab, (args.samples, args.seq_len))
    dm = CalibrationDataModule.from_token_blocks(general, domain, general[:1], domain[:1], batch_size=args.batch_size)
    lr = 3e-4

    bare_loop(spec, general[: 2 * args.batch_size], args.batch_size, "fb", lr)  # warm-up
    best = lambda f: best_of(f, args.repeats)  # noqa: E731
    rows = []
    t_fb = best(lambda: bare_loop(spec, general, args.batch_size, "fb", lr))
    t_fbs = best(lambda: bare_loop(spec, domain, args.batch_size, "fbs", lr))
    t_f = best(lambda: bare_loop(spec, general, args.batch_size, "f", lr))
    taylor = [ours(spec, dm, "taylor", lr) for _ in range(args.repeats)]
    obs = [ours(spec, dm, "obs", lr) for _ in range(args.repeats)]
    rows.append(("general pass, taylor", min(r["general"] for r in taylor), t_fb, "forward+backward"))
    rows.append(("general pass, obs", min(r["general"] for r in obs), t_f, "forward"))
    rows.append(("dual pass (SGD)", min(r["dual"] for r in taylor), t_fbs, "forward+backward+SGD step"))
    rows.append(("dual pass vs fwd+bwd", min(r["dual"] for r in taylor), t_fb, "forward+backward"))
    tokens = args.samples * args.seq_len
    print(f"model {args.model}, {n_params / 1e6:.1f}M params, "
          f"{args.samples} x {args.seq_len} tokens per pass, micro-batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'pass':<24} {'ours s':>8} {'bare s':>8} {'ratio':>6}  baseline")
    for name, t_ours, t_bare, what in rows:
        print(f"{name:<24} {t_ours:8.2f} {t_bare:8.2f} {t_ours / t_bare:6.3f}  {what} ({tokens / t_bare:.0f} tok/s)")


if __name__ == "__main__":
    main()
