"""ZeRO-1/2/3 over Horovod (``--zero-stage``), under real mpirun.

Equivalence: every stage gives stage 0's losses and final parameters (fp32; in practice bit
for bit: the optimizer steps per-parameter pieces and the global norm is summed in float64),
with accumulation 1 and 3, a model whose flat buffers are not divisible by the rank count
(d_model 33), the tied embedding, gradient clipping active, on 2 ranks, on 4 ranks over two
virtual nodes with hierarchical communication, and inside pipeline stages. Memory: the
model-state bytes each rank reports equal the planner's formula within 5%. Checkpoints: each
rank writes its own shard file, and a run continues across stages, rank counts and layouts
with the uninterrupted run's losses. Faults: a rank killed inside a reduce-scatter ends the job.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.cluster.mpi import run_mpi
from tests.train.conftest import build_dataset, ckpt_model, run_train, train_cmd

pytestmark = [pytest.mark.mpi]
SCRIPT = Path(__file__).with_name("scripts") / "zero_train.py"
STEPS = 10
#: d_model 33 / 3 heads: every flat buffer has an odd number of elements (padding on 2 and 4
#: ranks); clipping at 0.5 is active (the norms are above 1)
COMMON = ["--model", "tiny", "--n-layer", "2", "--n-head", "3", "--d-model", "33", "--seq-len", "32",
          "--threads", "1", "--precision", "fp32", "--warmup", "2", "--decay-steps", str(STEPS), "--lr", "3e-3",
          "--log-every", "1", "--micro-batch", "2", "--grad-clip", "0.5", "--seed", "5"]
ENV = {"OMP_NUM_THREADS": "1", "HPCLLM_PIPELINE_TIMEOUT": "60"}


@pytest.fixture(scope="module")
def zdata(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("zero") / "ds", n_docs=200)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run) if "loss" in r]


def final(run: Path, step: int = STEPS) -> dict:
    return ckpt_model(run / "checkpoints" / f"step-{step:08d}")


def assert_same(run: Path, ref: Path, what: str) -> None:
    """Losses within 1e-6 relative; the final parameters within 1e-6 relative as one vector.
    Per tensor the bound is looser: where Horovod sums more than two ranks in another order
    than the allreduce did, rounding-level differences reach AdamW, and the attention's key
    biases (whose true gradient is zero: softmax ignores a per-row constant) take steps of
    lr x sign(noise), so they differ in relative terms while the model does not."""
    assert losses(run) == pytest.approx(losses(ref), rel=1e-6), what
    val = lambda r: [x["val_loss"] for x in records(r) if "val_loss" in x]  # noqa: E731
    assert val(run) == pytest.approx(val(ref), rel=1e-6), what  # evaluation (stage 3: gathered, no grad)
    got, want = final(run), final(ref)
    assert set(got) == set(want), what
    diff = sum(float((got[k] - w).double().square().sum()) for k, w in want.items())
    norm = sum(float(w.double().square().sum()) for w in want.values())
    assert (diff / norm) ** 0.5 <= 1e-6, f"{what}: parameters differ by {(diff / norm) ** 0.5:.2e} relative"
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=f"{what}: {name}")


def n_params() -> int:
    from hpcllm.model.gpt import param_count, preset

    return param_count(preset("tiny", n_layer=2, n_head=3, d_model=33, seq_len=32, vocab_size=257))


def block_buffer_sizes() -> list[int]:
    """Elements of a block's two flat buffers (matrices; biases and norms)."""
    from hpcllm.model.gpt import GPT, preset

    with torch.device("meta"):
        blk = GPT(preset("tiny", n_layer=2, n_head=3, d_model=33, seq_len=32, vocab_size=257),
                  init_seed=None).block_list()[0]
    return [sum(p.numel() for p in blk.parameters() if p.dim() >= 2),
            sum(p.numel() for p in blk.parameters() if p.dim() < 2)]


