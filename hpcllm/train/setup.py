"""What a training run decides before its first step, the same for every layout: checks of
the dataset, the model and the checkpoint against each other (before MPI starts, so bad input
fails fast with one line on every rank alike), the device, the precision, the optimizer, the
partition of a pipeline, and the run directory."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcllm.config import TrainConfig, resolve_model
from hpcllm.errors import HpcllmError, excerpt
from hpcllm.fileio import write_error, write_json_atomic
from hpcllm.schema import validate
from hpcllm.train import checkpoint as ckpt
from hpcllm.train.metrics import truncate_metrics


def log(groups, msg: str) -> None:
    """A console line from world rank 0 only."""
    if groups is None or groups.is_root:
        print(f"[hpcllm] {msg}", flush=True)


@dataclass
class Plan:
    """What a run is, decided from files alone before MPI/Horovod start."""

    info: object                 # DatasetInfo
    gpt_cfg: object              # GPTConfig
    resume_dir: Path | None
    trainer_state: dict | None
    start_step: int
    reader: object = None        # CheckpointReader of resume_dir
    init_weights: object = None  # HFWeights of --init-from (a fresh run only)


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
    if cfg.model.init_from:
        from hpcllm.interop.hf import config_from_hf

        gpt_cfg = config_from_hf(cfg.model.init_from, cfg.model)
    else:
        gpt_cfg = resolve_model(cfg.model, info.vocab_size)
    info.check_vocab(gpt_cfg.vocab_size)
    if info.windows("train", gpt_cfg.seq_len) == 0:
        raise HpcllmError(f"{cfg.data.path}: the train split has {info.train_tokens} tokens, fewer than one window "
                          f"of seq_len+1 = {gpt_cfg.seq_len + 1} (lower --seq-len)")
    if cfg.logging.eval_every > 0 and info.windows("val", gpt_cfg.seq_len) == 0:
        raise HpcllmError(f"{cfg.data.path}: the val split has {info.val_tokens} tokens, fewer than one window of "
                          f"seq_len+1 = {gpt_cfg.seq_len + 1}; use --eval-every 0 or more validation data")
    pc = cfg.parallel
    if pc.pipeline_stages > gpt_cfg.n_layer:
        raise HpcllmError(f"--pipeline-stages {pc.pipeline_stages}: the model has only {gpt_cfg.n_layer} layers "
                          "(at least one per stage)")
    resume_dir = ckpt.resolve_resume(Path(cfg.out), cfg.checkpoint.resume)
    existing = ckpt.list_checkpoints(cfg.out)
    if resume_dir is None and existing:
        # a fresh run here would interleave its checkpoints with the old run's (and retention
        # could delete the new ones): continuing or starting elsewhere must be explicit
        raise HpcllmError(f"--out {cfg.out}: already holds checkpoints (newest {existing[-1].name}); "
                          "add --resume auto to continue that run, or choose another --out")
    tstate = reader = None
    if resume_dir is not None:
        reader = ckpt.CheckpointReader(resume_dir)
        tstate = reader.trainer
        validate(tstate, ckpt.TRAINER_SCHEMA, str(resume_dir / "trainer.json"))
        reader.check_files()
        check_resume_compat(resume_dir, tstate, ckpt.load_json(resume_dir / "config.json"), gpt_cfg, info)
    init = None
    if cfg.model.init_from and resume_dir is None:  # resumed: the checkpoint has the weights
        init = open_init_weights(cfg.model.init_from, cfg.model.seq_len, info)
    return Plan(info, gpt_cfg, resume_dir, tstate, int(tstate["step"]) if tstate else 0, reader, init)


def open_init_weights(path, seq_len, info):
    """``--init-from``'s model directory, checked against the dataset: the same tokenizer
    (a dataset preprocessed with ``--tokenizer DIR``), a vocabulary the model covers."""
    from hpcllm.interop.hf import HFWeights

    weights = HFWeights(path, seq_len)
    tok = weights.tokenizer()
    if tok is not None and tok.sha256 != info.tokenizer_sha256:
        raise HpcllmError(f"--init-from {path}: its tokenizer (sha256 {tok.sha256[:12]}…) is not the dataset's "
                          f"({info.tokenizer_sha256[:12]}…); preprocess the corpus with --tokenizer {path}")
    weights.names()
    return weights


def load_init_weights(plan: Plan, par, groups=None) -> None:
    """This rank's parameters from ``--init-from`` (replicated: by name into the module;
    ZeRO: into its shards, unit by unit, as a checkpoint restore does)."""
    w = plan.init_weights
    try:
        src = TPSlicedReader(w, par, groups) if par.tp_specs else w
        if par.zero_stage:
            par.grad_sync.load(src)
        else:
            par.module.load_state_dict(src.model_state(par.module.state_dict().keys()))
    finally:
        w.close()


def check_resume_compat(resume_dir: Path, trainer_state: dict, config: dict, gpt_cfg, info) -> None:
    """The checkpoint must fit this dataset (same tokenizer) and this model shape."""
    want = trainer_state.get("tokenizer_sha256")
    if want and want != info.tokenizer_sha256:
        raise HpcllmError(f"{resume_dir}: trained with tokenizer sha256 {want[:12]}…, but the dataset "
                          f"{info.data_dir} has {info.tokenizer_sha256[:12]}… (a different tokenizer)")
    saved = dict(config.get("model") or {})
    now = gpt_cfg.to_dict()
    # (the mixtures' capacity and auxiliary-loss weights are training settings, not the shape)
    free = {"name", "moe_capacity_factor", "moe_aux_loss_coef", "moe_z_loss_coef"}
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in now if k not in free and k in saved and saved[k] != now[k]]
    if diff:
        raise HpcllmError(f"{resume_dir}: checkpoint model shape differs from this run's ({'; '.join(diff)})")


def microbatches(cfg: TrainConfig) -> int:
    """Micro-batches per rank per step: ``--accum``, or with stages ``--microbatches``
    (config.validate has refused the two disagreeing)."""
    if cfg.parallel.pipeline_stages > 1 and cfg.parallel.microbatches:
        return cfg.parallel.microbatches
    return cfg.data.accum


def setup_device(pcfg, local_rank: int) -> torch.device:
    """cuda:local_rank or cpu, from --device."""
    from hpcllm.parallel.data_parallel import compute_device_type

    if compute_device_type(pcfg) == "cuda":
        if not torch.cuda.is_available():
            raise HpcllmError("--device cuda: CUDA is not available on this machine")
        idx = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def build_optimizer(named_params, ocfg, fused: bool | None = None, decay_names=None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/embeddings only (not biases, not LayerNorm);
    ``decay_names``: the names that decay, where the shape does not tell (ZeRO's flat shards).

    ``fused`` None: PyTorch's fused AdamW kernel wherever it has one for the parameters'
    device (CUDA; CPUs since PyTorch 2.4), else the multi-tensor one. On a CPU the fused step
    of the 3.3M-parameter benchmark model took 2.1-2.5 ms against 6.3-7.0 ms
    (``benchmarks/train.py --parts kernels``).
    """
    decay, no_decay = [], []
    for n, p in named_params:
        if p.requires_grad or decay_names is not None:
            (decay if (n in decay_names if decay_names is not None else p.dim() >= 2) else no_decay).append(p)

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


