"""Memory of one training process: parameters, gradients, optimizer, activations, buffers.

The activation model follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", section 4.1), re-derived for hpcllm's GPT (model/gpt.py), and
checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` (tests/plan/test_memory.py).
Per transformer layer and micro-batch of ``b`` sequences of ``s`` tokens, width ``h``:

======================================  =====================  ====================
tensor saved for the backward pass       elements               dtype under autocast
======================================  =====================  ====================
LayerNorm inputs (ln_1, ln_2)            2 sbh                  residual (fp32)
QKV input, attention-projection input    2 sbh                  matmul (bf16)
Q, K, V (kept by attention)              3 sbh                  matmul
MLP input                                1 sbh                  matmul
GELU input, MLP-projection input         8 sbh                  matmul
attention probabilities (non-flash)     a s^2 b                matmul
======================================  =====================  ====================

so ``sbh (2 e_res + 14 e_mm)`` bytes per layer: 64 sbh in fp32 and 36 sbh with bf16 autocast
(hpcllm keeps the residual stream and LayerNorms in fp32). Korthikanti's
``sbh (34 + 5 a s / h)`` is the same count for pure 16-bit activations (2*2 + 2*14 = 32) plus
two 1-byte dropout masks, plus the materialised attention scores; hpcllm has no dropout and
uses ``scaled_dot_product_attention`` (flash kernels keep only a log-sum-exp per row), so the
``5 a s / h`` term is absent, except on CPUs in bf16/fp16 for sequences up to 512 tokens, where
hpcllm's attention is two matmuls that keep the softmax output (``a s^2 b`` 16-bit elements). With full recomputation a layer keeps only its input (``sbh e_res``,
Korthikanti's ``2 sbh`` in 16-bit) and one layer's activations are rebuilt at a time.

Per parameter: fp32 weights 4 B + fp32 gradients 4 B + AdamW moments 8 B = 16 B; with bf16/fp16
autocast the 16-bit copies of the matmul weights made in the forward pass add 2 B (18 B). So
1B parameters in fp32 take 4 GB of weights (and 16 GB with gradients and AdamW).

ZeRO (``--zero-stage``, over the D data-parallel ranks): the model state per rank at the
optimizer step is 16 B/parameter replicated, ``4 + 4 + 8/D`` with stage 1 (optimizer states
sharded), ``4 + 12/D`` with stage 2 (gradients too) and ``16/D`` with stage 3 (parameters
too) (:func:`model_state_bytes`). On top come ZeRO's working buffers: stage 2-3 a unit's
gradients and their flat copy while its reduce-scatter runs (two blocks' worth), and with
accumulation the whole gradients until the last micro-batch (reduced once per step); stage 3
the gathered parameters (the root unit, embeddings and head, for the whole step, plus the
current and the prefetched block). Under autocast the 16-bit weight copies stay whole in
every stage (they are kept for the backward pass).

The peak of a step is the larger of two phases: forward/backward (weights, optimizer state,
gradients, 16-bit weight copies, the activations of every micro-batch in flight, backward
temporaries) and the optimizer step (weights, gradients, optimizer state and the temporaries
of the optimizer's update: PyTorch's multi-tensor AdamW on GPUs allocates one fp32 tensor per
parameter; on CPUs it runs tensor by tensor).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from hpcllm.errors import HpcllmError
from hpcllm.plan.devices import DeviceProfile

MiB = 1024**2

PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("1f1b", "gpipe", "zbh1")

#: Horovod's default tensor-fusion buffer (HOROVOD_FUSION_THRESHOLD), allocated once per
#: process when gradients are allreduced (data parallelism > 1).
DEFAULT_FUSION_BYTES = 64 * MiB
#: Pipeline send/receive buffers per direction the engine preallocates.
P2P_SLOTS = 2


@dataclass(frozen=True)
class Shape:
    """The numbers of a GPT shape the memory and time models need (from model/gpt.py)."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab: int
    """Padded vocabulary (rows of the embedding / columns of the head)."""
    params: int
    """Total parameters (tied head counted once)."""
    block_params: int
    embed_params: int
    """Token (+ position) embedding parameters: the first stage's extra."""
    head_params: int
    """Final LayerNorm + the tied head matrix: the last stage's extra (a copy when P > 1)."""
    flops_per_token: float
    """Training FLOPs per token (forward + backward), PaLM convention."""
    block_flops_per_token: float
    head_flops_per_token: float
    name: str = "custom"
    tied: bool = True
    """The head is the embedding matrix (one copy in a one-stage model)."""
    block_replicated_params: int = 0
    """Of a block's parameters, those tensor parallelism does not split (norms, row-parallel biases)."""
    position_params: int = 0
    """Learned position embeddings (replicated under tensor parallelism)."""
    kv_heads: int = 0
    hidden: int = 0
    """MLP hidden size (tensor parallelism needs it, the heads and the vocabulary divisible by T)."""
    sparse_kv_factor: float = 0.0
    """Sparse attention (local/bigbird): elements of the gathered key (and value) blocks per
    key element, n_k x block / chunk (0: dense)."""

    def tp_fits(self, tp: int) -> bool:
        return tp == 1 or not (self.n_head % tp or (self.kv_heads or self.n_head) % tp
                               or (self.hidden or 4 * self.d_model) % tp or self.vocab % tp)

    @classmethod
    def from_config(cls, cfg) -> "Shape":
        from hpcllm.model import gpt

        # a block's mean parameters (a mixture of experts holds all E experts; its FLOPs count k)
        blocks = sum(gpt.block_param_count(cfg, i) for i in range(cfg.n_layer))
        block = round(blocks / cfg.n_layer)
        embed = cfg.padded_vocab * cfg.d_model + (cfg.seq_len * cfg.d_model if cfg.pos_emb == "learned" else 0)
        total = gpt.param_count(cfg)
        # final norm + head matrix (tied: a copy of the embedding the total counted once)
        tied = getattr(cfg, "tie_embeddings", True)
        head = total - embed - blocks + (cfg.padded_vocab * cfg.d_model if tied else 0)
        fpt = float(gpt.flops_per_token(cfg))
        head_f = 3.0 * 2 * cfg.d_model * cfg.padded_vocab
        return cls(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, seq_len=cfg.seq_len,
                   vocab=cfg.padded_vocab, params=total, block_params=block, embed_params=embed,
                   head_params=head, flops_per_token=fpt,
                   block_flops_per_token=(fpt - head_f) / cfg.n_layer, head_flops_per_token=head_f,
                   name=getattr(cfg, "name", "custom"), tied=tied,
                   block_replicated_params=2 * cfg.norm_params + (2 * cfg.d_model if cfg.bias else 0),
                   position_params=cfg.seq_len * cfg.d_model if cfg.pos_emb == "learned" else 0,
                   kv_heads=cfg.n_kv_head, hidden=cfg.hidden_dim, sparse_kv_factor=_sparse_kv_factor(cfg))


