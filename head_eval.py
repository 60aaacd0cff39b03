"""Why the head does not reorder models: P2L's per-prompt spread of β against the in-sample limit.

On the labelled votes of --data (default: all 805 AlpacaEval prompts) each prompt's own votes are
fitted, per prompt, under four models of β(z) (BT with the soft labels, float64 Newton):
  marginal  β̄: one leaderboard for every prompt (the head's starting point; the project's
            fit_marginal on all the votes)
  scale     β_z = (1 + u_z)·β̄ (+ a constant): one number per prompt, how decisive the prompt is
  shift     scale + t_z on the prompt's common opponent (the model in every vote of the prompt;
            AlpacaEval: gpt4_1106_preview): also how hard the prompt is for everybody against it
  rank k    shift + k per-prompt weights on the top k directions (SVD) of the full refit's
            deviations: a reordering that follows directions other prompts share (learnable)
  full      β_z = β̄ + δ_z with a ridge λ/2·|δ_z|² toward β̄: every model its own coefficient
A per-prompt fit on the prompt's own votes is what a P2L that read the prompt perfectly could at
most reach (up to label noise): its NLL gain over the marginal bounds what reading the prompt can
buy. The floor of any predictor is the labels' own entropy (a soft label p scored against p).
Held out: each prompt's votes are split in two random halves, each half's fit scores the other.
That validates what a prompt's votes share (a scale, a shift, weights on shared directions, whose
directions are found on the fitting half's votes only). With one vote per (prompt, model), as in
AlpacaEval, a model's own δ is seen by its one vote only, so the full refit's in-sample gain is fit
to label noise as much as to signal, and its held-out gain is only the part shared by the prompt's
votes. Each fit's ridge is picked on the held-out halves (from 1e-6 and --lams); the full refit's
in-sample gain is reported at every ridge.

Spread of a β matrix [prompts, models] (each row centred: BT ignores a per-prompt constant): sd
across prompts per model, mean over models; the share of prompts whose top model is not the top of
the mean row (the matrix's own marginal); the mean Spearman ρ of a row with the mean row; and of
the rows minus the mean row, the share of variance along the mean row (a pure scale puts all of it
there), the rank-1 share (SVD) and that direction's |cos| with the mean row. With a common opponent
shared by every prompt the spread is also given among the other models (the routing candidates),
where a shift on the opponent does not show. --preds (P2L's out-of-fold or val predictions for those
prompts, matched by text) adds P2L's own spread and NLL on the same votes.

    python head_eval.py --out out/head-eval                                   # CPU: ~1 min, votes only
    python head_eval.py --preds out/cv-default --out out/head-eval            # + P2L's out-of-fold β
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aggregate import fit_marginal
from common import (
    A, B, check_out, load_predictions, OutputSet, prompt_key, read_battles, save_predictions, write_json,
)


def read_votes(paths, model_list=None):
    """The votes of the files grouped by prompt, as padded float64 arrays [N, V]: a, b (model indices),
    p (the label: soft p_a, else 1 / 0 / ½), w (weight; 0 pads); the prompt keys; the model list (the
    predictions' when given, else the sorted models of the votes) and the votes skipped (unknown model)."""
    battles = [bt for path in paths for bt in read_battles(path)]
    models = model_list or sorted({m for bt in battles for m in (bt["model_a"], bt["model_b"])})
    index = {m: i for i, m in enumerate(models)}
    groups, skipped = {}, 0
    for bt in battles:
        a, b = index.get(bt["model_a"]), index.get(bt["model_b"])
        if a is None or b is None or bt["weight"] == 0:
            skipped += 1
            continue
        p = bt["p_a"] if bt["p_a"] is not None else {A: 1.0, B: 0.0}.get(bt["outcome"], 0.5)
        groups.setdefault(prompt_key(bt["prompt"]), []).append((a, b, p, bt["weight"]))
    if not groups:
        raise ValueError(f"{' '.join(map(str, paths))}: no vote between models of the model list")
    keys = list(groups)
    V = max(len(g) for g in groups.values())
    arr = np.zeros((4, len(keys), V))
    for z, key in enumerate(keys):
        arr[:, z, :len(groups[key])] = np.array(groups[key]).T
    a, b = torch.from_numpy(arr[0]).long(), torch.from_numpy(arr[1]).long()
    return {"a": a, "b": b, "p": torch.from_numpy(arr[2]), "w": torch.from_numpy(arr[3]), "keys": keys,
            "models": models, "skipped": skipped}


def common_opponent(v):
    """Each prompt's common opponent (the one model in all its votes), -1 where there is not exactly one."""
    out = []
    for a, b, w in zip(v["a"].tolist(), v["b"].tolist(), v["w"].tolist()):
        sets = [{x, y} for x, y, ww in zip(a, b, w) if ww > 0]
        common = set.intersection(*sets)
        out.append(common.pop() if len(common) == 1 else -1)
    return torch.tensor(out)


def soft_ce(d, p):
    """−p·log σ(d) − (1 − p)·log σ(−d), in log space."""
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))


