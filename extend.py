"""Add models to a trained P2L without retraining its backbone (`train.py --extend`): the backbone
and every existing head row stay frozen; each new model gets a head row fitted on the battles of
NEW that involve it, from prompt features computed once (one forward per distinct prompt, no backward).

    python train.py --extend out/train --train new_votes.jsonl --out out/train+new     # CPU: seconds to minutes

A head row is linear in the frozen features of a prompt: with g(x) = exp(s·x + s0) (1 without
--head-scale) and z(x) the correction's input (V·x with --head-rank r, x for the full linear head,
none with rank 0), model m's coefficient is β_m(x) = g(x)·b_m + u_m·z(x). So fitting a new row
θ = (b, u) with every other model's β(x) (and the η head) fixed is a small problem in float64:
convex for bt / bt-tie / rk (the NLL is convex in β, β is linear in θ); grk's tie term is not
convex, and L-BFGS from the prior mean finds a stationary point.

The prior (empirical Bayes, row_prior): a new row is drawn from the population of the old rows. Its
level b ~ N(mean, variance of the old b_m), and its correction u = A + B·b + δ, where A + B·b is the
old rows' linear trend in their level and δ ~ N(0, their residual variance / strength); each variance
is at least PRIOR_SD logits of effect on a typical prompt. The strength (1 = the old rows' spread)
is chosen from STRENGTHS by 5-fold cross-validation over the new model's own battles, by prompt, with
the one-standard-error rule (choose_strength; new models added together share one strength); its strongest end, inf, is the level alone: one
parameter per model, like the marginal-only placement, but on the per-prompt scale g(x) and with the
trend's correction at that level. Why: the first version fitted all 1 + r coordinates under a prior
centred on the trend in the new model's MARGINAL rating, fitted (nearly unregularised) on the same
battles, so the level carried the full noise of k battles twice; at k = 10 it lost to a constant
rating. On the training battles of the 8 held-out AlpacaEval models (fit on k prompts, scored on their
other training prompts; docs/results.md "Add a model"), the population prior on the level is what
wins at small k, and the strength matters at large k (the weakest, 0.25, was best from k = 40 on).
The new models' marginal ratings (marginal.json) are fitted with the old ratings fixed (ridge 1e-4,
as fit_marginal). The result is a complete checkpoint: every stage reads it as it reads CK.
"""
import gzip
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from train import save_checkpoint
from common import (
    AUTHORS_RK, authors_rk_eta, autodetect_device, batch_nll, cat_pairs, checkpoint_config, encode_for, file_ref,
    group_by_prompt, load_checkpoint, OutputSet, P2LModel, pair_nll, predict, read_battles, read_jsonl,
    read_marginal, torch_threads, write_json,
)

FEW_BATTLES = 20  # fewer weighted battles than this: the row is mostly the prior, say so
PRIOR_SD = 0.1  # the least prior spread of a row coordinate, in logits of effect on a typical prompt
CV_FOLDS = 5  # folds (by prompt) of the cross-validation that picks the prior strength
STRENGTHS = (0.25, 1.0, 4.0, 16.0, 64.0, math.inf)  # multipliers on the correction's empirical-Bayes precision
MARGINAL_L2 = 1e-4  # the ridge fit_marginal uses for the marginal leaderboard, per unit of vote weight
# flags that mean something for an extension; any other training flag given with --extend is refused, not ignored
EXTEND_FLAGS = {"--extend", "--train", "--val", "--out", "--loss", "--batch-size", "--max-tokens", "--dtype"}


class _Pooled(nn.Module):
    """Stands in for the head, so that predict() returns the pooled features of each prompt."""
    def forward(self, x):
        return x.float(), None


# -----------------------------------------------------------------------------
# the math: frozen features -> the rows of the head, and a fit of the new rows


def pooled_features(model, tok, prompts, batch_size=16, max_tokens=0, bf16=False):
    """x [P, hidden] float64: the backbone's pooled state for each prompt (exactly what the head reads)."""
    head, model.head = model.head, _Pooled()
    device = autodetect_device()
    try:
        x, _ = predict(model.to(device), encode_for(model, tok, prompts), tok.pad_token_id, batch_size, device,
                       torch.bfloat16 if bf16 else None, max_tokens)
    finally:
        model.head = head
        model.to("cpu")
    return x.double()


