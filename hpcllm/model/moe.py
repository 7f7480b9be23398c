"""Mixture-of-experts MLP (plain PyTorch; expert parallelism plugs in from outside).

A block's MLP becomes ``E`` expert MLPs (each the model's own MLP: GELU or SwiGLU) and a
router: each token goes to ``k`` of them (``moe_top_k`` 1 or 2) and its output is the gated
sum of theirs::

    probs = softmax(router(x))            fp32, whatever the autocast dtype
    gates, experts = top-k(probs)         top-2: the two gates renormalised to sum to 1
    y = sum_k gate_k * expert_k(x)

Which blocks: block ``i`` is a mixture when ``(i + 1) % moe_every == 0`` (``moe_every`` 1:
all of them; 2: every second block, as GShard and Switch), see :func:`is_moe_layer`.

**Capacity** (``moe_capacity_factor`` C > 0, training only): an expert takes at most
``ceil(C * tokens * k / E)`` of the assignments of one forward pass (one micro-batch of one
rank); the rest are dropped (the token's residual stream passes the block unchanged for that
choice). The order is deterministic: first choices before second choices, then tokens in
batch-major order. C = 0 (the default) is dropless. Evaluation and generation never drop, so
a generated token does not depend on which others share its forward pass.

**Auxiliary losses**: the Switch/GShard load-balancing loss ``E * sum_i f_i * P_i`` (f_i: the
share of the pass's k * tokens assignments that chose expert i before capacity, P_i: the mean
router probability of expert i; a uniform router gives exactly 1.0), weighted by
``moe_aux_loss_coef``, and optionally the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE),
weighted by ``moe_z_loss_coef``. They enter the backward pass where they are computed
(:class:`_AddAuxGrad`), not the returned loss: a pipeline stage's mixture trains without
sending its loss to the last stage, and the reported loss stays the language-model loss. The
runner sets the factor its loss was scaled by (1 / micro-batches x the fp16 loss scale) with
:func:`set_grad_scale`.

The experts live in ``experts``, a ModuleDict keyed by the global expert index, so parameter
names (``blocks.1.mlp.experts.3.fc.weight``) are the same whichever experts a rank holds.
Tokens are permuted by expert and each expert runs one matmul over its own tokens: no dense
(tokens x experts x capacity) dispatch tensor. Expert parallelism
(:mod:`hpcllm.parallel.expert_parallel`) keeps a rank's experts and installs a ``dispatcher``
that moves the permuted tokens to their experts' ranks and back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_moe_layer(cfg, layer: int) -> bool:
    """Whether block ``layer`` (global index) is a mixture of experts under ``cfg``."""
    return getattr(cfg, "moe_experts", 0) > 0 and (layer + 1) % cfg.moe_every == 0


def moe_layers(cfg) -> list[int]:
    return [i for i in range(cfg.n_layer) if is_moe_layer(cfg, i)]


@dataclass
class Routing:
    """One pass's kept (token, expert) assignments, sorted by expert (stable: the drop order)."""

    token: torch.Tensor    # (A,) long: the token (row of the flattened batch) of each assignment
    expert: torch.Tensor   # (A,) long: its expert
    gate: torch.Tensor     # (A,) fp32: its weight in the token's output
    counts: torch.Tensor   # (E,) long: kept assignments per expert
    wanted: torch.Tensor   # (E,) long: assignments per expert before capacity
    dropped: int           # assignments over capacity


