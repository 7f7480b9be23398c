"""One writer per output (issue: two runs into one directory corrupted a dataset). Real
processes: two `hpcllm preprocess` started together, one started while another runs, a killed
holder that must not block the next run, and `train`, `export`, `tokenizer train` against a
holder in another process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data.conftest import REPO, decode_split, expected_clean, make_docs, write_jsonl

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~27 MB of jsonl: a preprocess of it runs for seconds (two started together overlap)."""
    d = tmp_path_factory.mktemp("lockcorpus")
    docs = make_docs(40_000, seed=7, min_words=20, max_words=200)
    return write_jsonl(d / "big.jsonl", docs), docs


def _preprocess(corpus_path, out, *extra):
    return [sys.executable, "-m", "hpcllm", "preprocess", str(corpus_path), "--out", str(out), "--workers", "1",
            "--val-fraction", "0", "--shard-tokens", "200000", "--item-bytes", "32768", "--no-progress", *extra]


def _assert_complete_and_right(out, docs):
    r = subprocess.run([sys.executable, "-m", "hpcllm", "inspect", str(out), "--verify"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert decode_split(out, "train") == expected_clean(docs)


def _holder(lock: Path, timeout=60) -> dict:
    """The holder's record once it has written it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            text = lock.read_text().strip()
            if text:
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"{lock}: no holder within {timeout}s")


def test_two_preprocess_runs_started_together(corpus, tmp_path):
    path, docs = corpus
    out = tmp_path / "ds"
    procs = [subprocess.Popen(_preprocess(path, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: in use by "), err
    assert "host " in lines[0] and "pid " in lines[0] and "started " in lines[0] and "Traceback" not in err
    _assert_complete_and_right(out, docs)


def test_a_second_run_while_the_first_runs_then_after_kill_9(corpus, tmp_path):
    path, docs = corpus
    out = tmp_path / "ds"
    first = subprocess.Popen(_preprocess(path, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        holder = _holder(out / ".hpcllm.lock")
        assert holder["pid"] == first.pid and "preprocess" in holder["command"]
        os.kill(first.pid, signal.SIGSTOP)  # hold it there: the first run is running, whatever the speed
        second = subprocess.run(_preprocess(path, out), env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
        os.kill(first.pid, signal.SIGKILL)  # a killed holder must not block the next run
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()
    third = subprocess.run(_preprocess(path, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    _assert_complete_and_right(out, docs)


HOLD = """
import sys, time
from hpcllm.locking import lock_dir, lock_file
lock = (lock_dir(sys.argv[2]) if sys.argv[1] == "dir" else lock_file(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def hold(tmp_path):
    """Hold a directory's or file's lock from another process for the test's duration."""
    procs = []

    def start(kind, path):
        p = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], env=ENV, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()


def test_train_export_and_tokenizer_train_refuse_a_held_output(corpus, tmp_path, hold):
    from tests.train.conftest import TINY, build_dataset, run_train

    data = build_dataset(tmp_path / "data", n_docs=100)
    run = tmp_path / "run"
    holder = hold("dir", run)
    r = run_train([*TINY, "--data", str(data), "--out", str(run), "--steps", "2"], check=False)
    assert r.returncode == 2 and f"{run}: in use by " in r.stderr and f"pid {holder.pid}" in r.stderr, r.stderr
    assert not (run / "checkpoints").exists() and not (run / "config.json").exists()

    ok = tmp_path / "ok"
    run_train([*TINY, "--data", str(data), "--out", str(ok), "--steps", "2"])
    model = tmp_path / "model.pt"
    holder = hold("file", model)
    r = subprocess.run([sys.executable, "-m", "hpcllm", "export", str(ok), "--out", str(model)], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{model}: in use by " in r.stderr and not model.exists(), r.stderr

    tok = tmp_path / "tok.json"
    hold("file", tok)
    r = subprocess.run([sys.executable, "-m", "hpcllm", "tokenizer", "train", str(corpus[0]), "--vocab-size", "300",
                        "--out", str(tok), "--max-mb", "0.2"], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{tok}: in use by " in r.stderr and not tok.exists(), r.stderr


def test_job_array_tasks_share_the_output_but_not_a_part(corpus, tmp_path, hold):
    path, _ = corpus
    out = tmp_path / "ds"
    # a task holding its part: the same task again is refused, another task is not
    from hpcllm.data.preprocess import part_dir

    holder = hold("dir", part_dir(str(out), 2, 0))
    again = subprocess.run(_preprocess(path, out, "--num-tasks", "2", "--task-id", "0"), env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and f"pid {holder.pid}" in again.stderr, again.stderr
    other = subprocess.run(_preprocess(path, out, "--num-tasks", "2", "--task-id", "1"), env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr
