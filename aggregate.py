"""Leaderboards from P2L: for any set of prompts (docs/design.md §2), per group with bootstrap CIs, each
model's strengths and weaknesses, the aggregation-scale curve, and maximum-likelihood
leaderboards from raw votes; as JSON/CSV and as pictures (leaderboard.png: ratings with CI whiskers;
leaderboard_by_<key>.png: each group's ranks; one prompt's ratings beside the marginal leaderboard's).
Everything is the same exact Newton solve (fit_pairs): the coefficients whose pairwise outcome
probabilities best match a target, to a gradient norm <= 1e-8 and a Newton step <= 1e-6.

    # one prompt's leaderboard (a set of size 1) from a trained checkpoint, in seconds on a CPU (+ a PNG with --out)
    python aggregate.py --checkpoint out/train --prompt "Write a limerick about a cat" --out out/prompt
    # the validation prompts: overall + per AlpacaEval sub-source, CIs, strengths, the scale curve
    python aggregate.py --preds out/eval --by category --truth data/alpaca_eval/val.jsonl.gz --out out/aggregate
    # leaderboards from human votes, checked against the official Arena category leaderboards
    python aggregate.py --votes data/arena_catalog/train.jsonl.gz data/arena_catalog/val.jsonl.gz --by category \\
        --official data/arena_catalog/leaderboards.csv --out out/arena
"""
import argparse
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr

from common import (
    A, add_checkpoint_options, atomic_write, B, batch_nll, BOTHBAD, cat_pairs, check_out, encode_for,
    group_by_prompt, HEAD_OF_LOSS, load_checkpoint, load_predictions, LOSSES, outcome_logprobs, OutputSet, predict,
    predictions_meta, prompt_key, rating, read_battles, read_json_object, save_png, SOFT_LOSSES, TIE, torch_threads,
    write_json,
)

# The arena-catalog votes carry 10 broad topic categories; the official boards (leaderboards.csv)
# are task/language slices. Three topics have a board that selects the same kind of prompt; the
# others have none, and since every vote is from recent *English* battles they, like all votes
# together, are compared with the english board.
ARENA_BOARD = {"Tech Programming": "coding", "Math Puzzles": "math", "Creative Arts": "creative_writing"}
ARENA_DEFAULT_BOARD = "english"

# -----------------------------------------------------------------------------
# the leaderboard solver (docs/design.md §2): train.py (the marginal leaderboard), evaluate.py and route.py
# (θ*) import it from here. One Newton solver fits "the coefficients whose pairwise outcome probabilities
# best match a target": the target is the mean of per-prompt predicted probabilities (aggregating a P2L
# over a set of prompts) or the vote counts (a leaderboard by maximum likelihood from battles). Both are
# Σ_pairs Σ_outcomes target · (−log P), so both are cross-entropies and both are solved exactly, for K
# independent problems at once.

N_OUTCOMES = {"bt": 2, "rk": 3, "grk": 4}  # the outcomes a head can produce: a prefix of (A, B, TIE, BOTHBAD)


def all_pairs(n_models):
    """Every unordered pair i < j, as two index tensors (a, b)."""
    return tuple(torch.triu_indices(n_models, n_models, 1))


# Each prompt costs N x M x M sigmoids in win_rates and N x M(M−1)/2 in mean_pair_probs: the hot loops.
# Both use one exact reformulation: with φ = exp(β − max β) per prompt, σ(β_a − β_b) = φ_a·r_ab where
# r_ab = 1/(φ_a + φ_b) is symmetric, so each unordered pair costs one addition and one division (no exp)
# and serves both (a, b) and (b, a). A prompt whose β spread exceeds SPREAD_MAX (φ would lose precision
# below e^-600) takes the plain expit path instead. Blocks of prompts are laid out [M, n] so every step
# below is one contiguous torch op over about a megabyte (in cache; torch spreads it over its threads).
SPREAD_MAX = 600.0


