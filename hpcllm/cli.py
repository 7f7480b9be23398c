"""The `hpcllm` command: one Click group dispatching to subcommands.

Subcommands live in hpcllm/commands/<area>.py and are imported only when used, so
`hpcllm --help` and `hpcllm slurm ...` do not pay for importing torch or Horovod.
"""
import importlib
import sys

import click

from hpcllm import __version__
from hpcllm.errors import HpcllmError
from hpcllm import exitcodes

#: command name -> "module:attribute" of its Click command
COMMANDS = {
    "preprocess": "hpcllm.commands.data:preprocess",
    "inspect": "hpcllm.commands.data:inspect",
    "tokenizer": "hpcllm.commands.data:tokenizer",
    "train": "hpcllm.commands.train:train",
    "generate": "hpcllm.commands.train:generate",
    "plot": "hpcllm.commands.train:plot",
    "export": "hpcllm.commands.export:export",
    "eval": "hpcllm.commands.eval:eval_command",
    "slurm": "hpcllm.commands.slurm:slurm",
    "plan": "hpcllm.commands.plan:plan",
    "doctor": "hpcllm.commands.doctor:doctor",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def _load(self, name):
        module_name, attr = COMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # the area is not built yet
                return None
            raise
        return getattr(module, attr, None)

    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self._has(name))

    def _has(self, name):
        module_name = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module_name) is not None

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return self._load(name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpcllm")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """hpcllm: train GPT models on HPC clusters.

    Tokenize corpora into HDF5 shards, train with Horovod data parallelism and mpi4py
    pipeline parallelism, and run it all as Slurm jobs that survive preemption.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv=None):
    """Entry point of the console script: HpcllmError becomes one line on stderr, status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # bytes that are not UTF-8 in arguments (paths from a shell) print back as they came
    if hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass
    try:
        return cli.main(args=argv, prog_name="hpcllm", standalone_mode=False) or 0
    except OSError as e:  # a full disk or quota wherever it strikes: one line, not a traceback
        from hpcllm.fileio import is_write_failure, write_error

        if debug or not is_write_failure(e):
            raise
        click.echo(f"error: {write_error('the output', e.filename or '.', e)}", err=True)
        sys.exit(exitcodes.USAGE)
    except HpcllmError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(exitcodes.USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad flag or argument: one line, as for HpcllmError
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message()}{where}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
