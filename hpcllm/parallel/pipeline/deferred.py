"""Split a stage's backward pass into input gradients now and weight gradients later.

Zero-bubble schedules (:func:`hpcllm.parallel.pipeline.schedules.zero_bubble_h1`) need the
backward of a micro-batch in two passes: ``bwd`` computes the gradient the previous stage
waits for, ``wgt`` the parameter gradients nobody waits for, run later to fill the bubble.
The model stays plain PyTorch: :meth:`WeightGradDeferral.install` gives each ``nn.Linear``
instance a forward that, while the deferral is active (:meth:`~WeightGradDeferral.forward`,
:meth:`~WeightGradDeferral.backward`) and the input needs a gradient, runs the layer through
:class:`_DeferredLinear`, whose backward returns the input gradient and stashes ``(input,
output gradient)`` for :meth:`WeightGradDeferral.apply`.  ``F.linear`` calls outside modules
(the tied head, ``F.linear(x, wte.weight)``) are routed the same way inside
:meth:`~WeightGradDeferral.routing`, a torch function mode kept to such short regions (a
mode sees every op of the region: over a whole forward it ate most of ZB-H1's gain at M=16
in benchmarks/pipeline.py).  Linear layers hold nearly all of a GPT's weight-gradient FLOPs;
the few other parameters (norms, embeddings) get their gradients in ``bwd`` as usual.

Numerically a deferred weight gradient is the product autograd computes (``grad_out^T @
input`` in the autocast dtype, added to ``.grad`` in the parameter's dtype).  The stash holds
the output gradient by reference until ``apply``: a caller that feeds backward a gradient
living in a reused buffer (the engine's receive ring) must pass a copy instead.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _DeferredLinear(torch.autograd.Function):
    """``F.linear`` whose backward defers the weight and bias gradients to ``store``.

    The parameters come in a tuple, out of autograd's sight: given as tensor arguments they
    would get graph edges, and autograd runs a parameter's post-accumulate-grad hooks even
    for the ``None`` gradient this backward returns (firing e.g. the DP allreduce early)."""

    @staticmethod
    def forward(ctx, x, store, params):
        weight, bias = params
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # cast as autocast would, and keep the casts: backward needs the same operands
            dtype = torch.get_autocast_dtype(device)
            xc, wc = x.to(dtype), weight.to(dtype)
            bc = bias.to(dtype) if bias is not None else None
            with torch.autocast(device, enabled=False):
                out = F.linear(xc, wc, bc)
        else:
            xc, wc = x, weight
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(xc, wc)
        ctx.weight, ctx.bias, ctx.store, ctx.x_dtype = weight, bias, store, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        grad_x = grad_out.matmul(wc).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        ctx.store.stash(xc, grad_out, ctx.weight, ctx.bias)
        return grad_x, None, None


def _route(store: "WeightGradDeferral", x, weight, bias):
    # an input without gradient (a first layer fed data) leaves nothing to defer to:
    # autograd would never call the backward that stashes the weight's share
    if torch.is_grad_enabled() and weight.requires_grad and x.requires_grad:
        return _DeferredLinear.apply(x, store, (weight, bias))
    return F.linear(x, weight, bias)


class _RouteLinear(TorchFunctionMode):
    def __init__(self, store: "WeightGradDeferral"):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.store.active:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _route(self.store, x, weight, bias)
        return func(*args, **kwargs)


def _accumulate(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """``p.grad += a @ b`` (or ``+= a`` without ``b``), as autograd would leave it: the
    product in the operands' dtype, added in the parameter's."""
    with torch.no_grad():
        if p.grad is None:
            p.grad = (a.mm(b) if b is not None else a.clone()).to(p.dtype)
        elif b is not None and a.dtype == p.grad.dtype:
            p.grad.addmm_(a, b)
        else:
            p.grad.add_(a.mm(b) if b is not None else a)


class WeightGradDeferral:
    """Collects deferred weight-gradient work per micro-batch.

    ``install(module)`` once; then ``with forward():`` around a micro-batch's forward,
    ``with backward(mb):`` around its ``bwd`` pass (an activation-recomputing backward
    re-runs installed layers, which must build the graph the forward built), and
    ``apply(mb)`` later computes and accumulates its weight gradients.
    """

    def __init__(self):
        self.pending: dict[int, list] = defaultdict(list)
        self._mb: int | None = None
        self.active = False

    def install(self, module: torch.nn.Module) -> int:
        """Route ``module``'s ``nn.Linear`` layers through this deferral while it is active
        (an instance-level ``forward``; the class and the parameters are untouched).
        Returns how many layers."""
        n = 0
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                m.forward = self._linear_forward(m)
                n += 1
        return n

    def _linear_forward(self, m: torch.nn.Linear):
        def forward(x):
            if self.active:
                return _route(self, x, m.weight, m.bias)
            return F.linear(x, m.weight, m.bias)
        return forward

    def routing(self) -> TorchFunctionMode:
        """A context in which every ``F.linear`` call defers its weight gradient to this
        object while it is active (for linear calls outside ``nn.Linear`` modules; keep the
        region short)."""
        return _RouteLinear(self)

    @contextlib.contextmanager
    def _activated(self):
        was, self.active = self.active, True
        try:
            yield
        finally:
            self.active = was

    def forward(self):
        return self._activated()

    @contextlib.contextmanager
    def backward(self, mb: int):
        self._mb = mb
        try:
            with self._activated():
                yield
        finally:
            self._mb = None

    def stash(self, inp, grad_out, weight, bias) -> None:
        if self._mb is None:
            raise RuntimeError("a deferred linear ran its backward outside WeightGradDeferral.backward")
        self.pending[self._mb].append((inp, grad_out, weight, bias))

    def apply(self, mb: int, through_autograd: bool = True) -> None:
        """Add micro-batch ``mb``'s weight and bias gradients to ``.grad``.

        ``through_autograd``: accumulate with ``torch.autograd.backward`` on the parameters,
        one accumulation per parameter, so post-accumulate-grad hooks fire (the engine does
        this for the step's last weight pass, where the DP allreduce hooks are armed).
        Otherwise accumulate in place, ``grad.addmm_(grad_out^T, input)``: no autograd call
        and no separate add."""
        grads: dict[torch.nn.Parameter, torch.Tensor] = {}

        def add(p, a, b=None):
            if not through_autograd:
                _accumulate(p, a, b)
                return
            g = (a.mm(b) if b is not None else a).to(p.dtype)
            grads[p] = grads[p] + g if p in grads else g

        for inp, grad_out, weight, bias in self.pending.pop(mb, ()):
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            add(weight, g2.t(), inp.reshape(-1, inp.shape[-1]))
            if bias is not None and bias.requires_grad:
                add(bias, g2.sum(0))
        if grads:
            torch.autograd.backward(list(grads), list(grads.values()))

    @property
    def outstanding(self) -> int:
        """Micro-batches whose weight gradients are still deferred."""
        return len(self.pending)
