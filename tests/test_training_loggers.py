"""TensorBoard and wandb metric sinks, with the real packages (installed by the extras).

TensorBoard events are read back with tensorboard's EventAccumulator. wandb runs offline in
temporary HOME and WANDB_* folders; its offline run is read back from the run's .wandb
transaction log, a leveldb-format log of wandb_internal_pb2.Record protos (wandb 0.31 ships
no Python reader for it any more, so the few lines below read it).
"""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from sae_fast.training.loggers import (
    TENSORBOARD_DIR,
    WANDB_RUN_ID_FILE,
    MetricSinks,
    numeric_fields,
    open_sinks,
)

ROOT = Path(__file__).resolve().parents[1]


def rows(steps, scale=1.0):
    """Metrics rows as the trainer writes them, with a bool and a string that are skipped."""
    return [
        {
            "step": s,
            "tokens": 4096 * s,
            "loss": scale / s,
            "lr": 1e-3,
            "dead_fraction": 0.0,
            "nan_metric": math.nan,
            "inf_metric": math.inf,
            "flag": True,
            "note": "text",
        }
        for s in steps
    ]


LOGGED = {"tokens", "loss", "lr", "dead_fraction", "nan_metric", "inf_metric"}


def test_numeric_fields_skip_step_bools_and_strings():
    row = {"step": 3, "loss": 0.5, "tokens": 7, "nan": math.nan, "ok": False, "name": "a"}
    assert numeric_fields(row) == {"loss": 0.5, "tokens": 7, "nan": row["nan"]}