def choose_partition(cfg: TrainConfig, gpt_cfg, plan: Plan, groups, device, autocast):
    """The pipeline's partition: an explicit --balance wins; else a resumed pipeline run with
    the same number of stages keeps its partition; else balanced by parameters (or measured,
    ``--balance auto``)."""
    from hpcllm.parallel.pipeline.partition import Partition, make_partition

    P = groups.dims.pp
    saved = plan.reader.layout() if plan.reader is not None else {}
    if cfg.parallel.balance is None and saved.get("pp") == P and saved.get("bounds"):
        return Partition(tuple(tuple(b) for b in saved["bounds"]))
    return make_partition(gpt_cfg, P, cfg.parallel.balance or "params", micro_batch=cfg.data.micro_batch,
                          device=device, autocast=autocast, comm=groups.world)


def tokenizer_file(info) -> Path | None:
    """The dataset's tokenizer file (copied into checkpoints so generate finds it), if any."""
    name = (info.manifest.get("tokenizer") or {}).get("file")
    if name:
        p = Path(info.data_dir) / name
        if p.is_file():
            return p
    return None


def trainer_state(step: int, loader, schedule, scaler, info, groups, global_batch: int, layout: dict) -> dict:
    """trainer.json: everything besides tensors needed to continue exactly, and the layout
    the checkpoint was written under."""
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": step,
            "loader": loader.state_dict() if loader is not None else None,
            "lr_schedule": schedule.state_dict(), "loss_scaler": scaler.state_dict(),
            "tokenizer_sha256": info.tokenizer_sha256, "data_dir": os.path.abspath(info.data_dir),
            "world_size": groups.size, "global_batch": global_batch, "layout": layout, "saved_at": time.time()}


