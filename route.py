"""Route each prompt to a model under a cost budget (the paper's Algorithm 1, docs/design.md §2): P2L's
per-prompt coefficients β(z) say how likely each model is to win on z; the router picks a
distribution π over models with the best predicted win rate whose expected cost per query is at
most the budget.

    python route.py --checkpoint out/train --prompts data/alpaca_eval/val.jsonl.gz --budget 20 --out out/route   # CPU, MiniLM: ~30 s
    python route.py --preds out/route --prompts data/alpaca_eval/val.jsonl.gz --budget 20 --sweep --out out/route  # no forward passes

For each unique prompt of --prompts (any JSONL(.gz) with a `prompt`, battle files included), with
costs c (--costs, per query), budget C and an opponent distribution q (--opponents, default uniform):
  W_ab = σ(β_a − β_b);  s = Wq is each model's predicted win rate against an opponent drawn from q.
  optimal: π* = argmax π·s over the simplex with c·π ≤ C. Two constraints, so an optimum mixes at
           most two models: it lies on the upper concave hull of the points (c_i, s_i), mixing the
           two adjacent hull vertices whose costs straddle C, or it is the best point when C is
           slack. Solved exactly for all prompts at once as the best mix on the budget line of a
           model with c_i <= C and one with c_j > C (no LP solver; tests check it against HiGHS).
  simple:  the same program with s = β (the reference's simple-lp; β may be negative).
  strict:  the best single model whose cost is <= C.
  R = π·Wq is the router's predicted win rate against q, and its own BT coefficient θ* solves
  Σ_a q_a σ(θ − β_a) = R (increasing in θ; per prompt the root lies between the two mixed models'
  β: safeguarded Newton for all prompts at once; on the averaged leaderboard brentq in a bracket
  widened until it holds the root, which lies outside [min β̄, max β̄] when a router beats every model).
  Per prompt θ* is on that prompt's β scale; the run's `theta` in metrics.json is the same root
  on the averaged leaderboard β̄ (the BT fit to the mean pairwise matrix, docs/design.md §2, Σβ̄ = 0) with
  R = the mean win rate: the coefficient a model with the router's win rate would have there
  (with uniform q, a router that always picks model m gets exactly β̄_m).
For rk/grk checkpoints β is used as a BT coefficient, as in docs/design.md §2.

--sweep measures the cost–quality curve on the labelled votes of --prompts (held-out prompts):
every router at 40 budgets from the cheapest to the dearest model, every single model, and 200
random fixed mixtures of two models. REALISED win rate: from the votes on prompt z, r_z(m, o) is
the weighted mean outcome of m against o (the soft label p_a from m's side when the file has one,
else win 1, loss 0, tie and both-bad ½), and r_z(m, m) = ½ (a model tied with itself; AlpacaEval's
dropped self-comparison is exactly ½ on every prompt). The opponents of z are the models that took
part in EVERY vote of z: AlpacaEval's baseline gpt4_1106_preview; both sides of a prompt with one
Arena vote; none if z's votes share no model, and then z scores nobody. Routing z to m scores the
mean of r_z(m, o) over those opponents, and only if m has a vote against each of them (or is it);
otherwise m is not credited on z. So on AlpacaEval, routing z to m scores the judge's p_a of
(m vs gpt4_1106_preview) on z, and ½ for gpt4_1106_preview itself: every curve is a win rate
against the same per-prompt opponents. A router (or mixture) scores Σ_z Σ_m π_m(z)·r̄_z(m) over
the credited (z, m), divided by the credited mass; coverage = that mass / prompts. Its x-axis is
the expected cost per query over all prompts. π's expectation is scored, not one sampled choice.
The printed baselines, the best single model within the budget and the best fixed mixture of two
models at the budget's cost, are picked WITH the held-out labels (oracles, so the comparison
favours them); router − baseline intervals are 95% paired bootstraps over prompts.
No peeking: the same baselines picked as a user must, without the held-out labels, and scored on
them. --baseline-votes TRAIN picks them on the training votes; predictions whose rows carry a CV
"fold" (cv.py's out-of-fold ones; pass --prompts train.jsonl.gz val.jsonl.gz for all 805 prompts)
pick them, for each fold's prompts, on the other folds' votes among --prompts, and the folds are
pooled (each prompt scored under its own fold's pick). Variety of the optimal router's decisions
per budget: the distinct models it routes to, the entropy (bits) of its routed-model histogram
(π mass over prompts), the share of prompts whose decision (set of models mixed) is not the most
common one, and the share whose top affordable model by β(z) is not the averaged leaderboard's.

    python route.py --preds out/cv --prompts data/alpaca_eval/train.jsonl.gz data/alpaca_eval/val.jsonl.gz --sweep --out out/route-cv
"""
import argparse
import collections
import csv
import functools
import io
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import expit

from aggregate import all_pairs, fit_pairs, map_blocks, pair_sweep, phi_t, row_blocks, SPREAD_MAX, wide_rows
from evaluate import predict_prompts
from common import (
    A, add_checkpoint_options, atomic_write, autodetect_device, B, check_out, checkpoint_config, finite_or_none,
    load_checkpoint, load_predictions, OutputSet, parse_turns, prompt_key, rating, read_battles, read_json_object,
    read_jsonl, save_png, save_predictions, torch_threads, write_json,
)

ROUTERS = ("optimal", "simple", "strict")

# -----------------------------------------------------------------------------
# Algorithm 1 (docs/design.md §2): serve.py and livebench_eval.py import it from here. For one prompt
# with coefficients β, costs c, budget C and opponents q: s = Wq with W_ab = σ(β_a − β_b) is each
# model's predicted win rate against q, and π* = argmax π·s over the simplex with c·π <= C. The
# routing math is float64 numpy.


def read_prompts(path):
    """Unique prompts (lists of user turns) of a JSONL(.gz) file in first-seen order, with their
    first line's id and category (battle files and Arena files too)."""
    seen = {}
    for where, row in read_jsonl(path):
        turns = parse_turns(row, where)
        key = tuple(turns)  # the same identity as prompt_key's JSON text, without encoding every line
        if key not in seen:
            seen[key] = {"prompt": turns, "id": row.get("id", row.get("uid", where)),
                         "category": row.get("category"), "line": where}
    if not seen:
        raise ValueError(f"{path}: no prompts")
    return list(seen.values())