def row_blocks(N, M, elems=2 ** 17):
    """[(start, stop)] of blocks of rows of an [N, M] array, about elems numbers each."""
    step = max(1, elems // M)
    return [(s, min(s + step, N)) for s in range(0, N, step)]




def map_blocks(fn, blocks):
    """fn(block) for each block, results yielded in order. Threads take whole blocks of prompts, each
    running torch single-threaded: with thousands of ~100 µs ops per block, torch's own per-op
    threads would meet at a barrier after every op, and on a busy machine wait there for whole
    time slices. Results do not depend on the thread count (each block is computed alone)."""
    from concurrent.futures import ThreadPoolExecutor
    threads = torch.get_num_threads()
    if threads == 1 or len(blocks) == 1:
        with torch_threads(1):
            yield from map(fn, blocks)
        return
    with torch_threads(1), ThreadPoolExecutor(threads) as pool:
        pending = []
        for blk in blocks:  # at most 2 x threads blocks in flight: memory stays bounded
            pending.append(pool.submit(fn, blk))
            if len(pending) > 2 * threads:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def phi_t(bs):
    """φ of a block [n, M] as [M, n]."""
    return torch.exp(bs - bs.amax(1, keepdim=True)).T.contiguous()


def pair_sweep(fT, visit):
    """For each model i < M−1: r = 1/(φ_i + φ_j) for the models j > i, [M−1−i, n]; visit(i, r)."""
    M, n = fT.shape
    buf = torch.empty(max(M - 1, 1) * n, dtype=fT.dtype)
    for i in range(M - 1):
        r = buf[:(M - 1 - i) * n].view(M - 1 - i, n)
        torch.add(fT[i + 1:], fT[i], out=r)
        r.reciprocal_()
        visit(i, r)


def wide_rows(bs):
    """Rows of a block whose β spread is too wide for the φ form."""
    return (bs.amax(1) - bs.amin(1)) > SPREAD_MAX


def _pair_objective(x, a, b, target, head, l2, derivs):
    """target [K, O, P] (outcome-major: each outcome's slice contiguous, 10x faster elementwise).
    Σ_p Σ_o target·(−log P_o) + l2·(|β|² + η²). No gauge term: bt/rk are shift-invariant, and fit_pairs
    keeps Σβ = 0 itself. With derivs, also the gradient [K, D] and Hessian [K, D, D]: each pair touches
    only β_a, β_b and η, so per-pair derivatives (summed over pairs, which are independent) give the
    3 x 3 blocks, scattered into the full Hessian: closed forms for bt, _pair_grads for rk / grk. Every
    target is used as it is, never as 1 − the other: a far-off pair's small probability carries its
    curvature."""
    K, D = x.shape
    O, P = target.shape[1], target.shape[2]
    M = D - (head != "bt")
    beta = x[:, :M]
    local = [beta[:, a], beta[:, b]] + ([x[:, M:].expand(K, P)] if head != "bt" else [])
    if head == "bt":  # closed form, 5x faster than autograd: d/dΔ of −t_a log σ(Δ) − t_b log σ(−Δ)
        d = local[0] - local[1]
        f_pair = -(target[:, 0] * F.logsigmoid(d) + target[:, 1] * F.logsigmoid(-d))
        if derivs:
            s, r = torch.sigmoid(d), torch.sigmoid(-d)  # σ(−Δ) itself, not 1 − σ(Δ): it keeps a far-off pair's
            n = target[:, 0] + target[:, 1]             # gradient and curvature from rounding to 0
            g1, h11 = target[:, 1] * s - target[:, 0] * r, n * s * r
            g, h = [g1, -g1], [[h11, -h11], [-h11, h11]]
        f = f_pair.sum(1)
    else:
        f_pair, g = _pair_grads(local, target, head, O, derivs)
        f = f_pair.sum(1)
        if derivs:  # ∂g_i/∂x_j by forward differences of the exact gradient, symmetrised (see _pair_grads)
            dj = []
            for j in range(3):
                moved = list(local)
                moved[j] = local[j] + _FD_STEP
                step = moved[j] - local[j]  # the step as represented
                dj.append([(gm - gi) / step for gm, gi in zip(_pair_grads(moved, target, head, O)[1], g)])
            h = [[(dj[j][i] + dj[i][j]) / 2 for j in range(3)] for i in range(3)]
    f = f + l2 * (x ** 2).sum(1)
    if not derivs:
        return f
    idx = [a, b] + ([torch.full_like(a, M)] if head != "bt" else [])
    G = torch.zeros(K, D, dtype=x.dtype)
    H = torch.zeros(K, D * D, dtype=x.dtype)
    for i, gi in enumerate(g):
        G.index_add_(1, idx[i], gi.detach())
        for j, hij in enumerate(h[i]):
            H.index_add_(1, idx[i] * D + idx[j], hij.detach())
    H = H.view(K, D, D)
    G += 2 * l2 * x
    H[:, range(D), range(D)] += 2 * l2
    return f, G, H


_FD_STEP = 2.0 ** -20  # ~1e-6: the Hessian's relative error is ~1e-6 (truncation), rounding ~1e-10


def _pair_grads(local, target, head, O, grads=True):
    """Per-pair objective Σ_o target·(−log P_o) and its exact first derivatives in (β_a, β_b, η) by
    autograd, for rk / grk. Their second derivatives are taken by differencing these, not by double
    backward: torch's double backward of logsigmoid / logsumexp forms 1 − σ, which rounds the curvature
    of a pair more than ~37 logits apart to 0 (or to noise) while the first derivative stays exact. A
    Hessian accurate to ~1e-6 only slows Newton's last steps a little; the fixed point is the
    gradient's, which is exact."""
    if head == "grk":
        lp = outcome_logprobs(local[0], local[1], local[2], head)
        f_pair = -sum(target[:, o] * lp[..., o] for o in range(O))
        if not grads:
            return f_pair, None
        dlp = _grk_dlogp(*local)
        return f_pair, [-sum(target[:, o] * dlp[o][i] for o in range(O)) for i in range(3)]
    with torch.enable_grad():
        v = [t.detach().requires_grad_(grads) for t in local]
        lp = outcome_logprobs(v[0], v[1], v[2], head)
        f_pair = -sum(target[:, o] * lp[..., o] for o in range(O))
        g = torch.autograd.grad(f_pair.sum(), v) if grads else None
    return f_pair.detach(), g


def _grk_dlogp(ba, bb, eta):
    """∂ log P_o / ∂(β_a, β_b, eta) for the grk outcomes (a, b, tie, both bad), [o][variable]. Each
    fraction is exp(log numerator − log denominator) and each complement has its own numerator,
    (θφ_b + 1)/D_a rather than 1 − φ_a/D_a: autograd forms the latter and loses the derivative of a
    model far above (or below) the rest, whose size is that complement."""
    zero = torch.zeros_like(ba)
    lth = torch.logaddexp(zero, eta)  # log θ
    s_eta = torch.sigmoid(eta)        # dlogθ/deta
    lda = torch.logsumexp(torch.stack([ba, lth + bb, zero]), 0)
    ldb = torch.logsumexp(torch.stack([bb, lth + ba, zero]), 0)
    ld0 = torch.logsumexp(torch.stack([zero, ba, bb]), 0)
    l2t = torch.logaddexp(zero + math.log(2.0), eta)  # log(2 + t)
    lnum = torch.logsumexp(torch.stack([zero + math.log(2.0), l2t + ba, l2t + bb]), 0)
    fa_da, fb_db = torch.exp(ba - lda), torch.exp(bb - ldb)
    rest_a, rest_b = torch.exp(torch.logaddexp(lth + bb, zero) - lda), torch.exp(torch.logaddexp(lth + ba, zero) - ldb)
    tb_da, ta_db = torch.exp(lth + bb - lda), torch.exp(lth + ba - ldb)  # θφ_b/D_a, θφ_a/D_b
    fa_d0, fb_d0 = torch.exp(ba - ld0), torch.exp(bb - ld0)
    na, nb = torch.exp(l2t + ba - lnum), torch.exp(l2t + bb - lnum)  # (2+t)φ/num
    tn = torch.exp(eta + torch.logaddexp(ba, bb) - lnum)  # t(φ_a + φ_b)/num
    return [[rest_a, -tb_da, -tb_da * s_eta],
            [-ta_db, rest_b, -ta_db * s_eta],
            [1 + na - fa_d0 - fa_da - ta_db, 1 + nb - fb_d0 - fb_db - tb_da, 1 + tn - (tb_da + ta_db) * s_eta],
            [-fa_d0, -fb_d0, zero]]


def _newton_step(G, H, gauge_M):
    """The Newton step −H⁻¹G of each problem, in Jacobi-scaled coordinates (each coordinate in units of
    its own curvature): a model whose every pair is far apart has curvature ~e^−gap, which next to
    another's 1/4 would round away in H itself, but is exact relative to its own diagonal. bt/rk
    (gauge_M = M): H is singular along the common shift of β, so the scaled shift direction u is added as
    u·uᵀ; with the gradient orthogonal to that shift this gives exactly H's step with no shift in it.
    Where the scaled Hessian is not positive definite, a Levenberg shift (Marquardt's, in these scaled
    units). Returns (step [K, D], shift [K], smallest eigenvalue of the scaled system [K])."""
    K, D = G.shape
    dg = H.diagonal(dim1=1, dim2=2).abs()
    dg = torch.where(dg > 0, dg, torch.ones_like(dg))  # a coordinate without curvature stays singular below
    sc = dg.rsqrt()
    S = H * sc[:, :, None] * sc[:, None, :]
    if gauge_M:
        u = torch.zeros(K, D, dtype=G.dtype)
        u[:, :gauge_M] = dg[:, :gauge_M].sqrt()
        u /= u.norm(dim=1, keepdim=True)
        S = S + u[:, :, None] * u[:, None, :]
    eye = torch.eye(D, dtype=G.dtype)
    shift = torch.zeros(K, dtype=G.dtype)
    for _ in range(60):  # Levenberg: the smallest shift that makes the scaled Hessian positive definite
        L, info = torch.linalg.cholesky_ex(S + shift[:, None, None] * eye)
        bad = info != 0
        if not bad.any():
            break
        shift = torch.where(bad, torch.where(shift == 0, torch.full_like(shift, 1e-10), 10 * shift), shift)
    d = -torch.cholesky_solve((sc * G).unsqueeze(-1), L).squeeze(-1) * sc
    return d, shift, S


class NewtonStop(NamedTuple):
    """When fit_pairs stops: converged (see fit_pairs) or after max_iter Newton steps."""
    tol: float = 1e-8        # every gradient's 2-norm at most this ...
    max_iter: int = 200
    step_tol: float = 1e-6   # ... and every Newton step's largest entry at most this


def fit_pairs(a, b, target, n_models, head, l2=0.0, init=None, stop=NewtonStop()):
    """Minimise Σ_p Σ_o target[k, p, o]·(−log P_o(β_a[p] vs β_b[p]; η)) + l2·(|β|² + η²) over (β, η) for
    K problems at once (target [K, P, O], float64), by Newton's method with exact Hessians (Jacobi-scaled:
    _newton_step), a Levenberg shift where the Hessian is not positive definite, and a backtracking
    line search. Converged means: every gradient's 2-norm <= tol, every Newton step's largest entry
    <= step_tol, and that step a plain Newton step on a Hessian well enough conditioned to determine it
    (no Levenberg shift; the scaled system's smallest eigenvalue >= 1e-10): where the curvature has
    fallen below machine precision (a model that never lost; pairs so far apart that float64 cannot
    see them) a tiny step means nothing, and the row is reported not converged. Gauge: Σβ = 0 for bt
    and rk (kept exactly: a common shift changes no probability); grk needs none (the grounding
    competitor fixes the scale). init: a start [D] or [K, D] (β then η), e.g. a nearby solution; the
    default is all zeros. stop: NewtonStop(tol, max_iter, step_tol). Returns (beta [K, M], eta [K] or
    None, info)."""
    tol, max_iter, step_tol = stop
    target = target.double().permute(0, 2, 1).contiguous()  # [K, O, P]: see _pair_objective
    K = target.shape[0]
    D = n_models + (head != "bt")
    gauge_M = n_models if head in ("bt", "rk") else 0
    x = torch.zeros(K, D, dtype=torch.float64)
    if init is not None:
        x += torch.as_tensor(init, dtype=torch.float64)
    if gauge_M:  # start in the gauge Σβ = 0 (a shift changes no probability)
        x[:, :n_models] -= x[:, :n_models].mean(1, keepdim=True)
    gnorm = torch.full((K,), math.inf, dtype=torch.float64)
    fval = torch.zeros(K, dtype=torch.float64)
    act = torch.arange(K)  # problems still iterating: a converged one costs nothing more
    step = torch.full((K,), math.inf, dtype=torch.float64)
    plain = torch.zeros(K, dtype=torch.bool)  # the last step was a plain Newton step (no Levenberg shift)
    S_last = torch.zeros(K, D, D, dtype=torch.float64)
    for it in range(max_iter + 1):
        f, G, H = _pair_objective(x[act], a, b, target[act], head, l2, derivs=True)
        flat = (f >= fval[act]) & (it > 0)  # the objective did not fall in float64 since the last step
        gnorm[act], fval[act] = G.norm(dim=1), f
        d, shift, S = _newton_step(G, H, gauge_M)
        step[act], plain[act], S_last[act] = d.abs().amax(1), shift == 0, S
        stalled = flat & (gnorm[act] <= tol) & (step[act] >= 0.1)
        # done when the gradient is small AND the Newton step is: where the maximum does not exist (a
        # model that never lost) the gradient fades like e^-β while each step stays ~1, and a test on
        # the gradient alone would call an arbitrary finite β converged. Such a row stops (not converged)
        # once a step of >= 0.1 no longer lowers its objective in float64: the rest of max_iter would only
        # push β toward infinity (a separated 3-model problem: 38 iterations instead of 200)
        keep = ((gnorm[act] > tol) | (step[act] > step_tol) | ~plain[act]) & ~stalled
        if not keep.any() or it == max_iter:
            break
        act, f, G, d = act[keep], f[keep], G[keep], d[keep]
        slope = (G * d).sum(1)
        t = torch.ones(len(act), dtype=torch.float64)
        # a Newton decrement −g·d below 1e-4 means the quadratic phase, where the full step is taken
        # unchecked (a bad one would show in the next gradient); otherwise Armijo backtracking, whose
        # 1e-13·|f| slack lets rounding-level steps through
        todo = torch.nonzero(-slope > 1e-4).squeeze(1)
        for _ in range(60 if len(todo) else 0):
            fn = _pair_objective(x[act[todo]] + t[todo, None] * d[todo], a, b, target[act[todo]], head, l2, derivs=False)
            ok = fn <= f[todo] + 1e-4 * t[todo] * slope[todo] + 1e-13 * f[todo].abs()
            todo = todo[~ok]
            if len(todo) == 0:
                break
            t[todo] /= 2
        x[act] += t[:, None] * d
        if gauge_M:
            x[act, :n_models] -= x[act, :n_models].mean(1, keepdim=True)
    conv = (gnorm <= tol) & (step <= step_tol) & plain
    if conv.any():  # a plain step can still be meaningless where the scaled curvature is below rounding
        lam = torch.full((K,), math.nan, dtype=torch.float64)
        lam[conv] = torch.linalg.eigvalsh(S_last[conv])[:, 0]
        conv &= lam >= 1e-10
    info = {"iterations": it, "grad_norm": gnorm, "step": step, "converged": bool(conv.all()), "converged_rows": conv,
            "objective": fval}
    return x[:, :n_models], (x[:, n_models] if head != "bt" else None), info


def vote_targets(pairs, n_models, loss, weights=None, return_total=False):
    """Battles (cat_pairs of group_by_prompt's groups) as fit_pairs targets: the weighted outcome
    counts of each distinct ordered pair, normalised to one unit of weight per problem so the fit
    is the mean NLL per vote. bt/bt-tie count the (soft) label p as p wins and 1 − p losses.
    weights [V] or [K, V] reweight the votes (e.g. bootstrap counts). Returns (a, b, target [K, U, O])."""
    head = HEAD_OF_LOSS[loss]
    O = N_OUTCOMES[head]
    w = pairs["w"].double()
    if head == "bt":
        per_vote = torch.stack([w * pairs["p"], w * (1 - pairs["p"])], -1)
    else:
        per_vote = w[:, None] * F.one_hot(pairs["y"], 4)[:, :O].double()
    key = pairs["a"] * n_models + pairs["b"]
    uniq, inv = torch.unique(key, return_inverse=True)
    k = torch.ones(1, len(w), dtype=torch.float64) if weights is None else torch.as_tensor(weights).double().reshape(-1, len(w))
    target = torch.zeros(k.shape[0], len(uniq), O, dtype=torch.float64).index_add_(1, inv, k[:, :, None] * per_vote[None])
    total = target.sum((1, 2), keepdim=True)
    if not (total > 0).all():
        bad = int((total <= 0).sum())
        raise ValueError(f"no votes with positive weight to fit{f' in {bad} of {len(total)} resamples' if len(total) > 1 else ''}"
                         f"{' (plain bt gives ties weight 0)' if loss == 'bt' else ''}")
    if return_total:
        return uniq // n_models, uniq % n_models, target / total, total
    return uniq // n_models, uniq % n_models, target / total


def separation(a, b, target, n_models, head, names=None, total=None):
    """Why the maximum-likelihood fit of each problem (target [K, U, O]) has no finite maximum, or
    None where it has one. Each vote says "the winner's coefficient cannot run off below the
    loser's": an edge loser <- winner (a tie: both ways; grk also compares each model with the
    grounding competitor G: a win or a tie puts the model above G, a both-bad vote puts G above
    both). The maximum exists iff every model with votes reaches every other along such edges
    (the graph is strongly connected: Zermelo 1929, Ford 1957); otherwise some group never lost to
    the rest and its coefficients run to infinity. rk and grk also need a tie and a win for their tie
    parameter (_eta_separation)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    names = names or [f"model {i}" for i in range(n_models)]
    G = n_models  # the grounding node (grk)
    a, b, target = a.numpy(), b.numpy(), target.numpy()
    total = None if total is None else total.reshape(-1).numpy()
    out = []
    for k in range(target.shape[0]):
        t = target[k] > 0
        src, dst = [a[t[:, A]], b[t[:, B]]], [b[t[:, A]], a[t[:, B]]]
        if target.shape[2] > TIE:
            src += [a[t[:, TIE]], b[t[:, TIE]]]
            dst += [b[t[:, TIE]], a[t[:, TIE]]]
        nodes = n_models
        if head == "grk":
            nodes += 1
            up = np.concatenate([a[t[:, A]], b[t[:, B]], a[t[:, TIE]], b[t[:, TIE]]])
            down = np.concatenate([a[t[:, BOTHBAD]], b[t[:, BOTHBAD]]])
            src += [up, np.full(len(down), G)]
            dst += [np.full(len(up), G), down]
        src, dst = np.concatenate(src), np.concatenate(dst)
        seen = np.zeros(nodes, bool)
        seen[np.concatenate([a[t.any(1)], b[t.any(1)]])] = True
        if head == "grk":
            seen[G] = True
        g = coo_matrix((np.ones(len(src)), (src, dst)), shape=(nodes, nodes)).tocsr()
        n_comp, comp = connected_components(g[seen][:, seen], directed=True, connection="strong")
        why = None
        if n_comp > 1:
            idx = np.flatnonzero(seen)
            c = target[k] * (1.0 if total is None else total[k])  # votes (weighted), not fractions
            won = np.bincount(a, c[:, A], nodes) + np.bincount(b, c[:, B], nodes)
            lost = np.bincount(a, c[:, B], nodes) + np.bincount(b, c[:, A], nodes)
            tied = (np.bincount(a, c[:, TIE:].sum(1), nodes) + np.bincount(b, c[:, TIE:].sum(1), nodes)
                    if c.shape[1] > TIE else np.zeros(nodes))
            wins = np.bincount(src, minlength=nodes)
            losses = np.bincount(dst, minlength=nodes)

            def label(i):
                if i == G:
                    return "the grounding (both-bad) competitor"
                return f"{names[i]!r} ({won[i]:g} wins, {lost[i]:g} losses, {tied[i]:g} ties/both-bad)"
            never_lost = [label(i) for i in idx if losses[i] == 0]
            never_won = [label(i) for i in idx if wins[i] == 0]
            if never_lost or never_won:
                why = "; ".join(s for s in (f"never lost: {', '.join(never_lost[:5])}" if never_lost else "",
                                            f"never won: {', '.join(never_won[:5])}" if never_won else "") if s)
            else:
                first = [label(i) for i in idx[comp == comp[0]]][:5]
                why = f"the models split into {n_comp} groups that never all beat each other (one: {', '.join(first)})"
        else:
            why = _eta_separation(t, head)
        out.append(why)
    return out


def _eta_separation(t, head):
    """Why the tie parameter of a tie-aware head has no finite maximum (t: [U, O] outcomes seen), or
    None. P(tie) rises with η and P(a wins), P(b wins) fall with it (both-bad does not depend on it),
    so η needs at least one tie (else it runs to −∞: rk's η to 0, grk's θ to 1) and at least one win
    (else it runs to +∞)."""
    if head == "bt":
        return None
    name = "the Rao-Kupper tie parameter" if head == "rk" else "the grk tie parameter (θ = 1 + e^eta)"
    if t.shape[1] <= TIE or not t[:, TIE].any():
        return f"no ties: {name} runs to {'0' if head == 'rk' else 'θ = 1'} (eta to −∞)"
    if not t[:, [A, B]].any():
        return f"no wins, only ties{' and both-bad' if head == 'grk' else ''}: {name} runs to +∞"
    return None


def fit_votes(pairs, n_models, loss, l2=0.0, weights=None, names=None):
    """Maximum-likelihood leaderboard(s) from battles: (beta [K, M], eta [K] or None, info). Without
    a ridge (l2 = 0) a problem whose maximum does not exist (separation()) is not solved: its row is
    NaN, and info["separated"][k] says why (None where the fit exists); with l2 > 0 every fit exists
    (the ridge l2·(|β|² + eta²) holds the coefficients and the tie parameter alike)."""
    head = HEAD_OF_LOSS[loss]
    a, b, target, total = vote_targets(pairs, n_models, loss, weights, return_total=True)
    why = separation(a, b, target, n_models, head, names, total) if l2 == 0 else [None] * target.shape[0]
    ok = torch.tensor([w is None for w in why])
    K, D = target.shape[0], n_models + (head != "bt")
    x = torch.full((K, D), math.nan, dtype=torch.float64)
    info = {"separated": why, "converged": False, "grad_norm": torch.full((K,), math.inf, dtype=torch.float64),
            "converged_rows": torch.zeros(K, dtype=torch.bool)}
    if ok.any():
        bb, ee, info_ok = fit_pairs(a, b, target[ok], n_models, head, l2=l2)
        x[ok, :n_models] = bb
        if ee is not None:
            x[ok, n_models] = ee
        info["grad_norm"][ok] = info_ok["grad_norm"]
        info["converged_rows"][ok] = info_ok["converged_rows"]
        info.update({k: v for k, v in info_ok.items() if k not in ("grad_norm", "converged", "converged_rows")})
        info["converged"] = info_ok["converged"] and bool(ok.all())
    return x[:, :n_models], (x[:, n_models] if head != "bt" else None), info


def fit_marginal(pairs, n_models, loss, l2=1e-4, note=print):
    """The averaged leaderboard: one coefficient vector (and one eta) for all prompts, by maximum
    likelihood (float64 Newton to |grad| <= 1e-8 on the counts of each distinct pair: fit_votes
    above; the problem is convex for bt). A small ridge on β and eta keeps a model
    that never won (or never lost), and a tie parameter without ties (or without wins), finite; where
    the votes alone have no maximum that is said (note), and with l2 = 0 it is a ValueError. A fit
    that does not converge is a ValueError, never a silent number."""
    allp = cat_pairs(pairs)
    head = HEAD_OF_LOSS[loss]
    a, b, target, total = vote_targets(allp, n_models, loss, return_total=True)
    why = separation(a, b, target, n_models, head, total=total)[0]
    if why and l2 == 0:
        raise ValueError(f"the {loss} marginal leaderboard has no maximum-likelihood fit ({why}); fit it with a ridge")
    beta, eta, info = fit_votes(allp, n_models, loss, l2=l2)
    if not info["converged"]:
        raise ValueError(f"the {loss} marginal leaderboard fit did not converge "
                         f"(gradient norm {info['grad_norm'].max().item():.1e}, l2 = {l2:g})")
    beta, eta = beta[0], (eta[0] if eta is not None else torch.zeros((), dtype=torch.float64))
    if loss in SOFT_LOSSES:  # the soft labels inform eta themselves: the hard outcomes' separation is no verdict
        return _fit_soft_marginal(pairs, beta, eta, loss, l2)
    if why:
        note(f"note: the votes alone give the {loss} marginal leaderboard no maximum-likelihood fit ({why}); "
             f"the ridge l2 = {l2:g} holds it finite{f' (eta = {eta.item():.3g})' if head != 'bt' else ''}")
    return beta.float(), eta.float()


def _fit_soft_marginal(pairs, beta, eta, loss, l2):
    """The marginal under rk-soft / grk-soft. Their expected NLL is not a sum of target·(−log P_o)
    over outcomes, so the Newton solver cannot fit it; L-BFGS in float64 from the hard-winner fit
    (a near start) can, on the same objective (mean NLL per unit weight + l2·(|β|² + eta²), gauge
    Σβ = 0 for rk). A final gradient above 1e-6 is a ValueError, not an answer."""
    allp = cat_pairs(pairs)
    allp["row"] = torch.zeros_like(allp["row"])
    M = len(beta)
    x = torch.cat([beta, eta.reshape(1)]).double().detach().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s, w = batch_nll(x[None, :M], x[M:], allp, loss)
        f = s / w + l2 * (x ** 2).sum() + (0.5 * x[:M].sum() ** 2 if HEAD_OF_LOSS[loss] == "rk" else 0.0)
        f.backward()
        return f

    opt.step(closure)
    closure()
    g = x.grad.abs().max().item()
    if not g <= 1e-6:
        raise ValueError(f"the {loss} marginal leaderboard fit (L-BFGS) did not converge (gradient {g:.1e}, l2 = {l2:g})")
    return x[:M].detach().float(), x[M].detach().float()

# -----------------------------------------------------------------------------
# the leaderboard of a set of prompts (docs/design.md §2): the mean pairwise outcome matrix over prompts,
# then the vote-fit solver (fit_pairs) on it. evaluate.py, livebench_eval.py and serve.py import
# aggregate() and leaderboard_rows() from here.


def _weight_rows(weights, n):
    w = torch.full((1, n), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    w = w.reshape(1, n) if w.dim() == 1 else w
    if w.shape[1] != n or (w < 0).any() or not (w.sum(1) > 0).all():
        raise ValueError(f"weights must be [{n}] or [K, {n}], >= 0, every row with a positive sum; got {tuple(w.shape)}")
    return w / w.sum(1, keepdim=True)


def pair_prob_sums(beta, eta, head, w):
    """Σ_z w[k, z]·P_z(outcome o of pair p) for a block of prompts beta [n, M] (eta [n]) and weights
    w [K, n]: [K, P, n_out], n_out = N_OUTCOMES[head]. Summing these over blocks of prompts gives
    mean_pair_probs without ever holding N x P. For bt both directions are accumulated, φ_i·r_ij and
    φ_j·r_ij: 1 − P(a) would round the lower model's chance to 0 from a logit gap of ~37 on."""
    beta, w = beta.double(), torch.as_tensor(w).double()
    M = beta.shape[1]
    a, b = all_pairs(M)
    if head != "bt":
        if eta is None:
            raise ValueError(f"the {head} head needs per-prompt eta")
        e = eta.double()[:, None].expand(-1, len(a))
        probs = outcome_logprobs(beta[:, a], beta[:, b], e, head).exp()[..., :N_OUTCOMES[head]]
        return (w @ probs.reshape(len(beta), -1)).view(w.shape[0], len(a), -1)
    out = torch.zeros(w.shape[0], len(a), 2, dtype=torch.float64)
    wide = wide_rows(beta)
    if wide.any():  # φ would lose precision: these prompts take σ of the differences, each direction itself
        d = beta[wide][:, a] - beta[wide][:, b]
        out[..., 0] += w[:, wide] @ torch.sigmoid(d)
        out[..., 1] += w[:, wide] @ torch.sigmoid(-d)
        beta, w = beta[~wide], w[:, ~wide]
    off = [0] + torch.arange(M - 1, 0, -1).cumsum(0).tolist()  # pairs (i, j > i) are out[:, off[i]:off[i+1]]
    fT = phi_t(beta)
    wT = w.T.contiguous()

    # both directions summed from φ: two more passes over r than 1 − P would take (measured: the bt mean matrix
    # takes ~1.7x the CPU time), and exact wherever the lower model's chance is tiny
    def visit(i, r):  # σ(β_i − β_j) = φ_i·r_ij, σ(β_j − β_i) = φ_j·r_ij
        rb = r * fT[i + 1:]
        if w.shape[0] == 1:
            out[0, off[i]:off[i + 1], 0] += r @ (fT[i] * w[0])
            out[0, off[i]:off[i + 1], 1] += rb @ w[0]
        else:
            out[:, off[i]:off[i + 1], 0] += (r.mul_(fT[i]) @ wT).T
            out[:, off[i]:off[i + 1], 1] += (rb @ wT).T
    pair_sweep(fT, visit)
    return out


def mean_pair_probs(beta, eta, head, weights=None):
    """Outcome probabilities of every pair i < j averaged over prompts: [K, P, O] for K weightings
    of the N prompts at once (weights [N] or [K, N], rows normalised; None = uniform). The
    cross-entropy is linear in its target, so this mean is all the solver needs to see of N
    prompts; summed over blocks of prompts (pair_prob_sums) so that N x P never sits in memory."""
    N, M = beta.shape
    w = _weight_rows(weights, N)
    if head != "bt" and eta is None:
        raise ValueError(f"the {head} head needs per-prompt eta")
    n_pairs = M * (M - 1) // 2
    elems = 2 ** 17 if head == "bt" else 2 ** 22 // max(n_pairs, 1) * M  # the non-bt path holds n x P x O
    out = 0
    sums = lambda se: pair_prob_sums(beta[se[0]:se[1]], eta[se[0]:se[1]] if eta is not None else None, head, w[:, se[0]:se[1]])
    for part in map_blocks(sums, row_blocks(N, M, elems)):  # summed in block order: deterministic
        out = out + part
    return out


def aggregate(beta, eta, loss, weights=None):
    """The leaderboard of a set of prompts (docs/design.md §2): per-prompt coefficients beta [N, M] (eta [N]
    for rk/grk) -> (beta_bar [M] float64, eta_bar float; 0.0 for bt, where it is unused), the
    coefficients whose pairwise outcome probabilities best match the per-prompt ones by
    cross-entropy (weights [N]: optional per-prompt weights). For bt this is the BT fit to the mean
    pairwise matrix, not the mean of the coefficients. Solved to a gradient norm <= 1e-8."""
    head = HEAD_OF_LOSS[loss]
    if beta.dim() != 2 or beta.shape[0] == 0:
        raise ValueError(f"beta must be [N, M] with N >= 1, got {tuple(beta.shape)}")
    target = mean_pair_probs(beta, eta, head, weights)
    a, b = all_pairs(beta.shape[1])
    # start from the mean coefficients: for bt it is the exact answer when prompts agree, and close otherwise
    w = _weight_rows(weights, beta.shape[0])[0]
    init = (w @ beta.double()).tolist() + ([float(w @ eta.double())] if head != "bt" else [])
    bb, ee, info = fit_pairs(a, b, target, beta.shape[1], head, init=init)
    if not info["converged"]:
        raise RuntimeError(f"aggregation did not converge: gradient norm {info['grad_norm'].max().item():.2e}")
    return bb[0], (ee[0].item() if ee is not None else 0.0)


def leaderboard_rows(models, beta, eta=None, head="bt", lo=None, hi=None, n=None):
    """One row per model, best first: rank, model, coefficient, Arena-scale rating, its CI
    (lo/hi coefficients, e.g. bootstrap percentiles), rank_ub (Arena's: 1 + the number of models
    whose CI lies wholly above this one's), n (prompts or votes behind the numbers) and the
    probability of beating the #1 model (for rk/grk: winning outright, ties apart)."""
    beta = torch.as_tensor(beta).double()
    order = sorted(range(len(models)), key=lambda i: (-beta[i].item(), models[i]))
    top = order[0]
    e = torch.full((len(models),), float(eta), dtype=torch.float64) if eta is not None else None
    win = outcome_logprobs(beta, beta[top].expand(len(models)), e, head)[:, A].exp()
    rows = []
    for r, i in enumerate(order, 1):
        row = {"rank": r, "model": models[i], "coefficient": round(beta[i].item(), 6),
               "rating": round(float(rating(beta[i].item())), 2), "p_win_vs_top": round(win[i].item(), 4)}
        if lo is not None:
            row["rating_lo"], row["rating_hi"] = round(float(rating(lo[i])), 2), round(float(rating(hi[i])), 2)
            row["rank_ub"] = 1 + sum(1 for j in range(len(models)) if lo[j] > hi[i])
        if n is not None:
            row["n"] = int(n)
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# solving many leaderboards at once


def fit_targets(target, init, M, head):
    """Newton fits of K targets [K, P, O] from starts init [K, D], in blocks of problems that keep the
    solver's per-pair tensors to a few hundred MB: (beta [K, M] float64, eta [K] or None)."""
    a, b = all_pairs(M)
    block = max(1, 2 ** 19 // max(len(a), 1))
    bs, es = [], []
    for s in range(0, target.shape[0], block):
        with torch_threads(1):  # see torch_threads
            bb, ee, info = fit_pairs(a, b, target[s:s + block], M, head, init=init[s:s + block])
        if not info["converged"]:
            raise RuntimeError(f"aggregation did not converge (gradient norm {info['grad_norm'].max():.1e})")
        bs.append(bb)
        es.append(ee)
    return torch.cat(bs), (torch.cat(es) if head != "bt" else None)


def solve_many(beta, eta, head, W):
    """Aggregated leaderboards for each row of prompt weights W [K, N] (a group, a bootstrap
    replicate, a random sample of n prompts): (beta [K, M] float64, eta [K] or None). Newton starts
    at the weighted mean of the coefficients: not the answer, but close to it (exact for one prompt)."""
    w = W / W.sum(1, keepdim=True)
    x = beta.double() if head == "bt" else torch.cat([beta.double(), eta.double()[:, None]], 1)
    return fit_targets(mean_pair_probs(beta, eta, head, w), w @ x, beta.shape[1], head)


def bootstrap_counts(n, n_boot, rng, block=65536):
    """Resample counts without an n x n_boot matrix: for each block [s, e) of the n items, yields
    ((s, e), counts [1 + n_boot, e − s]) with row 0 all ones (the data itself) and row b the number of
    times each item is drawn in resample b (n draws with replacement). Each resample's block totals
    are drawn first (multinomial, in proportion to the block sizes), then that many uniform draws
    inside each block: exactly the distribution of n uniform draws over all items."""
    edges = list(range(0, n, block)) + [n]
    sizes = np.diff(edges)
    totals = rng.multinomial(n, sizes / n, size=n_boot) if n_boot else np.zeros((0, len(sizes)), dtype=np.int64)
    for k, (s, e) in enumerate(zip(edges[:-1], edges[1:])):
        tot = totals[:, k]
        idx = rng.integers(0, e - s, tot.sum()) + np.repeat(np.arange(n_boot) * (e - s), tot)
        counts = np.ones((1 + n_boot, e - s))
        counts[1:] = np.bincount(idx, minlength=n_boot * (e - s)).reshape(n_boot, e - s)
        yield (s, e), torch.from_numpy(counts)


def solve_bootstrap(blocks, n, M, head, n_boot, seed):
    """The aggregate leaderboard (row 0) and n_boot prompt-resample replicates (rows 1..), streaming
    the prompts: blocks(s, e) gives (beta [e − s, M], eta or None) of prompts s..e−1, from memory or
    from the predictions matrix. Memory is O(n_boot x (M² + block)), never n x n_boot."""
    rng = np.random.default_rng(seed)
    sums, init = 0, 0
    for (s, e), w in bootstrap_counts(n, n_boot, rng):
        beta, eta = blocks(s, e)
        x = beta.double() if head == "bt" else torch.cat([beta.double(), eta.double()[:, None]], 1)
        init = init + w @ x

        def part(se, beta=beta, eta=eta, w=w):
            return pair_prob_sums(beta[se[0]:se[1]], eta[se[0]:se[1]] if eta is not None else None, head, w[:, se[0]:se[1]])
        rows = row_blocks(e - s, M, 2 ** 17 if head == "bt" else 2 ** 22 // max(M * (M - 1) // 2, 1) * M)
        for p in map_blocks(part, rows):  # summed in block order: deterministic
            sums = sums + p
    target = sums / n  # every replicate has n draws
    return fit_targets(target, init / n, M, head)


def bootstrap_weights(n, n_boot, gen):
    """Weights over n items (prompts or votes) [1 + n_boot, n]: row 0 all ones, the others the
    counts of a resample with replacement."""
    W = torch.ones(1 + n_boot, n, dtype=torch.float64)
    if n_boot:
        draws = torch.randint(n, (n_boot, n), generator=gen)
        W[1:] = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return W


def sub(eta, members):
    return eta[members] if eta is not None else None


def curve_sizes(n, dense=100, points=30):
    """Every n up to 100, then ~30 log-spaced sizes up to n: the whole curve at a bounded cost."""
    extra = torch.logspace(math.log10(dense), math.log10(n), points).round().long().tolist() if n > dense else []
    return sorted(set(range(1, min(n, dense) + 1)) | set(extra))


def ci(boot, level=0.95):
    """Percentile CI per model from bootstrap coefficients [B, M]; None without replicates."""
    if boot.shape[0] < 2:
        return None, None
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(boot, q, dim=0)
    return lo.tolist(), hi.tolist()


def spearman(x, y):
    return float(spearmanr(x, y).statistic)


def spearman_rows(X, y):
    """Spearman of each row of X [K, m] with y [m] at once (average ranks for ties)."""
    rx, ry = torch.tensor(rankdata(X.numpy(), axis=1)), torch.tensor(rankdata(y.numpy()))
    rx, ry = rx - rx.mean(1, keepdim=True), ry - ry.mean()
    return (rx @ ry) / (rx.norm(dim=1) * ry.norm()).clamp_min(1e-300)


def standing(beta, eta, head, chunk=256):
    """Each model's expected score against the field on each prompt, [N, M]: the mean over the other
    models of P(win) + ½ P(tie or both bad). The per-prompt evidence for strengths and weaknesses."""
    N, M = beta.shape
    out = torch.empty(N, M, dtype=torch.float64)
    for s in range(0, N, chunk):
        bs = beta[s:s + chunk].double()
        ba, bb = bs[:, :, None].expand(-1, M, M), bs[:, None, :].expand(-1, M, M)
        e = eta[s:s + chunk].double()[:, None, None].expand(-1, M, M) if eta is not None else None
        p = outcome_logprobs(ba, bb, e, head).exp()
        score = p[..., A] + 0.5 * (p[..., TIE] + p[..., BOTHBAD])
        out[s:s + chunk] = (score.sum(2) - score.diagonal(dim1=1, dim2=2)) / (M - 1)
    return out

# -----------------------------------------------------------------------------
# printing


def print_table(rows, title, show, flag="--show"):
    has_ci = "rating_lo" in rows[0]
    width = max(len(r["model"]) for r in rows[:show])
    print(title)
    print(f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  " + (f"{'95% CI':>15}  " if has_ci else "")
          + f"{'coef':>7}  {'P(beats #1)':>11}")
    for r in rows[:show]:
        cis = f"[{r['rating_lo']:6.0f}, {r['rating_hi']:6.0f}]  " if has_ci else ""
        win = "" if r["rank"] == 1 else f"{r['p_win_vs_top']:.3f}"
        print(f"{r['rank']:>4}  {r['model']:<{width}}  {r['rating']:7.1f}  {cis}{r['coefficient']:7.3f}  {win:>11}")
    if len(rows) > show:
        print(f"      ... {len(rows) - show} more ({flag})")


def short(turns, n=90):
    text = " / ".join(t.strip().replace("\n", " ") for t in turns)
    return text if len(text) <= n else text[:n - 1] + "…"

# -----------------------------------------------------------------------------
# inputs


def write_leaderboard(stem, rows, meta=None):
    """stem.json ({**meta, "leaderboard": rows}) and stem.csv (the rows), each written atomically."""
    import csv
    import io
    write_json(f"{stem}.json", {**(meta or {}), "leaderboard": rows})
    buf = io.StringIO()
    cols = list(dict.fromkeys(k for r in rows for k in r))
    wr = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    atomic_write(f"{stem}.csv", buf.getvalue())


def load_preds(path, loss):
    """Per-prompt predictions and their loss: --loss, else the one predictions.safetensors records
    (or, for older files, evaluate.py's metrics.json beside them), else bt when there is no eta."""
    path = Path(path)
    for f in ("predictions.safetensors", "predictions.jsonl"):
        if not (path / f).exists():
            raise ValueError(f"--preds {path}: no {f} (evaluate.py writes it)")
    beta, eta, models, rows = load_predictions(path)  # names a bad predictions.jsonl line
    if not torch.isfinite(beta).all() or (eta is not None and not torch.isfinite(eta).all()):
        raise ValueError(f"{path / 'predictions.safetensors'}: non-finite coefficients")
    if loss is None:  # the file records its head's loss; files written before it did: evaluate.py's metrics.json
        loss = predictions_meta(path).get("loss")
        if loss is None and (path / "metrics.json").exists():
            mj = read_json_object(path / "metrics.json", "evaluate.py metrics")
            digest = mj.get("predictions_sha256")
            if digest and digest != hashlib.sha256((path / "predictions.safetensors").read_bytes()).hexdigest():
                raise ValueError(f"--preds {path}: metrics.json belongs to other predictions (its predictions_sha256 differs); "
                                 "rerun evaluate.py there, or pass --loss")
            print(f"--preds {path}: predictions.safetensors records no loss (an older writer): taking it from metrics.json")
            loss = mj.get("loss")
        loss = loss if loss in LOSSES else None
    if loss is None:
        if eta is not None:
            raise ValueError(f"--preds {path} has eta (an rk or grk head): say which with --loss")
        loss = "bt"
    if HEAD_OF_LOSS[loss] == "bt":
        eta = None
    elif eta is None:
        raise ValueError(f"--loss {loss} needs eta, which {path / 'predictions.safetensors'} does not have")
    return beta, eta, models, rows, loss


def groups_of(rows, by, where):
    """Group name -> prompt indices; a row without the field is an error naming its line."""
    groups = {}
    for i, r in enumerate(rows):
        if r.get(by) is None:
            raise ValueError(f"{where}:{i + 1}: no '{by}' field to group by (--by {by})")
        groups.setdefault(str(r[by]), []).append(i)
    return {g: torch.tensor(groups[g]) for g in sorted(groups)}


def fit_truth(votes_path, models, loss, prompt_group, l2):
    """Ground-truth leaderboards from held-out votes: "all" (every vote on a prompt of the
    predictions) and one per group, a vote's group being its prompt's. prompt_group: prompt key ->
    group name, or None outside any group. Returns {group: (coefficients [M], mask of models seen)}."""
    battles = [b for b in read_battles(votes_path) if prompt_key(b["prompt"]) in prompt_group]
    if not battles:
        raise ValueError(f"--truth {votes_path}: none of its prompts is in --preds")
    sets = {"all": battles}
    for b in battles:
        g = prompt_group[prompt_key(b["prompt"])]
        if g is not None:
            sets.setdefault(g, []).append(b)
    index = {m: i for i, m in enumerate(models)}
    truth = {}
    for g, bs in sets.items():
        _, pairs, _ = group_by_prompt(bs, index, loss)
        allp = cat_pairs(pairs)
        if not (allp["w"] > 0).any():
            raise ValueError(f"--truth {votes_path}: group '{g}' has no vote to fit under --loss {loss}"
                             f"{': all its votes are ties, which plain bt drops' if loss == 'bt' else ''}")
        beta, _, info = fit_votes(allp, len(models), loss, l2=l2 or 0.0, names=models)
        if info["separated"][0] and l2 is None:  # as --votes: a weak N(0, 10²) prior where the MLE does not exist
            print(f"note: --truth '{g}': {info['separated'][0]}; fitted with ridge l2 = {1 / (200 * len(allp['a'])):.3g}")
            beta, _, info = fit_votes(allp, len(models), loss, l2=1.0 / (200 * len(allp["a"])))
        if not info["converged"]:
            raise ValueError(f"--truth {votes_path}: the vote fit for '{g}' has no finite maximum (a model never won "
                             f"or never lost); pass a small --l2, e.g. 1e-6")
        seen = torch.zeros(len(models), dtype=torch.bool)
        seen[allp["a"]] = seen[allp["b"]] = True
        truth[g] = (beta[0], seen)
    return truth

# -----------------------------------------------------------------------------
# the jobs: --preds, --checkpoint --prompt, --votes


def run_preds(args):
    gen = torch.Generator().manual_seed(args.seed)
    beta, eta, models, rows, loss = load_preds(args.preds, args.loss)
    head = HEAD_OF_LOSS[loss]
    N, M = beta.shape
    where = Path(args.preds) / "predictions.jsonl"
    groups = {"all": torch.arange(N)}
    if args.by:
        groups.update(groups_of(rows, args.by, where))
    t0 = time.time()
    boards, fits = {}, {}
    for k, (g, members) in enumerate(groups.items()):
        def blocks(s, e, members=members):
            return beta[members[s:e]], sub(eta, members[s:e])
        bb, ee = solve_bootstrap(blocks, len(members), M, head, args.bootstrap, seed=[args.seed, k])
        lo, hi = ci(bb[1:])
        e0 = ee[0].item() if ee is not None else None
        fits[g] = (bb, ee)
        boards[g] = leaderboard_rows(models, bb[0], e0, head, lo, hi, n=len(members))
    secs = time.time() - t0
    meta = {"source": str(args.preds), "loss": loss, "prompts": N, "models": M, "bootstrap": args.bootstrap}
    print_table(boards["all"], f"P2L leaderboard aggregated over {N} prompts of {args.preds} ({loss} head, {M} models, "
                f"95% CI from {args.bootstrap} bootstrap resamples of the prompts; {secs:.1f} s)", args.show)
    outputs = {"leaderboard": (boards["all"], {**meta, "eta": fits["all"][1][0].item() if head != "bt" else None})}
    report = None
    if args.by:
        overall = fits["all"][0][0]
        for g in groups:
            if g != "all":
                print_table(boards[g], f"\n{args.by} = {g}: {len(groups[g])} prompts, Spearman with the overall "
                            f"leaderboard {spearman(fits[g][0][0], overall):.3f}", args.show_group, "--show-group")
        grouped = [{"group": g, **r} for g in groups if g != "all" for r in boards[g]]
        outputs[f"leaderboard_by_{args.by}"] = (grouped, {**meta, "by": args.by})
        report = strengths(args, beta, eta, head, models, rows, groups, boards, fits)
    curve = scale_curve(args, Preds(beta, eta, head, models, rows, loss), groups, gen, fits["all"][0][0]) if args.truth else None
    # every number is computed: only now write, as one set (staged, then renamed in, leaderboard.json last)
    out = Path(args.out)
    with OutputSet(out) as o:
        for name, (rws, m) in outputs.items():
            write_leaderboard(o.stage / name, rws, m)
        if report:
            write_json(o.stage / "strengths.json", report[0])
            atomic_write(o.stage / "strengths.md", report[1])
        if curve:
            write_json(o.stage / "scale_curve.json", curve)
            plot_curve(curve, o.stage / "scale_curve.png")
        write_pictures(o.stage, boards, args.by, f"P2L leaderboard: {N} prompts of {args.preds} ({loss})")
        o.commit(marker="leaderboard.json")
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))} to {out}")


