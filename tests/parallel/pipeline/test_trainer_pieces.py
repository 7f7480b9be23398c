"""Pure pieces of the pipeline trainer: which stage files a resume reads, optimizer state
keyed by parameter name surviving a change of partition."""
import torch

from hpcllm.config import OptimizerConfig
from hpcllm.model.gpt import GPTConfig
from hpcllm.parallel.pipeline.partition import Partition
from hpcllm.parallel.pipeline.stage import PipelineStage
from hpcllm.parallel.pipeline.trainer import load_named_optim_state, named_optim_state, stage_files_to_read
from hpcllm.train.trainer import build_optimizer


def test_stage_files_to_read():
    saved = Partition.from_counts([2, 2, 2])
    assert stage_files_to_read(saved, {"blocks.3.ln_1.weight"}) == [1]
    assert stage_files_to_read(saved, {"wte.weight", "wpe.weight", "blocks.0.ln_1.weight"}) == [0, 2]
    # the last stage's file first when the final norm is wanted: it also has the tied matrix
    assert stage_files_to_read(saved, {"ln_f.weight", "wte.weight", "blocks.5.ln_1.bias"})[0] == 2


def test_named_optimizer_state_moves_with_parameters():
    cfg = GPTConfig(n_layer=4, n_head=2, d_model=16, seq_len=8, vocab_size=100)
    ocfg = OptimizerConfig()
    old = [PipelineStage(cfg, Partition.from_counts([2, 2]), s, seed=1) for s in range(2)]
    saved = {}
    for st in old:
        opt = build_optimizer(st.named_parameters(), ocfg)
        for p in st.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        saved.update(named_optim_state(opt, st)["state"])
    # a new partition 1,3: stage 1 now holds block 1 too; its state follows it by name
    new = PipelineStage(cfg, Partition.from_counts([1, 3]), 1, seed=1)
    opt = build_optimizer(new.named_parameters(), ocfg)
    mine = {n for n, _ in new.named_parameters()}
    groups = named_optim_state(build_optimizer(old[1].named_parameters(), ocfg), old[1])["param_groups"]
    load_named_optim_state(opt, new, {"state": {k: v for k, v in saved.items() if k in mine},
                                      "param_groups": groups}, "cpu")
    by_name = dict(new.named_parameters())
    got = opt.state[by_name["blocks.1.attn.qkv.weight"]]
    assert torch.equal(got["exp_avg"], saved["blocks.1.attn.qkv.weight"]["exp_avg"])
    assert torch.equal(opt.state[by_name["wte.weight"]]["exp_avg_sq"], saved["wte.weight"]["exp_avg_sq"])
    assert len(opt.state) == len(mine)