def win_rates(beta, q, mean_pairs=False):
    """(Wq)[z, a] = Σ_b q_b σ(β_a(z) − β_b(z)), float64 numpy [N, M]: each model's predicted win rate
    against an opponent drawn from q. Exact (φ form above): (Wq)_a = q_a/2 + φ_a Σ_{b≠a} q_b r_ab.
    mean_pairs: also mean_pair_probs(beta, None, "bt") [1, P, 2] (the averaged leaderboard's target)
    from the same r, for one more pass instead of a second sweep: both directions, φ_i·r_ij and φ_j·r_ij
    (1 − P would round the lower model's chance to 0 from a logit gap of ~37 on)."""
    beta, q = np.asarray(beta, dtype=np.float64), np.asarray(q, dtype=np.float64)
    N, M = beta.shape
    if N * M < 2 ** 12 and not mean_pairs:  # a few prompts (one decision): whole-array numpy calls
        x = beta - beta.max(1, keepdims=True)
        if N and x.min() >= -SPREAD_MAX:
            f = np.exp(x)
            r = f[:, :, None] + f[:, None, :]
            np.divide(1.0, r, out=r)
            return f * (r @ q)
    beta, qt = torch.as_tensor(beta), torch.as_tensor(q)
    out = torch.empty(N, M, dtype=torch.float64)
    off = [0] + torch.arange(M - 1, 0, -1).cumsum(0).tolist()  # pairs (i, j > i): [off[i], off[i + 1])

    def block(se):
        bs = beta[se[0]:se[1]]
        wide = wide_rows(bs)
        fT = phi_t(bs[~wide] if wide.any() else bs)  # wide rows: σ of the differences, below
        acc = torch.zeros_like(fT)
        pairs = torch.zeros(off[-1], 2, dtype=torch.float64) if mean_pairs else None

        def visit(i, r):
            acc[i] += qt[i + 1:] @ r                 # (a = i, b > i)
            acc[i + 1:].add_(r, alpha=float(qt[i]))  # (a > i, b = i)
            if mean_pairs:
                pairs[off[i]:off[i + 1], 0] += r @ fT[i]
                pairs[off[i]:off[i + 1], 1] += (r * fT[i + 1:]).sum(1)
        pair_sweep(fT, visit)
        if wide.any():
            out[se[0]:se[1]][~wide] = (fT * acc + 0.5 * qt[:, None]).T
        else:
            out[se[0]:se[1]] = (fT * acc + 0.5 * qt[:, None]).T
        if wide.any():
            bw = bs[wide]
            out[se[0]:se[1]][wide] = torch.sigmoid(bw[:, :, None] - bw[:, None, :]) @ qt
            if mean_pairs:
                a, b = all_pairs(M)
                d = bw[:, a] - bw[:, b]
                pairs += torch.stack([torch.sigmoid(d).sum(0), torch.sigmoid(-d).sum(0)], -1)
        return pairs
    total = 0
    for part in map_blocks(block, row_blocks(N, M)):  # summed in block order: deterministic
        total = total + (part if mean_pairs else 0)
    if not mean_pairs:
        return out.numpy()
    return out.numpy(), (total / N)[None]


def hull_route(s, c, budget, order):
    """Exact max π·s s.t. c·π <= budget, π in the simplex; budget below min(c) is a ValueError.
    order = argsort(c), shared by every prompt. Returns (i, j, w): π_i = w, π_j = 1 − w.
    The scalar reference for route_many (which does every prompt at once; tests compare them)."""
    s, c = s.tolist(), c.tolist()  # plain floats: the loop below is ~10x faster than on numpy scalars
    if not budget >= min(c):
        raise ValueError(f"budget {budget:g} is infeasible: the cheapest model costs {min(c):g}")
    top = max(s)
    best = min((k for k in range(len(s)) if s[k] == top), key=lambda k: c[k])  # the cheapest best model
    if c[best] <= budget:
        return best, best, 1.0
    # Upper concave hull, left to right, of the points no dearer than the best one (dearer points
    # are dominated). It rises from the cheapest point to the best one, so the optimum at cost C
    # is on the hull edge whose ends straddle C.
    hull = []
    for k in order:
        if c[k] > c[best]:
            break
        if hull and c[k] == c[hull[-1]]:  # same cost: keep the better one
            if s[k] <= s[hull[-1]]:
                continue
            hull.pop()
        while len(hull) >= 2:  # drop the last vertex while it is on or below the chord to k
            a, b = hull[-2], hull[-1]
            if (s[b] - s[a]) * (c[k] - c[a]) > (s[k] - s[a]) * (c[b] - c[a]):
                break
            hull.pop()
        hull.append(k)
    n = 0
    while c[hull[n + 1]] <= budget:
        n += 1
    i, j = hull[n], hull[n + 1]
    return i, j, (c[j] - budget) / (c[j] - c[i])


@functools.lru_cache(maxsize=16)
def _route_plan(c_bytes, budget):
    """What route_many needs of the costs and budget alone (a server routes many prompts with the
    same ones): the models by cost then index, the affordable ones A, the others B, and the
    weights w_ij = (c_j − C)/(c_j − c_i) of every mix on the budget line."""
    c = np.frombuffer(c_bytes)
    if not budget >= c.min():
        raise ValueError(f"budget {budget:g} is infeasible: the cheapest model costs {c.min():g}")
    order = np.lexsort((np.arange(len(c)), c))  # by cost, then by index: argmax's first hit is the cheapest best
    A, B = order[c[order] <= budget], order[c[order] > budget]
    w = (c[B][None, :] - budget) / (c[B][None, :] - c[A][:, None])  # [|A|, |B|]
    plan = order, A, B, w, 1 - w
    for x in plan:  # shared by later calls: read-only
        x.flags.writeable = False
    return plan


def route_many(S, c, budget, elems=2 ** 21):
    """hull_route for every row of S [N, M] at once: (I, J, W) arrays, π = W on model I, 1 − W on J.
    When the best model (the cheapest of equal best) is affordable it is the answer. Otherwise the
    optimum costs exactly C and mixes a model i with c_i <= C and a model j with c_j > C, so it is
    max over those pairs of w_ij s_i + (1 − w_ij) s_j, w_ij = (c_j − C)/(c_j − c_i): the weights are
    shared by all prompts, so that max is three array passes over [prompts, |A|, |B|]."""
    S, c = np.asarray(S, dtype=np.float64), np.asarray(c, dtype=np.float64)
    N = len(S)
    order, A, B, w, w1 = _route_plan(c.tobytes(), float(budget))
    if N == 1:  # one decision: only the Pareto points can be on the hull, usually a handful
        return _route_one(S[0], c, budget, order, A, B, w, w1)
    best = np.concatenate([order[S[s:e][:, order].argmax(1)] for s, e in row_blocks(N, len(c), 2 ** 20)] or [np.zeros(0, int)])
    I, J, W = best, best.copy(), np.ones(N)
    rest = np.flatnonzero(c[best] > budget)
    if len(rest) == 0:
        return I, J, W

    def block(se):
        rows = rest[se[0]:se[1]]
        v = S[rows][:, A, None] * w
        v += S[rows][:, None, B] * w1
        return np.divmod(v.reshape(len(rows), -1).argmax(1), len(B))
    blocks = row_blocks(len(rest), w.size, elems)
    for (s, e), (ia, jb) in zip(blocks, map_blocks(block, blocks)):
        I[rest[s:e]], J[rest[s:e]], W[rest[s:e]] = A[ia], B[jb], w[ia, jb]
    return I, J, W


def _route_one(s, c, budget, order, A, B, w, w1):
    """route_many for one prompt. A hull vertex scores strictly more than every cheaper model (the
    hull rises up to the best model), so the pairs may be restricted to those: in A, the models
    better than every cheaper one; in B, those better than every cheaper one and all of A."""
    best = order[s[order].argmax()]
    if c[best] <= budget:
        return np.array([best]), np.array([best]), np.ones(1)
    sa, sb = s[A], s[B]
    ia = np.flatnonzero(sa > np.maximum.accumulate(np.concatenate(([-np.inf], sa[:-1]))))
    jb = np.flatnonzero(sb > np.maximum.accumulate(np.concatenate(([sa.max()], sb[:-1]))))
    wp = w[np.ix_(ia, jb)]
    v = sa[ia, None] * wp + sb[None, jb] * w1[np.ix_(ia, jb)]
    a, b = divmod(int(v.argmax()), len(jb))
    return np.array([A[ia[a]]]), np.array([B[jb[b]]]), np.array([wp[a, b]])


def route_all(router, beta, Wq, c, budget):
    """(i, j, w) arrays for every prompt: π = w on model i, 1 − w on model j.
    optimal: max π·Wq (the paper's); simple: max π·β (the reference's simple-lp); strict: the best
    single model whose cost is <= budget."""
    c = np.asarray(c, dtype=np.float64)
    if router == "strict":  # the best affordable model (the cheapest of equal best); Wq ranks models as β does
        I, _, _ = route_many(np.where(c <= budget, Wq, -np.inf), c, math.inf)
        return I, I.copy(), np.ones(len(I))
    return route_many(Wq if router == "optimal" else beta, c, budget)


