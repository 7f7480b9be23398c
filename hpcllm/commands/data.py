"""`hpcllm preprocess [merge]`, `hpcllm inspect`, `hpcllm tokenizer train`: thin Click layers
over hpcllm.data (no torch import here)."""
from __future__ import annotations

import json
import shlex
import sys

import click

from hpcllm.errors import HpcllmError
from hpcllm.options import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Range, number


def _command_line() -> str:
    return "hpcllm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class _PreprocessCommand(click.Command):
    """`hpcllm preprocess INPUT... -o OUT`, and the sub-form `hpcllm preprocess merge OUT`."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "merge":
            return merge.make_context("preprocess merge", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("merge")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in OUT.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def merge(out, overwrite, progress):
    """Write OUT's dataset from the parts of a finished job array (equals a single-task run)."""
    from hpcllm.data.preprocess import merge_parts

    m = merge_parts(out, overwrite=overwrite, progress=progress)
    _summary(out, m)


@click.command(cls=_PreprocessCommand, epilog="""\b
Inputs are files, directories or globs, optionally as corpora NAME=PATTERN[:WEIGHT]
(the training loader samples corpora by weight). Formats: .txt, .jsonl/.json, .parquet,
each also compressed .gz/.zst/.xz.
\b
Job arrays: run with --num-tasks T --task-id I (default: SLURM_ARRAY_TASK_COUNT/_ID) in each
task, then `hpcllm preprocess merge OUT` once all tasks have finished.""")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Dataset directory to write.")
@click.option("--tokenizer", default=None, metavar="byte|PATH",
              help="'byte' (default), a HF tokenizer.json (see `hpcllm tokenizer train`), or a Hugging Face model "
                   "directory (its tokenizer.json; the end-of-text token from its tokenizer_config.json).")
@click.option("--text-key", default="text", show_default=True, help="JSON key (dotted for nested) or parquet column.")
@click.option("--txt-split", type=click.Choice(["none", "blank-line"]), default="none", show_default=True,
              help="A .txt file is one document, or one document per blank-line separated block.")
@click.option("--val-fraction", type=number(float, FRACTION), default=0.005, show_default=True,
              help="Fraction of documents (by content hash) in the val split.")
@click.option("--shard-tokens", type=number(int, AT_LEAST_1), default=1 << 26, show_default=True, help="Tokens per shard (at least).")
@click.option("--workers", type=number(int, AT_LEAST_1), default=1, show_default=True, help="Tokenizing processes.")
@click.option("--min-chars", type=number(int, NON_NEGATIVE), default=32, show_default=True, help="Drop shorter documents.")
@click.option("--nfc/--no-nfc", default=True, show_default=True, help="Unicode NFC normalisation.")
@click.option("--strip-control/--keep-control", default=True, show_default=True,
              help="Remove control characters other than newline and tab.")
@click.option("--dedup/--no-dedup", default=True, show_default=True, help="Drop exact duplicates (content hash).")
@click.option("--strict", is_flag=True, help="Stop at the first bad record instead of skipping and counting it.")
@click.option("--num-tasks", type=number(int, AT_LEAST_1), default=None, help="Job-array size [SLURM_ARRAY_TASK_COUNT].")
@click.option("--task-id", type=number(int, NON_NEGATIVE), default=None, help="This task's index [SLURM_ARRAY_TASK_ID].")
@click.option("--compression", type=click.Choice(["none", "lzf"]), default="none", show_default=True,
              help="Shard storage (none: fastest random windows).")
@click.option("--max-doc-mb", type=number(int, AT_LEAST_1), default=32, show_default=True, help="Reject larger records.")
@click.option("--item-bytes", type=number(int, AT_LEAST_1), default=1 << 20, show_default=True, help="Bytes per work item.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset or unfinished run with other arguments in OUT.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def preprocess(inputs, out, **options):
    """Tokenize corpora INPUT... into HDF5 shards in OUT (resumable: rerun the same command).

    Also: `hpcllm preprocess merge OUT` after a job array.
    """
    from hpcllm.data.preprocess import run_preprocess

    options["command"] = _command_line()
    m = run_preprocess(list(inputs), out, **options)
    if "splits" in m:
        _summary(out, m)
    else:
        click.echo(f"task {m['task_id']}/{m['num_tasks']}: {m['documents']} documents, {m['tokens']} tokens "
                   f"in {m['part']} (run `hpcllm preprocess merge {out}` when all tasks are done)")


def _summary(out, m):
    s = m["splits"]
    click.echo(f"{out}: train {s['train']['tokens']} tokens / {s['train']['documents']} docs in "
               f"{len(s['train']['shards'])} shards, val {s['val']['tokens']} tokens / {s['val']['documents']} docs; "
               f"dropped {sum(m['dropped'].values())}")


@click.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Check every shard's sha256 and structure.")
@click.option("--show", type=number(int, NON_NEGATIVE), default=0, metavar="N", help="Decode and print N documents.")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="Split that --show reads.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def inspect(data_dir, verify, show, split, as_json):
    """Totals, shards, tokenizer, splits and dropped counts of a dataset."""
    from hpcllm.data.inspect import inspect_dataset

    report = inspect_dataset(data_dir, verify=verify, show=show, split=split)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(report["text"])
    if verify and report["problems"]:
        raise HpcllmError(f"{data_dir}: {len(report['problems'])} problem(s), first: {report['problems'][0]}")


@click.group()
def tokenizer():
    """Train tokenizers (offline, HF `tokenizers` byte-level BPE)."""


@tokenizer.command("train")
@click.argument("corpus", nargs=-1, required=True)
@click.option("--vocab-size", type=number(int, Range(258)), required=True, help="Vocabulary size, <|endoftext|> included.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="tokenizer.json to write.")
@click.option("--text-key", default="text", show_default=True, help="JSON key (dotted) or parquet column.")
@click.option("--txt-split", type=click.Choice(["none", "blank-line"]), default="none", show_default=True)
@click.option("--max-mb", type=number(float, POSITIVE), default=None, help="Train on at most this many MB of text.")
@click.option("--min-frequency", type=number(int, AT_LEAST_1), default=2, show_default=True, help="Minimum pair count to merge.")
def tokenizer_train(corpus, vocab_size, out, text_key, txt_split, max_mb, min_frequency):
    """Train a byte-level BPE on CORPUS... (same input forms as preprocess)."""
    from hpcllm.data.preprocess import train_tokenizer

    tok = train_tokenizer(list(corpus), out, vocab_size=vocab_size, text_key=text_key, txt_split=txt_split,
                          max_mb=max_mb, min_frequency=min_frequency)
    click.echo(f"{out}: byte-level BPE, vocab {tok.vocab_size}, <|endoftext|> = {tok.eod_id}, sha256 {tok.sha256[:12]}")
