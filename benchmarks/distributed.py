"""The distributed suite: what a training step of each process layout sends, costs and holds.

For the layouts 1 process, (data=2) and (latent=2) (two processes: gloo on CPU, NCCL where the
preset runs on CUDA and two GPUs exist), a real `sae_fast.training.Trainer` runs
WARMUP_STEPS + TIMED_STEPS optimizer steps on a synthetic source of the preset's shape
(batch_size = the preset's n, the GLOBAL batch; d, m, k the preset's). In every process:

1. communication: the collectives of torch.distributed are wrapped by counting wrappers
   (CollectiveCounter), armed only while Trainer._train_step runs (and, apart, while a metric
   row is logged), so set-up, checkpoints and export are not counted. A collective's payload
   is this rank's buffer in bytes (numel * itemsize; for all_gather the whole gathered output),
   split by kind and by group: "latent", "data", or "world". Every step of every rank is
   checked against expected_bytes(), the formula, which must agree exactly.
2. time: wall clock of each step between two barriers (and CUDA synchronisations), the
   median over the timed steps, and its ratio to the 1-process run on the same global batch.
3. memory: bytes of the SAE parameters and Adam's state per rank after a step, split into
   the latent-sharded tensors (W_enc, W_dec, b_enc and their moments) and the replicated ones
   (b_dec, its moments, Adam's step counters), with expected_state_bytes() beside them.

AuxK: dead_tokens stays at a value above the run's tokens by default, so no latent is dead
and AuxK never acts: every step sends the same bytes. With a lower dead_tokens the steps
differ (AuxK adds a merge and a decode of width k_aux = min(k_aux option, dead latents)); the
suite reads each step's dead count and checks each step against the formula for it.

projection() turns the formula at the `gpu` preset into communication time per step on
8 GPUs of one node (NVLink) and on 2 nodes (InfiniBand) with the ring cost model: a
projection, not a measurement.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .presets import PRESETS, Preset

WARMUP_STEPS = 2
TIMED_STEPS = 10
GROUPS = ("latent", "data", "world")
# (name, processes, latent_parallel): data_parallel is processes / latent_parallel.
LAYOUTS = (("1 process", 1, 1), ("data=2", 2, 1), ("latent=2", 2, 2))
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_INT64, _FLOAT64, _ADAM_STEP = 8, 8, 4  # bytes: indices and counts; float64 sums; fused Adam step

Progress = Callable[[str], None]


# --- the formula --------------------------------------------------------------------------


@dataclass(frozen=True)
class Collective:
    """One collective of a step: its group, kind, this rank's payload bytes and purpose."""

    group: str
    kind: str
    nbytes: int
    what: str


