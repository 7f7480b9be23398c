"""`hpcllm plan`: model and data size for a budget, memory per device, a layout, a Slurm job."""
from __future__ import annotations

import json
import sys

import click

from hpcllm.errors import HpcllmError
from hpcllm.options import AT_LEAST_1, POSITIVE, Range, number


def _num(what):
    def conv(ctx, param, value):
        if value is None:
            return None
        from hpcllm.plan.scaling import parse_number

        return parse_number(value, f"--{param.name.replace('_', '-')}")
    return conv


@click.command("plan")
@click.option("--compute", callback=_num("compute"), metavar="FLOPS", help="Training budget in FLOPs, e.g. 5.76e23.")
@click.option("--gpu-hours", callback=_num("gpu_hours"), metavar="H",
              help="Budget in device-hours of --device at --mfu (instead of --compute).")
@click.option("--params", callback=_num("params"), metavar="N", help="Model size, e.g. 7B: plan its data and layout.")
@click.option("--tokens", callback=_num("tokens"), metavar="D", help="Data size, e.g. 300B: the model it suits.")
@click.option("--method", type=click.Choice(["chinchilla", "parametric"]), default="chinchilla", show_default=True,
              help="chinchilla: ~20 tokens/param (approaches 1-2); parametric: minimum of the fitted L(N, D).")
@click.option("--tokens-per-param", type=number(float, POSITIVE), default=20.0, show_default=True,
              help="Tokens per parameter of the chinchilla method.")
@click.option("--device", default="h100", show_default=True,
              help="a100-40gb, a100-80gb, h100-80gb, h200-141gb (aliases a100, h100, h200), cpu (this "
                   "machine, measured) or a .toml profile.")
@click.option("--mfu", type=number(float, Range(0, 1, lo_open=True)), default=None, help="Model-FLOPs utilisation [default: the device's, 0.4 on GPUs].")
@click.option("--data", "data", type=click.Path(), default=None,
              help="A `hpcllm preprocess` output: compare its tokens with those needed.")
@click.option("--model", default=None, help="Preset to lay out [default: the nearest to the optimum].")
@click.option("--seq-len", type=number(int, AT_LEAST_1), default=None, help="Sequence length [default: the preset's].")
@click.option("--nodes", "-N", type=number(int, AT_LEAST_1), default=1, show_default=True, help="Nodes.")
@click.option("--devices-per-node", type=number(int, AT_LEAST_1), default=None, help="Devices (ranks) per node [default: the device's].")
@click.option("--global-batch", type=number(int, AT_LEAST_1), default=None,
              help="Sequences per optimizer step [default: ~0.5M tokens on GPUs, 16 per rank on CPUs].")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--schedule", type=click.Choice(["1f1b", "gpipe", "zbh1"]), default="1f1b", show_default=True)
@click.option("--pipeline-stages", type=number(int, AT_LEAST_1), default=None, help="Only layouts with this many stages.")
@click.option("--micro-batch", type=number(int, AT_LEAST_1), default=None, help="Only layouts with this micro-batch.")
@click.option("--recompute/--no-recompute", default=None, help="Only layouts with / without recomputation.")
@click.option("--attention", type=click.Choice(["dense", "local", "bigbird"]), default=None,
              help="Sparse attention of the model (as hpcllm train's): memory and time count the attended keys.")
@click.option("--attention-window", type=number(int, AT_LEAST_1), default=None, help="--attention: keys per query in the local band.")
@click.option("--attention-global", type=number(int, Range(0)), default=None, help="--attention bigbird: global tokens.")
@click.option("--attention-random", type=number(int, Range(0)), default=None, help="--attention bigbird: random key blocks per query block.")
@click.option("--attention-block", type=number(int, AT_LEAST_1), default=None, help="--attention: block size.")
@click.option("--moe-experts", type=number(int, AT_LEAST_1), default=None,
              help="Mixture of experts (as hpcllm train's): memory counts every expert, time and the scaling law "
                   "the active parameters.")
@click.option("--moe-top-k", type=number(int, Range(1, 2)), default=None, help="--moe-experts: experts per token.")
@click.option("--moe-every", type=number(int, AT_LEAST_1), default=None, help="--moe-experts: every Nth block a mixture.")
@click.option("--tensor-parallel", type=number(int, Range(1)), default=None,
              help="Only layouts with this tensor-parallel degree (may span nodes when given) "
                   "[default: search the divisors of --devices-per-node].")
@click.option("--zero-stage", type=number(int, Range(0, 3)), default=None,
              help="Only layouts with this ZeRO stage (0 replicated .. 3 fully sharded) [default: search all].")
@click.option("--top", type=number(int, AT_LEAST_1), default=8, show_default=True, help="Layouts to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--emit-slurm", "emit_slurm", type=click.Path(), default=None, metavar="FILE",
              help="Write the recommended layout's `hpcllm slurm train` batch script to FILE ('-': stdout).")
@click.option("--slurm-profile", default=None, help="Cluster profile (slurm/profiles) for --emit-slurm [default: default, or cpu for --device cpu].")
@click.option("--out", default="runs/planned", show_default=True, help="Run directory in the emitted command.")
def plan(as_json, emit_slurm, **kw):
    """How big a model for a budget, how many tokens, will it fit, how to split it.

    \b
    hpcllm plan --compute 5.76e23
    hpcllm plan --gpu-hours 100000 --device h100 --nodes 32
    hpcllm plan --params 1.3B --device a100-40gb --nodes 2 --data data/web --emit-slurm train.sbatch
    """
    from hpcllm.plan.planner import PlanRequest, make_plan, render_slurm
    from hpcllm.plan.report import format_plan

    req = PlanRequest(**{k: v for k, v in kw.items() if k in PlanRequest.__dataclass_fields__})
    result = make_plan(req)
    if emit_slurm is not None:
        if result["slurm_command"] is None:
            raise HpcllmError("--emit-slurm: no layout fits, nothing to run")
        text = render_slurm(result["slurm_command"], check_data=req.data is not None)
        if emit_slurm == "-":
            sys.stdout.write(text)
            return
        try:
            with open(emit_slurm, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise HpcllmError(f"--emit-slurm {emit_slurm}: {e.strerror}") from None
        result["slurm_script"] = emit_slurm
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(format_plan(result))
        if emit_slurm is not None:
            click.echo(f"wrote {emit_slurm}")
