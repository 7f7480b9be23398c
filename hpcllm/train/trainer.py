"""The training loop: one loop for every parallel layout.

    mpirun -np 4 hpcllm train --data data/stdlib --out runs/pp --pipeline-stages 2 --microbatches 8

One optimizer step, on every rank (layout: ``ParallelDims``; what differs per layout is only
the runner's forward/backward and the gradient synchroniser's reductions)::

    batches = loader.next_batch()                  ranks that read data (all; with stages the
                                                   first and last)
    loss = runner.forward_backward(batches, scale, grad_sync.overlap)
                                                   accumulation loop, or the pipeline engine;
                                                   gradient allreduces start inside the last backward
    grad_sync.finish()                             wait for them; tied copies summed
    unscale (fp16); agree(...)                     one small world allreduce: loss, non-finite
                                                   losses, squared grad norm (each parameter once),
                                                   stop requested
    non-finite loss  -> stop, exit FAILURE, no checkpoint (the last good one stays)
    overflow (fp16)  -> skip the update on every rank, halve the loss scale
    else             -> clip with the global norm, optimizer.step()
    log / eval / checkpoint at their intervals; stop requested -> checkpoint, exit REQUEUE
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcllm import exitcodes
from hpcllm.config import TrainConfig, effective_config
from hpcllm.train import checkpoint as ckpt
from hpcllm.train.metrics import MetricsLogger, current_memory_bytes, peak_memory_bytes
from hpcllm.train.precision import LossScaler, autocast, clip_, probe_shape, resolve_precision
from hpcllm.train.schedule import LRSchedule
from hpcllm.train.setup import (Plan, build_optimizer, check_ranks_agree, checkpoint_files, choose_partition,
                                device_peak, load_init_weights,
                                lock_run_dir, log, microbatches, prepare, prepare_run_dir, restore, setup_device,
                                tokenizer_file, trainer_state)

__all__ = ["Agreed", "agree", "build_optimizer", "train"]
from hpcllm.train.stop import StopRequest

#: test hook "STEP,RANK": make the loss NaN at 1-based step STEP on RANK (NaN-stop test)
NAN_ENV = "HPCLLM_TEST_NAN_AT"
#: test hook "DIR:SECONDS": once the stop handlers are installed, create DIR/rank-R and pause,
#: so a test can signal a rank during startup at a known point
PAUSE_ENV = "HPCLLM_TEST_STARTUP_PAUSE"


@dataclass
class Agreed:
    """The per-step facts every rank agrees on after one allreduce."""

    loss: float              # mean loss over the global batch
    bad_loss_ranks: int      # ranks whose loss was inf/NaN
    grad_norm: float         # global gradient norm (inf/NaN: overflow)
    stop: bool               # some rank received a stop signal
    extra: list              # the layout's own sums (pipeline: dp overlap per stage)

    @property
    def overflow(self) -> bool:
        return not math.isfinite(self.grad_norm)


def agree(groups, loss: float | None, norm_sq: float, stop_requested: bool, extra=()) -> Agreed:
    """One small allreduce at the step boundary; every rank takes the same decisions from it.
    ``loss`` is None on ranks that compute none (pipeline stages before the last)."""
    bad = loss is not None and not math.isfinite(loss)
    good = loss is not None and not bad
    s = groups.allreduce_sum([loss if good else 0.0, 1.0 if good else 0.0, float(bad), norm_sq,
                              1.0 if stop_requested else 0.0, *extra], what="the step agreement allreduce")
    n_bad = int(s[2])
    sq = float(s[3])
    return Agreed(loss=float(s[0]) / s[1] if s[1] else float("nan"), bad_loss_ranks=n_bad,
                  grad_norm=math.sqrt(sq) if math.isfinite(sq) else float("inf"), stop=bool(s[4] > 0),
                  extra=[float(x) for x in s[5:]])


def train(cfg: TrainConfig) -> int:
    """Train as configured; returns the process exit status (exitcodes.OK/REQUEUE/FAILURE)."""
    # handlers first: a SIGTERM/SIGUSR1 during startup (loading, MPI init) becomes a stop at
    # the first step boundary instead of killing the rank
    stop = StopRequest().install()
    try:
        _startup_pause()
        plan = prepare(cfg)
        if plan.start_step >= cfg.steps:
            if os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
                print(f"[hpcllm] checkpoint {plan.resume_dir} is at step {plan.start_step} >= --steps {cfg.steps}: "
                      "nothing to do", flush=True)
            return exitcodes.OK
        from hpcllm.parallel.groups import abort_on_exception, init_groups

        groups = init_groups(cfg.parallel)
        try:
            with abort_on_exception(groups), lock_run_dir(cfg.out, groups):
                return _train(cfg, groups, plan, stop)
        finally:
            groups.close()
    finally:
        stop.restore()


def _train(cfg: TrainConfig, groups, plan: Plan, stop: StopRequest) -> int:
    from hpcllm.data.loader import BatchLoader, EvalBatches
    from hpcllm.model.gpt import flops_per_token, param_count
    from hpcllm.parallel.parallelize import parallelize

    run_dir = Path(cfg.out)
    d, o, c, lg, pc = cfg.data, cfg.optimizer, cfg.checkpoint, cfg.logging, cfg.parallel
    dims = groups.dims
    info, gpt_cfg, reader, start_step = plan.info, plan.gpt_cfg, plan.reader, plan.start_step
    M = microbatches(cfg)
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    log(groups, f"{groups.describe()}; {torch.get_num_threads()} threads per rank"
        + (f"; SLURM_RESTART_COUNT={restarts}" if restarts else ""))

    check_ranks_agree(groups, plan)
    device = setup_device(pc, groups.local_rank)
    precision, why = resolve_precision(cfg.precision.precision, device,
                                       shape=probe_shape(d.micro_batch, gpt_cfg.seq_len, gpt_cfg.d_model,
                                                         gpt_cfg.mlp_ratio),
                                       measure=groups.is_root, bcast=groups.bcast)
    if cfg.precision.precision == "auto":
        log(groups, f"precision auto -> {precision}: {why}")
    amp = lambda: autocast(precision, device)  # noqa: E731

    start_mem = current_memory_bytes(device)  # before the model: what the runtime itself holds
    partition = choose_partition(cfg, gpt_cfg, plan, groups, device, amp) if dims.pp > 1 else None
    par = parallelize(gpt_cfg, groups, pc, seed=cfg.seed, device=device, autocast=amp,
                      micro_batch=d.micro_batch, microbatches=M, partition=partition)
    module, runner, grad_sync = par.module, par.runner, par.grad_sync
    optimizer = build_optimizer(grad_sync.optimizer_params(), o, decay_names=grad_sync.decay_names())
    schedule = LRSchedule(o, cfg.steps)
    scaler = LossScaler(precision == "fp16", cfg.precision.loss_scale, cfg.precision.loss_scale_window)

    loader = eval_batches = None
    if runner.reads_data:
        loader = BatchLoader(d.path, split="train", seq_len=gpt_cfg.seq_len, micro_batch=d.micro_batch,
                             accum=M, dp_rank=groups.dp_rank, dp_size=dims.dp, seed=cfg.seed,
                             model_vocab_size=gpt_cfg.vocab_size)
        if lg.eval_every > 0:
            eval_batches = EvalBatches(d.path, split="val", seq_len=gpt_cfg.seq_len, micro_batch=d.micro_batch,
                                       num_batches=lg.eval_batches, dp_rank=groups.dp_rank, dp_size=dims.dp)
    global_batch = d.micro_batch * M * dims.dp

    if plan.init_weights is not None:
        load_init_weights(plan, par, groups)
        log(groups, f"initialised from {plan.init_weights.dir} ({plan.init_weights.hf_config.get('model_type')}); "
            "new optimizer, step 0")
    if reader is not None:
        restore(plan, par, optimizer, loader, scaler, groups, device)
        if plan.trainer_state.get("global_batch") not in (None, global_batch):
            log(groups, f"note: global batch changed from {plan.trainer_state['global_batch']} to "
                f"{global_batch} sequences")
    # the replicas of each part start from the first replica's values (identical anyway, by
    # the seed or the checkpoint: a safety net against ranks that start from different points)
    # (ZeRO: each rank holds its own shards, and every rank initialised the same values)
    # (expert parallelism: an expert's holders are its expert-data-parallel group, never the
    # other ranks of its expert group, which hold other experts)
    if grad_sync.replicated:
        experts = par.expert_names
        by_param = {p: n for n, p in module.named_parameters()}
        tensors = [(n, n, v) for n, v in module.state_dict().items()]
        tensors += [(by_param[p], f"{by_param[p]}.{k}", v) for p, st in optimizer.state.items()
                    for k, v in st.items() if torch.is_tensor(v)]
        groups.broadcast_tensors({key: v for n, key, v in tensors if n not in experts})
        if experts:
            groups.broadcast_tensors({key: v for n, key, v in tensors if n in experts}, dim="edp")

    tokens_per_step = global_batch * gpt_cfg.seq_len
    fpt = flops_per_token(gpt_cfg)
    # MFU is rank 0's to log (other ranks log nothing)
    peak = device_peak(device, precision, d.micro_batch, gpt_cfg, lg.peak_tflops) if groups.is_root else 1.0
    layout = {**dims.to_dict(), "world": groups.size}
    if par.zero_stage:
        layout["zero"] = par.zero_stage
    if dims.pp > 1:
        layout.update(bounds=[list(b) for b in partition.bounds], schedule=pc.schedule, microbatches=M)
    extra = {"pipeline": {"stages": dims.pp, "bounds": layout["bounds"], "schedule": pc.schedule,
                          "microbatches": M, "dp_size": dims.dp}} if dims.pp > 1 else {}
    config_json = effective_config(
        cfg, gpt_cfg, precision_resolved=precision, precision_reason=why, global_batch=global_batch,
        tokenizer_sha256=info.tokenizer_sha256, data_dir=os.path.abspath(d.path), layout=layout,
        world={"size": groups.size, "local_size": groups.local_size, "cross_size": groups.cross_size,
               "threads_per_rank": torch.get_num_threads(),
               "horovod": groups.hvd is not None},
        horovod_env={k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
        mpi_env={k: v for k, v in os.environ.items() if k.startswith("OMPI_MCA_")}, **extra)
    # rank 0 alone writes the run directory's shared files; a failure is every rank's error
    groups.on_root(lambda: prepare_run_dir(run_dir, config_json, start_step), what="the run directory")
    log(groups, f"model {gpt_cfg.name}: {gpt_cfg.n_layer} layers, {gpt_cfg.n_head} heads, d_model {gpt_cfg.d_model}, "
        f"seq_len {gpt_cfg.seq_len}, vocab {gpt_cfg.vocab_size} (padded {gpt_cfg.padded_vocab}), "
        f"{param_count(gpt_cfg) / 1e6:.2f}M parameters"
        + (f" ({param_count(gpt_cfg, active=True) / 1e6:.2f}M active per token)" if gpt_cfg.moe_experts else "")
        + f", {fpt / 1e6:.2f} MFLOP/token; precision {precision} on {device}")
    if gpt_cfg.moe_experts:
        from hpcllm.model.moe import describe as describe_moe

        line = describe_moe(gpt_cfg)
        if dims.ep > 1:
            ch = par.ep_comm.choice
            line += (f"; expert parallel: {dims.ep} ranks per expert group ({gpt_cfg.moe_experts // dims.ep} "
                     f"experts each), {dims.dp // dims.ep} group{'s' if dims.dp // dims.ep > 1 else ''}, token "
                     f"all-to-all over {par.ep_comm.backend} ({'as asked' if ch['forced'] else 'the faster'}: "
                     + ", ".join(f"{k} {v:.3f} ms" for k, v in ch["median_ms"].items())
                     + f" for {ch['bytes'] / 1024:.0f} KiB per peer)")
        log(groups, line)
    if getattr(gpt_cfg, "attention", "dense") != "dense":
        from hpcllm.model.attention import describe as describe_attention

        log(groups, describe_attention(gpt_cfg))
    if dims.tp > 1:
        ch = par.tp_comm.choice
        measured = ", ".join(f"{k} {v:.3f} ms" for k, v in ch["median_ms"].items())
        log(groups, f"tensor parallel: {dims.tp} ranks per model part (heads, MLP columns/rows and vocabulary "
            f"split){', sequence parallel' if pc.sequence_parallel else ''}; collectives over {ch['chosen']} "
            f"({'as asked' if ch['forced'] else 'the faster'}: all-reduce of {ch['bytes'] / 1024:.0f} KiB {measured})"
            + ("; Horovod, started to be measured, shut down again" if ch.get("horovod_stopped") else "")
            + ("; mpi4py stages CUDA tensors through host memory" if device.type == "cuda" and ch["chosen"] == "mpi4py"
               else ""))
    if dims.pp > 1:
        log(groups, f"pipeline: {dims.pp} stages x {dims.dp} replicas, schedule {pc.schedule}, {M} micro-batches, "
            f"blocks per stage {partition.counts()}")
    if par.zero_stage:
        log(groups, f"ZeRO stage {par.zero_stage}: " + {
            1: "optimizer states", 2: "optimizer states and gradients",
            3: "optimizer states, gradients and parameters"}[par.zero_stage]
            + f" sharded over {dims.dp} data-parallel rank{'s' if dims.dp > 1 else ''}"
            + (" (one rank: nothing to shard)" if dims.dp == 1 else "")
            + (f"; experts over their {dims.dp // dims.ep} expert-data-parallel rank{'s' if dims.dp > dims.ep else ''}"
               if dims.ep > 1 else ""))
    log(groups, f"global batch {global_batch} sequences = {tokens_per_step} tokens "
        f"(micro-batch {d.micro_batch} x {M} micro-batches x {dims.dp} replicas x seq_len {gpt_cfg.seq_len})"
        + ("; activation recomputation per block" if pc.recompute else ""))
    if dims.dp == 1:  # settings of the data-parallel allreduce, which this layout does not run
        from hpcllm.config import is_given

        unused = [f"{flag} {getattr(pc, name)}" for name, flag in (
            ("grad_compression", "--grad-compression"), ("fusion_threshold_mb", "--fusion-threshold-mb"),
            ("cycle_time_ms", "--cycle-time-ms"), ("hierarchical_allreduce", "--hierarchical-allreduce"),
            ("timeline", "--timeline")) if is_given(cfg, f"parallel.{name}")]
        if unused:
            log(groups, f"{', '.join(unused)}: no effect with 1 {'pipeline replica' if dims.pp > 1 else 'rank'} "
                "(no data-parallel allreduce)")
    if par.compiled_blocks:
        log(groups, f"compiling {par.compiled_blocks} blocks with torch.compile (at the first step)")
    if reader is not None:
        log(groups, f"resumed from {plan.resume_dir} at step {start_step} ({reader.describe()})")

    metrics = MetricsLogger(run_dir, enabled=groups.is_root, flops_per_token=fpt, peak_flops_total=peak * groups.size,
                            tokens_per_step=tokens_per_step, total_steps=cfg.steps,
                            echo=lambda s: print(s, flush=True), tensorboard_from=start_step)
    tok_file = tokenizer_file(info)

    def save(step: int) -> Path:
        files = {f"rng-rank{groups.rank}.pt": ckpt.rng_state(), **checkpoint_files(par, optimizer, groups)}
        if groups.is_root:
            files["config.json"] = config_json
            files["trainer.json"] = trainer_state(step, loader, schedule, scaler, info, groups, global_batch, layout)
            if tok_file is not None:
                files["tokenizer.json"] = tok_file.read_bytes()
        path = ckpt.save(run_dir, step, files, is_root=groups.is_root, keep=c.keep,
                         gather=lambda x: groups.allgather(x, what=None))
        log(groups, f"checkpoint {path}")
        return path

    params = grad_sync.step_params()  # what unscaling and clipping act on (ZeRO: the shards)
    moe = bool(gpt_cfg.moe_experts)
    state_bytes = None
    memory_logged = False
    nan_at = _nan_hook(groups.rank)
    last_saved = start_step if reader is not None else None
    skipped_in_interval = 0
    grad_norm_value = 0.0
    module.train()
    for step in range(start_step, cfg.steps):
        if groups.watchdog is not None:
            groups.watchdog.step = step + 1
        t0 = time.perf_counter()
        if par.tp_comm is not None:
            par.tp_comm.seconds = 0.0  # this step's tensor-parallel collectives (blocking: on the critical path)
        if par.ep_comm is not None:
            par.ep_comm.seconds = 0.0  # this step's token all-to-alls (blocking: on the critical path)
        lr = schedule.apply(optimizer, step)
        batches = loader.next_batch() if loader is not None else None
        loss = runner.forward_backward(batches, scaler.scale, grad_sync.overlap)
        if nan_at == step + 1:
            loss = float("nan")
        grad_sync.finish()
        scaler.unscale_(params)
        shares = grad_sync.overlap_shares()
        per_stage = [0.0] * (2 * dims.pp)
        if dims.dp > 1 and dims.pp > 1:  # per stage: shares of its allreduces started in / done by the last backward
            per_stage[groups.stage], per_stage[dims.pp + groups.stage] = (x / dims.dp for x in shares)
        agreed = agree(groups, loss, grad_sync.norm_sq(), stop.requested, per_stage if dims.pp > 1 else ())

        if agreed.bad_loss_ranks:
            bad = [r for r, b in enumerate(groups.allgather(loss is not None and not math.isfinite(loss))) if b]
            good = ckpt.latest_checkpoint(run_dir)
            msg = (f"non-finite loss at step {step + 1} on rank{'s' if len(bad) > 1 else ''} "
                   f"{', '.join(map(str, bad))}; stopping without updating the weights. Last good "
                   f"checkpoint: {good if good is not None else 'none'}")
            if groups.is_root:
                print(f"error: {msg}", file=sys.stderr, flush=True)
            metrics.close()
            return exitcodes.FAILURE
        if agreed.overflow:
            if not scaler.enabled:
                if groups.is_root:
                    print(f"error: non-finite gradient norm at step {step + 1} (loss {agreed.loss:.4f}); "
                          "stopping", file=sys.stderr, flush=True)
                metrics.close()
                return exitcodes.FAILURE
            skipped_in_interval += 1  # every rank skips alike: the norm was agreed
        else:
            clip_(params, agreed.grad_norm, o.grad_clip)
            optimizer.step()
            if state_bytes is None:  # parameters + gradients + optimizer states, at their peak
                state_bytes = grad_sync.model_state_bytes(optimizer)
            grad_sync.after_step()  # ZeRO 1-2: the parameters' all-gathers start
            grad_norm_value = agreed.grad_norm
        grad_sync.zero_grad(optimizer)
        scaler.update(agreed.overflow)
        step_s = time.perf_counter() - t0
        metrics.step(agreed.loss, step_s, grad_sync.wait_s)
        done = step + 1
        if pc.compile and done == start_step + 1:
            from hpcllm.parallel.compile import compile_report

            log(groups, f"torch.compile: {compile_report()} (rank 0, first step)")

        record = {}
        if done % lg.log_every == 0 or done == cfg.steps or agreed.stop:
            record.update(lr=lr, grad_norm=grad_norm_value, skipped=skipped_in_interval, **runner.step_record())
            if dims.dp > 1 and dims.pp > 1:
                record["dp_overlap"] = [round(x, 4) for x in agreed.extra[:dims.pp]]
                record["dp_done_in_bwd"] = [round(x, 4) for x in agreed.extra[dims.pp:]]
            if scaler.enabled:
                record["loss_scale"] = scaler.scale
            record["comm_s"] = grad_sync.comm_record()
            if par.tp_comm is not None:
                record["comm_s"]["tensor_parallel_s"] = round(par.tp_comm.seconds, 6)
            if par.ep_comm is not None:
                record["comm_s"]["all_to_all_s"] = round(par.ep_comm.seconds, 6)
            if moe:  # routing statistics of the interval, every rank's layers and tokens
                from hpcllm.model.moe import summarize, take_stats

                record.update(summarize(groups.allgather(take_stats(module), what="the expert statistics")))
                if par.ep_comm is not None:
                    shares = groups.allgather(par.ep_comm.seconds / max(1e-9, step_s),
                                              what="the all-to-all share")
                    record["moe_all_to_all_share"] = round(max(shares), 4)
            per_rank = groups.allgather((state_bytes, peak_memory_bytes(device), start_mem),
                                        what="the memory statistics")
            record["model_state_bytes"] = [b for b, _, _ in per_rank]
            record["peak_mem_bytes"] = [m for _, m, _ in per_rank]
            record["start_mem_bytes"] = [m for _, _, m in per_rank]
            if not memory_logged and per_rank[0][0] is not None:
                memory_logged = True
                mib = lambda xs: ", ".join(f"{x / 2 ** 20:.1f}" for x in xs)  # noqa: E731
                log(groups, f"model state per rank (parameters, gradients, optimizer states) "
                    f"[{mib(record['model_state_bytes'])}] MiB; peak memory per rank so far "
                    f"[{mib(record['peak_mem_bytes'])}] MiB")
            skipped_in_interval = 0
        if lg.eval_every > 0 and (done % lg.eval_every == 0 or done == cfg.steps):
            total, n = runner.eval_sums(eval_batches)  # pipeline: every stage takes part
            s = groups.allreduce_sum([total, float(n)], what="the validation pass")
            record["val_loss"] = float(s[0] / s[1]) if s[1] else float("nan")
        if record:
            if "lr" in record:
                metrics.flush(done, **record)
            else:  # an eval on a step that is not logged: its own line
                metrics.write({"step": done, **record})
                if groups.is_root:
                    print(metrics.console_line({"step": done, **record}), flush=True)

        if agreed.stop:
            log(groups, f"stop requested ({stop.signal_name or 'on another rank'}) at step {done}")
            if last_saved != done:
                save(done)
            _drain(grad_sync, groups)
            metrics.close()  # every exit closes the event files (the job may end right after)
            return exitcodes.REQUEUE
        if (c.ckpt_every and done % c.ckpt_every == 0) or done == cfg.steps:
            save(done)
            last_saved = done
    _drain(grad_sync, groups)
    metrics.close()
    log(groups, f"done: {cfg.steps} steps")
    return exitcodes.OK


def _drain(grad_sync, groups) -> None:
    """Complete the synchroniser's collectives in flight (ZeRO's all-gathers), then wait for
    every rank to have done so: a process that exits tears Horovod down for all of them, so
    none may leave while another still has a collective running."""
    grad_sync.drain()
    groups.allreduce_sum([0.0], what="the end of training")


def _nan_hook(rank: int) -> int | None:
    spec = os.environ.get(NAN_ENV)
    if not spec:
        return None
    step, _, r = spec.partition(",")
    return int(step) if (not r or int(r) == rank) else None




def _startup_pause() -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    where, _, secs = spec.rpartition(":")
    rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID", "0"))
    Path(where, f"rank-{rank}").touch()
    time.sleep(float(secs))