def capacity(tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Assignments one expert takes per pass (``factor`` 0: no limit)."""
    if factor <= 0:
        return tokens * top_k
    return max(1, math.ceil(factor * tokens * top_k / n_experts))


def route(probs: torch.Tensor, top_k: int, capacity_factor: float = 0.0) -> Routing:
    """Top-k routing of ``probs`` (N, E) with the capacity rule of the module doc."""
    N, E = probs.shape
    gates, experts = probs.topk(top_k, dim=-1)  # (N, k)
    if top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    # assignments in priority order: every token's first choice, then every second choice
    expert_flat = experts.t().reshape(-1)
    token_flat = torch.arange(N, device=probs.device).repeat(top_k)
    gate_flat = gates.t().reshape(-1)
    wanted = torch.bincount(expert_flat, minlength=E)
    order = torch.argsort(expert_flat, stable=True)  # by expert, priority order within each
    dropped = 0
    cap = capacity(N, E, top_k, capacity_factor)
    if cap < N * top_k:
        sorted_e = expert_flat[order]
        starts = torch.cumsum(wanted, 0) - wanted
        keep = (torch.arange(order.numel(), device=probs.device) - starts[sorted_e]) < cap
        dropped = int(order.numel() - int(keep.sum()))
        order = order[keep]
    counts = torch.clamp(wanted, max=cap)
    return Routing(token=token_flat[order], expert=expert_flat[order], gate=gate_flat[order], counts=counts,
                   wanted=wanted, dropped=dropped)


def load_balancing_loss(probs: torch.Tensor, wanted: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard ``E * sum_i f_i * P_i`` (see the module doc); 1.0 for a uniform router."""
    N, E = probs.shape
    f = wanted.to(probs.dtype) / (N * top_k)
    return E * torch.sum(f * probs.mean(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class _AddAuxGrad(torch.autograd.Function):
    """Identity on ``out``; its backward also starts the auxiliary loss's backward with
    gradient ``scale`` (the factor the runner's loss was scaled by)."""

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation recomputation re-runs forwards)."""
    return torch._C._current_graph_task_id() != -1


class MoEStats:
    """Routing statistics since the last :meth:`take` (training passes only). The sums stay
    tensors on the model's device until :meth:`take`: a pass adds no device synchronisation."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.reset()

    def reset(self) -> None:
        self.passes = 0
        self.aux = self.z = self.wanted = None
        self.dropped = 0

    def add(self, aux: torch.Tensor, z: torch.Tensor | None, wanted: torch.Tensor, dropped: int) -> None:
        self.passes += 1
        acc = lambda total, x: x.detach().double() if total is None else total + x.detach()  # noqa: E731
        self.aux = acc(self.aux, aux)
        if z is not None:
            self.z = acc(self.z, z)
        self.wanted = acc(self.wanted, wanted)
        self.dropped += dropped

    def take(self) -> dict:
        wanted = self.wanted.tolist() if self.wanted is not None else [0.0] * self.n_experts
        out = {"passes": self.passes, "aux": float(self.aux) if self.aux is not None else 0.0,
               "z": float(self.z) if self.z is not None else 0.0, "wanted": wanted,
               "dropped": self.dropped, "assignments": int(sum(wanted))}
        self.reset()
        return out


class MoEMLP(nn.Module):
    """The mixture: ``router`` (d_model -> E, no bias) and ``experts`` (see the module doc),
    each built by ``make_expert()``."""

    def __init__(self, cfg, layer: int = 0, make_expert=None):
        super().__init__()
        self.layer = layer
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_coef, self.z_coef = cfg.moe_aux_loss_coef, cfg.moe_z_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        # make_expert: the architecture's MLP (gpt.py passes it; this module imports nothing of gpt)
        self.experts = nn.ModuleDict({str(e): make_expert() for e in range(cfg.moe_experts)})
        #: None: every expert is here; expert parallelism installs its token dispatcher
        self.dispatcher = None
        #: d(reported loss)/d(aux loss) of the current step's passes (see set_grad_scale)
        self.grad_scale = 1.0
        self.stats = MoEStats(cfg.moe_experts)

    def local_experts(self) -> list[int]:
        return sorted(int(e) for e in self.experts)

    def run_experts(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``xs`` grouped by this module's experts (ascending, ``counts`` rows each) through
        them; every expert runs, also on zero rows, so each has a gradient on every rank."""
        chunks = xs.split(counts, dim=0)
        outs = [self.experts[str(e)](c) for e, c in zip(self.local_experts(), chunks)]
        return torch.cat(outs, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())
        probs = torch.softmax(logits, dim=-1)
        routing = route(probs, self.top_k, self.capacity_factor if self.training else 0.0)
        if self.dispatcher is None:
            y = self.run_experts(flat[routing.token], routing.counts.tolist())
        else:
            y = self.dispatcher(self, flat, routing)
        contrib = y * routing.gate.unsqueeze(1).to(y.dtype)
        out = torch.zeros(flat.shape[0], flat.shape[1], dtype=y.dtype, device=x.device).index_add(
            0, routing.token, contrib)
        if self.training and torch.is_grad_enabled():
            aux = load_balancing_loss(probs, routing.wanted, self.top_k)
            z = z_loss(logits) if self.z_coef > 0 else None
            if not _in_backward():  # a recomputed forward is the same pass again
                self.stats.add(aux.detach(), None if z is None else z.detach(), routing.wanted, routing.dropped)
            total = self.aux_coef * aux + (self.z_coef * z if z is not None else 0.0)
            if total.requires_grad:
                out = _AddAuxGrad.apply(out, total, self.grad_scale)
        return out.view(*shape[:-1], out.shape[-1])


def describe(cfg) -> str:
    """One line for the run log: which blocks are mixtures and how they route."""
    return (f"mixture of experts: blocks {', '.join(map(str, moe_layers(cfg)))} of {cfg.n_layer}, "
            f"{cfg.moe_experts} experts, top-{cfg.moe_top_k}, "
            + (f"capacity factor {cfg.moe_capacity_factor:g}" if cfg.moe_capacity_factor else "dropless")
            + f", aux loss x {cfg.moe_aux_loss_coef:g}"
            + (f", z-loss x {cfg.moe_z_loss_coef:g}" if cfg.moe_z_loss_coef else ""))


def moe_modules(module: nn.Module) -> list[MoEMLP]:
    return [m for m in module.modules() if isinstance(m, MoEMLP)]


def set_grad_scale(module: nn.Module, scale: float) -> None:
    """The factor the runner multiplies each pass's loss by before backward (1/micro-batches,
    times the fp16 loss scale): the auxiliary losses' gradients get the same."""
    for m in moe_modules(module):
        m.grad_scale = scale


def take_stats(module: nn.Module) -> dict:
    """{layer: statistics since the last call} of ``module``'s mixtures (then reset)."""
    return {m.layer: m.stats.take() for m in moe_modules(module)}


def summarize(per_rank: list[dict]) -> dict:
    """The metrics of every rank's :func:`take_stats`: mean auxiliary (and z) loss per pass,
    per-expert assignments summed over ranks and layers, the worst layer's max/mean load and
    the fraction of assignments dropped."""
    layers: dict[int, dict] = {}
    for stats in per_rank:
        for layer, s in stats.items():
            acc = layers.setdefault(layer, {"passes": 0, "aux": 0.0, "z": 0.0, "wanted": None, "dropped": 0,
                                            "assignments": 0})
            for k in ("passes", "aux", "z", "dropped", "assignments"):
                acc[k] += s[k]
            w = torch.tensor(s["wanted"], dtype=torch.float64)
            acc["wanted"] = w if acc["wanted"] is None else acc["wanted"] + w
    passes = sum(a["passes"] for a in layers.values())
    if not passes:
        return {}
    total = sum(a["wanted"] for a in layers.values())
    load = max(float(a["wanted"].max() / a["wanted"].mean()) for a in layers.values() if a["wanted"].sum() > 0)
    assignments = sum(a["assignments"] for a in layers.values())
    out = {"moe_aux_loss": sum(a["aux"] for a in layers.values()) / passes,
           "moe_load_max_mean": load,
           "moe_dropped": sum(a["dropped"] for a in layers.values()) / max(1, assignments),
           "moe_tokens_per_expert": [int(x) for x in total.tolist()]}
    z = sum(a["z"] for a in layers.values())
    if z:
        out["moe_z_loss"] = z / passes
    return out
