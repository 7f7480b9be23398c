"""Under mpirun (or alone): `hpcllm train` once per schedule in one process, so the tests
pay for one interpreter and torch import per layout.  Usage:
pp_train.py OUT_BASE SCHEDULES -- TRAIN ARGS...   (SCHEDULES comma-separated, or "none" for
a run without --schedule)."""
import sys

from hpcllm.cli import cli

out_base, schedules = sys.argv[1], sys.argv[2]
args = sys.argv[sys.argv.index("--") + 1:]
for sched in schedules.split(","):
    extra = [] if sched == "none" else ["--schedule", sched]
    code = cli.main(args=["train", "--out", f"{out_base}-{sched}", *extra, *args], prog_name="hpcllm",
                    standalone_mode=False)
    if code:
        sys.exit(code)
