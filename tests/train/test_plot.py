"""hpcllm plot: PNGs of loss and throughput from metrics.jsonl, several runs overlaid."""
import json

import pytest

from hpcllm.cli import main as cli_main
from hpcllm.errors import HpcllmError
from hpcllm.train.plot import plot_runs, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(path, n, slope, torn=False):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, n + 1):
            rec = {"step": s, "loss": 5.0 - slope * s, "lr": 1e-3, "grad_norm": 1.0,
                   "tokens_per_s": 1000.0 + 10 * s, "mfu": 0.1, "step_time_s": 0.5}
            if s % 4 == 0:
                rec["val_loss"] = 5.1 - slope * s
            f.write(json.dumps(rec) + "\n")
        if torn:
            f.write('{"step": 99, "lo')  # killed mid-write
    return path


def _cli(capsys, *args):
    try:
        rc = cli_main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_two_runs_overlaid_write_nonempty_pngs(tmp_path, capsys):
    a = _run(tmp_path / "bf16", 12, 0.1)
    b = _run(tmp_path / "fp32", 8, 0.05, torn=True)
    out = tmp_path / "plots"
    rc, stdout, err = _cli(capsys, "plot", str(a), str(b), "--out", str(out))
    assert rc == 0, err
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["loss.png", "throughput.png"]
    for f in files:
        data = f.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert stdout.split() == [str(out / "loss.png"), str(out / "throughput.png")]


def test_metrics_are_parsed_per_series(tmp_path):
    m = read_metrics(_run(tmp_path / "r", 8, 0.1, torn=True))
    assert [s for s, _ in m.train] == list(range(1, 9))  # the torn line is skipped
    assert [s for s, _ in m.val] == [4, 8]
    assert m.throughput[-1] == (8, 1080.0)


def test_resumed_run_keeps_newest_value_per_step(tmp_path):
    r = _run(tmp_path / "r", 4, 0.1)
    with open(r / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0, "tokens_per_s": 5.0}) + "\n")
    m = read_metrics(r)
    assert dict(m.train)[3] == 1.0 and len(m.train) == 4


def test_default_out_dir_is_in_the_run(tmp_path):
    r = _run(tmp_path / "r", 4, 0.1)
    paths = plot_runs([r])
    assert paths == [r / "plots" / "loss.png", r / "plots" / "throughput.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_dir_without_metrics_is_one_line_error(tmp_path, capsys):
    good = _run(tmp_path / "good", 4, 0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HpcllmError, match="metrics.jsonl"):
        plot_runs([good, empty], tmp_path / "out")
    rc, out, err = _cli(capsys, "plot", str(good), str(empty))
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and str(empty) in err


def test_corrupt_line_names_file_and_line(tmp_path):
    r = _run(tmp_path / "r", 4, 0.1)
    lines = (r / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (r / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(HpcllmError, match=r"metrics.jsonl:2: invalid JSON"):
        read_metrics(r)