@torch.no_grad()
def head_terms(model, x):
    """The head in float64 on features x: (beta [P, M] of the known models, eta [P] or None,
    feats [P, D], rows [M, D]) with beta = feats @ rows.T, feats = [g(x), z(x)], rows = [bias, weight]."""
    h, p2l = model.head, model.p2l
    g = torch.exp(x @ h.scale.weight.double().T + h.scale.bias.double()) if h.scale is not None else torch.ones(len(x), 1, dtype=x.dtype)
    rank = p2l.get("head_rank")
    if rank == 0:  # the scale alone: the correction's weight is frozen at zero
        z = x[:, :0]
    else:
        z = x @ h.down.weight.double().T if h.down is not None else x
    feats = torch.cat([g, z], 1)
    rows = torch.cat([h.head.bias.double()[:, None], h.head.weight.double()[:, :z.shape[1]]], 1)
    beta = feats @ rows.T
    ref, _ = h(x.float())  # the module itself: a head this decomposition does not describe must not be extended
    if not torch.allclose(beta.float(), ref, atol=1e-3, rtol=1e-4):
        raise ValueError(f"the head's rows do not reproduce its output (max diff {(beta.float() - ref).abs().max():.2e})")
    eta = None
    if h.eta_head is not None:
        eta = (x @ h.eta_head.weight.double().T + h.eta_head.bias.double()).squeeze(-1)
        if p2l.get("eta_transform") == AUTHORS_RK:
            eta = authors_rk_eta(eta)
    return beta, eta, feats, rows


class Problem(NamedTuple):
    """A fit of new rows: model cols[j]'s coefficient on prompt r is feats[r]·θ[j] (+ offset[r, j]);
    every other model's is base[r] (fixed), η is eta (fixed; None for bt); pairs index prompt rows."""
    base: torch.Tensor  # [P, M2]
    eta: Optional[torch.Tensor]  # [P] or None
    feats: torch.Tensor  # [P, D]
    pairs: dict
    cols: torch.Tensor  # [n]
    loss: str
    offset: Optional[torch.Tensor] = None  # [P, n]: a fixed part of the new models' coefficients


class Prior(NamedTuple):
    """A Gaussian prior on each new row θ[j]: mean mu[j] [D], diagonal precision prec [D] (0: flat)."""
    mu: torch.Tensor  # [n, D]
    prec: torch.Tensor  # [D]


def pair_losses(prob, theta, pairs):
    """w_v·nll_v of each pair with the new rows theta."""
    new = prob.feats @ theta.T if prob.offset is None else prob.feats @ theta.T + prob.offset
    beta, r = prob.base.index_copy(1, prob.cols, new), pairs["row"]
    nll = pair_nll(beta[r, pairs["a"]], beta[r, pairs["b"]], None if prob.eta is None else prob.eta[r], pairs["y"],
                   pairs["p"].to(beta.dtype), prob.loss)
    return nll * pairs["w"].to(beta.dtype)


def fit_rows(prob, prior, tol=1e-8, rounds=30):
    """θ [n, D] minimising (Σ_v w_v·nll_v + ½·Σ prec·(θ − mu)²) / Σ_v w_v (Problem, Prior). L-BFGS in
    float64 from mu, restarted until the largest gradient entry is <= tol·max(1, max(prec)/Σw): a stiff
    prior coordinate (an old-row spread near 0) carries rounding noise of that size. Returns (θ, info)."""
    W = prob.pairs["w"].sum().item()
    mu, prec = prior
    tol = tol * max(1.0, prec.max().item() / W if len(prec) else 1.0)
    theta = mu.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=tol, tolerance_change=1e-16,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = (pair_losses(prob, theta, prob.pairs).sum() + 0.5 * (prec * (theta - mu) ** 2).sum()) / W
        f.backward()
        return f

    for it in range(rounds):
        opt.step(closure)
        f = closure()
        gmax = theta.grad.abs().max().item() if theta.numel() else 0.0
        if gmax <= tol:
            break
    info = {"converged": bool(gmax <= tol), "grad_max": gmax, "tol": tol, "rounds": it + 1, "objective": f.item()}
    return theta.detach(), info


