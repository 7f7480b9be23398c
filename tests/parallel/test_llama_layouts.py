"""The Llama-style model (RMSNorm, SwiGLU, grouped-query attention, untied head) trains alike
in every layout: one process with accumulation 2 == 2 data-parallel ranks == a 2-stage ZB-H1
pipeline (the untied head's weight gradient deferred like every linear) == ZeRO-3 on 2 ranks,
under real mpirun (fp32: losses within 1e-5 relative, final weights within 1e-4)."""
import pytest
import torch

from tests.cluster.mpi import run_mpi
from tests.train.conftest import build_dataset, ckpt_model, losses, run_train, train_cmd

pytestmark = [pytest.mark.mpi]
STEPS = 4
LLAMA = ["--model", "llama-tiny", "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--d-model", "32",
         "--seq-len", "32", "--threads", "1", "--precision", "fp32", "--warmup", "2", "--decay-steps", str(STEPS),
         "--lr", "3e-3", "--log-every", "1", "--micro-batch", "2", "--steps", str(STEPS), "--ckpt-every", "0",
         "--eval-every", "0", "--seed", "4"]
ENV = {"OMP_NUM_THREADS": "1", "HPCLLM_PIPELINE_TIMEOUT": "60"}


@pytest.fixture(scope="module")
def ldata(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("llama") / "ds", n_docs=200)


@pytest.fixture(scope="module")
def reference(ldata, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-ref") / "run"
    run_train(["--data", str(ldata), "--out", str(out), "--accum", "2", *LLAMA])
    return out


def _same(run, ref):
    la, lb = losses(run), losses(ref)
    assert sorted(la) == list(range(1, STEPS + 1)) == sorted(lb)
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-5), (s, la[s], lb[s])
    final = lambda r: ckpt_model(r / "checkpoints" / f"step-{STEPS:08d}")  # noqa: E731
    got, want = final(run), final(ref)
    assert set(got) == set(want) and "lm_head.weight" in want
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-6, msg=k)


@pytest.mark.parametrize("layout", ["dp2", "pp2-zbh1", "zero3"])
def test_llama_layout_equals_one_process(ldata, reference, tmp_path, layout):
    extra = {"dp2": ["--accum", "1"],
             "pp2-zbh1": ["--pipeline-stages", "2", "--schedule", "zbh1", "--microbatches", "2"],
             "zero3": ["--accum", "1", "--zero-stage", "3"]}[layout]
    out = tmp_path / layout
    run_mpi(train_cmd("--data", str(ldata), "--out", str(out), *LLAMA, *extra), np=2, env=ENV, timeout=180).check()
    _same(out, reference)
    if layout != "dp2":  # the stage files / ZeRO shards leave as one transformers model
        transformers = pytest.importorskip("transformers")
        from hpcllm.infer.generate import load_model
        from hpcllm.interop.hf_export import export_hf

        export_hf(out, tmp_path / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
        ours = load_model(out).model
        x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert (ours(x) - hf(x).logits).abs().max().item() < 1e-5