def assert_model_state_matches_formula(run: Path, stage: int, n: int) -> None:
    from hpcllm.plan.memory import model_state_bytes

    rec = [r for r in records(run) if "model_state_bytes" in r][-1]
    want = model_state_bytes(n_params(), stage, n)
    assert len(rec["model_state_bytes"]) == n
    for got in rec["model_state_bytes"]:
        assert abs(got / want - 1) < 0.05, (stage, n, got, want)
    assert all(m > 0 for m in rec["peak_mem_bytes"])
    assert set(rec["comm_s"]) == ({"reduce_scatter_s", "all_gather_s"} if stage else {"allreduce_s"})


def zero_runs(base: Path, specs: str, data, np_: int, *extra, hosts=None, timeout=240):
    env = dict(ENV)
    if hosts:
        env["OMPI_MCA_btl"] = "self,tcp"
    run_mpi([sys.executable, SCRIPT, base, specs, "--", "--data", str(data), "--steps", str(STEPS),
             "--ckpt-every", "0", *COMMON, *extra], np=np_, env=env, hosts=hosts, timeout=timeout).check()
    return lambda stage, accum="x": Path(f"{base}-z{stage}-a{accum}")


@pytest.mark.slow
def test_every_stage_equals_replicated_on_two_ranks(zdata, tmp_path):
    # parameter counts not divisible by the ranks: shard boundaries fall inside parameters
    assert block_buffer_sizes()[1] % 2 == 1
    run = zero_runs(tmp_path / "r", "0:1,1:1,2:1,3:1,0:3,1:3,2:3,3:3", zdata, 2, "--eval-every", "5")
    assert len([r for r in records(run(3, "1")) if "val_loss" in r]) == 2
    for accum in ("1", "3"):
        for stage in (1, 2, 3):
            assert_same(run(stage, accum), run(0, accum), f"ZeRO-{stage} accum {accum} on 2 ranks")
    for stage in (0, 1, 2, 3):
        assert_model_state_matches_formula(run(stage, "1"), stage, 2)
    # every rank wrote its own shards; nothing was gathered into a model file
    ck = run(3, "1") / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(f.name for f in ck.glob("*.pt") if not f.name.startswith("rng")) == [
        "zero-00000-00000.pt", "zero-00000-00001.pt"]
    trainer = json.loads((ck / "trainer.json").read_text())
    assert trainer["layout"]["zero"] == 3 and trainer["layout"]["dp"] == 2


@pytest.mark.slow
def test_three_ranks_pad_every_buffer(zdata, tmp_path):
    """Flat buffers are 64-byte aligned per parameter (multiples of 16 elements): only a rank
    count that does not divide 16 pads them, here every one."""
    run = zero_runs(tmp_path / "r", "0,2,3", zdata, 3, "--accum", "1", "--micro-batch", "1")
    for stage in (2, 3):
        assert_same(run(stage), run(0), f"ZeRO-{stage} on 3 ranks")
        assert_model_state_matches_formula(run(stage), stage, 3)


@pytest.mark.slow
def test_every_stage_on_four_ranks_over_two_virtual_nodes_hierarchical(zdata, tmp_path):
    run = zero_runs(tmp_path / "r", "0:1,1:1,2:1,3:1,0:3,1:3,2:3,3:3", zdata, 4, "--hierarchical-allreduce",
                    hosts=["nodeA", "nodeB"], timeout=360)
    cfg = json.loads((run(3, "1") / "config.json").read_text())
    assert cfg["world"] == {**cfg["world"], "size": 4, "local_size": 2, "cross_size": 2}
    assert cfg["horovod_env"]["HOROVOD_HIERARCHICAL_ALLGATHER"] == "1"
    for accum in ("1", "3"):
        for stage in (1, 2, 3):
            assert_same(run(stage, accum), run(0, accum), f"ZeRO-{stage} accum {accum} on 2 nodes x 2 ranks")
    for stage in (0, 1, 2, 3):
        assert_model_state_matches_formula(run(stage, "1"), stage, 4)


@pytest.mark.slow
def test_stages_one_and_two_inside_pipeline_stages_with_the_tied_embedding(zdata, tmp_path):
    run = zero_runs(tmp_path / "r", "0,1,2", zdata, 4, "--pipeline-stages", "2", "--microbatches", "4",
                    "--n-layer", "4", "--schedule", "zbh1", "--eval-every", "5")
    for stage in (1, 2):  # zbh1: the weight gradients land in the deferred passes
        assert_same(run(stage), run(0), f"ZeRO-{stage} in P2 x D2 (zbh1)")
    ck = run(2) / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(f.name for f in ck.glob("zero-*.pt")) == [
        "zero-00000-00000.pt", "zero-00000-00001.pt", "zero-00001-00000.pt", "zero-00001-00001.pt"]


