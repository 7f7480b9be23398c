"""Rank script for test_tensor_parallel: count the tensor-parallel all-reduces of one forward
and backward of a sharded GPT, and check the vocabulary-parallel loss against F.cross_entropy
on the gathered logits (with its gradient), under mpirun -np 2."""
import json
import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI

from hpcllm.model.gpt import GPT, GPTConfig
from hpcllm.parallel.tensor_parallel import TPComm, apply_tensor_parallel, gather_full, vocab_parallel_loss

out = sys.argv[1]
comm = MPI.COMM_WORLD
tp = TPComm(comm)
cfg = GPTConfig(n_layer=3, n_head=4, d_model=32, seq_len=16, vocab_size=257)
m = GPT(cfg, init_seed=1)
specs = apply_tensor_parallel(m, tp, cfg)
x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
loss = m(x, x)
loss.backward()
counts = dict(tp.calls)
whole = GPT(cfg, init_seed=1)
ref_loss = whole(x, x)
ref_loss.backward()
ref_loss = float(ref_loss)


def grad_diff(model, specs, partial=False):
    """Max difference of the gathered gradients from the whole model's (Adam hides a wrong
    gradient scale from the losses; this does not)."""
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if partial:  # sequence parallel: replicated parameters' gradients are per-chunk shares
        for n, g in grads.items():
            if n not in specs:
                comm.Allreduce(MPI.IN_PLACE, g.numpy(), op=MPI.SUM)
    full = gather_full(grads, specs, comm)
    full = comm.bcast(full, root=0)
    return max(float((full[n] - p.grad).abs().max()) for n, p in whole.named_parameters())


tp_grad_diff = grad_diff(m, specs)

# the same under sequence parallelism
tp_sp = TPComm(comm)
m_sp = GPT(cfg, init_seed=1)
sp_specs = apply_tensor_parallel(m_sp, tp_sp, cfg, sequence_parallel=True)
sp_loss = m_sp(x, x)
sp_loss.backward()
sp_counts = dict(tp_sp.calls)
sp_grad_diff = grad_diff(m_sp, sp_specs, partial=True)

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
res = {"n_layer": cfg.n_layer, "calls": counts, "sp_calls": sp_counts,
       "sp_loss_diff": abs(float(sp_loss) - ref_loss), "tp_grad_diff": tp_grad_diff, "sp_grad_diff": sp_grad_diff,
       "tp_loss_diff": abs(float(loss) - ref_loss),
       "loss_diff": abs(float(lp) - float(ref)),
       "grad_diff": float((local.grad - ref_in.grad[:, r * V // T:(r + 1) * V // T]).abs().max()),
       "loss_peak_bytes": peak, "full_logits_bytes": full.numel() * 4}
with open(f"{out}/counts-{r}.json", "w") as f:
    json.dump(res, f)