def fit_prompts(X, O, p, w, lam, max_iter=100, tol=1e-10):
    """θ_z = argmin Σ_v w·CE(p, σ(O + X·θ_z)) + λ/2·|θ_z|² for every prompt z at once (X [N, V, K]):
    Newton with per-prompt step halving (convex; λ > 0 makes it strictly so). Returns θ [N, K]."""
    N, V, K = X.shape
    eye = torch.eye(K, dtype=torch.float64)
    th = torch.zeros(N, K, dtype=torch.float64)

    def objective(t):
        return (w * soft_ce(O + (X @ t[:, :, None])[..., 0], p)).sum(1) + 0.5 * lam * (t * t).sum(1)
    f = objective(th)
    for _ in range(max_iter):
        s = torch.sigmoid(O + (X @ th[:, :, None])[..., 0])
        g = (X * (w * (s - p))[..., None]).sum(1) + lam * th
        H = (X * (w * s * (1 - s))[..., None]).transpose(1, 2) @ X + lam * eye
        step = torch.linalg.solve(H, g[:, :, None])[..., 0]
        t = torch.ones(N, 1, dtype=torch.float64)
        for _ in range(40):  # halve the step where it does not decrease the objective
            new = objective(th - t * step)
            bad = new > f + 1e-12 * (1 + f.abs())
            if not bad.any():
                break
            t[bad] /= 2
        th, f = th - t * step, torch.minimum(new, f)
        if (t * step).abs().max() <= tol:
            return th
    raise RuntimeError(f"per-prompt fit did not converge in {max_iter} Newton steps (λ = {lam:g})")


def designs(v, bbar, opp):
    """(X, O) per model of β(z): the offset O = β̄_a − β̄_b, and X's columns the per-prompt parameters."""
    a, b, M = v["a"], v["b"], len(bbar)
    O = bbar[a] - bbar[b]
    h = (b == opp[:, None]).double() - (a == opp[:, None]).double()  # +1 when the opponent is b: Δ rises by t
    full = F.one_hot(a, M).double() - F.one_hot(b, M).double()
    return {"scale": (O[..., None], O), "shift": (torch.stack([O, h], -1), O), "full": (full, O)}


def rank_design(v, X, V):
    """scale + shift + k per-prompt weights on shared model directions V [M, k]: Δ gains Σ_j a_zj (V_aj − V_bj)."""
    return torch.cat([X["shift"][0], V[v["a"]] - V[v["b"]]], -1), X["shift"][1]


def directions(D, k):
    """The top k directions [M, k] (SVD) of per-prompt deviations D [N, M], rows centred, minus the mean row."""
    R = D - D.mean(1, keepdim=True)
    return torch.linalg.svd(R - R.mean(0), full_matrices=False)[2][:k].T


def betas(th, bbar, opp, V=None, full=False):
    """The fitted coefficient matrix [N, M]: β̄ + δ (full), else (1 + u)·β̄ [+ V·a] [− t on the opponent]."""
    if full:
        return bbar + th
    B = bbar[None] * (1 + th[:, :1])
    if V is not None:
        B = B + th[:, 2:] @ V.T
    if th.shape[1] > 1:
        has = opp >= 0
        B[has, opp[has]] -= th[has, 1]
    return B


def nll(v, d, mask=None):
    """Σ w·CE and Σ w over the votes (mask: which votes count), d the predicted Δ [N, V]."""
    w = v["w"] if mask is None else v["w"] * mask
    return float((w * soft_ce(d, v["p"])).sum()), float(w.sum())


