"""The pipeline-parallel training loop: P stages x D data-parallel replicas.

Rank layout: ``world = P x D``, ``rank = dp_index * P + stage``, so a pipeline's stages are
consecutive ranks (block distribution packs them within a node) and the D replicas of a
stage are P ranks apart (spanning nodes).  One optimizer step, on every rank::

    stage 0 and the last stage read the step's batch: the loader with accum=M,
        dp_rank=dp_index, dp_size=D, i.e. exactly the batches of `--accum M` without stages
    engine.step: the schedule's forwards/backwards over M micro-batches, p2p between stages;
        DP, overlapped: during the stage's last backward each parameter's gradient, once
        final, starts its async in-place Horovod allreduce (Average over the stage's D
        replicas, one process set per stage; fp16-compressed with --grad-compression fp16)
    wait for the DP allreduces (polling their handles); no-op with D = 1
    tied embedding: first and last stage sum their copies' (averaged) gradients (2-rank
        allreduce; averaging over D and summing over the pair commute)
    unscale (fp16); one world allreduce: squared grad norm (each stage counted once, the
        tied matrix once), loss (from the last stage), non-finite flags, stop requests,
        per stage the share of DP allreduces overlapped with the backward (dp_overlap)
    same decisions everywhere: fail on NaN loss, skip on fp16 overflow, else clip with the
        global norm and step; LR schedule, metrics, eval, checkpoints as in DP training

The device/precision setup, optimizer, LR schedule, loss scaler, metrics, checkpoint
protocol and stop requests are the DP trainer's (:mod:`hpcllm.train.trainer`), reused.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from hpcllm import exitcodes
from hpcllm.config import TrainConfig, effective_config, resolve_model
from hpcllm.errors import HpcllmError
from hpcllm.parallel.pipeline.partition import Partition, make_partition
from hpcllm.parallel.pipeline.stage import TIED, PipelineStage, activation_dtype
from hpcllm.parallel.watchdog import Watchdog
from hpcllm.train import checkpoint as ckpt


@dataclass
class PipelineLayout:
    """Where this rank sits: ``stage`` of ``stages`` in pipeline replica ``dp_index`` of ``D``,
    and the communicators: ``pipe`` (this replica's stages, rank = stage), ``dp`` (this stage's
    replicas, rank = dp_index) and ``tie`` (first and last stage of this replica, or None)."""

    rank: int
    world: int
    stages: int
    dp_size: int
    stage: int
    dp_index: int
    comm: object
    pipe: object
    dp: object
    tie: object

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def stage_ranks(self, stage: int) -> list[int]:
        """World ranks holding ``stage`` (one per replica)."""
        return [d * self.stages + stage for d in range(self.dp_size)]


def make_layout(comm, stages: int) -> PipelineLayout:
    from mpi4py import MPI

    world, rank = comm.Get_size(), comm.Get_rank()
    if stages < 2:
        raise HpcllmError(f"--pipeline-stages {stages}: a pipeline needs at least 2 stages")
    if world < stages:
        raise HpcllmError(f"--pipeline-stages {stages}: needs at least {stages} ranks, one per stage "
                          f"(e.g. mpirun -np {stages} or srun -n {stages}); this job has {world}")
    if world % stages:
        raise HpcllmError(f"--pipeline-stages {stages}: {world} ranks are not a multiple of {stages} "
                          f"(world = stages x data-parallel replicas)")
    stage, dp_index = rank % stages, rank // stages
    pipe = comm.Split(color=dp_index, key=stage)
    dp = comm.Split(color=stage, key=dp_index)
    in_tie = stage in (0, stages - 1)
    tie = comm.Split(color=dp_index if in_tie else MPI.UNDEFINED, key=stage)
    return PipelineLayout(rank, world, stages, world // stages, stage, dp_index, comm, pipe, dp,
                          tie if in_tie else None)


# --------------------------------------------------------------------------- data parallel


class StageAllreduce:
    """Averages a stage's gradients over its D replicas with Horovod, one process set per
    stage (built from the layout's DP groups; Horovod goes hierarchical across nodes when
    HOROVOD_HIERARCHICAL_ALLREDUCE is set), overlapped with the stage's last backward pass.

    Each trainable parameter gets a ``register_post_accumulate_grad_hook`` that is armed
    only inside :meth:`overlap` (the engine's ``last_backward`` context): when the last
    micro-batch's backward has accumulated a parameter's final gradient, the hook starts its
    asynchronous in-place allreduce (op Average, named ``hpcllm.pp.grad.<parameter name>``
    on every replica; Horovod matches tensors by name and fuses those ready in the same
    cycle), while autograd goes on with the earlier layers.  :meth:`finish` then starts any
    gradient the hooks did not see, polls every handle to completion and, with
    ``compression="fp16"``, writes the decompressed averages back into ``.grad``
    (``hvd.Compression.fp16``: compress before the allreduce, decompress after).

    With D = 1 it does nothing: no hooks, no Horovod (not even initialised)."""

    def __init__(self, layout: PipelineLayout, pcfg, named_params=(), compression: str = "none"):
        self.hvd = None
        self.process_set = None
        self.compression = None
        #: in flight this step: name -> (handle, parameter, tensor on the wire, compression ctx)
        self.inflight: dict = {}
        self.armed = False
        #: of the last step: allreduces started inside the last backward, of those the ones
        #: already complete when it ended, all started, and seconds :meth:`finish` waited
        self.started_in_backward = self.done_in_backward = self.started = 0
        self.wait_s = 0.0
        if layout.dp_size == 1:
            return
        try:
            import horovod.torch as hvd
        except ImportError:
            raise HpcllmError(f"{layout.dp_size} pipeline replicas need Horovod (scripts/install.sh builds it)") from None
        self.hvd = hvd
        self.process_set = self._process_set(hvd, layout, pcfg)
        self.compression = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in self.params]

    @staticmethod
    def _process_set(hvd, layout: PipelineLayout, pcfg):
        from hpcllm.parallel.data_parallel import horovod_env

        mine = layout.stage_ranks(layout.stage)
        if hvd.is_initialized():  # a second run in this process: reuse its process set if it has ours
            from horovod.common.process_sets import _init_process_sets

            ps = hvd.ProcessSet(mine)
            try:
                _init_process_sets([ps])  # looks the ranks up among the registered sets
            except KeyError:
                ps = None
            if ps is not None and ps.process_set_id is not None:
                return ps
            hvd.shutdown()
        os.environ.update(horovod_env(pcfg))
        sets = [hvd.ProcessSet(layout.stage_ranks(s)) for s in range(layout.stages)]
        hvd.init(process_sets=sets)
        return sets[layout.stage]

    # ---- during the last backward
    @contextlib.contextmanager
    def overlap(self):
        """The engine's ``last_backward``: gradient hooks start allreduces while inside."""
        if self.hvd is None:
            yield
            return
        self.armed = True
        try:
            yield
        finally:
            self.armed = False
            self.started_in_backward = len(self.inflight)
            self.done_in_backward = sum(1 for h, *_ in self.inflight.values() if self.hvd.poll(h))

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.armed:
                self._start(name, p)
        return hook

    def _start(self, name: str, p: torch.Tensor) -> None:
        if name in self.inflight:  # a second accumulation after the allreduce began
            raise RuntimeError(f"gradient of {name} accumulated twice in the last backward pass")
        g = p.grad
        wire, ctx = self.compression.compress(g if g.is_contiguous() else g.contiguous())
        handle = self.hvd.allreduce_async_(wire, name=f"hpcllm.pp.grad.{name}", op=self.hvd.Average,
                                           process_set=self.process_set)
        self.inflight[name] = (handle, p, wire, ctx)

    # ---- after the engine's step
    def finish(self) -> None:
        """Every gradient averaged over the replicas, in ``.grad``, when this returns."""
        if self.hvd is None:
            return
        t0 = time.perf_counter()
        for name, p in self.params:  # gradients the hooks missed, in the same order everywhere
            if p.grad is not None and name not in self.inflight:
                self._start(name, p)
        self.started = len(self.inflight)
        from hpcllm.parallel.data_parallel import wait_handle

        for handle, p, wire, ctx in self.inflight.values():
            wait_handle(self.hvd, handle)  # rather than hvd.synchronize's 1 ms sleeps
            out = self.compression.decompress(self.hvd.synchronize(handle), ctx)
            if out is not p.grad:  # compressed or made contiguous: write the average back
                p.grad.copy_(out)
        self.inflight.clear()
        self.wait_s = time.perf_counter() - t0


def _np(t: torch.Tensor):
    """A numpy view for mpi4py collectives (CPU, fp32/fp64)."""
    return t.detach().numpy()


def sum_tied_grad(layout: PipelineLayout, stage: PipelineStage) -> None:
    """First and last stage add their copies' gradients, so both hold the whole model's."""
    p = stage.tied_parameter()
    if layout.tie is None or p is None:
        return
    from mpi4py import MPI

    if p.grad is None:
        p.grad = torch.zeros_like(p)
    g = p.grad
    host = g if g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) else g.float().cpu()
    layout.tie.Allreduce(MPI.IN_PLACE, _np(host), op=MPI.SUM)
    if host is not g:
        g.copy_(host)