def route_one(router, beta, q, c, budget):
    """One prompt's decision from its β [M] alone: (i, j, w, R), π = w on model i, 1 − w on model j,
    R = π·Wq its win rate against q. The optimum of route_all on win_rates (tests compare them) for
    a fraction of the work: (Wq)_a increases with β_a (σ does), so β ranks the models as Wq does,
    and only a model better than every cheaper one (the front in cost order: about ln M of M on
    random instances) can be the answer or a hull vertex. Wq is computed for those rows alone."""
    beta, q, c = (np.asarray(x, dtype=np.float64) for x in (beta, q, c))
    order, A, _, _, _ = _route_plan(c.tobytes(), float(budget))  # also the infeasible-budget error
    b = beta[order]
    if router == "strict":  # the best affordable model; A is a prefix of order, argmax takes the cheapest
        b = b[:len(A)]
    front = order[:len(b)][b > np.maximum.accumulate(np.concatenate(([-np.inf], b[:-1])))]
    x = beta - beta.max()
    if x.min() >= -SPREAD_MAX:  # the φ form of win_rates, for the front's rows only
        f = np.exp(x)
        s = f[front] * ((1.0 / (f[front, None] + f[None, :])) @ q)
    else:
        s = expit(beta[front, None] - beta[None, :]) @ q
    if c[front[-1]] <= budget:  # the front ends at the best model (the cheapest of equal best)
        return int(front[-1]), int(front[-1]), 1.0, float(s[-1])
    # Otherwise the optimum mixes a front model i with c_i <= C and one j with c_j > C on the budget line.
    a = c[front] <= budget
    ci, cj = c[front[a]][:, None], c[front[~a]][None, :]
    w = (cj - budget) / (cj - ci)
    v = (beta[front[a]][:, None] * w + beta[front[~a]][None, :] * (1 - w)) if router == "simple" else \
        (s[a][:, None] * w + s[~a][None, :] * (1 - w))
    k, m = divmod(int(v.argmax()), w.shape[1])
    wk = float(w[k, m])
    return int(front[a][k]), int(front[~a][m]), wk, float(wk * s[a][k] + (1 - wk) * s[~a][m])


def solve_theta(beta, q, R):
    """θ with Σ_a q_a σ(θ − β_a) = R; the left side increases in θ. On one prompt R mixes win rates
    of models with those β, so the root lies in [min β, max β]; on the averaged leaderboard a
    router can beat every model, so the bracket widens (doubling) until it holds the root."""
    f = lambda t: float(q @ expit(t - beta)) - R
    lo, hi = float(beta.min()), float(beta.max())
    for _ in range(60):
        if f(lo) <= 0 <= f(hi):
            break
        width = max(hi - lo, 1.0)
        lo, hi = (lo - width, hi) if f(lo) > 0 else (lo, hi + width)
    if f(lo) == 0 or f(hi) == 0 or f(lo) * f(hi) > 0:  # an exact hit, or R rounds to 0 or 1 (σ saturates)
        return lo if abs(f(lo)) <= abs(f(hi)) else hi
    return brentq(f, lo, hi, xtol=1e-13, rtol=4 * np.finfo(float).eps, maxiter=200)


def solve_theta_many(beta, q, R, lo, hi, tol=1e-13, max_iter=200):
    """solve_theta for every prompt at once, given brackets with g(lo) <= R <= g(hi), g(θ) = Σ q σ(θ − β)
    (route.py: the β of the two mixed models). Newton's method, safeguarded by bisection of the
    bracket, which shrinks every step, until the step or the bracket is below tol (brentq's xtol)."""
    beta, q, R = np.asarray(beta, dtype=np.float64), np.asarray(q, dtype=np.float64), np.asarray(R, dtype=np.float64)
    lo, hi = np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)
    theta = 0.5 * (lo + hi)

    def block(se):
        act = se[0] + np.flatnonzero(hi[se[0]:se[1]] - lo[se[0]:se[1]] > tol)
        for _ in range(max_iter):
            if len(act) == 0:
                break
            t = theta[act]
            sg = expit(t[:, None] - beta[act])
            f = sg @ q - R[act]
            d = (sg * (1 - sg)) @ q
            lo[act] = np.where(f < 0, t, lo[act])
            hi[act] = np.where(f > 0, t, hi[act])
            with np.errstate(divide="ignore", invalid="ignore"):
                new = t - f / d
            bisect = ~((new > lo[act]) & (new < hi[act]))  # Newton left the bracket (or d underflowed)
            new[bisect] = 0.5 * (lo[act] + hi[act])[bisect]
            new[f == 0] = t[f == 0]
            done = (f == 0) | (np.abs(new - t) <= tol) | (hi[act] - lo[act] <= tol)
            theta[act] = new
            act = act[~done]
    for _ in map_blocks(block, row_blocks(len(R), beta.shape[1])):
        pass
    return theta


# -----------------------------------------------------------------------------
# inputs: costs, opponents (prompts: read_prompts); every bad value is an error naming the file (and line)


def read_model_numbers(path, what):
    """{model: number >= 0} (cost files, opponent weights); keys starting with '_' document where
    the numbers come from and are skipped."""
    vals = {k: v for k, v in read_json_object(path, what).items() if not k.startswith("_")}
    for k, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{path}: {what} of {k!r} must be a finite number >= 0, got {v!r}")
    return {k: float(v) for k, v in vals.items()}


def read_model_weights(path, model_list, what):
    """The file's numbers in model_list order, NaN where missing, and the names it has beyond model_list."""
    vals = read_model_numbers(path, what)
    return np.array([vals.get(m, math.nan) for m in model_list]), set(vals) - set(model_list)


def read_costs(path, model_list):
    c, unknown = read_model_weights(path, model_list, "cost")
    if unknown:  # a typo in a name would otherwise pass silently (that model then has no cost: an error below)
        print(f"note: {path}: costs for {len(unknown)} models the predictions do not know, ignored: "
              f"{', '.join(sorted(unknown)[:10])}", file=sys.stderr)
    missing = [m for m, x in zip(model_list, c) if math.isnan(x)]
    if missing:
        raise ValueError(f"{path}: no cost for {len(missing)} of the {len(model_list)} models: {', '.join(missing)}")
    return c


def read_opponents(path, model_list):
    """q over model_list: uniform by default, else the file's weights normalised (absent models 0)."""
    if path is None:
        return np.full(len(model_list), 1.0 / len(model_list))
    q, unknown = read_model_weights(path, model_list, "opponent weight")
    if unknown:
        raise ValueError(f"{path}: opponents the predictions do not cover: {', '.join(sorted(unknown))}")
    q = np.nan_to_num(q, nan=0.0)
    if q.sum() <= 0:
        raise ValueError(f"{path}: opponent weights sum to 0")
    return q / q.sum()


# -----------------------------------------------------------------------------
# --sweep: realised win rates on labelled votes (what is measured: module docstring)


def realised_scores(battles, row_of, index):
    """r[z, m]: the realised score of routing prompt z to model m; NaN where m is not credited on z.
    Returns (r, number of votes skipped because a model is unknown or the weight is 0)."""
    r = np.full((len(row_of), len(index)), np.nan)
    votes, skipped = {}, 0
    for bt in battles:
        a, b = index.get(bt["model_a"]), index.get(bt["model_b"])
        z = row_of.get(prompt_key(bt["prompt"]))
        if a is None or b is None or z is None or bt["weight"] == 0:
            skipped += 1
            continue
        y = bt["p_a"] if bt["p_a"] is not None else {A: 1.0, B: 0.0}.get(bt["outcome"], 0.5)
        votes.setdefault(z, []).append((a, b, y, bt["weight"]))
    for z, vs in votes.items():
        opponents = set.intersection(*({a, b} for a, b, _, _ in vs))
        res = {}  # (m, o) -> [Σ w·outcome of m, Σ w]
        for a, b, y, w in vs:
            for m, o, v in ((a, b, y), (b, a, 1.0 - y)):
                acc = res.setdefault((m, o), [0.0, 0.0])
                acc[0] += w * v
                acc[1] += w
        for m in {m for m, _ in res}:
            vals = [0.5 if m == o else res[m, o][0] / res[m, o][1] if (m, o) in res else None for o in opponents]
            if opponents and None not in vals:
                r[z, m] = sum(vals) / len(vals)
    return r, skipped