def prepare_run_dir(run_dir, config_json: dict, start_step: int) -> None:
    """Rank 0 only: create RUN_DIR, drop stale checkpoint temp dirs, write the effective
    config, and cut metrics.jsonl back to ``start_step`` (a resumed run reads as one run)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(run_dir)
        write_json_atomic(run_dir / "config.json", config_json)
        truncate_metrics(run_dir, start_step)
    except OSError as e:
        raise write_error("the run directory", e.filename or run_dir, e) from None


def checkpoint_files(par, optimizer, groups) -> dict:
    """This rank's tensor files of a checkpoint. Replicated: each part's first replica writes
    the part's model/optimizer pair; tensor parallelism: each rank of the first replica its
    shards; ZeRO: every rank writes its own shards (in parallel, nothing gathered anywhere)."""
    if par.zero_stage:
        return {ckpt.shard_file(groups.stage, groups.dp_rank, groups.tp_rank if groups.dims.tp > 1 else None): {
            "format": ckpt.SHARD_FORMAT, "zero_stage": par.zero_stage, "dp": groups.dims.dp,
            "dp_rank": groups.dp_rank, "pieces": par.grad_sync.shard_pieces(optimizer)}}
    X = groups.dims.ep
    if groups.dp_rank >= X:  # the first replica writes (expert parallelism: the first expert group)
        return {}
    owned, module = par.owned_names(), par.module
    if par.tp_specs:
        return {ckpt.shard_file(groups.stage, 0, groups.tp_rank): tp_shard_payload(par, optimizer, groups, owned)}
    skip = set(par.grad_sync.duplicate)
    if X > 1 and groups.ep_rank:  # the dense tensors are the group's first rank's; each writes its experts
        owned = {n for n in owned if n in par.expert_names}
        skip |= {n for n, _ in module.named_parameters() if n not in par.expert_names}
    model = {k: v.detach().cpu() for k, v in module.state_dict().items() if k in owned}
    optim = ckpt.named_optim_state(optimizer, module.named_parameters(), exclude=skip)
    owner = groups.stage * X + groups.ep_rank
    return {ckpt.model_file(owner): model, ckpt.optim_file(owner): optim}


def tp_shard_payload(par, optimizer, groups, owned) -> dict:
    """Tensor parallelism without ZeRO: each tensor-parallel rank of the first replica writes its
    shards (and their AdamW moments) by name, with how each tensor is cut, in the shard-file
    format (one piece per tensor); what every rank holds alike is written by the first. The
    reader joins them by name, so any layout resumes them."""
    pieces = {}
    state = optimizer.state
    for name, p in par.module.named_parameters():
        spec = par.tp_specs.get(name)
        if name not in owned or (spec is None and groups.tp_rank != 0):
            continue
        rec = {"shape": list(p.shape), "start": 0, "stop": p.numel(), "value": p.detach().cpu().reshape(-1).clone()}
        st = state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                rec[k] = st[k].detach().cpu().reshape(-1).clone()
        if "step" in st:
            rec["step"] = st["step"].detach().cpu().clone()
        if spec is not None:
            rec["tp"] = {"rank": groups.tp_rank, "size": groups.dims.tp, "dim": spec.dim, "groups": list(spec.groups)}
        pieces[name] = rec
    return {"format": ckpt.SHARD_FORMAT, "zero_stage": 0, "dp": groups.dims.dp, "dp_rank": 0, "pieces": pieces}


class TPSlicedReader:
    """A checkpoint reader whose tensors (and AdamW moments) are this rank's tensor-parallel
    shards of the whole ones (what ZeroSync.load needs under tensor parallelism)."""

    def __init__(self, reader, par, groups):
        self.reader, self.par, self.groups, self.dir = reader, par, groups, reader.dir

    def model_state(self, names=None, map_location="cpu") -> dict:
        return local_part(self.par, self.groups, self.reader.model_state(names, map_location=map_location))

    def optim_state(self, names) -> dict:
        states = self.reader.optim_state(names)
        return {n: {k: (local_part(self.par, self.groups, {n: v})[n] if torch.is_tensor(v) and v.dim() > 0 else v)
                    for k, v in st.items()} for n, st in states.items()}

    def close(self) -> None:
        self.reader.close()


def local_part(par, groups, full: dict) -> dict:
    """This rank's pieces of whole tensors (tensor parallelism slices its shards)."""
    if not getattr(par, "tp_specs", None):
        return full
    from hpcllm.parallel.tensor_parallel import shard_tensors

    return shard_tensors(full, par.tp_specs, groups.dims.tp, groups.tp_rank)


