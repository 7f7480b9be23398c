"""`hpcllm plan` from Python: budget -> model and data size -> memory -> layout -> Slurm.

``make_plan(PlanRequest(...))`` returns one JSON-able dict (what ``hpcllm plan --json``
prints); :mod:`hpcllm.plan.report` turns it into terminal tables.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace

from hpcllm.errors import HpcllmError
from hpcllm.plan import scaling
from hpcllm.plan.devices import DeviceProfile, get_profile
from hpcllm.plan.layout import Cluster, Layout, search
from hpcllm.plan.memory import Shape

#: default tokens per optimizer step on GPUs (GPT-3 used 0.5M-3.2M; Chinchilla 1.5M-3M)
DEFAULT_BATCH_TOKENS = 2**19
#: default sequences per rank and step on CPUs
DEFAULT_CPU_SEQS_PER_RANK = 16


@dataclass
class PlanRequest:
    """Everything `hpcllm plan` takes (the CLI flags, one field each)."""

    compute: float | None = None
    """Training budget in FLOPs."""
    params: float | None = None
    tokens: float | None = None
    gpu_hours: float | None = None
    """Budget in device-hours of --device at --mfu."""
    device: str = "h100"
    mfu: float | None = None
    """Model-FLOPs utilisation [default: the device profile's]."""
    method: str = "chinchilla"
    tokens_per_param: float = scaling.TOKENS_PER_PARAM
    data: str | None = None
    """A `hpcllm preprocess` output to compare the needed tokens with."""
    model: str | None = None
    """Preset to lay out [default: the one nearest the compute-optimal size]."""
    seq_len: int | None = None
    nodes: int = 1
    devices_per_node: int | None = None
    global_batch: int | None = None
    """Sequences per optimizer step [default: ~0.5M tokens on GPUs, 16 per rank on CPUs]."""
    precision: str = "bf16"
    optimizer: str = "adamw"
    schedule: str = "1f1b"
    pipeline_stages: int | None = None
    micro_batch: int | None = None
    recompute: bool | None = None
    zero_stage: int | None = None
    """Only layouts with this ZeRO stage [default: search 0-3]."""
    tensor_parallel: int | None = None
    """Only layouts with this tensor-parallel degree [default: search the divisors of the devices per node]."""
    attention: str | None = None
    """Sparse attention of the laid-out model (dense, local, bigbird) [default: the preset's, dense]."""
    attention_window: int | None = None
    attention_global: int | None = None
    attention_random: int | None = None
    attention_block: int | None = None
    moe_experts: int | None = None
    """Mixture of experts of the laid-out model: memory counts all experts, time the active ones."""
    moe_top_k: int | None = None
    moe_every: int | None = None
    top: int = 8
    slurm_profile: str | None = None
    """Cluster profile for --emit-slurm [default: "default" for GPUs, "cpu" for CPUs]."""
    out: str = "runs/planned"


def read_dataset(path: str) -> dict:
    """Train/val token counts and vocabulary of a `hpcllm preprocess` output."""
    mf = os.path.join(path, "manifest.json")
    try:
        with open(mf, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise HpcllmError(f"--data {path}: no manifest.json (not a `hpcllm preprocess` output)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HpcllmError(f"{mf}: cannot read: {e}") from None
    if not isinstance(m, dict) or m.get("format") != "hpcllm-dataset":
        raise HpcllmError(f"{mf}:1: not an hpcllm dataset manifest (format != hpcllm-dataset)")
    try:
        splits = m["splits"]
        train = int(splits["train"]["tokens"])
        val = int(splits.get("val", {}).get("tokens", 0))
        vocab = int(m["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise HpcllmError(f"{mf}: manifest lacks {e}") from None
    return {"path": path, "train_tokens": train, "val_tokens": val, "vocab_size": vocab,
            "tokenizer": m["tokenizer"].get("type")}


def _presets(vocab: int | None, seq_len: int | None):
    from hpcllm.model import gpt

    out = {}
    for name, cfg in gpt.PRESETS.items():
        over = {}
        if vocab:
            over["vocab_size"] = vocab
        if seq_len:
            over["seq_len"] = seq_len
        out[name] = replace(cfg, **over) if over else cfg
    return out


def nearest_preset(n_params: float, presets: dict) -> str:
    from hpcllm.model.gpt import param_count

    return min(presets, key=lambda k: abs(math.log(param_count(presets[k]) / n_params)))


def default_global_batch(cluster: Cluster, seq_len: int) -> int:
    if cluster.device.kind == "cpu":
        return DEFAULT_CPU_SEQS_PER_RANK * cluster.world
    seqs = max(1, DEFAULT_BATCH_TOKENS // seq_len)
    return -(-seqs // cluster.world) * cluster.world


#: PlanRequest fields that pass to the model's sparse-attention configuration
ATTENTION_FIELDS = ("attention", "attention_window", "attention_global", "attention_random", "attention_block",
                    "moe_experts", "moe_top_k", "moe_every")


def slurm_train_args(layout: Layout, cluster: Cluster, model: str, seq_len: int, precision: str,
                     steps: int, data: str, out: str, profile: str) -> list[str]:
    """`hpcllm slurm train ...` arguments that run ``layout``."""
    args = ["hpcllm", "slurm", "train", "--profile", profile, "--nodes", str(cluster.nodes),
            "--ntasks-per-node", str(cluster.devices_per_node)]
    if cluster.device.kind == "gpu":
        args += ["--gpus-per-node", str(cluster.devices_per_node)]
    args += ["--model", model, "--seq-len", str(seq_len), "--data", data, "--out", out,
             "--steps", str(steps), "--precision", precision,
             "--micro-batch", str(layout.micro_batch), "--accum", str(layout.microbatches)]
    if layout.zero_stage:
        args += ["--zero-stage", str(layout.zero_stage)]
    if getattr(layout, "tensor_parallel", 1) > 1:
        args += ["--tensor-parallel", str(layout.tensor_parallel)]
    if layout.pipeline_stages > 1:
        args += ["--pipeline-stages", str(layout.pipeline_stages), "--schedule", layout.schedule]
        if layout.recompute:
            args += ["--recompute"]
    return args


def _point(p: scaling.ScalingPoint) -> dict:
    return p.to_dict()


def make_plan(req: PlanRequest) -> dict:
    """The whole plan as a JSON-able dict."""
    from hpcllm.model.gpt import param_count

    if req.method not in scaling.METHODS:
        raise HpcllmError(f"--method {req.method!r}: choose {' or '.join(scaling.METHODS)}")
    if req.seq_len is not None and req.seq_len < 1:
        raise HpcllmError(f"--seq-len must be >= 1, got {req.seq_len}")
    if req.top < 1:
        raise HpcllmError(f"--top must be >= 1, got {req.top}")
    if req.nodes < 1:
        raise HpcllmError(f"--nodes must be >= 1, got {req.nodes}")
    device: DeviceProfile = get_profile(req.device)
    mfu = device.mfu if req.mfu is None else req.mfu
    if not 0 < mfu <= 1:
        raise HpcllmError(f"--mfu must be in (0, 1], got {mfu}")
    dataset = read_dataset(req.data) if req.data else None
    presets = _presets(dataset["vocab_size"] if dataset else None, req.seq_len)
    if req.model is not None and req.model not in presets:
        raise HpcllmError(f"--model {req.model!r}: unknown preset; choose {', '.join(presets)}")

    # ---- budget -> compute-optimal N, D
    compute = req.compute
    budget = {}
    if req.gpu_hours is not None:
        if compute is not None:
            raise HpcllmError("give --compute or --gpu-hours, not both")
        compute = scaling.compute_from_hours(req.gpu_hours, device.flops(req.precision), mfu)
        budget = {"gpu_hours": req.gpu_hours, "device": device.name, "peak_flops": device.flops(req.precision),
                  "mfu": mfu}
    params, tokens = req.params, req.tokens
    if compute is None and params is None and tokens is None:
        if req.model is None:
            raise HpcllmError("give a budget: --compute FLOPS, --gpu-hours H, --params N, --tokens D "
                              "(or --model PRESET for its memory and layout)")
        params = float(param_count(presets[req.model]))
    opt = scaling.solve(compute=compute, params=params, tokens=tokens, method=req.method,
                        tokens_per_param=req.tokens_per_param)
    both = {m: _point(scaling.solve(compute=compute, params=params, tokens=tokens, method=m,
                                    tokens_per_param=req.tokens_per_param)) for m in scaling.METHODS}

    # ---- the preset we lay out and its token budget
    name = req.model or nearest_preset(opt.params, presets)
    cfg = presets[name]
    sparse = {k: getattr(req, k) for k in ATTENTION_FIELDS if getattr(req, k, None) is not None}
    if sparse:  # the memory and time models count the keys the pattern attends to
        from dataclasses import replace

        try:
            cfg = replace(cfg, **sparse)
        except ValueError as e:
            what = "--moe-experts" if str(e).startswith("moe") else "--attention"
            raise HpcllmError(f"{what}: {e}") from None
    # a mixture: the scaling law and the FLOP budget count the parameters a token uses
    n_preset = float(param_count(cfg, active=bool(cfg.moe_experts)))
    # the preset trains on its own compute-optimal tokens (with --tokens: those tokens);
    # what the whole budget would buy is reported beside it
    if tokens is not None and params is None:
        d_preset = tokens
    else:
        d_preset = scaling.optimal_tokens_for_params(n_preset, req.method, req.tokens_per_param)
    budget_tokens = compute / (6.0 * n_preset) if compute is not None else None
    preset_point = scaling.point(n_preset, d_preset, req.method)
    shape = Shape.from_config(cfg)

    data_check = None
    if dataset:
        have = dataset["train_tokens"]
        data_check = {**dataset, "needed_tokens": d_preset, "optimal_tokens": opt.tokens,
                      "epochs": d_preset / have if have else math.inf, "enough": have >= d_preset}

    # ---- layouts
    for flag, v in (("--devices-per-node", req.devices_per_node), ("--global-batch", req.global_batch),
                    ("--pipeline-stages", req.pipeline_stages), ("--micro-batch", req.micro_batch)):
        if v is not None and v < 1:
            raise HpcllmError(f"{flag} must be >= 1, got {v}")
    g = req.devices_per_node if req.devices_per_node is not None else device.devices_per_node
    cluster = Cluster(nodes=req.nodes, devices_per_node=g, device=device)
    gb = req.global_batch if req.global_batch is not None else default_global_batch(cluster, cfg.seq_len)
    rc = (False, True) if req.recompute is None else (req.recompute,)
    layouts = search(shape, cluster, gb, precision=req.precision, optimizer=req.optimizer,
                     schedule=req.schedule, mfu=mfu, recompute=rc,
                     zero=(0, 1, 2, 3) if req.zero_stage is None else (req.zero_stage,),
                     tensor_parallel=None if req.tensor_parallel is None else (req.tensor_parallel,),
                     tp_across_nodes=req.tensor_parallel is not None)
    if req.pipeline_stages is not None:
        layouts = [L for L in layouts if L.pipeline_stages == req.pipeline_stages]
    if req.micro_batch is not None:
        layouts = [L for L in layouts if L.micro_batch == req.micro_batch]
    if not layouts:
        raise HpcllmError(f"no layout with those constraints for {cluster.world} devices and global batch {gb} "
                          "(pipeline stages must divide the devices and the layers; micro-batch must divide "
                          "the batch per replica)")
    best = layouts[0] if layouts[0].fits else None
    steps = math.ceil(d_preset / (gb * cfg.seq_len))
    slurm = None
    if best is not None:
        profile = req.slurm_profile or ("cpu" if device.kind == "cpu" else "default")
        slurm = slurm_train_args(best, cluster, name, cfg.seq_len, req.precision, steps,
                                 req.data or "DATA_DIR", req.out, profile)
        for k, v in sparse.items():
            slurm += ["--" + k.replace("_", "-"), str(v)]
    hours = steps * best.time.total / 3600.0 if best else None
    return {
        "method": req.method,
        "params": opt.params, "tokens": opt.tokens, "compute": opt.compute, "loss": opt.loss,
        "budget": budget,
        "methods": both,
        "tokens_per_param": req.tokens_per_param,
        "preset": {"name": name, "config": cfg.to_dict(), **preset_point.to_dict(),
                   "budget_tokens": budget_tokens, "total_params": float(param_count(cfg))},
        "data": data_check,
        "device": {**asdict(device), "capacity_bytes": cluster.capacity()},
        "cluster": {"nodes": cluster.nodes, "devices_per_node": g, "world": cluster.world},
        "precision": req.precision, "optimizer": req.optimizer, "mfu": mfu,
        "global_batch": gb, "global_batch_tokens": gb * cfg.seq_len, "steps": steps,
        "layouts": [L.to_dict() for L in layouts[:req.top]],
        "layouts_considered": len(layouts),
        "layouts_fitting": sum(L.fits for L in layouts),
        "recommended": best.to_dict() if best else None,
        "train_hours": hours,
        "slurm_command": slurm,
    }


def render_slurm(command: list[str], check_data: bool = True) -> str:
    """The batch script ``hpcllm slurm train`` writes for ``command`` (its argv, as in a plan's
    ``slurm_command``), rendered through the slurm command's own option parsing."""
    import click

    from hpcllm.commands.slurm import _common_pop, _train_job, train_cmd
    from hpcllm.launch.profiles import load_profile
    from hpcllm.launch.slurm import render_train

    if command[:3] != ["hpcllm", "slurm", "train"]:
        raise HpcllmError(f"not an `hpcllm slurm train` command: {command[:3]}")
    try:
        ctx = train_cmd.make_context("hpcllm slurm train", list(command[3:]))
    except click.UsageError as e:
        raise HpcllmError(f"hpcllm slurm train: {e.format_message()}") from None
    kw = dict(ctx.params)
    profile, _submit, _dry = _common_pop(kw)
    kw.pop("script", None)
    job = _train_job(kw, check_data=check_data)
    return render_train(job, load_profile(profile))
