"""The one interface every pruning method implements.

The lifecycle follows torch.ao's prepare / step / squash: :meth:`PruningMethod.prepare` once, then
for every calibration pass :meth:`start_pass`, per micro-batch :meth:`after_backward` (gradient passes)
or :meth:`collect` (methods that replay batches themselves), :meth:`end_pass`, and finally
:meth:`prune`. Methods are pure torch: the Lightning layer only decides *when* each hook runs (which
epoch, which batch) and feeds the data; a method never sees a Trainer.

Several processes (DDP): every rank accumulates over its own share of the calibration batches, with
local (un-synchronised) gradients; before :meth:`end_pass` the Lightning layer calls
:meth:`reduce_across_ranks` with an in-place all-reduce-sum function, and the method turns its
accumulators into global sums, so scores and masks are the same on every rank and equal to one
process over all the batches. A method that accumulates anything must implement it; one that cannot
run on several processes sets :attr:`multi_process` to False (the layer then refuses to start).

Reconstruction. A mask method may also re-solve its kept weights after choosing the masks
(``reconstruct``: ``obs`` or ``exact``, see :mod:`~dpruner_lightning.algorithms.reconstruct`), block
by block on the outputs of the already reconstructed blocks, with the layer Hessians of the domain
calibration set, the open-domain one, or the mix ``(1 - hessian_mix) H_domain + hessian_mix H_general``.
The batches are gathered by extra ``collect`` passes (:meth:`batch_passes`); reconstruction runs on
one process only.

Where the state lives (:attr:`PruningMethod.state_device`). ``auto``: every accumulator and weight copy
sits on its target weight's device. ``cpu``: they sit in host memory (pinned when the weights are on an
accelerator, so the weights written back from them travel without blocking), and the per-step
arithmetic runs there too: the gradient comes to the state, never the state to the device. Device
memory then holds only the weights, the gradients of one micro-batch and the activations; the price is
a host round trip per gradient and host arithmetic per step. The reconstruction Hessians (``reconstruct``)
are not moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional

import torch
from torch import nn

from ..algorithms.masks import apply_mask_, choose_masks, expected_tolerance
from ..algorithms.reconstruct import check_solver, reconstruct_
from ..algorithms.sequential import sequential_blockwise, weighted_sets
from ..algorithms.sharding import all_reduce_sum_, check_shardable, full_tensor, local_rows, model_is_sharded
from ..algorithms.targets import Target, block_index, find_decoder_blocks
from ..config import MaskSpec

PassMode = Literal["forward", "backward", "sgd", "collect", "none"]
StateDevice = Literal["auto", "cpu"]
STATE_DEVICES = ("auto", "cpu")

#: In-place sum of a tensor over all ranks (returns it); the identity on one process.
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CalibrationPass:
    """One "fit" phase over a calibration set.

    ``mode``: ``forward`` (no grad; the method's input hooks see every target's inputs), ``backward``
    (LM-loss gradients reach :meth:`PruningMethod.after_backward`, weights unchanged), ``sgd`` (the same,
    then a plain SGD step), ``collect`` (batches handed to :meth:`PruningMethod.collect`), ``none``
    (nothing to compute: a data-free method still gets one pass so the dense model is validated)."""

    name: str
    source: Literal["general", "domain"]
    mode: PassMode
    epochs: int = 1


class PruningMethod:
    """Base class: subclasses set :attr:`name`, :attr:`default_granularity`, and override the hooks."""

    name: str = "base"
    default_granularity: str = "layer"
    #: SGD learning rate used by ``sgd`` passes (0 for methods that never update weights).
    learning_rate: float = 0.0
    #: Gradient-norm clipping of ``sgd`` steps (None: no clipping).
    max_grad_norm: Optional[float] = None
    #: Whether the method can run its passes on several processes (see :meth:`reduce_across_ranks`).
    multi_process: bool = True
    #: Structured methods remove whole rows/columns (shapes shrink) and return no masks from prune().
    structured: bool = False
    #: Solver re-fitting the kept weights after the masks (``none`` | ``obs`` | ``exact``).
    reconstruct: str = "none"
    #: Weight of the open-domain set in the reconstruction Hessian (0: domain only, 1: general only).
    hessian_mix: float = 0.0
    #: Dampening of the reconstruction Hessian, a fraction of mean(diag H).
    damp: float = 0.01
    #: Where accumulators and weight copies live: ``auto`` (the weights' device) or ``cpu`` (module docstring).
    state_device: str = "auto"
    #: Processes running the passes, set by the layer before the first pass. On one, nothing touches the
    #: gradients between :meth:`after_backward` and :meth:`sgd_step`, so a method may take its step in
    #: the former (then leaving no gradient to the latter).
    world_size: int = 1
    #: Whether :meth:`after_backward` computes per-step statistics to log (the layer turns it off when
    #: nothing is logged: they cost passes over every weight).
    step_stats: bool = True
    #: Set by the layer before each micro-batch: whether this step's statistics will be written (the
    #: logger writes every ``log_every_n_steps``); :attr:`stats_now` combines both.
    log_this_step: bool = True
    #: Set by the layer: whether each target gradient is final the moment autograd has computed it (one
    #: unsharded process, no loss scaler to undo), so a method may consume it, and free it, in a
    #: post-accumulate-grad hook during the backward instead of after it.
    gradients_final_in_backward: bool = False
    #: Whether the model is sharded with FSDP2 (set by :meth:`prepare`): every rank reads the same
    #: micro-batches and accumulates its own rows; masks are chosen on the gathered scores
    #: (:mod:`~dpruner_lightning.algorithms.sharding`).
    sharded: bool = False

    def __init__(self) -> None:
        self.targets: dict[str, Target] = {}
        #: What a structured prune did (reported in summary.json).
        self.plan_summary: dict = {}
        #: Calibration ``input_ids`` by source, gathered by the ``collect`` passes.
        self.batches: dict[str, list[torch.Tensor]] = {}
        self._scratch: dict[torch.device, list[torch.Tensor]] = {}
        self._hooks: list = []  # post-accumulate-grad hooks of the running pass (hook_gradients)

    @property
    def stats_now(self) -> bool:
        """Whether :meth:`after_backward` computes this step's statistics."""
        return self.step_stats and self.log_this_step

    def configure_reconstruction(self, reconstruct: str = "none", hessian_mix: float = 0.0) -> None:
        """Validate and set the reconstruction options (subclasses call it from ``__init__``)."""
        check_solver(reconstruct)
        if not 0.0 <= hessian_mix <= 1.0:
            raise ValueError(f"hessian_mix must be in [0, 1] (the open-domain share of the Hessian); got {hessian_mix}")
        if self.structured and reconstruct != "none":
            raise ValueError(f"{self.name} removes whole structures: reconstruct must be 'none'")
        self.reconstruct, self.hessian_mix = reconstruct, float(hessian_mix)
        if self.needs_batches():
            self.multi_process = False  # the sequential solve replays the batches of one process

    def configure_state_device(self, state_device: str) -> None:
        """Validate and set :attr:`state_device` (subclasses that keep state call it from ``__init__``)."""
        if state_device not in STATE_DEVICES:
            raise ValueError(f"state_device must be 'auto' (the weights' device) or 'cpu' (host memory); got {state_device!r}")
        self.state_device = state_device

    def state_device_of(self, weight: torch.Tensor) -> torch.device:
        """The device of the state kept for ``weight`` under :attr:`state_device`."""
        return torch.device("cpu") if self.state_device == "cpu" else weight.device

    def new_state(self, like: torch.Tensor, dtype: torch.dtype = torch.float32, zero: bool = True) -> torch.Tensor:
        """Zeros (``zero=False``: uninitialised memory, for an accumulator whose first update overwrites it)
        shaped like ``like`` (``out x in`` view or parameter) on the state device."""
        device = self.state_device_of(like)
        make = torch.zeros if zero else torch.empty
        return make(like.shape, dtype=dtype, device=device, pin_memory=_pinned(like, device))

    def copy_to_state(self, tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A copy of ``tensor`` (in ``dtype``, default its own) on the state device. The copy from an
        accelerator blocks: the host reads it right away."""
        device = self.state_device_of(tensor)
        out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=device, pin_memory=_pinned(tensor, device))
        return out.copy_(tensor)

    def scratch(self, weight: torch.Tensor, shape: tuple[int, int], count: int) -> list[torch.Tensor]:
        """``count`` fp32 buffers of ``shape`` on the state device of ``weight``, reused by every matrix and
        step (allocated once, as large as the largest target): a fresh temporary of a matrix's size costs
        the CPU a page fault per 4 KiB every time (about half the per-step arithmetic of the dual pass),
        and an accelerator's allocator churn. The buffers hold garbage; free them with :meth:`free_scratch`."""
        device = self.state_device_of(weight)
        numel = shape[0] * shape[1]
        buffers = self._scratch.get(device, [])
        if len(buffers) < count or buffers[0].numel() < numel:
            size = max([numel] + [r * c for r, c in (t.shape for t in self.targets.values())])
            buffers = [torch.empty(size, dtype=torch.float32, device=device, pin_memory=_pinned(weight, device))
                       for _ in range(count)]
            self._scratch[device] = buffers
        return [b[:numel].view(shape) for b in buffers[:count]]

    def free_scratch(self) -> None:
        self._scratch = {}

    @staticmethod
    def scratch_bytes(shapes: Mapping[str, tuple[int, int]], count: int) -> int:
        """Bytes of ``count`` :meth:`scratch` buffers for targets of these shapes (memory estimate)."""
        return max((r * c for r, c in shapes.values()), default=0) * 4 * count

    def has_gradient_pass(self) -> bool:
        """Whether any pass runs a backward (only then do gradients and a backward's activations exist)."""
        return any(p.mode in ("backward", "sgd") for p in self.passes())

    def gradient_bytes(self, shapes: Mapping[str, tuple[int, int]], weight_bytes: int) -> int:
        """Peak bytes of target gradients in the method's gradient passes (memory estimate), in the model's
        dtype: none without a gradient pass; when :meth:`consumes_every_gradient_in_backward`, the largest
        target's twice (the one being consumed and the next one autograd computes); else every target's."""
        if not self.has_gradient_pass():
            return 0
        if self.consumes_every_gradient_in_backward():
            return 2 * max((r * c for r, c in shapes.values()), default=0) * weight_bytes
        return sum(r * c for r, c in shapes.values()) * weight_bytes

    def consumes_every_gradient_in_backward(self) -> bool:
        """Whether every gradient pass consumes (and frees) each gradient in a hook during the backward
        (:meth:`hook_gradients`). Default: no; methods that hook their gradients override it."""
        return False

    @property
    def consumes_in_backward(self) -> bool:
        """Whether gradients may be consumed in hooks during the backward (:attr:`gradients_final_in_backward`
        on one unsharded process)."""
        return self.gradients_final_in_backward and not self.sharded and self.world_size == 1

    def hook_gradients(self, params: Mapping[str, nn.Parameter], consume: Callable[[str], None]) -> None:
        """Call ``consume(name)`` from a post-accumulate-grad hook of each parameter, the moment autograd has
        computed its gradient (replacing hooks set earlier); ``consume`` frees the gradient once used, so
        about one exists at a time instead of every one until the backward ends."""
        self.unhook_gradients()
        self._hooks = [param.register_post_accumulate_grad_hook(lambda _, n=name: consume(n))
                       for name, param in params.items()]

    def unhook_gradients(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def gradients_hooked(self) -> bool:
        return bool(self._hooks)

    def check_mask_spec(self, spec: MaskSpec) -> None:
        """Reject mask settings the method cannot honour; called when the module is built (before compute)."""

    def tolerance(self, shape: tuple[int, int], granularity: str, block_size: int) -> float:
        """Largest allowed gap between a matrix's mask sparsity and the request (rounding of the selection)."""
        return expected_tolerance(shape, granularity, block_size)

    def state_bytes(self, shapes: Mapping[str, tuple[int, int]], weight_bytes: int) -> int:
        """Peak bytes of the method's own state for targets of these ``out x in`` shapes (memory
        estimate before a run). Default: one fp32 score per weight, plus :meth:`reconstruction_state_bytes`."""
        return sum(r * c for r, c in shapes.values()) * 4 + self.reconstruction_state_bytes(shapes)

    def reconstruction_state_bytes(self, shapes: Mapping[str, tuple[int, int]]) -> int:
        """The collected batches' layer Hessians of one decoder block when reconstructing (approximated
        as the largest target's); 0 otherwise."""
        if not (self.needs_batches() and shapes):
            return 0
        return max(c * c for _, c in shapes.values()) * 4 * len(self.batch_sources())

    def state_bytes_by_place(self, shapes: Mapping[str, tuple[int, int]], weight_bytes: int) -> tuple[int, int]:
        """:meth:`state_bytes` split into (on the weights' device, in host memory): with ``state_device``
        ``cpu`` everything but the reconstruction Hessians is in host memory."""
        total = self.state_bytes(shapes, weight_bytes)
        if self.state_device != "cpu":
            return total, 0
        on_device = self.reconstruction_state_bytes(shapes)
        return on_device, total - on_device

    # -- lifecycle ---------------------------------------------------------------------------------
    def passes(self) -> list[CalibrationPass]:
        """Every pass of the method: its scoring passes, then the batch collection it needs."""
        return self.scoring_passes() + self.batch_passes()

    def scoring_passes(self) -> list[CalibrationPass]:
        """The passes that compute the method's scores (override; default: one no-op pass)."""
        return [CalibrationPass("calibration", "general", "none")]

    def needs_batches(self) -> bool:
        """Whether :meth:`prune` replays calibration batches (sequential reconstruction)."""
        return self.reconstruct != "none"

    def batch_sources(self) -> list[str]:
        """The calibration sets whose batches :meth:`prune` replays, given ``hessian_mix``."""
        return [s for s, w in (("domain", 1.0 - self.hessian_mix), ("general", self.hessian_mix)) if w > 0]

    def batch_passes(self) -> list[CalibrationPass]:
        if not self.needs_batches():
            return []
        return [CalibrationPass(f"batches_{s}", s, "collect") for s in self.batch_sources()]

    def prepare(self, model: nn.Module, targets: Mapping[str, Target]) -> None:
        """Called once before the first pass, with the loaded model and its targets."""
        self.model = model
        self.targets = dict(targets)
        self.sharded = model_is_sharded(model)
        if self.sharded:
            check_shardable((n, t.module) for n, t in self.targets.items())
            if self.structured or not self.multi_process:
                raise NotImplementedError(
                    f"{self!r} on an FSDP-sharded model: structured pruning, SparseGPT, reconstruct and "
                    "selection: sequential need whole matrices on one process. Run it without ModelParallelStrategy (or with "
                    "strategy: ddp, where the calibration passes of all but SparseGPT / reconstruct run).")

    @property
    def shard_sum(self) -> Optional[Callable[[torch.Tensor], None]]:
        """An in-place sum over the ranks when the model is sharded (totals over every rank's rows), else None."""
        return all_reduce_sum_ if self.sharded else None

    def load_artifacts(self, groups: Mapping[str, Mapping[str, torch.Tensor]], saved_repr: str) -> list[str]:
        """Take scores an earlier run saved (``{group: {target: tensor}}``, written by a method whose repr
        was ``saved_repr``) instead of recomputing them; returns the names of the passes they replace.
        Called before :meth:`prepare`. Methods that support resuming override it."""
        raise NotImplementedError(f"{self.name} cannot resume from saved importance (D-PRUNER can)")

    def start_pass(self, p: CalibrationPass) -> None:
        if p.mode == "collect":
            self.batches[p.source] = []

    @torch.no_grad()
    def after_backward(self, p: CalibrationPass) -> dict[str, float | torch.Tensor]:
        """Read (and possibly modify) ``target.weight.grad`` after one micro-batch; return stats to log
        (0-dim tensors are fine and avoid a host sync per matrix; none when :attr:`step_stats` is off).
        A method may free each gradient once it has used it; on one process (:attr:`world_size` 1) it may
        also take the ``sgd`` step here, leaving no gradient to :meth:`sgd_step`."""
        return {}

    @torch.no_grad()
    def sgd_step(self, p: CalibrationPass) -> None:
        """One step of an ``sgd`` pass from ``target.weight.grad`` (as :meth:`after_backward` left it) at
        :attr:`learning_rate`; the layer calls it after averaging the gradients over ranks. Plain SGD
        in place, each gradient freed once applied; a method keeping fp32 master weights overrides it."""
        for t in self.targets.values():
            if t.weight.grad is not None:
                t.weight.add_(t.weight.grad, alpha=-self.learning_rate)
                t.weight.grad = None

    def collect(self, p: CalibrationPass, input_ids: torch.Tensor) -> None:
        self.batches.setdefault(p.source, []).append(input_ids.detach())

    def weighted_batches(self) -> list[tuple[list[torch.Tensor], float]]:
        """The collected batches as ``(batches, weight)`` sets for the sequential solver."""
        missing = [s for s in self.batch_sources() if not self.batches.get(s)]
        if missing:
            raise RuntimeError(f"{self.name} has no {' / '.join(missing)} calibration batches: run its collect passes first")
        return weighted_sets(self.batches.get("domain", []), self.batches.get("general"), self.hessian_mix)

    def state_collective(self, all_reduce_sum: AllReduceSum) -> AllReduceSum:
        """``all_reduce_sum`` for this method's state: with ``state_device: cpu`` and accelerator weights, a
        host tensor is summed through a copy on the weights' device (NCCL sums accelerator tensors only)
        and copied back; otherwise ``all_reduce_sum`` itself."""
        device = next(iter(self.targets.values())).weight.device if self.targets else torch.device("cpu")
        if self.state_device != "cpu" or device.type == "cpu":
            return all_reduce_sum

        def reduce_(t: torch.Tensor) -> torch.Tensor:
            if t.device == device:
                return all_reduce_sum(t)
            on_device = t.to(device)
            all_reduce_sum(on_device)
            return t.copy_(on_device)

        return reduce_

    def reduce_across_ranks(self, p: CalibrationPass, all_reduce_sum: AllReduceSum) -> None:
        """Several processes only: called once at the end of pass ``p``, before :meth:`end_pass`, on every
        rank. Replace every per-rank accumulator of the pass by its sum over ranks with
        ``all_reduce_sum`` (in place; call it in the same order on every rank). Default: nothing to sum."""

    def end_pass(self, p: CalibrationPass) -> None:
        pass

    # -- result ------------------------------------------------------------------------------------
    def scores(self) -> dict[str, torch.Tensor]:
        """Final importance of every target weight (``out x in``); higher = more important."""
        raise NotImplementedError(f"{type(self).__name__} does not define scores()")

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named groups of per-target tensors worth saving and plotting (e.g. general / dual importance)."""
        return {"importance": self.scores()}

    @torch.no_grad()
    def prune(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        """Choose keep-masks from :meth:`scores` and zero the pruned weights (re-solving the kept ones
        with ``reconstruct``); returns the masks."""
        masks = self.choose_masks(spec)
        if self.reconstruct == "none":
            for name, keep in masks.items():
                target = self.targets[name]
                apply_mask_(target.weight_view(), local_rows(keep, target.weight))  # sharded: this rank's rows
        else:
            self.reconstruct_kept(masks, spec.block_size)
        return masks

    def choose_masks(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        """Keep-masks from :meth:`scores` under ``spec`` (granularity, allocation), weights untouched.
        Sharded: chosen on the whole matrices (each gathered from the ranks), identical on every rank."""
        scores = self.scores()
        if self.sharded:
            scores = {n: full_tensor(s, self.targets[n].weight) for n, s in scores.items()}
        return choose_masks(
            scores,
            spec.target_sparsity(self.default_granularity),
            spec.resolved_granularity(self.default_granularity),
            block_size=spec.block_size,
            allocation=spec.allocation,
            block_of=self.block_of(),
            owl_m=spec.owl_m,
            owl_lambda=spec.owl_lambda,
        )

    @torch.no_grad()
    def reconstruct_kept(self, masks: Mapping[str, torch.Tensor], block_size: int = 128) -> None:
        """Zero the pruned weights and re-solve the kept ones block by block (see the module docstring)."""
        def solve(name: str, target: Target, H: torch.Tensor) -> torch.Tensor:
            return reconstruct_(target.weight_view(), H, masks[name], self.reconstruct, self.damp, block_size)

        sequential_blockwise(self.model, self.targets, self.weighted_batches(), solve)

    def release(self) -> None:
        """Free what only :meth:`prune` needed (collected batches, copies of the weights); scores stay.
        The layer calls it once the artifacts are saved; prune again only before it."""
        self.batches = {}
        self.unhook_gradients()

    # -- helpers -----------------------------------------------------------------------------------
    def block_of(self) -> dict[str, int | None]:
        prefix, _ = find_decoder_blocks(self.model)
        return {name: block_index(name, prefix) for name in self.targets}

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: t.weight_view() for name, t in self.targets.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _pinned(source: torch.Tensor, device: torch.device) -> bool:
    """Host state for tensors on an accelerator is pinned (page-locked): copies to and from it can run
    without blocking the host."""
    return device.type == "cpu" and source.device.type != "cpu"


@torch.no_grad()
def send_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)``; from host state to an accelerator, ``src`` is converted to ``dst``'s dtype on
    the host into pinned memory and sent without blocking (the pinned allocator keeps that buffer until
    the copy has run, and the stream orders the copy before any later use of ``dst``)."""
    if src.device.type != "cpu" or dst.device.type == "cpu":
        return dst.copy_(src)
    staged = torch.empty(src.shape, dtype=dst.dtype, pin_memory=True).copy_(src)
    return dst.copy_(staged, non_blocking=True)
