"""Rank script for test_tensor_parallel: count the tensor-parallel all-reduces of one forward
and backward of a sharded GPT, and check the vocabulary-parallel loss against F.cross_entropy
on the gathered logits (with its gradient), under mpirun -np 2."""
import json
import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI

from hpcllm.model.gpt import GPT, GPTConfig
from hpcllm.parallel.tensor_parallel import TPComm, apply_tensor_parallel, vocab_parallel_loss

out = sys.argv[1]
comm = MPI.COMM_WORLD
tp = TPComm(comm)
cfg = GPTConfig(n_layer=3, n_head=4, d_model=32, seq_len=16, vocab_size=257)
m = GPT(cfg, init_seed=1)
apply_tensor_parallel(m, tp, cfg)
x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
loss = m(x, x)
loss.backward()
counts = dict(tp.calls)

# the loss alone: local logits -> loss == F.cross_entropy of the gathered logits
V, T, r = cfg.padded_vocab, comm.Get_size(), comm.Get_rank()
g = torch.Generator().manual_seed(3)
full = torch.randn(512, V, generator=g, dtype=torch.float32) * 3
targets = torch.randint(0, 257, (512,), generator=g)
local = full[:, r * V // T:(r + 1) * V // T].clone().requires_grad_(True)
lp = vocab_parallel_loss(TPComm(comm), r * V // T)(local, targets)
# what the loss keeps between forward and backward (its memory beyond the input logits)
peak = sum(t.numel() * t.element_size() for t in lp.grad_fn.saved_tensors)
lp.backward()
ref_in = full.clone().requires_grad_(True)
ref = F.cross_entropy(ref_in, targets)
ref.backward()
res = {"n_layer": cfg.n_layer, "fwd": counts.get("fwd", 0), "bwd": counts.get("bwd", 0),
       "loss_diff": abs(float(lp) - float(ref)),
       "grad_diff": float((local.grad - ref_in.grad[:, r * V // T:(r + 1) * V // T]).abs().max()),
       "loss_peak_bytes": peak, "full_logits_bytes": full.numel() * 4}
with open(f"{out}/counts-{r}.json", "w") as f:
    json.dump(res, f)