@pytest.mark.slow
def test_stages_compose_with_fp16_loss_scaling_recompute_and_wire_compression(zdata, tmp_path):
    run = zero_runs(tmp_path / "r", "0,1,2,3", zdata, 2, "--precision", "fp16", "--recompute",
                    "--grad-compression", "fp16", "--accum", "2")
    assert [r for r in records(run(3)) if "loss_scale" in r]
    for stage in (1, 2, 3):
        assert_same(run(stage), run(0), f"ZeRO-{stage} fp16 + recompute + fp16 wire")


@pytest.mark.slow
def test_stage_three_composes_with_compile(zdata, tmp_path):
    run = zero_runs(tmp_path / "r", "0,3", zdata, 2, "--compile", "--recompute", "--accum", "1")
    assert_same(run(3), run(0), "ZeRO-3 + compile + recompute")


def test_stage_three_with_pipeline_stages_is_one_line_error(zdata, tmp_path):
    r = run_train(["--data", str(zdata), "--out", str(tmp_path / "x"), "--steps", "1", "--zero-stage", "3",
                   "--pipeline-stages", "2", *COMMON], check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --zero-stage 3 does not combine with --pipeline-stages 2 (each stage's parameters would be "
        "gathered once per micro-batch); use --zero-stage 1 or 2 with stages"]
    r = run_train(["--data", str(zdata), "--out", str(tmp_path / "x"), "--steps", "1", "--zero-stage", "4",
                   *COMMON], check=False)
    assert r.returncode == 2 and "--zero-stage" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_checkpoints_reshard_across_stages_rank_counts_and_layouts(zdata, tmp_path):
    """ZeRO-2 on 4 ranks -> ZeRO-3 on 2 -> replicated on 1 -> ZeRO-1 in a 2-stage pipeline,
    each a quarter of the run, continue with the uninterrupted run's losses; export and
    generate read the sharded checkpoints."""
    common = ["--data", str(zdata), "--steps", "8", "--decay-steps", "8", "--ckpt-every", "2",
              *[a for a in COMMON if a not in ("--decay-steps", str(STEPS))]]
    ref = tmp_path / "ref"
    run_train(["--out", str(ref), "--accum", "4", *common])      # 1 process, global batch 8
    out = tmp_path / "run"

    def seg(np_, until, *extra):
        args = ["--out", str(out), *common, "--resume", "auto", *extra]
        args[args.index("--steps") + 1] = str(until)
        if np_ == 1:
            run_train(args)
        else:
            run_mpi(train_cmd(*args), np=np_, env=ENV, timeout=180).check()

    seg(4, 2, "--zero-stage", "2", "--accum", "1")
    seg(2, 4, "--zero-stage", "3", "--accum", "2")
    seg(1, 6, "--accum", "4")
    seg(2, 8, "--zero-stage", "1", "--pipeline-stages", "2", "--microbatches", "4")
    want = losses(ref)
    got = losses(out)
    assert len(got) == 8
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    got_p, want_p = final(out, 8), final(ref, 8)
    for name, w in want_p.items():
        torch.testing.assert_close(got_p[name], w, rtol=1e-4, atol=1e-6, msg=name)
    # the ZeRO-3 checkpoint of 2 ranks (step 4): its shards, exported and sampled from
    ck4 = out / "checkpoints" / "step-00000004"
    assert (ck4 / "zero-00000-00001.pt").is_file() and not list(ck4.glob("model-*.pt"))
    import subprocess

    from tests.train.conftest import REPO
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    exported = tmp_path / "model.pt"
    r = subprocess.run([sys.executable, "-m", "hpcllm", "export", str(ck4), "--out", str(exported)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = torch.load(exported, weights_only=True)
    state = obj.get("state_dict", obj.get("model", obj))
    for name, w in final(out, 4).items():
        torch.testing.assert_close(state[name], w, rtol=0, atol=0, msg=name)
    r = subprocess.run([sys.executable, "-m", "hpcllm", "generate", str(ck4), "--prompt", "the ",
                        "--max-new-tokens", "8", "--seed", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("the "), r.stderr


def test_a_missing_shard_file_is_one_line_error(zdata, tmp_path):
    out = tmp_path / "z"
    run_train(["--data", str(zdata), "--out", str(out), "--steps", "2", "--zero-stage", "2", *COMMON])
    ck = out / "checkpoints" / "step-00000002"
    from hpcllm.train.checkpoint import CheckpointReader

    assert set(CheckpointReader(ck).model_state()) == set(final(out, 2)) and (ck / "zero-00000-00000.pt").is_file()
    # a 2-rank checkpoint that lost rank 1's file cannot be resumed, exported or sampled from
    run_mpi(train_cmd("--data", str(zdata), "--out", str(tmp_path / "z2"), "--steps", "2", "--zero-stage", "1",
                      *COMMON), np=2, env=ENV, timeout=120).check()
    ck2 = tmp_path / "z2" / "checkpoints" / "step-00000002"
    (ck2 / "zero-00000-00001.pt").unlink()
    r = run_train(["--data", str(zdata), "--out", str(tmp_path / "z3"), "--steps", "4", "--resume", str(ck2),
                   *COMMON], check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert "is missing zero-00000-00001.pt" in line and str(ck2) in line and "ZeRO-1" in line
    r = run_train(["--data", str(zdata), "--out", str(tmp_path / "z4"), "--steps", "4", "--resume", str(ck2),
                   *COMMON], check=False)


@pytest.mark.slow
def test_a_rank_killed_inside_a_reduce_scatter_ends_the_job(zdata, tmp_path):
    res = run_mpi(train_cmd("--data", str(zdata), "--out", str(tmp_path / "k"), "--steps", "20",
                            "--zero-stage", "2", "--stall-check-s", "5", "--stall-shutdown-s", "20", *COMMON),
                  np=2, env={**ENV, "HPCLLM_TEST_KILL_IN_REDUCE_SCATTER": "11,1"}, timeout=150)
    assert not res.timed_out, "the job hung after a rank died inside a reduce-scatter"
    assert res.returncode != 0
    assert res.elapsed_s < 90, res.output()
    assert "step  3/20" in res.stdout  # it died mid-run (step 4: 3 units per step), not at startup
    assert "step  4/20" not in res.stdout and "step 20/20" not in res.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_under_srun_pmix_on_two_nodes(slurm_cluster, zdata, tmp_path):
    base = tmp_path / "s"
    slurm_cluster.run(["srun", "--mpi=pmix", "-N2", "--ntasks-per-node=1", sys.executable, str(SCRIPT), str(base),
                       "0,3", "--", "--data", str(zdata), "--steps", "4", "--ckpt-every", "0", *COMMON],
                      timeout=240, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])},
                      cwd=tmp_path)
    cfg = json.loads((Path(f"{base}-z3-ax") / "config.json").read_text())
    assert cfg["world"]["size"] == 2 and cfg["world"]["cross_size"] == 2
    assert losses(Path(f"{base}-z3-ax")) == losses(Path(f"{base}-z0-ax"))


@pytest.mark.slow
def test_under_horovodrun(zdata, tmp_path):
    import os
    import shutil
    import subprocess

    base = tmp_path / "h"
    # horovodrun sets the MCA interface parameters itself (--network-interface)
    mpi_args = "--oversubscribe --bind-to none" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    horovodrun = Path(sys.executable).with_name("horovodrun")
    cmd = [str(horovodrun if horovodrun.exists() else shutil.which("horovodrun")), "-np", "2", "-H", "localhost:2",
           "--mpi", "--network-interface", "lo", f"--mpi-args={mpi_args}", sys.executable, str(SCRIPT), str(base), "0,2", "--",
           "--data", str(zdata), "--steps", "4", "--ckpt-every", "0", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert losses(Path(f"{base}-z2-ax")) == losses(Path(f"{base}-z0-ax"))
    assert json.loads((Path(f"{base}-z2-ax") / "config.json").read_text())["world"]["size"] == 2
