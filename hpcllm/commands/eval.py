"""`hpcllm eval`: a thin Click layer over hpcllm.infer.evaluate."""
import json

import click

from hpcllm.options import AT_LEAST_1, number


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="Dataset directory (from `hpcllm preprocess`, tokenized with the model's tokenizer): "
                   "loss, perplexity and bits per byte over every window of --split.")
@click.option("--split", default="val", show_default=True, help="Which split of --data.")
@click.option("--int8", is_flag=True, default=False,
              help="Also evaluate the INT8 weight-only quantization of the model, beside the original.")
@click.option("--batch-size", type=number(int, AT_LEAST_1), default=8, show_default=True,
              help="Windows per forward pass (per rank).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N (under mpirun, cuda is each rank's GPU on its node).")
@click.option("--tasks", default=None, metavar="NAME[,NAME]",
              help="lm-evaluation-harness tasks, run offline through hpcllm's adapter: the shipped hpcllm_ppl "
                   "(rolling perplexity of Python programs) and hpcllm_mc (multiple choice), or any task of "
                   "--include-path.")
@click.option("--include-path", "include_path", multiple=True, type=click.Path(file_okay=False),
              help="A directory of lm-eval task YAML files (repeatable; hpcllm/eval_tasks is always included).")
@click.option("--limit", type=number(int, AT_LEAST_1), default=None, help="--tasks: at most N documents per task.")
@click.option("--num-fewshot", type=number(int, None), default=None, help="--tasks: few-shot examples per prompt.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object instead of the table.")
def eval_command(checkpoint, data_dir, split, int8, batch_size, device, tasks, include_path, limit, num_fewshot,
                 as_json):
    """Evaluate CHECKPOINT (a run directory, a checkpoint directory or an exported file).

    With --data: the mean next-token loss (nats), perplexity and bits per byte over ALL
    non-overlapping seq_len windows of the split, each exactly once. One process, or N ranks
    under mpirun/srun (windows split by rank, sums reduced; rank 0 prints). With --tasks:
    lm-evaluation-harness tasks (HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 are set: nothing
    is downloaded). Both may be given."""
    from hpcllm.infer.evaluate import Ranks

    ranks = Ranks()
    ranks.share_cores()
    report = {}
    if data_dir is None and not tasks:
        raise click.UsageError("give --data DATASET (perplexity over a split) and/or --tasks NAME[,NAME] (lm-eval)")
    if tasks and int8:
        raise click.UsageError("--int8 applies to --data only")
    if data_dir is not None:
        report["perplexity"] = _perplexity(checkpoint, data_dir, split, int8, batch_size, device, ranks)
    if tasks:
        report["tasks"] = _tasks(checkpoint, tasks, include_path, device, batch_size, limit, num_fewshot, ranks)
    if ranks.rank != 0:
        return
    if as_json:
        click.echo(json.dumps(report if len(report) > 1 else next(iter(report.values()))))
        return
    if "perplexity" in report:
        _print_perplexity(report["perplexity"])
    if "tasks" in report:
        _print_tasks(report["tasks"])


def _tasks(checkpoint, tasks, include_path, device, batch_size, limit, num_fewshot, ranks) -> dict:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise click.UsageError("--tasks: no task names")
    if ranks.rank != 0:  # lm-eval runs on one process (rank 0), the others wait for nothing
        return {}
    from hpcllm.interop.lm_eval_adapter import run_tasks

    res = run_tasks(checkpoint, names, include_path=list(include_path) or None, device=device,
                    batch_size=batch_size, limit=limit, num_fewshot=num_fewshot)
    return {t: {k: v for k, v in m.items() if k not in ("name", "alias") and "stderr" not in k}
            for t, m in res["results"].items()}


def _print_tasks(results: dict) -> None:
    for task, metrics in results.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4g}" if isinstance(v, float) else f"{k.split(',')[0]} {v}"
                          for k, v in metrics.items())
        click.echo(f"{task}: {shown}")


def _perplexity(checkpoint, data_dir, split, int8, batch_size, device, ranks) -> dict:
    from hpcllm.infer.evaluate import evaluate_source

    return evaluate_source(checkpoint, data_dir, split=split, batch_size=batch_size, device=device, int8=int8,
                           ranks=ranks)


def _print_perplexity(r: dict) -> None:
    first = next(iter(r["results"].values()))
    click.echo(f"{r['source']} on {r['data']} ({r['split']}): {first['windows']} windows x {r['seq_len']} tokens = "
               f"{first['tokens']} tokens, {first['bytes']} bytes")
    for label, m in r["results"].items():
        bpb = f"{m['bits_per_byte']:.4f}" if m["bits_per_byte"] is not None else "-"
        line = f"{label:>5}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.4f}  bits/byte {bpb}"
        if label == "int8" and "int8_perplexity_change" in r:
            line += f"  (perplexity {100 * r['int8_perplexity_change']:+.2f}% vs {next(iter(r['results']))})"
        click.echo(line)