def delta(X, O, th):
    return O + (X @ th[:, :, None])[..., 0]


def held_out(v, design, lams, halves):
    """For each ridge λ: the held-out NLL sum (each half's fit scores the other half) and the two fits.
    design(i) gives (X, O) for half i (a design may depend on what that half's votes saw)."""
    out = {}
    for lam in lams:
        total, ths = 0.0, []
        for i, m in enumerate((halves, 1 - halves)):
            X, O = design(i)
            th = fit_prompts(X, O, v["p"], v["w"] * m, lam)
            total += nll(v, delta(X, O, th), 1 - m)[0]
            ths.append(th)
        out[lam] = (total, ths)
    return out


def fit_row(v, X, O, lam, held, W, marg):
    """One fit's line (in-sample NLL at λ, held-out NLL, their gains vs the marginal) and its θ."""
    th = fit_prompts(X, O, v["p"], v["w"], lam)
    ins = nll(v, delta(X, O, th))[0] / W
    return {"lam": lam, "params_per_prompt": X.shape[-1], "in_sample_nll": ins, "held_out_nll": held / W,
            "in_sample_gain_vs_marginal": ins / marg - 1, "held_out_gain_vs_marginal": held / W / marg - 1}, th


def spread(Bm, keep):
    """Spread statistics of a β matrix [N, M] over the models in keep (module docstring)."""
    Bc = Bm[:, keep].double()
    Bc = Bc - Bc.mean(1, keepdim=True)
    mean = Bc.mean(0)
    R = Bc - mean
    total = float((R ** 2).sum())
    u = mean / mean.norm()
    s, vt = (torch.linalg.svd(R, full_matrices=False)[1:]) if total > 0 else (None, None)
    rank = lambda x: x.argsort(-1).argsort(-1).double()
    rr, rm = rank(Bc), rank(mean)
    rr, rm = rr - rr.mean(1, keepdim=True), rm - rm.mean()
    rho = (rr @ rm) / (rr.norm(dim=1) * rm.norm())
    return {"sd_across_prompts": float(Bc.std(0).mean()), "sd_across_models": float(mean.std()),
            "top_differs_share": float((Bc.argmax(1) != mean.argmax()).double().mean()),
            "mean_spearman_vs_mean_row": float(rho.mean()),
            "scale_share": float(((R @ u) ** 2).sum()) / total if total > 0 else None,
            "rank1_share": float(s[0] ** 2) / total if total > 0 else None,
            "rank1_cos_with_mean_row": float((vt[0] @ u).abs()) if total > 0 else None}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["data/alpaca_eval/train.jsonl.gz", "data/alpaca_eval/val.jsonl.gz"],
                   help="labelled battle files: every prompt's votes are fitted on their own (default: all 805 AlpacaEval prompts)")
    p.add_argument("--preds", metavar="DIR", help="P2L predictions (cv.py's out-of-fold, or evaluate.py's on val) for "
                   "prompts of --data: their spread and NLL beside the in-sample fits; only the prompts they cover are used")
    p.add_argument("--lams", default="0.03,0.1,0.3,1,3,10", help="ridges λ of the full refit toward β̄ (the held-out "
                   "split picks one; in-sample gains are reported at each)")
    p.add_argument("--ranks", default="1,2,4,8", help="k of the rank-k fits (scale + shift + k shared model directions "
                   "per prompt): does a prompt's reordering follow a few directions that other prompts share?")
    p.add_argument("--save", action="append", default=[], metavar="FIT=DIR", help="write a fit's per-prompt β as "
                   "predictions (route.py --preds DIR): routing on an in-sample fit bounds what routing on the prompt can "
                   "buy (e.g. full=out/he-full, shift=out/he-shift; FIT: scale, shift, full, 'rank K')")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out halves")
    p.add_argument("--out", default="out/head-eval", help="head_eval.json goes here")
    args = p.parse_args(argv)
    try:
        args.lams = [float(x) for x in args.lams.split(",")]
    except ValueError:
        p.error(f"--lams must be numbers separated by commas, got {args.lams!r}")
    try:
        args.ranks = [int(x) for x in args.ranks.split(",") if x]
    except ValueError:
        p.error(f"--ranks must be integers separated by commas, got {args.ranks!r}")
    if not all(x > 0 for x in args.ranks):
        p.error("--ranks must be > 0")
    if not all("=" in x for x in args.save):
        p.error(f"--save takes FIT=DIR, got {args.save}")
    args.save = [tuple(x.split("=", 1)) for x in args.save]
    fits_known = {"scale", "shift", "full"} | {f"rank {k}" for k in args.ranks}
    if any(f not in fits_known for f, _ in args.save):
        p.error(f"--save: FIT must be one of {', '.join(sorted(fits_known))}")
    if not all(x > 0 for x in args.lams):
        p.error("--lams must be > 0 (λ = 0: a model with one vote per prompt fits its label exactly; that bound is the label entropy, reported)")
    return args


