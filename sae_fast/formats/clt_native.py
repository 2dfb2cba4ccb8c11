"""sae_fast's own layout of a cross-layer transcoder: clt.safetensors + cfg.json, the config
stamped "format": "sae_fast-clt" (sae_fast.clt.config holds its fields)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CONFIG_FILE, CheckpointError, read_stamped_json
from ..clt import config as clt_config
from ..files import peek_json
from .folder import check_tensors, read_weights, write
from .registry import Config, Format, Tensors, register

FORMAT = "sae_fast-clt"
FORMAT_VERSION = 1
WEIGHTS_FILE = "clt.safetensors"


def detect(path: Path) -> bool:
    body = peek_json(path / CONFIG_FILE) if path.is_dir() else None
    return (path / WEIGHTS_FILE).exists() or (body or {}).get("format") == FORMAT


def checked(where: str, config: Config, tensors: Tensors) -> tuple[Config, Tensors]:
    """(config completed, tensors), or CheckpointError naming what does not fit: a field, a
    tensor missing or extra, a shape or dtype other than the config implies."""
    try:
        config = clt_config.complete(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} does not describe a cross-layer transcoder: {e}") from e
    check_tensors(where, tensors, clt_config.tensor_shapes(config), clt_config.dtype(config))
    return config, tensors


# The activations circuit-tracer's and llamascopium's CLT layouts hold.
PLAIN_ACTIVATIONS = ("relu", "jumprelu")


def check_plain(config: Config, layout: str) -> None:
    """CheckpointError unless layout (circuit-tracer's, llamascopium's) holds the CLT config
    describes: ReLU or JumpReLU, no skip connection, one width for inputs and outputs."""
    if config["activation"] not in PLAIN_ACTIVATIONS:
        raise CheckpointError(
            f"{layout}'s CLTs are ReLU or JumpReLU, not {config['activation']}: convert it "
            "with per-feature thresholds calibrated on held-out activations "
            f"(sae_fast.clt.to_jumprelu, or `sae-fast convert --to {layout} --calibrate`)"
        )
    if config.get("skip_connection"):
        raise CheckpointError(f"{layout}'s CLT files hold no skip connection: save as sae_fast")
    if config.get("d_out") not in (None, config["d_in"]):
        raise CheckpointError(f"{layout}'s CLTs read and write one width (d_out = d_in)")


def load(path: Path) -> tuple[Config, Tensors]:
    where = path / CONFIG_FILE
    if not where.exists():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}")
    body = read_stamped_json(where, FORMAT, FORMAT_VERSION, CheckpointError)
    config = {k: v for k, v in body.items() if k not in ("format", "format_version")}
    return checked(str(path), config, read_weights(path / WEIGHTS_FILE))


def save(config: Config, tensors: Tensors, path: Path) -> None:
    stamp = {"format": FORMAT, "format_version": FORMAT_VERSION}
    write(path, WEIGHTS_FILE, tensors, {**stamp, **config}, {"format": FORMAT})


register(Format("sae_fast", detect, load, save, files=(WEIGHTS_FILE, CONFIG_FILE), kind="clt"))
