"""Split a stage's backward pass into input gradients now and weight gradients later.

Zero-bubble schedules (:func:`hpcllm.parallel.pipeline.schedules.zero_bubble_h1`) need the
backward of a micro-batch in two passes: ``bwd`` computes the gradient the previous stage
waits for, ``wgt`` the parameter gradients nobody waits for, run later to fill the bubble.
The model stays plain PyTorch: while :meth:`WeightGradDeferral.forward` is active, a torch
function mode routes every ``F.linear`` with a trainable weight whose input needs a gradient
(every ``nn.Linear`` and the tied head) through :class:`_DeferredLinear`, whose backward
returns the input gradient and stashes ``(input, output gradient)`` for
:meth:`WeightGradDeferral.apply`.  Linear layers hold nearly all of a GPT's weight-gradient
FLOPs; the few other parameters (norms, embeddings) get their gradients in ``bwd`` as usual.

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


class _RouteLinear(TorchFunctionMode):
    def __init__(self, store: "WeightGradDeferral"):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            # an input without gradient (a first layer fed data) leaves nothing to defer to:
            # autograd would never call the backward that stashes the weight's share
            if weight.requires_grad and x.requires_grad:
                return _DeferredLinear.apply(x, self.store, (weight, bias))
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

    ``with forward():`` around a micro-batch's forward, ``with backward(mb):`` around its
    ``bwd`` pass, ``apply(mb)`` later computes and accumulates its weight gradients.  A
    stage that recomputes activations must run the recomputation under :meth:`routing`
    too (``torch.utils.checkpoint``'s ``context_fn``), so the recomputed graph matches the
    one the forward saved.
    """

    def __init__(self):
        self.pending: dict[int, list] = defaultdict(list)
        self._mb: int | None = None

    def routing(self) -> TorchFunctionMode:
        """A context in which ``F.linear`` defers its weight gradient to this object."""
        return _RouteLinear(self)

    def forward(self):
        return self.routing()

    @contextlib.contextmanager
    def backward(self, mb: int):
        # not under the mode: a backward call made inside a torch function mode runs with
        # the mode popped, so the mode could not reach a recomputation anyway
        self._mb = mb
        try:
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
        (about 1 ms per pass for a 2-block stage) and no separate add."""
        work = self.pending.pop(mb, ())
        if not through_autograd:
            for inp, grad_out, weight, bias in work:
                g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), inp.reshape(-1, inp.shape[-1])
                _accumulate(weight, g2.t(), x2)
                if bias is not None and bias.requires_grad:
                    _accumulate(bias, g2.sum(0))
            return
        grads: dict[torch.nn.Parameter, torch.Tensor] = {}

        def add(p, g):
            g = g.to(p.dtype)
            grads[p] = grads[p] + g if p in grads else g

        for inp, grad_out, weight, bias in work:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            add(weight, g2.t().mm(inp.reshape(-1, inp.shape[-1])))
            if bias is not None and bias.requires_grad:
                add(bias, g2.sum(0))
        if grads:
            torch.autograd.backward(list(grads), list(grads.values()))

    @property
    def outstanding(self) -> int:
        """Micro-batches whose weight gradients are still deferred."""
        return len(self.pending)
