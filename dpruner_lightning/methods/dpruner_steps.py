"""How D-PRUNER's passes consume each micro-batch: the per-step half of :class:`~.dpruner.DPrunerMethod`.

The general pass adds every target's gradient to its Taylor sums; the dual pass adds the terms of the
regularised gradient to S and takes the (proximal) SGD step on the fp32 masters. Each matrix goes
through the fused kernel (``kernels``, :mod:`..algorithms.fused`) or the eager twin
(:func:`~..algorithms.importance.dual_step_`), in a post-accumulate-grad hook during the backward when
gradients are final there (one unsharded process, no loss scaler), else after it. The state itself (the
Taylor sums, G, S, W0, the masters) is made by :meth:`DPrunerMethod.start_pass`.
"""

from __future__ import annotations

import torch

from ..algorithms import fused
from ..algorithms.importance import dual_step_, taylor_accumulate_
from .base import CalibrationPass, PruningMethod, send_


class DPrunerSteps(PruningMethod):
    """The per-micro-batch machinery of :class:`~.dpruner.DPrunerMethod` (which sets every attribute used here)."""

    def _prepare_consumers(self, dual: bool) -> None:
        """Set up how this pass consumes each gradient: whether it runs the fused kernels (``kernels``; they
        are compiled now, before the first micro-batch, so a platform that cannot compile fails here; the dual
        kernel takes the step itself, so one process or FSDP, with a learning rate), and whether it does so
        in a post-accumulate-grad hook during the backward (:attr:`gradients_final_in_backward`; the dual
        pass not with ``max_grad_norm``, whose global norm needs every gradient first)."""
        weight = next(iter(self.targets.values())).weight if self.targets else None
        self.unhook_gradients()
        self._norms = {"task": [], "reg": []}  # squared norms of this step's matrices (step_stats)
        self._fused = weight is not None and (
            self.kernels == "compiled" or (self.kernels == "auto" and weight.device.type == "cuda"
                                           and self.state_device_of(weight) == weight.device))
        if dual:
            self._fused = self._fused and self.world_size == 1 and self.learning_rate > 0
        if self._fused:
            self._scalars = fused.dual_scalars(2.0 * self.lambda_reg, 1.0, self.learning_rate,
                                               2.0 * self.alpha * self.lambda_reg if self._proximal else 0.0, weight.device)
            for stats in {False, self.step_stats}:  # the logging steps' variant too, when something logs
                fused.warm_up(weight.device, weight.dtype, dual, master=bool(self.master), proximal=self._proximal,
                              stats=stats, general_dtype=next(iter(self.general.values())).dtype if dual else torch.float32)
        if self._in_backward(dual):
            consume = self._dual_matrix if dual else self._taylor_matrix
            self.hook_gradients({n: t.weight for n, t in self.targets.items()}, lambda n: consume(n, self.targets[n]))

    def _in_backward(self, dual: bool) -> bool:
        """Whether a pass consumes each gradient in a hook during the backward (:meth:`hook_gradients`):
        not the dual pass with ``max_grad_norm``, whose global norm needs every gradient first."""
        if not self.consumes_in_backward:
            return False
        return not self.max_grad_norm if dual else self.general_estimator == "taylor"

    def consumes_every_gradient_in_backward(self) -> bool:
        return self._in_backward(dual=True) and self._in_backward(dual=False)

    @property
    def _proximal(self) -> bool:
        return self.update == "proximal" and self.alpha * self.lambda_reg > 0

    @torch.no_grad()
    def after_backward(self, p: CalibrationPass) -> dict[str, torch.Tensor]:
        if p.name == "general":
            for name, t in self.targets.items():  # what no hook consumed during the backward
                if t.weight.grad is not None:
                    self._taylor_matrix(name, t)
            return {}
        return self._dual_gradients()

    @torch.no_grad()
    def _taylor_matrix(self, name: str, t) -> None:
        """Add one target's micro-batch gradient to its Taylor sums and free it (this pass takes no step)."""
        state, grad = self._taylor[name], t.grad_view()
        if self._fused and state.count > 0 and fused.fusable(grad, state.grad_sum, state.sq_sum):
            fused.taylor_update_(grad, state.grad_sum, state.sq_sum)
            state.count += 1
        else:
            taylor_accumulate_(state, grad, self.scratch(t.weight, t.shape, 1)[0])
        t.weight.grad = None

    def _dual_gradients(self) -> dict[str, torch.Tensor]:
        """The dual pass after one backward: every matrix not consumed by a hook during it goes through
        :meth:`_dual_matrix`, after the global clip factor when ``max_grad_norm`` is set; returns the
        step's statistics."""
        task_sq, clip = None, 1.0
        if not self.gradients_hooked:
            # max_grad_norm clips the TASK gradient of the step (global norm over the targets), before the
            # regulariser and the proximal division, so the step is the closed form with a clipped g_task.
            # That norm is needed before any step: a pass of its own, and one host sync per step.
            if self.max_grad_norm:
                task_sq = sum(torch.linalg.vector_norm(t.grad_view(), dtype=torch.float32).square()
                              for t in self.targets.values() if t.weight.grad is not None)
                if self.sharded:  # the norm of the whole gradient: every rank's rows
                    self.shard_sum(task_sq)
                clip = min(1.0, self.max_grad_norm / max(float(task_sq.sqrt()), 1e-30))
                if self._fused:
                    self._scalars["clip"].fill_(clip)
            for name, t in self.targets.items():
                if t.weight.grad is not None:
                    self._dual_matrix(name, t, clip, task_norm=task_sq is None)
        norms, self._norms = self._norms, {"task": [], "reg": []}
        if not self.stats_now:
            return {}
        if task_sq is None:
            task_sq = _total(norms["task"])
        return {"dual/task_grad_norm": task_sq.sqrt(), "dual/reg_grad_norm": _total(norms["reg"]).sqrt()}

    @torch.no_grad()
    def _dual_matrix(self, name: str, t, clip: float = 1.0, task_norm: bool = True) -> None:
        """S += the terms of one target's regularised gradient, and its step: taken at once on one process
        (the gradient freed), else left in the gradient for :meth:`sgd_step`. The fused kernel when it runs,
        else :func:`~..algorithms.importance.dual_step_` where the state lives (``state_device``), in three
        reused fp32 buffers (:meth:`scratch`). ``task_norm``: add the task gradient's squared norm to the
        step statistics (not when the clip already computed it)."""
        grad, score, norms = t.grad_view(), self.dual[name], self._norms
        c, proximal = 2.0 * self.alpha * self.lambda_reg, self._proximal
        if self._fused and fused.fusable(grad, score, self.general[name], self.original[name], t.weight_view(),
                                         self.master.get(name)):
            squares = fused.dual_step_(grad, self.general[name], score, self.original[name], t.weight_view(),
                                       self.master.get(name), self._scalars, proximal, self.stats_now)
            t.weight.grad = None
            if squares is not None:
                norms["reg"].append(squares[1])
                if task_norm:
                    norms["task"].append(squares[0])
            return
        # the fp32 master when the weights are 16-bit (else the weights, brought to the state)
        weight = self.master[name] if name in self.master else t.weight_view().to(score.device)
        out = dual_step_(grad, self.general[name], score, self.original[name], weight, self.scratch(t.weight, t.shape, 3),
                         self.lambda_reg, c, clip, proximal, take_step=self.learning_rate > 0,
                         squares=norms if self.stats_now else None, task_norm=task_norm)
        if out is None:  # no step is taken: S is all this pass computes
            t.weight.grad = None
        elif self.world_size == 1:  # one process: step now, in fp32 (see sgd_step)
            self._apply_step(t, name, *out)
            t.weight.grad = None
        elif out[0] is not grad:  # else the gradient already is the step
            step, scale = out
            send_(grad, step.mul_(scale) if scale != 1.0 else step)  # for sgd_step, once averaged over ranks

    @torch.no_grad()
    def sgd_step(self, p: CalibrationPass) -> None:
        """Plain SGD on fp32 weights; on 16-bit weights the fp32 masters take the step and the weights are
        written from them. On several processes the step is the gradient as after_backward left it and the
        layer averaged it over ranks (rounded to the weights' dtype); on one, after_backward already took
        it in fp32 and freed the gradients, and nothing is left to do here. Each gradient is freed once applied."""
        for name, t in self.targets.items():
            grad = t.weight.grad
            if grad is None:
                continue
            # an fp32 copy of a 16-bit step in a reused buffer, then fp32 arithmetic (mixed-dtype is slower)
            step = grad if grad.dtype == torch.float32 else self.scratch(t.weight, t.shape, 1)[0].copy_(t.weight_view(grad))
            self._apply_step(t, name, t.weight_view(step) if step is grad else step)
            t.weight.grad = None

    def _apply_step(self, t, name: str, step: torch.Tensor, scale: float = 1.0) -> None:
        """``W -= alpha * scale * step`` (``step``: fp32, ``out x in``) on the fp32 master, written to the
        16-bit weights, or on fp32 weights directly."""
        master = self.master.get(name)
        if master is not None:
            master.add_(step.to(master.device), alpha=-self.learning_rate * scale)
            send_(t.weight_view(), master)
        else:
            t.weight_view().add_(step.to(t.weight.device), alpha=-self.learning_rate * scale)


def _total(squares: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared norms (0-dim tensors, on any devices) without a host sync; 0 for none."""
    if not squares:
        return torch.zeros((), dtype=torch.float32)
    device = squares[0].device
    return torch.stack([n.to(device) for n in squares]).sum()
