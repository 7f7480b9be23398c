"""Compute-optimal model and data size (Hoffmann et al. 2022, "Chinchilla").

Training compute is C = 6 N D FLOPs for N parameters and D tokens. Two answers to "which N
and D minimise the loss for a given C" come out of the paper and they differ:

* ``chinchilla`` (the default): approaches 1 and 2 of the paper (minimum over training curves
  and IsoFLOP profiles) both find N_opt and D_opt growing as C^0.5, i.e. a fixed ratio of
  about 20 tokens per parameter (Table 3: 67B parameters and 1.5T tokens at 5.76e23 FLOPs;
  Chinchilla itself is 70B / 1.4T). So N = sqrt(C / (6 r)), D = r N with r = 20.
  For C = 5.76e23 this gives 69.3B parameters and 1.39T tokens.
* ``parametric``: approach 3, the closed-form minimiser of the fitted
  L(N, D) = E + A / N^alpha + B / D^beta under 6 N D = C:
  N = G (C/6)^(beta/(alpha+beta)), D = (C/6)^(alpha/(alpha+beta)) / G,
  G = (alpha A / (beta B))^(1/(alpha+beta)). With the published rounded constants this gives
  about 32B parameters and 3.0T tokens for 5.76e23 FLOPs (the paper's Table 3 reports 40B for
  approach 3; the gap comes from the rounding of alpha and beta).

Both are always reported; the predicted loss uses the fitted L(N, D) in either case.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hpcllm.errors import HpcllmError

#: Fitted constants of L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 10).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
#: Tokens per parameter at the compute optimum (approaches 1 and 2).
TOKENS_PER_PARAM = 20.0
METHODS = ("chinchilla", "parametric")


def loss(n_params: float, n_tokens: float) -> float:
    """Predicted final training loss (nats/token on MassiveText) of N parameters on D tokens."""
    if n_params <= 0 or n_tokens <= 0:
        raise HpcllmError("parameters and tokens must be > 0")
    return E + A / n_params**ALPHA + B / n_tokens**BETA


def _g() -> float:
    return (ALPHA * A / (BETA * B)) ** (1.0 / (ALPHA + BETA))


def optimal_for_compute(compute: float, method: str = "chinchilla",
                        tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) minimising the loss for ``compute`` FLOPs with C = 6 N D."""
    if not compute > 0 or math.isinf(compute):
        raise HpcllmError(f"compute must be a positive number of FLOPs, got {compute!r}")
    if method == "chinchilla":
        n = math.sqrt(compute / (6.0 * tokens_per_param))
        return n, compute / (6.0 * n)
    if method == "parametric":
        a = BETA / (ALPHA + BETA)
        b = ALPHA / (ALPHA + BETA)
        return _g() * (compute / 6.0) ** a, (compute / 6.0) ** b / _g()
    raise HpcllmError(f"unknown scaling method {method!r}; choose {' or '.join(METHODS)}")


def optimal_tokens_for_params(n_params: float, method: str = "chinchilla",
                              tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """Tokens that make an N-parameter model compute-optimal."""
    if method == "chinchilla":
        return tokens_per_param * n_params
    a = BETA / (ALPHA + BETA)
    c6 = (n_params / _g()) ** (1.0 / a)  # invert N = G (C/6)^a
    return c6 / n_params


def optimal_params_for_tokens(n_tokens: float, method: str = "chinchilla",
                              tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """Parameters for which ``n_tokens`` is the compute-optimal data size."""
    if method == "chinchilla":
        return n_tokens / tokens_per_param
    b = ALPHA / (ALPHA + BETA)
    c6 = (n_tokens * _g()) ** (1.0 / b)  # invert D = (C/6)^b / G
    return c6 / n_tokens


@dataclass
class ScalingPoint:
    """A model size, a data size, the compute they take and the loss they should reach."""

    params: float
    tokens: float
    compute: float
    loss: float
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def point(n_params: float, n_tokens: float, method: str) -> ScalingPoint:
    return ScalingPoint(params=n_params, tokens=n_tokens, compute=6.0 * n_params * n_tokens,
                        loss=loss(n_params, n_tokens), method=method)


def solve(compute: float | None = None, params: float | None = None,
          tokens: float | None = None, method: str = "chinchilla",
          tokens_per_param: float = TOKENS_PER_PARAM) -> ScalingPoint:
    """The compute-optimal point given exactly one of compute, params or tokens.

    With both ``params`` and ``tokens`` the point is simply that (N, D), which need not be
    compute-optimal; callers compare it with ``solve(compute=6ND)``.
    """
    if method not in METHODS:
        raise HpcllmError(f"unknown scaling method {method!r}; choose {' or '.join(METHODS)}")
    if not tokens_per_param > 0:
        raise HpcllmError(f"tokens per parameter must be > 0, got {tokens_per_param}")
    for name, v in (("compute", compute), ("params", params), ("tokens", tokens)):
        if v is not None and (not v > 0 or math.isinf(v)):
            raise HpcllmError(f"--{name} must be a positive number, got {v!r}")
    given = [x is not None for x in (compute, params, tokens)]
    if compute is not None and any(given[1:]):
        raise HpcllmError("give either --compute/--gpu-hours or --params/--tokens, not both")
    if compute is not None:
        n, d = optimal_for_compute(compute, method, tokens_per_param)
    elif params is not None and tokens is not None:
        n, d = params, tokens
    elif params is not None:
        n, d = params, optimal_tokens_for_params(params, method, tokens_per_param)
    elif tokens is not None:
        n, d = optimal_params_for_tokens(tokens, method, tokens_per_param), tokens
    else:
        raise HpcllmError("give a budget: --compute FLOPS, --gpu-hours H --device D, "
                          "--params N or --tokens D")
    return point(n, d, method)


def compute_from_hours(device_hours: float, peak_flops: float, mfu: float) -> float:
    """Training FLOPs that ``device_hours`` deliver at ``mfu`` of ``peak_flops``."""
    if not device_hours > 0:
        raise HpcllmError(f"--gpu-hours must be > 0, got {device_hours}")
    if not 0 < mfu <= 1:
        raise HpcllmError(f"--mfu must be in (0, 1], got {mfu}")
    return device_hours * 3600.0 * peak_flops * mfu


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18}


def parse_number(text: str, what: str = "number") -> float:
    """Parse ``5.76e23``, ``70B``, ``1.4T``, ``7e9``, ``1_000`` into a float."""
    s = str(text).strip().replace("_", "").replace(",", "")
    mult = 1.0
    if s and s[-1].lower() in _SUFFIX and not s[-2:].lower().startswith("e"):
        mult = _SUFFIX[s[-1].lower()]
        s = s[:-1]
    try:
        v = float(s) * mult
    except ValueError:
        raise HpcllmError(f"{what}: cannot parse {text!r} (examples: 5.76e23, 70B, 1.4T)") from None
    if not math.isfinite(v) or v <= 0:
        raise HpcllmError(f"{what}: must be a positive number, got {text!r}")
    return v
