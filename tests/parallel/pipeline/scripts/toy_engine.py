"""Run under mpirun: a toy P-stage pipeline against the same model in one process.

Every rank builds the whole toy model (it is tiny) with the same seed, runs its own stage
through the engine and reports its stage's gradients next to the single-process ones.
Also sends bf16/fp16 tensors through a Channel and reports whether the bits arrived intact,
and checks the engine's ``last_backward`` context: entered once per step around the backward
in which every parameter's gradient reaches its final value (what the trainer's DP overlap
needs), and under zero-bubble schedules a second time, around the last weight-gradient pass.
"""
import argparse
import contextlib
import sys

import torch
from mpi4py import MPI

from hpcllm.parallel.pipeline.engine import PipelineEngine
from hpcllm.parallel.pipeline.transport import Channel
from tests.cluster.mpi import report

p = argparse.ArgumentParser()
p.add_argument("--schedule", default="1f1b")
p.add_argument("--microbatches", type=int, default=4)
p.add_argument("--die-at", type=int, default=-1, help="this rank os._exit(3)s in its 2nd step")
p.add_argument("--die-how", default="exit", choices=["exit", "kill"])
p.add_argument("--hang", type=int, default=-1, help="this rank stops communicating")
p.add_argument("--timeout", type=float, default=60)
a = p.parse_args()

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
torch.manual_seed(0)
D, B, M = 16, 3, a.microbatches
# each stage ends in a bare Linear: the activation gradient a stage receives (a buffer of the
# engine's receive ring) is then exactly that layer's output gradient, what a deferred weight
# pass keeps for later (it must not see the buffer reused by the next message)
layers = [torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh()) if i % 2 == 0 else torch.nn.Linear(D, D)
          for i in range(2 * P)]
full = torch.nn.Sequential(*layers)
xs = [torch.randn(B, D) for _ in range(M)]
ys = [torch.randn(B, D) for _ in range(M)]

# single-process reference: mean loss over micro-batches, gradients accumulated
ref_loss = 0.0
for x, y in zip(xs, ys):
    loss = torch.nn.functional.mse_loss(full(x), y)
    (loss / M).backward()
    ref_loss += loss.item() / M
ref_grads = [p.grad.clone() for p in full[2 * rank:2 * rank + 2].parameters()]
full.zero_grad()


class Stage(torch.nn.Module):
    def __init__(self, mods, last):
        super().__init__()
        self.mods, self.last = torch.nn.Sequential(*mods), last

    def forward(self, x, y=None):
        out = self.mods(x)
        return torch.nn.functional.mse_loss(out, y) if self.last else out


stage = Stage(layers[2 * rank:2 * rank + 2], rank == P - 1)
eng = PipelineEngine(stage, comm, rank, P, a.schedule, M, (B, D), torch.float32, timeout=a.timeout)
batches = list(zip(xs, ys))
losses = []

# post-accumulate hooks armed only inside last_backward record each gradient as they see it
entered, seen = [], {}
armed = [False]


@contextlib.contextmanager
def last_backward():
    entered.append(True)
    armed[0] = True
    try:
        yield
    finally:
        armed[0] = False


for n, prm in stage.named_parameters():
    prm.register_post_accumulate_grad_hook(
        lambda q, n=n: seen.__setitem__(n, seen.get(n, 0) + 1) if armed[0] else None)
    prm.register_post_accumulate_grad_hook(  # in which entry of last_backward it became final
        lambda q, n=n: seen.__setitem__(n + ".entry", len(entered)) if armed[0] else None)
    prm.register_post_accumulate_grad_hook(
        lambda q, n=n: seen.__setitem__(n + ".grad", q.grad.clone()) if armed[0] else None)
for step in range(2):
    if step == 1 and rank == a.die_at:
        import os
        import signal
        if a.die_how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    if step == 1 and rank == a.hang:
        import time
        time.sleep(3600)
    try:
        losses.append(eng.step(batches, last_backward=last_backward if step == 0 else None))
    except Exception as e:  # what the trainer does: never leave the peers hanging
        print(f"rank {rank}: {e}", file=sys.stderr, flush=True)
        comm.Abort(4)
    if step == 0:
        grads = [p.grad.clone() for p in stage.parameters()]
        # every gradient seen once, inside a last_backward, already at its final value
        entry_of = {n: seen.get(n + ".entry") for n, _ in stage.named_parameters()}
        hook_ok = len(entered) == len(eng.final_passes) and all(
            seen.get(n) == 1 and torch.equal(seen[n + ".grad"], p.grad) for n, p in stage.named_parameters())
        stage.zero_grad()
comm.Barrier()

# raw 16-bit transport: values that would not survive a float32 round trip through numpy
bits_ok = {}
if P >= 2 and rank < 2:
    for dt in (torch.bfloat16, torch.float16):
        if rank == 0:
            ch = Channel(comm, 1, (5, 7), dt, "cpu", tag_base=100, slots=2)
            g = torch.Generator().manual_seed(1)
            for mb in range(3):
                ch.send(torch.randn(5, 7, generator=g).to(dt) * (mb + 1), mb)
            ch.flush()
        else:
            ch = Channel(comm, 0, (5, 7), dt, "cpu", tag_base=100, slots=2)
            ch.expect(range(3))
            g = torch.Generator().manual_seed(1)
            ok = True
            for mb in range(3):
                want = torch.randn(5, 7, generator=g).to(dt) * (mb + 1)
                got = ch.recv(mb)
                ok &= got.dtype == dt and torch.equal(got.view(torch.int16), want.view(torch.int16))
                ch.release(mb)
            bits_ok[str(dt)] = bool(ok)

report({
    "losses": losses, "ref_loss": ref_loss,
    "max_grad_diff": max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)),
    "peak_live": eng.stats.peak_live, "bits_ok": bits_ok, "last_backward_ok": hook_ok,
    "final_in_entry": entry_of, "final_passes": len(eng.final_passes),
})
