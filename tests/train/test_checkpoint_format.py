"""The checkpoint format's pure pieces: optimizer state keyed by parameter name survives a
change of partition; the reader finds each tensor in whichever file holds it, for version-2
files of any layout and version-1 files alike."""
import pytest
import torch

from hpcllm.config import OptimizerConfig
from hpcllm.errors import HpcllmError
from hpcllm.model.gpt import GPT, GPTConfig
from hpcllm.parallel.pipeline.partition import Partition
from hpcllm.parallel.pipeline.stage import PipelineStage
from hpcllm.train import checkpoint as ckpt
from hpcllm.train.setup import build_optimizer

CFG = GPTConfig(n_layer=4, n_head=2, d_model=16, seq_len=8, vocab_size=100)


def _stepped(module):
    opt = build_optimizer(module.named_parameters(), OptimizerConfig())
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_named_optimizer_state_moves_with_parameters():
    old = [PipelineStage(CFG, Partition.from_counts([2, 2]), s, seed=1) for s in range(2)]
    saved = {}
    for st in old:
        saved.update(ckpt.named_optim_state(_stepped(st), st.named_parameters())["state"])
    # a new partition 1,3: stage 1 now holds block 1 too; its state follows it by name
    new = PipelineStage(CFG, Partition.from_counts([1, 3]), 1, seed=1)
    opt = build_optimizer(new.named_parameters(), OptimizerConfig())
    ckpt.load_named_optim_state(opt, new.named_parameters(), saved, "cpu")
    by_name = dict(new.named_parameters())
    got = opt.state[by_name["blocks.1.attn.qkv.weight"]]
    assert torch.equal(got["exp_avg"], saved["blocks.1.attn.qkv.weight"]["exp_avg"])
    assert torch.equal(opt.state[by_name["wte.weight"]]["exp_avg_sq"], saved["wte.weight"]["exp_avg_sq"])
    assert len(opt.state) == len(by_name)


def test_excluded_names_are_left_out():
    st = PipelineStage(CFG, Partition.from_counts([2, 2]), 1, seed=1)
    named = ckpt.named_optim_state(_stepped(st), st.named_parameters(), exclude={"wte.weight"})
    assert "wte.weight" not in named["state"] and "blocks.3.mlp.fc.weight" in named["state"]
    assert all("wte.weight" not in g["names"] for g in named["param_groups"])


def _write(d, files):
    d.mkdir(parents=True)
    for name, obj in files.items():
        (ckpt._save_json if name.endswith(".json") else ckpt._save_torch)(obj, d / name)


def test_reader_takes_each_name_from_the_file_holding_it(tmp_path):
    whole = GPT(CFG, init_seed=2)
    opt = _stepped(whole)
    full = ckpt.named_optim_state(opt, whole.named_parameters())["state"]
    sd = whole.state_dict()
    # two owners that split the names arbitrarily, as a layout's writers would
    names = sorted(sd)
    a, b = set(names[::2]), set(names[1::2])
    d = tmp_path / "step-00000001"
    _write(d, {"model-00000.pt": {k: sd[k] for k in a}, "model-00001.pt": {k: sd[k] for k in b},
               "optim-00000.pt": {"format": ckpt.OPTIM_FORMAT, "state": {k: full[k] for k in a if k in full},
                                  "param_groups": []},
               "optim-00001.pt": {"format": ckpt.OPTIM_FORMAT, "state": {k: full[k] for k in b if k in full},
                                  "param_groups": []},
               "trainer.json": {"format": ckpt.FORMAT, "version": 2, "step": 1, "layout": {"pp": 1, "dp": 2}},
               "config.json": {"model": CFG.to_dict()}})
    assert ckpt.is_complete(d)
    r = ckpt.CheckpointReader(d)
    assert r.names() == set(names)
    got = r.model_state()
    assert all(torch.equal(got[k], sd[k]) for k in names)
    some = {"blocks.2.attn.qkv.weight", "ln_f.bias"}
    assert set(r.optim_state(some)) == some
    assert torch.equal(r.optim_state(some)["ln_f.bias"]["exp_avg"], full["ln_f.bias"]["exp_avg"])
    (d / "model-00001.pt").unlink()
    with pytest.raises(HpcllmError, match="data-parallel checkpoint lacks"):
        ckpt.CheckpointReader(d).model_state(names)


def test_reader_of_a_version_1_data_parallel_checkpoint(tmp_path):
    # model.pt + optim.pt indexed in build_optimizer's order (matrices, then the rest)
    whole = GPT(CFG, init_seed=2)
    opt = _stepped(whole)
    d = tmp_path / "step-00000001"
    _write(d, {"model.pt": whole.state_dict(), "optim.pt": opt.state_dict(),
               "trainer.json": {"step": 1, "world_size": 2}, "config.json": {"model": CFG.to_dict()}})
    r = ckpt.CheckpointReader(d)
    assert r.version == 1 and r.layout() == {"pp": 1, "dp": 2}
    state = r.optim_state([n for n, _ in whole.named_parameters()])
    by_name = dict(whole.named_parameters())
    for n, s in state.items():
        assert torch.equal(s["exp_avg"], opt.state[by_name[n]]["exp_avg"]), n
    assert len(state) == len(by_name)
