"""circuit-tracer 0.5.0 builds an attribution graph offline on the CPU from a CLT that
sae_fast trained and saved, and the graph agrees with direct computations. Run in a Python of
its own by tests/test_clt_formats.py (circuit-tracer patches huggingface-hub on import); it
prints a PASS or FAIL line per check and exits non-zero on a failure.

For two configurations (a JumpReLU CLT reading blocks.{layer}.hook_resid_mid, a ReLU CLT reading
blocks.{layer}.ln2.hook_normalized), on a tiny random 3-layer TransformerLens model, the CLT is
first trained on the model's own MLP outputs (sae_fast's CLT loss, Adam), then saved in
circuit-tracer's layout, loaded by its load_clt, and:

  A  activations: graph.active_features / activation_values == sae_fast clt(x) on x captured
     by run_with_cache at the feature input hook (position 0 excluded, as circuit-tracer does).
  B  hand formula, every layer-0 feature -> layer-1 feature edge, with attention patterns and
     LayerNorm scales frozen (see the comment in run_case).
  C  hand formula, every last-layer feature at the last position -> each logit node.
  D  the whole adjacency matrix (rows: all features + logits; columns: features, errors,
     tokens) against a plain HookedTransformer with the same weights, run with patterns, LN
     scales and MLP outputs frozen to their clean values (the model is then affine, so adding
     one node's vector gives its direct effect exactly), plus completeness of the logit rows.

What it takes offline: the tokenizer saved and reloaded (TransformerLens rebuilds it by
name_or_path), BOS with a nonzero id (circuit-tracer drops id 0 when it looks for special
tokens), d_vocab equal to the tokenizer's vocab_size and unlike d_model (circuit-tracer
guesses W_U's orientation from the shapes).
"""

import os
import sys
import tempfile
import time

import huggingface_hub.constants as _c

_c.HF_HUB_ENABLE_HF_TRANSFER = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from circuit_tracer import ReplacementModel  # noqa: E402
from circuit_tracer.attribution.attribute import attribute  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from sae_fast import CrossLayerTranscoder  # noqa: E402
from sae_fast.training.clt_losses import CLTLossWeights, clt_training_loss  # noqa: E402

RESULTS: list[tuple[str, bool]] = []
WORK = tempfile.mkdtemp(prefix="work_")  # system temp dir: tokenizer + CLT folders

L, D, H, DMLP, M = 3, 24, 3, 64, 48
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "to",
    "a",
    "big",
    "red",
    "ball",
    "and",
    "saw",
    "it",
    "then",
    "went",
    "home",
    "fast",
    "slow",
    "blue",
    "green",
    "tree",
    "house",
    "bird",
    "flew",
    "over",
    "under",
]
PROMPT = "the cat sat on the mat and saw a big red"


def report(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> tuple[bool, str]:
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-12)
    return err <= rtol * scale + 1e-6, f"max|diff|={err:.3e}, max|ref|={scale:.3e}, n={a.numel()}"


# --- tokenizer (saved to disk and reloaded: TransformerLens re-creates it by name_or_path) ---
def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    for i in range(len(vocab), 64):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    path = os.path.join(WORK, "tokenizer")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def make_cfg(d_vocab: int) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=L,
        d_model=D,
        n_heads=H,
        d_head=D // H,
        d_mlp=DMLP,
        d_vocab=d_vocab,
        n_ctx=32,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        model_name="tiny-random",
        seed=0,
        device="cpu",
        dtype=torch.float32,
    )


