"""`hpcllm train`, `generate`, `plot`: thin Click layers over hpcllm.train."""
import sys

import click

from hpcllm.config import add_train_options
from hpcllm.options import AT_LEAST_1, NON_NEGATIVE, Range, number


# --------------------------------------------------------------------------- train


@click.command(context_settings={"max_content_width": 100})
@add_train_options
def train(config_file, **flags):
    """Train a GPT on a dataset from `hpcllm preprocess`.

    Run it as one process (`hpcllm train ...`) or as N ranks under mpirun, srun --mpi=pmix
    or horovodrun: Horovod averages the gradients, the global batch is
    micro-batch x accum x ranks. Every option can also come from --config FILE.toml
    (sections [model], [data], [optimizer], [precision], [parallel], [checkpoint], [logging]);
    flags override the file. Exits 75 after a checkpointed stop request (SIGUSR1/SIGTERM),
    1 on a non-finite loss, 2 on bad input.
    """
    from hpcllm.config import build_config
    from hpcllm.train.trainer import train as run_train

    cfg = build_config(config_file, **flags)
    code = run_train(cfg)
    if code:
        sys.exit(code)


# --------------------------------------------------------------------------- generate, plot
# (train extras helper) Thin wrappers: the work is in hpcllm/infer/generate.py and hpcllm/train/plot.py.


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", default="", show_default=True, help="Text to continue (empty: start from end-of-document).")
@click.option("--max-new-tokens", type=number(int, AT_LEAST_1), default=200, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=number(float, NON_NEGATIVE), default=0.8, show_default=True, help="Softmax temperature; 0 = greedy.")
@click.option("--top-k", type=number(int, NON_NEGATIVE), default=50, show_default=True, help="Sample among the k most likely tokens (0: all).")
@click.option("--seed", type=number(int, NON_NEGATIVE), default=0, show_default=True, help="Sampling seed (same seed, same text).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--top-p", type=number(float, Range(0, 1, lo_open=True)), default=None,
              help="Nucleus sampling: the most likely tokens whose probabilities sum to P [default: off].")
@click.option("--stop", default=None, help="End each completion before the first occurrence of this string.")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
              help="Decode with a key/value cache (--no-kv-cache: recompute the context for every token).")
@click.option("--prompts-file", type=click.Path(), default=None,
              help="Many prompts: one per line, or JSONL (FILE.jsonl: {\"prompt\": ...} or strings per line); "
                   "generated in batches.")
@click.option("--batch-size", type=number(int, AT_LEAST_1), default=8, show_default=True,
              help="Prompts per batch with --prompts-file (left-padded).")
@click.option("--output", type=click.Choice(["text", "jsonl"]), default="text", show_default=True,
              help="With --prompts-file: prompt + completion per prompt, or one JSON object per prompt.")
@click.option("--int8", is_flag=True, default=False,
              help="Quantize the weights to INT8 after loading (per-channel, weight-only; an `export --int8` "
                   "file is INT8 without this flag).")
def generate(checkpoint, prompt, max_new_tokens, temperature, top_k, seed, device, top_p, stop, kv_cache,
             prompts_file, batch_size, output, int8):
    """Sample a continuation of --prompt from CHECKPOINT: a run directory (its latest
    checkpoint), a checkpoint directory, or a file written by `hpcllm export`. Uses the
    tokenizer the model was trained with (checked by sha256). One process, no MPI. A prompt
    longer than the model's seq_len loses its first tokens (a note on stderr says how many;
    a "prompt_tokens_dropped" field with --output jsonl)."""
    from hpcllm.infer.generate import SampleConfig, complete, load_model, truncation_note, valid_prompt

    sample = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k or None, seed=seed, kv_cache=kv_cache, top_p=top_p, stop=stop or None)
    if prompts_file is not None:
        _generate_many(checkpoint, prompts_file, sample, device, batch_size, output, int8)
        return
    prompt, note = valid_prompt(prompt)
    if note:
        click.echo(f"note: {note}", err=True)
    loaded = load_model(checkpoint, device=device, int8=int8)
    out = complete(loaded, prompt, sample)
    if out["prompt_tokens_dropped"]:
        n = len(loaded.tokenizer.encode(prompt))
        click.echo(f"note: {truncation_note(out['prompt_tokens_dropped'], n, loaded.seq_len, '--prompt')}", err=True)
    click.echo(prompt + out["completion"])


def _generate_many(checkpoint, prompts_file, sample, device, batch_size, output, int8=False):
    import json
    import time

    from hpcllm.infer.generate import finish, generate_batch, load_model, read_prompts, truncation_note, valid_prompt

    prompts = [valid_prompt(p)[0] for p in read_prompts(prompts_file)]
    loaded = load_model(checkpoint, device=device, int8=int8)
    tok = loaded.tokenizer
    encoded = [tok.encode(p) for p in prompts]
    t0 = time.perf_counter()
    new = generate_batch(loaded.model, encoded, sample, seq_len=loaded.seq_len,
                         vocab_size=tok.vocab_size, eod_id=tok.eod_id, batch_size=batch_size)
    dt = time.perf_counter() - t0
    for i, (p, ids, enc) in enumerate(zip(prompts, new, encoded), 1):
        res = finish(loaded, ids, sample, max(0, len(enc) - loaded.seq_len))
        if output == "jsonl":
            click.echo(json.dumps({"prompt": p, **res}))
            continue
        if res["prompt_tokens_dropped"]:
            click.echo(f"note: {truncation_note(res['prompt_tokens_dropped'], len(enc), loaded.seq_len, f'prompt {i}')}",
                       err=True)
        click.echo(p + res["completion"])
    n = sum(len(x) for x in new)
    click.echo(f"generated {n} tokens for {len(prompts)} prompts in {dt:.2f} s ({n / dt:.1f} tokens/s)", err=True)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default=None,
              help="Directory for the PNGs [default: RUN_DIR/plots for one run, ./plots for several].")
def plot(run_dirs, out):
    """Plot train/val loss and tokens/s of one or more runs (overlaid) from their metrics.jsonl."""
    from hpcllm.train.plot import plot_runs

    for path in plot_runs(list(run_dirs), out):
        click.echo(str(path))