def strengths(args, beta, eta, head, models, rows, groups, boards, fits):
    """For each model, the groups where its rating (relative to the field: every board has mean
    coefficient 0 for bt/rk) or its rank sits furthest above and below its overall standing, and
    the prompts of that group where its expected score vs the field beats its overall one most."""
    # ratings relative to the field's mean on that board: bt/rk boards have mean 0 already (the
    # gauge), grk's are absolute and would otherwise credit every model with an easy group
    rel = {g: {r["model"]: r for r in board} for g, board in boards.items()}
    shift = {g: sum(r["rating"] for r in board) / len(board) - 1000.0 for g, board in boards.items()}
    overall = rel["all"]
    score = standing(beta, eta, head)  # [N, M]
    eta_all = fits["all"][1][:1] if fits["all"][1] is not None else None
    base = standing(fits["all"][0][:1], eta_all, head)[0]
    names = [g for g in groups if g != "all" and len(groups[g]) >= args.min_group]
    per_model, lines = {}, []
    for j, m in enumerate(models):
        deltas = []
        for g in names:
            r, mine = rel[g][m], overall[m]["rating"] - shift["all"]
            d = {"group": g, "n": len(groups[g]), "rating": r["rating"], "delta_rating": round(r["rating"] - shift[g] - mine, 2),
                 "rank": r["rank"], "delta_rank": overall[m]["rank"] - r["rank"]}
            if "rating_lo" in r:  # outside the group's CI: not explained by which prompts were drawn
                d["clear"] = not (r["rating_lo"] - shift[g] <= mine <= r["rating_hi"] - shift[g])
            members = groups[g]
            gain = score[members, j] - base[j]
            for key, order in (("best_prompts", True), ("worst_prompts", False)):
                top = torch.argsort(gain, descending=order)[:args.examples]
                d[key] = [{"prompt": rows[members[k]]["prompt"], "score": round(score[members[k], j].item(), 4)} for k in top]
            deltas.append(d)
        deltas.sort(key=lambda d: -d["delta_rating"])
        per_model[m] = {"rank": overall[m]["rank"], "rating": overall[m]["rating"], "score": round(base[j].item(), 4),
                        "strengths": [d for d in deltas if d["delta_rating"] > 0],
                        "weaknesses": [d for d in deltas[::-1] if d["delta_rating"] < 0]}
    order = sorted(models, key=lambda m: overall[m]["rank"])
    lines += [f"# Strengths and weaknesses by {args.by}", "",
              f"From {args.preds}: each model's rating per {args.by} (groups with >= {args.min_group} prompts) minus its "
              f"overall rating; both on the Arena scale with the field's mean at 1000, so +40 means 40 Elo points "
              f"better relative to the field. * = the overall rating lies outside the group's 95% bootstrap CI.", "",
              f"| rank | model | rating | strongest {args.by} | weakest {args.by} |", "|---:|---|---:|---|---|"]

    def cell(d):
        return "–" if d is None else f"{d['group']} {d['delta_rating']:+.0f} (#{d['rank']}){'*' if d.get('clear') else ''}"
    for m in order:
        pm = per_model[m]
        lines.append(f"| {pm['rank']} | {m} | {pm['rating']:.0f} | {cell((pm['strengths'] or [None])[0])} | "
                     f"{cell((pm['weaknesses'] or [None])[0])} |")
    lines += ["", "## Prompts that show it most", "",
              "Each prompt's expected score for the model vs the field, P(win) + ½ P(tie or both bad), "
              "against its overall score (in the heading).", ""]
    for m in order:
        pm = per_model[m]
        lines.append(f"### {pm['rank']}. {m} (score {pm['score']:.3f})")
        for key, label, pk in (("strengths", "strongest", "best_prompts"), ("weaknesses", "weakest", "worst_prompts")):
            if pm[key]:
                d = pm[key][0]
                lines.append(f"- {label}: **{d['group']}** {d['delta_rating']:+.0f} rating, rank {d['rank']} vs {pm['rank']} overall")
                lines += [f"  - {p['score']:.3f} — {short(p['prompt'])}" for p in d[pk]]
        lines.append("")
    print("\nstrengths and weaknesses (top 5 models; all in strengths.md):")
    for m in order[:5]:
        pm = per_model[m]
        print(f"  {m:<32} best {cell((pm['strengths'] or [None])[0]):<26} worst {cell((pm['weaknesses'] or [None])[0])}")
    return {"by": args.by, "min_group": args.min_group, "models": per_model}, "\n".join(lines) + "\n"


