"""SAELens: a folder with sae_weights.safetensors and cfg.json, as SAE.save_model writes it.

SAELens 6 computes, with W_enc stored (d, m) (the transpose of ours) and W_dec (m, d):
  u = norm_in(x) - b_dec * apply_b_dec_to_input          # normalize_activations picks norm_in
  standard   z = relu(u @ W_enc + b_enc)
  topk       z = relu(top-k of pre), pre = (u @ W_enc + b_enc) [* ||W_dec[j]||]
  jumprelu   z = relu(pre) * (pre > threshold)
  gated      z = 1[u @ W_enc + b_gate > 0] * relu(u @ (W_enc * exp(r_mag)) + b_mag)
  batchtopk, matryoshka_batchtopk (training classes): the top n*k of relu(pre [* ||W_dec[j]||])
             over the batch; topk_threshold is what SAELens turns into a JumpReLU on export
             (matryoshka_widths become our matryoshka prefixes: SAELens's inner losses are
             our prefixes' errors)
  x_hat = norm_out(z [/ ||W_dec[j]||] @ W_dec + b_dec)  # [..]: rescale_acts_by_decoder_norm
Loading folds what is linear, so that ours computes the same function and the same latents
(n_j = ||W_dec[j]||; shift = W_enc @ b_dec in our (m, d) layout):
  apply_b_dec_to_input=false    b_enc += shift (gated: b_gate += shift, b_mag += exp(r_mag) shift)
  rescale_acts_by_decoder_norm  W_enc[j] *= n_j, b_enc[j] *= n_j, W_dec[j] /= n_j
  finetuning scaling factor f   (pre-6 layouts) W_dec[j] *= f_j
  expected_average_only_in      the SAE saw s * x, s from the trainer's activation_scaler.json:
                                W_enc *= s, W_dec /= s, b_dec /= s (SAELens's own fold)
  layer_norm, constant_norm_rescale -> input_norm "layer_norm", "constant_norm"
  jumprelu threshold -> log_threshold = log(threshold) (a threshold <= 0 acts as 0: -inf)
  batchtopk topk_threshold > 0 -> our calibrated threshold; 0 (never updated) -> uncalibrated,
                                which runs batch top-k at inference as their class does
reshape_activations="hook_z" loads: feed the heads flattened, (..., n_heads * d_head).
Transcoders (transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder):
  z = act(x @ W_enc + b_enc) (no b_dec on the input), y_hat = z @ W_dec + b_dec [+ x @
  W_skip.T], W_dec (m, d_out), W_skip (d_out, d_in): our transcoder on the same tensors;
  metadata.hook_name is the input hook point, hook_name_out the output's.
Training-only fields (losses, jumprelu_ste_to_input, ...) do not change the function; the
JumpReLU bandwidth is kept for the threshold's straight-through gradient.
Anything else that changes the function is refused with a CheckpointError naming the field.

Save writes the SAELens 6 inference layout that SAE.load_from_disk reads: relu as "standard",
topk, jumprelu, gated, and a calibrated batchtopk as a jumprelu with its threshold on every
latent (as SAELens exports its own BatchTopK SAEs); metadata.sae_fast lets us read it back as
batchtopk with its k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointError
from ..files import peek_json
from ..options import SPARSE_ACTIVATIONS, hub_id, is_natural
from ..validation import dtype_name, parse_dtype
from . import folder, layout
from .registry import Config, Format, Tensors, register

WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"  # SAELens's trainer state beside mid-training saves
# The SAELens release whose layout save writes (and the tests load with); its loader reads
# configs without a 6.x version as pre-6.
SAELENS_VERSION = "6.54.12"
# Our hook points in TransformerLens's names, which SAELens's hook_name uses.
_TL_HOOKS = {
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "mlp_in": "ln2.hook_normalized",  # what TransformerLens's MLP reads
}
_OUR_HOOKS = {theirs: ours for ours, theirs in _TL_HOOKS.items()}

_ACTIVATIONS = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "batchtopk",  # its matryoshka_widths: our matryoshka prefixes
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
# Their default for rescale_acts_by_decoder_norm where the config lacks it: the inference
# TopKSAE's (False) for topk, the training class's (True) for the training-only batch ones.
_RESCALE_DEFAULT = {"topk": False, "batchtopk": True, "matryoshka_batchtopk": True}
_NORMS = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm"}
_SAVED_AS = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "jumprelu",
}


def detect(path: Path) -> bool:
    """A folder with sae_weights.safetensors, or a cfg.json with SAELens's d_sae field."""
    if not path.is_dir():
        return False
    if (path / WEIGHTS_FILE).is_file():
        return True
    config = peek_json(path / folder.CONFIG_FILE)
    return config is not None and "d_sae" in config


