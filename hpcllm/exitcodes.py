"""Process exit statuses that launchers and sbatch scripts act on."""

OK = 0
#: A failure hpcllm diagnosed (bad input, NaN loss, mismatch): do not requeue.
FAILURE = 1
#: Click's status for a bad command line, also used for HpcllmError.
USAGE = 2
#: Training stopped on request (SIGUSR1/SIGTERM, time limit) after writing a checkpoint:
#: the sbatch script requeues the job on this status and only on this one (EX_TEMPFAIL).
REQUEUE = 75