def row_prior(rows, feats):
    """The population of the old rows θ_m = (b_m, u_m), as a Gaussian in coordinates where it is
    diagonal: the level b ~ N(mean b_m, var b_m) and the correction u = A + B·b + δ (the old rows'
    linear trend in their level; intercept only under 8 known models) with δ ~ N(0, residual var).
    Each variance is at least PRIOR_SD logits of effect on a typical prompt (var >= PRIOR_SD² / mean
    feature²): a checkpoint whose rows all agree (untrained, or few models) must not pin the new row.
    Returns (A [D-1], B [D-1], level mean, level var, δ var [D-1])."""
    b, u = rows[:, 0], rows[:, 1:]
    X = torch.stack([torch.ones_like(b), b], 1) if len(b) >= 8 else torch.ones(len(b), 1, dtype=rows.dtype)
    coef = torch.linalg.lstsq(X, u).solution if u.shape[1] else torch.zeros(X.shape[1], 0, dtype=rows.dtype)
    A, B = coef[0], (coef[1] if X.shape[1] == 2 else torch.zeros_like(coef[0]))
    floor = PRIOR_SD ** 2 / (feats ** 2).mean(0).clamp_min(1e-12)
    var_u = ((u - X @ coef) ** 2).sum(0) / max(len(b) - X.shape[1], 1)
    var_b = b.var() if len(b) > 1 else torch.zeros((), dtype=rows.dtype)
    return A, B, b.mean(), torch.maximum(var_b, floor[0]), torch.maximum(var_u, floor[1:])


def reparam(prob, prior_terms, n, strength):
    """The row fit in the prior's diagonal coordinates θ' = (b, δ): β = (g + z·B)·b + z·δ + z·A.
    strength multiplies δ's precision; inf drops δ (the row is the level b plus the trend's correction
    at that level: one parameter per model, like a marginal rating). Returns (Problem, Prior)."""
    A, B, mb, vb, vu = prior_terms
    g, z = prob.feats[:, :1], prob.feats[:, 1:]
    feats = torch.cat([g + z @ B[:, None], z], 1)
    offset = (z @ A).unsqueeze(1).expand(-1, n)
    prec = torch.cat([1 / vb.reshape(1), strength / vu])
    mu = torch.cat([mb.reshape(1), torch.zeros_like(vu)]).expand(n, -1)
    if math.isinf(strength):
        feats, mu, prec = feats[:, :1], mu[:, :1], prec[:1]
    return prob._replace(feats=feats, offset=offset), Prior(mu.contiguous(), prec)


def to_rows(theta, prior_terms):
    """θ' = (b, δ) (δ absent: 0) back to the head's row (b, u = A + B·b + δ)."""
    A, B, _, _, vu = prior_terms
    b = theta[:, :1]
    delta = theta[:, 1:] if theta.shape[1] > 1 else torch.zeros(len(theta), len(vu), dtype=theta.dtype)
    return torch.cat([b, A + b * B + delta], 1)


def strength_label(s):
    """A strength for JSON files (no Infinity there): a number, or 'inf' (the level alone)."""
    return "inf" if s is not None and math.isinf(s) else s


def prompt_folds(pairs, k):
    """A fold id per pair: its prompt's, prompts dealt to k folds in a fixed random order (seed 0)."""
    rows = torch.unique(pairs["row"])
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(rows)))
    fold_of = torch.empty(len(rows), dtype=torch.long)
    fold_of[perm] = torch.arange(len(rows)) % k
    return fold_of[torch.searchsorted(rows, pairs["row"])]


