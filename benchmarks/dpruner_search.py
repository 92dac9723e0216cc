"""Pick D-PRUNER's recommended configuration on a VALIDATION split, never on the evaluation text.

For a compare config (its ``model`` and ``data`` sections), this script:
  1. draws the calibration blocks exactly as the datamodule does (same documents, same seed) and, from
     the same calibration documents, as many further blocks as a validation set (the held-out
     evaluation documents are never read);
  2. runs D-PRUNER's general and dual passes once per dual-pass setting (``--dual``: lambda/alpha/epochs
     triples), through ``Trainer.fit`` as ``dpruner fit`` does, keeping G, S, W0 and the batches;
  3. for every variant (mask selection, reconstruction solver, Hessian mix, exponent of S) restores
     W0, prunes, and measures the validation perplexity of both sets; SparseGPT and Wanda on the same
     batches and validation blocks are rows too;
  4. prints a table and writes it as JSON (``--out``), with the overlap of the masks of each dual
     setting with the first one (does the regulariser change the mask?).

    python benchmarks/dpruner_search.py --config configs/compare_quality.yaml --out runs/search_medical.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml

from dpruner_lightning.algorithms.hessian import InputStatistics
from dpruner_lightning.algorithms.sequential import weighted_sets
from dpruner_lightning.algorithms.sparsegpt import sequential_sparsegpt
from dpruner_lightning.config import MaskSpec, ModelSpec, OutputSpec
from dpruner_lightning.data import CalibrationDataModule, TextSource, draw_blocks
from dpruner_lightning.methods import DPrunerMethod, WandaMethod
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.quiet import install_known_filters

log = logging.getLogger("dpruner_search")

#: (label, DPrunerMethod overrides); every variant reuses the same G and S.
VARIANTS = [
    ("paper (score, no reconstruction)", dict(reconstruct="none", selection="score")),
    ("score + obs, domain H", dict(reconstruct="obs", hessian_mix=0.0)),
    ("score + obs, mix 0.5", dict(reconstruct="obs", hessian_mix=0.5)),
    ("score + exact, mix 0.5", dict(reconstruct="exact", hessian_mix=0.5)),
    ("sequential S^0.25 + obs, mix 0.5", dict(reconstruct="obs", hessian_mix=0.5, selection="sequential", dual_exponent=0.25)),
    ("sequential S^0.5 + obs, mix 0.5", dict(reconstruct="obs", hessian_mix=0.5, selection="sequential", dual_exponent=0.5)),
    ("sequential S^1 + obs, mix 0.5", dict(reconstruct="obs", hessian_mix=0.5, selection="sequential", dual_exponent=1.0)),
    ("sequential S^0.5 + exact, mix 0.5", dict(reconstruct="exact", hessian_mix=0.5, selection="sequential", dual_exponent=0.5)),
    ("sequential S^0.5 + exact, mix 0.25", dict(reconstruct="exact", hessian_mix=0.25, selection="sequential", dual_exponent=0.5)),
]


def calibration_and_validation(dm: CalibrationDataModule, tokenizer, n_val: int) -> tuple[dict, dict]:
    """Blocks per source: the datamodule's calibration draw, and the next ``n_val`` blocks of the same
    seeded document order (``draw_blocks`` packs in that order and stops when full, so its first
    ``num_samples`` blocks are the datamodule's; the held-out evaluation documents are never read)."""
    cal, val = {}, {}
    n = dm.num_samples
    for name, (docs, _) in dm.source_documents().items():
        seed = dm.seed + ("general", "domain").index(name)  # as the datamodule seeds each source
        blocks = draw_blocks(docs, tokenizer, dm.seq_len, n + n_val, seed, f"{name} calibration + validation text")
        cal[name], val[name] = blocks[:n], blocks[n:]
    return cal, val


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    nll, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def run_dual(model_spec: ModelSpec, dm: CalibrationDataModule, dual: dict) -> DPrunerModule:
    """G, S, W0 and both batch sets for one dual-pass setting (masks not applied)."""
    method = DPrunerMethod(reconstruct="obs", hessian_mix=0.5, **dual)
    module = DPrunerModule(model=model_spec, method=method, mask=MaskSpec(sparsity=0.5),
                           output=OutputSpec(save_importance=False, save_masks=False, export_model=False))
    module.select_passes(None, apply_masks=False)
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, check_val_every_n_epoch=10**9)
    trainer.fit(module, dm)
    return module


def evaluate(label: str, module: DPrunerModule, val: dict, batch_size: int, seconds: float) -> dict:
    model = module.model.eval()
    row = {"variant": label, "ppl_domain_val": perplexity(model, val["domain"], batch_size),
           "ppl_general_val": perplexity(model, val["general"], batch_size), "seconds": round(seconds, 1)}
    log.info("%-45s domain %.2f general %.2f (%.0f s)", label, row["ppl_domain_val"], row["ppl_general_val"], seconds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--val", type=int, default=32, help="validation blocks per source")
    parser.add_argument("--granularity", default="auto", help="'auto' (50%% unstructured) or an N:M pattern")
    parser.add_argument("--dual", default="0.1,0.0003,1", help="lambda,alpha,epochs triples separated by ';'")
    parser.add_argument("--variants", default="", help="comma-separated indices of VARIANTS (default: all)")
    parser.add_argument("--baselines", action="store_true", help="also SparseGPT and Wanda rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "dpruner_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    install_known_filters()
    torch.manual_seed(0)

    config = yaml.safe_load(Path(args.config).read_text())
    data = config["data"]
    model_spec = ModelSpec(**config["model"]["model"])
    spec = MaskSpec(sparsity=config["model"].get("mask", {}).get("sparsity", 0.5), granularity=args.granularity)
    probe = DPrunerModule(model=model_spec)
    sources = {k: TextSource(**v) for k, v in data.items() if k in ("general", "domain", "eval_general", "eval_domain")}
    split = CalibrationDataModule(**sources, **{k: v for k, v in data.items() if k in
                                             ("seq_len", "num_samples", "eval_fraction", "seed", "hold_out")})
    cal, val = calibration_and_validation(split, probe.tokenizer, args.val)
    dm = CalibrationDataModule.from_token_blocks(cal["general"], cal["domain"], val["general"], val["domain"],
                                                 batch_size=data.get("batch_size", 1))
    bs = data.get("batch_size", 1)
    variants = VARIANTS if not args.variants else [VARIANTS[int(i)] for i in args.variants.split(",")]
    rows, first_masks = [], None
    for triple in args.dual.split(";"):
        lam, alpha, epochs = triple.split(",")
        dual = dict(lambda_reg=float(lam), alpha=float(alpha), dual_epochs=int(epochs))
        t0 = time.perf_counter()
        module = run_dual(model_spec, dm, dual)
        passes_s = time.perf_counter() - t0
        method = module.method
        original = {n: w.clone() for n, w in method.original.items()}
        batches = {k: list(v) for k, v in method.batches.items()}
        for label, overrides in variants:
            m = copy.copy(method)
            m.original = {n: w.clone() for n, w in original.items()}
            m.batches = {k: list(v) for k, v in batches.items()}
            m.configure_reconstruction(overrides.get("reconstruct", "none"), overrides.get("hessian_mix", 0.0))
            m.selection = overrides.get("selection", "score")
            m.dual_exponent = overrides.get("dual_exponent", 1.0)
            if m.selection == "sequential" and spec.granularity == "auto":
                run_spec = MaskSpec(sparsity=spec.sparsity, granularity="block")
            else:
                run_spec = spec
            t0 = time.perf_counter()
            masks = m.prune(run_spec)
            row = evaluate(f"{label} @ lambda,alpha,epochs={triple}", module, val, bs, time.perf_counter() - t0)
            row.update(dual=dual, overrides=overrides, dual_passes_seconds=round(passes_s, 1))
            if label.startswith("paper"):
                if first_masks is None:
                    first_masks = masks
                else:
                    same = sum(int((masks[n] == first_masks[n]).sum()) for n in masks)
                    row["mask_agreement_with_first_dual"] = same / sum(v.numel() for v in masks.values())
            rows.append(row)
        if args.baselines:
            kind = spec.resolved_granularity("block")
            nm = (0, 0) if ":" not in kind else tuple(int(x) for x in kind.split(":"))
            for mix in (0.0, 0.5):
                for exact in (False, True):
                    for n, w in original.items():
                        method.targets[n].weight_view().copy_(w)
                    t0 = time.perf_counter()
                    sets = weighted_sets(batches["domain"], batches["general"], mix)
                    sequential_sparsegpt(module.model, method.targets, [], spec.sparsity if not nm[0] else 0.0,
                                         prune_n=nm[0], prune_m=nm[1], sets=sets, exact=exact)
                    rows.append(evaluate(f"sparsegpt mix {mix}{' exact' if exact else ''}", module, val, bs,
                                         time.perf_counter() - t0))
            for recon, mix in (("none", 0.0), ("obs", 0.5), ("exact", 0.5)):
                for n, w in original.items():
                    method.targets[n].weight_view().copy_(w)
                wanda = WandaMethod(reconstruct=recon, hessian_mix=mix)
                wanda.prepare(module.model, method.targets)
                t0 = time.perf_counter()
                with InputStatistics(method.targets, kind="sq_norm") as stats, torch.no_grad():
                    for b in batches["domain"]:
                        module.model(input_ids=b, use_cache=False)
                wanda.norms = {n: stats.sq_norm(n).sqrt() for n in method.targets}
                wanda.batches = {k: list(v) for k, v in batches.items()}
                wspec = spec if spec.granularity != "auto" else MaskSpec(sparsity=spec.sparsity, granularity="row")
                wanda.prune(wspec)
                rows.append(evaluate(f"wanda {recon} mix {mix}", module, val, bs, time.perf_counter() - t0))
            args.baselines = False  # baselines do not depend on the dual setting
        del module, method
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "granularity": args.granularity, "rows": rows}, indent=1))
    print("\n| variant | domain ppl (val) | general ppl (val) | s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ppl_domain_val']:.2f} | {r['ppl_general_val']:.2f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
