"""The training loop: data parallelism over Horovod, precision, accumulation, clipping,
evaluation, checkpoints, stop requests.

One optimizer step, on every rank::

    for each of `accum` micro-batches: forward under autocast, (scaled) loss / accum, backward
        (Horovod allreduces the gradients after the last backward, overlapped with it)
    optimizer.synchronize()            wait for the averaged gradients
    unscale (fp16), global grad norm   identical on every rank: the gradients are
    agree(...)                         one small allreduce: loss sum, non-finite loss,
                                       non-finite gradients, stop requested
    non-finite loss  -> stop, exit FAILURE, no checkpoint (the last good one stays)
    overflow (fp16)  -> skip the update on every rank, halve the loss scale
    else             -> clip, `with optimizer.skip_synchronize(): optimizer.step()`
    log / eval / checkpoint at their intervals; stop requested -> checkpoint, exit REQUEUE

The pieces (device and precision setup, optimizer, LR schedule, loss scaler, agreement,
evaluation, checkpoint save/restore) are functions a pipeline-parallel loop reuses.
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
from hpcllm.config import TrainConfig, effective_config, resolve_model
from hpcllm.fileio import write_json_atomic
from hpcllm.errors import HpcllmError
from hpcllm.train import checkpoint as ckpt
from hpcllm.train.metrics import MetricsLogger, device_peak_tflops, truncate_metrics
from hpcllm.train.precision import LossScaler, autocast, clip_, cpu_has_fast_bf16, grad_norm, resolve_precision
from hpcllm.train.schedule import LRSchedule
from hpcllm.train.stop import StopRequest

#: test hook "STEP,RANK": make the loss NaN at 1-based step STEP on RANK (NaN-stop test)
NAN_ENV = "HPCLLM_TEST_NAN_AT"


def log(dp, msg: str) -> None:
    """A console line from rank 0 only."""
    if dp.is_root:
        print(f"[hpcllm] {msg}", flush=True)


# --------------------------------------------------------------------------- setup pieces


def setup_device(pcfg, dp) -> torch.device:
    """cuda:local_rank or cpu, from --device."""
    from hpcllm.parallel.data_parallel import compute_device_type

    if compute_device_type(pcfg) == "cuda":
        if not torch.cuda.is_available():
            raise HpcllmError("--device cuda: CUDA is not available on this machine")
        idx = dp.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def build_optimizer(named_params, ocfg, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/embeddings only (not biases, not LayerNorm).

    ``fused`` None: PyTorch's fused AdamW kernel wherever it has one for the parameters'
    device (CUDA; CPUs since PyTorch 2.4), else the multi-tensor one. On a CPU the fused step
    of the 3.3M-parameter benchmark model took 2.1-2.5 ms against 6.3-7.0 ms
    (``benchmarks/train.py --parts kernels``).
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)

    def make(fused_: bool | None) -> torch.optim.AdamW:
        # fresh group dicts each time: the constructor fills them in place
        groups = [{"params": decay, "weight_decay": ocfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps, fused=fused_)

    if fused is None:
        try:
            return make(True)
        except RuntimeError:  # no fused kernel for this device or dtype
            return make(None)
    return make(fused or None)


@dataclass
class Agreed:
    """The per-step facts every rank agrees on after one allreduce."""

    loss: float              # mean loss over the global batch
    bad_loss_ranks: int      # ranks whose loss was inf/NaN
    overflow: bool           # some synchronized gradient is inf/NaN
    stop: bool               # some rank received a stop signal


def agree(dp, loss_sum: torch.Tensor, grads_finite: bool, stop_requested: bool) -> Agreed:
    """One small allreduce at the step boundary; every rank takes the same decisions from it."""
    loss_sum = loss_sum.detach().double().cpu()
    bad = not bool(torch.isfinite(loss_sum))
    t = torch.tensor([0.0 if bad else float(loss_sum), float(bad), 0.0 if grads_finite else 1.0,
                      1.0 if stop_requested else 0.0], dtype=torch.float64)
    s = dp.allreduce_sum(t, name="hpcllm.agree")
    n_bad = int(s[1])
    ok = dp.size - n_bad
    return Agreed(loss=float(s[0]) / ok if ok else float("nan"), bad_loss_ranks=n_bad,
                  overflow=bool(s[2] > 0), stop=bool(s[3] > 0))


def ranks_with(dp, flag: bool) -> list[int]:
    """Ranks where ``flag`` is true (an allgather; only on the rare failure path)."""
    got = dp.allgather(torch.tensor([1 if flag else 0], dtype=torch.int32), name="hpcllm.ranks_with")
    return [r for r, v in enumerate(got.tolist()) if v]


@torch.no_grad()
def evaluate(model, batches, device, precision, dp) -> float:
    """Mean loss over fixed validation batches, averaged over ranks."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for x, y in batches:
            with autocast(precision, device):
                loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            total += float(loss)
            n += 1
    finally:
        model.train(was)
    s = dp.allreduce_sum(torch.tensor([total, float(n)], dtype=torch.float64), name="hpcllm.eval")
    return float(s[0] / s[1])