def per_prompt(r, pi):
    """Each prompt's credited score and credited mass under distributions pi [N, M] (or one [M] for all)."""
    pi = np.broadcast_to(pi, r.shape)
    return (pi * np.nan_to_num(r)).sum(1), (pi * ~np.isnan(r)).sum(1)


def score_policy(r, pi):
    """Realised win rate (credited score / credited mass) and coverage (credited mass / prompts)."""
    num, den = per_prompt(r, pi)
    return (float(num.sum() / den.sum()) if den.sum() > 0 else math.nan), float(den.sum() / len(r))


def paired_ci(x, y, rng, n=2000):
    """95% paired bootstrap interval over prompts of score(x) − score(y), x and y = per_prompt(...)."""
    idx = rng.integers(0, len(x[0]), (n, len(x[0])))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = x[0][idx].sum(1) / x[1][idx].sum(1) - y[0][idx].sum(1) / y[1][idx].sum(1)
    return np.nanpercentile(d, [2.5, 97.5]).round(4).tolist()


def dense(I, J, Wt, M):
    pi = np.zeros((len(I), M))
    np.add.at(pi, (np.arange(len(I)), I), Wt)
    np.add.at(pi, (np.arange(len(I)), J), 1 - Wt)
    return pi

# -----------------------------------------------------------------------------
# inputs of a run: prompts (several files as one set), predictions matched by prompt text


def read_prompt_files(paths):
    """read_prompts over several files as one set: each unique prompt once, first-seen order."""
    seen = {}
    for path in paths:
        for p in read_prompts(path):
            seen.setdefault(tuple(p["prompt"]), p)
    return list(seen.values())


def match_preds(args, prompts, rows):
    """The row of --preds for each prompt, matched by text; a prompt it lacks is an error."""
    where = {}
    for i, r in enumerate(rows):  # tuples of turns: hashed once, no JSON per row
        try:
            where[tuple(r["prompt"]) if isinstance(r["prompt"], list) else (r["prompt"],)] = i
        except (KeyError, TypeError):
            raise ValueError(f"{Path(args.preds) / 'predictions.jsonl'}:{i + 1}: 'prompt' must be a string or a list of strings") from None
    idx = [where.get(tuple(p["prompt"]), -1) for p in prompts]
    missing = [p for p, i in zip(prompts, idx) if i < 0]
    if missing:
        raise ValueError(f"{missing[0]['line']}: prompt not in --preds {args.preds} ({len(missing)} of {len(prompts)} missing)")
    return idx


def load_betas(args, prompts, preds):
    """β [N, M] float64 for the prompts: the rows of --preds matched by prompt text, or the
    --checkpoint run on them (then also (beta, eta) as predicted, to save for reuse)."""
    if preds is not None:
        return preds[0][match_preds(args, prompts, preds[3])].double().numpy(), None
    model, tok = load_checkpoint(args.checkpoint, args.loss, max_len=args.max_len)
    # under torchrun each rank runs every N-th prompt and rank 0 merges (predict_prompts); the others stop here
    res = predict_prompts(model, tok, [p["prompt"] for p in prompts], args.out, 16, autodetect_device())
    if res is None:
        sys.exit(0)
    return res[0].double().numpy(), res


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="P2L checkpoint dir: runs the model on the prompts (and saves the predictions "
                     "into --out, so a rerun can pass --preds OUT and skip the forward passes)")
    src.add_argument("--preds", metavar="DIR", help="predictions.safetensors/.jsonl from evaluate.py or an earlier route.py "
                     "run; the prompts are matched by text")
    p.add_argument("--prompts", nargs="+", metavar="FILE", help="JSONL(.gz) with a `prompt` per line (battle files too); "
                   "one route per unique prompt. Several files are read as one set (a CV's out-of-fold predictions "
                   "cover train + val: all their prompts are held out by some fold)")
    p.add_argument("--costs", default="data/costs/alpaca_eval.json", help="JSON {model: cost per query}; keys starting "
                   "with '_' say where the numbers come from. Default: the bundled proxy for the 57 AlpacaEval models")
    p.add_argument("--budget", type=float, help="expected cost per query, in the units of --costs (inf: unconstrained)")
    p.add_argument("--router", default="optimal", choices=ROUTERS, help="optimal: max predicted win rate vs q (the "
                   "paper's); simple: max Σπβ (the reference's simple-lp); strict: best single model within budget")
    p.add_argument("--opponents", metavar="JSON", help="{model: weight} opponent distribution q for the win rate the "
                   "router maximises (default: uniform over the models)")
    p.add_argument("--deterministic", action="store_true", help="route each prompt to argmax π instead of sampling from π")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling from π: reruns agree")
    p.add_argument("--sweep", action="store_true", help="cost-quality curves of all routers, every single model and random "
                   "mixtures on the labelled votes of --prompts: sweep.csv, sweep.png, sweep.json")
    p.add_argument("--sweep-budgets", metavar="C,C,...", help="budgets for the printed router vs best-single-model "
                   "comparison (default: 3 between the cheapest model and what unconstrained routing spends, where it binds)")
    p.add_argument("--baseline-votes", metavar="FILE", help="--sweep: also pick the best single model and best fixed "
                   "mixture on these votes (the training split) instead of the held-out labels, as a user must; "
                   "predictions whose rows carry a CV 'fold' do that without it, on the other folds' votes")
    p.add_argument("--out", default="out/route", help="routes.jsonl, metrics.json (and predictions, sweep files) go here")
    add_checkpoint_options(p)
    args = p.parse_args(argv)
    if not (args.checkpoint or args.preds):
        p.error("one of --checkpoint or --preds is required")
    if not args.prompts:
        p.error("--prompts is required")
    if args.baseline_votes and not args.sweep:
        p.error("--baseline-votes picks the --sweep baselines: pass --sweep too")
    # the files to read; args.prompts names them in the outputs (one file: its path, as before)
    args.prompt_files, args.prompts = args.prompts, " ".join(args.prompts)
    if args.budget is None and not args.sweep:
        p.error("--budget is required (or --sweep)")
    if args.budget is not None and math.isnan(args.budget):
        p.error("--budget is NaN")
    return p, args


def read_inputs(args):
    """Everything that can fail on bad input fails here, before any output is written."""
    prompts = read_prompt_files(args.prompt_files)
    try:
        battles = [bt for f in args.prompt_files for bt in read_battles(f)] if args.sweep else None
    except ValueError as e:
        raise ValueError(f"--sweep needs labelled votes (a battle file): {e}") from None
    check_out(args.out)
    preds = load_predictions(args.preds) if args.preds else None  # (beta, eta, model_list, rows)
    if preds is not None and not torch.isfinite(preds[0]).all():
        bad = int(torch.nonzero(~torch.isfinite(preds[0]).all(1))[0])
        raise ValueError(f"--preds {args.preds}/predictions.safetensors: non-finite coefficients for prompt {bad + 1} "
                         f"({preds[3][bad].get('prompt')!r:.60})")
    model_list = preds[2] if preds else checkpoint_models(args.checkpoint)
    c = read_costs(args.costs, model_list)
    q = read_opponents(args.opponents, model_list)
    try:
        budgets = [float(x) for x in args.sweep_budgets.split(",")] if args.sweep_budgets else None
    except ValueError:
        raise ValueError(f"--sweep-budgets must be numbers separated by commas, got {args.sweep_budgets!r}") from None
    if any(math.isnan(b) for b in budgets or []):
        raise ValueError("--sweep-budgets has a NaN")
    cheap = int(np.argmin(c))
    for b in ([args.budget] if args.budget is not None else []) + (budgets or []):
        if b < c[cheap]:
            raise ValueError(f"budget {b:g} is infeasible: the cheapest model, {model_list[cheap]}, costs "
                             f"{c[cheap]:g} per query ({args.costs})")
    r = skipped = None
    if args.sweep:  # r: the sweep's Votes (held-out scores and where the no-peek baselines are picked)
        r, skipped = sweep_votes(args, prompts, battles, preds, model_list)
    beta, raw = load_betas(args, prompts, preds)  # the checkpoint runs only once the inputs are known good
    return prompts, model_list, c, q, budgets, r, skipped, beta, raw


