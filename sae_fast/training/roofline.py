"""What a training run needs: memory per device and, on a GPU, a roofline time of the step.

One model serves `sae-fast plan`, the GPU check (benchmarks/gpu_check.py, which prints it
beside each measured time) and the README's figures. Every time is a prediction from the
stated assumptions below, as a (low, high) pair; no GPU measured it.

Time. Each pass of the step is bounded by its tensor-core work or by the bytes it moves:
- the dense encoder GEMM x @ W_enc.T (2 n d m flop, cuBLAS at GEMM_EFFICIENCY of the peak,
  its (n, m) output to HBM): the floor every ratio is taken to;
- the fused encoder: the same flop in 64 x 128 tiles whose programs re-read x for each
  latent tile and W_enc for each row tile from L2 (cp.async.cg skips L1): low when the L2
  traffic hides under the MMA, high when it adds to it;
- the chunked encoder: cuBLAS into L2-resident blocks, each GEMM with a tail (its last
  partial wave), then a select that reads each block once from L2 and issues the warp
  instructions per element its binary holds: low when the select overlaps the next GEMM
  (its side stream), high if not;
- the decoder and the sparse backward: the rows of W they gather (from HBM, each once at
  best, once per pair at worst), the batch rows the scatters read from L2, the two (m, d)
  gradients they write, and under autocast the casts of W_enc and W_dec;
- the optimizer: Adam's 7 passes over every parameter, plus 9 over W_dec for the projection
  and the renormalisation done apart (16 in all), or 7 in the fused pass (optimizer.py);
- with several GPUs, the collectives over NVLink.
Memory. Parameters, gradients, Adam's moments, the step's activations and the encoder's
buffers, and a checkpoint's save, per device of a layout (data-parallel D x latent-parallel
L). On a CPU it came up to 6% below a training run's measured peak (tests/test_plan.py holds
it to 10%); a process's own code (and a GPU's CUDA context) come on top.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# cuBLAS reaches this share of the dense tensor-core peak at these sizes (low, high time).
GEMM_EFFICIENCY = (0.80, 0.70)
HBM_EFFICIENCY = (0.90, 0.75)  # share of the HBM peak a streaming kernel reaches
FUSED_TILES = (64, 128)  # the fused encoder's (rows, latents) tile at bf16 on sm_90
# The decoder's passes over (m, d) besides Adam's 7 (read p, g, m, v; write p, m, v) when its
# projection and renormalisation run as separate torch ops.
DECODER_EXTRA_PASSES = 9
ACTIVATION_COPIES = 8  # (n, d) tensors alive in a step: x, x - b_dec, x_hat, errors, grads
CLT_ACTIVATION_COPIES = 4  # (n, d) per layer in a CLT's step: x, y, y_hat and its error
# The chunked select's warp instructions per pre-activation on a tile no row gains from,
# read from its sm_90 binary (bf16, k=64, Triton 3.9: python -m benchmarks kernels), an SM's
# warp instructions issued per clock, and each chunk GEMM's fixed cost (its partial wave).
SELECT_WARP_INSTRUCTIONS, WARP_ISSUE_PER_CLOCK, GEMM_TAIL_SECONDS = 0.53, 4, 3e-6


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    tensor_tflops: float  # dense bf16 / fp16
    fp32_tflops: float  # CUDA cores (torch's default fp32 matmul, TF32 off)
    hbm_tbps: float
    l2_tbps: tuple[float, float]  # (high, low): the range of sustained L2 bandwidth
    link_gbps: float  # NVLink, one direction, per GPU
    sms: int = 132
    clock_ghz: float = 1.98


GPUS = {
    "h100": Gpu("H100 SXM", 80, 989.4, 66.9, 3.35, (10.0, 6.0), 450),
    "h200": Gpu("H200 SXM", 141, 989.4, 66.9, 4.8, (10.0, 6.0), 450),
}


@dataclass(frozen=True)
class Shape:
    """A training step: n tokens, width d, m latents, k active; parameters in dtype, the
    encoder computed in compute_dtype (autocast), Adam's moments in moments (options.py).
    layers > 1: a cross-layer transcoder's (m features and k active per layer, each layer's
    features writing to it and every later one: layers encoders, `triangle` decoders)."""

    n: int
    d: int
    m: int
    k: int
    dtype: str = "float32"
    compute_dtype: str | None = None
    moments: str = "param"
    init_tokens: int = 0
    k_aux: int | None = None
    layers: int = 1

    @property
    def triangle(self) -> int:
        """The (m, d) decoder matrices: one per pair of a layer and a later (or the same) one."""
        return self.layers * (self.layers + 1) // 2

    @property
    def row_width(self) -> int:
        """A row of the source: an SAE's activation, a CLT's inputs and outputs of every layer."""
        return self.d if self.layers == 1 else 2 * self.layers * self.d

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype or self.dtype]

    @property
    def moment_bytes(self) -> int:
        return 2 if self.moments == "bf16" else self.param_bytes

    @property
    def parameters(self) -> int:
        matrices = self.layers + self.triangle  # encoders and decoders of (m, d)
        return matrices * self.m * self.d + self.layers * (self.m + self.d)


def _tflops(gpu: Gpu, shape: Shape) -> float:
    return gpu.tensor_tflops if shape.compute_bytes == 2 else gpu.fp32_tflops


def _streamed(gpu: Gpu, nbytes: float) -> tuple[float, float]:
    """Seconds to move nbytes through HBM, (low, high)."""
    return tuple(nbytes / (gpu.hbm_tbps * 1e12 * e) for e in HBM_EFFICIENCY)


def _compute(gpu: Gpu, shape: Shape) -> tuple[float, float]:
    flop = 2 * shape.n * shape.d * shape.m * shape.layers
    return tuple(flop / (_tflops(gpu, shape) * 1e12 * e) for e in GEMM_EFFICIENCY)


def encoder_traffic(shape: Shape) -> dict[str, dict[str, int]]:
    """Bytes each encoder moves from HBM and from L2 in one call: x and W_enc read once from
    HBM by all; the GEMM writes (n, m) to HBM; the fused kernel re-reads x for every latent
    tile and W_enc for every row tile from L2 and writes (n, k) keys; the chunked encoder's
    blocks go to L2 and come back once."""
    n, d, m, k, b = shape.n, shape.d, shape.m, shape.k, shape.compute_bytes
    rows, cols = FUSED_TILES
    inputs = (n + m) * d * b
    return {
        "gemm": {"hbm": inputs + n * m * b, "l2": 0},
        "fused": {
            "hbm": inputs + n * k * 8,
            "l2": n * d * b * math.ceil(m / cols) + m * d * b * math.ceil(n / rows),
        },
        "chunked": {"hbm": inputs + n * k * 8, "l2": 2 * n * m * b},
    }


def step_time(
    gpu: Gpu,
    shape: Shape,
    fused_optimizer: bool = True,
    fused_selection: float = 0.0,
    select_instructions: float = SELECT_WARP_INSTRUCTIONS,
) -> dict[str, tuple]:
    """Seconds (low, high) of each pass of one step on one GPU, with "gemm" the floor, the
    two exact encoders, and "step" with the better encoder (the dispatcher's pick).
    fused_selection: the fused kernel's selection instructions per GEMM-loop instruction
    (python -m benchmarks kernels reads it from the binary); at one block per SM nothing
    hides them, so the high bound adds that share of the GEMM's time. select_instructions:
    the chunked select's warp instructions per pre-activation. A CLT's step (shape.layers >
    1) encodes each layer in turn and gathers each feature's decoders to every later layer."""
    n, d, m, k, b = shape.n, shape.d, shape.m, shape.k, shape.compute_bytes
    L, triangle = shape.layers, shape.triangle
    compute = _compute(gpu, shape)
    out = _streamed(gpu, L * n * m * b)
    gemm = tuple(max(c, o) for c, o in zip(compute, out, strict=True))
    l2_fused = L * encoder_traffic(shape)["fused"]["l2"]
    l2_low, l2_high = (l2_fused / (bw * 1e12) for bw in gpu.l2_tbps)
    fused = (max(compute[0], l2_low), compute[1] * (1 + fused_selection) + l2_high)
    from ..backends import chunked  # here: the command line reads GPUS without torch

    issue = L * n * m * select_instructions / (gpu.sms * WARP_ISSUE_PER_CLOCK * gpu.clock_ghz * 1e9)
    select = tuple(max(L * n * m * b / (bw * 1e12), issue) for bw in gpu.l2_tbps)
    tails = L * math.ceil(m / chunked.chunk_for(n, m, b)) * GEMM_TAIL_SECONDS
    chunked_time = (max(compute[0], select[0]) + tails, compute[1] + select[1] + tails)
    encoder = min(fused, chunked_time, key=lambda t: t[0] + t[1])
    # The sparse passes gather rows of W (n k of them, each read from HBM at worst, each
    # once at best) and scatter into whole (m, d) gradients: the decoder's gather; grad
    # values' and grad x's gathers; grad W_dec's and grad W_enc's scatters, which read rows
    # of the (n, d) batch from L2. Under autocast each step casts W_enc and W_dec too.
    pairs, rows_once = n * k * d * b * triangle, min(n * k, m) * d * b * triangle
    gathers = [(rows_once, pairs), (2 * rows_once, 2 * pairs)]
    decoder = tuple(_streamed(gpu, g + L * n * d * b)[i] for i, g in enumerate(gathers[0]))
    matrices = (L + triangle) * m * d  # the encoders' and decoders' entries
    written = matrices * shape.param_bytes
    cast = matrices * (shape.param_bytes + b) if b != shape.param_bytes else 0
    scatter_l2 = tuple(2 * pairs / (bw * 1e12) for bw in gpu.l2_tbps)
    backward = tuple(
        _streamed(gpu, g + written + cast)[i] + scatter_l2[i] for i, g in enumerate(gathers[1])
    )
    p, mo = shape.param_bytes, shape.moment_bytes
    per_param = 3 * p + 4 * mo  # read p, g, m, v; write p, m, v
    # (A CLT's decoders are free: no projection, no renormalisation.)
    extra = 0 if fused_optimizer or L > 1 else DECODER_EXTRA_PASSES * m * d * p
    optimizer = _streamed(gpu, shape.parameters * per_param + extra)
    parts = {"encoder": encoder, "decoder": decoder, "backward": backward, "optimizer": optimizer}
    step = tuple(sum(t[i] for t in parts.values()) for i in (0, 1))
    return {"gemm": gemm, "fused": fused, "chunked": chunked_time, **parts, "step": step}


@dataclass(frozen=True)
class Memory:
    """Bytes per device: what every step keeps (parameters, gradients, Adam's moments), what
    a step adds (its activations and the encoder's buffers; before step 1, the init sample),
    and what saving a checkpoint adds (the exported SAE, and safetensors' bytes of its
    largest tensor). The peak is the kept part plus the larger of the two others."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    checkpoint: int

    @property
    def total(self) -> int:
        kept = self.parameters + self.gradients + self.optimizer
        return kept + max(self.activations + self.buffers, self.checkpoint)


def memory(shape: Shape, data: int = 1, latent: int = 1, device: str = "cuda") -> Memory:
    """Bytes per device of a step at shape, its batch split over data ranks and its latents
    over latent ranks. device "cpu" counts the torch backend's encoder buffer (the default
    there), "cuda" the chunked encoder's two."""
    m = math.ceil(shape.m / latent)
    rows = math.ceil(shape.n / data)
    p, L = shape.param_bytes, shape.layers
    params = replace(shape, m=m).parameters * p
    k_aux = shape.k_aux if shape.k_aux is not None else shape.d // 2
    # (values, ids): a layer's candidates from every latent shard while it encodes, twice;
    # a CLT also keeps its other layers' codes.
    code = rows * (shape.k + k_aux) * (shape.compute_bytes + 8)
    codes = code * (2 * latent + L - 1)
    copies = ACTIVATION_COPIES if L == 1 else L * CLT_ACTIVATION_COPIES
    batch = copies * rows * shape.d * shape.compute_bytes + codes
    init = 2 * shape.init_tokens * shape.row_width * p  # the init sample and its copy
    from ..backends import chunked
    from ..backends import torch as torch_backend

    if device == "cpu":
        chunk = torch_backend.auto_chunk_size(rows, m, shape.k, shape.compute_bytes)
        buffers = rows * chunk * shape.compute_bytes
    else:
        buffers = 2 * rows * chunked.chunk_for(rows, m, shape.compute_bytes) * shape.compute_bytes
    return Memory(
        parameters=params,
        gradients=params,
        optimizer=2 * (params // p) * shape.moment_bytes,
        activations=max(batch, init),
        buffers=buffers,
        checkpoint=params + _largest_saved(shape, m, latent) * p,
    )


def _largest_saved(shape: Shape, m: int, latent: int) -> int:
    """Entries of the largest tensor a checkpoint's save holds at once beside the exported
    copy: an SAE's (m, d) shard; a CLT's first decoder (m, L, d), gathered whole from the
    latent shards (the shards' parts, then their concatenation)."""
    if shape.layers == 1:
        return m * shape.d
    return 2 * shape.m * shape.layers * shape.d if latent > 1 else m * shape.layers * shape.d


def collective_time(gpu: Gpu, shape: Shape, data: int, latent: int) -> float:
    """Seconds of one step's collectives over NVLink: the gradients' all-reduce over the
    data ranks (a ring moves 2 (D - 1) / D of them) and, over the latent ranks, the
    candidates' gather and x_hat's all-reduce."""
    per_rank = shape.parameters / latent * shape.param_bytes
    grads = 2 * (data - 1) / data * per_rank if data > 1 else 0.0
    rows = shape.n / data
    shards = 0.0
    if latent > 1:  # a CLT: each layer's candidates, each source layer's decode
        candidates = shape.layers * rows * shape.k * latent * 12
        shards = candidates + 2 * (latent - 1) / latent * rows * shape.d * 4 * shape.triangle
    return (grads + shards) / (gpu.link_gbps * 1e9)


def layouts(gpus: int) -> list[tuple[int, int]]:
    """(data, latent) with data * latent == gpus, latent-parallel within 8 GPUs (a node)."""
    return [(gpus // lat, lat) for lat in range(1, min(gpus, 8) + 1) if gpus % lat == 0]


def largest_dictionary(
    shape: Shape, capacity: int, data: int = 1, latent: int = 1, device: str = "cuda"
) -> int:
    """The largest m, a multiple of 1024, whose memory per device fits in capacity bytes
    (0 if none does)."""

    def fits(blocks: int) -> bool:
        return memory(replace(shape, m=blocks * 1024), data, latent, device).total <= capacity

    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * 1024


# Reserved on each GPU besides the run: the CUDA context, cuBLAS workspaces, fragmentation.
GPU_RESERVED_BYTES = 2 << 30


def plan(shape: Shape, gpus: int, gpu: str, cpu_bytes: int | None = None) -> dict:
    """Each layout of gpus devices: memory per device, whether it fits, the largest
    dictionary that fits, and (on a GPU) the predicted step in ms, (low, high). gpu: a key
    of GPUS, or "cpu" (one device of cpu_bytes, memory only)."""
    device = "cpu" if gpu == "cpu" else "cuda"
    model = None if gpu == "cpu" else GPUS[gpu]
    capacity = cpu_bytes if model is None else int(model.memory_gib * 2**30) - GPU_RESERVED_BYTES
    rows = []
    for data, latent in layouts(gpus):
        mem = memory(shape, data, latent, device)
        row = {
            "data": data,
            "latent": latent,
            "memory": {**asdict(mem), "total": mem.total},
            "fits": mem.total <= capacity,
            "largest_n_latents": largest_dictionary(shape, capacity, data, latent, device),
        }
        if model is not None:
            local = replace(shape, m=math.ceil(shape.m / latent), n=math.ceil(shape.n / data))
            comm = collective_time(model, shape, data, latent)
            row["step_ms"] = [1e3 * (t + comm) for t in step_time(model, local)["step"]]
        rows.append(row)
    result = {"shape": asdict(shape), "gpu": gpu, "capacity": capacity, "layouts": rows}
    if model is not None:
        times = step_time(model, shape)
        result["gemm_ms"] = [1e3 * t for t in times["gemm"]]
        result["predicted_x_gemm"] = sorted(times["step"][i] / times["gemm"][i] for i in (0, 1))
    return result