# --------------------------------------------------------------------------- optimizer state by name


def named_optim_state(optimizer, stage: PipelineStage) -> dict:
    """The optimizer state keyed by parameter name, so a checkpoint can be reloaded under a
    different partition (a parameter moving to another stage takes its state along)."""
    names = {id(p): n for n, p in stage.named_parameters()}
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"names": [order[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"format": "hpcllm-named-optim", "state": state, "param_groups": groups}


def load_named_optim_state(optimizer, stage: PipelineStage, named: dict, device) -> None:
    names = {id(p): n for n, p in stage.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    state = {index[n]: s for n, s in named["state"].items() if n in index}
    sd = optimizer.state_dict()
    saved_groups = named["param_groups"]
    for g, sg in zip(sd["param_groups"], saved_groups):
        for k, v in sg.items():
            if k not in ("names", "params"):
                g[k] = v
    sd["state"] = state
    optimizer.load_state_dict(sd)
    for s in optimizer.state.values():
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(device)


# --------------------------------------------------------------------------- checkpoints


def stage_files_to_read(saved: Partition, wanted: set[str]) -> list[int]:
    """Saved stages whose files hold any of ``wanted`` (names of the whole model), the last
    stage first when the final norm is wanted (it also holds the tied matrix)."""
    need = []
    last = saved.stages - 1
    blocks = {int(n.split(".")[1]) for n in wanted if n.startswith("blocks.")}
    for s in range(saved.stages):
        hit = any(b in saved.blocks(s) for b in blocks)
        if s == 0 and any(n.startswith(("wte.", "wpe.")) for n in wanted):
            hit = True
        if s == last and any(n.startswith(("ln_f.", "wte.")) for n in wanted):
            hit = True
        if hit:
            need.append(s)
    if any(n.startswith("ln_f.") for n in wanted) and last in need:
        need.remove(last)
        need.insert(0, last)
    return need


def load_stage_checkpoint(resume_dir: Path, saved: Partition, stage: PipelineStage, optimizer, device) -> None:
    """Fill this stage's parameters and optimizer state from a pipeline checkpoint, whatever
    partition it was saved with, reading only the stage files that hold them."""
    wanted = {n for n, _ in stage.named_parameters()}
    model_sd, optim_state, groups = {}, {}, None
    for s in stage_files_to_read(saved, wanted):
        if not wanted - set(model_sd):
            break
        part = ckpt.load_torch(resume_dir / f"model-stage{s}.pt", map_location="cpu")
        take = {k: v for k, v in part.items() if k in wanted and k not in model_sd}
        model_sd.update(take)
        named = ckpt.load_torch(resume_dir / f"optim-stage{s}.pt", map_location="cpu")
        optim_state.update({k: v for k, v in named["state"].items() if k in take})
        groups = groups or named["param_groups"]
    missing = wanted - set(model_sd)
    if missing:
        raise HpcllmError(f"{resume_dir}: the checkpoint lacks {sorted(missing)[:3]} for stage {stage.stage}")
    stage.load_state_dict(model_sd)
    load_named_optim_state(optimizer, stage, {"state": optim_state, "param_groups": groups}, device)


def load_dp_checkpoint(resume_dir: Path, gpt_cfg, stage: PipelineStage, optimizer, device) -> None:
    """Continue a data-parallel run as a pipeline: this stage's tensors from ``model.pt`` and
    their AdamW state from ``optim.pt`` (indexed in the order the DP trainer's
    ``build_optimizer`` gave the whole model's parameters: matrices, then the rest)."""
    from hpcllm.model.gpt import GPT

    full = ckpt.load_torch(resume_dir / "model.pt", map_location="cpu")
    mine = {n for n, _ in stage.named_parameters()}
    stage.load_state_dict({k: v for k, v in full.items() if k in mine})
    del full
    with torch.device("meta"):
        whole = GPT(gpt_cfg)
    named = list(whole.named_parameters())
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    dp_optim = ckpt.load_torch(resume_dir / "optim.pt", map_location="cpu")
    state = {order[int(i)]: s for i, s in dp_optim["state"].items() if order[int(i)] in mine}
    load_named_optim_state(optimizer, stage, {"state": state, "param_groups": dp_optim["param_groups"]}, device)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_pipeline(layout: PipelineLayout, stage: PipelineStage, batches, act_shape, act_dtype, device,
                      precision) -> float:
    """Mean validation loss: forwards only, micro-batch by micro-batch through the stages."""
    from mpi4py import MPI

    from hpcllm.parallel.pipeline.transport import wire_view
    from hpcllm.train.precision import autocast

    was = stage.training
    stage.eval()
    buf = torch.empty(act_shape, dtype=act_dtype)
    total, n = 0.0, 0
    tag = 7777
    try:
        it = iter(batches) if batches is not None else None
        count = len(batches) if batches is not None else 0
        count = layout.pipe.bcast(count, root=0)
        for _ in range(count):
            x, y = next(it) if it is not None else (None, None)
            if layout.first:
                inp = x.to(device)
            else:
                layout.pipe.Recv(wire_view(buf), source=layout.stage - 1, tag=tag)
                inp = buf.to(device)
            with autocast(precision, device):
                out = stage(inp, y.to(device) if layout.last else None)
            if layout.last:
                total += float(out)
                n += 1
            else:
                buf.copy_(out.detach())
                layout.pipe.Send(wire_view(buf), dest=layout.stage + 1, tag=tag)
    finally:
        stage.train(was)
    import numpy as np

    sums = np.array([total, float(n)] if layout.last else [0.0, 0.0])
    layout.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


# --------------------------------------------------------------------------- the loop


def train_pipeline(cfg: TrainConfig) -> int:
    """Train with ``cfg.parallel.pipeline_stages`` stages; returns the exit status."""
    if not cfg.data.path:
        raise HpcllmError("--data is required (a dataset directory from `hpcllm preprocess`)")
    if not cfg.out:
        raise HpcllmError("--out is required (the run directory)")
    from hpcllm.parallel.data_parallel import DataParallel, abort_on_exception, mpi_env, set_threads
    from hpcllm.parallel.topology import Topology

    os.environ.update(mpi_env(cfg.parallel))  # before MPI starts (importing mpi4py.MPI starts it)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    # an unexpected exception on one rank must end every rank, not leave them in a receive
    guard = DataParallel(rank=comm.Get_rank(), size=comm.Get_size())
    with abort_on_exception(guard):
        layout = make_layout(comm, cfg.parallel.pipeline_stages)
        set_threads(cfg.parallel, Topology.from_env().local_size)
        return _train(cfg, layout)


def _log(layout, msg: str) -> None:
    if layout.is_root:
        print(f"[hpcllm] {msg}", flush=True)


def _train(cfg: TrainConfig, layout: PipelineLayout) -> int:
    import numpy as np
    from mpi4py import MPI

    from hpcllm.data.loader import BatchLoader, DatasetInfo, EvalBatches
    from hpcllm.model.gpt import flops_per_token, param_count
    from hpcllm.parallel.topology import Topology
    from hpcllm.parallel.pipeline.engine import PipelineEngine
    from hpcllm.train.metrics import MetricsLogger, device_peak_tflops
    from hpcllm.train.precision import LossScaler, autocast, clip_, resolve_precision
    from hpcllm.train.schedule import LRSchedule
    from hpcllm.train.stop import StopRequest
    from hpcllm.train.trainer import (build_optimizer, check_resume_compat, prepare_run_dir, setup_device,
                                      tokenizer_file,
                                      trainer_state)

    run_dir = Path(cfg.out)
    d, o, c, lg, pc = cfg.data, cfg.optimizer, cfg.checkpoint, cfg.logging, cfg.parallel
    P, D = layout.stages, layout.dp_size
    M = pc.microbatches or d.accum
    if M < 1:
        raise HpcllmError(f"--microbatches {M}: must be >= 1")

    if not Path(d.path).is_dir():
        raise HpcllmError(f"--data {d.path}: no such dataset directory")
    info = DatasetInfo(d.path)
    gpt_cfg = resolve_model(cfg.model, info.vocab_size)
    info.check_vocab(gpt_cfg.vocab_size)

    device = setup_device(pc, SimpleNamespace(local_rank=Topology.from_env().local_rank))
    precision = resolve_precision(cfg.precision.precision, device)
    amp = lambda: autocast(precision, device)  # noqa: E731

    resume_dir = ckpt.resolve_resume(run_dir, c.resume)
    tstate = saved_config = None
    if resume_dir is not None:
        tstate = ckpt.load_json(resume_dir / "trainer.json")
        saved_config = ckpt.load_json(resume_dir / "config.json")
        check_resume_compat(resume_dir, tstate, saved_config, gpt_cfg, info)
    start_step = int(tstate["step"]) if tstate else 0
    if start_step >= cfg.steps:
        _log(layout, f"checkpoint {resume_dir} is at step {start_step} >= --steps {cfg.steps}: nothing to do")
        return exitcodes.OK

    # ---- partition: an explicit --balance wins; else a resumed run keeps its partition
    saved_part = None
    if tstate and tstate.get("pipeline"):
        saved_part = Partition(tuple(tuple(b) for b in tstate["pipeline"]["bounds"]))
    elif resume_dir is not None and (resume_dir / "model.pt").is_file():
        saved_part = None  # a DP checkpoint: loaded by name below
    spec = pc.balance
    if spec is None and saved_part is not None and saved_part.stages == P:
        part = saved_part
    else:
        part = make_partition(gpt_cfg, P, spec or "params", micro_batch=d.micro_batch, device=device,
                              autocast=amp, comm=layout.comm)

    stage = PipelineStage(gpt_cfg, part, layout.stage, seed=cfg.seed, recompute=pc.recompute, device=device)
    optimizer = build_optimizer(stage.named_parameters(), o)
    if pc.compile:
        from hpcllm.train.compile import compile_blocks

        compile_blocks(stage.gpt.block_list())
    schedule = LRSchedule(o, cfg.steps)
    scaler = LossScaler(precision == "fp16", cfg.precision.loss_scale, cfg.precision.loss_scale_window)
    allreduce = StageAllreduce(layout, pc, stage.named_parameters(), pc.grad_compression)

    loader = None
    if layout.first or layout.last:
        loader = BatchLoader(d.path, split="train", seq_len=gpt_cfg.seq_len, micro_batch=d.micro_batch,
                             accum=M, dp_rank=layout.dp_index, dp_size=D, seed=cfg.seed,
                             model_vocab_size=gpt_cfg.vocab_size)
    eval_batches = None
    if lg.eval_every > 0 and (layout.first or layout.last):
        eval_batches = EvalBatches(d.path, split="val", seq_len=gpt_cfg.seq_len, micro_batch=d.micro_batch,
                                   num_batches=lg.eval_batches, dp_rank=layout.dp_index, dp_size=D)

    if resume_dir is not None:
        if saved_part is not None:
            load_stage_checkpoint(resume_dir, saved_part, stage, optimizer, device)
        else:  # a data-parallel checkpoint (model.pt, optim.pt): take this stage's part by name
            load_dp_checkpoint(resume_dir, gpt_cfg, stage, optimizer, device)
        if loader is not None:
            loader.load_state_dict(tstate["loader"])
        scaler.load_state_dict(tstate.get("loss_scaler") or {})
        rng = resume_dir / f"rng-rank{layout.rank}.pt"
        if rng.is_file():
            ckpt.set_rng_state(ckpt.load_torch(rng))

    act_shape = (d.micro_batch, gpt_cfg.seq_len, gpt_cfg.d_model)
    act_dtype = activation_dtype(gpt_cfg, amp, device)
    # a peer stage silent for --stall-shutdown-s is presumed dead (HPCLLM_PIPELINE_TIMEOUT overrides)
    p2p_timeout = float(os.environ.get("HPCLLM_PIPELINE_TIMEOUT", pc.stall_shutdown_s))
    engine = PipelineEngine(stage, layout.pipe, layout.stage, P, pc.schedule, M, act_shape, act_dtype,
                            device=device, autocast=amp, timeout=p2p_timeout)

    global_batch = d.micro_batch * M * D
    tokens_per_step = global_batch * gpt_cfg.seq_len
    fpt = flops_per_token(gpt_cfg)
    peak = device_peak_tflops(device, precision, torch.get_num_threads(), lg.peak_tflops) * 1e12
    pipeline_info = {"stages": P, "bounds": [list(b) for b in part.bounds], "schedule": pc.schedule,
                     "microbatches": M, "dp_size": D}
    config_json = effective_config(cfg, gpt_cfg, precision_resolved=precision, world_size=layout.world,
                                   global_batch=global_batch, tokenizer_sha256=info.tokenizer_sha256,
                                   data_dir=os.path.abspath(d.path), pipeline=pipeline_info)
    if layout.is_root:  # rank 0 alone writes the run directory's shared files
        prepare_run_dir(run_dir, config_json, start_step)
    _log(layout, f"pipeline: {P} stages x {D} replicas, schedule {pc.schedule}, {M} micro-batches, "
         f"blocks per stage {part.counts()}{', recompute' if pc.recompute else ''}; "
         f"{torch.get_num_threads()} threads per rank")
    _log(layout, f"model {gpt_cfg.name}: {gpt_cfg.n_layer} layers, d_model {gpt_cfg.d_model}, "
         f"{param_count(gpt_cfg) / 1e6:.2f}M parameters; precision {precision} on {device}; "
         f"global batch {global_batch} sequences (micro-batch {d.micro_batch} x {M} x {D} replicas)")
    if pc.grad_compression != "none" and D == 1:
        _log(layout, f"--grad-compression {pc.grad_compression}: no effect with 1 pipeline replica "
             f"(no data-parallel allreduce)")
    if resume_dir is not None:
        _log(layout, f"resumed from {resume_dir} at step {start_step}")

    metrics = MetricsLogger(run_dir, enabled=layout.is_root, flops_per_token=fpt,
                            peak_flops_total=peak * layout.world, tokens_per_step=tokens_per_step,
                            total_steps=cfg.steps, echo=lambda s: print(s, flush=True))
    tok_file = tokenizer_file(info)
    barrier = layout.comm.Barrier

    class _World:  # what trainer_state wants to know about the job
        size = layout.world

    def save(step: int) -> Path:
        files = {f"rng-rank{layout.rank}.pt": ckpt.rng_state()}
        if layout.dp_index == 0:  # one writer per stage: the replicas are identical
            files[f"model-stage{layout.stage}.pt"] = {k: v.detach().cpu() for k, v in stage.state_dict().items()}
            files[f"optim-stage{layout.stage}.pt"] = named_optim_state(optimizer, stage)
        if layout.is_root:
            files["config.json"] = config_json
            files["trainer.json"] = trainer_state(step, loader, schedule, scaler, info, _World, global_batch,
                                                  pipeline=pipeline_info)
            if tok_file is not None:
                files["tokenizer.json"] = tok_file.read_text()
        path = ckpt.save(run_dir, step, files, is_root=layout.is_root, barrier=barrier, keep=c.keep)
        _log(layout, f"checkpoint {path}")
        return path

    params = [p for p in stage.parameters() if p.requires_grad]
    # the tied matrix's norm is counted once: on the first stage, not on the last's copy
    norm_params = [p for n, p in stage.named_parameters() if not (layout.last and n == TIED)]
    stop = StopRequest().install()
    # a frozen peer blocks the collectives below forever (p2p transfers have their own timeout)
    watchdog = Watchdog(layout.rank, pc.stall_shutdown_s, pc.stall_check_s)
    last_saved = start_step if resume_dir is not None else None
    skipped_in_interval = 0
    grad_norm_value = 0.0
    try:
        stage.train()
        for step in range(start_step, cfg.steps):
            watchdog.step = step + 1
            t0 = time.perf_counter()
            lr = schedule.apply(optimizer, step)
            batches = loader.next_batch() if loader is not None else None
            # the DP allreduces start inside the last backward, as each gradient becomes final
            loss = engine.step(batches, loss_scale=scaler.scale, last_backward=allreduce.overlap)
            with watchdog.waiting("the data-parallel gradient allreduce"):
                allreduce.finish()  # the tied copies are averaged over D before they are summed
            with watchdog.waiting("the tied-embedding gradient sum"):
                sum_tied_grad(layout, stage)
            scaler.unscale_(params)
            sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in norm_params if p.grad is not None)
            bad = layout.last and not math.isfinite(loss)
            # one small allreduce over the world: replicas of a stage hold equal (averaged)
            # gradients, hence the /D; only the last stage has a loss; then per stage the
            # shares of its DP allreduces started inside the last backward and complete when
            # it ended (means over the replicas; logged as dp_overlap, dp_done_in_bwd)
            tot = np.zeros(4 + 2 * P)
            tot[:4] = [sq / D, (loss / D) if (layout.last and not bad) else 0.0, float(bad), float(stop.requested)]
            if allreduce.started:
                tot[4 + layout.stage] = allreduce.started_in_backward / allreduce.started / D
                tot[4 + P + layout.stage] = allreduce.done_in_backward / allreduce.started / D
            with watchdog.waiting("the step agreement allreduce"):
                layout.comm.Allreduce(MPI.IN_PLACE, tot, op=MPI.SUM)
            norm = math.sqrt(tot[0]) if math.isfinite(tot[0]) else float("inf")
            n_bad, want_stop = int(tot[2]), bool(tot[3] > 0)
            good = D - n_bad
            agreed_loss = float(tot[1]) * D / good if good else float("nan")
            if n_bad:
                if layout.is_root:
                    print(f"error: non-finite loss at step {step + 1} on {n_bad} pipeline replica(s); stopping "
                          f"without updating the weights. Last good checkpoint: "
                          f"{ckpt.latest_checkpoint(run_dir) or 'none'}", file=sys.stderr, flush=True)
                return exitcodes.FAILURE
            overflow = not math.isfinite(norm)
            if overflow:
                if not scaler.enabled:
                    if layout.is_root:
                        print(f"error: non-finite gradient norm at step {step + 1}; stopping", file=sys.stderr,
                              flush=True)
                    return exitcodes.FAILURE
                optimizer.zero_grad(set_to_none=True)
                skipped_in_interval += 1
            else:
                clip_(params, norm, o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                grad_norm_value = norm
            scaler.update(overflow)
            metrics.step(agreed_loss, time.perf_counter() - t0, allreduce.wait_s)
            done = step + 1
            if pc.compile and done == start_step + 1:
                from hpcllm.train.compile import compile_report

                _log(layout, f"torch.compile: {compile_report()} (rank 0, first step)")

            record = {}
            if done % lg.log_every == 0 or done == cfg.steps or want_stop:
                record.update(lr=lr, grad_norm=grad_norm_value, skipped=skipped_in_interval,
                              bubble=engine.stats.bubble)
                if D > 1:  # per stage, of the DP allreduces: started in / done by the end of the last backward
                    record["dp_overlap"] = [round(float(x), 4) for x in tot[4:4 + P]]
                    record["dp_done_in_bwd"] = [round(float(x), 4) for x in tot[4 + P:]]
                if scaler.enabled:
                    record["loss_scale"] = scaler.scale
                skipped_in_interval = 0
            if lg.eval_every > 0 and (done % lg.eval_every == 0 or done == cfg.steps):
                with watchdog.waiting("the validation pass"):
                    record["val_loss"] = evaluate_pipeline(layout, stage, eval_batches, act_shape, act_dtype,
                                                           device, precision)
            if record:
                if "lr" in record:
                    metrics.flush(done, **record)
                else:
                    metrics.write({"step": done, **record})
                    if layout.is_root:
                        print(metrics.console_line({"step": done, **record}), flush=True)
            if want_stop:
                _log(layout, f"stop requested ({stop.signal_name or 'on another rank'}) at step {done}")
                if last_saved != done:
                    save(done)
                return exitcodes.REQUEUE
            if (c.ckpt_every and done % c.ckpt_every == 0) or done == cfg.steps:
                save(done)
                last_saved = done
    finally:
        watchdog.close()
        stop.restore()
    _log(layout, f"done: {cfg.steps} steps")
    return exitcodes.OK