def choose_strength(prob, prior_terms):
    """The prior strength of the correction, from STRENGTHS, by K-fold cross-validation over the new
    battles, folds by prompt (K = CV_FOLDS; fewer prompts: one per fold), with the one-standard-error
    rule: the STRONGEST prior whose CV NLL is within one standard error (paired over prompts) of the
    best one. With few or noisy battles the strengths' CV NLLs differ by less than their noise, and
    the rule keeps the row near the level alone (a marginal rating's one parameter) instead of
    picking the weakest prior by chance. Under 2 prompts (or a head without correction): inf.
    Returns (strength, {strength: CV NLL per unit of vote weight})."""
    n, P = len(prob.cols), len(torch.unique(prob.pairs["row"]))
    if P < 2 or len(prior_terms[-1]) == 0:
        return math.inf, {}
    K = min(CV_FOLDS, P)
    fold = prompt_folds(prob.pairs, K)
    rows = torch.unique(prob.pairs["row"])
    per = {s: torch.zeros(len(rows), dtype=torch.float64) for s in STRENGTHS}  # held-out NLL per prompt
    for f in range(K):
        tr = {k: v[fold != f] for k, v in prob.pairs.items()}
        te = {k: v[fold == f] for k, v in prob.pairs.items()}
        for s in STRENGTHS:
            p, pr = reparam(prob._replace(pairs=tr), prior_terms, n, s)
            theta, _ = fit_rows(p, pr, tol=1e-6)
            per[s].index_add_(0, torch.searchsorted(rows, te["row"]), pair_losses(p, theta, te))
    W = prob.pairs["w"].sum().item()
    cv = {s: v.sum().item() / W for s, v in per.items()}
    best = min(cv, key=cv.get)
    se = {s: (per[s] - per[best]).std().item() * math.sqrt(len(rows)) / W for s in STRENGTHS}
    return max(s for s in STRENGTHS if cv[s] - cv[best] <= se[s]), cv


def extend_head(model, x, pairs, new_models, marg_old, eta_marg, strength=None):
    """Fit the new models' marginal ratings and head rows from the features x [P, hidden] of the
    prompts of `pairs` (votes involving a new model, indexed into the merged, sorted model list).
    strength: the prior strength of the rows' correction (None: chosen by choose_strength).
    Returns a dict: models (the merged list), cols (the new models' columns), marginal [M2] (old
    ones as given), rows [M2, D], beta_old/eta/feats of the prompts, both fits' info, and the
    strength with its CV table."""
    loss, old = model.p2l["loss"], model.p2l["model_list"]
    models = sorted(old + new_models)
    pos = {m: i for i, m in enumerate(models)}
    cols = torch.tensor([pos[m] for m in new_models])
    old_cols = torch.tensor([pos[m] for m in old])
    beta_old, eta, feats, rows_old = head_terms(model, x)
    P, M2 = len(x), len(models)
    W = pairs["w"].sum().item()
    # 1) the marginal ratings, the old ones fixed: the same fit with constant features
    base = torch.zeros(P, M2, dtype=torch.float64)
    base[:, old_cols] = marg_old
    eta_m = None if eta is None else torch.full((P,), float(eta_marg), dtype=torch.float64)
    with torch_threads(1):  # tiny float64 fits: a second thread only waits for a core
        marg_new, info_m = fit_rows(Problem(base, eta_m, torch.ones(P, 1, dtype=torch.float64), pairs, cols, loss),
                                    Prior(torch.zeros(len(cols), 1, dtype=torch.float64), torch.tensor([2 * MARGINAL_L2 * W])))
    # 2) the head rows, every old row and the η head fixed, under the old rows' population prior
    base = torch.zeros(P, M2, dtype=torch.float64)
    base[:, old_cols] = beta_old
    prob, terms = Problem(base, eta, feats, pairs, cols, loss), row_prior(rows_old, feats)
    cv = {}
    with torch_threads(1):  # tiny float64 fits: a second thread only waits for a core
        if strength is None:
            strength, cv = choose_strength(prob, terms)
        theta, info_r = fit_rows(*reparam(prob, terms, len(cols), strength))
    marginal = torch.zeros(M2, dtype=torch.float64)
    marginal[old_cols], marginal[cols] = marg_old, marg_new[:, 0]
    rows = torch.zeros(M2, rows_old.shape[1], dtype=torch.float64)
    rows[old_cols], rows[cols] = rows_old, to_rows(theta, terms)
    return {"models": models, "cols": cols, "marginal": marginal, "rows": rows, "beta_old": beta_old, "eta": eta,
            "feats": feats, "info": {"marginal_fit": info_m, "row_fit": info_r},
            "strength": {"chosen": strength, "cv_nll": cv}}