def main(argv=None):
    p, args = parse_args(argv)
    try:
        prompts, model_list, c, q, budgets, r, skipped, beta, raw = read_inputs(args)
    except (ValueError, OSError) as e:  # OSError: missing files, a broken .gz
        sys.exit(f"error: {e}")
    try:
        with OutputSet(args.out) as o:  # --out is locked from here; the files are staged and renamed in as one set at the end
            if raw is not None:
                rows = [{"prompt": p_["prompt"], "id": p_["id"], "category": p_["category"]} for p_ in prompts]
                save_predictions(o.stage, raw[0], raw[1], model_list, rows, loss=args.loss or checkpoint_loss(args.checkpoint),
                                 checkpoint=args.checkpoint)
            Wq, target = win_rates(beta, q, mean_pairs=True)  # one sweep over the pairs serves both
            bbar = averaged_leaderboard(beta, target)
            q_name = args.opponents or f"uniform over {beta.shape[1]} models"
            if args.budget is not None:
                route_at_budget(args, o.stage, prompts, RouteRun(model_list, beta, Wq, bbar, c, q, q_name))
            if args.sweep:
                if budgets is None:  # where the budget binds: between the cheapest model and what unconstrained routing spends
                    free = c[Wq.argmax(1)].mean()
                    budgets = np.maximum(spaced(c.min(), free, 5)[1:4].round(2), c.min()).tolist()
                sweep(args, o.stage, SweepRun(r, skipped, beta, Wq, bbar, c, model_list, budgets, q_name))
            o.commit(marker="metrics.json" if args.budget is not None else "sweep.json")
    except ValueError as e:  # --out held by another run
        sys.exit(f"error: {e}")


def spaced(lo, hi, n):
    """n budgets from lo to hi: geometric (costs span orders of magnitude), linear when lo is a free model."""
    return np.geomspace(lo, hi, n) if lo > 0 else np.linspace(lo, hi, n)


def checkpoint_models(path):
    """The model list of a checkpoint, from its JSON files (before any weights are loaded)."""
    return checkpoint_config(path)[0]["model_list"]


def checkpoint_loss(path):
    """The loss a checkpoint's head was trained with, recorded beside its predictions (None: not recorded)."""
    return checkpoint_config(path)[0].get("loss")


def averaged_leaderboard(beta, target):
    """β̄: the BT fit to the mean pairwise matrix (what aggregate(beta, None, "bt") returns, docs/design.md §2),
    from the target win_rates computed alongside Wq."""
    M = beta.shape[1]
    with torch_threads(1):  # see torch_threads
        bb, _, info = fit_pairs(*all_pairs(M), target, M, "bt", init=torch.from_numpy(beta.mean(0)))
    if not info["converged"]:
        raise RuntimeError(f"averaged leaderboard did not converge: gradient norm {info['grad_norm'].max().item():.2e}")
    return bb[0].numpy()


class RouteRun(NamedTuple):
    """What route_at_budget routes: the predictions, the costs and the opponents the win rates are against."""
    model_list: list
    beta: np.ndarray  # [N, M] per-prompt coefficients
    Wq: np.ndarray    # [N, M] predicted win rates vs q
    bbar: np.ndarray  # [M] the averaged leaderboard
    c: np.ndarray     # [M] costs per query
    q: np.ndarray     # [M] the opponent distribution
    q_name: str


def route_at_budget(args, stage, prompts, run):
    """Route every prompt at --budget (run: a RouteRun): routes.jsonl, metrics.json (into the staging dir)
    and a printed table."""
    model_list, beta, Wq, bbar, c, q, q_name = run
    out, (N, M) = Path(args.out), beta.shape
    I, J, Wt = route_all(args.router, beta, Wq, c, args.budget)
    u = np.random.default_rng(args.seed).random(N)
    pick_i = Wt >= 0.5 if args.deterministic else u < Wt
    chosen = np.where(pick_i, I, J)
    cost = Wt * c[I] + (1 - Wt) * c[J]
    z = np.arange(N)
    R = Wt * Wq[z, I] + (1 - Wt) * Wq[z, J]
    # one model: θ* is its own β exactly; a mixture: the root, which lies between the two models' β
    bi, bj = beta[z, I], beta[z, J]
    theta = np.where(Wt == 1, bi, solve_theta_many(beta, q, R, np.minimum(bi, bj), np.maximum(bi, bj)))
    win = float(R.mean())
    theta_bar = solve_theta(bbar, q, win)
    mean_wq = Wq.mean(0)
    ok = np.flatnonzero(c <= args.budget)
    best = int(ok[np.argmax(mean_wq[ok])])
    # the best model's coefficient on the same terms as the router's: the root for its mean win rate vs q
    # (β̄_best itself only when q is uniform, docs/design.md §2)
    theta_best = solve_theta(bbar, q, float(mean_wq[best]))
    counts = np.bincount(chosen, minlength=M)
    metrics = {"router": args.router, "budget": args.budget if math.isfinite(args.budget) else "inf", "prompts": N,
               "expected_cost": float(cost.mean()), "win_rate": win, "theta": theta_bar,
               "rating": float(rating(theta_bar)), "opponents": q_name,
               "best_single_model": {"model": model_list[best], "cost": float(c[best]), "win_rate": float(mean_wq[best]),
                                     "theta": theta_best, "rating": float(rating(theta_best))},
               "chosen": {model_list[k]: int(counts[k]) for k in np.argsort(-counts, kind="stable") if counts[k]},
               "mixed_prompts": int((Wt < 1).sum()), "deterministic": args.deterministic, "seed": args.seed,
               "costs": args.costs, "source": args.checkpoint or args.preds, "prompts_file": args.prompts,
               "theta_note": "theta/rating: the coefficient on the averaged leaderboard (Σβ̄ = 0) whose mean win rate "
                             "vs q is the router's (or the best model's); win_rate: mean predicted win rate vs q"}
    write_routes(stage / "routes.jsonl", prompts, model_list, I, J, Wt, chosen, cost, R, theta)
    write_json(stage / "metrics.json", finite_or_none(metrics))
    print(f"{args.router} router, budget {args.budget:g} per query, {N} prompts, opponents {q_name}")
    print(f"{'prompt':42s} {'routed to':30s} {'π':>5s} {'cost':>8s} {'P(win)':>7s} {'rating':>7s}")
    for k in range(min(N, 12)):
        text = " ".join(prompts[k]["prompt"][-1].split())
        print(f"{text[:40]:42s} {model_list[chosen[k]][:30]:30s} {Wt[k] if pick_i[k] else 1 - Wt[k]:5.2f} "
              f"{cost[k]:8.2f} {R[k]:7.3f} {rating(theta[k]):7.0f}")
    if N > 12:
        print(f"... {N - 12} more in {out / 'routes.jsonl'}")
    print(f"router: expected cost {cost.mean():.3f} (budget {args.budget:g}), predicted win rate {win:.4f} vs q, "
          f"rating {rating(theta_bar):.0f} on the averaged leaderboard; {int((Wt < 1).sum())} prompts mix two models")
    print(f"best single model within budget: {model_list[best]} (cost {c[best]:g}), predicted win rate "
          f"{mean_wq[best]:.4f}, rating {rating(theta_best):.0f}")