def expected_collectives(
    n: int,
    d: int,
    m: int,
    k: int,
    k_aux: int,
    L: int,
    D: int,
    itemsize: int,
    auxk_active: bool,
    clip: bool,
    logged: int = 0,
    auxk_enabled: bool = True,
) -> list[Collective]:
    """Every collective of one optimizer step (grad_accum=1, TopK) on one rank, by formula.

    n: the global batch; d, m, k; k_aux: the AuxK width of this step (min of the k_aux
    option and the number of dead latents); L latent-parallel, D data-parallel ranks;
    itemsize: bytes of the parameter dtype; auxk_active: dead latents exist this step;
    clip: grad_clip > 0; logged: metric rows logged (Trainer._log_row, after the step);
    auxk_enabled: auxk_coef > 0 (the dead latents are counted every step).
    With n_l = n / D (this data rank's rows), m_l = m / L (this shard's latents), s = itemsize,
    payload = this rank's buffer (all_gather: the whole gathered output, L parts):

    latent group (L > 1):
      all_gather  L*n_l*k*s          merged top-k values (sharded.py _merge)
      all_gather  L*n_l*k*8          merged top-k indices, int64
      all_gather  L*n_l*k_aux*(s+8)  AuxK merge, values and indices (auxk_active)
      all_reduce  n_l*d*s            decode x_hat (+ one more for the AuxK decode, auxk_active)
      all_reduce  d*s                b_dec's encoder gradient (backward; one encode per step)
      all_reduce  8                  dead-latent count, int64 (auxk_enabled)
      all_reduce  8                  global gradient norm^2, float64 (clip)
      all_reduce  16 per logged row  dead and dense counts, float64
    data group (D > 1):
      all_reduce  (2 + auxk_active)*8   loss terms, float64 (loss, recon, auxk)
      all_reduce  m_l*8                 firing counts, int64
      all_reduce  m_l*d*s (x2), m_l*s, d*s  gradients of W_dec, W_enc, b_enc, b_dec
      all_reduce  (4 + d)*8             metric sums, float64
    world: nothing inside a step.

    Totals per step: latent = L*n_l*(k + auxk_active*k_aux)*(s + 8)
    + (1 + auxk_active)*n_l*d*s + d*s + 8*auxk_enabled + 8*clip + 16*logged;
    data = (2 + auxk_active + 4 + d + m_l)*8 + (2*m_l*d + m_l + d)*s.
    """
    if n % D or m % L:
        raise ValueError(f"n={n} must divide by D={D} and m={m} by L={L}")
    n_l, m_l, s = n // D, m // L, itemsize
    out: list[Collective] = []
    if L > 1:
        merges = [("top-k", k)] + ([("AuxK", k_aux)] if auxk_active else [])
        for label, width in merges:
            out.append(Collective("latent", "all_gather", L * n_l * width * s, f"{label} values"))
            out.append(
                Collective("latent", "all_gather", L * n_l * width * _INT64, f"{label} indices")
            )
        out.append(Collective("latent", "all_reduce", n_l * d * s, "decode x_hat"))
        if auxk_active:
            out.append(Collective("latent", "all_reduce", n_l * d * s, "AuxK decode"))
        out.append(Collective("latent", "all_reduce", d * s, "b_dec encoder gradient"))
        if auxk_enabled:
            out.append(Collective("latent", "all_reduce", _INT64, "dead-latent count"))
        if clip:
            out.append(Collective("latent", "all_reduce", _FLOAT64, "gradient norm"))
        for _ in range(logged):
            out.append(Collective("latent", "all_reduce", 2 * _FLOAT64, "dead/dense counts"))
    if D > 1:
        out.append(Collective("data", "all_reduce", (2 + auxk_active) * _FLOAT64, "loss terms"))
        out.append(Collective("data", "all_reduce", m_l * _INT64, "firing counts"))
        for name, numel in (("W_dec", m_l * d), ("W_enc", m_l * d), ("b_enc", m_l), ("b_dec", d)):
            out.append(Collective("data", "all_reduce", numel * s, f"grad {name}"))
        out.append(Collective("data", "all_reduce", (4 + d) * _FLOAT64, "metric sums"))
    return out


def _tally(collectives: list[Collective], field: str) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for c in collectives:
        by_kind = totals.setdefault(c.group, {})
        by_kind[c.kind] = by_kind.get(c.kind, 0) + (c.nbytes if field == "bytes" else 1)
    return totals


def expected_bytes(*args, **kwargs) -> dict[str, dict[str, int]]:
    """{group: {kind: payload bytes}} of one step on one rank; arguments and formula as
    expected_collectives."""
    return _tally(expected_collectives(*args, **kwargs), "bytes")


def expected_calls(*args, **kwargs) -> dict[str, dict[str, int]]:
    """{group: {kind: number of calls}} of one step on one rank (see expected_collectives)."""
    return _tally(expected_collectives(*args, **kwargs), "calls")


def expected_state_bytes(d: int, m: int, L: int, itemsize: int) -> dict[str, int]:
    """Parameters + Adam state on one rank after a step.

    sharded = 3*(2*m_l*d + m_l)*s: W_enc, W_dec, b_enc and their exp_avg, exp_avg_sq;
    replicated = 3*d*s + 4*4: b_dec and its moments, and the four fused-Adam step counters
    (float32 scalars). Data parallelism replicates everything: no D in it.
    """
    m_l, s = m // L, itemsize
    sharded, replicated = 3 * (2 * m_l * d + m_l) * s, 3 * d * s + 4 * _ADAM_STEP
    return {"sharded": sharded, "replicated": replicated, "total": sharded + replicated}


