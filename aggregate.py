"""Leaderboards from P2L: for any set of prompts (docs/design.md §2), per group with bootstrap CIs, each
model's strengths and weaknesses, the aggregation-scale curve, and maximum-likelihood
leaderboards from raw votes; as JSON/CSV and as pictures (leaderboard.png: ratings with CI whiskers;
leaderboard_by_<key>.png: each group's ranks; one prompt's ratings beside the marginal leaderboard's).
Everything is the same exact Newton solve (common.fit_pairs): the coefficients whose pairwise outcome
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
from scipy.stats import rankdata, spearmanr

from common import (
    A, add_checkpoint_options, all_pairs, atomic_write, BOTHBAD, cat_pairs, check_out, encode_for, fit_pairs,
    fit_votes, group_by_prompt, HEAD_OF_LOSS, load_checkpoint, load_predictions, LOSSES, map_blocks, N_OUTCOMES,
    outcome_logprobs, OutputSet, pair_sweep, phi_t, predict, predictions_meta, prompt_key, rating, read_battles,
    read_json_object, row_blocks, save_png, TIE, torch_threads, wide_rows, write_json,
)

# The arena-catalog votes carry 10 broad topic categories; the official boards (leaderboards.csv)
# are task/language slices. Three topics have a board that selects the same kind of prompt; the
# others have none, and since every vote is from recent *English* battles they, like all votes
# together, are compared with the english board.
ARENA_BOARD = {"Tech Programming": "coding", "Math Puzzles": "math", "Creative Arts": "creative_writing"}
ARENA_DEFAULT_BOARD = "english"

# -----------------------------------------------------------------------------
# the leaderboard of a set of prompts (docs/design.md §2): the mean pairwise outcome matrix over prompts,
# then the vote-fit solver (common.fit_pairs) on it. evaluate.py, livebench_eval.py and serve.py import
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