def test_no_sinks_import_and_write_nothing(tmp_path):
    code = (
        "import sys; from pathlib import Path\n"
        "from sae_fast.training.loggers import open_sinks\n"
        f"out = Path({str(tmp_path / 'run')!r})\n"
        "with open_sinks(out, {}, tensorboard=False, wandb=False, wandb_project=None,"
        " resume_step=None) as sinks:\n"
        "    sinks.write({'step': 1, 'loss': 1.0})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard')"
        " or m.startswith('torch.utils.tensorboard')]\n"
        "assert not bad, bad\n"
        "assert not out.exists()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_write_after_close_raises(tmp_path):
    sinks = MetricSinks()
    sinks.close()
    sinks.close()
    with pytest.raises(ValueError, match="after close"):
        sinks.write({"step": 1, "loss": 1.0})


@pytest.mark.parametrize(
    ("flag", "blocked", "extra"),
    [
        ("tensorboard", "torch.utils.tensorboard", "sae-fast[tensorboard]"),
        ("wandb", "wandb", "sae-fast[wandb]"),
    ],
)
def test_missing_package_names_the_extra(tmp_path, monkeypatch, flag, blocked, extra):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` raises ImportError
    flags = {"tensorboard": flag == "tensorboard", "wandb": flag == "wandb"}
    with pytest.raises(ImportError, match=f'{flag}.*pip install "{re.escape(extra)}"'):
        open_sinks(tmp_path, {}, **flags, wandb_project=None, resume_step=None)


# --- TensorBoard ----------------------------------------------------------------------------


def read_tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def open_tensorboard(out_dir, resume_step=None):
    return open_sinks(
        out_dir, {}, tensorboard=True, wandb=False, wandb_project=None, resume_step=resume_step
    )


def test_tensorboard_logs_numeric_fields_at_their_steps(tmp_path):
    with open_tensorboard(tmp_path) as sinks:
        for row in rows([10, 20, 30]):
            sinks.write(row)
    scalars = read_tensorboard(tmp_path / TENSORBOARD_DIR)
    assert set(scalars) == LOGGED
    assert [s for s, _ in scalars["loss"]] == [10, 20, 30]
    assert [v for _, v in scalars["loss"]] == pytest.approx([0.1, 0.05, 1 / 30], rel=1e-6)
    assert [v for _, v in scalars["tokens"]] == [40960.0, 81920.0, 122880.0]
    assert all(math.isnan(v) for _, v in scalars["nan_metric"])
    assert all(v == math.inf for _, v in scalars["inf_metric"])


def test_tensorboard_resume_purges_steps_past_the_checkpoint(tmp_path):
    with open_tensorboard(tmp_path) as sinks:  # a run that logged to step 10, then crashed
        for row in rows(range(1, 11)):
            sinks.write(row)
    with open_tensorboard(tmp_path, resume_step=5) as sinks:  # resumed from step 5's checkpoint
        for row in rows(range(6, 9), scale=100.0):
            sinks.write(row)
    assert len(list((tmp_path / TENSORBOARD_DIR).iterdir())) == 2
    loss = read_tensorboard(tmp_path / TENSORBOARD_DIR)["loss"]
    assert [s for s, _ in loss] == list(range(1, 9))
    expected = [1 / s for s in range(1, 6)] + [100 / s for s in range(6, 9)]
    assert [v for _, v in loss] == pytest.approx(expected, rel=1e-6)


# --- wandb, offline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """wandb offline, its home, cache, config and data folders in a temporary folder."""
    import wandb

    base = tmp_path_factory.mktemp("wandb_env")
    env = {
        "WANDB_MODE": "offline",
        "HOME": base / "home",
        "WANDB_DIR": base / "wandb_dir",
        "WANDB_CACHE_DIR": base / "cache",
        "WANDB_CONFIG_DIR": base / "config",
        "WANDB_DATA_DIR": base / "data",
        "WANDB_ARTIFACT_DIR": base / "artifacts",
    }
    wandb.teardown()  # a wandb set up earlier in this process keeps its settings otherwise
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            if isinstance(value, Path):
                value.mkdir()
            mp.setenv(name, str(value))
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_PROJECT", raising=False)
        yield base
        wandb.teardown()  # stops the wandb-core service process while the env still holds


def read_wandb_records(path: Path) -> list:
    """The Record protos of a .wandb transaction log (leveldb log format: 32 KiB blocks of
    chunks, each a 7-byte header crc32/length/type, after a 7-byte ':W&B' file header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad crc at {pos}"
        pending += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_value(item):
    oneofs = item.DESCRIPTOR.oneofs_by_name  # typed values: wandb >= 0.30; JSON before
    kind = item.WhichOneof("value") if "value" in oneofs else None
    if kind in ("integer", "number", "boolean", "text"):
        return getattr(item, kind)
    return json.loads(item.json if kind == "json" else item.value_json)


def wandb_history(records) -> list[dict]:
    """The logged rows, without wandb's own underscored fields, with "step" from _step."""
    out = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): history_value(i) for i in r.history.item}
            out.append({"step": row["_step"], **{k: v for k, v in row.items() if k[0] != "_"}})
    return out


def of_type(records, kind):
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def offline_runs(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "wandb").glob("offline-run-*"))


def run_records(run_dir: Path, timeout: float = 10.0) -> list:
    """The records of an offline run folder's .wandb log, once its exit record is there
    (wandb 0.19 and 0.22 can return from run.finish() before wandb-core has flushed it)."""
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(log) if log.stat().st_size else []
        if of_type(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def open_wandb(out_dir, resume_step=None, config=None):
    return open_sinks(
        out_dir,
        config or {"train": {"lr": 3e-4, "k": 32}, "d_in": 64},
        tensorboard=False,
        wandb=True,
        wandb_project="sae-fast-tests",
        resume_step=resume_step,
    )


def test_wandb_offline_run_logs_rows_and_config(wandb_env, tmp_path):
    out = tmp_path / "run"
    with open_wandb(out) as sinks:
        run_id = sinks.wandb_run.id
        assert sinks.wandb_run.settings.mode == "offline"
        for row in rows([5, 10, 15]):
            sinks.write(row)
    assert (out / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    (run_dir,) = offline_runs(out)
    assert run_dir.name.endswith(run_id)
    records = run_records(run_dir)

    history = wandb_history(records)
    assert [h["step"] for h in history] == [5, 10, 15]
    assert {k for h in history for k in h} == LOGGED | {"step"}
    assert [h["loss"] for h in history] == [0.2, 0.1, 1 / 15]
    assert [h["tokens"] for h in history] == [20480, 40960, 61440]
    assert all(math.isnan(h["nan_metric"]) and h["inf_metric"] == math.inf for h in history)

    (run,) = of_type(records, "run")
    assert run.run_id == run_id and run.project == "sae-fast-tests"
    config = {c.key: json.loads(c.value_json) for c in run.config.update}
    assert config["train"] == {"lr": 3e-4, "k": 32} and config["d_in"] == 64
    (exit_record,) = of_type(records, "exit")
    assert exit_record.exit_code == 0


def test_wandb_resume_continues_the_stored_run(wandb_env, tmp_path):
    out = tmp_path / "run"
    with open_wandb(out) as sinks:
        for row in rows(range(1, 5)):
            sinks.write(row)
    run_id = (out / WANDB_RUN_ID_FILE).read_text().strip()
    time.sleep(1 - time.time() % 1)  # run folders are named by the second, as real resumes are
    with open_wandb(out, resume_step=2) as sinks:
        assert sinks.wandb_run.id == run_id
        for row in rows(range(3, 7), scale=10.0):
            sinks.write(row)
    assert (out / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    first, resumed = offline_runs(out)  # one folder per session, for `wandb sync` to merge
    assert [h["step"] for h in wandb_history(run_records(first))] == [1, 2, 3, 4]
    records = run_records(resumed)
    assert of_type(records, "run")[0].run_id == run_id
    history = wandb_history(records)
    assert [h["step"] for h in history] == [3, 4, 5, 6]
    assert [h["loss"] for h in history] == [10 / s for s in range(3, 7)]

    with open_wandb(out) as sinks:  # a new run in the folder: a new wandb run
        assert sinks.wandb_run.id != run_id
    assert (out / WANDB_RUN_ID_FILE).read_text().strip() == sinks.wandb_run.id


def test_wandb_run_fails_when_the_block_raises(wandb_env, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="diverged"), open_wandb(out) as sinks:
        sinks.write(rows([1])[0])
        raise RuntimeError("diverged")
    (run_dir,) = offline_runs(out)
    (exit_record,) = of_type(run_records(run_dir), "exit")
    assert exit_record.exit_code == 1


def test_wandb_mode_from_the_environment(wandb_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    with open_wandb(out) as sinks:
        sinks.write(rows([1])[0])
    assert not (out / WANDB_RUN_ID_FILE).exists()
    assert not (out / "wandb").exists()


def test_tensorboard_and_wandb_together(wandb_env, tmp_path):
    with open_sinks(
        tmp_path, {}, tensorboard=True, wandb=True, wandb_project=None, resume_step=None
    ) as sinks:
        for row in rows([1, 2]):
            sinks.write(row)
        run_id = sinks.wandb_run.id
    assert [s for s, _ in read_tensorboard(tmp_path / TENSORBOARD_DIR)["loss"]] == [1, 2]
    (run_dir,) = offline_runs(tmp_path)
    assert run_dir.name.endswith(run_id)
    history = wandb_history(run_records(run_dir))
    assert [h["loss"] for h in history] == [1.0, 0.5]


def test_a_training_run_logs_its_metric_rows_to_tensorboard(tmp_path):
    from sae_fast.sources import SyntheticSource
    from sae_fast.training import TrainConfig, Trainer

    options = {"synthetic_d": 16, "n_latents": 32, "k": 4, "batch_size": 32, "init_tokens": 32}
    options |= {"log_every": 2, "checkpoint_every": 4, "progress": False, "plots": False}
    cfg = TrainConfig(
        source="synthetic", steps=6, out_dir=str(tmp_path), tensorboard=True, **options
    )
    Trainer(cfg, SyntheticSource(16, 32, 3)).train(until=5)  # logs 2, 4, 5; saves 4 and 5
    step_4 = tmp_path / "checkpoints" / "step-00000004"
    Trainer(cfg, SyntheticSource(16, 32, 3), resume=step_4).train()  # 5 is purged, 6 logged
    scalars = read_tensorboard(tmp_path / TENSORBOARD_DIR)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["fvu"]] == [row["step"] for row in logged] == [2, 4, 6]
    assert [v for _, v in scalars["fvu"]] == pytest.approx([row["fvu"] for row in logged])
