"""Training on real torch.distributed process groups (gloo, 2 processes on this machine):
every layout trains the weights one process does, checkpoints reshard between layouts, and
the sharded SAE a run exports is one ordinary folder every loader reads."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sae_fast import SparseAutoencoder
from sae_fast.checkpoint import CheckpointError
from sae_fast.cli.train import trainer_class
from sae_fast.clt import CrossLayerTranscoder
from sae_fast.parallel.layout import PeerRows, build_rank_source, close_layout, init_layout
from sae_fast.sources import build_source
from sae_fast.training import TrainConfig
from sae_fast.training.checkpoints import SAE_DIR, list_checkpoints
from sae_fast.training.metrics import read_jsonl

# Small enough for seconds per run; dead_tokens low so AuxK acts on the sharded dead latents,
# grad_clip on so the global norm is exercised; a flat lr so that a run resumed with more
# steps follows the schedule of a straight one.
BASE = dict(
    source="synthetic", synthetic_d=12, synthetic_features=48, synthetic_active=3,
    n_latents=64, k=4, batch_size=32, init_tokens=64, steps=6, lr=3e-3, lr_warmup_steps=0,
    lr_decay="none", dead_tokens=32, grad_clip=0.5, log_every=1, checkpoint_every=3,
    keep_checkpoints=3, plots=False, progress=False, device="cpu", seed=0,
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, options: dict, resume) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    cfg = TrainConfig(**options)
    layout = init_layout(cfg, torch.device("cpu"))
    finished = False
    try:
        source = build_rank_source(cfg, torch.device("cpu"), layout)
        # A model runs on each latent group's first shard alone; the others receive its rows.
        assert isinstance(source, PeerRows) == (cfg.source == "model" and layout.latent_rank > 0)
        trainer_class(cfg)(cfg, source, resume, layout).train()
        finished = True
    finally:
        close_layout(layout, finished)


def train(out: Path, world: int = 1, resume=False, **options) -> Path:
    """A run of BASE + options in out on world processes (1: this one, no process group)."""
    options = {**BASE, **options, "out_dir": str(out)}
    if world == 1:
        cfg = TrainConfig(**options)
        trainer_class(cfg)(cfg, build_source(cfg, "cpu"), resume).train()
    else:
        mp.spawn(_worker, args=(world, free_port(), options, resume), nprocs=world)
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return SparseAutoencoder.load(run / SAE_DIR).state_dict()


def assert_close(got: dict, want: dict, atol: float) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


LAYOUTS = {"data=2": dict(world=2, latent_parallel=1), "latent=2": dict(world=2, latent_parallel=2)}


@pytest.mark.parametrize("dtype, atol", [("float64", 1e-10), ("float32", 2e-5)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_trains_the_weights_of_one_process(tmp_path, layout, dtype, atol):
    one = train(tmp_path / "one", dtype=dtype)
    two = train(tmp_path / layout, dtype=dtype, **LAYOUTS[layout])
    assert_close(weights(two), weights(one), atol)
    # The logged metrics are the global batch's, and AuxK acted on dead latents.
    rows_one, rows_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == list(range(1, 7))  # rank 0 alone logs
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("loss", "recon", "fvu", "l0", "dead_fraction", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), key
    assert any(r.get("auxk", 0) > 0 for r in rows_two)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_latent_sharded_matryoshka_run_trains_the_weights_of_one_process(tmp_path, activation):
    options = dict(dtype="float64", activation=activation, matryoshka="8,24")
    one = train(tmp_path / "one", **options)
    two = train(tmp_path / "two", world=2, latent_parallel=2, **options)
    # The prefixes straddle the shards' halves (latents 0-31 and 32-63).
    assert SparseAutoencoder.load(two / SAE_DIR).matryoshka == [8, 24, 64]
    assert_close(weights(two), weights(one), 1e-10)
    rows_one, rows_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["matryoshka"] == pytest.approx(a["matryoshka"], rel=1e-9)


def test_a_latent_sharded_run_exports_one_sae_folder_in_shards(tmp_path):
    run = train(tmp_path / "run", world=2, latent_parallel=2)
    folder = run / SAE_DIR
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "cfg.json", "sae-00001-of-00002.safetensors", "sae-00002-of-00002.safetensors",
        "sae.safetensors.index.json",
    ]  # fmt: skip
    sae = SparseAutoencoder.load(folder)
    assert (sae.n_latents, sae.d_in, sae.k) == (64, 12, 4)
    assert sae.provenance["layout"] == {"world": 2, "data_parallel": 1, "latent_parallel": 2}
    x = build_source(TrainConfig(**BASE), "cpu").next_batch(8)
    assert sae(x).x_hat.shape == (8, 12)
    # A checkpoint of the run is an SAE too; saving over the folder as one file replaces it.
    checkpoint = SparseAutoencoder.load(list_checkpoints(run / "checkpoints")[-1])
    assert_close(checkpoint.state_dict(), sae.state_dict(), 0)
    sae.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]


def test_checkpoints_reshard_between_layouts(tmp_path):
    """A (latent=2) run resumed from step 3 as (data=2) and as one process gives the weights
    of one process's straight 6 steps; resumed in its own layout, bit for bit its own."""
    straight = weights(train(tmp_path / "straight"))
    sharded = train(tmp_path / "sharded", world=2, latent_parallel=2)
    step3 = list_checkpoints(sharded / "checkpoints")[0]
    assert step3.name == "step-00000003"
    for name, layout in [("as-data", dict(world=2)), ("as-one", dict(world=1)),
                         ("as-latent", dict(world=2, latent_parallel=2))]:  # fmt: skip
        run = tmp_path / name
        shutil.copytree(sharded, run)
        train(run, resume=run / "checkpoints" / step3.name, **layout)
        if name == "as-latent":
            assert_close(weights(run), weights(sharded), 0)
        else:
            assert_close(weights(run), straight, 2e-5)