# --- measuring the collectives --------------------------------------------------------------

# kind -> the argument whose tensors are this rank's payload (None: nothing; "pickle": an
# object collective, measured by the pickled size of its objects).
_PAYLOAD = {
    "all_reduce": "tensor",
    "broadcast": "tensor",
    "reduce": "tensor",
    "all_gather": "tensor_list",
    "all_gather_into_tensor": "output_tensor",
    "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input",
    "all_to_all": "input_tensor_list",
    "all_to_all_single": "input",
    "gather": "tensor",
    "scatter": "tensor",
    "send": "tensor",
    "recv": "tensor",
    "isend": "tensor",
    "irecv": "tensor",
    "barrier": None,
    "monitored_barrier": None,
    "all_gather_object": "pickle",
    "broadcast_object_list": "pickle",
    "gather_object": "pickle",
    "scatter_object_list": "pickle",
}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveCounter:
    """Counting wrappers around torch.distributed's collectives, for this process.

    install() replaces the functions of the torch.distributed namespace (what `dist.x(...)`
    calls resolve to; torch's own internal calls go to distributed_c10d and are not seen, so
    an object collective counts once). While armed (phase not None), each call adds its
    payload bytes to bytes[group][kind] and one to calls[group][kind], group named by
    name_groups(); unarmed calls pass through uncounted.
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        self.groups: dict[int, str] = {}
        self.bytes: dict[str, dict[str, int]] = {}
        self.calls: dict[str, dict[str, int]] = {}
        self.originals: dict[str, Callable] = {}
        self._depth = 0

    def install(self) -> None:
        import inspect

        for kind, payload in _PAYLOAD.items():
            fn = getattr(dist, kind, None)
            if fn is None or kind in self.originals:
                continue
            self.originals[kind] = fn
            setattr(dist, kind, self._wrap(kind, payload, fn, inspect.signature(fn)))

    def uninstall(self) -> None:
        for kind, fn in self.originals.items():
            setattr(dist, kind, fn)
        self.originals.clear()

    def name_groups(self, **groups) -> None:
        """name=process group (None ones skipped); any other group counts as the world's."""
        self.groups = {id(g): name for name, g in groups.items() if g is not None}

    def take(self) -> tuple[dict, dict]:
        """(bytes, calls) counted since the last take, as {group: {kind: n}}; then reset."""
        out = self.bytes, self.calls
        self.bytes, self.calls = {}, {}
        return out

    def _wrap(self, kind: str, payload: str | None, fn: Callable, signature) -> Callable:
        def counted(*args, **kwargs):
            if self.phase is None or self._depth:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            group = bound.arguments.get("group")
            name = self.groups.get(id(group), "world")
            self._depth += 1
            try:
                result = fn(*args, **kwargs)
            finally:
                self._depth -= 1
            if payload == "pickle":  # after the call: the received objects are in the list
                objects = [v for key, v in bound.arguments.items() if "obj" in key]
                nbytes = len(pickle.dumps(objects))
            else:
                nbytes = _nbytes(bound.arguments.get(payload)) if payload else 0
            by_kind = self.bytes.setdefault(name, {})
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
            calls = self.calls.setdefault(name, {})
            calls[kind] = calls.get(kind, 0) + 1
            return result

        counted.__wrapped__ = fn
        return counted