def read_inputs(args):
    """Votes (restricted to the prompts --preds covers) and P2L's β for them [N, M] or None."""
    for _, d in args.save:  # a bad --save dir fails now, not after the fits
        check_out(d, "--save")
    preds = load_predictions(args.preds) if args.preds else None
    v = read_votes(args.data, preds[2] if preds else None)
    if preds is None:
        return v, None
    row = {prompt_key(r["prompt"] if isinstance(r["prompt"], list) else [r["prompt"]]): i for i, r in enumerate(preds[3])}
    z = [i for i, key in enumerate(v["keys"]) if key in row]
    if not z:
        raise ValueError(f"--preds {args.preds}: none of its prompts is in --data")
    v = {k: (x[z] if torch.is_tensor(x) else x) for k, x in v.items()} | {"keys": [v["keys"][i] for i in z]}
    return v, preds[0][[row[key] for key in v["keys"]]].double()


def fits(args, v, bbar, opp, W, marg):
    """Every per-prompt fit, its ridge picked by the held-out halves: the table's rows and β matrices."""
    halves = (torch.rand(v["w"].shape, generator=torch.Generator().manual_seed(args.seed)) < 0.5).double()
    X, grid = designs(v, bbar, opp), [1e-6] + args.lams
    rows, mats = {}, {}
    full = held_out(v, lambda i: X["full"], args.lams, halves)
    lam_f = min(full, key=lambda lam: full[lam][0])
    rows["full_by_lam"] = [fit_row(v, *X["full"], lam, full[lam][0], W, marg)[0] for lam in args.lams]
    rows["full"], th = fit_row(v, *X["full"], lam_f, full[lam_f][0], W, marg)
    mats["full"] = betas(th, bbar, opp, full=True)
    k_max = max(args.ranks, default=0)
    half_dirs = [directions(t, k_max) for t in full[lam_f][1]]  # each half's directions from its own votes only
    all_dirs = directions(th, k_max)
    todo = [(n, lambda i, n=n: X[n], None) for n in ("scale", "shift")]
    todo += [(f"rank {k}", lambda i, k=k: rank_design(v, X, half_dirs[i][:, :k]), all_dirs[:, :k]) for k in args.ranks]
    for name, design, V in todo:
        ho = held_out(v, design, grid, halves)
        lam = min(ho, key=lambda lam: ho[lam][0])
        rows[name], th = fit_row(v, *(X[name] if V is None else rank_design(v, X, V)), lam, ho[lam][0], W, marg)
        mats[name] = betas(th, bbar, opp, V)
    return rows, mats


