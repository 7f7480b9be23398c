"""Training configuration: typed dataclasses, TOML files, flag overrides, generated Click options.

Every option of ``hpcllm train`` is a field of one of the section dataclasses below; its
``metadata["help"]`` is the ``--help`` text and its ``metadata["flag"]`` (default: the field
name with dashes) the flag. Precedence: field default < ``--config FILE.toml`` < flags.

TOML layout: top-level ``out``, ``steps``, ``seed``; one table per section
(``[model]``, ``[data]``, ``[optimizer]``, ``[precision]``, ``[parallel]``, ``[checkpoint]``,
``[logging]``) keyed by field name::

    steps = 2000
    [model]
    model = "mini"
    [data]
    path = "data/stdlib"
    micro_batch = 16

Other commands reuse the generated options: ``hpcllm slurm train`` takes the same flags via
:func:`train_click_options` and passes them on with :func:`to_cli_args`.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hpcllm.errors import HpcllmError
from hpcllm.options import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Range, check, number


def opt(default, help: str, flag: str | None = None, choices: tuple | None = None, range: Range | None = None,
        **kw):
    """A dataclass field carrying its CLI help, flag name, choices and allowed range (checked
    at parse time for flags and TOML alike; floats must also be finite)."""
    md = {"help": help}
    if range is not None:
        md["range"] = range
    if flag:
        md["flag"] = flag
    if choices:
        md["choices"] = tuple(choices)
    md.update(kw)
    return field(default=default, metadata=md)


@dataclass
class ModelConfig:
    """Model shape: a preset, optionally with some dimensions overridden."""

    model: str = opt("tiny", "Model preset (tiny, mini, small, 124M, 350M, 760M, 1.3B, 2.7B, 6.7B, 13B, 175B; "
                     "Llama-style: llama-tiny, llama-mini, llama-small, llama-1B, llama-3B, llama-8B).")
    arch: Optional[str] = opt(None, "Architecture [default: the preset's]: gpt2 (LayerNorm, GELU, tied, biases) or "
                              "llama (RMSNorm, SwiGLU, rotary halves, grouped-query attention, no biases, untied).",
                              choices=("gpt2", "llama"))
    n_kv_head: Optional[int] = opt(None, "Key/value heads (grouped-query attention; llama only; must divide "
                                   "--n-head) [default: the preset's, else --n-head].", range=AT_LEAST_1)
    tie_embeddings: Optional[bool] = opt(None, "Tie the output head to the input embedding [default: gpt2 tied, "
                                         "llama untied; the preset's].")
    ffn_dim: Optional[int] = opt(None, "MLP hidden size [default: 4 x d_model for gpt2; for llama 8/3 x d_model "
                                 "rounded up to a multiple of min(256, d_model), or the preset's].", range=AT_LEAST_1)
    init_from: Optional[str] = opt(None, "Start from a Hugging Face model directory (GPT-2, GPT-NeoX or Llama "
                                   "safetensors, as `hpcllm export --format hf` writes): its shape replaces "
                                   "--model, its weights the initialisation; new optimizer, step 0.")
    n_layer: Optional[int] = opt(None, "Override the preset's number of layers.", range=AT_LEAST_1)
    n_head: Optional[int] = opt(None, "Override the preset's number of attention heads.", range=AT_LEAST_1)
    d_model: Optional[int] = opt(None, "Override the preset's model width.", range=AT_LEAST_1)
    seq_len: Optional[int] = opt(None, "Sequence length in tokens [default: the preset's].", range=AT_LEAST_1)
    pos_emb: Optional[str] = opt(None, "Position encoding [default: learned].", choices=("learned", "rope"))
    attention: Optional[str] = opt(None, "Attention pattern [default: dense]: dense (causal, every earlier key), "
                                   "local (causal window of --attention-window keys) or bigbird (window + "
                                   "--attention-global tokens + --attention-random blocks); local/bigbird run "
                                   "block-sparse kernels with memory linear in --seq-len.",
                                   choices=("dense", "local", "bigbird"))
    attention_window: Optional[int] = opt(None, "local/bigbird: keys per query in the causal local band, itself "
                                          "included [default: 256].", range=AT_LEAST_1)
    attention_global: Optional[int] = opt(None, "bigbird: the first G tokens are global (every query sees them, "
                                          "they see every earlier token) [default: 0].", range=NON_NEGATIVE)
    attention_random: Optional[int] = opt(None, "bigbird: random earlier key blocks per query block, the same on "
                                          "every rank and restart (seeded by --attention-seed and the layer) "
                                          "[default: 0].", range=NON_NEGATIVE)
    attention_block: Optional[int] = opt(None, "local/bigbird: block size of the sparse kernel and of the random "
                                         "blocks [default: 64].", range=AT_LEAST_1)
    attention_seed: Optional[int] = opt(None, "bigbird: seed of the random blocks [default: 0].", range=NON_NEGATIVE)
    moe_experts: Optional[int] = opt(None, "Mixture of experts: expert MLPs per mixture block, each token routed to "
                                     "--moe-top-k of them [default: 0, dense MLPs].", range=NON_NEGATIVE)
    moe_top_k: Optional[int] = opt(None, "Experts per token: 1 (Switch) or 2 (GShard; the two gates renormalised) "
                                   "[default: 1].", range=Range(1, 2))
    moe_every: Optional[int] = opt(None, "Every Nth block is a mixture, the others dense: block i when (i+1) % N "
                                   "== 0 [default: 1, every block].", range=AT_LEAST_1)
    moe_capacity_factor: Optional[float] = opt(None, "Assignments an expert takes per micro-batch: ceil(C x tokens x "
                                               "top-k / experts), the rest dropped (first choices, then earlier "
                                               "tokens, kept first); 0 = dropless [default: 0]. Training only: "
                                               "evaluation and generation never drop.", range=NON_NEGATIVE)
    moe_aux_loss_coef: Optional[float] = opt(None, "Weight of the load-balancing loss E x sum_i f_i x P_i "
                                             "[default: 0.01].", range=NON_NEGATIVE)
    moe_z_loss_coef: Optional[float] = opt(None, "Weight of the router z-loss mean(logsumexp(logits)^2) "
                                           "[default: 0, off].", range=NON_NEGATIVE)


@dataclass
class DataConfig:
    """The dataset and how it is cut into batches."""

    path: Optional[str] = opt(None, "Dataset directory written by `hpcllm preprocess` (required).", flag="--data")
    micro_batch: int = opt(8, "Sequences per forward/backward pass per rank.", range=AT_LEAST_1)
    accum: int = opt(1, "Gradient accumulation steps: micro-batches per rank per optimizer step.", range=AT_LEAST_1)


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = opt(6e-4, "Peak learning rate.", range=POSITIVE)
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of --lr (end of the cosine).", range=FRACTION)
    warmup: int = opt(100, "Linear warmup steps (capped at --steps).", range=NON_NEGATIVE)
    decay_steps: Optional[int] = opt(None, "Step where the cosine reaches its minimum [default: --steps].", range=AT_LEAST_1)
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices and embeddings only; not biases/LayerNorm).", range=NON_NEGATIVE)
    beta1: float = opt(0.9, "AdamW beta1.", range=Range(0, 1, hi_open=True))
    beta2: float = opt(0.95, "AdamW beta2.", range=Range(0, 1, hi_open=True))
    eps: float = opt(1e-8, "AdamW epsilon.", flag="--adam-eps", range=POSITIVE)
    grad_clip: float = opt(1.0, "Clip the global norm of the synchronized gradients to this (0: off).", range=NON_NEGATIVE)


@dataclass
class PrecisionConfig:
    """Autocast dtype and fp16 loss scaling."""

    precision: str = opt("auto", "Compute precision; auto = bf16 where the hardware has fast bf16 (CUDA "
                         "Ampere+, CPUs with AMX/AVX512-BF16), else fp32.",
                         choices=("auto", "fp32", "bf16", "fp16"))
    loss_scale: float = opt(65536.0, "fp16: initial dynamic loss scale.", range=POSITIVE)
    loss_scale_window: int = opt(1000, "fp16: double the loss scale after this many steps without overflow.", range=AT_LEAST_1)


@dataclass
class ParallelConfig:
    """Devices, threads, compilation, Horovod knobs and pipeline layout."""

    device: str = opt("auto", "auto (cuda if available), cpu or cuda; with cuda each rank uses GPU local_rank.",
                      choices=("auto", "cpu", "cuda"))
    threads: Optional[int] = opt(None, "Intra-op threads per rank [default: cores per node / ranks per node].", range=AT_LEAST_1)
    compile: bool = opt(False, "torch.compile each transformer block (fuses norms, GELU and casts around the "
                        "matmuls; costs 15-60 s at the first step of each process; measure before relying "
                        "on it: no gain for the CPU benchmark shape).")
    grad_compression: str = opt("none", "Compress gradients on the wire (Horovod).", choices=("none", "fp16"))
    fusion_threshold_mb: float = opt(64.0, "Horovod tensor fusion buffer in MiB (HOROVOD_FUSION_THRESHOLD).", range=NON_NEGATIVE)
    cycle_time_ms: Optional[float] = opt(None, "Horovod background cycle time in ms (HOROVOD_CYCLE_TIME) "
                                         "[default: 0.1 when the ranks compute on GPUs, 2 on CPU-only ranks]. "
                                         "Each cycle's negotiation spins a CPU core: with GPUs the cores are "
                                         "free and 0.1 ms gives the lowest allreduce latency; where ranks x "
                                         "threads fill every core, 2 ms keeps it off the compute cores (without "
                                         "Open MPI yielding, 0.1 ms slowed a 2-rank CPU step 1.7x; with the "
                                         "yielding hpcllm sets, 0.1, 0.5 and 2 ms were within noise: "
                                         "benchmarks/train.py).", range=POSITIVE)
    hierarchical_allreduce: bool = opt(False, "Allreduce within nodes, then across nodes "
                                       "(HOROVOD_HIERARCHICAL_ALLREDUCE; with --zero-stage also the "
                                       "parameter all-gathers, HOROVOD_HIERARCHICAL_ALLGATHER).")
    timeline: Optional[str] = opt(None, "Write a Horovod timeline (Chrome trace JSON) to this path.")
    stall_check_s: float = opt(60.0, "Warn when a rank has waited this many seconds for the others in a collective.", range=AT_LEAST_1)
    stall_shutdown_s: float = opt(120.0, "End the job when a rank waits this long for the others in a collective "
                                  "or a pipeline transfer (a dead or frozen rank).", range=AT_LEAST_1)
    pipeline_stages: int = opt(1, "Pipeline stages (1 = pure data parallelism).", range=AT_LEAST_1)
    tensor_parallel: int = opt(1, "Tensor-parallel ranks per model part (Megatron-style: attention by heads, MLP "
                               "column then row, vocabulary-parallel embedding and loss); consecutive ranks, so "
                               "a group sits within a node. world = tensor-parallel x stages x replicas.",
                               range=AT_LEAST_1)
    tp_backend: str = opt("auto", "Tensor-parallel collectives: auto (both measured at the block's message size at "
                          "startup, the faster kept, named in the run log), mpi4py, or horovod.",
                          choices=("auto", "mpi4py", "horovod"))
    expert_parallel: int = opt(1, "Split each mixture's experts over this many data-parallel ranks (must divide "
                               "the replicas and --moe-experts): tokens travel to their experts' ranks and back by "
                               "all-to-all; each rank still reads its own batch.", range=AT_LEAST_1)
    ep_backend: str = opt("auto", "Expert-parallel token all-to-all: auto (both measured at one micro-batch's "
                          "message size at startup, the faster kept, named in the run log), horovod "
                          "(hvd.alltoall with splits in the expert group's process set) or mpi4py (Alltoallv).",
                          choices=("auto", "horovod", "mpi4py"))
    sequence_parallel: bool = opt(False, "With --tensor-parallel: norms, residuals and dropout-free regions on "
                                  "sequence chunks (each rank 1/T of those activations); all-gather / reduce-scatter "
                                  "instead of the all-reduces. --seq-len must be divisible by T.")
    schedule: str = opt("1f1b", "Pipeline schedule: 1f1b (stage s holds at most P - s micro-batches of "
                        "activations), gpipe (all forwards, then all backwards; holds M) or zbh1 "
                        "(zero-bubble 1F1B: linear layers' weight gradients deferred into the bubble, "
                        "a third of 1F1B's bubble for up to P more micro-batches of deferred work).",
                        choices=("1f1b", "gpipe", "zbh1"))
    microbatches: Optional[int] = opt(None, "Pipeline micro-batches per step [default: --accum; the same "
                                      "quantity as --accum, named for pipelines].", range=AT_LEAST_1)
    balance: Optional[str] = opt(None, "Layers per stage, comma-separated (e.g. 5,4,4,3) [default: even].")
    zero_stage: int = opt(0, "Shard the model state over the data-parallel ranks (ZeRO over Horovod): 0 replicated "
                          "(16 bytes/parameter per rank with AdamW), 1 optimizer states (4+4+8/N), 2 also "
                          "gradients (4+12/N), 3 also parameters, gathered block by block (16/N).",
                          range=Range(0, 3))
    recompute: bool = opt(False, "Recompute each block's activations in the backward pass (any layout): "
                          "keeps only block inputs between forward and backward, for about one more "
                          "forward pass of compute.")


@dataclass
class CheckpointConfig:
    """When to write checkpoints and what to resume from."""

    ckpt_every: int = opt(1000, "Write a checkpoint every N steps (and always at the end; 0: only at the end).", range=NON_NEGATIVE)
    keep: int = opt(3, "Keep the newest K checkpoints.", flag="--keep-checkpoints", range=AT_LEAST_1)
    resume: Optional[str] = opt(None, "'auto' (newest complete checkpoint in --out, if any) or a checkpoint "
                                "directory.")


@dataclass
class LoggingConfig:
    """Metrics, evaluation and throughput accounting."""

    log_every: int = opt(10, "Log metrics every N steps.", range=AT_LEAST_1)
    eval_every: int = opt(0, "Compute the validation loss every N steps (0: never; also at the end if > 0).", range=NON_NEGATIVE)
    eval_batches: int = opt(8, "Micro-batches per rank for each validation loss.", range=AT_LEAST_1)
    peak_tflops: Optional[float] = opt(None, "Peak TFLOP/s of one device for MFU [default: by device type].", range=POSITIVE)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "precision": PrecisionConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass
class TrainConfig:
    """Everything `hpcllm train` needs."""

    out: Optional[str] = opt(None, "Run directory: checkpoints/, metrics.jsonl, config.json (required).")
    steps: int = opt(1000, "Optimizer steps to train for (total, including resumed ones).", range=AT_LEAST_1)
    seed: int = opt(0, "Seed for initialisation and data order.", range=NON_NEGATIVE)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- option table


@dataclass(frozen=True)
class OptionSpec:
    """One generated flag: where it lands in TrainConfig and how Click parses it."""

    flag: str          # "--micro-batch"
    section: str | None  # "data", or None for a top-level field
    name: str          # "micro_batch"
    type: type         # int, float, str or bool
    default: Any
    help: str
    choices: tuple | None = None
    range: Range | None = None

    @property
    def param(self) -> str:
        """The Click parameter (Python keyword) name."""
        return self.flag.lstrip("-").replace("-", "_")


def _base_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _specs_of(cls, section) -> list[OptionSpec]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append(OptionSpec(flag, section, f.name, _base_type(hints[f.name]), f.default,
                              f.metadata["help"], f.metadata.get("choices"), f.metadata.get("range")))
    return out


def option_specs() -> list[OptionSpec]:
    """All `hpcllm train` flags, generated from the dataclasses (top-level fields first)."""
    specs = _specs_of(TrainConfig, None)
    for name, cls in SECTIONS.items():
        specs += _specs_of(cls, name)
    flags = [s.flag for s in specs]
    assert len(flags) == len(set(flags)), "duplicate flag in config dataclasses"
    return specs


def train_click_options() -> list:
    """Click option decorators for every train flag (plus ``--config``), in help order.

    Every option defaults to None so that only flags given on the command line override the
    TOML file; the help shows the dataclass default.
    """
    import click

    decorators = [click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                               help="TOML file with any of these settings; flags override it.")]
    for s in option_specs():
        shown = "" if s.default is None or "[default" in s.help else f" [default: {_fmt(s.default)}]"
        if s.type is bool:
            neg = "--no-" + s.flag[2:]
            decorators.append(click.option(f"{s.flag}/{neg}", s.param, default=None, help=s.help + shown))
            continue
        if s.choices:
            ctype = click.Choice(list(s.choices))
        elif s.type in (int, float):
            ctype = number(s.type, s.range)
            shown += f" [{s.range.text() if s.range else 'finite'}]"
        else:
            ctype = str
        decorators.append(click.option(s.flag, s.param, type=ctype, default=None, help=s.help + shown))
    return decorators


def add_train_options(func):
    """Decorate a Click command with :func:`train_click_options`."""
    for dec in reversed(train_click_options()):
        func = dec(func)
    return func


def _fmt(v):
    return str(v).lower() if isinstance(v, bool) else v


# --------------------------------------------------------------------------- building


def load_toml(path: str | os.PathLike) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise HpcllmError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)"
        raise HpcllmError(f"{p}: invalid TOML: {e}") from None


def _coerce(spec: OptionSpec, value, where: str):
    if value is None:
        return None
    t = spec.type
    ok = (isinstance(value, bool) if t is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
          isinstance(value, int) and not isinstance(value, bool) if t is int else isinstance(value, str))
    if not ok:
        raise HpcllmError(f"{where}: '{spec.name}' must be {t.__name__}, not {value!r}")
    if spec.choices and value not in spec.choices:
        raise HpcllmError(f"{where}: '{spec.name}' must be one of {', '.join(spec.choices)}, not {value!r}")
    return float(value) if t is float else value


def apply_mapping(cfg: TrainConfig, data: dict, where: str) -> TrainConfig:
    """Set fields from a nested dict shaped like the TOML layout (unknown keys are errors)."""
    specs = {(s.section, s.name): s for s in option_specs()}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise HpcllmError(f"{where}: [{key}] must be a table")
            for k, v in value.items():
                spec = specs.get((key, k))
                if spec is None:
                    known = ", ".join(f.name for f in dataclasses.fields(SECTIONS[key]))
                    raise HpcllmError(f"{where}: unknown key '{k}' in [{key}] (known: {known})")
                setattr(getattr(cfg, key), k, _coerce(spec, v, where))
        else:
            spec = specs.get((None, key))
            if spec is None:
                raise HpcllmError(f"{where}: unknown key '{key}' (sections: {', '.join(SECTIONS)}; "
                                  f"top level: out, steps, seed)")
            setattr(cfg, key, _coerce(spec, value, where))
    return cfg


def build_config(config_file: str | None = None, **flags) -> TrainConfig:
    """Defaults, then the TOML file, then every flag whose value is not None.

    ``flags`` are keyed by Click parameter name (``micro_batch``, ``data``, ``keep_checkpoints``).
    """
    cfg = TrainConfig()
    given = set()
    if config_file:
        data = load_toml(config_file)
        apply_mapping(cfg, data, str(config_file))
        for key, value in data.items():
            given |= {f"{key}.{k}" for k in value} if key in SECTIONS and isinstance(value, dict) else {key}
    by_param = {s.param: s for s in option_specs()}
    for param, value in flags.items():
        if value is None:
            continue
        spec = by_param.get(param)
        if spec is None:
            raise HpcllmError(f"unknown train option {param}")
        target = cfg if spec.section is None else getattr(cfg, spec.section)
        setattr(target, spec.name, _coerce(spec, value, spec.flag))
        given.add(spec.name if spec.section is None else f"{spec.section}.{spec.name}")
    cfg.given = frozenset(given)
    validate(cfg)
    return cfg


def is_given(cfg: TrainConfig, key: str) -> bool:
    """Whether option ``section.name`` was set (by a flag or the TOML file); for a config built
    in Python, whether it differs from the default."""
    given = getattr(cfg, "given", None)
    if given is not None:
        return key in given
    section, _, name = key.rpartition(".")
    now = getattr(getattr(cfg, section) if section else cfg, name)
    default = getattr(SECTIONS[section]() if section else TrainConfig(), name)
    return now != default


def to_cli_args(flags: dict) -> list[str]:
    """Turn Click kwargs (as received by a command using :func:`train_click_options`) back
    into ``hpcllm train`` arguments, keeping only the options that were given."""
    by_param = {s.param: s for s in option_specs()}
    args = []
    if flags.get("config_file"):
        args += ["--config", str(flags["config_file"])]
    for param, value in flags.items():
        spec = by_param.get(param)
        if spec is None or value is None:
            continue
        if spec.type is bool:
            args.append(spec.flag if value else "--no-" + spec.flag[2:])
        else:
            args += [spec.flag, str(value)]
    return args


def validate(cfg: TrainConfig) -> None:
    """Range checks that do not need the dataset; messages name the flag."""
    def need(cond, msg):
        if not cond:
            raise HpcllmError(msg)

    # every numeric option in its field's range (and finite): TOML values, flags and configs
    # built in Python alike
    for spec in option_specs():
        target = cfg if spec.section is None else getattr(cfg, spec.section)
        check(spec.flag, getattr(target, spec.name), spec.range)
    d, o, c, lg, p = cfg.data, cfg.optimizer, cfg.checkpoint, cfg.logging, cfg.parallel
    # options of one layout are errors in another, never silently ignored
    if p.pipeline_stages == 1:
        for key, flag in (("parallel.schedule", "--schedule"), ("parallel.microbatches", "--microbatches"),
                          ("parallel.balance", "--balance")):
            need(not is_given(cfg, key), f"{flag} applies to pipeline stages only (--pipeline-stages > 1); "
                 + ("without stages the micro-batches per step are --accum" if flag == "--microbatches"
                    else "this run has none"))
    elif p.microbatches is not None and is_given(cfg, "data.accum"):
        need(p.microbatches == d.accum, f"--accum {d.accum} and --microbatches {p.microbatches}: both set the "
             "micro-batches per pipeline step; give one of them")
    # compiled blocks would bake in the linear layers the zero-bubble split must intercept
    need(not (p.compile and p.schedule == "zbh1" and p.pipeline_stages > 1),
         "--compile does not combine with --schedule zbh1 (its weight-gradient split runs eager); "
         "use --schedule 1f1b to compile")
    need(not (p.zero_stage == 3 and p.pipeline_stages > 1),
         f"--zero-stage 3 does not combine with --pipeline-stages {p.pipeline_stages} (each stage's parameters "
         "would be gathered once per micro-batch); use --zero-stage 1 or 2 with stages")
    if not cfg.model.moe_experts:
        given = [f"--{k.replace('_', '-')}" for k in ("moe_top_k", "moe_every", "moe_capacity_factor",
                                                      "moe_aux_loss_coef", "moe_z_loss_coef")
                 if getattr(cfg.model, k) is not None]
        need(not given, f"{', '.join(given)}: mixture-of-experts options need --moe-experts E (>= 1)")
    need(not (cfg.model.moe_experts and p.tensor_parallel > 1),
         f"--moe-experts does not combine with --tensor-parallel {p.tensor_parallel} yet (the experts are not "
         "split by tensor parallelism); use --expert-parallel over the data-parallel ranks instead")
    if p.expert_parallel > 1:
        need(bool(cfg.model.moe_experts), f"--expert-parallel {p.expert_parallel} splits the experts of a mixture "
             "of experts: give --moe-experts")
        need(not cfg.model.moe_experts or cfg.model.moe_experts % p.expert_parallel == 0,
             f"--expert-parallel {p.expert_parallel}: does not divide --moe-experts {cfg.model.moe_experts} "
             "(each rank of an expert group holds experts / X of them)")
    elif is_given(cfg, "parallel.ep_backend"):
        need(False, "--ep-backend applies to expert parallelism only (--expert-parallel > 1)")
    need(not (p.sequence_parallel and p.tensor_parallel == 1),
         "--sequence-parallel applies to tensor parallelism only (--tensor-parallel > 1)")
    need(p.stall_shutdown_s >= p.stall_check_s,
         f"--stall-shutdown-s {p.stall_shutdown_s} must be >= --stall-check-s {p.stall_check_s} >= 1")


def resolve_model(mcfg: ModelConfig, vocab_size: int):
    """The GPTConfig for a model section and the dataset's vocabulary."""
    from dataclasses import replace

    from hpcllm.model.gpt import LLAMA_DEFAULTS, PRESETS

    # (--init-from: the shape is the model directory's, see hpcllm.interop.hf.config_from_hf)
    if mcfg.model not in PRESETS:
        raise HpcllmError(f"--model {mcfg.model}: unknown preset (known: {', '.join(PRESETS)})")
    base = PRESETS[mcfg.model]
    arch = mcfg.arch or base.arch
    changes = {}
    if arch != base.arch:  # a preset's shape trained as the other architecture
        changes = dict(LLAMA_DEFAULTS) if arch == "llama" else {"arch": "gpt2", "bias": True, "tie_embeddings": True,
                                                                 "n_kv_head": None, "rope_base": 10000.0}
    overrides = {"n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "d_model": mcfg.d_model, "seq_len": mcfg.seq_len,
                 "pos_emb": mcfg.pos_emb, "n_kv_head": getattr(mcfg, "n_kv_head", None),
                 "tie_embeddings": getattr(mcfg, "tie_embeddings", None), "ffn_dim": getattr(mcfg, "ffn_dim", None)}
    overrides.update({f: getattr(mcfg, f, None) for f in ("attention", "attention_window", "attention_global",
                                                          "attention_random", "attention_block", "attention_seed",
                                                          "moe_experts", "moe_top_k", "moe_every",
                                                          "moe_capacity_factor", "moe_aux_loss_coef",
                                                          "moe_z_loss_coef")})
    changes.update({k: v for k, v in overrides.items() if v is not None})
    if mcfg.n_head is not None and getattr(mcfg, "n_kv_head", None) is None:
        # the preset's grouping (n_head / n_kv_head) kept for a new head count when it divides
        group = base.n_head // base.n_kv_head if arch == base.arch == "llama" else 1
        changes["n_kv_head"] = mcfg.n_head // group if mcfg.n_head % group == 0 else mcfg.n_head
    if arch != "llama" and "n_kv_head" in changes and changes["n_kv_head"] is not None \
            and changes["n_kv_head"] != changes.get("n_head", base.n_head):
        raise HpcllmError(f"--n-kv-head {changes['n_kv_head']}: grouped-query attention needs --arch llama")
    try:
        return replace(base, vocab_size=vocab_size, **changes)
    except ValueError as e:
        msg = str(e)
        if "n_kv_head" in msg and "does not divide" in msg:
            msg = (f"--n-kv-head {changes.get('n_kv_head', base.n_kv_head)} does not divide "
                   f"--n-head {changes.get('n_head', base.n_head)}")
        if msg.startswith("moe_"):  # name the flag
            flag, _, rest = msg.partition(" ")
            msg = f"--{flag.replace('_', '-')} {rest}".replace("moe_every", "--moe-every").replace(
                "moe_top_k", "--moe-top-k")
        if msg.startswith("attention"):  # the sparse attention options: name the flags
            msg = msg.replace("attention_", "--attention-").replace("attention local", "--attention local") \
                .replace("need attention bigbird", "need --attention bigbird")
            if msg.startswith("attention must"):
                msg = "--" + msg
        raise HpcllmError(f"--model {mcfg.model}: {msg}") from None


def effective_config(cfg: TrainConfig, gpt_cfg=None, **extra) -> dict:
    """The JSON written to RUN_DIR/config.json and each checkpoint: the train config, with
    ``model`` replaced by the resolved GPTConfig fields (what generate/export rebuild from)
    and the preset section kept as ``model_options``."""
    d = cfg.to_dict()
    if gpt_cfg is not None:
        d["model_options"] = d["model"]
        d["model"] = gpt_cfg.to_dict()
    d.update(extra)
    return d