def check_resume_compat(resume_dir: Path, trainer_state: dict, config: dict, gpt_cfg, info) -> None:
    """The checkpoint must fit this dataset (same tokenizer) and this model shape."""
    want = trainer_state.get("tokenizer_sha256")
    if want and want != info.tokenizer_sha256:
        raise HpcllmError(f"{resume_dir}: trained with tokenizer sha256 {want[:12]}…, but the dataset "
                          f"{info.data_dir} has {info.tokenizer_sha256[:12]}… (a different tokenizer)")
    saved = dict(config.get("model") or {})
    now = gpt_cfg.to_dict()
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in now if k != "name" and k in saved and saved[k] != now[k]]
    if diff:
        raise HpcllmError(f"{resume_dir}: checkpoint model shape differs from this run's ({'; '.join(diff)})")


def trainer_state(step: int, loader, schedule, scaler, info, dp, global_batch: int, **extra) -> dict:
    """trainer.json: everything besides tensors needed to continue exactly."""
    return {"step": step, "loader": loader.state_dict(), "lr_schedule": schedule.state_dict(),
            "loss_scaler": scaler.state_dict(), "tokenizer_sha256": info.tokenizer_sha256,
            "data_dir": os.path.abspath(info.data_dir), "world_size": dp.size, "global_batch": global_batch,
            "saved_at": time.time(), **extra}


def tokenizer_file(info) -> Path | None:
    """The dataset's tokenizer file (copied into checkpoints so generate finds it), if any."""
    name = (info.manifest.get("tokenizer") or {}).get("file")
    if name:
        p = Path(info.data_dir) / name
        if p.is_file():
            return p
    return None


# --------------------------------------------------------------------------- the loop