class Preds(NamedTuple):
    """A --preds run's predictions (load_preds) and the head they are of."""
    beta: torch.Tensor         # [N, M] per-prompt coefficients
    eta: torch.Tensor | None   # [N] for rk/grk heads
    head: str                  # HEAD_OF_LOSS[loss]
    models: list
    rows: list                 # predictions.jsonl, one row per prompt
    loss: str


def scale_curve(args, preds, groups, gen, overall):
    """The paper's §3.5: Spearman between the leaderboard aggregated from n random prompts of a
    group and that group's ground-truth leaderboard (the vote fit on --truth), for n = 1..N. For
    reference, the overall aggregate's Spearman with each group's truth: what ignoring the group gets.
    preds: a Preds."""
    beta, eta, head, models, rows, loss = preds
    pg = {prompt_key(r["prompt"]): None for r in rows}
    for g, members in groups.items():
        if g != "all":
            pg.update({prompt_key(rows[i]["prompt"]): g for i in members.tolist()})
    truth = fit_truth(args.truth, models, loss, pg, args.l2)
    curve = {"truth": str(args.truth), "reps": args.curve_reps, "groups": {}}
    print(f"\naggregation-scale curve: Spearman(aggregate of n random prompts, vote fit on {args.truth}), "
          f"mean of {args.curve_reps} draws; 'overall' = the all-prompt board vs this group's truth")
    for g, members in groups.items():
        if g not in truth:
            continue
        t, seen = truth[g]
        ns = curve_sizes(len(members))
        W = torch.zeros(len(ns) * args.curve_reps, len(members), dtype=torch.float64)
        for k, n in enumerate(ns):  # n prompts without replacement, curve_reps times
            for r in range(args.curve_reps):
                W[k * args.curve_reps + r, torch.randperm(len(members), generator=gen)[:n]] = 1.0
        bb, _ = solve_many(beta[members], sub(eta, members), head, W)
        rho = spearman_rows(bb[:, seen], t[seen]).view(len(ns), args.curve_reps).mean(1)
        ref = spearman(overall[seen], t[seen])
        curve["groups"][g] = {"n": ns, "spearman": rho.tolist(), "overall_spearman": ref}
        marks = [n for n in (1, 2, 5, 10, 20, 50, 100, 1000, 10000) if n < len(members)] + [len(members)]
        print(f"  {g:<14} " + "  ".join(f"n={n}: {rho[ns.index(n)]:.3f}" for n in marks) + f"   (overall {ref:.3f})")
    return curve