def json_value(v, enc=json.encoder.encode_basestring):
    """json.dumps(v, ensure_ascii=False) with the common cases (str, int, None) done without it."""
    if isinstance(v, str):
        return enc(v)
    if v is None:
        return "null"
    if type(v) is int:
        return int.__repr__(v)
    return json.dumps(v, ensure_ascii=False)


def route_lines(prompts, names, I, J, Wt, chosen, cost, R, theta):
    """routes.jsonl lines, byte for byte what json.dumps({...}, ensure_ascii=False) writes per row (a test
    checks), built from columns: strings through json's own C encoder, floats through repr as json does."""
    enc = json.encoder.encode_basestring
    names = [enc(m) for m in names]
    wi = [repr(round(w, 6)) for w in Wt.tolist()]
    wj = [repr(round(1 - w, 6)) for w in Wt.tolist()]
    ratings = rating(theta)
    for arr in (cost, R, theta, ratings):
        if not np.isfinite(arr).all():
            raise ValueError("a non-finite number in the routes (JSON has no NaN)")
    cols = zip(prompts, I.tolist(), J.tolist(), Wt.tolist(), wi, wj, chosen.tolist(), map(repr, cost.tolist()),
               map(repr, R.tolist()), map(repr, theta.tolist()), map(repr, ratings.tolist()))
    for p, i, j, w, a, b, k, co, r, th, ra in cols:
        pi = f"{names[i]}: {a}" + (f", {names[j]}: {b}" if w < 1 else "")
        yield (f'{{"prompt": [{", ".join(map(enc, p["prompt"]))}], "id": {json_value(p["id"])}, '
               f'"category": {json_value(p["category"])}, "pi": {{{pi}}}, "model": {names[k]}, "expected_cost": {co}, '
               f'"win_rate": {r}, "theta": {th}, "rating": {ra}}}\n')


def write_routes(path, prompts, names, *cols, block=65536):
    """routes.jsonl through a temp file renamed into place (never half-written), in blocks of lines."""
    import os
    import tempfile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for s in range(0, len(prompts), block):
                f.write("".join(route_lines(prompts[s:s + block], names, *(x[s:s + block] for x in cols))))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Votes(NamedTuple):
    """The labelled votes --sweep scores on. r [N, M] = realised_scores of the --prompts' votes: the
    held-out labels (the oracle baselines are picked on them). The no-peek baselines are picked, for the
    prompts of each CV fold (fold [N], from the --preds rows), on the other folds' rows of r, or for all
    prompts on pick = realised_scores of --baseline-votes; source says which (None: neither)."""
    r: np.ndarray
    fold: np.ndarray | None
    pick: np.ndarray | None
    source: str | None


class SweepRun(NamedTuple):
    """What sweep() measures: the votes (and how many were skipped), the predictions, the run's settings."""
    votes: Votes
    skipped: int
    beta: np.ndarray  # [N, M] per-prompt coefficients
    Wq: np.ndarray    # [N, M] predicted win rates vs q
    bbar: np.ndarray  # [M] the averaged leaderboard: what a prompt-blind router would read
    c: np.ndarray     # [M] costs per query
    model_list: list
    budgets: list     # the summary's budgets (printed, sweep.json)
    q_name: str


def sweep_votes(args, prompts, battles, preds, model_list):
    """(Votes, votes skipped) for --sweep; every bad input fails here, before any output."""
    index = {m: i for i, m in enumerate(model_list)}
    r, skipped = realised_scores(battles, {prompt_key(p_["prompt"]): z for z, p_ in enumerate(prompts)}, index)
    if np.isnan(r).all():
        raise ValueError(f"{args.prompts}: no vote credits any model on any prompt (what --sweep measures: route.py --help)")
    if args.baseline_votes:  # a plain train/val split (or one CV fold with its training votes)
        return Votes(r, None, baseline_scores(args.baseline_votes, prompts, index), args.baseline_votes), skipped
    fold = prompt_folds(args, prompts, preds) if preds is not None else None
    source = None if fold is None else f"the other CV folds' votes ({len(np.unique(fold))} folds in --preds {args.preds})"
    return Votes(r, fold, None, source), skipped


def baseline_scores(path, prompts, index):
    """realised_scores of the --baseline-votes file. It must not share a prompt with the held-out ones:
    a baseline picked on those votes would see the labels it is scored on."""
    train = read_prompts(path)
    held = {tuple(p["prompt"]) for p in prompts}
    shared = [p for p in train if tuple(p["prompt"]) in held]
    if shared:
        raise ValueError(f"{shared[0]['line']}: --baseline-votes shares {len(shared)} prompts with --prompts "
                         f"(baselines picked on them would see the held-out labels)")
    try:
        battles = read_battles(path)
    except ValueError as e:
        raise ValueError(f"--baseline-votes needs labelled votes (a battle file): {e}") from None
    r, _ = realised_scores(battles, {prompt_key(p["prompt"]): z for z, p in enumerate(train)}, index)
    if np.isnan(r).all():
        raise ValueError(f"{path}: no vote credits any model on any prompt (--baseline-votes)")
    return r


def prompt_folds(args, prompts, preds):
    """Each prompt's CV fold [N] from its --preds row (cv.py writes "fold"), or None when no row has one."""
    rows = preds[3]
    idx = match_preds(args, prompts, rows)
    if not any("fold" in rows[i] for i in idx):
        return None
    for i in idx:
        if type(rows[i].get("fold")) is not int:  # a mix of CV and other rows has no honest "other folds"
            raise ValueError(f"{Path(args.preds) / 'predictions.jsonl'}:{i + 1}: 'fold' must be an integer "
                             f"(other rows carry one), got {rows[i].get('fold')!r}")
    fold = np.array([rows[i]["fold"] for i in idx])
    if len(np.unique(fold)) < 2:
        raise ValueError(f"--preds {args.preds}: every prompt of --prompts is in fold {fold[0]}, so no other fold's votes "
                         f"can pick the baselines: pass --baseline-votes (that fold's training votes: cv.py's "
                         f"fold{fold[0]}/train.jsonl.gz)")
    return fold


def model_scores(r):
    """Each model's realised win rate (NaN where r never credits it) and coverage: score_policy of the model alone."""
    M = r.shape[1]
    sc, cov = zip(*(score_policy(r, np.eye(M)[m]) for m in range(M)))
    return np.array(sc), np.array(cov)


def pick_baselines(sc, cov, c, budget):
    """The best single model within the budget, m, and the best fixed two-model mixture at the budget's
    cost, (i, j, w) with π_i = w (the upper hull of the models), picked on the realised win rates sc among
    the models with coverage > 0. (None, None) when none of those is affordable."""
    ok = np.flatnonzero(cov > 0)
    if not len(ok) or budget < c[ok].min():
        return None, None
    aff = ok[c[ok] <= budget]
    i, j, w = hull_route(sc[ok], c[ok], budget, np.argsort(c[ok], kind="stable").tolist())
    return int(aff[np.argmax(sc[aff])]), (int(ok[i]), int(ok[j]), w)


def mix(i, j, w, M):
    return w * np.eye(M)[i] + (1 - w) * np.eye(M)[j]


def mix_name(model_list, i, j, w):
    return f"{model_list[i]} {w:.2f} + {model_list[j]}"


