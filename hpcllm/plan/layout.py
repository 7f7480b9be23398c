"""Parallel layouts that fit the devices, and an estimate of how fast each one steps.

A layout is (T tensor-parallel ranks, P pipeline stages, D data-parallel replicas, micro-batch
b, micro-batches per step M, recomputation, ZeRO stage) with T * P * D = nodes * devices per
node and D * b * M = the global batch. T stays within a node (its collectives sit inside
every layer) unless the search is told otherwise.

Time of one optimizer step (nothing overlapped, so an upper bound):

* compute: each micro-batch costs ``b s F_stage / (peak * MFU)`` on the slowest stage, where
  F_stage is the stage's training FLOPs per token (x 4/3 with recomputation: one more
  forward). A pipeline needs ``M + P - 1`` such slots (GPipe and 1F1B alike); the
  ``P - 1`` extra slots are the bubble.
* pipeline transfers: an activation (b s h, fp32) forward and its gradient backward per
  micro-batch and stage boundary, inside a node when the stages share one.
* tensor parallelism: compute / T, plus 4 ring all-reduces of the (b, s, h) fp32 activation
  per layer and micro-batch over the intra-node bandwidth (on the critical path).
* gradient allreduce: ring allreduce moves ``2 (n-1)/n * bytes`` per device; hierarchical:
  a ring inside each node over the intra-node bandwidth, then a ring across the nodes where
  the node's network carries every stage it hosts.

Ranks are numbered stage-fastest (rank = replica * P + stage, as hpcllm's pipeline and
launch/slurm.py lay them out), so a pipeline's transfers stay inside a node when P divides the
devices per node; P must divide them or be a multiple of them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hpcllm.errors import HpcllmError
from hpcllm.plan.devices import DeviceProfile
from hpcllm.plan.memory import MemoryBreakdown, Setup, Shape, memory_per_device, stage_layers


@dataclass(frozen=True)
class Cluster:
    """The machines a job gets."""

    nodes: int
    devices_per_node: int
    device: DeviceProfile

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    def capacity(self) -> int:
        """Memory one process may use: a GPU's memory, or a CPU node's RAM shared by its ranks."""
        if self.device.kind == "cpu":
            return self.device.memory_bytes // self.devices_per_node
        return self.device.memory_bytes

    def process_flops(self, precision: str) -> float:
        """Peak FLOP/s of one process (a CPU node's measured rate is shared by its ranks)."""
        f = self.device.flops(precision)
        return f / self.devices_per_node if self.device.kind == "cpu" else f


@dataclass
class StepTime:
    """Seconds of one optimizer step, by cause."""

    compute: float
    bubble: float
    p2p: float
    allreduce: float
    total: float
    tensor_parallel: float = 0.0
    """Of ``compute``: the tensor-parallel all-reduces on the micro-batches' critical path."""


@dataclass
class Layout:
    pipeline_stages: int
    data_parallel: int
    micro_batch: int
    microbatches: int
    recompute: bool
    schedule: str
    memory: MemoryBreakdown
    time: StepTime
    tokens_per_s: float
    mfu: float
    """Model FLOPs utilisation of the whole step (6N-style FLOPs / (devices * peak * time))."""
    fits: bool
    stage_layers: list = field(default_factory=list)
    zero_stage: int = 0
    tensor_parallel: int = 1

    @property
    def global_batch(self) -> int:
        return self.data_parallel * self.micro_batch * self.microbatches

    def to_dict(self) -> dict:
        d = asdict(self)
        d["global_batch"] = self.global_batch
        return d


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float) -> float:
    """Seconds for a ring allreduce of ``nbytes`` among ``n`` peers at ``bandwidth`` bytes/s."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth


def allreduce_time(grad_bytes: float, cluster: Cluster, stages: int, replicas: int) -> float:
    """Hierarchical allreduce of one stage's gradients among its ``replicas``."""
    g = cluster.devices_per_node
    if replicas <= 1:
        return 0.0
    local = max(1, min(replicas, g // stages)) if stages <= g else 1  # replicas of a stage per node
    cross = replicas // local
    t = ring_allreduce_time(grad_bytes, local, cluster.device.intra_node_bandwidth)
    stages_per_node = min(stages, g)
    t += ring_allreduce_time(grad_bytes * stages_per_node, cross, cluster.device.inter_node_bandwidth)
    return t


def step_time(shape: Shape, setup: Setup, cluster: Cluster, mfu: float) -> StepTime:
    P, M, b, s = setup.pipeline_stages, setup.microbatches, setup.micro_batch, shape.seq_len
    counts = stage_layers(shape, P)
    per_token = []
    for i, c in enumerate(counts):
        f = c * shape.block_flops_per_token + (shape.head_flops_per_token if i == P - 1 else 0.0)
        per_token.append(f * (4.0 / 3.0 if setup.recompute else 1.0))
    rate = cluster.process_flops(setup.precision) * mfu
    T = setup.tensor_parallel
    t_mb = b * s * max(per_token) / rate / T
    if T > 1:
        # 2 all-reduces forward and 2 backward per layer of the (b, s, h) activation (fp32 on
        # the wire; sequence parallelism moves the same bytes as all-gathers/reduce-scatters),
        # inside the node: on the critical path of every micro-batch
        g = cluster.devices_per_node
        bw = cluster.device.intra_node_bandwidth if T <= g else cluster.device.inter_node_bandwidth
        tp_mb = 4 * max(counts) * ring_allreduce_time(b * s * shape.d_model * 4, T, bw)
        t_mb += tp_mb
    else:
        tp_mb = 0.0
    compute = M * t_mb
    # 1F1B/GPipe idle (P - 1) forward+backward times; ZB-H1 fills two thirds of that with
    # deferred weight-gradient passes (bubble (P - 1)(F + B - W), F = B = W)
    bubble = (P - 1) * t_mb * (1.0 / 3.0 if setup.schedule == "zbh1" else 1.0)
    p2p = 0.0
    if P > 1:
        act = b * s * shape.d_model * 4
        g = cluster.devices_per_node
        bw = cluster.device.intra_node_bandwidth if P <= g else cluster.device.inter_node_bandwidth / g
        p2p = 2 * (M + P - 2) * act / bw
    # the largest stage's fp32 gradients
    n_stage = max(c * shape.block_params + (shape.embed_params if i == 0 else 0)
                  + (shape.head_params if i == P - 1 else 0) for i, c in enumerate(counts))
    ar = allreduce_time(4.0 * n_stage / T, cluster, P * T, setup.data_parallel)
    if setup.zero_stage >= 3:
        # reduce-scatter + all-gather move an allreduce's bytes; stage 3 gathers once more
        # (forward and backward), half an allreduce again
        ar *= 1.5
    return StepTime(compute=compute, bubble=bubble, p2p=p2p, allreduce=ar,
                    total=compute + bubble + p2p + ar, tensor_parallel=M * tp_mb)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def evaluate(shape: Shape, setup: Setup, cluster: Cluster, mfu: float | None = None) -> Layout:
    """Memory and step time of one layout."""
    mfu = cluster.device.mfu if mfu is None else mfu
    mem = memory_per_device(shape, setup, cluster.device)
    t = step_time(shape, setup, cluster, mfu)
    tokens = setup.data_parallel * setup.micro_batch * setup.microbatches * shape.seq_len
    achieved = shape.flops_per_token * tokens / (t.total * cluster.world * cluster.process_flops(setup.precision))
    return Layout(pipeline_stages=setup.pipeline_stages, data_parallel=setup.data_parallel,
                  micro_batch=setup.micro_batch, microbatches=setup.microbatches, recompute=setup.recompute,
                  schedule=setup.schedule, memory=mem, time=t, tokens_per_s=tokens / t.total, mfu=achieved,
                  fits=mem.total <= cluster.capacity(),
                  stage_layers=stage_layers(shape, setup.pipeline_stages), zero_stage=setup.zero_stage,
                  tensor_parallel=setup.tensor_parallel)


def search(shape: Shape, cluster: Cluster, global_batch: int, precision: str = "bf16",
           optimizer: str = "adamw", schedule: str = "1f1b", mfu: float | None = None,
           max_micro_batch: int = 64, recompute: tuple[bool, ...] = (False, True),
           fusion_bytes: int | None = None, zero: tuple[int, ...] = (0, 1, 2, 3),
           tensor_parallel: tuple[int, ...] | None = None, tp_across_nodes: bool = False) -> list[Layout]:
    """Every layout for the cluster and global batch, fastest fitting ones first.
    ``tensor_parallel``: the degrees T to try [default: every divisor of the devices per node
    the model's heads, MLP and vocabulary divide; across nodes only with ``tp_across_nodes``]."""
    if cluster.nodes < 1 or cluster.devices_per_node < 1:
        raise HpcllmError("--nodes and --devices-per-node must be >= 1")
    if global_batch < 1:
        raise HpcllmError(f"--global-batch must be >= 1, got {global_batch}")
    world = cluster.world
    g = cluster.devices_per_node
    if tensor_parallel is None:
        tensor_parallel = tuple(t for t in _divisors(world if tp_across_nodes else g) if shape.tp_fits(t))
    out = []
    for T, P in [(t, p) for t in tensor_parallel if world % t == 0 for p in _divisors(world // t)]:
        if P > shape.n_layer:
            continue
        if P > 1 and g % (P * T) and (P * T) % g:
            continue  # a pipeline would straddle nodes (launch/slurm.check_pipeline_layout refuses it)
        D = world // (P * T)
        if global_batch % D:
            continue
        per_replica = global_batch // D
        for b in _divisors(per_replica):
            if b > max_micro_batch:
                break
            M = per_replica // b
            for rc in recompute:
                if rc and P == 1:
                    continue  # hpcllm's trainer recomputes activations in pipeline mode only
                kw = {} if fusion_bytes is None else {"fusion_bytes": fusion_bytes}
                for z in zero:
                    if z and (D == 1 or (z == 3 and P > 1)):
                        continue  # nothing to shard / refused by the trainer
                    setup = Setup(micro_batch=b, precision=precision, optimizer=optimizer, pipeline_stages=P,
                                  data_parallel=D, microbatches=M, recompute=rc, schedule=schedule,
                                  zero_stage=z, tensor_parallel=T, **kw)
                    out.append(evaluate(shape, setup, cluster, mfu))
    if not out:
        raise HpcllmError(f"no layout: global batch {global_batch} is not divisible by any data-parallel "
                          f"size of {world} devices with <= {shape.n_layer} pipeline stages")
    # fitting layouts first, fastest first; among equals fewer stages, no recomputation;
    # then the ones that do not fit, smallest first (how far off they are)
    out.sort(key=lambda L: (0, -L.tokens_per_s, L.tensor_parallel, L.pipeline_stages, L.recompute, L.zero_stage,
                            -L.micro_batch)
             if L.fits else (1, L.memory.total, 0, 0, 0, 0, 0))
    return out