def _sparse_kv_factor(cfg) -> float:
    if getattr(cfg, "attention", "dense") == "dense":
        return 0.0
    from hpcllm.model.attention import pattern_for
    p = pattern_for(cfg, cfg.seq_len, 0)
    return p.n_k * p.B / p.C


@dataclass(frozen=True)
class Setup:
    """How a model is trained on one process: what the memory model needs."""

    micro_batch: int
    precision: str = "bf16"
    """fp32, or bf16/fp16 autocast with fp32 master weights."""
    optimizer: str = "adamw"
    pipeline_stages: int = 1
    data_parallel: int = 1
    microbatches: int = 1
    """Micro-batches per step and replica (gradient accumulation, or pipeline micro-batches)."""
    recompute: bool = False
    schedule: str = "1f1b"
    flash_attention: bool | None = None
    """False: the attention probabilities are materialised (a*s^2*b per layer). None: as
    hpcllm's model runs on the device (:func:`model_uses_flash_attention`)."""
    fusion_bytes: int = DEFAULT_FUSION_BYTES
    zero_stage: int = 0
    """ZeRO stage over the data-parallel ranks (0: replicated)."""
    tensor_parallel: int = 1
    sequence_parallel: bool = False

    def check(self, shape: Shape) -> None:
        if self.precision not in PRECISIONS:
            raise HpcllmError(f"--precision {self.precision!r}: choose {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise HpcllmError(f"--optimizer {self.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise HpcllmError(f"--schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        for name in ("micro_batch", "pipeline_stages", "data_parallel", "microbatches"):
            if getattr(self, name) < 1:
                raise HpcllmError(f"--{name.replace('_', '-')} must be >= 1")
        if self.tensor_parallel < 1:
            raise HpcllmError("--tensor-parallel must be >= 1")
        if not shape.tp_fits(self.tensor_parallel):
            raise HpcllmError(f"--tensor-parallel {self.tensor_parallel}: the heads, MLP width or vocabulary "
                              f"of {shape.name} are not divisible by it")
        if self.zero_stage not in ZERO_STAGES:
            raise HpcllmError(f"--zero-stage {self.zero_stage}: choose 0, 1, 2 or 3")
        if self.zero_stage == 3 and self.pipeline_stages > 1:
            raise HpcllmError("--zero-stage 3 does not combine with pipeline stages")
        if self.pipeline_stages > shape.n_layer:
            raise HpcllmError(f"--pipeline-stages {self.pipeline_stages}: the model has only "
                              f"{shape.n_layer} layers")


@dataclass
class MemoryBreakdown:
    """Peak memory of one process (the most loaded pipeline stage), in bytes."""

    stage: int
    layers: int
    params_count: int
    params: int
    grads: int
    optimizer: int
    weight_copies: int
    """16-bit copies of the matmul weights under autocast."""
    activations: int
    """Saved activations of every micro-batch in flight."""
    inflight: int
    """Micro-batches whose activations are alive at once on this stage."""
    working: int
    """Temporaries at the peak: backward buffers or optimizer-step temporaries."""
    comm_buffers: int
    """Horovod fusion buffer and pipeline send/receive buffers."""
    overhead: int
    """Runtime and framework memory (device profile)."""
    allocator_slack: int
    """Memory the allocator holds beyond live tensors (CPU: glibc heap fragmentation)."""
    total: int
    phase: str
    """Where the peak falls: 'backward' or 'optimizer'."""
    per_stage_total: list = field(default_factory=list)
    zero_buffers: int = 0
    """ZeRO: gathered parameters and gradient buckets in flight (stage 2-3), accumulated
    whole gradients (stage 2-3 with more than one micro-batch)."""
    model_state: int = 0
    """Parameters + gradients + optimizer states at the optimizer step (ZeRO-sharded)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.params), ("gradients", self.grads), ("optimizer states", self.optimizer),
                ("16-bit weight copies", self.weight_copies),
                (f"activations ({self.inflight} micro-batch{'es' if self.inflight != 1 else ''})", self.activations),
                (f"temporaries ({self.phase})", self.working), ("ZeRO buffers", self.zero_buffers),
                ("communication buffers", self.comm_buffers),
                ("framework overhead", self.overhead), ("allocator slack", self.allocator_slack)]


def model_state_bytes(n: int, zero_stage: int = 0, dp: int = 1, optimizer: str = "adamw") -> int:
    """Bytes of parameters, gradients and optimizer states one rank holds at the optimizer
    step, for ``n`` parameters (fp32) sharded by ``zero_stage`` over ``dp`` ranks."""
    d = max(1, dp) if zero_stage else 1
    per_param_state = {"adamw": 8, "sgd": 4}[optimizer]
    weights = 4 * n / d if zero_stage >= 3 else 4 * n
    grads = 4 * n / d if zero_stage >= 2 else 4 * n
    return int(round(weights + grads + per_param_state * n / d))


def bytes_per_element(precision: str) -> tuple[int, int]:
    """(residual-stream bytes, matmul-activation bytes) per element."""
    return (4, 4) if precision == "fp32" else (4, 2)


def layer_activation_bytes(shape: Shape, setup: Setup) -> int:
    """Bytes one transformer layer saves for its backward pass, one micro-batch."""
    e_res, e_mm = bytes_per_element(setup.precision)
    s, b, h, a = shape.seq_len, setup.micro_batch, shape.d_model, shape.n_head
    sbh = s * b * h
    T = setup.tensor_parallel
    sp = T if setup.sequence_parallel else 1  # what the sequence-chunked regions divide by
    if setup.recompute:
        return sbh * e_res // sp  # only the layer input; the rest is rebuilt in the backward pass
    # residual-stream inputs of the two norms and their fp32 mean/rstd (chunked with sequence
    # parallelism); the two column-parallel inputs (whole on every tensor-parallel rank: the
    # all-gathered copy is what the matmul keeps); the 12 sbh of q/k/v, the attention output,
    # and the 4h-wide MLP tensors, split over the heads / hidden columns
    n = (sbh * 2 * e_res + 2 * 2 * 4 * s * b) // sp + sbh * 2 * e_mm + sbh * 12 * e_mm // T
    if shape.sparse_kv_factor:  # block-sparse: the gathered key and value blocks + lse
        n += int(2 * e_mm * sbh * shape.sparse_kv_factor) // T + 4 * a * s * b // T
    elif setup.flash_attention is not False:
        n += 4 * a * s * b // T  # fp32 log-sum-exp per query row
    else:
        n += e_mm * a * s * s * b // T  # the softmax output (the probabilities the values see)
    return n


def model_uses_flash_attention(shape: Shape, precision: str, device: DeviceProfile) -> bool:
    """What ``hpcllm.model.gpt.causal_attention`` does: flash kernels, except on CPUs in 16-bit
    precision for short sequences, where it materialises the probabilities."""
    from hpcllm.model.gpt import CPU_MATMUL_ATTENTION_MAX_T

    return not (device.kind == "cpu" and precision != "fp32" and shape.seq_len <= CPU_MATMUL_ATTENTION_MAX_T)


def full_layer_activation_bytes(shape: Shape, setup: Setup) -> int:
    return layer_activation_bytes(shape, Setup(**{**asdict(setup), "recompute": False}))


def head_activation_bytes(shape: Shape, setup: Setup) -> int:
    """Final LayerNorm input, head input and the fp32 log-probabilities of the loss."""
    e_res, e_mm = bytes_per_element(setup.precision)
    sb = shape.seq_len * setup.micro_batch
    return sb * shape.d_model * (e_res + e_mm) + sb * shape.vocab * 4 // setup.tensor_parallel + 2 * 4 * sb


def embed_activation_bytes(shape: Shape, setup: Setup) -> int:
    return shape.seq_len * setup.micro_batch * 8  # int64 token ids kept by the lookup


def backward_temporaries(shape: Shape, setup: Setup, has_head: bool) -> int:
    """Largest transient buffers alive with the saved activations at the start of backward.

    Head: gradient of the log-probabilities and of the logits (fp32, plus a 16-bit copy under
    autocast). Layer: gradients of the two 4h-wide MLP tensors; with recomputation one
    whole layer's activations rebuilt on top.
    """
    e_res, e_mm = bytes_per_element(setup.precision)
    sb = shape.seq_len * setup.micro_batch
    layer = sb * 4 * shape.d_model * (e_mm + e_mm) // setup.tensor_parallel + sb * shape.d_model * 2 * e_res
    if setup.recompute:
        layer += full_layer_activation_bytes(shape, setup)
    head = sb * shape.vocab * (4 + 4 + (e_mm if e_mm != 4 else 0)) // setup.tensor_parallel if has_head else 0
    return max(layer, head)


def stage_layers(shape: Shape, stages: int) -> list[int]:
    """Blocks per stage, split like the pipeline's ``--balance params`` (embedding on the first
    stage, head on the last, the largest stage as small as possible)."""
    from hpcllm.parallel.pipeline.partition import PieceCosts, balance

    part = balance(PieceCosts(embed=float(shape.embed_params), blocks=(float(shape.block_params),) * shape.n_layer,
                              head=float(shape.head_params)), stages)
    return part.counts()


def inflight_microbatches(setup: Setup, stage: int) -> int:
    """Micro-batches whose activations one stage holds at once (from the real schedule)."""
    if setup.pipeline_stages == 1:
        return 1  # accumulation runs each micro-batch's backward before the next forward
    from hpcllm.parallel.pipeline.schedules import build_schedule, peak_activations

    return peak_activations(build_schedule(setup.schedule, stage, setup.pipeline_stages, setup.microbatches))


def stage_memory(shape: Shape, setup: Setup, device: DeviceProfile, stage: int,
                 layers: int) -> MemoryBreakdown:
    if setup.flash_attention is None:
        setup = replace(setup, flash_attention=model_uses_flash_attention(shape, setup.precision, device))
    P = setup.pipeline_stages
    first, last = stage == 0, stage == P - 1
    n = layers * shape.block_params + (shape.embed_params if first else 0) + (shape.head_params if last else 0)
    if first and last and shape.tied:
        n -= shape.vocab * shape.d_model  # one model: the head is tied to the embedding
    T = setup.tensor_parallel
    if T > 1:  # this rank's share: the split matrices / T, norms, row biases and positions whole
        whole = layers * shape.block_replicated_params + (shape.position_params if first else 0) \
            + (shape.head_params - shape.vocab * shape.d_model if last else 0)
        n = (n - whole) // T + whole
    Z, D = setup.zero_stage, setup.data_parallel
    shard = D if Z else 1
    weights = 4 * n // shard if Z >= 3 else 4 * n
    grads = 4 * n // shard if Z >= 2 else 4 * n
    optimizer = {"adamw": 8, "sgd": 4}[setup.optimizer] * n // shard
    zero_buffers = 0
    if Z >= 2:
        # a unit's gradients and their flat copy while it is reduce-scattered; with
        # accumulation the whole gradients until the last micro-batch's backward
        zero_buffers += 2 * 4 * shape.block_params
        if setup.microbatches > 1:
            zero_buffers += 4 * n - grads
    if Z >= 3:
        # the root unit stays gathered through the step; the current and the prefetched block
        root = (shape.embed_params if first else 0) + (shape.head_params if last else 0)
        if first and last and shape.tied:
            root -= shape.vocab * shape.d_model
        zero_buffers += 4 * root + 2 * 4 * shape.block_params
    elif Z >= 1:
        zero_buffers += 4 * shape.block_params  # one unit's all-gather output before it is copied in
    # autocast casts every matmul weight (blocks' linears and the head) to 16 bits once per
    # forward and keeps the copies for the backward pass
    mm_params = (layers * shape.block_params + (shape.vocab * shape.d_model if last else 0)) // setup.tensor_parallel
    copies = 0 if setup.precision == "fp32" else 2 * mm_params
    per_mb = layers * layer_activation_bytes(shape, setup)
    if first:
        per_mb += embed_activation_bytes(shape, setup)
    if last:
        per_mb += head_activation_bytes(shape, setup)
    inflight = inflight_microbatches(setup, stage)
    activations = inflight * per_mb
    backward_tmp = backward_temporaries(shape, setup, last)
    if setup.optimizer != "adamw":
        optim_tmp = 0
    elif device.kind == "gpu":
        optim_tmp = 4 * n // shard  # multi-tensor AdamW: sqrt(v) of all (its) parameters at once
    else:
        # single-tensor AdamW on CPUs: sqrt(v) and sqrt(v)/c of the largest tensor
        largest = max(4 * shape.d_model * shape.d_model if layers else 0,
                      shape.vocab * shape.d_model if (first or last) else 0)
        optim_tmp = 2 * 4 * largest // shard
    comm = 0
    if setup.data_parallel > 1:
        # Horovod's fusion buffer: on a GPU the whole allocation counts; in a CPU process's
        # resident set only the pages a fused batch wrote (at most the stage's gradients)
        comm = setup.fusion_bytes if device.kind == "gpu" else min(setup.fusion_bytes, 4 * n)
    if P > 1:
        comm += 2 * P2P_SLOTS * shape.seq_len * setup.micro_batch * shape.d_model * 4
    fwd_bwd = weights + grads + optimizer + copies + activations + backward_tmp + zero_buffers
    opt_step = weights + grads + optimizer + optim_tmp
    phase, working = ("backward", backward_tmp) if fwd_bwd >= opt_step else ("optimizer", optim_tmp)
    if phase == "optimizer":
        copies, activations = 0, 0  # freed before the step
    # memory freed and allocated again every step (activations, gradients, temporaries)
    # leaves holes in a CPU process's heap; GPU caching allocators are covered by overhead
    churn = inflight * per_mb + grads + max(backward_tmp, optim_tmp) + copies + zero_buffers
    slack = int(device.heap_retention * churn)
    if setup.precision != "fp32":
        # CPUs: 16-bit matmul weights and weight gradients pass through fp32 conversion
        # buffers that stay resident (calibrated per device, 0 on GPUs)
        slack += int(device.lowp_bytes_per_param * mm_params)
    total = max(fwd_bwd, opt_step) + comm + device.overhead_bytes + slack
    return MemoryBreakdown(stage=stage, layers=layers, params_count=n, params=weights, grads=grads,
                           optimizer=optimizer, weight_copies=copies, activations=activations,
                           inflight=inflight, working=working, comm_buffers=comm,
                           overhead=device.overhead_bytes, allocator_slack=slack, total=total, phase=phase,
                           zero_buffers=zero_buffers if phase == "backward" else 0,
                           model_state=weights + grads + optimizer)


def memory_per_device(shape: Shape, setup: Setup, device: DeviceProfile) -> MemoryBreakdown:
    """Peak memory of the most loaded process (pipeline stage) of a layout."""
    setup.check(shape)
    counts = stage_layers(shape, setup.pipeline_stages)
    stages = [stage_memory(shape, setup, device, s, c) for s, c in enumerate(counts)]
    worst = max(stages, key=lambda m: m.total)
    worst.per_stage_total = [m.total for m in stages]
    return worst
