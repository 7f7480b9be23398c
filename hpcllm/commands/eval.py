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
@click.option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object instead of the table.")
def eval_command(checkpoint, data_dir, split, int8, batch_size, device, as_json):
    """Evaluate CHECKPOINT (a run directory, a checkpoint directory or an exported file).

    With --data: the mean next-token loss (nats), perplexity and bits per byte over ALL
    non-overlapping seq_len windows of the split, each exactly once. One process, or N ranks
    under mpirun/srun (windows split by rank, sums reduced; rank 0 prints)."""
    from hpcllm.infer.evaluate import Ranks

    ranks = Ranks()
    ranks.share_cores()
    report = {}
    if data_dir is None:
        raise click.UsageError("give --data DATASET (the split to compute perplexity over)")
    report["perplexity"] = _perplexity(checkpoint, data_dir, split, int8, batch_size, device, ranks)
    if ranks.rank != 0:
        return
    if as_json:
        click.echo(json.dumps(report["perplexity"]))
    else:
        _print_perplexity(report["perplexity"])


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