def plot_curve(curve, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g, c in curve["groups"].items():
        ax.plot(c["n"], c["spearman"], lw=2.5 if g == "all" else 1.2, label=g, color="black" if g == "all" else None)
    ax.set_xscale("log")
    ax.set_xlabel("prompts aggregated (n)")
    ax.set_ylabel("Spearman vs ground-truth leaderboard")
    ax.set_title("Aggregation scale: leaderboard from n prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_leaderboard(rows, path, title):
    """The Arena's picture of a leaderboard: each model's rating (dot) with its 95% CI as a whisker,
    best on top, from leaderboard rows (leaderboard_rows: best first). Returns what was drawn, read
    back from the plot itself: {"models", "rating", "lo", "hi"} top to bottom (lo/hi None without CIs)."""
    plt = _plt()
    M = len(rows)
    fig, ax = plt.subplots(figsize=(7.0, 0.9 + 0.24 * M))
    y = list(range(M))[::-1]  # best on top
    x = [r["rating"] for r in rows]
    has_ci = "rating_lo" in rows[0]
    if has_ci:  # whiskers as segments lo..hi (a percentile CI need not contain the point estimate)
        wh = ax.hlines(y, [r["rating_lo"] for r in rows], [r["rating_hi"] for r in rows], color="#7a9cc6", lw=1.6)
    (dots,) = ax.plot(x, y, "o", ms=4, color="#1f4e8c", zorder=3)
    ax.set_yticks(y, [f"{r['rank']}. {r['model']}" for r in rows], fontsize=8)
    ax.set_ylim(-0.7, M - 0.3)
    ax.set_xlabel("rating (Arena scale: 1000 + 400·β / ln 10)" + ("; whisker: 95% bootstrap CI" if has_ci else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    labels = [t.get_text() for _, t in sorted(zip(ax.get_yticks(), ax.get_yticklabels()), key=lambda p: -p[0])]
    drawn = {"models": [t.split(". ", 1)[1] for t in labels],  # top to bottom
             "rating": [float(v) for _, v in sorted(zip(*(dots.get_data()[::-1])), key=lambda p: -p[0])],
             "lo": None, "hi": None}
    if has_ci:  # the whiskers as drawn: one horizontal segment per model, top to bottom
        seg = sorted(wh.get_segments(), key=lambda s_: -s_[0][1])
        drawn["lo"] = [float(min(s_[0][0], s_[1][0])) for s_ in seg]
        drawn["hi"] = [float(max(s_[0][0], s_[1][0])) for s_ in seg]
    save_png(fig, path)
    return drawn


def plot_rank_heatmap(boards, order, path, title):
    """Each group's rank of each model (groups x models; blank where the group has no votes for a
    model), the columns in the overall order, the rank written in each cell. boards: {group: rows}.
    Returns what was drawn: {"groups", "models", "ranks"} with ranks as nested lists (None: blank)."""
    import numpy as np
    plt = _plt()
    groups = sorted(boards)
    R = np.full((len(groups), len(order)), np.nan)
    col = {m: j for j, m in enumerate(order)}
    for i, g in enumerate(groups):
        for r in boards[g]:
            R[i, col[r["model"]]] = r["rank"]
    fig, ax = plt.subplots(figsize=(1.6 + 0.3 * len(order), 1.4 + 0.32 * len(groups)))
    im = ax.imshow(np.ma.masked_invalid(R), cmap="viridis_r", aspect="auto", vmin=1, vmax=max(2, np.nanmax(R)))
    for i in range(len(groups)):
        for j in range(len(order)):
            if not np.isnan(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if R[i, j] < 0.55 * np.nanmax(R) else "white")  # viridis_r: light at low ranks
    ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="rank")
    data = im.get_array()
    drawn = {"groups": [t.get_text() for t in ax.get_yticklabels()], "models": [t.get_text() for t in ax.get_xticklabels()],
             "ranks": [[None if data.mask[i, j] else int(data[i, j]) for j in range(len(order))]
                       for i in range(len(groups))]}
    save_png(fig, path)
    return drawn


def plot_prompt_vs_marginal(rows, marginal, path, title):
    """One prompt's leaderboard beside the marginal (averaged) one: a row per model in the prompt's
    order (best on top), a filled dot at its rating for this prompt and an open one at its marginal
    rating, joined, the ranks in the label ("#prompt (#marginal)"): the reordering at a glance.
    rows: this prompt's leaderboard rows; marginal: the marginal's rows (same models). Returns what
    was drawn: {"models", "rating", "marginal_rating"} top to bottom."""
    plt = _plt()
    mrow = {r["model"]: r for r in marginal}
    M = len(rows)
    fig, ax = plt.subplots(figsize=(7.5, 1.1 + 0.24 * M))
    y = list(range(M))[::-1]
    x, xm = [r["rating"] for r in rows], [mrow[r["model"]]["rating"] for r in rows]
    ax.hlines(y, [min(p, q) for p, q in zip(x, xm)], [max(p, q) for p, q in zip(x, xm)], color="#bbbbbb", lw=1.2)
    pm = ax.scatter(xm, y, s=22, facecolors="white", edgecolors="#888888", label="marginal leaderboard", zorder=3)
    pp = ax.scatter(x, y, s=24, color="#c0392b", label="this prompt", zorder=4)
    ax.set_yticks(y, [f"{r['model']}  #{r['rank']} (#{mrow[r['model']]['rank']})" for r in rows], fontsize=8)
    ax.set_ylim(-0.7, M - 0.3)
    ax.set_xlabel("rating (Arena scale); label: rank for this prompt (marginal rank)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    top = sorted(range(M), key=lambda k: -pp.get_offsets()[k, 1])  # top to bottom, as drawn
    labels = [t.get_text() for _, t in sorted(zip(ax.get_yticks(), ax.get_yticklabels()), key=lambda p: -p[0])]
    drawn = {"models": [t.split("  #", 1)[0] for t in labels], "rating": [float(pp.get_offsets()[k, 0]) for k in top],
             "marginal_rating": [float(pm.get_offsets()[k, 0]) for k in top]}
    save_png(fig, path)
    return drawn


def run_prompt(args):
    model, tok = load_checkpoint(args.checkpoint, loss=args.loss, max_len=args.max_len)
    loss = model.p2l["loss"]
    head = HEAD_OF_LOSS[loss]
    prompts = [[p] for p in args.prompt]
    if not all(p[0].strip() for p in prompts):
        raise ValueError("--prompt: empty prompt")
    beta, eta = predict(model, encode_for(model, tok, prompts), tok.pad_token_id)
    bb, ee = aggregate(beta, eta, loss)
    rows = leaderboard_rows(model.p2l["model_list"], bb, ee if head != "bt" else None, head)
    what = f'"{short(prompts[0], 100)}"' if len(prompts) == 1 else f"{len(prompts)} prompts"
    print_table(rows, f"P2L leaderboard for {what} ({args.checkpoint}, {loss} head)", args.show)
    if not args.out:
        return
    marginal = marginal_rows(args.checkpoint, model.p2l["model_list"], head)
    if marginal is None:
        print(f"note: {args.checkpoint} has no marginal.json (not trained by train.py): leaderboard.png shows this prompt alone")
    else:
        mrow = {r["model"]: r for r in marginal}
        rows = [{**r, "marginal_rank": mrow[r["model"]]["rank"], "marginal_rating": mrow[r["model"]]["rating"]} for r in rows]
    out = Path(args.out)
    with OutputSet(out) as o:  # one set: staged, then renamed in, leaderboard.json last
        write_leaderboard(o.stage / "leaderboard", rows, {"checkpoint": str(args.checkpoint), "loss": loss,
                                                          "prompts": args.prompt})
        title = f"P2L leaderboard for {what}"
        if marginal is None:
            plot_leaderboard(rows, o.stage / "leaderboard.png", title)
        else:
            plot_prompt_vs_marginal(rows, marginal, o.stage / "leaderboard.png", title + " vs the marginal leaderboard")
        o.commit(marker="leaderboard.json")
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))} to {out}")


def marginal_rows(checkpoint, models, head):
    """The leaderboard rows of a checkpoint's marginal.json (the averaged leaderboard its head started
    from), for these models; None when it has none or it covers other models."""
    f = Path(checkpoint) / "marginal.json"
    if not f.exists():
        return None
    mj = read_json_object(f, "marginal leaderboard")
    if sorted(mj.get("model_list") or []) != sorted(models) or len(mj.get("beta") or []) != len(mj["model_list"]):
        return None
    beta = dict(zip(mj["model_list"], mj["beta"]))
    eta = mj.get("eta") if head != "bt" else None
    return leaderboard_rows(models, [beta[m] for m in models], eta, head)


def write_pictures(stage, boards, by, title):
    """leaderboard.png (ratings with CI whiskers) and, with --by, leaderboard_by_<by>.png (each group's
    rank of each model), from the same rows the JSON holds."""
    plot_leaderboard(boards["all"], stage / "leaderboard.png", title)
    if by:
        groups = {g: rows for g, rows in boards.items() if g != "all"}
        plot_rank_heatmap(groups, [r["model"] for r in boards["all"]], stage / f"leaderboard_by_{by}.png",
                          f"rank per {by} (columns: the overall order)")


def run_votes(args):
    gen = torch.Generator().manual_seed(args.seed)
    loss = args.loss or "bt-tie"
    battles = [b for path in args.votes for b in read_battles(path)]
    sets = {"all": battles}
    if args.by:
        for b in battles:
            if b.get(args.by) is None:
                raise ValueError(f"{b.get('where', b['id'])}: no '{args.by}' field to group by (--by {args.by})")
            sets.setdefault(str(b[args.by]), []).append(b)
    boards, l2, notes = {}, {}, []
    src = ", ".join(map(str, args.votes))
    for g in ["all"] + sorted(s for s in sets if s != "all"):
        name = f"'{g}'" + (f" (--by {args.by})" if g != "all" else "")
        models = sorted({m for b in sets[g] for m in (b["model_a"], b["model_b"])})  # only models with votes here
        _, pairs, _ = group_by_prompt(sets[g], {m: i for i, m in enumerate(models)}, loss)
        allp = cat_pairs(pairs)
        V = len(allp["a"])
        if not (allp["w"] > 0).any():
            raise ValueError(f"--votes {src}: {name} has no vote to fit under --loss {loss}: "
                             + ("all its votes are ties, which plain bt drops; --loss bt-tie counts a tie as half a win"
                                if loss == "bt" else "every vote has weight 0"))
        W = bootstrap_weights(V, args.bootstrap, gen)  # votes resampled, as Arena's own CIs do

        def fit(ridge, names=None):
            try:
                return fit_votes(allp, len(models), loss, l2=ridge, weights=W, names=names)
            except ValueError as e:  # e.g. a resample that drew only ties under plain bt
                raise ValueError(f"--votes {src}: {name}: {e}") from None
        bb, ee, info = fit(args.l2 or 0.0, models)
        why = [w for w in info["separated"] if w]
        if why and args.l2 == 0:
            raise ValueError(f"--votes: the {loss} maximum-likelihood fit for {name} does not exist"
                             f"{' (in ' + str(len(why)) + ' of ' + str(1 + args.bootstrap) + ' vote resamples)' if info['separated'][0] is None else ''}: "
                             f"{why[0]}. Drop --l2 0 for a small ridge, or pass --l2 > 0")
        if why:  # the default: a weak Gaussian prior, sd 10 on every coefficient and on eta (l2 per vote = 1 / (2·10²·V))
            l2[g] = 1.0 / (200.0 * V)
            notes.append(f"'{g}': no maximum-likelihood fit ({why[0]}{'' if info['separated'][0] else ', in a resample'}); "
                         f"fitted with ridge l2 = {l2[g]:.3g} (a N(0, 10²) prior on each coefficient"
                         f"{' and on eta' if HEAD_OF_LOSS[loss] != 'bt' else ''})")
            bb, ee, info = fit(l2[g])
        if not info["converged"]:  # with a ridge every fit exists: what is left is float64 running out
            bad = int((~info["converged_rows"]).sum())
            raise ValueError(f"--votes: the {loss} fit for {name} did not converge in {bad} of {1 + args.bootstrap} "
                             f"vote resamples (gradient norm up to {info['grad_norm'].max().item():.1e}): the Newton "
                             f"solve cannot pin its coefficients down in float64 (models hundreds of logits apart); "
                             f"a larger --l2 holds them closer")
        lo, hi = ci(bb[1:])
        boards[g] = leaderboard_rows(models, bb[0], ee[0].item() if ee is not None else None, HEAD_OF_LOSS[loss],
                                       lo, hi, n=V)
    print_table(boards["all"], f"{loss} maximum-likelihood leaderboard from {len(battles)} votes "
                f"({', '.join(map(str, args.votes))}; 95% CI from {args.bootstrap} vote resamples)", args.show)
    check = official_check(args, boards, sets) if args.official else None
    for n in notes:
        print(f"note: {n}")
    meta = {"source": [str(p) for p in args.votes], "loss": loss, "votes": len(battles), "bootstrap": args.bootstrap,
            "l2": args.l2 or 0.0, "l2_by_group": l2, "notes": notes}
    out = Path(args.out)
    with OutputSet(out) as o:  # one set: staged, then renamed in, leaderboard.json last
        write_leaderboard(o.stage / "leaderboard", boards["all"], meta)
        if args.by:
            write_leaderboard(o.stage / f"leaderboard_by_{args.by}", [{"group": g, **r} for g in sorted(boards) if g != "all"
                                                                          for r in boards[g]], {**meta, "by": args.by})
        if check:
            write_json(o.stage / "official_check.json", check)
        write_pictures(o.stage, boards, args.by, f"{loss} leaderboard from {len(battles)} votes")
        o.commit(marker="leaderboard.json")
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))} to {out}")


