"""Reading what an SAE learned: evaluation, feature contexts, steering, summaries, reports.

- evaluate: held-out MSE, FVU, L0, dead and dense fractions, SAEBench's core metrics; CE loss
  recovered and KL divergence;
- drift: the latents that fire more or less often on one corpus than on another;
- compare: two SAEs' features matched by decoder direction; correlation: by activation
  correlation over a text;
- feature_stats, best_k: one streaming pass into bounded per-feature heaps and histograms;
  dashboard: the per-feature records; dashboard_html: the static pages (dashboard.css, .js);
- explain: each token's latents;
- features: the token contexts on which latents activate most;
- steering: splice an SAE into a transformers model, read latents, steer features;
- summary: what `sae-fast inspect` prints;
- html_report: a standalone HTML report of a run.
"""

from .evaluate import ce_loss_recovered, evaluate
from .steering import FeatureEdits, SAESite, attach, steer

__all__ = ["FeatureEdits", "SAESite", "attach", "ce_loss_recovered", "evaluate", "steer"]