# -----------------------------------------------------------------------------
# the command: checks, one forward per prompt, the fit, a complete checkpoint


def check_flags(args, argv, parser):
    """The flags given on the command line (not defaults): --train and --out are required, training flags refused."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for flag in sorted(given - EXTEND_FLAGS):
        parser.error(f"{flag} has no effect with --extend (the backbone and the old rows are frozen; nothing is trained)")
    for flag in ("--train", "--out"):
        if flag not in given:
            parser.error(f"--extend needs {flag} ({'the battles of the new models' if flag == '--train' else 'the new checkpoint dir'})")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if os.path.abspath(args.out) == os.path.abspath(args.extend):
        parser.error(f"--out {args.out}: write the extended checkpoint to a new directory, not over --extend")
    return given


def load_base(args, given):
    """(model, tok, marginal.json) of CK, or sys.exit with the reason."""
    try:
        p2l, _ = checkpoint_config(args.extend)
        if "--loss" in given and p2l.get("loss") and args.loss != p2l["loss"]:
            sys.exit(f"error: --loss {args.loss}: the checkpoint --extend {args.extend} was trained with --loss {p2l['loss']}; "
                     "its head can only be extended with the same outcome model (drop --loss)")
        model, tok = load_checkpoint(args.extend, args.loss if "--loss" in given else None)
        mj = read_marginal(args.extend)
    except (ValueError, OSError) as e:
        sys.exit(f"error: --extend {args.extend}: cannot load the checkpoint ({e})")
    if mj is None or mj.get("model_list") is None:
        sys.exit(f"error: --extend {args.extend}: no marginal.json (the authors' layout?): the new models cannot be "
                 "placed on its marginal leaderboard")
    if sorted(mj["model_list"]) != sorted(model.p2l["model_list"]) or mj.get("loss") != model.p2l["loss"]:
        sys.exit(f"error: --extend {args.extend}: marginal.json lists other models or another loss than config.json")
    return model, tok, mj


def new_votes(args, old, loss):
    """The battles of NEW that involve a new model, grouped by prompt over the merged model list, and the
    raw rows behind them (for the checkpoint's vote file). Refuses NEW without a new model, and a new
    model with no weighted battle against a known one (nothing places it on the scale); warns on few."""
    try:
        battles = read_battles(args.train)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    known = set(old)
    new_models = sorted({m for b in battles for m in (b["model_a"], b["model_b"])} - known)
    if not new_models:
        sys.exit(f"error: --train {args.train}: every model in it is already one of the {len(old)} models of "
                 f"--extend {args.extend}: no new model to add")
    used = [i for i, b in enumerate(battles) if b["model_a"] not in known or b["model_b"] not in known]
    models = sorted(old + new_models)
    prompts, groups, _ = group_by_prompt([battles[i] for i in used], {m: i for i, m in enumerate(models)}, loss)
    pairs = cat_pairs(groups)
    is_new = torch.tensor([m not in known for m in models])
    a_new, b_new = is_new[pairs["a"]], is_new[pairs["b"]]
    against = {m: 0.0 for m in new_models}  # weighted battles against a known model (plain bt: hard ties weigh 0)
    for side, other_known in ((pairs["a"], ~b_new), (pairs["b"], ~a_new)):
        counts = torch.bincount(side[other_known], pairs["w"][other_known], minlength=len(models))
        for m in new_models:
            against[m] += counts[models.index(m)].item()
    for m, n in against.items():
        if n == 0:
            sys.exit(f"error: --train {args.train}: new model {m!r} has no battle (with weight) against a model of "
                     f"--extend {args.extend}: nothing places it on the scale")
        if n < FEW_BATTLES:
            print(f"warning: new model {m!r} has only {n:g} battles against known models: its row is mostly the prior "
                  "(a typical model's correction)", file=sys.stderr)
    print(f"{args.train}: {len(battles)} battles, {len(used)} involve the {len(new_models)} new models "
          f"({', '.join(new_models[:5])}{', ...' if len(new_models) > 5 else ''}) on {len(prompts)} prompts; "
          f"{len(battles) - len(used)} between known models ignored (the old rows stay as they are)")
    return new_models, prompts, pairs, used, against


def extended_model(model, fit):
    """The P2L with the merged model list and the fitted rows (a module every stage loads the same way)."""
    p2l = dict(model.p2l, model_list=fit["models"])
    new = P2LModel(model.model, p2l)
    state = model.state_dict()
    D = fit["rows"].shape[1]
    state["head.head.bias"] = fit["rows"][:, 0].float()
    weight = torch.zeros(len(fit["models"]), model.head.head.weight.shape[1])
    weight[:, :D - 1] = fit["rows"][:, 1:].float()
    state["head.head.weight"] = weight
    new.load_state_dict(state)
    return new.eval()


def val_scores(args, model, tok, marginal, eta_marg, new_models):
    """NLL of the extended P2L and of its marginal on --val: all votes, and those involving a new model."""
    index = {m: i for i, m in enumerate(model.p2l["model_list"])}
    loss = model.p2l["loss"]
    try:
        prompts, groups, skipped = group_by_prompt(read_battles(args.val), index, loss)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if not groups:
        sys.exit(f"error: --val {args.val}: none of its votes is between two models of the extended checkpoint")
    pairs = cat_pairs(groups)
    device = autodetect_device()
    beta, eta = predict(model.to(device), encode_for(model, tok, prompts), tok.pad_token_id, args.batch_size, device)
    model.to("cpu")
    beta, eta = beta.double(), (eta.double() if eta is not None else None)
    mb, me = marginal.expand(len(prompts), -1), (None if eta is None else torch.full((len(prompts),), float(eta_marg)))
    cols = torch.tensor([index[m] for m in new_models])
    sub = {k: v[torch.isin(pairs["a"], cols) | torch.isin(pairs["b"], cols)] for k, v in pairs.items()}
    out = {"votes": len(pairs["a"]), "new_model_votes": len(sub["a"]), "skipped": skipped}
    for name, (b, e) in (("p2l", (beta, eta)), ("marginal", (mb, me))):
        for key, pp in (("nll", pairs), ("nll_new_models", sub)):
            s, w = batch_nll(b, e, pp, loss)
            out.setdefault(name, {})[key] = (s / w).item() if w > 0 else None
    return out


def write_votes(path, old_train, rows):
    """The votes behind the extended checkpoint as one .jsonl.gz: CK's training votes (their gzip bytes
    copied, or compressed), then the used battles of NEW as one more gzip member (a multi-member gzip
    reads as one stream); a blank line first, in case CK's file does not end with a newline."""
    with open(path, "wb") as f:
        if old_train is not None:
            with open(old_train, "rb") as src:
                if str(old_train).endswith(".gz"):
                    shutil.copyfileobj(src, f)
                else:
                    with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as g:
                        shutil.copyfileobj(src, g)
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as g:
            g.write(b"\n" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def main(args, argv, parser):
    t0 = time.time()
    given = check_flags(args, argv, parser)
    model, tok, mj = load_base(args, given)
    old, loss = model.p2l["model_list"], model.p2l["loss"]
    new_models, prompts, pairs, used, against = new_votes(args, old, loss)
    seconds = {"load": time.time() - t0}
    x = pooled_features(model, tok, prompts, args.batch_size, args.max_tokens, args.dtype == "bf16")
    seconds["features"] = time.time() - t0 - seconds["load"]
    marg_old = torch.tensor(mj["beta"], dtype=torch.float64)[[mj["model_list"].index(m) for m in old]]
    fit = extend_head(model, x, pairs, new_models, marg_old, mj["eta"])
    seconds["fit"] = time.time() - t0 - seconds["load"] - seconds["features"]
    for name, info in fit["info"].items():
        if not info["converged"]:
            sys.exit(f"error: the {name.replace('_', ' ')} of the new rows did not converge (largest gradient entry "
                     f"{info['grad_max']:.2e} after {info['rounds']} L-BFGS rounds); nothing written")
    ext = extended_model(model, fit)
    val = val_scores(args, ext, tok, fit["marginal"], mj["eta"], new_models) if "--val" in given else None
    marg = dict(zip(fit["models"], fit["marginal"].tolist()))
    for m in new_models:
        print(f"  {m}: {against[m]:g} battles vs known models, marginal β {marg[m]:+.3f}")
    record = {"base": os.path.abspath(args.extend), "new_models": new_models, "new_battles": file_ref(args.train, args.out),
              "battles_vs_known": against, "prompts": len(prompts), "fit": fit["info"],
              "prior_strength": strength_label(fit["strength"]["chosen"]),
              "cv_nll": {str(strength_label(s)): v for s, v in fit["strength"]["cv_nll"].items()},
              "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    write_checkpoint(args, argv, ext, tok, mj, fit, record, val, used)
    print(f"prior strength of the correction: {strength_label(fit['strength']['chosen'])} (5-fold CV by prompt, one-SE rule; "
          "inf = the level alone)")
    print(f"extended {args.extend} ({len(old)} models) by {len(new_models)} -> {args.out} in {time.time() - t0:.1f} s "
          f"(features of {len(prompts)} prompts {seconds['features']:.1f} s, fit {seconds['fit']:.2f} s)")
    if val:
        print(f"--val: NLL {val['p2l']['nll']:.4f} (marginal {val['marginal']['nll']:.4f}); on the {val['new_model_votes']} "
              f"votes of new models {val['p2l']['nll_new_models']:.4f} (marginal {val['marginal']['nll_new_models']:.4f})")
    return 0


def write_checkpoint(args, argv, ext, tok, mj, fit, record, val, used):
    """CK2 as one set (OutputSet; metrics.json last): weights, config, tokenizer, model list, marginal.json
    with the votes behind it (CK's training votes + the used battles of NEW), the arguments, CK's training log."""
    old_train = mj.get("train") if not mj.get("train_missing") else None
    if old_train is None:
        print(f"warning: CK's training votes are not found ({mj.get('train_missing')}): the extended checkpoint's "
              "vote file holds only the new battles", file=sys.stderr)
    record = dict(record, base_train=None if old_train is None else file_ref(old_train, args.out))
    with OutputSet(args.out) as o:
        keep = set(used)
        write_votes(o.stage / "votes.jsonl.gz", old_train, [r for i, (_, r) in enumerate(read_jsonl(args.train)) if i in keep])
        votes = dict(file_ref(o.stage / "votes.jsonl.gz", o.stage), abs=os.path.abspath(Path(args.out) / "votes.jsonl.gz"))
        marginal = {"model_list": fit["models"], "beta": fit["marginal"].tolist(), "eta": mj["eta"], "loss": mj["loss"],
                    "train": votes, "val_nll": val["marginal"]["nll"] if val else None, "extend": record}
        extra = {"marginal.json": json.dumps(marginal, indent=1, allow_nan=False) + "\n",
                 "training_args.json": json.dumps({"argv": ["train.py", *argv], "args": vars(args)}, indent=2) + "\n"}
        if (Path(args.extend) / "train_log.jsonl").exists():  # the backbone's training, unchanged
            extra["train_log.jsonl"] = (Path(args.extend) / "train_log.jsonl").read_text()
        save_checkpoint(o.stage, {k: v.float() if v.is_floating_point() else v for k, v in ext.state_dict().items()},
                        ext, tok, extra)
        write_json(o.stage / "metrics.json", {"extend": record, "p2l": {"nll": val["p2l"]["nll"] if val else None},
                                              "marginal": {"nll": val["marginal"]["nll"] if val else None}, "val": val,
                                              "models": len(fit["models"]), "loss": mj["loss"]})
        for stale in ("model.safetensors.index.json", "train_log.jsonl", "resume"):  # --out reused: no file of another run
            p = Path(args.out) / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        o.commit("metrics.json")