def official_check(args, boards, sets):
    """Spearman between our vote fits and the official Arena category leaderboards (style control
    off), over the models on both. Each vote category goes to the board of the same kind of prompt
    (ARENA_BOARD) or the english board; the category board and the english board are both shown."""
    import csv
    official = {}
    with open(args.official, newline="", encoding="utf-8") as f:
        for lineno, r in enumerate(csv.DictReader(f), 2):
            try:
                if r["style_control"] == "False":
                    official.setdefault(r["category"], {})[r["model_name"]] = float(r["rating"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{args.official}:{lineno}: bad leaderboard row ({e})") from None
    if ARENA_DEFAULT_BOARD not in official:
        raise ValueError(f"--official {args.official}: no '{ARENA_DEFAULT_BOARD}' board with style_control False")
    print(f"\ncheck against the official Arena category leaderboards ({args.official}, style control off)")
    print(f"  {'votes':<28} {'n':>5} {'board':<17} {'models':>6}  {'Spearman':>8}  {'vs english':>10}")
    result = []
    for g in ["all"] + sorted(s for s in boards if s != "all"):
        board = ARENA_BOARD[g] if ARENA_BOARD.get(g) in official else ARENA_DEFAULT_BOARD
        ours = {r["model"]: r["coefficient"] for r in boards[g]}

        def rho(name):
            common = sorted(set(ours) & set(official[name]))
            return spearman([ours[m] for m in common], [official[name][m] for m in common]), len(common)
        r, k = rho(board)
        r_en, _ = rho(ARENA_DEFAULT_BOARD)
        result.append({"votes": g, "n_votes": len(sets[g]), "board": board, "models": k, "spearman": round(r, 4),
                       "spearman_vs_english": round(r_en, 4)})
        print(f"  {g:<28} {len(sets[g]):>5} {board:<17} {k:>6}  {r:8.3f}  {r_en:10.3f}")
    return {"official": str(args.official), "style_control": False, "mapping": {**ARENA_BOARD, "*": ARENA_DEFAULT_BOARD},
            "checks": result}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preds", help="a predictions dir (evaluate.py's predictions.safetensors + .jsonl): leaderboards for its prompts")
    src.add_argument("--checkpoint", help="a P2L checkpoint: with --prompt, the leaderboard of that prompt (or set of prompts)")
    src.add_argument("--votes", nargs="+", help="battle files (JSONL(.gz), or LMArena's parquet): maximum-likelihood leaderboards "
                     "from the votes themselves, no P2L")
    p.add_argument("--prompt", action="append", help="with --checkpoint; repeat it to aggregate several prompts into one board")
    p.add_argument("--out", help="output dir for the JSON/CSV/markdown/PNG files (required with --preds and --votes): "
                   "leaderboard.png (ratings, CI whiskers), with --by leaderboard_by_<key>.png (rank per group); with "
                   "--prompt, leaderboard.png shows the prompt's ratings beside the marginal leaderboard's")
    add_checkpoint_options(p, "; --preds: needed only for rk/grk predictions without evaluate.py's metrics.json; "
                             "--votes: default bt-tie, Arena's own convention (a tie is half a win)")
    p.add_argument("--by", help="also a leaderboard per value of this field (e.g. category); with --preds, the strengths report")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (prompts, or votes with --votes) for 95%% CIs; 0 = none")
    p.add_argument("--truth", help="--preds: held-out votes on the same prompts; their fits are the ground truth of the aggregation-scale curve")
    p.add_argument("--curve-reps", type=int, default=10, help="random draws of n prompts per point of the curve (its mean smooths the draw)")
    p.add_argument("--min-group", type=int, default=10, help="strengths: ignore groups with fewer prompts, too noisy to call a strength")
    p.add_argument("--examples", type=int, default=3, help="strengths: prompts shown per strength/weakness")
    p.add_argument("--official", help="--votes: official leaderboards CSV (model_name, rating, category, style_control) to check the fits against")
    p.add_argument("--l2", type=float, help="ridge on vote fits (mean-NLL scale). Default: the pure MLE, and where it does not "
                   "exist (a model never lost or never won) a weak N(0, 10^2) prior on each coefficient, stated in the output; "
                   "0 = refuse there instead, naming the models")
    p.add_argument("--show", type=int, default=20, help="leaderboard rows to print")
    p.add_argument("--show-group", type=int, default=5, help="rows to print of each --by group's leaderboard (all are in the CSV)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and curve draws are seeded: reruns give identical files")
    args = p.parse_args(argv)
    if (args.preds or args.votes) and not args.out:
        p.error("--out is required with --preds and --votes")
    if args.checkpoint and not args.prompt:
        p.error("--checkpoint needs --prompt")
    if args.prompt and not args.checkpoint:
        p.error("--prompt needs --checkpoint")
    if args.bootstrap < 0 or args.curve_reps < 1 or (args.l2 or 0) < 0:
        p.error("--bootstrap and --l2 must be >= 0, --curve-reps >= 1")
    if args.truth and not args.preds:
        p.error("--truth goes with --preds")
    if args.official and not args.votes:
        p.error("--official goes with --votes")
    torch.manual_seed(args.seed)
    try:
        if args.out:  # an --out that cannot be a directory fails before any work; held locked to the end
            check_out(args.out)
        if args.preds:
            run_preds(args)
        elif args.checkpoint:
            run_prompt(args)
        else:
            run_votes(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"aggregate.py: error: {e}")


if __name__ == "__main__":
    main()
