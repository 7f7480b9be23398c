"""The `hpcllm` command: version, help, one-line errors."""
import subprocess
import sys

from hpcllm import __version__
from hpcllm.cli import COMMANDS


def hpcllm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "hpcllm", *args], capture_output=True, text=True, **kw)


def test_version():
    res = hpcllm("--version")
    assert res.returncode == 0 and __version__ in res.stdout


def test_help_lists_every_command():
    res = hpcllm("--help")
    assert res.returncode == 0
    for name in COMMANDS:
        assert name in res.stdout, f"{name} missing from hpcllm --help"


def test_every_registered_command_imports():
    from hpcllm.cli import cli
    import click
    ctx = click.Context(cli)
    for name in COMMANDS:
        assert cli.get_command(ctx, name) is not None, f"hpcllm {name} is not available"


def test_unknown_command_is_a_usage_error():
    res = hpcllm("no-such-command")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_console_script_is_installed():
    import shutil
    from pathlib import Path
    exe = Path(sys.executable).parent / "hpcllm"
    assert exe.exists() or shutil.which("hpcllm")
