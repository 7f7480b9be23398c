"""TensorBoard event files in RUN/tensorboard/: the scalars of metrics.jsonl at the same steps,
from the one rank that writes metrics.jsonl; a resumed run leaves one point per step; without
the tensorboard package training goes on and says so once."""
import pytest

from hpcllm.train.metrics import read_metrics
from hpcllm.train.tensorboard import TAGS, TENSORBOARD_DIR
from tests.cluster.mpi import run_mpi
from tests.train.conftest import TINY, run_train, train_cmd


def _args(data, out, steps, *extra):
    return [*TINY, "--data", str(data), "--out", str(out), "--steps", str(steps), "--micro-batch", "2",
            "--eval-every", "2", "--eval-batches", "2", *extra]


def _events(run) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard reads the run's event files (all of them, in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_events_match_metrics(run) -> dict:
    events, recs = _events(run), read_metrics(run)
    want = {tag: [(r["step"], r[key]) for r in recs if key in r] for key, tag in TAGS.items()}
    want = {tag: points for tag, points in want.items() if points}
    assert set(events) == set(want)
    for tag, points in want.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (step, g), (_, w) in zip(got, points):
            assert g == pytest.approx(w, rel=1e-6), (tag, step)  # event files hold float32
    return events


@pytest.mark.mpi
def test_pipeline_event_files_hold_the_metrics_from_one_rank(dataset, tmp_path):
    # 2 ranks as 2 pipeline stages, fp16 (so a loss scale) and validation: every tag
    out = tmp_path / "pp"
    run_mpi(train_cmd(*_args(dataset, out, 4, "--pipeline-stages", "2", "--microbatches", "2",
                             "--precision", "fp16", "--ckpt-every", "0")),
            np=2, env={"OMP_NUM_THREADS": "1", "HPCLLM_PIPELINE_TIMEOUT": "60"}, timeout=180).check()
    events = _assert_events_match_metrics(out)
    assert set(events) == set(TAGS.values())
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in events["val/loss"]] == [2, 4]
    # one writer: the rank that writes metrics.jsonl
    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1


def test_resume_leaves_one_point_per_step_in_order(dataset, tmp_path):
    out = tmp_path / "run"
    run_train(_args(dataset, out, 6, "--ckpt-every", "4"))
    # resume from step 4: steps 5-6 of the first run are logged again by the second
    r = run_train(_args(dataset, out, 8, "--ckpt-every", "4", "--resume", str(out / "checkpoints" / "step-00000004")))
    assert "at step 4" in r.stdout
    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    events = _assert_events_match_metrics(out)  # the resumed run's values (tokens/s differ) for 5-6
    for tag, points in events.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)  # strictly increasing: no duplicates
    assert [s for s, _ in events["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in events["val/loss"]] == [2, 4, 6, 8]


def test_without_tensorboard_training_goes_on_and_says_so_once(dataset, tmp_path):
    # a tensorboard package that cannot be imported, first on the path
    stub = tmp_path / "stub" / "tensorboard"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("No module named \'tensorboard\'")\n')
    from tests.train.conftest import REPO

    out = tmp_path / "run"
    r = run_train(_args(dataset, out, 3, "--ckpt-every", "0"), env={"PYTHONPATH": f"{stub.parent}:{REPO}"})
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "TensorBoard" in line]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0], r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / TENSORBOARD_DIR).exists()
    assert [rec["step"] for rec in read_metrics(out) if "loss" in rec] == [1, 2, 3]


def test_unwritable_event_directory_is_one_warning_not_an_error(tmp_path):
    from hpcllm.train.metrics import MetricsLogger

    (tmp_path / TENSORBOARD_DIR).write_text("a file where the directory would go\n")
    lines = []
    m = MetricsLogger(tmp_path, enabled=True, flops_per_token=1, peak_flops_total=1.0, tokens_per_step=1,
                      total_steps=2, echo=lines.append, tensorboard_from=0)
    for step in (1, 2):
        m.step(1.0, 0.1)
        m.flush(step, lr=1e-3)
    m.close()
    assert len([line for line in lines if "TensorBoard" in line]) == 1, lines
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
