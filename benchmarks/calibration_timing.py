"""Shared by the calibration benchmarks (``importance_overhead.py``, ``scale.py``): the bare PyTorch loop
a pass is compared with, and one run of our passes through ``Trainer.fit``.

Run the benchmarks as scripts from the repository root (``python benchmarks/<name>.py``): this module
is imported as a sibling file, not as part of the package.
"""

from __future__ import annotations

import tempfile
import time
from typing import Callable, Optional

import lightning as L
import torch

from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import MaskSpec, ModelSpec, OutputSpec
from dpruner_lightning.data import CalibrationDataModule
from dpruner_lightning.methods.base import PruningMethod
from dpruner_lightning.models import load_causal_lm
from dpruner_lightning.module import DPrunerModule

#: The bare loop each pass mode is compared with: forward+backward for gradient passes,
#: forward+backward+SGD step for ``sgd`` passes, forward only for ``forward`` passes.
BARE_MODE = {"backward": "fb", "sgd": "fbs", "forward": "f"}
BARE_DESCRIPTION = {"fb": "forward+backward", "fbs": "forward+backward+SGD step", "f": "forward"}


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare_loop(spec: ModelSpec, blocks: torch.Tensor, batch_size: int, mode: str, lr: float,
              device: torch.device | str = "cpu") -> float:
    """Wall seconds of :func:`bare_loop_times`."""
    return bare_loop_times(spec, blocks, batch_size, mode, lr, device)[0]


def bare_loop_times(spec: ModelSpec, blocks: torch.Tensor, batch_size: int, mode: str, lr: float,
                    device: torch.device | str = "cpu", steps: Optional[list[float]] = None,
                    model: Optional[torch.nn.Module] = None) -> tuple[float, float]:
    """(wall, process CPU) seconds of the plain loop over ``blocks`` on ``device``: 'fb' forward+backward,
    'fbs' + SGD step, 'f' forward only. Only the target weights require grad, as in our passes. The
    model is loaded here (not timed) unless one is given (already on ``device``; an 'fbs' loop changes
    its weights). ``steps`` receives each step's wall seconds."""
    model = load_causal_lm(spec).to(device) if model is None else model
    params = [t.weight for t in find_targets(model).values()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr)
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, blocks.shape[0], batch_size):
        s0 = time.perf_counter()
        batch = blocks[i : i + batch_size].to(device)
        if mode == "f":
            with torch.no_grad():
                model(input_ids=batch, use_cache=False)
        else:
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            if mode == "fbs":
                opt.step()
            opt.zero_grad(set_to_none=True)
        if steps is not None:
            synchronize(device)
            steps.append(time.perf_counter() - s0)
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


class PassClock(L.Callback):
    """Wall and process-CPU seconds of every pass of a fit, from the start of its first epoch to the start
    of the next pass (or the end of training): ``start_pass``, every step, ``end_pass`` and its checks;
    the masks are not in it. CPU seconds are what the process did, so other work on a shared machine
    disturbs them far less than wall seconds (spinning worker threads still count). ``steps``: the wall
    seconds of each training step (forward, backward, the method's hooks, the update) by pass."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.steps: dict[str, list[float]] = {}
        self._open: Optional[tuple[str, float, float]] = None
        self._step0 = 0.0

    def _close(self) -> None:
        if self._open is not None:
            name, wall, cpu = self._open
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
            self._open = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self._close()
        self._open = (pl_module.current_pass.name, time.perf_counter(), time.process_time())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._step0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self.steps.setdefault(pl_module.current_pass.name, []).append(time.perf_counter() - self._step0)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:  # runs before the module's mask callback
        synchronize(pl_module.device)
        self._close()


def fit_ours(spec: ModelSpec, dm: CalibrationDataModule, method: PruningMethod, accelerator: str = "cpu",
             mask: Optional[MaskSpec] = None, before_fit: Optional[Callable[[], None]] = None,
             callbacks: Optional[list[L.Callback]] = None) -> DPrunerModule:
    """Every pass of ``method`` (and the masks) through ``Trainer.fit`` with the module's callbacks; the
    module holds ``phase_seconds`` and ``peak_memory`` per phase. ``before_fit`` runs right before
    ``fit`` (e.g. to read the memory in use before the model is loaded); ``callbacks`` run before the
    module's own (e.g. a :class:`PassClock`). The run folder (its
    ``summary.json``) is a temporary one, removed afterwards: a benchmark leaves nothing behind."""
    module = DPrunerModule(model=spec, method=method, mask=mask or MaskSpec(sparsity=0.5),
                           output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
    with tempfile.TemporaryDirectory(prefix="dpruner-bench-") as root:
        trainer = L.Trainer(**module.trainer_kwargs(), accelerator=accelerator, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, callbacks=callbacks)
        if before_fit is not None:
            before_fit()
        trainer.fit(module, dm)
    return module


def best_of(fn: Callable[[], float], repeats: int) -> float:
    """The smallest of ``repeats`` timings (the least disturbed by other work on the machine)."""
    return min(fn() for _ in range(max(1, repeats)))
