"""`hpcllm export`: a checkpoint (pipeline or data-parallel) as one self-contained file."""
import click


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="The single-file model to write (loadable by `hpcllm generate`, no MPI).")
def export(checkpoint, out):
    """Consolidate CHECKPOINT (a checkpoint directory or a run directory: its latest
    checkpoint) into one file with the model config, the full state dict and the tokenizer.
    Checkpoints of any layout (pipeline stages, replicas) are merged by parameter name."""
    from hpcllm.infer.export import export_checkpoint

    src, written, stages = export_checkpoint(checkpoint, out)
    what = f"{stages} pipeline stages" if stages else "data-parallel checkpoint"
    click.echo(f"exported {src} ({what}) -> {written}")