def randomise(model: HookedTransformer, gen: torch.Generator) -> None:
    """TransformerLens initialises biases to 0 and LN to (w=1, b=0): perturb them all so the
    checks see nonzero biases and LN gains."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U", ".b")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".w"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen).clamp(-2, 2))


def make_clt(activation: str, hook_in: str, gen: torch.Generator) -> CrossLayerTranscoder:
    kw = {"jumprelu_init_threshold": 0.05} if activation == "jumprelu" else {}
    clt = CrossLayerTranscoder(n_layers=L, d_in=D, n_latents=M, activation=activation, **kw)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(clt.W_enc.shape, generator=gen))
        clt.W_enc.div_(clt.W_enc.norm(dim=-1, keepdim=True))
        if hook_in.startswith("ln2"):  # unit-variance inputs: scale encoders down
            clt.W_enc.mul_(0.25)
        clt.b_enc.copy_(0.1 * torch.randn(clt.b_enc.shape, generator=gen) - 0.05)
        clt.b_dec.copy_(0.05 * torch.randn(clt.b_dec.shape, generator=gen))
        for W in clt.W_dec:
            W.copy_(0.3 * torch.randn(W.shape, generator=gen) / D**0.5)
        if activation == "jumprelu":  # per-feature thresholds around 0.05
            clt.log_threshold.copy_(
                (0.05 * torch.exp(0.3 * torch.randn(L, M, generator=gen))).log()
            )
    clt.provenance = {
        "hooks_in": [f"blocks.{layer}.{hook_in}" for layer in range(L)],
        "hooks_out": [f"blocks.{layer}.hook_mlp_out" for layer in range(L)],
    }
    return clt.eval()


def train(clt: CrossLayerTranscoder, plain: HookedTransformer, hook_in: str, gen) -> None:
    """Fit clt to plain's own MLP outputs on random token batches: sae_fast's CLT loss, Adam."""
    optimizer = torch.optim.Adam(clt.parameters(), lr=3e-3)
    clt.train()
    losses = []
    for _ in range(150):
        tokens = torch.randint(4, plain.cfg.d_vocab, (8, 16), generator=gen)
        with torch.no_grad():
            _, cache = plain.run_with_cache(
                tokens, names_filter=lambda name: name.endswith((hook_in, "hook_mlp_out"))
            )
        x = torch.stack([cache[f"blocks.{layer}.{hook_in}"].reshape(-1, D) for layer in range(L)])
        y = torch.stack(
            [cache[f"blocks.{layer}.hook_mlp_out"].reshape(-1, D) for layer in range(L)]
        )
        res = clt_training_loss(clt, x, y, CLTLossWeights(sparsity=1e-3))
        optimizer.zero_grad()
        res.loss.backward()
        optimizer.step()
        losses.append(res.terms["recon"].item())
    clt.eval()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    report(
        f"trained {clt.activation}: reconstruction fell",
        last < 0.7 * first,
        f"{first:.4f} -> {last:.4f}",
    )


def dense_code(out, n_pos: int) -> torch.Tensor:
    """sae_fast CLTOutput.code (values, indices) (L, n_pos, width) -> dense (L, n_pos, M)."""
    values, indices = out.code
    z = torch.zeros(L, n_pos, M)
    return z.scatter_add_(-1, indices.long(), values.float())


def run_case(activation: str, hook_in: str, tokenizer) -> None:
    tag = f"[{activation}, {hook_in}]"
    print(f"\n=== case {tag} ===", flush=True)
    gen = torch.Generator().manual_seed(1234)
    cfg = make_cfg(len(tokenizer))

    plain = HookedTransformer(cfg)  # independent reference model (no circuit-tracer hooks)
    randomise(plain, gen)
    plain.eval()

    clt = make_clt(activation, hook_in, gen)
    train(clt, plain, hook_in, gen)
    path = os.path.join(WORK, f"clt_{activation}")
    clt.save(path, format="circuit-tracer")
    ct_clt = load_clt(
        path,
        feature_input_hook=hook_in,
        feature_output_hook="hook_mlp_out",
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_decoder=True,
    )

    t0 = time.time()
    rm = ReplacementModel.from_config(make_cfg(len(tokenizer)), ct_clt, tokenizer=tokenizer)
    # same weights as `plain` (ReplacementMLP / ReplacementUnembed wrap the originals)
    sd_plain, sd_rm = plain.state_dict(), rm.state_dict()
    mapped = {
        k: k.replace("mlp.old_mlp.", "mlp.").replace("unembed.old_unembed.", "unembed.")
        for k in sd_rm
        if not k.startswith("transcoders.")
    }  # keep the loaded CLT
    assert set(mapped.values()) == set(sd_plain), set(mapped.values()) ^ set(sd_plain)
    with torch.no_grad():
        for k, v in mapped.items():
            sd_rm[k].copy_(sd_plain[v])
    rm.eval()

    graph = attribute(
        PROMPT,
        rm,
        max_n_logits=5,
        desired_logit_prob=0.99,
        batch_size=64,
        max_feature_nodes=None,
        verbose=False,
    )
    tokens = graph.input_tokens
    n_pos = len(tokens)
    A = graph.adjacency_matrix
    feats = graph.active_features  # (n_feat, 3): layer, pos, feature
    n_feat = len(feats)
    n_logit = len(graph.logit_targets)
    err_off, tok_off = n_feat, n_feat + L * n_pos
    logit_ids = torch.tensor([t.vocab_idx for t in graph.logit_targets])
    print(
        f"model build + attribute: {time.time() - t0:.1f}s; tokens={tokens.tolist()} "
        f"({graph.input_string!r}); {n_feat} active features; adjacency {tuple(A.shape)}; "
        f"logit nodes {logit_ids.tolist()} p={graph.logit_probabilities.tolist()}"
    )
    report(
        f"{tag} graph built",
        n_feat > 0
        and A.shape[0] == n_feat + (L + 1) * n_pos + n_logit
        and bool(torch.isfinite(A).all()),
        f"{n_feat} features, {n_logit} logit nodes",
    )
    report(
        f"{tag} all features selected",
        len(graph.selected_features) == n_feat,
        f"{len(graph.selected_features)} of {n_feat}",
    )

    # ---- clean run of the plain model, caching everything we freeze or read ----
    tok_b = tokens[None]
    with torch.no_grad():
        logits, cache = plain.run_with_cache(tok_b)
    x_in = torch.stack(
        [cache[f"blocks.{layer}.{hook_in}"][0] for layer in range(L)]
    )  # (L, n_pos, D)
    mlp_out = torch.stack([cache[f"blocks.{layer}.hook_mlp_out"][0] for layer in range(L)])

    # ---- A: activations via sae_fast ----
    with torch.no_grad():
        out = clt(x_in)
    z = dense_code(out, n_pos)
    z[:, 0] = 0  # circuit-tracer drops the BOS position
    ours = z.nonzero()
    same_set = ours.shape == feats.shape and bool((ours == feats).all())
    report(
        f"{tag} A active set == sae_fast clt(x)", same_set, f"graph {n_feat}, sae_fast {len(ours)}"
    )
    if same_set:
        ok, msg = close(graph.activation_values, z[feats[:, 0], feats[:, 1], feats[:, 2]])
        report(f"{tag} A activation values == sae_fast clt(x)", ok, msg)
    a = z[feats[:, 0], feats[:, 1], feats[:, 2]]  # activations from sae_fast, in graph order
    W_enc = clt.W_enc.detach()
    W_dec = [W.detach() for W in clt.W_dec]
    enc = W_enc[feats[:, 0], feats[:, 2]]  # (n_feat, D)

    # ---- B: layer-0 feature -> layer-1 feature, by hand ----
    # Source s (layer 0, pos p, act a_s) writes d_s = a_s * W_dec[0][f_s, 0] to mlp_out[0][p];
    # resid_pre[1] = resid_mid[0] + mlp_out[0], so with LN1 scale sigma1[p] and patterns frozen
    #   d resid_mid[1][q] = [q == p] d_s + sum_h pattern1[h, q, p] *
    #                       (((d_s - mean(d_s)) / sigma1[p]) * w_ln1) @ W_V1[h] @ W_O1[h]
    # target t (layer 1, pos q) reads e_t = W_enc[1][f_t]:
    #   hook_resid_mid:      A[t, s] = e_t . d resid_mid[1][q]
    #   ln2.hook_normalized: A[t, s] = e_t . (d resid_mid[1][q] - mean) / sigma2[q]
    src = (feats[:, 0] == 0).nonzero().squeeze(1)
    tgt = (feats[:, 0] == 1).nonzero().squeeze(1)
    b1 = plain.blocks[1]
    pat = cache["blocks.1.attn.hook_pattern"][0]  # (H, q, k)
    sig1 = cache["blocks.1.ln1.hook_scale"][0, :, 0]
    sig2 = cache["blocks.1.ln2.hook_scale"][0, :, 0]
    d_s = a[src, None] * W_dec[0][feats[src, 2], 0]  # (S, D)
    ps = feats[src, 1]
    centred = (d_s - d_s.mean(-1, keepdim=True)) / sig1[ps, None] * b1.ln1.w.detach()
    ov = torch.einsum("sd,hde,hef->shf", centred, b1.attn.W_V.detach(), b1.attn.W_O.detach())
    delta = torch.einsum("hqs,shf->sqf", pat[:, :, ps], ov)  # (S, q, D)
    delta[torch.arange(len(src)), ps] += d_s
    if hook_in.startswith("ln2"):
        delta = (delta - delta.mean(-1, keepdim=True)) / sig2[None, :, None]
    qt = feats[tgt, 1]
    hand = torch.einsum("tsd,td->ts", delta[:, qt].transpose(0, 1), enc[tgt])  # (T, S)
    got = A[tgt][:, src]
    ok, msg = close(got, hand)
    report(f"{tag} B edges layer0->layer1 features by hand", ok and got.abs().max() > 0, msg)

    # ---- C: last-layer feature at last position -> logit node, by hand ----
    # A[logit k, s] = (((d_s - mean(d_s)) / sigma_f[last]) * w_lnf) . (W_U[:, k] - mean_v W_U)
    last = n_pos - 1
    srcC = ((feats[:, 0] == L - 1) & (feats[:, 1] == last)).nonzero().squeeze(1)
    d_s = a[srcC, None] * W_dec[L - 1][feats[srcC, 2], 0]
    sigf = cache["ln_final.hook_scale"][0, last, 0]
    W_U = plain.W_U.detach()
    u = W_U[:, logit_ids] - W_U.mean(1, keepdim=True)
    handC = (((d_s - d_s.mean(-1, keepdim=True)) / sigf) * plain.ln_final.w.detach()) @ u
    gotC = A[-n_logit:][:, srcC].T
    ok, msg = close(gotC, handC)
    report(f"{tag} C edges last-layer features -> logits by hand", ok and len(srcC) > 0, msg)

    # ---- D: whole matrix by frozen finite differences on the plain model ----
    # Sources: feature s adds a_s W_dec[l_s][f_s, t - l_s] to mlp_out[t][p_s] for t >= l_s;
    # error (layer, p) adds mlp_out[layer][p] - clt_recon[layer][p] (0 at p = 0) to
    # mlp_out[layer][p];
    # token p adds W_E[tok_p] to hook_embed[p]. Targets read the change at the input hook
    # (dot W_enc of the target) and the change of logit_k - mean_v logit at the last position.
    recon = out.y_hat.detach()
    err = mlp_out - recon
    err[:, 0] = 0
    n_src = tok_off + n_pos
    add_mlp = torch.zeros(n_src, L, n_pos, D)
    add_emb = torch.zeros(n_src, n_pos, D)
    for i, (layer, p, f) in enumerate(feats.tolist()):
        add_mlp[i, layer:, p] = a[i] * W_dec[layer][f]
    for layer in range(L):
        for p in range(n_pos):
            add_mlp[err_off + layer * n_pos + p, layer, p] = err[layer, p]
    for p in range(n_pos):
        add_emb[tok_off + p, p] = plain.W_E.detach()[tokens[p]]

    def frozen_run(add_m: torch.Tensor, add_e: torch.Tensor):
        B = add_m.shape[0]
        hooks = []
        for layer in range(L):
            for name in (
                f"blocks.{layer}.attn.hook_pattern",
                f"blocks.{layer}.ln1.hook_scale",
                f"blocks.{layer}.ln2.hook_scale",
            ):
                hooks.append((name, lambda x, hook, v=cache[name]: v.expand_as(x).clone()))
            hooks.append(
                (
                    f"blocks.{layer}.hook_mlp_out",
                    lambda x, hook, layer=layer: mlp_out[layer][None] + add_m[:, layer],
                )
            )
        hooks.append(
            (
                "ln_final.hook_scale",
                lambda x, hook: cache["ln_final.hook_scale"].expand_as(x).clone(),
            )
        )
        hooks.append(("hook_embed", lambda x, hook: x + add_e))
        reads = {}
        for layer in range(L):
            name = f"blocks.{layer}.{hook_in}"
            hooks.append((name, lambda x, hook, name=name: reads.__setitem__(name, x.clone())))
        with torch.no_grad():
            lg = plain.run_with_hooks(tok_b.expand(B, -1), fwd_hooks=hooks)
        return lg, reads

    lg1, r1 = frozen_run(add_mlp, add_emb)
    lg0, r0 = frozen_run(torch.zeros(1, L, n_pos, D), torch.zeros(1, n_pos, D))
    ok0, msg0 = close(lg0[0], logits[0], rtol=1e-5)
    report(f"{tag} D frozen run reproduces clean logits", ok0, msg0)
    ref = torch.zeros(n_feat + n_logit, n_src)
    for i, (layer, p, _) in enumerate(feats.tolist()):
        name = f"blocks.{layer}.{hook_in}"
        ref[i] = (r1[name][:, p] - r0[name][0, p]) @ enc[i]
    dl = lg1[:, -1] - lg0[0, -1]
    dl = dl - dl.mean(-1, keepdim=True)
    ref[n_feat:] = dl[:, logit_ids].T
    got = torch.cat([A[:n_feat, :n_src], A[-n_logit:, :n_src]])
    for name, cols in (
        ("feature", slice(0, n_feat)),
        ("error", slice(err_off, tok_off)),
        ("token", slice(tok_off, n_src)),
    ):
        ok, msg = close(got[:, cols], ref[:, cols])
        report(f"{tag} D {name} columns == frozen finite differences", ok, msg)
    ok, msg = close(got, ref)
    report(f"{tag} D whole matrix (feature+logit rows) == frozen finite differences", ok, msg)
    empty = A[n_feat : tok_off + n_pos].abs().max().item()
    report(f"{tag} error/token rows are empty", empty == 0.0, f"max|row|={empty}")

    # completeness of the logit rows: the graph's nodes plus what no node holds (positional
    # embeddings, biases, b_dec, the BOS-position MLP outputs) give the demeaned logit.
    # const = demeaned logit of the frozen run with every node's contribution subtracted.
    c_run, _ = frozen_run(-add_mlp[:tok_off].sum(0, keepdim=True), -add_emb.sum(0, keepdim=True))
    const = c_run[0, -1] - c_run[0, -1].mean()
    full = logits[0, -1] - logits[0, -1].mean()
    ok, msg = close(A[-n_logit:].sum(1) + const[logit_ids], full[logit_ids])
    report(f"{tag} logit rows: sum(edges) + non-node constant == demeaned logit", ok, msg)


def main() -> int:
    t0 = time.time()
    tokenizer = make_tokenizer()
    print(
        f"torch {torch.__version__}; tokenizer vocab {len(tokenizer)}, bos id "
        f"{tokenizer.bos_token_id}; work dir {WORK}"
    )
    run_case("jumprelu", "hook_resid_mid", tokenizer)
    run_case("relu", "ln2.hook_normalized", tokenizer)
    n_fail = sum(not ok for _, ok in RESULTS)
    print(f"\n{len(RESULTS) - n_fail}/{len(RESULTS)} checks passed in {time.time() - t0:.1f}s")
    print("OVERALL:", "PASS" if n_fail == 0 else "FAIL")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
