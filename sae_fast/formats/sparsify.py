"""EleutherAI sparsify: one folder per hook point with sae.safetensors and cfg.json.

cfg.json holds SparseCoderConfig's fields plus d_in: activation, k, num_latents (0: d_in *
expansion_factor), normalize_decoder, multi_topk, skip_connection, transcode (older EleutherAI
`sae` releases: the same names, and `signed`). sae.safetensors holds encoder.weight (m, d),
encoder.bias (m,), W_dec (m, d), b_dec (d,): SparseCoder computes top-k of relu((x - b_dec) @
encoder.weight.T + encoder.bias) and decodes with W_dec + b_dec, which is our TopK on the same
tensors (no fold). normalize_decoder and multi_topk shape only training (with multi_topk its
forward returns the 4k-latent decode its loss scores as sae_out; encode, and ours, keep k).

transcode=true is a transcoder (no b_dec subtraction; it predicts a module's output from its
input, of the same width d_in); skip_connection=true adds x @ W_skip.T, W_skip (d_in, d_in),
to the output. Refused with a CheckpointError: activation "groupmax", signed top-k. The path
may also be a training run's folder holding one hook point's folder; with several, the error
lists them.

Save writes a folder SparseCoder.load_from_disk reads: topk SAEs and transcoders (of equal
input and output widths) without input_norm only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..files import peek_json
from . import folder, layout
from .registry import Config, Format, Tensors, register

WEIGHTS_FILE = "sae.safetensors"
_TENSORS = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}
# Options that change the function, with why ours cannot compute it.
_REFUSED = {"signed": "signed top-k selects by |pre|"}


def _config(path: Path) -> dict[str, Any] | None:
    """path/cfg.json if it is a sparsify one (k and a width, none of SAELens's or ours)."""
    cfg = peek_json(path / folder.CONFIG_FILE)
    if cfg is None or "d_sae" in cfg or "format" in cfg:
        return None
    return cfg if "k" in cfg and ("num_latents" in cfg or "expansion_factor" in cfg) else None


def _hookpoints(path: Path) -> list[Path]:
    """The sparsify folders directly inside path (a training run's save folder)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and _config(p) is not None)


def detect(path: Path) -> bool:
    """A sparsify cfg.json, or no cfg.json and sparsify hook-point folders inside."""
    if not path.is_dir():
        return False
    if _config(path) is not None:
        return True
    return not (path / folder.CONFIG_FILE).exists() and bool(_hookpoints(path))


def _coder_folder(path: Path) -> Path:
    if (path / folder.CONFIG_FILE).exists() or not path.is_dir():
        return path
    found = _hookpoints(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{path} has no {folder.CONFIG_FILE} and no hook-point folders")
    names = [p.name for p in found]
    raise CheckpointError(
        f"{path} holds sparse coders for {len(names)} hook points {names}; load one of them, "
        f"e.g. {path / names[0]}"
    )


def load(path: Path) -> tuple[Config, Tensors]:
    path = _coder_folder(path)
    where = str(path / folder.CONFIG_FILE)
    cfg = folder.read_config(path)
    for name, why in _REFUSED.items():
        if cfg.get(name):
            raise CheckpointError(f"{where}: {name}=true is not supported: {why}")
    if cfg.get("activation", "topk") != "topk":
        raise CheckpointError(
            f"{where}: activation {cfg['activation']!r} is not supported (sae_fast runs topk)"
        )
    d = folder.integer(where, "d_in", cfg.get("d_in"))
    m = folder.integer(where, "num_latents", cfg.get("num_latents") or 0, minimum=0)
    if m == 0:  # sparsify's rule: num_latents 0 means d_in * expansion_factor
        m = d * folder.integer(where, "expansion_factor", cfg.get("expansion_factor"))
    k = folder.integer(where, "k", cfg.get("k"))
    weights = str(path / WEIGHTS_FILE)
    transcoder = folder.flag(where, "transcode", cfg.get("transcode", False))
    skip = folder.flag(where, "skip_connection", cfg.get("skip_connection", False))
    names = {**_TENSORS, **({"W_skip": "W_skip"} if skip else {})}
    state = folder.read_weights(path / WEIGHTS_FILE)
    folder.check_names(weights, state, names.values())
    shapes = {"W_enc": (m, d), "W_dec": (m, d), "b_dec": (d,), "b_enc": (m,), "W_skip": (d, d)}
    tensors = {
        ours: layout.get_tensor(weights, state, theirs, shapes[ours])
        for ours, theirs in names.items()
    }
    return layout.assemble(
        where, tensors, activation="topk", k=k, transcoder=transcoder, skip_connection=skip
    )


def save(config: Config, ours: Tensors, path: Path) -> None:
    """Write folder path as SparseCoder.save_to_disk does (topk without input_norm only)."""
    activation, input_norm = config["activation"], config["input_norm"]
    if activation != "topk":
        raise CheckpointError(
            f"sparsify's SparseCoder runs per-row top-k only; this SAE is {activation!r}"
        )
    if input_norm != "none":
        raise CheckpointError(
            f"sparsify has no input normalisation; this SAE uses input_norm={input_norm!r}"
        )
    if config["transcoder"] and config["d_out"] != config["d_in"]:
        raise CheckpointError(
            f"sparsify's transcoders predict an output as wide as their input; this one maps "
            f"d_in={config['d_in']} to d_out={config['d_out']}"
        )
    cfg = {
        "activation": "topk",
        # sparsify reads num_latents first; expansion_factor is informational beside it.
        "expansion_factor": max(1, config["n_latents"] // config["d_in"]),
        "normalize_decoder": True,
        "num_latents": config["n_latents"],
        "k": config["k"],
        "multi_topk": False,
        "skip_connection": config["skip_connection"],
        "transcode": config["transcoder"],
        "d_in": config["d_in"],
    }
    names = {**_TENSORS, **({"W_skip": "W_skip"} if config["skip_connection"] else {})}
    tensors = {theirs: ours[name] for name, theirs in names.items()}
    folder.write(Path(path), WEIGHTS_FILE, tensors, cfg, metadata={"format": "pt"})


register(Format("sparsify", detect, load, save, files=(WEIGHTS_FILE, folder.CONFIG_FILE)))
