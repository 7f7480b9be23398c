"""Checkpoints across devices: a checkpoint written by a CUDA run holds CPU tensors that load
onto CUDA and back bit for bit, and resumes on the CPU and on CUDA to the same next step; a
CPU-written checkpoint resumes on CUDA (every direction, through `hpcllm train --resume`)."""
import json
import shutil

import pytest
import torch

from hpcllm.model.gpt import GPT, GPTConfig
from tests.train.conftest import TINY, ckpt_model, ckpt_optim, losses, run_train

pytestmark = pytest.mark.cuda


def _args(data, out, steps, device):
    return [*TINY, "--data", str(data), "--out", str(out), "--steps", str(steps), "--device", device,
            "--ckpt-every", "1", "--keep-checkpoints", "10", "--micro-batch", "4"]


def _resume(src, dst, data, steps, device):
    shutil.copytree(src, dst)
    run_train([*_args(data, dst, steps, device), "--resume", "auto"])
    return dst


def _close_states(a: dict, b: dict, atol=1e-4, rtol=1e-3):
    assert set(a) == set(b) and a
    for k in a:
        assert a[k].device.type == "cpu" and b[k].device.type == "cpu"
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


def _close_optim(a: dict, b: dict):
    assert set(a) == set(b) and a
    for name in a:
        assert set(a[name]) == set(b[name]), name
        for key, v in a[name].items():
            if torch.is_tensor(v):
                assert v.device.type == "cpu", (name, key)
                torch.testing.assert_close(v.float(), b[name][key].float(), atol=1e-4, rtol=1e-3,
                                           msg=lambda m, n=name, k=key: f"{n}.{k}: {m}")
            else:
                assert v == b[name][key], (name, key)


def test_checkpoints_move_between_cuda_and_cpu(cuda_dataset, tmp_path):
    gpu = tmp_path / "gpu"
    run_train(_args(cuda_dataset, gpu, 3, "cuda"))
    ck3 = gpu / "checkpoints" / "step-00000003"
    state = ckpt_model(ck3)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())

    # the tensors load onto CUDA and come back bit for bit
    cfg = GPTConfig(**json.loads((gpu / "config.json").read_text())["model"])
    m = GPT(cfg, init_seed=None).to("cuda")
    m.load_state_dict(state)
    assert all(p.device.type == "cuda" for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v.cpu(), state[k]), k

    # the CUDA checkpoint resumes on the CPU and on CUDA: the same 4th step (to rounding)
    on_cpu = _resume(gpu, tmp_path / "cuda-to-cpu", cuda_dataset, 4, "cpu")
    on_gpu = _resume(gpu, tmp_path / "cuda-to-cuda", cuda_dataset, 4, "cuda")
    la, lb = losses(on_cpu), losses(on_gpu)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    assert la[4] == pytest.approx(lb[4], rel=1e-4)
    _close_states(ckpt_model(on_cpu / "checkpoints" / "step-00000004"),
                  ckpt_model(on_gpu / "checkpoints" / "step-00000004"))
    _close_optim(ckpt_optim(on_cpu / "checkpoints" / "step-00000004"),
                 ckpt_optim(on_gpu / "checkpoints" / "step-00000004"))
    ta = json.loads((on_cpu / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    tb = json.loads((on_gpu / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert ta["loader"] == tb["loader"] and ta["step"] == tb["step"] == 4

    # and back: the CPU-written step 4 resumes on CUDA, the CUDA-written one on the CPU
    back_gpu = _resume(on_cpu, tmp_path / "cpu-to-cuda", cuda_dataset, 5, "cuda")
    back_cpu = _resume(on_gpu, tmp_path / "cuda-to-cpu-2", cuda_dataset, 5, "cpu")
    assert losses(back_gpu)[5] == pytest.approx(losses(back_cpu)[5], rel=1e-4)
    _close_states(ckpt_model(back_gpu / "checkpoints" / "step-00000005"),
                  ckpt_model(back_cpu / "checkpoints" / "step-00000005"))
