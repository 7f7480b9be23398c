"""Under mpirun (or alone): `hpcllm train` once per RUN spec in one process, so the tests pay
for one interpreter, torch import and MPI start for several ZeRO stages.  Usage:
zero_train.py OUT_BASE SPECS -- TRAIN ARGS...   SPECS: comma-separated ``STAGE`` or
``STAGE:ACCUM`` (output ``{OUT_BASE}-z{STAGE}-a{ACCUM}``)."""
import sys

from hpcllm.cli import cli

out_base, specs = sys.argv[1], sys.argv[2]
args = sys.argv[sys.argv.index("--") + 1:]
for spec in specs.split(","):
    stage, _, accum = spec.partition(":")
    extra = ["--zero-stage", stage] + (["--accum", accum] if accum else [])
    code = cli.main(args=["train", "--out", f"{out_base}-z{stage}-a{accum or 'x'}", *extra, *args],
                    prog_name="hpcllm", standalone_mode=False)
    if code:
        sys.exit(code)