# --- one process of a layout ----------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measured_trainer(counter: CollectiveCounter):
    """A Trainer subclass whose steps are timed and whose collectives are counted; its
    metric rows' collectives are counted apart (they follow a step, outside it)."""
    from sae_fast.training import Trainer

    class MeasuredTrainer(Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.steps_seen: list[dict] = []
            self.log_rows: list[dict] = []
            self.state_bytes: dict | None = None
            self._dead = 0
            count_latents = self.sae.count_latents

            def counted_latents(mask):
                self._dead = count_latents(mask)
                return self._dead

            self.sae.count_latents = counted_latents  # the step's dead count: AuxK's width
            counter.name_groups(latent=self.layout.latent_group, data=self.layout.data_group)

        def _clock(self) -> float:
            _synchronize(self.device)
            if self.layout.distributed:
                counter.originals["barrier"]()
            return time.perf_counter()

        def _train_step(self) -> dict[str, float]:
            self._dead = 0
            start = self._clock()
            counter.phase = "step"
            try:
                row = super()._train_step()
            finally:
                counter.phase = None
            seconds = self._clock() - start
            nbytes, calls = counter.take()
            auxk = "auxk" in row
            k_aux = min(self.weights.k_aux, self._dead) if auxk else 0
            self.steps_seen.append(
                dict(step=self.step, seconds=seconds, bytes=nbytes, calls=calls, auxk=auxk,
                     dead=self._dead, k_aux=k_aux)
            )  # fmt: skip
            if self.state_bytes is None:
                self.state_bytes = self._state_bytes()
            return row

        def _log_row(self, row: dict, tokens_per_s: float) -> dict:
            counter.phase = "log"
            try:
                out = super()._log_row(row, tokens_per_s)
            finally:
                counter.phase = None
            nbytes, calls = counter.take()
            self.log_rows.append(dict(step=self.step, bytes=nbytes, calls=calls))
            return out

        def _state_bytes(self) -> dict:
            """Parameters and Adam state: the tensors with a row per latent, and the rest."""
            sharded = replicated = 0
            tensors = {}
            for name, p in self.sae.named_parameters():
                state = self.optimizer.state.get(p, {})
                for key, t in [("param", p), *state.items()]:
                    if not isinstance(t, torch.Tensor):
                        continue
                    nbytes = t.numel() * t.element_size()
                    tensors[f"{name}.{key}"] = nbytes
                    if name != "b_dec" and t.ndim > 0:
                        sharded += nbytes
                    else:
                        replicated += nbytes
            total = sharded + replicated
            return {
                "sharded": sharded,
                "replicated": replicated,
                "total": total,
                "tensors": tensors,
            }

    return MeasuredTrainer


def _worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One process of a layout: train, then write its measurements to spec["results"]."""
    # The trainer's log line and its warning that AuxK never acts (as arranged) go to a file.
    log = Path(spec["results"]) / f"rank-{rank}.log"
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        _work(rank, world, port, spec)


def _work(rank: int, world: int, port: int, spec: dict) -> None:
    from sae_fast.parallel.layout import build_rank_source, close_layout, init_layout
    from sae_fast.training import TrainConfig

    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        )  # fmt: skip
    else:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(name, None)
    torch.set_num_threads(spec["threads"])
    cuda = spec["options"]["device"] == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = TrainConfig(**spec["options"])
    counter = CollectiveCounter()
    layout = init_layout(cfg, device)
    finished = False
    try:
        counter.install()
        source = build_rank_source(cfg, device, layout)
        trainer = _measured_trainer(counter)(cfg, source, False, layout)
        trainer.train()
        backend = dist.get_backend() if layout.distributed else None
        result = {
            "rank": layout.rank,
            "latent_rank": layout.latent_rank,
            "data_rank": layout.data_rank,
            "backend": backend,
            "threads": torch.get_num_threads(),
            "steps": trainer.steps_seen,
            "log_rows": trainer.log_rows,
            "state_bytes": trainer.state_bytes,
        }
        path = Path(spec["results"]) / f"rank-{rank}.json"
        path.write_text(json.dumps(result))
        finished = True
    finally:
        counter.uninstall()
        close_layout(layout, finished)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the suite -------------------------------------------------------------------------------


def _record(layout: str, status: str, **fields) -> dict:
    return {"suite": "distributed", "pass": layout, "impl": "sae_fast", "status": status, **fields}


def _dtype_name(p: Preset) -> str:
    return _TORCH_DTYPES[p.dtype]


def _why_not(p: Preset, world: int) -> str | None:
    if p.device == "cuda":
        found = torch.cuda.device_count()
        if found < world:
            return f"NCCL on {world} processes needs {world} CUDA devices, found {found}"
    if p.n % world:
        return f"the global batch n={p.n} does not divide into {world} data-parallel parts"
    return None


def run_layout(
    p: Preset,
    name: str,
    world: int,
    latent: int,
    *,
    timed: int = TIMED_STEPS,
    warmup: int = WARMUP_STEPS,
    dead_tokens: int | None = None,
    grad_clip: float = 0.0,
    threads: int | None = None,
) -> dict:
    """One layout's record; the processes start with torch.multiprocessing.spawn."""
    import torch.multiprocessing as mp

    reason = _why_not(p, world) if world > 1 else None
    if reason is None and p.m % latent:
        reason = f"m={p.m} does not divide into latent_parallel={latent} shards"
    if reason is not None:
        return _record(name, "skipped", reason=reason, world=world, latent_parallel=latent)
    steps = warmup + timed
    tokens = steps * p.n
    total_threads = threads or torch.get_num_threads()
    options = dict(
        source="synthetic", synthetic_d=p.d, n_latents=p.m, k=p.k, batch_size=p.n,
        init_tokens=p.n, steps=steps, dtype=_dtype_name(p), device=p.device,
        # above the run's tokens: no latent is ever dead, so AuxK never acts
        dead_tokens=dead_tokens if dead_tokens is not None else 10 * tokens + 1,
        grad_clip=grad_clip, latent_parallel=latent, checkpoint_every=0, keep_checkpoints=1,
        log_every=steps + 1000, plots=False, progress=False, seed=0, dist_timeout=300.0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sae-fast-bench-dist-") as tmp:
        options["out_dir"] = str(Path(tmp) / "run")
        results = Path(tmp) / "results"
        results.mkdir()
        spec = {
            "options": options,
            "results": str(results),
            "threads": max(1, total_threads // world),
        }
        try:
            mp.spawn(_worker, args=(world, _free_port(), spec), nprocs=world, join=True)
            ranks = [json.loads((results / f"rank-{r}.json").read_text()) for r in range(world)]
        except Exception as e:
            lines = [line for line in str(e).strip().splitlines() if line.strip()][-2:]
            for log in sorted(results.glob("rank-*.log")):  # each rank's last words
                lines += [line for line in log.read_text().splitlines() if line.strip()][-1:]
            tail = " | ".join(lines) or type(e).__name__
            return _record(name, "error", reason=tail, world=world, latent_parallel=latent)
    return _summarise(p, name, world, latent, ranks, options, warmup)


def _summarise(p, name, world, latent, ranks, options, warmup) -> dict:
    D, itemsize = world // latent, p.torch_dtype.itemsize
    k_aux_option = min(max(1, p.d // 2), p.m)
    clip = options["grad_clip"] > 0

    def formula(step: dict, kind: str, logged: int = 0) -> dict:
        fn = expected_bytes if kind == "bytes" else expected_calls
        k_aux = step["k_aux"] if step else 0
        auxk = step["auxk"] if step else False
        return fn(p.n, p.d, p.m, p.k, k_aux, latent, D, itemsize, auxk, clip, logged)

    mismatches = []
    for r in ranks:
        for s in r["steps"]:
            for kind in ("bytes", "calls"):
                if s[kind] != formula(s, kind):
                    mismatches.append(f"rank {r['rank']} step {s['step']} {kind}")
        for row in r["log_rows"]:
            for kind in ("bytes", "calls"):
                if row[kind] != _difference(formula({}, kind, 1), formula({}, kind)):
                    mismatches.append(f"rank {r['rank']} log row {row['step']} {kind}")
    timed_steps = [[s for s in r["steps"] if s["step"] > warmup] for r in ranks]
    # One step's time: its slowest rank's (the barriers make them all but equal).
    seconds = [[s["seconds"] for s in t] for t in timed_steps]
    step_ms = [1e3 * max(per_rank) for per_rank in zip(*seconds, strict=True)]
    first = timed_steps[0][0]
    measured, want = first["bytes"], formula(first, "bytes")
    ratio = {
        g: _ratio(_total(measured.get(g, {})), _total(want.get(g, {})))
        for g in GROUPS
        if g in measured or g in want
    }
    state = ranks[0]["state_bytes"]
    state_want = expected_state_bytes(p.d, p.m, latent, itemsize)
    return _record(
        name,
        "ok",
        world=world,
        latent_parallel=latent,
        data_parallel=D,
        backend=ranks[0]["backend"],
        threads_per_rank=ranks[0]["threads"],
        shape={"n": p.n, "d": p.d, "m": p.m, "k": p.k, "dtype": p.dtype, "device": p.device},
        steps={"warmup": warmup, "timed": len(step_ms)},
        auxk=(
            "never acts (dead_tokens above the run's tokens)"
            if not any(s["auxk"] for r in ranks for s in r["steps"])
            else "acts on some steps (each step checked with its width)"
        ),
        k_aux_option=k_aux_option,
        grad_clip=options["grad_clip"],
        ms=statistics.median(step_ms),
        step_ms=step_ms,
        comm_bytes=measured,
        comm_calls=first["calls"],
        formula_bytes=want,
        formula_calls=formula(first, "calls"),
        bytes_total=_total_all(measured),
        formula_bytes_total=_total_all(want),
        bytes_ratio=ratio,
        bytes_ratio_total=_ratio(_total_all(measured), _total_all(want)),
        bytes_match=not mismatches,
        mismatches=mismatches[:10],
        per_step_bytes=[[_total_all(s["bytes"]) for s in r["steps"]] for r in ranks],
        log_row_bytes=ranks[0]["log_rows"][0]["bytes"] if ranks[0]["log_rows"] else {},
        state_bytes=state["total"],
        state_sharded_bytes=state["sharded"],
        state_replicated_bytes=state["replicated"],
        state_bytes_per_rank=[r["state_bytes"]["total"] for r in ranks],
        state_tensors=state["tensors"],
        formula_state_bytes=state_want,
    )


def _difference(a: dict, b: dict) -> dict:
    """a - b of two {group: {kind: n}}, the zero entries left out."""
    out = {}
    for g in a:
        kinds = {kind: n - b.get(g, {}).get(kind, 0) for kind, n in a[g].items()}
        kinds = {kind: n for kind, n in kinds.items() if n}
        if kinds:
            out[g] = kinds
    return out


def _total(by_kind: dict[str, int]) -> int:
    return sum(by_kind.values())


def _total_all(by_group: dict[str, dict[str, int]]) -> int:
    return sum(_total(v) for v in by_group.values())


def _ratio(a: float, b: float) -> float | None:
    if b == 0:
        return 1.0 if a == 0 else None
    return a / b


def suite(p: Preset, progress: Progress, **options) -> list[dict]:
    """The records of every layout in LAYOUTS, with the ratios to the 1-process run."""
    records = []
    for i, (name, world, latent) in enumerate(LAYOUTS, 1):
        progress(f"[distributed {i}/{len(LAYOUTS)}] {name}")
        started = time.perf_counter()
        try:
            records.append(run_layout(p, name, world, latent, **options))
        except Exception as e:  # a layout failing is reported, not fatal
            traceback.print_exc(file=sys.stderr)
            records.append(_record(name, "error", reason=f"{type(e).__name__}: {e}"))
        records[-1]["wall_s"] = time.perf_counter() - started
    one = next((r for r in records if r["pass"] == "1 process" and r["status"] == "ok"), None)
    for r in records:
        if one is None or r["status"] != "ok":
            continue
        r["x_one"] = r["ms"] / one["ms"]
        r["state_ratio"] = r["state_bytes"] / one["state_bytes"]
        r["sharded_state_ratio"] = r["state_sharded_bytes"] / one["state_sharded_bytes"]
        r["replicated_state_ratio"] = r["state_replicated_bytes"] / one["state_replicated_bytes"]
    return records


# --- the projection --------------------------------------------------------------------------

# Achievable bus bandwidth of ring all_reduce / all_gather per GPU, bytes/s (assumptions):
NVLINK_BUS = 400e9  # NVLink 4: 900 GB/s bidirectional aggregate per GPU
IB_BUS = 45e9  # InfiniBand NDR: 400 Gb/s per GPU-NIC
# Per-collective latency used for the alpha column (assumptions, typical NCCL small messages).
NVLINK_ALPHA, IB_ALPHA = 10e-6, 25e-6
# Dense bf16 throughput assumed for the encoder-GEMM floor column (H100-class, achievable).
GEMM_FLOPS = 600e12

# (layout, L, D, where the latent group runs, where the data group runs)
PROJECTED = (
    ("latent=8", 8, 1, "NVLink", None),
    ("data=8", 1, 8, None, "NVLink"),
    ("data=2 x latent=8 (2 nodes)", 8, 2, "NVLink", "InfiniBand"),
)
_LINKS = {"NVLink": (NVLINK_BUS, NVLINK_ALPHA), "InfiniBand": (IB_BUS, IB_ALPHA)}


def ring_seconds(kind: str, nbytes: int, P: int, bus: float) -> float:
    """Ring cost: all_reduce moves 2(P-1)/P x the buffer per rank, all_gather (P-1)/P x the
    gathered total, at bus bytes/s."""
    if P <= 1:
        return 0.0
    factor = {"all_reduce": 2 * (P - 1) / P, "all_gather": (P - 1) / P}[kind]
    return factor * nbytes / bus


def projection(preset: Preset | None = None) -> dict:
    """Communication time per step, by formula, at the gpu preset (steady state: no dead
    latents, no clipping, no logged row): a projection, not a measurement."""
    p = preset or PRESETS["gpu"]
    s = p.torch_dtype.itemsize
    rows = []
    for name, L, D, latent_link, data_link in PROJECTED:
        by = expected_collectives(p.n, p.d, p.m, p.k, 0, L, D, s, False, False)
        groups = []
        for group, P, link in (("latent", L, latent_link), ("data", D, data_link)):
            mine = [c for c in by if c.group == group]
            if not mine:
                continue
            bus, alpha = _LINKS[link]
            seconds = sum(ring_seconds(c.kind, c.nbytes, P, bus) for c in mine)
            groups.append({
                "group": group, "P": P, "link": link, "bus_GBps": bus / 1e9,
                "bytes": sum(c.nbytes for c in mine), "calls": len(mine),
                "ring_ms": 1e3 * seconds, "alpha_ms": 1e3 * alpha * len(mine),
            })  # fmt: skip
        gemm = 2 * (p.n // D) * p.d * (p.m // L) / GEMM_FLOPS
        rows.append({
            "layout": name, "gpus": L * D, "groups": groups,
            "ring_ms": sum(g["ring_ms"] for g in groups),
            "alpha_ms": sum(g["alpha_ms"] for g in groups),
            "gemm_floor_ms": 1e3 * gemm,
        })  # fmt: skip
    return {
        "kind": "projection (formula, not measured)",
        "preset": {"n": p.n, "d": p.d, "m": p.m, "k": p.k, "dtype": p.dtype},
        "assumptions": {
            "NVLink bus GB/s": NVLINK_BUS / 1e9,
            "InfiniBand bus GB/s": IB_BUS / 1e9,
            "alpha us (NVLink, IB)": [NVLINK_ALPHA * 1e6, IB_ALPHA * 1e6],
            "GEMM TFLOP/s": GEMM_FLOPS / 1e12,
            "cost": "ring: all_reduce 2(P-1)/P x bytes, all_gather (P-1)/P x gathered bytes",
        },
        "rows": rows,
    }


# --- markdown --------------------------------------------------------------------------------


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(records: list[dict], proj: dict | None) -> str:
    """The distributed records' tables (per layout; bytes by group and kind; parameter and
    optimizer state per rank) and the projection's."""
    ok = [r for r in records if r["status"] == "ok"]
    lines = []
    if records:
        lines += [
            "distributed: one optimizer step per rank, the median of the timed steps; bytes: "
            "this rank's collective payloads, measured (counted in torch.distributed) and by "
            "formula, which must agree on every step of every rank",
            "",
            "| layout | backend | ranks x threads | median step ms | x 1 process | latent B/step "
            "| data B/step | formula B/step | measured/formula | note |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
    for r in records:
        if r["status"] != "ok":
            reason = f"{r['status']}: {r.get('reason', '')}"
            lines.append(f"| {r['pass']} |  |  |  |  |  |  |  |  | {reason} |")
            continue
        by_group = {g: _total(r["comm_bytes"].get(g, {})) for g in GROUPS}
        note = r["auxk"].split(" (")[0]
        if not r["bytes_match"]:
            note = "MISMATCH: " + "; ".join(r["mismatches"][:3])
        cells = (
            r["pass"],
            r["backend"] or "-",
            f"{r['world']} x {r['threads_per_rank']}",
            f"{r['ms']:.2f}",
            _fmt(r.get("x_one"), ".2f"),
            f"{by_group['latent']:,}",
            f"{by_group['data']:,}",
            f"{r['formula_bytes_total']:,}",
            _fmt(r["bytes_ratio_total"], ".3f"),
            f"AuxK {note}" if r["bytes_match"] else note,
        )
        lines.append("| " + " | ".join(cells) + " |")
    detail = [r for r in ok if r["comm_bytes"] or r["formula_bytes"]]
    if detail:
        lines += [
            "",
            "| layout | group | kind | calls | measured B | formula B |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in detail:
            for g in GROUPS:
                kinds = sorted(set(r["comm_bytes"].get(g, {})) | set(r["formula_bytes"].get(g, {})))
                for kind in kinds:
                    got = r["comm_bytes"].get(g, {}).get(kind, 0)
                    want = r["formula_bytes"].get(g, {}).get(kind, 0)
                    calls = r["comm_calls"].get(g, {}).get(kind, 0)
                    lines.append(f"| {r['pass']} | {g} | {kind} | {calls} | {got:,} | {want:,} |")
        logged = [f"{r['pass']} {_total_all(r['log_row_bytes']):,} B" for r in detail]
        lines += ["", "per logged metric row (after a step, not in it): " + ", ".join(logged)]
    if ok:
        lines += [
            "",
            "| layout | state B/rank: latent-sharded | replicated | total | formula total "
            "| sharded x 1 process | replicated x | total x |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ok:
            cells = (
                r["pass"],
                f"{r['state_sharded_bytes']:,}",
                f"{r['state_replicated_bytes']:,}",
                f"{r['state_bytes']:,}",
                f"{r['formula_state_bytes']['total']:,}",
                _fmt(r.get("sharded_state_ratio"), ".4f"),
                _fmt(r.get("replicated_state_ratio"), ".4f"),
                _fmt(r.get("state_ratio"), ".6f"),
            )
            lines.append("| " + " | ".join(cells) + " |")
    if proj:
        lines += ["", projection_markdown(proj)]
    return "\n".join(lines).strip("\n")


def projection_markdown(proj: dict) -> str:
    p, a = proj["preset"], proj["assumptions"]
    lines = [
        f"PROJECTION, not a measurement: communication per step from the formula at "
        f"n={p['n']} d={p['d']} m={p['m']} k={p['k']} {p['dtype']} (no dead latents), ring cost "
        f"at {a['NVLink bus GB/s']:.0f} GB/s NVLink, {a['InfiniBand bus GB/s']:.0f} GB/s "
        f"InfiniBand bus bandwidth; alpha {a['alpha us (NVLink, IB)'][0]:.0f}/"
        f"{a['alpha us (NVLink, IB)'][1]:.0f} us per collective; encoder GEMM floor at "
        f"{a['GEMM TFLOP/s']:.0f} TFLOP/s",
        "",
        "| layout | GPUs | group | P | link | MiB/rank/step | calls | ring ms | + alpha ms "
        "| GEMM floor ms/GPU |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in proj["rows"]:
        for g in row["groups"]:
            lines.append(
                f"| {row['layout']} | {row['gpus']} | {g['group']} | {g['P']} | {g['link']} | "
                f"{_mib(g['bytes'])} | {g['calls']} | {g['ring_ms']:.3f} | {g['alpha_ms']:.3f} | |"
            )
        lines.append(
            f"| {row['layout']} | {row['gpus']} | total |  |  |  |  | {row['ring_ms']:.3f} | "
            f"{row['alpha_ms']:.3f} | {row['gemm_floor_ms']:.3f} |"
        )
    return "\n".join(lines)