def prepare_run_dir(run_dir, config_json: dict, start_step: int) -> None:
    """Rank 0 only: create RUN_DIR, drop stale checkpoint temp dirs, write the effective
    config, and cut metrics.jsonl back to ``start_step`` (a resumed run reads as one run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_stale(run_dir)
    write_json_atomic(run_dir / "config.json", config_json)
    truncate_metrics(run_dir, start_step)


def train(cfg: TrainConfig) -> int:
    """Train as configured; returns the process exit status (exitcodes.OK/REQUEUE/FAILURE)."""
    if cfg.parallel.pipeline_stages > 1:
        # the pipeline loop (issue 6) reuses the pieces above
        try:
            from hpcllm.parallel.pipeline.trainer import train_pipeline
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("hpcllm.parallel.pipeline"):
                raise HpcllmError("--pipeline-stages > 1: pipeline parallelism is not available in this build") from None
            raise
        return train_pipeline(cfg)
    # handlers first: a SIGTERM/SIGUSR1 during startup (loading, MPI init) becomes a stop at
    # the first step boundary instead of killing the rank
    stop = StopRequest().install()
    try:
        plan = prepare(cfg)
        if plan.start_step >= cfg.steps:
            if os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
                print(f"[hpcllm] checkpoint {plan.resume_dir} is at step {plan.start_step} >= --steps {cfg.steps}: "
                      "nothing to do", flush=True)
            return exitcodes.OK

        from hpcllm.parallel.data_parallel import abort_on_exception, init_data_parallel

        dp = init_data_parallel(cfg.parallel)
        try:
            with abort_on_exception(dp):
                return _train(cfg, dp, plan, stop)
        finally:
            if dp.watchdog is not None:
                dp.watchdog.close()
    finally:
        stop.restore()


@dataclass
class Plan:
    """What a run is, decided from files alone before MPI/Horovod start (so bad input fails
    fast, on every rank alike, with one line)."""

    info: object               # DatasetInfo
    gpt_cfg: object            # GPTConfig
    resume_dir: Path | None
    trainer_state: dict | None
    start_step: int


def prepare(cfg: TrainConfig) -> Plan:
    """Check the dataset, the model and the checkpoint to resume against each other."""
    from hpcllm.data.loader import DatasetInfo

    if not cfg.data.path:
        raise HpcllmError("--data is required (a dataset directory from `hpcllm preprocess`)")
    if not cfg.out:
        raise HpcllmError("--out is required (the run directory)")
    if not Path(cfg.data.path).is_dir():
        raise HpcllmError(f"--data {cfg.data.path}: no such dataset directory")
    info = DatasetInfo(cfg.data.path)
    gpt_cfg = resolve_model(cfg.model, info.vocab_size)
    info.check_vocab(gpt_cfg.vocab_size)
    windows = info.windows("train", gpt_cfg.seq_len)
    if windows == 0:
        raise HpcllmError(f"{cfg.data.path}: the train split has {info.train_tokens} tokens, fewer than one window "
                          f"of seq_len+1 = {gpt_cfg.seq_len + 1} (lower --seq-len)")
    if cfg.logging.eval_every > 0 and info.windows("val", gpt_cfg.seq_len) == 0:
        raise HpcllmError(f"{cfg.data.path}: the val split has {info.val_tokens} tokens, fewer than one window of "
                          f"seq_len+1 = {gpt_cfg.seq_len + 1}; use --eval-every 0 or more validation data")
    resume_dir = ckpt.resolve_resume(Path(cfg.out), cfg.checkpoint.resume)
    existing = ckpt.list_checkpoints(cfg.out)
    if resume_dir is None and existing:
        # a fresh run here would interleave its checkpoints with the old run's (and retention
        # could delete the new ones): continuing or starting elsewhere must be explicit
        raise HpcllmError(f"--out {cfg.out}: already holds checkpoints (newest {existing[-1].name}); "
                          "add --resume auto to continue that run, or choose another --out")
    tstate = None
    if resume_dir is not None:
        tstate = ckpt.load_json(resume_dir / "trainer.json")
        check_resume_compat(resume_dir, tstate, ckpt.load_json(resume_dir / "config.json"), gpt_cfg, info)
    return Plan(info, gpt_cfg, resume_dir, tstate, int(tstate["step"]) if tstate else 0)


def _train(cfg: TrainConfig, dp, plan: Plan, stop: StopRequest) -> int:
    from hpcllm.data.loader import BatchLoader, EvalBatches
    from hpcllm.model.gpt import GPT, flops_per_token, param_count

    run_dir = Path(cfg.out)
    d, o, c, lg = cfg.data, cfg.optimizer, cfg.checkpoint, cfg.logging
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    log(dp, f"{dp.describe()}; {torch.get_num_threads()} threads per rank"
        + (f"; SLURM_RESTART_COUNT={restarts}" if restarts else ""))
    info, gpt_cfg, resume_dir, tstate, start_step = (plan.info, plan.gpt_cfg, plan.resume_dir,
                                                     plan.trainer_state, plan.start_step)
    device = setup_device(cfg.parallel, dp)
    precision = resolve_precision(cfg.precision.precision, device)
    if precision in ("bf16", "fp16") and device.type == "cpu" and not cpu_has_fast_bf16():
        log(dp, f"note: --precision {precision} on a CPU without AMX/AVX512-BF16 is emulated and usually "
                "much slower than fp32 (--precision auto picks fp32 here)")

    loader = BatchLoader(d.path, split="train", seq_len=gpt_cfg.seq_len, micro_batch=d.micro_batch,
                         accum=d.accum, dp_rank=dp.rank, dp_size=dp.size, seed=cfg.seed,
                         model_vocab_size=gpt_cfg.vocab_size)
    eval_batches = None
    if lg.eval_every > 0:
        eval_batches = EvalBatches(d.path, split="val", seq_len=gpt_cfg.seq_len, micro_batch=d.micro_batch,
                                   num_batches=lg.eval_batches, dp_rank=dp.rank, dp_size=dp.size)

    model = GPT(gpt_cfg, init_seed=cfg.seed).to(device)
    optimizer = build_optimizer(model.named_parameters(), o)
    optimizer = dp.wrap_optimizer(optimizer, model, d.accum, cfg.parallel.grad_compression)
    schedule = LRSchedule(o, cfg.steps)
    scaler = LossScaler(precision == "fp16", cfg.precision.loss_scale, cfg.precision.loss_scale_window)

    if resume_dir is not None:
        model.load_state_dict(ckpt.load_torch(resume_dir / "model.pt", map_location=device))
        optimizer.load_state_dict(ckpt.load_torch(resume_dir / "optim.pt", map_location=device))
        loader.load_state_dict(tstate["loader"])
        scaler.load_state_dict(tstate.get("loss_scaler") or {})
        rng = resume_dir / f"rng-rank{dp.rank}.pt"
        if rng.is_file():
            ckpt.set_rng_state(ckpt.load_torch(rng))
        if tstate.get("global_batch") not in (None, loader.global_batch):
            log(dp, f"note: global batch changed from {tstate['global_batch']} to {loader.global_batch} sequences")
    # rank 0's values everywhere: initial weights (identical anyway, by the seed) or the
    # checkpoint, so ranks can never start from different points
    dp.broadcast_model(model)
    dp.broadcast_optimizer_state(optimizer)
    if cfg.parallel.compile:
        from hpcllm.train.compile import compile_blocks

        log(dp, f"compiling {compile_blocks(model.block_list())} blocks with torch.compile (at the first step)")

    global_batch = loader.global_batch
    tokens_per_step = global_batch * gpt_cfg.seq_len
    fpt = flops_per_token(gpt_cfg)
    peak = device_peak_tflops(device, precision, torch.get_num_threads(), lg.peak_tflops) * 1e12
    config_json = effective_config(
        cfg, gpt_cfg, precision_resolved=precision, global_batch=global_batch,
        tokenizer_sha256=info.tokenizer_sha256, data_dir=os.path.abspath(d.path),
        world={"size": dp.size, "local_size": dp.local_size, "cross_size": dp.cross_size,
               "threads_per_rank": torch.get_num_threads(), "horovod": dp.hvd is not None},
        horovod_env={k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
        mpi_env={k: v for k, v in os.environ.items() if k.startswith("OMPI_MCA_")})
    if dp.is_root:  # rank 0 alone writes the run directory's shared files
        prepare_run_dir(run_dir, config_json, start_step)
    log(dp, f"model {gpt_cfg.name}: {gpt_cfg.n_layer} layers, {gpt_cfg.n_head} heads, d_model {gpt_cfg.d_model}, "
        f"seq_len {gpt_cfg.seq_len}, vocab {gpt_cfg.vocab_size} (padded {gpt_cfg.padded_vocab}), "
        f"{param_count(gpt_cfg) / 1e6:.2f}M parameters, {fpt / 1e6:.2f} MFLOP/token; precision {precision} on {device}")
    log(dp, f"global batch {global_batch} sequences = {tokens_per_step} tokens "
        f"(micro-batch {d.micro_batch} x accum {d.accum} x {dp.size} ranks x seq_len {gpt_cfg.seq_len})")
    if resume_dir is not None:
        log(dp, f"resumed from {resume_dir} at step {start_step}")

    metrics = MetricsLogger(run_dir, enabled=dp.is_root, flops_per_token=fpt, peak_flops_total=peak * dp.size,
                            tokens_per_step=tokens_per_step, total_steps=cfg.steps,
                            echo=lambda s: print(s, flush=True))
    tok_file = tokenizer_file(info)
    nan_at = _nan_hook(dp.rank)

    def save(step: int) -> Path:
        files = {f"rng-rank{dp.rank}.pt": ckpt.rng_state()}
        if dp.is_root:
            files["model.pt"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            files["optim.pt"] = optimizer.state_dict()
            files["config.json"] = config_json
            files["trainer.json"] = trainer_state(step, loader, schedule, scaler, info, dp, global_batch)
            if tok_file is not None:
                files["tokenizer.json"] = tok_file.read_bytes()
        path = ckpt.save(run_dir, step, files, is_root=dp.is_root, barrier=dp.barrier, keep=c.keep)
        log(dp, f"checkpoint {path}")
        return path

    params = [p for p in model.parameters() if p.requires_grad]
    last_saved = start_step if resume_dir is not None else None
    skipped_in_interval = 0
    grad_norm_value = 0.0
    model.train()
    for step in range(start_step, cfg.steps):
        if dp.watchdog is not None:
            dp.watchdog.step = step + 1
        t0 = time.perf_counter()
        lr = schedule.apply(optimizer, step)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for x, y in loader.next_batch():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(precision, device):
                loss = model(x, y) / d.accum
            if nan_at == step + 1:
                loss = loss * float("nan")
            scaler.scale_loss(loss).backward()
            loss_sum += loss.detach().float()
        ts = time.perf_counter()
        dp.synchronize(optimizer)
        sync_s = time.perf_counter() - ts
        scaler.unscale_(params)
        norm = grad_norm(params)
        agreed = agree(dp, loss_sum, math.isfinite(norm), stop.requested)

        if agreed.bad_loss_ranks:
            bad = ranks_with(dp, not bool(torch.isfinite(loss_sum)))
            good = ckpt.latest_checkpoint(run_dir)
            msg = (f"non-finite loss at step {step + 1} on rank{'s' if len(bad) > 1 else ''} "
                   f"{', '.join(map(str, bad))}; stopping without updating the weights. Last good "
                   f"checkpoint: {good if good is not None else 'none'}")
            if dp.is_root:
                print(f"error: {msg}", file=sys.stderr, flush=True)
            return exitcodes.FAILURE
        if agreed.overflow:
            if not scaler.enabled:
                if dp.is_root:
                    print(f"error: non-finite gradient norm at step {step + 1} (loss {agreed.loss:.4f}); "
                          "stopping", file=sys.stderr, flush=True)
                return exitcodes.FAILURE
            dp.skip_step(optimizer)  # every rank skips alike: the flag was agreed
            skipped_in_interval += 1
        else:
            clip_(params, norm, o.grad_clip)
            dp.step(optimizer)
            optimizer.zero_grad()
            grad_norm_value = norm
        scaler.update(agreed.overflow)
        metrics.step(agreed.loss, time.perf_counter() - t0, sync_s)
        done = step + 1
        if cfg.parallel.compile and done == start_step + 1:
            from hpcllm.train.compile import compile_report

            log(dp, f"torch.compile: {compile_report()} (rank 0, first step)")

        record = {}
        if done % lg.log_every == 0 or done == cfg.steps or agreed.stop:
            record.update(lr=lr, grad_norm=grad_norm_value, skipped=skipped_in_interval)
            if scaler.enabled:
                record["loss_scale"] = scaler.scale
            skipped_in_interval = 0
        if eval_batches is not None and (done % lg.eval_every == 0 or done == cfg.steps):
            record["val_loss"] = evaluate(model, eval_batches, device, precision, dp)
        if record:
            if "lr" in record:
                metrics.flush(done, **record)
            else:  # an eval on a step that is not logged: its own line
                metrics.write({"step": done, **record})
                if dp.is_root:
                    print(metrics.console_line({"step": done, **record}), flush=True)

        if agreed.stop:
            log(dp, f"stop requested ({stop.signal_name or 'on another rank'}) at step {done}")
            if last_saved != done:
                save(done)
            return exitcodes.REQUEUE
        if (c.ckpt_every and done % c.ckpt_every == 0) or done == cfg.steps:
            save(done)
            last_saved = done
    log(dp, f"done: {cfg.steps} steps")
    return exitcodes.OK


def _nan_hook(rank: int) -> int | None:
    spec = os.environ.get(NAN_ENV)
    if not spec:
        return None
    step, _, r = spec.partition(",")
    return int(step) if (not r or int(r) == rank) else None