def single_rows(run):
    """The sweep table's row of every single model."""
    r, M = run.votes.r, len(run.c)
    rows = []
    for m in range(M):
        rw, cov = score_policy(r, np.eye(M)[m])
        rows.append({"kind": "model", "name": run.model_list[m], "budget": "", "expected_cost": run.c[m],
                     "predicted_win_rate": run.Wq[:, m].mean(), "realised_win_rate": rw, "coverage": cov})
    return rows


def mixture_rows(run, rng, n=200):
    """n random fixed mixtures of two models: the cloud the best fixed mixture is the upper edge of."""
    r, M = run.votes.r, len(run.c)
    rows = []
    for _ in range(n):
        a, b = rng.choice(M, 2, replace=False)
        w = rng.random()
        pi = w * np.eye(M)[a] + (1 - w) * np.eye(M)[b]
        rw, cov = score_policy(r, pi)
        rows.append({"kind": "mixture", "name": f"{run.model_list[a]} {w:.2f} + {run.model_list[b]}", "budget": "",
                     "expected_cost": pi @ run.c, "predicted_win_rate": (run.Wq @ pi).mean(), "realised_win_rate": rw,
                     "coverage": cov})
    return rows


def curve_rows(run, sc, cov):
    """Every router at 40 budgets from the cheapest to the dearest model (and the summary's budgets), and
    the best fixed mixture at each cost picked WITH the labels (sc, cov: the held-out model_scores).
    Returns (rows, at): at[name, budget] is a row (+ π for the oracle mixture), at["pi", budget] the
    optimal router's π [N, M]."""
    r, c, M = run.votes.r, run.c, len(run.c)
    rows, at = [], {}
    for bgt in sorted(set(spaced(c.min(), c.max(), 40).tolist()) | set(run.budgets)):
        for router in ROUTERS:
            pi = dense(*route_all(router, run.beta, run.Wq, c, bgt), M)
            rw, cv = score_policy(r, pi)
            at[router, bgt] = {"kind": "router", "name": router, "budget": bgt, "expected_cost": (pi @ c).mean(),
                               "predicted_win_rate": (pi * run.Wq).sum(1).mean(), "realised_win_rate": rw, "coverage": cv}
            rows.append(at[router, bgt])
            if router == "optimal":
                at["pi", bgt] = pi
        _, fixed = pick_baselines(sc, cov, c, bgt)
        if fixed is not None:
            i, j, w = fixed
            rows.append({"kind": "best_fixed_mixture", "name": mix_name(run.model_list, i, j, w), "budget": bgt,
                         "expected_cost": w * c[i] + (1 - w) * c[j], "predicted_win_rate": "",
                         "realised_win_rate": w * sc[i] + (1 - w) * sc[j], "coverage": ""})
            at["fixed", bgt] = dict(rows[-1], pi=mix(i, j, w, M))
    return rows, at


def nopeek_baselines(run, budget):
    """Per-prompt π [N, M] of the best single model and of the best fixed mixture picked WITHOUT the
    held-out labels: for each CV fold's prompts on the other folds' votes, or for all on --baseline-votes.
    Returns (π single, π fixed, picks), or None when some fold's votes credit no affordable model."""
    v, (N, M) = run.votes, run.beta.shape
    if v.pick is not None:
        groups = [(None, np.ones(N, bool), v.pick)]
    else:
        groups = [(int(k), v.fold == k, v.r[v.fold != k]) for k in np.unique(v.fold)]
    pi_single, pi_fixed, picks = np.zeros((N, M)), np.zeros((N, M)), []
    for k, rows, r_pick in groups:
        single, fixed = pick_baselines(*model_scores(r_pick), run.c, budget)
        if single is None:
            return None
        pi_single[rows], pi_fixed[rows] = np.eye(M)[single], mix(*fixed, M)
        picks.append({"fold": k, "best_single_model": run.model_list[single],
                      "best_fixed_mixture": mix_name(run.model_list, *fixed)})
    return pi_single, pi_fixed, picks


def nopeek_summary(args, run, budget, router):
    """The no-peek baselines at one budget, scored on the held-out votes: names, cost, realised win rate,
    coverage, and the 95% paired bootstrap interval of router − baseline (router = per_prompt(...))."""
    keys = ("model", "cost", "realised", "coverage", "ci95")
    got = nopeek_baselines(run, budget) if run.votes.source else None
    if got is None:
        return {f"nopeek_{b}_{k}": None for b in ("single", "fixed") for k in keys} | {"nopeek_picks": None}
    out, r = {}, run.votes.r
    for b, pi, key in (("single", got[0], "best_single_model"), ("fixed", got[1], "best_fixed_mixture")):
        names = sorted({p[key] for p in got[2]})
        rw, cov = score_policy(r, pi)
        out |= {f"nopeek_{b}_model": names[0] if len(names) == 1 else f"{len(names)} picks over {len(got[2])} folds",
                f"nopeek_{b}_cost": (pi @ run.c).mean(), f"nopeek_{b}_realised": rw, f"nopeek_{b}_coverage": cov,
                f"nopeek_{b}_ci95": paired_ci(router, per_prompt(r, pi), np.random.default_rng(args.seed))}
    return out | {"nopeek_picks": got[2]}


def variety(pi, beta, bbar, c, budget):
    """How varied the router's decisions are at one budget (π [N, M]): the distinct models it routes to
    (π mass > 0 on some prompt); the entropy in bits of its routed-model histogram (π mass over prompts;
    0 = one model for all); the share of prompts whose decision (the set of models mixed) is not the
    most common one; the share whose top affordable model by β(z) is not the averaged leaderboard's."""
    h = pi.mean(0)
    h = h[h > 0]
    decisions = collections.Counter(map(tuple, (pi > 0)))
    aff = np.flatnonzero(c <= budget)
    top = aff[beta[:, aff].argmax(1)]
    return {"routed_models": int((pi > 0).any(0).sum()), "routed_entropy_bits": float(-(h * np.log2(h)).sum()) + 0.0,
            "off_modal_share": 1 - max(decisions.values()) / len(pi),
            "top_differs_share": float((top != aff[bbar[aff].argmax()]).mean())}


def budget_summary(args, run, at, sc, cov, bgt):
    """One budget's line: the optimal router vs the best single model and the best fixed mixture, picked
    WITH the held-out labels (oracles) and without them (no peeking), and the decisions' variety."""
    r, M = run.votes.r, len(run.c)
    single, _ = pick_baselines(sc, cov, run.c, bgt)  # (a budget below every credited model has no baseline)
    bs = {} if single is None else {"name": run.model_list[single], "expected_cost": run.c[single],
                                    "realised_win_rate": sc[single], "coverage": cov[single], "pi": np.eye(M)[single]}
    fx = at.get(("fixed", bgt), {})
    router = per_prompt(r, at["pi", bgt])
    ci = {}
    for name, pi in (("single", bs.get("pi")), ("fixed", fx.get("pi"))):
        ci[name] = paired_ci(router, per_prompt(r, pi), np.random.default_rng(args.seed)) if pi is not None else None
    opt = at["optimal", bgt]
    return {"budget": bgt, "router_expected_cost": opt["expected_cost"], "router_realised": opt["realised_win_rate"],
            "router_predicted": opt["predicted_win_rate"], "router_coverage": opt["coverage"],
            "simple_realised": at["simple", bgt]["realised_win_rate"], "strict_realised": at["strict", bgt]["realised_win_rate"],
            "best_single_model": bs.get("name", "-"), "best_single_cost": bs.get("expected_cost", math.nan),
            "best_single_realised": bs.get("realised_win_rate", math.nan), "best_single_coverage": bs.get("coverage"),
            "best_fixed_mixture": fx.get("name", "-"), "best_fixed_mixture_realised": fx.get("realised_win_rate", math.nan),
            "router_minus_single_ci95": ci["single"], "router_minus_fixed_ci95": ci["fixed"],
            **nopeek_summary(args, run, bgt, router), **variety(at["pi", bgt], run.beta, run.bbar, run.c, bgt)}


