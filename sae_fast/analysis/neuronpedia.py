"""A dashboard's feature records (dashboard.py) as the files Neuronpedia takes, written with the
dashboard by `sae-fast dashboard --neuronpedia SET` into its neuronpedia/ folder:

- batch-N.json: SAEDashboard's batch files (`NeuronpediaDashboardBatch` of
  sae_dashboard/neuronpedia/neuronpedia_dashboard.py: model_id, layer, sae_set and, per
  feature, the keyword arguments of `NeuronpediaDashboardFeature`, each example those of
  `NeuronpediaDashboardActivation`), which its exporter turns into Neuronpedia's rows;
- upload-batch-N.json: the body of Neuronpedia's `POST /api/feature/upload-batch`, as the
  `neuronpedia` package's `FeatureRequest.upload_batch` builds it (modelId, source and per
  feature index, density, top and bottom logits, activations with their quantile).

Both hold BATCH_FEATURES features a file. The model is named by its Hugging Face id
(options.hub_id), the source by Neuronpedia's convention LAYER-SET (3-res-sf), LAYER read
from the hook point. Logits are sent only when the dashboard's output effect is the
unembedding's (an encoder's nearest input embeddings are not logits). What the records hold
maps as docs/DASHBOARD.md says.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..options import hub_id, is_natural

BATCH_FEATURES = 128  # the most features Neuronpedia's upload-batch takes at once
FOLDER = "neuronpedia"
_SET_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")  # as Neuronpedia's source ids spell them


def check_set_name(name: str) -> str:
    """name if it can name a Neuronpedia source set; ValueError otherwise."""
    if not _SET_NAME.fullmatch(name):
        raise ValueError(f"expected a name of lowercase letters, digits and dashes, got {name!r}")
    return name


def layer_of(hook: str | None) -> int:
    """The layer a hook point names: resid_post.3 -> 3, encoder.layer.1.output -> 1; 0
    where it names none."""
    numbers = [int(part) for part in (hook or "").split(".") if is_natural(part)]
    return numbers[-1] if numbers else 0


def _logits(record: dict) -> tuple[list[dict], list[dict]]:
    """(top, bottom) logits {token, value} of a record; none unless they are logits."""
    effect = record["output_effect"]
    if effect["kind"] != "unembedding_logits":
        return [], []
    return effect["positive"], effect["negative"]


def _examples(record: dict) -> list[tuple[dict, float, float, float]]:
    """(example, bin_min, bin_max, bin_contains) of each example: the top ones in SAEDashboard's
    top group (-1, max activation, -1), each quantile group's in its range and width."""
    top = [(e, -1.0, record["max_activation"], -1.0) for e in record["top_examples"]]
    for group in record["quantile_examples"]:
        (lo, hi), (low, high) = group["quantile"], group["value_range"]
        top += [(e, low, high, hi - lo) for e in group["examples"]]
    return top


def _dashboard_feature(record: dict, context_size: int, dataset: str) -> dict[str, Any]:
    """The keyword arguments of SAEDashboard's NeuronpediaDashboardFeature for a record."""
    top, bottom = _logits(record)
    width = record["histogram"]["bin_width"]
    counts = record["histogram"]["counts"]
    return {
        "feature_index": record["index"],
        "correlated_features_indices": [c["index"] for c in record["cofiring"]],
        "pos_str": [t["token"] for t in top],
        "pos_values": [t["value"] for t in top],
        "neg_str": [t["token"] for t in bottom],
        "neg_values": [t["value"] for t in bottom],
        "frac_nonzero": record["density"],
        "freq_hist_data_bar_values": [(i + 0.5) * width for i in range(len(counts))],
        "freq_hist_data_bar_heights": [float(c) for c in counts],
        "n_tokens_in_prompt": context_size,
        "dataset": dataset,
        "activations": [
            {
                "bin_min": low,
                "bin_max": high,
                "bin_contains": contains,
                "tokens": e["tokens"],
                "values": e["values"],
                "qualifying_token_index": e["token_index"],
            }
            for e, low, high, contains in _examples(record)
        ],
    }


def _upload_feature(record: dict) -> dict[str, Any]:
    """A record as one feature of Neuronpedia's upload-batch body."""
    top, bottom = _logits(record)
    return {
        "index": record["index"],
        "density": record["density"],
        "activations": [
            {
                "tokens": e["tokens"],
                "values": e["values"],
                "quantileMax": None if contains < 0 else high,
                "quantileMin": None if contains < 0 else low,
                "quantileFraction": None if contains < 0 else contains,
            }
            for e, low, high, contains in _examples(record)
        ],
        "explanations": [],
        "topLogits": [{"token": t["token"], "value": t["value"]} for t in top] or None,
        "bottomLogits": [{"token": t["token"], "value": t["value"]} for t in bottom] or None,
    }


def neuronpedia_files(records: list[dict], meta: dict, sae_set: str) -> dict[str, str]:
    """{path in the dashboard folder: JSON text} of the batch files for records.
    meta: the dashboard's (model, hook, text, context_size)."""
    model, layer = hub_id(meta["model"]), layer_of(meta["hook"])
    source = f"{layer}-{sae_set}"
    files = {}
    for n, start in enumerate(range(0, len(records), BATCH_FEATURES)):
        part = records[start : start + BATCH_FEATURES]
        batch = {
            "model_id": model,
            "layer": layer,
            "sae_set": sae_set,
            "features": [_dashboard_feature(r, meta["context_size"], meta["text"]) for r in part],
        }
        upload = {"modelId": model, "source": source, "features": list(map(_upload_feature, part))}
        files[f"{FOLDER}/batch-{n}.json"] = json.dumps(batch, allow_nan=False)
        files[f"{FOLDER}/upload-batch-{n}.json"] = json.dumps(upload, allow_nan=False)
    return files