def test_a_single_process_checkpoint_resumes_sharded(tmp_path):
    straight = weights(train(tmp_path / "straight"))
    run = train(tmp_path / "run", steps=3)
    train(run, world=2, resume=True, steps=6, latent_parallel=2)
    assert_close(weights(run), straight, 2e-5)


# A CLT over three layers of the synthetic map, with a skip connection (whole on every shard).
CLT = dict(clt=True, layers="0-2", n_latents=32, k=3, skip_connection=True, dtype="float64")


def clt_weights(run: Path) -> dict[str, torch.Tensor]:
    return CrossLayerTranscoder.load(run / SAE_DIR).state_dict()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_trains_the_clt_of_one_process(tmp_path, layout):
    """Each latent shard holds a block of every layer's features with all their decoders."""
    one = train(tmp_path / "one", **CLT)
    two = train(tmp_path / layout, **CLT, **LAYOUTS[layout])
    assert_close(clt_weights(two), clt_weights(one), 1e-10)
    rows_one, rows_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("loss", "recon", "fvu", "fvu/2", "l0/1", "dead_fraction", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    assert any(r.get("auxk", 0) > 0 for r in rows_two)


def test_clt_checkpoints_reshard_between_layouts(tmp_path):
    """A (latent=2) CLT run resumed from step 3 in one process gives one process's straight
    run; resumed in its own layout, bit for bit its own."""
    straight = clt_weights(train(tmp_path / "straight", **CLT))
    sharded = train(tmp_path / "sharded", world=2, latent_parallel=2, **CLT)
    step3 = list_checkpoints(sharded / "checkpoints")[0]
    assert step3.name == "step-00000003"
    for name, layout in [("as-one", dict(world=1)),
                         ("as-latent", dict(world=2, latent_parallel=2))]:  # fmt: skip
        run = tmp_path / name
        shutil.copytree(sharded, run)
        train(run, resume=run / "checkpoints" / step3.name, **layout, **CLT)
        want = clt_weights(sharded) if name == "as-latent" else straight
        assert_close(clt_weights(run), want, 0 if name == "as-latent" else 1e-10)


def test_layouts_that_cannot_run_are_refused_naming_the_option(tmp_path):
    from sae_fast.training.config import ConfigError

    with pytest.raises(ConfigError, match="latent_parallel=2 needs that many processes"):
        init_layout(TrainConfig(**{**BASE, "latent_parallel": 2}), torch.device("cpu"))
    with pytest.raises(ConfigError, match="latent_parallel must be a positive integer"):
        TrainConfig(**{**BASE, "latent_parallel": 0})


def test_a_cache_trains_the_same_weights_on_two_data_ranks(tmp_path):
    """Each data rank reads only its rows of every batch from the shards (a batch spans
    shards of 40 rows), and the run is the single process's."""
    from sae_fast.sources import SyntheticSource, write_cache

    rows = SyntheticSource(12, 48, 3, 0.02, seed=0).next_batch(400)
    cache = write_cache(tmp_path / "cache", [rows], tokens=400, shard_rows=40)
    options = dict(source="cache", cache_dir=str(cache))
    one = train(tmp_path / "one", **options)
    two = train(tmp_path / "two", world=2, **options)
    assert_close(weights(two), weights(one), 2e-5)


@pytest.fixture(scope="module")
def model_options(tmp_path_factory):
    from model_folders import save_model, write_corpus

    folder = tmp_path_factory.mktemp("model")
    return dict(
        source="model", model=save_model(folder / "gpt2"), hook="resid_post.0",
        text=write_corpus(folder / "corpus.txt"), context_size=16, model_batch_size=4,
        shuffle_buffer=128,
    )  # fmt: skip


def test_a_model_runs_once_per_latent_group_and_matches_one_process(tmp_path, model_options):
    """(latent=2): the first shard runs the model and broadcasts the rows, so the run sees
    the single process's batches."""
    one = train(tmp_path / "one", **model_options)
    two = train(tmp_path / "two", world=2, latent_parallel=2, **model_options)
    assert_close(weights(two), weights(one), 2e-5)


def test_data_ranks_run_the_model_on_their_own_documents(tmp_path, model_options):
    from sae_fast.sources import SourceError

    run = train(tmp_path / "run", world=2, **model_options)
    saved = torch.load(list_checkpoints(run / "checkpoints")[-1] / "train_state.pt")
    parts = [state["identity"]["part"] for state in saved["source"]]
    assert parts == [[0, 2], [1, 2]]  # one stream per data rank, each its share of the text
    # The streams cannot be split again in another number of data ranks.
    with pytest.raises(SourceError, match="part"):
        train(run, resume=True, steps=8, **model_options)


def test_a_data_parallel_transcoder_resumes_exactly(tmp_path, model_options):
    """Exporting folds both scales into a transcoder's W_enc: its checkpoint keeps the
    training-time W_enc, so 3 steps, a stop and 3 resumed steps on (data=2) give the weights
    of 6 straight steps, bit for bit."""
    options = dict(model_options, hook=None, hook_in="mlp_in.0", hook_out="mlp_out.0",
                   skip_connection=True)  # fmt: skip
    straight = train(tmp_path / "straight", world=2, **options)
    train(tmp_path / "split", world=2, **{**options, "steps": 3})
    split = train(tmp_path / "split", world=2, resume=True, **options)
    assert SparseAutoencoder.load(split / SAE_DIR).transcoder
    assert_close(weights(split), weights(straight), 0)


def test_a_latent_sharded_crosscoder_trains_and_resumes_as_one_process(tmp_path, model_options):
    """A crosscoder over two hook points: its per-source scales rescale W_enc and W_dec at
    export, so a sharded checkpoint keeps their training-time values; (latent=2) trains one
    process's weights and its step-3 checkpoint resumes in one process to them."""
    options = dict(model_options, hook=None, hooks="resid_post.0,resid_post.1", crosscoder=True)
    one = train(tmp_path / "one", **options)
    two = train(tmp_path / "two", world=2, latent_parallel=2, **options)
    assert SparseAutoencoder.load(two / SAE_DIR).provenance["crosscoder"]["widths"] == [32, 32]
    assert_close(weights(two), weights(one), 2e-5)
    shutil.copytree(two, tmp_path / "resumed")
    step3 = tmp_path / "resumed" / "checkpoints" / "step-00000003"
    assert_close(weights(train(tmp_path / "resumed", resume=step3, **options)), weights(one), 2e-5)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but its lock (which names the last process to hold it)."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def _edit_index(index: Path, shards) -> None:
    body = json.loads(index.read_text())
    index.write_text(json.dumps({**body, "shards": shards(body["shards"])}))


def _edit_state(step: Path, edit) -> None:
    state = torch.load(step / "train_state.pt", weights_only=True)
    edit(state)
    torch.save(state, step / "train_state.pt")


STATE_INDEX, SAE_INDEX = "train_state.safetensors.index.json", "sae.safetensors.index.json"
# Damage to a sharded checkpoint (step folder -> None) that a resume must name, not read.
DAMAGES = {
    "its index is missing": (lambda s: (s / STATE_INDEX).unlink(), "index.json does not exist"),
    "a shard is missing": (
        lambda s: (s / "train_state-00002-of-00002.safetensors").unlink(),
        "00002.safetensors does not exist",
    ),
    "one file backs two ranges": (
        lambda s: _edit_index(s / STATE_INDEX, lambda h: [h[0], {**h[1], "file": h[0]["file"]}]),
        "backs more than one row range",
    ),
    "the SAE's files swapped": (
        lambda s: _edit_index(
            s / SAE_INDEX,
            lambda h: [{**h[0], "file": h[1]["file"]}, {**h[1], "file": h[0]["file"]}],
        ),
        "the index says from 0",
    ),
    "the state lacks a key": (
        lambda s: _edit_state(s, lambda state: state.pop("scheduler")),
        "incomplete or damaged",
    ),
    "an unknown layout": (
        lambda s: _edit_state(s, lambda state: state.update(layout="x")),
        "unknown layout",
    ),
}


def test_a_damaged_sharded_checkpoint_is_named_and_the_run_left_unchanged(tmp_path):
    sharded = train(tmp_path / "sharded", world=2, latent_parallel=2, steps=3)
    for i, (what, (damage, message)) in enumerate(DAMAGES.items()):
        run = tmp_path / f"run{i}"
        shutil.copytree(sharded, run)
        step = list_checkpoints(run / "checkpoints")[-1]
        damage(step)
        before = _tree(run)
        with pytest.raises(CheckpointError, match=message):
            train(run, resume=step, steps=6)
        assert _tree(run) == before, what