def restore(plan: Plan, par, optimizer, loader, scaler, groups, device) -> None:
    """Continue from ``plan``'s checkpoint, whatever layout wrote it: this rank's tensors and
    their optimizer state by name (ZeRO: its shards), the loader's position (ranks that read
    data), the loss scale and this rank's RNG state."""
    reader, tstate = plan.reader, plan.trainer_state
    if par.zero_stage:
        states = par.grad_sync.load(TPSlicedReader(reader, par, groups) if par.tp_specs else reader)
        if states:
            ckpt.load_named_optim_state(optimizer, par.grad_sync.optimizer_params(), states, device)
    else:
        module, src = par.module, (TPSlicedReader(reader, par, groups) if par.tp_specs else reader)
        module.load_state_dict(src.model_state(module.state_dict().keys(), map_location="cpu"))
        names = [n for n, _ in module.named_parameters()]
        ckpt.load_named_optim_state(optimizer, module.named_parameters(), src.optim_state(names), device)
    reader.close()
    if loader is not None:
        loader.load_state_dict(tstate["loader"])
    scaler.load_state_dict(tstate.get("loss_scaler") or {})
    rng = plan.resume_dir / f"rng-rank{groups.rank}.pt"
    if rng.is_file():
        try:
            ckpt.set_rng_state(ckpt.load_torch(rng))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise HpcllmError(f"{rng}: not a random-number state hpcllm wrote ({excerpt(e, 80)})") from None


def device_peak(device, precision: str, micro_batch: int, gpt_cfg, override: float | None) -> float:
    """Peak FLOP/s of one rank's device for MFU; in 16-bit on a CPU, the fp32 peak times the
    bf16/fp32 matmul ratio measured at the model's shape (the probe ``--precision auto`` uses)."""
    from hpcllm.train.metrics import device_peak_tflops
    from hpcllm.train.precision import cpu_matmul_probe, probe_shape

    speedup = None
    if device.type == "cpu" and precision != "fp32" and not override:
        speedup = cpu_matmul_probe(*probe_shape(micro_batch, gpt_cfg.seq_len, gpt_cfg.d_model,
                                                gpt_cfg.mlp_ratio)).bf16_speedup
    return device_peak_tflops(device, precision, torch.get_num_threads(), override, speedup) * 1e12


def _identity(path: Path, others=()) -> str | None:
    """sha256 of ``path``'s bytes and of the sizes of ``others`` (shards, tensor files): a stale
    or partial copy differs in one of them; None when ``path`` is unreadable."""
    import hashlib

    try:
        h = hashlib.sha256(Path(path).read_bytes())
    except OSError:
        return None
    for f in others:
        try:
            size = os.stat(f).st_size
        except OSError:
            size = -1
        h.update(f"{Path(f).name}:{size};".encode())
    return h.hexdigest()


def check_ranks_agree(groups, plan: Plan) -> None:
    """Every rank must read the same dataset and the same checkpoint: a node with a stale copy
    at the same path would otherwise train silently on other data. One allgather of the
    manifest's sha256 with its shards' sizes (and trainer.json's with the tensor files'); on a
    mismatch every rank raises the same one-line error naming the ranks that differ."""
    if groups.size == 1:
        return
    data = Path(plan.info.data_dir)
    manifest = data / "manifest.json"
    shards = [e["path"] for sp in plan.info.manifest["splits"].values() for e in sp["shards"]]
    mine = [("dataset", str(manifest), _identity(manifest, [data / s for s in shards]))]
    if plan.resume_dir is not None:
        t = plan.resume_dir / "trainer.json"
        mine.append(("checkpoint", str(t), _identity(t, sorted(plan.resume_dir.glob("*.pt")))))
    seen = groups.allgather(mine, what="the check that every rank reads the same files")
    for i, (what, path, _) in enumerate(mine):
        by_sha: dict = {}
        for rank, entries in enumerate(seen):
            by_sha.setdefault(entries[i][2], []).append(rank)
        if len(by_sha) > 1:
            parts = [f"rank{'s' if len(r) > 1 else ''} {_ranges(r)} see{'s' if len(r) == 1 else ''} sha256 "
                     f"{(sha or 'unreadable')[:12]}" for sha, r in sorted(by_sha.items(), key=lambda kv: kv[1][0])]
            raise HpcllmError(f"{path}: the ranks read different {what} files at this path ({'; '.join(parts)}); "
                              "a node with a stale or partial copy? Give every node the same files")


def _ranges(ranks: list[int]) -> str:
    """0,1,2,5 -> '0-2, 5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r > start else f"{r}")
            start = None
    return ", ".join(out)


@contextlib.contextmanager
def lock_run_dir(run_dir, groups):
    """Rank 0 holds the run directory's lock for the whole run (a second job writing the same
    --out would interleave checkpoints and metrics); every rank raises the same one-line
    error when it is taken."""
    from hpcllm.locking import lock_dir

    lock, err = None, None
    if groups.is_root:
        try:
            lock = lock_dir(run_dir).acquire()
        except HpcllmError as e:
            err = str(e)
    err = groups.bcast(err, what="the run directory lock")
    if err:
        raise HpcllmError(err)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
