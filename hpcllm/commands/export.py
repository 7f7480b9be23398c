"""`hpcllm export`: a checkpoint (any layout) as one self-contained file, or as a Hugging Face
``transformers`` model directory (``--format hf``)."""
import click


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out", type=click.Path(), required=True,
              help="The single-file model to write (loadable by `hpcllm generate`, no MPI); with --format hf "
                   "the directory to write.")
@click.option("--format", "fmt", type=click.Choice(["hpcllm", "hf"]), default="hpcllm", show_default=True,
              help="hpcllm: one file for `hpcllm generate`; hf: a directory transformers loads offline "
                   "(AutoModelForCausalLM / AutoTokenizer .from_pretrained): GPT2LMHeadModel (learned positions), "
                   "GPTNeoXForCausalLM (rotary), LlamaForCausalLM (--arch llama).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="--format hf: the tensors' dtype [default: fp32].")
@click.option("--max-shard-size", "max_shard_mb", type=click.IntRange(min=1), default=None,
              help="--format hf: split model.safetensors into shards of at most this many MiB, with "
                   "model.safetensors.index.json [default: 5120].")
@click.option("--int8", is_flag=True, default=False,
              help="--format hpcllm: INT8 weight-only quantization (per-channel int8, fp32 scales; about a "
                   "quarter of the fp32 size); `hpcllm generate` and `hpcllm eval` load it as is.")
def export(checkpoint, out, fmt, dtype, max_shard_mb, int8):
    """Consolidate CHECKPOINT (a checkpoint directory, a run directory: its latest checkpoint,
    or with --format hf also an exported file) into one file with the model config, the full
    state dict and the tokenizer, or into a Hugging Face model directory. Checkpoints of any
    layout (pipeline stages, replicas, ZeRO shards) are merged by parameter name."""
    if fmt == "hf" and int8:
        raise click.UsageError("--int8 applies to --format hpcllm only")
    if fmt == "hf":
        from hpcllm.interop.hf_export import DEFAULT_MAX_SHARD_BYTES, export_hf

        shard = max_shard_mb * 1024 * 1024 if max_shard_mb else DEFAULT_MAX_SHARD_BYTES
        info = export_hf(checkpoint, out, dtype=dtype or "fp32", max_shard_bytes=shard)
        click.echo(f"exported {info['source']} -> {info['out']} ({info['class']}, {info['dtype']}, "
                   f"{info['bytes'] / 2**20:.1f} MiB in {', '.join(info['files'])})")
        return
    for flag, v in (("--dtype", dtype), ("--max-shard-size", max_shard_mb)):
        if v is not None:
            raise click.UsageError(f"{flag} applies to --format hf only")
    from hpcllm.infer.export import export_checkpoint

    src, written, stages = export_checkpoint(checkpoint, out, int8=int8)
    what = f"{stages} pipeline stages" if stages else "data-parallel checkpoint"
    click.echo(f"exported {src} ({what}{', INT8' if int8 else ''}) -> {written}")