def _major(version: Any) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _modernize(where: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6 config (no 6.x sae_lens_version) in the 6.x field names, as SAELens reads it."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if _major(cfg.get("sae_lens_version") or metadata.get("sae_lens_version")) >= 6:
        return cfg
    cfg = dict(cfg)
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation == "topk":
        if kwargs.get("signed"):
            raise CheckpointError(f"{where}: activation_fn_kwargs.signed=true (top-k by |pre|)")
        cfg["architecture"] = "topk"
        cfg.setdefault("k", kwargs.get("k"))
    elif activation != "relu":
        raise CheckpointError(
            f"{where}: activation_fn {activation!r} is not one sae_fast computes (relu, topk)"
        )
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    norm = cfg.get("normalize_activations")
    if norm is None or isinstance(norm, bool):  # before the modes had names
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return cfg


def _dtype(where: str, value: Any) -> torch.dtype:
    dtype = parse_dtype(value)
    if dtype is None:
        raise CheckpointError(f"{where}: dtype {value!r} is not a floating-point torch dtype")
    return dtype


def _input_norm(path: Path, where: str, cfg: dict[str, Any]) -> tuple[str, float | None]:
    """(our input_norm, the expected_average_only_in scaling factor or None)."""
    norm = cfg.get("normalize_activations", "none")
    if norm in _NORMS:
        return _NORMS[norm], None
    if norm != "expected_average_only_in":
        raise CheckpointError(
            f"{where}: normalize_activations {norm!r} is not one sae_fast can compute or fold "
            f"({', '.join([*_NORMS, 'expected_average_only_in'])})"
        )
    # The trainer scaled x by s while training and folds s in when it ends; a folder saved
    # before that keeps s in the trainer state beside it, or nowhere.
    scaler = peek_json(path / SCALER_FILE)
    if scaler is None or scaler.get("scaling_factor") is None:
        raise CheckpointError(
            f"{where}: normalize_activations 'expected_average_only_in' means the SAE saw x "
            f"times a scaling factor that this folder does not hold (no usable {SCALER_FILE}); "
            "SAELens folds it in when training ends, or from pretrained_saes.yaml"
        )
    where = str(path / SCALER_FILE)
    return "none", folder.positive(where, "scaling_factor", scaler["scaling_factor"])


def _k(where: str, cfg: dict[str, Any], activation: str) -> int | None:
    if activation not in SPARSE_ACTIVATIONS:
        return None
    value = cfg.get("k")
    if isinstance(value, float) and not value.is_integer():
        # BatchTopK keeps int(k * n) latents per batch; ours keeps n * k for an integer k.
        raise CheckpointError(f"{where}: k={value} is fractional; sae_fast needs an integer k")
    return folder.integer(where, "k", value)


def _bandwidth(where: str, cfg: dict[str, Any], metadata: dict[str, Any]) -> float:
    """The JumpReLU bandwidth: a training config's, ours from metadata, or sae_fast's default."""
    for source in (cfg, metadata.get("sae_fast"), metadata.get("training_architecture_details")):
        if isinstance(source, dict) and source.get("jumprelu_bandwidth") is not None:
            return folder.positive(where, "jumprelu_bandwidth", source["jumprelu_bandwidth"])
    return 1e-3


def _tensors(
    where: str, state: dict[str, Tensor], arch: str, d: int, m: int, d_out: int
) -> dict[str, Tensor]:
    """The tensors arch stores, checked, in float64, in our names and (m, d) layout.

    gated's b_gate becomes b_enc; their extras keep their names (threshold or log_threshold,
    topk_threshold), and a pre-6 finetuning scaling factor (m,) is returned as "factor".
    """
    gated = arch == "gated"
    names = {"W_enc", "W_dec", "b_dec", *(("b_gate", "r_mag", "b_mag") if gated else ("b_enc",))}
    if _ACTIVATIONS[arch] == "jumprelu":  # older training saves hold log_threshold
        names.add("log_threshold" if "log_threshold" in state else "threshold")
    if _ACTIVATIONS[arch] == "batchtopk":
        names.add("topk_threshold")
    if "skip" in arch:
        names.add("W_skip")
    factor = [key for key in ("finetuning_scaling_factor", "scaling_factor") if key in state]
    folder.check_names(where, state, names | set(factor))
    shapes = {"W_enc": (d, m), "W_dec": (m, d_out), "b_dec": (d_out,), "topk_threshold": ()}
    shapes["W_skip"] = (d_out, d)
    out = {
        name: layout.get_tensor(where, state, name, shapes.get(name, (m,))).double()
        for name in sorted(names | set(factor))
    }
    out["W_enc"] = out["W_enc"].T
    if gated:
        out["b_enc"] = out.pop("b_gate")
    if factor:
        out["factor"] = out.pop(factor[0])
    return out


def load(path: Path) -> tuple[Config, Tensors]:
    where = str(path / folder.CONFIG_FILE)
    cfg = _modernize(where, folder.read_config(path))
    arch = cfg.get("architecture")
    if arch not in _ACTIVATIONS:
        raise CheckpointError(
            f"{where}: architecture {arch!r} is not one sae_fast computes exactly "
            f"(it reads {', '.join(_ACTIVATIONS)})"
        )
    activation = _ACTIVATIONS[arch]
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    d = folder.integer(where, "d_in", cfg.get("d_in"))
    m = folder.integer(where, "d_sae", cfg.get("d_sae"))
    transcoder = arch in _TRANSCODERS
    d_out = folder.integer(where, "d_out", cfg.get("d_out")) if transcoder else d
    dtype = _dtype(where, cfg.get("dtype", "float32"))
    input_norm, scale = _input_norm(path, where, cfg)
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise CheckpointError(
            f"{where}: reshape_activations {cfg['reshape_activations']!r} is not supported"
        )
    k = _k(where, cfg, activation)
    apply_b_dec = folder.flag(
        where, "apply_b_dec_to_input", cfg.get("apply_b_dec_to_input", not transcoder)
    )
    if transcoder and (apply_b_dec or input_norm != "none" or scale is not None):
        raise CheckpointError(
            f"{where}: a transcoder with apply_b_dec_to_input or normalize_activations "
            "(SAELens refuses the first; sae_fast's transcoders take raw activations)"
        )
    rescale = arch in _RESCALE_DEFAULT and folder.flag(
        where,
        "rescale_acts_by_decoder_norm",
        cfg.get("rescale_acts_by_decoder_norm", _RESCALE_DEFAULT[arch]),
    )
    weights = str(path / WEIGHTS_FILE)
    t = _tensors(weights, folder.read_weights(path / WEIGHTS_FILE), arch, d, m, d_out)

    # pre = u @ W_enc + b = (u - b_dec) @ W_enc + (b + W_enc b_dec); a transcoder's
    # encoder never subtracts b_dec (ours neither).
    if not apply_b_dec and not transcoder:
        shift = t["W_enc"] @ t["b_dec"]
        t["b_enc"] = t["b_enc"] + shift
        if activation == "gated":  # the magnitude path's weight is W_enc * exp(r_mag)
            t["b_mag"] = t["b_mag"] + t["r_mag"].exp() * shift
    if rescale:  # pre_j * n_j selects and is decoded as (z_j / n_j) * W_dec[j]
        norms = t["W_dec"].norm(dim=1)
        if not bool((norms > 0).all()):
            raise CheckpointError(
                f"{weights}: rescale_acts_by_decoder_norm is set but {int((norms == 0).sum())} "
                "decoder rows are zero, which SAELens divides by"
            )
        t["W_enc"] = t["W_enc"] * norms[:, None]
        t["b_enc"] = t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms[:, None]
    if "factor" in t:  # pre-6: x_hat = (z * factor) @ W_dec + b_dec
        factor = t.pop("factor")
        if not bool((factor == 1).all()):
            if not cfg.get("finetuning_scaling_factor"):
                raise CheckpointError(
                    f"{weights} holds a finetuning scaling factor but {where} does not set "
                    "finetuning_scaling_factor"
                )
            t["W_dec"] = t["W_dec"] * factor[:, None]
    if scale is not None:  # the SAE computes f(s x) / s
        t["W_enc"] = t["W_enc"] * scale
        t["W_dec"], t["b_dec"] = t["W_dec"] / scale, t["b_dec"] / scale

    bandwidth = 1e-3
    if activation == "jumprelu":
        threshold = t.pop("threshold") if "threshold" in t else t.pop("log_threshold").exp()
        ours = metadata.get("sae_fast") if isinstance(metadata.get("sae_fast"), dict) else {}
        uniform = bool((threshold == threshold[0]).all()) and threshold[0] >= 0
        if ours.get("activation") == "batchtopk" and uniform:
            # What save wrote for a calibrated batchtopk: one threshold on every latent.
            activation, k = "batchtopk", folder.integer(where, "metadata.sae_fast.k", ours.get("k"))
            t["threshold"] = threshold[0]
        else:
            bandwidth = _bandwidth(where, cfg, metadata)
            t["log_threshold"] = threshold.clamp_min(0).log()  # <= 0 acts as 0 in relu(pre)
    elif activation == "batchtopk":
        threshold = t.pop("topk_threshold")
        # 0 is its initial value, never updated: their class runs batch top-k, as ours does
        # uncalibrated (threshold -1).
        t["threshold"] = threshold if threshold > 0 else torch.tensor(-1.0)
    return layout.assemble(
        where,
        {name: value.to(dtype) for name, value in t.items()},
        activation=activation,
        k=k,
        input_norm=input_norm,
        jumprelu_bandwidth=bandwidth,
        matryoshka=_widths(where, cfg, metadata, arch, m),
        transcoder=transcoder,
        skip_connection="W_skip" in t,
        provenance=_provenance(metadata, transcoder),
    )


def _widths(where: str, cfg: dict, metadata: dict, arch: str, m: int) -> list[int] | None:
    """The prefix sizes: matryoshka_widths (d_sae appended when missing, as SAELens does) or
    what sae_fast wrote in metadata; None for a plain SAE."""
    ours = metadata.get("sae_fast") if isinstance(metadata.get("sae_fast"), dict) else {}
    if arch == "matryoshka_batchtopk":
        widths = cfg.get("matryoshka_widths") or []
    elif ours.get("matryoshka") is not None:
        widths = ours["matryoshka"]
    else:
        return None
    if not isinstance(widths, list) or not all(
        isinstance(w, int) and not isinstance(w, bool) for w in widths
    ):
        raise CheckpointError(f"{where}: matryoshka_widths must be a list of ints, got {widths!r}")
    widths = widths if widths[-1:] == [m] else [*widths, m]
    return widths if len(widths) > 1 else None  # the whole dictionary alone: plain


def _tl_hook(hook: str | None) -> str | None:
    """resid_post.3 -> blocks.3.hook_resid_post; a module path stays as it is."""
    kind, _, layer = (hook or "").partition(".")
    return f"blocks.{layer}.{_TL_HOOKS[kind]}" if kind in _TL_HOOKS and is_natural(layer) else hook


def _our_hook(hook: Any) -> str | None:
    """blocks.3.hook_resid_post -> resid_post.3 (the inverse of _tl_hook)."""
    if not isinstance(hook, str):
        return None
    parts = hook.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and is_natural(parts[1]) and parts[2] in _OUR_HOOKS:
        return f"{_OUR_HOOKS[parts[2]]}.{parts[1]}"
    return hook


def _provenance(metadata: dict[str, Any], transcoder: bool) -> dict[str, Any]:
    """Ours where we wrote it, else what SAELens records: model_name, hook_name (a
    transcoder's input; hook_name_out its output), dataset."""
    ours = metadata.get("sae_fast")
    if isinstance(ours, dict) and isinstance(ours.get("provenance"), dict):
        return ours["provenance"]
    hook = _our_hook(metadata.get("hook_name"))
    found = {
        "model": metadata.get("model_name"),
        "hook": None if transcoder else hook,
        "hook_in": hook if transcoder else None,
        "hook_out": _our_hook(metadata.get("hook_name_out")) if transcoder else None,
        "text": metadata.get("dataset_path"),
    }
    return {key: value for key, value in found.items() if isinstance(value, str) and value}


def save(config: Config, ours: Tensors, path: Path) -> None:
    """Write folder path in the SAELens 6 inference layout (see the module docstring)."""
    activation, input_norm = config["activation"], config["input_norm"]
    transcoder, skip = config["transcoder"], config["skip_connection"]
    arch = _SAVED_AS[activation]
    if transcoder and arch not in ("standard", "jumprelu"):
        raise CheckpointError(
            f"SAELens's transcoders are ReLU or JumpReLU (a calibrated batchtopk saves as "
            f"one); it has no {activation!r} transcoder class: save it as sae_fast or sparsify"
        )
    if skip and not transcoder:
        raise CheckpointError("SAELens has skip connections on transcoders only")
    if transcoder:
        arch = ("" if arch == "standard" else "jumprelu_") + ("skip_" if skip else "")
        arch += "transcoder"
    tensors = {"W_enc": ours["W_enc"].T, "W_dec": ours["W_dec"], "b_dec": ours["b_dec"]}
    if skip:
        tensors["W_skip"] = ours["W_skip"]
    if activation == "gated":
        tensors |= {"b_gate": ours["b_enc"], "r_mag": ours["r_mag"], "b_mag": ours["b_mag"]}
    else:
        tensors["b_enc"] = ours["b_enc"]
    if activation == "jumprelu":
        tensors["threshold"] = ours["log_threshold"].exp()
    if activation == "batchtopk":
        if ours["threshold"] < 0:
            raise CheckpointError(
                "this batchtopk SAE has no calibrated threshold yet (training sets one); SAELens "
                "stores BatchTopK SAEs as JumpReLU with that threshold, and batch top-k itself "
                "has no SAELens inference class"
            )
        tensors["threshold"] = ours["threshold"].expand(config["n_latents"])
    norms = {ours_name: theirs for theirs, ours_name in _NORMS.items()}
    provenance = config["provenance"]
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": config["d_in"],
        "d_sae": config["n_latents"],
        **({"d_out": config["d_out"]} if transcoder else {}),
        "dtype": dtype_name(ours["W_enc"].dtype),
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": norms[input_norm],
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": hub_id(provenance.get("model")),
            "hook_name": _tl_hook(provenance.get("hook_in" if transcoder else "hook")),
            **({"hook_name_out": _tl_hook(provenance.get("hook_out"))} if transcoder else {}),
            "context_size": provenance.get("source", {}).get("context_size"),  # model, cache
            "dataset_path": provenance.get("text"),
            "sae_fast": {
                "activation": activation,
                "k": config["k"],
                "jumprelu_bandwidth": config["jumprelu_bandwidth"],
                "matryoshka": config["matryoshka"],
                "provenance": provenance,
            },
        },
    }
    if activation == "topk":
        cfg |= {"k": config["k"], "rescale_acts_by_decoder_norm": False}
    folder.write(Path(path), WEIGHTS_FILE, tensors, cfg)


# SAELens writes its sparsity and scaler files beside the weights: a save may replace them.
register(
    Format(
        "saelens",
        detect,
        load,
        save,
        files=(WEIGHTS_FILE, folder.CONFIG_FILE, SCALER_FILE, "sparsity.safetensors"),
    )
)