def analyse(args, v, p2l):
    """Everything head_eval.json holds (module docstring)."""
    M = len(v["models"])
    on = v["w"] > 0
    pairs = {"a": v["a"][on], "b": v["b"][on], "y": torch.zeros(int(on.sum()), dtype=torch.long),
             "p": v["p"][on].float(), "w": v["w"][on].float()}
    bbar = fit_marginal([pairs], M, "bt")[0].double()
    opp = common_opponent(v)
    marg, W = nll(v, bbar[v["a"]] - bbar[v["b"]])
    entropy = nll(v, torch.logit(v["p"].clamp(1e-12, 1 - 1e-12)))[0]  # the labels' own entropy: no predictor goes below
    rows = {"marginal": {"params_per_prompt": 0, "in_sample_nll": marg / W, "held_out_nll": marg / W,
                         "in_sample_gain_vs_marginal": 0.0, "held_out_gain_vs_marginal": 0.0},
            "label_entropy": {"in_sample_nll": entropy / W, "in_sample_gain_vs_marginal": entropy / marg - 1}}
    more, mats = fits(args, v, bbar, opp, W, marg / W)
    rows |= more
    if p2l is not None:
        rows["p2l"] = {"nll": nll(v, (p2l.gather(1, v["a"]) - p2l.gather(1, v["b"])))[0] / W}
        rows["p2l"]["gain_vs_marginal"] = rows["p2l"]["nll"] / (marg / W) - 1
        mats["p2l"] = p2l
    shared = int(opp[0]) if (opp == opp[0]).all() and opp[0] >= 0 else None
    keeps = {"all models": list(range(M))} | ({} if shared is None else
                                              {"without the common opponent": [m for m in range(M) if m != shared]})
    args.mats = mats  # for --save
    return {"prompts": len(v["keys"]), "votes": int(on.sum()), "votes_skipped": v["skipped"], "models": M,
            "common_opponent": v["models"][shared] if shared is not None else None, "data": args.data, "preds": args.preds,
            "fits": rows, "spread": {k: {name: spread(Bm, keep) for name, Bm in mats.items()} for k, keep in keeps.items()},
            "note": "NLL per vote (weighted soft-label CE); in-sample: each prompt fitted on its own votes (an upper bound on "
                    "what reading the prompt can buy, up to label noise); held-out: fitted on half of a prompt's votes, "
                    "scored on the other half, the ridge lam picked on it; rank k: scale + shift + k weights per prompt on "
                    "the top k directions of the full refit's deviations (found on the fitting half's votes only); p2l: "
                    "the given predictions scored against the in-sample marginal of all votes"}


def report(res):
    print(f"{res['prompts']} prompts, {res['votes']} votes, {res['models']} models; NLL per vote (gain vs the marginal)")
    print(f"{'fit':16s} {'params':>6s} {'ridge':>6s} {'in-sample':>18s} {'held-out (halves)':>20s}")
    f = res["fits"]
    line = lambda name, r: print(
        f"{name:16s} {str(r.get('params_per_prompt', '')):>6s} {r['lam'] if 'lam' in r else '':>6} "
        f"{r['in_sample_nll']:9.4f} ({100 * r.get('in_sample_gain_vs_marginal', 0):+6.2f}%) "
        + (f"{r['held_out_nll']:9.4f} ({100 * r['held_out_gain_vs_marginal']:+6.2f}%)" if "held_out_nll" in r else ""))
    for name, r in f.items():
        if name == "full_by_lam":
            continue
        if name == "p2l":
            print(f"{'P2L (given)':16s} {'':6s} {'':6s} {r['nll']:9.4f} ({100 * r['gain_vs_marginal']:+6.2f}%)  out of sample")
        else:
            line(name, r)
    for r in f["full_by_lam"]:
        line(f"  full λ={r['lam']:g}", r)
    for k, table in res["spread"].items():
        print(f"\nspread of β over prompts ({k}; rows centred)")
        print(f"{'β(z) from':16s} {'sd/prompt':>9s} {'sd/model':>8s} {'top≠mean':>8s} {'ρ mean':>7s} {'scale':>6s} "
              f"{'rank-1':>6s} {'|cos|':>6s}")
        for name, s in table.items():
            g = lambda x: f"{x:6.3f}" if x is not None else "     -"
            print(f"{name:16s} {s['sd_across_prompts']:9.4f} {s['sd_across_models']:8.4f} {s['top_differs_share']:8.3f} "
                  f"{s['mean_spearman_vs_mean_row']:7.3f} {g(s['scale_share'])} {g(s['rank1_share'])} {g(s['rank1_cos_with_mean_row'])}")


def main(argv=None):
    args = parse_args(argv)
    try:
        v, p2l = read_inputs(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    res = analyse(args, v, p2l)
    with OutputSet(args.out) as o:
        write_json(o.stage / "head_eval.json", res)
        o.commit(marker="head_eval.json")
    for fit, d in args.save:
        with OutputSet(d) as o:
            save_predictions(o.stage, args.mats[fit].float(), None, v["models"],
                             [{"prompt": json.loads(key), "fit": fit} for key in v["keys"]], loss="bt")
            o.commit(marker="predictions.safetensors")
    report(res)
    print(f"-> {Path(args.out) / 'head_eval.json'}")


if __name__ == "__main__":
    main()