def sweep(args, stage, run):
    """Realised cost-quality curves on run = SweepRun(...) (definitions: module docstring):
    sweep.csv, sweep.json, sweep.png into stage, and the printed tables."""
    sc, cov = model_scores(run.votes.r)
    table = single_rows(run) + mixture_rows(run, np.random.default_rng(args.seed))
    rows, at = curve_rows(run, sc, cov)
    table += rows
    summary = [budget_summary(args, run, at, sc, cov, bgt) for bgt in run.budgets]
    table += nopeek_rows(summary)
    write_sweep(args, stage, run, table, summary)
    plot_sweep(table, stage / "sweep.png", f"{args.prompts}: {len(run.beta)} prompts, costs {Path(args.costs).name}, "
                                           f"opponents {run.q_name}")
    print_sweep(args, run, summary)


def nopeek_rows(summary):
    """sweep.csv rows of the no-peek baselines at the summary's budgets (after every earlier row)."""
    return [{"kind": f"nopeek_best_{kind}", "name": s_[f"nopeek_{b}_model"], "budget": s_["budget"],
             "expected_cost": s_[f"nopeek_{b}_cost"], "predicted_win_rate": "", "realised_win_rate": s_[f"nopeek_{b}_realised"],
             "coverage": s_[f"nopeek_{b}_coverage"]}
            for s_ in summary if s_["nopeek_single_model"] is not None
            for b, kind in (("single", "single"), ("fixed", "fixed_mixture"))]


def write_sweep(args, stage, run, table, summary):
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    wr.writeheader()
    wr.writerows({k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v) for k, v in t.items()} for t in table)
    atomic_write(stage / "sweep.csv", buf.getvalue())
    top = float((run.beta.argmax(1) != run.bbar.argmax()).mean())  # top_differs_share over all models
    write_json(stage / "sweep.json", finite_or_none({
        "prompts": len(run.beta), "votes_skipped": run.skipped, "opponents": run.q_name, "costs": args.costs,
        "source": args.checkpoint or args.preds, "prompts_file": args.prompts,
        "note": "realised win rates on the labelled votes (route.py docstring); the best single "
                "model and best fixed mixture are chosen WITH these labels (an oracle baseline)",
        "budgets": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in s_.items()} for s_ in summary],
        "nopeek_picked_on": run.votes.source,
        "nopeek_note": "nopeek_*: the same baselines picked WITHOUT the held-out labels (on nopeek_picked_on; per CV "
                       "fold on the other folds' votes, nopeek_picks), scored on the held-out votes; ci95: router − "
                       "baseline, 95% paired bootstrap over prompts. Variety of the optimal router's decisions: "
                       "routed_models, routed_entropy_bits, off_modal_share, top_differs_share (route.py docstring)",
        "top_differs_share_all_models": top}))


def print_sweep(args, run, summary):
    """The printed tables: the oracle baselines (as before), then the no-peek baselines and the variety."""
    print(f"\nrealised win rate on the votes of {args.prompts} ({len(run.beta)} prompts, {run.skipped} votes skipped); the best single "
          f"model and best fixed mixture are picked WITH these labels")
    print(f"{'budget':>7s} {'spent':>6s} {'optimal':>7s} {'simple':>7s} {'strict':>7s} {'best single model':>30s} {'cost':>6s} "
          f"{'win':>6s} {'opt-single [95% CI]':>26s} {'fixed mix':>9s} {'opt-fixed [95% CI]':>26s} {'cover':>5s}")
    fmt = lambda d, ci: f"{d:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"
    for s_ in summary:
        print(f"{s_['budget']:7.2f} {s_['router_expected_cost']:6.2f} {s_['router_realised']:7.4f} {s_['simple_realised']:7.4f} "
              f"{s_['strict_realised']:7.4f} {s_['best_single_model'][:30]:>30s} {s_['best_single_cost']:6.2f} "
              f"{s_['best_single_realised']:6.4f} {fmt(s_['router_realised'] - s_['best_single_realised'], s_['router_minus_single_ci95']):>26s} "
              f"{s_['best_fixed_mixture_realised']:9.4f} "
              f"{fmt(s_['router_realised'] - s_['best_fixed_mixture_realised'], s_['router_minus_fixed_ci95']):>26s} "
              f"{s_['router_coverage']:5.3f}")
    src = run.votes.source or "none: pass --baseline-votes TRAIN, or CV predictions whose rows carry 'fold'"
    print(f"\nno-peek baselines (picked on {src}), scored on the same held-out votes; variety of the optimal "
          f"router's decisions (top≠avg: top affordable model by β(z) is not the averaged leaderboard's)")
    print(f"{'budget':>7s} {'optimal':>7s} {'best single (no peek)':>30s} {'win':>6s} {'opt-single [95% CI]':>26s} "
          f"{'fixed mix':>9s} {'opt-fixed [95% CI]':>26s} {'models':>6s} {'H bits':>6s} {'off-mode':>8s} {'top≠avg':>7s}")
    for s_ in summary:
        got = s_["nopeek_single_model"] is not None
        d = {b: fmt(s_["router_realised"] - s_[f"nopeek_{b}_realised"], s_[f"nopeek_{b}_ci95"]) if got else "-"
             for b in ("single", "fixed")}
        win = {b: f"{s_[f'nopeek_{b}_realised']:.4f}" if got else "-" for b in ("single", "fixed")}
        print(f"{s_['budget']:7.2f} {s_['router_realised']:7.4f} {(s_['nopeek_single_model'] or '-')[:30]:>30s} "
              f"{win['single']:>6s} {d['single']:>26s} {win['fixed']:>9s} {d['fixed']:>26s} {s_['routed_models']:6d} "
              f"{s_['routed_entropy_bits']:6.3f} {s_['off_modal_share']:8.3f} {s_['top_differs_share']:7.3f}")
    print(f"-> {Path(args.out) / 'sweep.csv'}, {Path(args.out) / 'sweep.png'}, {Path(args.out) / 'sweep.json'}")


def plot_sweep(table, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    mix = [t for t in table if t["kind"] == "mixture"]
    ax.scatter([t["expected_cost"] for t in mix], [t["realised_win_rate"] for t in mix], s=6, c="0.8",
               label="random fixed mixtures of 2 models")
    single = [t for t in table if t["kind"] == "model"]
    ax.scatter([t["expected_cost"] for t in single], [t["realised_win_rate"] for t in single], s=14, c="k", label="single models")
    for t in sorted(single, key=lambda t: -t["realised_win_rate"])[:6]:
        ax.annotate(t["name"], (t["expected_cost"], t["realised_win_rate"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    pts = sorted((t["expected_cost"], t["realised_win_rate"]) for t in table if t["kind"] == "best_fixed_mixture")
    ax.plot(*zip(*pts), "k--", lw=0.8, label="best fixed mixture (picked with the labels)")
    for name, color in zip(ROUTERS, ("C0", "C1", "C2")):
        pts = sorted((t["expected_cost"], t["realised_win_rate"]) for t in table if t["kind"] == "router" and t["name"] == name)
        style = {"ls": "none", "marker": "o", "mfc": "none", "ms": 6} if name == "strict" else {"marker": ".", "ms": 3}
        ax.plot(*zip(*pts), color=color, label=f"P2L router: {name}", **style)  # strict picks single models: points, no line
    ax.set_xscale("log")
    ax.set_xlabel("expected cost per query")
    ax.set_ylabel("realised win rate (held-out votes)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    save_png(fig, path)


if __name__ == "__main__":
    main()
