"""K-fold cross-validation by prompt: every prompt is scored by a P2L that never saw it.

The prompts of the --data files (default: all 805 AlpacaEval prompts, train + val) are shuffled
with a fixed seed and dealt into K folds. For each fold, train.py runs through its command line
on the other K−1 folds (the arguments after `--` are passed to it unchanged) with the fold as its
--val; then the fold's checkpoint predicts every held-out prompt, and each prompt's votes are
scored under that P2L and under the marginal leaderboard fitted on the same training part (the
checkpoint's marginal.json). The result: the mean NLL per vote over ALL prompts, P2L minus
marginal, with a paired bootstrap CI over prompts, overall and per source (data/routellm rows name
theirs; other files count by folder). Each held-out prompt's coefficients are written as
out-of-fold predictions (predictions.safetensors + .jsonl): route.py --routellm routes on them.

    python cv.py --folds 5 --only 0 --out out/cv-tiny -- --max-steps 2     # CPU, ~2 min: one fold, 2 steps
    python cv.py --folds 5 --out out/cv-default -- --epochs 2 --batch-size 16   # the default recipe, 5 folds
    python cv.py --compare out/cv-default out/cv-other                       # recipe B vs A, paired over prompts
    python cv.py --scaling out/cv-f0.125 out/cv-f0.25 out/cv-default --out out/scaling   # NLL vs data size (make scaling)

Every head is scored on the same labels with the same NLL: a judge's soft label p_a (or 1 / 0 /
½ for a hard win / loss / tie) as the probability that a is preferred, under the head's
P(a preferred) = P(a) + ½·(P(tie) + P(both bad)) (common.judge_logprobs; σ(Δ) for bt, so for bt
this is exactly the training NLL). A fold whose checkpoint already holds metrics.json from the
same train.py arguments and the same split of the same data (fold<k>/fold.json) is not trained
again (an interrupted CV picks up where it stopped); --out is locked against a second cv.py run.
"""
import argparse
import gzip
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evaluate import paired_bootstrap
from common import (
    atomic_write, cat_pairs, check_out, encode_for, group_by_prompt, HEAD_OF_LOSS, judge_logprobs, load_checkpoint,
    lock_dir, parse_turns, predict, prompt_key, read_battles, read_jsonl, read_marginal, save_png, save_predictions,
    sha256_file, write_json,
)


def read_rows(paths, max_prompts=0, seed=0):
    """The raw battle rows of all files as (where, row), and each prompt's source (for per-source
    NLL): the row's own "source" (data/routellm: mmlu, gsm8k, mt_bench), else its file's folder
    (alpaca_eval). A prompt in two sources counts for the first. max_prompts > 0: from a file
    with more distinct prompts, a seeded random max_prompts of them, with all their votes."""
    rows, source_of = [], {}
    for path in paths:
        part = list(read_jsonl(path))
        keys = [prompt_key(parse_turns(r, where)) for where, r in part]
        distinct = sorted(set(keys))
        if 0 < max_prompts < len(distinct):
            random.Random(seed).shuffle(distinct)
            kept = set(distinct[:max_prompts])
            part, keys = zip(*[(x, key) for x, key in zip(part, keys) if key in kept])
        for (where, r), key in zip(part, keys):
            rows.append((where, r))
            source_of.setdefault(key, r.get("source") or Path(path).parent.name)
    return rows, source_of


def split_folds(rows, k, seed):
    """Deal the distinct prompts of rows (raw battle dicts with where-strings) into k folds.
    Returns a list of k lists of row indices; all votes of a prompt land in one fold."""
    keys = sorted({prompt_key(parse_turns(r, where)) for where, r in rows})
    if len(keys) < k:
        raise ValueError(f"{len(keys)} prompts cannot make {k} folds")
    random.Random(seed).shuffle(keys)
    fold_of = {key: i % k for i, key in enumerate(keys)}
    folds = [[] for _ in range(k)]
    for j, (where, r) in enumerate(rows):
        folds[fold_of[prompt_key(parse_turns(r, where))]].append(j)
    return folds


def keep_fraction(rows, idx, frac, seed):
    """The votes (indices into rows) of a random fraction of the distinct prompts among idx: the
    training-set-size axis of a scaling curve. Nested: a smaller fraction keeps a subset."""
    if frac >= 1:
        return idx
    keys = sorted({prompt_key(parse_turns(rows[j][1], rows[j][0])) for j in idx})
    random.Random(seed).shuffle(keys)
    kept = set(keys[:max(1, round(frac * len(keys)))])
    return [j for j in idx if prompt_key(parse_turns(rows[j][1], rows[j][0])) in kept]


def compare(dir_a, dir_b, n_boot, seed):
    """Paired comparison of two CV runs over the prompts both scored: B's P2L NLL minus A's."""
    def load(d):
        return {r["prompt"]: r for r in map(json.loads, (Path(d) / "prompts.jsonl").read_text().splitlines())}
    for d in (dir_a, dir_b):
        finished_run(d, "--compare", "prompts.jsonl")
    a, b = load(dir_a), load(dir_b)
    keys = sorted(a.keys() & b.keys())
    if not keys:
        sys.exit(f"error: {dir_a} and {dir_b} share no scored prompt")
    sa, sb = (np.array([x[k]["p2l"] for k in keys]) for x in (a, b))
    w = np.array([a[k]["w"] for k in keys])
    (d_lo, d_hi), (r_lo, r_hi) = paired_bootstrap(sb, sa, w, n_boot, seed)
    print(f"{len(keys)} prompts: P2L NLL {dir_a} {sa.sum() / w.sum():.4f}, {dir_b} {sb.sum() / w.sum():.4f}: "
          f"B vs A {100 * (sb.sum() / sa.sum() - 1):+.2f}% [{100 * r_lo:+.2f}%, {100 * r_hi:+.2f}%] "
          f"(diff {(sb.sum() - sa.sum()) / w.sum():+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]; paired bootstrap over prompts)")


def finished_run(d, flag, name):
    """d/name of a finished cv.py run (cv.json, prompts.jsonl), or exit with one line saying it is missing."""
    if not (Path(d) / name).is_file():
        sys.exit(f"error: {flag} {d}: not a finished cv.py run (no {Path(d) / name})")
    return Path(d) / name


def backbone_of(train_args):
    """The --model a CV run passed to train.py (train.py's default: minilm)."""
    args = [a for x in train_args for a in x.split("=", 1)]
    return args[args.index("--model") + 1] if "--model" in args else "minilm"


def backbone_params(d, folds):
    """Parameters of the backbone a CV run trained (every tensor of its first scored fold's checkpoint but
    the head's, read from the safetensors header: nothing is loaded), or None without that file."""
    f = d / f"fold{folds[0]}" / "model" / "model.safetensors"
    if not f.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(f), "pt") as st:
        return int(sum(np.prod(st.get_slice(k).get_shape()) for k in st.keys() if not k.startswith("head.")))


def scaling_row(d, res, folds, boot=1000):
    """One run's point on the curve, scored on the given folds only: a run of all folds compared with
    one of fold 0 (cv.py --only 0, e.g. a slow backbone) is cut to fold 0's prompts, from prompts.jsonl."""
    n = np.mean([json.loads((d / f"fold{k}" / "model" / "metrics.json").read_text())["train_prompts"] for k in folds])
    row = {"run": str(d), "backbone": backbone_of(res["train_args"]), "params": backbone_params(d, folds),
           "train_fraction": res["train_fraction"], "folds_scored": folds, "train_prompts": float(n)}
    if folds == sorted(f["fold"] for f in res["per_fold"]):
        return {**row, "prompts_scored": res["prompts"], **{k: res[k] for k in ("p2l_nll", "marginal_nll", "rel", "rel_ci")}}
    keep = {prompt_key(b["prompt"]) for k in folds for b in read_battles(d / f"fold{k}" / "val.jsonl.gz")}
    per = [r for r in map(json.loads, (d / "prompts.jsonl").read_text().splitlines()) if r["prompt"] in keep]
    sp, sm, ww = (np.array([r[k] for r in per]) for k in ("p2l", "marginal", "w"))
    _, rel_ci = paired_bootstrap(sp, sm, ww, boot, 0)
    return {**row, "prompts_scored": len(per), "p2l_nll": float(sp.sum() / ww.sum()), "marginal_nll": float(sm.sum() / ww.sum()),
            "rel": float(sp.sum() / sm.sum() - 1), "rel_ci": list(rel_ci)}


def power_fit(n, y):
    """(b, k) of y = b·n^k by least squares in log-log, or None unless every y > 0 (two parameters:
    four points cannot pin a third, an asymptote, honestly)."""
    if len(n) < 2 or (np.asarray(y) <= 0).any():
        return None
    k, log_b = np.polyfit(np.log(n), np.log(y), 1)
    return float(np.exp(log_b)), float(k)


def size_curves(rows):
    """The model-size axis: per --train-fraction, P2L NLL against backbone parameters, where two or more
    backbones ran at that fraction; a power law L = b·N^k is fitted only from 3 backbones up (two points
    would fit any curve exactly)."""
    curves = {}
    for frac in sorted({r["train_fraction"] for r in rows}):
        pts = sorted((r["params"], r["p2l_nll"], r["backbone"]) for r in rows
                     if r["train_fraction"] == frac and r["params"] is not None)
        if len({p[0] for p in pts}) < 2:
            continue
        N, lp, names = zip(*pts)
        fit = power_fit(np.array(N, float), np.array(lp)) if len(pts) >= 3 else None
        curves[str(frac)] = {"params": list(N), "p2l_nll": list(lp), "backbones": list(names),
                             "fit": None if fit is None else {"b": fit[0], "k": fit[1]}}
    return curves


def scaling(dirs, out):
    """The paper's scaling curve (§3.2) from finished CV runs that differ in --train-fraction: CV NLL
    against training prompts per fold, per backbone, fitted as L = b·n^−α, and the gain over the
    marginal leaderboard of the same folds, marginal − P2L = g·n^γ (where every gain is > 0)."""
    runs = [(Path(d), json.loads(finished_run(d, "--scaling", "cv.json").read_text())) for d in dirs]
    common = set.intersection(*({f["fold"] for f in res["per_fold"]} for _, res in runs))
    if not common:
        sys.exit("error: --scaling: the runs share no scored fold (cv.py --only), so their NLLs are not comparable")
    rows = [scaling_row(d, res, sorted(common)) for d, res in runs]
    fits, curves = {}, {}
    for bb in sorted({r["backbone"] for r in rows}):
        n, lp, lm = map(np.array, zip(*sorted((r["train_prompts"], r["p2l_nll"], r["marginal_nll"])
                                              for r in rows if r["backbone"] == bb)))
        curves[bb] = n, lp, lm
        nll, gain = power_fit(n, lp), power_fit(n, lm - lp)
        fits[bb] = {"points": len(n), "alpha": None if nll is None else -nll[1], "b": None if nll is None else nll[0],
                    "gain_exponent": None if gain is None else gain[1], "gain_coef": None if gain is None else gain[0]}
    sizes = size_curves(rows)
    out.mkdir(parents=True, exist_ok=True)
    plot_scaling(curves, fits, sizes, out / "scaling.png")
    write_json(out / "scaling.json", {"runs": rows, "fits": fits, "model_size": sizes})
    for r in sorted(rows, key=lambda r: (r["backbone"], r["train_prompts"])):
        print(f"{r['backbone']:8s} fraction {r['train_fraction']:<6g} {r['train_prompts']:6.0f} train prompts: P2L {r['p2l_nll']:.4f} "
              f"marginal {r['marginal_nll']:.4f} ({100 * r['rel']:+.2f}% [{100 * r['rel_ci'][0]:+.2f}%, {100 * r['rel_ci'][1]:+.2f}%]; "
              f"{r['prompts_scored']} prompts of folds {','.join(map(str, r['folds_scored']))})")
    for bb, f in fits.items():
        if f["alpha"] is not None:
            print(f"{bb}: P2L NLL = {f['b']:.4f}·n^-{f['alpha']:.4f}", end="")
            print("" if f["gain_exponent"] is None else f"; marginal − P2L = {f['gain_coef']:.3g}·n^{f['gain_exponent']:.2f}", end="")
            print(f" (least squares in log-log, {f['points']} points)")
    for frac, c in sizes.items():
        print(f"model size at fraction {frac}: " + ", ".join(f"{b} {n / 1e6:.0f}M params {v:.4f}"
                                                           for b, n, v in zip(c["backbones"], c["params"], c["p2l_nll"])))
    print(f"wrote {out / 'scaling.png'} and {out / 'scaling.json'}")


def plot_scaling(curves, fits, sizes, path):
    """Left: NLL against training prompts (the data axis), one curve per backbone; middle: the gain over
    the marginal; right (where two backbones ran): NLL against backbone parameters (the model axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3 if sizes else 2, figsize=(16 if sizes else 11, 4.2), dpi=110)
    ax, ag = axes[:2]
    for i, (bb, (n, lp, lm)) in enumerate(curves.items()):
        f, grid = fits[bb], np.geomspace(n.min(), n.max(), 50)
        ax.plot(n, lp, "o", color=f"C{i}", label=f"{bb}: P2L (CV)")
        ax.plot(n, lm, "x--", color=f"C{i}", lw=0.6, label=f"{bb}: marginal leaderboard (same folds)")
        if f["alpha"] is not None:
            ax.plot(grid, f["b"] * grid ** -f["alpha"], color=f"C{i}", lw=0.8, label=f"{bb}: {f['b']:.3f}·n^-{f['alpha']:.3f}")
        ag.plot(n, lm - lp, "o", color=f"C{i}", label=f"{bb}: marginal − P2L")
        if f["gain_exponent"] is not None:
            ag.plot(grid, f["gain_coef"] * grid ** f["gain_exponent"], color=f"C{i}", lw=0.8,
                    label=f"{bb}: {f['gain_coef']:.2g}·n^{f['gain_exponent']:.2f}")
    ax.set_ylabel("held-out judge NLL per vote")
    ag.set_ylabel("NLL gain over the marginal leaderboard")
    for a in (ax, ag):
        a.set_xscale("log")
        a.set_xlabel("training prompts per fold")
        a.legend(fontsize=7)
        a.grid(alpha=0.3, which="both")
    ag.set_yscale("log")
    if sizes:
        plot_sizes(axes[2], sizes)
    save_png(fig, path)


def plot_sizes(am, sizes):
    for i, (frac, c) in enumerate(sizes.items()):
        am.plot(c["params"], c["p2l_nll"], "o-", color=f"C{i + 4}", lw=0.8, label=f"P2L (CV) at fraction {float(frac):g} of the training prompts")
        for n, v, b in zip(c["params"], c["p2l_nll"], c["backbones"]):
            am.annotate(b, (n, v), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if c["fit"]:
            grid = np.geomspace(min(c["params"]), max(c["params"]), 50)
            am.plot(grid, c["fit"]["b"] * grid ** c["fit"]["k"], "--", color=f"C{i + 4}", lw=0.6)
    am.set_xscale("log")
    am.set_xlabel("backbone parameters (model size)")
    am.set_ylabel("held-out judge NLL per vote (P2L, CV)")
    am.legend(fontsize=7)
    am.grid(alpha=0.3, which="both")


def write_rows(path, rows):
    """Battle rows to a .jsonl.gz, atomically (train.py reads it by name)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in rows)
    atomic_write(path, gzip.compress(text.encode("utf-8"), mtime=0))


def train_fold(fold_dir, train_args, run, log):
    """Run train.py on this fold unless its checkpoint already comes from the same fold: the same
    train.py arguments AND the same split (the sha256 of the fold's train and val files) of the same
    data, seed, --folds, --max-prompts and --train-fraction (run). fold.json records them once the
    checkpoint is complete; it is removed before training, so a run killed midway reuses nothing.
    (Reusing on the arguments alone once scored prompts with models that had trained on them.)"""
    argv = ["--train", str(fold_dir / "train.jsonl.gz"), "--val", str(fold_dir / "val.jsonl.gz"),
            "--out", str(fold_dir / "model")] + train_args
    record = {**run, "fold": fold_dir.name, "argv": argv, "train_sha256": sha256_file(fold_dir / "train.jsonl.gz"),
              "val_sha256": sha256_file(fold_dir / "val.jsonl.gz")}
    done, rec = fold_dir / "model" / "metrics.json", fold_dir / "fold.json"
    if done.exists():
        try:
            same = json.loads(rec.read_text()) == record and \
                json.loads((fold_dir / "model" / "marginal.json").read_text())["train"]["sha256"] == record["train_sha256"]
        except (OSError, ValueError, KeyError, TypeError):  # no record (an older run), or a damaged one
            same = False
        if same:
            log(f"{fold_dir.name}: trained already on this split, reusing {done}")
            return json.loads(done.read_text())
        log(f"{fold_dir.name}: the checkpoint there was trained on another split, data or arguments: training again")
    rec.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "train.py")] + argv
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        sys.exit(f"error: train.py failed on {fold_dir.name} (exit {r.returncode})")
    write_json(rec, record)
    return json.loads(done.read_text())


def score_fold(ckpt, battles):
    """Per-prompt (P2L NLL sum, marginal NLL sum, weight sum) of the held-out votes, in the order of
    their prompts' first appearance, with the prompt keys, and the fold's predictions for those
    prompts (route.py --routellm reads them). Votes for models the fold's training part never saw
    are skipped (counted)."""
    model, tok = load_checkpoint(ckpt)
    p2l = model.p2l
    head = HEAD_OF_LOSS[p2l["loss"]]
    index = {m: i for i, m in enumerate(p2l["model_list"])}
    prompts, pairs, skipped = group_by_prompt(battles, index, "bt-tie")  # p: soft label, or 1 / 0 / ½
    ids = encode_for(model, tok, prompts)
    beta, eta = predict(model, ids, tok.pad_token_id, batch_size=32)
    marg = read_marginal(ckpt)
    if marg["model_list"] != p2l["model_list"]:
        raise ValueError(f"{ckpt}: marginal.json and the checkpoint list different models")
    beta_m = torch.tensor(marg["beta"], dtype=torch.float64).expand(len(prompts), -1)
    eta_m = torch.full((len(prompts),), float(marg["eta"]), dtype=torch.float64)
    eta = eta.double() if eta is not None else eta_m  # bt ignores eta
    out = []
    for b, e in ((beta.double(), eta), (beta_m, eta_m)):
        allp = cat_pairs(pairs)
        r = allp["row"]
        la, lb = judge_logprobs(b[r, allp["a"]], b[r, allp["b"]], e[r], head)
        nll = -(allp["p"] * la + (1 - allp["p"]) * lb) * allp["w"]
        out.append(torch.zeros(len(prompts), dtype=torch.float64).index_add_(0, r, nll))
    w = torch.tensor([pp["w"].sum().item() for pp in pairs], dtype=torch.float64)
    held = {"turns": prompts, "beta": beta, "eta": None if HEAD_OF_LOSS[p2l["loss"]] == "bt" else eta.float(),
            "model_list": p2l["model_list"], "loss": p2l["loss"]}
    return [prompt_key(t) for t in prompts], out[0], out[1], w, skipped, held


def per_source(sp, sm, ww, args):
    """CV numbers of one source's prompts (the bootstrap resamples those prompts only)."""
    (d_lo, d_hi), (r_lo, r_hi) = paired_bootstrap(sp, sm, ww, args.boot, args.seed)
    return {"prompts": len(sp), "p2l_nll": float(sp.sum() / ww.sum()), "marginal_nll": float(sm.sum() / ww.sum()),
            "rel": float(sp.sum() / sm.sum() - 1), "rel_ci": [r_lo, r_hi], "diff_ci": [d_lo, d_hi]}


def save_out_of_fold(out, held, source_of):
    """predictions.safetensors / .jsonl in out: each prompt's β from the fold that held it out, so a
    later stage (route.py --routellm, aggregate.py) works on cross-fitted coefficients. Folds
    trained on different model lists cannot share one matrix: then no file, and a note."""
    lists = {json.dumps(h["model_list"]) for h in held}
    if len(lists) > 1 or len({h["loss"] for h in held}) > 1:
        print(f"note: the folds' checkpoints list different models or losses; no out-of-fold predictions in {out}")
        return
    rows = [{"prompt": t, "source": source_of[prompt_key(t)], "fold": h["fold"]} for h in held for t in h["turns"]]
    eta = None if held[0]["eta"] is None else torch.cat([h["eta"] for h in held])
    save_predictions(out, torch.cat([h["beta"] for h in held]), eta, held[0]["model_list"], rows, loss=held[0]["loss"])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["data/alpaca_eval/train.jsonl.gz", "data/alpaca_eval/val.jsonl.gz"],
                   help="battle files pooled into one set of prompts (default: all 805 AlpacaEval prompts)")
    p.add_argument("--folds", type=int, default=5, help="K: each fold holds 1/K of the prompts out; 5 keeps 80%% for training, as the old split did")
    p.add_argument("--only", help="comma-separated fold indices to run (a cheap screen); the CI then covers those folds' prompts only")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed: keep it fixed to compare recipes on the same folds (paired)")
    p.add_argument("--max-prompts", type=int, default=0, help="at most this many distinct prompts of each --data file "
                   "(a seeded random subset; 0: all): a CPU budget, e.g. 2,000 of MMLU's 13,937 questions")
    p.add_argument("--train-fraction", type=float, default=1.0, help="train each fold on this random fraction of its "
                   "training prompts (the held-out fold stays whole): one point of a scaling curve")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="no training: compare two finished CV runs' P2L "
                   "NLL on the prompts both scored (paired bootstrap), e.g. a recipe against the default")
    p.add_argument("--scaling", nargs="+", metavar="RUN", help="no training: the scaling curve (table, power-law fit, "
                   "PNG in --out) from finished CV runs at several --train-fraction values, grouped by backbone")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples over prompts")
    p.add_argument("--out", default="out/cv", help="fold data, fold checkpoints, cv.json and per-prompt NLLs (prompts.jsonl); "
                   "locked against a second cv.py run for the whole run")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: train.py's flags for every fold (not --train/--val/--out)")
    args = p.parse_args(argv)
    args.train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.boot < 1:
        p.error(f"--boot must be >= 1, got {args.boot}")
    if not 0 < args.train_fraction <= 1:
        p.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if any(a.split("=")[0] in ("--train", "--val", "--out") for a in args.train_args):
        p.error("cv.py sets train.py's --train/--val/--out per fold; do not pass them after --")
    if args.folds < 2:
        p.error(f"--folds must be >= 2, got {args.folds}")
    try:
        args.only = sorted({int(i) for i in args.only.split(",")}) if args.only else list(range(args.folds))
    except ValueError:
        p.error(f"--only must be comma-separated fold indices, got {args.only!r}")
    if not all(0 <= i < args.folds for i in args.only):
        p.error(f"--only: fold indices must be in 0..{args.folds - 1}, got {','.join(map(str, args.only))}")
    try:
        check_out(args.out)
    except ValueError as e:
        p.error(str(e))
    return args


def run_fold(args, k, rows, folds, run):
    """Write fold k's train / val votes, train (or reuse) its P2L, score its held-out prompts."""
    fold_dir = Path(args.out) / f"fold{k}"
    held = set(folds[k])
    train_idx = keep_fraction(rows, [j for j in range(len(rows)) if j not in held], args.train_fraction, args.seed + 1 + k)
    write_rows(fold_dir / "train.jsonl.gz", [rows[j] for j in train_idx])
    write_rows(fold_dir / "val.jsonl.gz", [rows[j] for j in folds[k]])
    metrics = train_fold(fold_dir, args.train_args, run, print)
    kk, sp, sm, ww, skipped, hh = score_fold(fold_dir / "model", read_battles(fold_dir / "val.jsonl.gz"))
    fold = {"fold": k, "prompts": len(kk), "votes_skipped": skipped, "p2l_nll": (sp.sum() / ww.sum()).item(),
            "marginal_nll": (sm.sum() / ww.sum()).item(), "train_seconds": metrics["train_seconds"]}
    print(f"fold {k}: {len(kk)} prompts, P2L {fold['p2l_nll']:.4f} vs marginal {fold['marginal_nll']:.4f} "
          f"({100 * (fold['p2l_nll'] / fold['marginal_nll'] - 1):+.2f}%), trained in {metrics['train_seconds'] / 60:.1f} min")
    return kk, sp, sm, ww, fold, {**hh, "fold": k}


def summarize(args, keys, sp, sm, ww, per_fold, source_of, t0):
    """cv.json's numbers: pooled NLLs with the paired bootstrap CI, overall and per source."""
    (d_lo, d_hi), (r_lo, r_hi) = paired_bootstrap(sp, sm, ww, args.boot, args.seed)
    res = {"folds": args.folds, "only": args.only, "train_fraction": args.train_fraction, "seed": args.seed, "prompts": len(keys),
           "train_args": args.train_args, "p2l_nll": float(sp.sum() / ww.sum()), "marginal_nll": float(sm.sum() / ww.sum()),
           "diff": float((sp.sum() - sm.sum()) / ww.sum()), "diff_ci": [d_lo, d_hi],
           "rel": float(sp.sum() / sm.sum() - 1), "rel_ci": [r_lo, r_hi],
           "minutes": round((time.time() - t0) / 60, 2),
           "train_minutes": round(sum(f["train_seconds"] for f in per_fold) / 60, 2), "per_fold": per_fold}
    src = np.array([source_of[key] for key in keys])
    res["per_source"] = {name: per_source(sp[src == name], sm[src == name], ww[src == name], args)
                         for name in sorted(set(src))}
    return res, src


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare, args.boot, args.seed)
    if args.scaling:
        return scaling(args.scaling, Path(args.out))
    try:
        for path in args.data:  # every row valid (file:line errors) before any training
            read_battles(path)
        run = {"data": [sha256_file(path) for path in args.data], "seed": args.seed, "folds": args.folds,
               "max_prompts": args.max_prompts, "train_fraction": args.train_fraction}  # what a reused fold must share
        rows, source_of = read_rows(args.data, args.max_prompts, args.seed)
        folds = split_folds(rows, args.folds, args.seed)
        lock = lock_dir(args.out)  # held to the end: a second cv.py on this --out would mix its folds with ours
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    out, t0 = Path(args.out), time.time()
    parts = [run_fold(args, k, rows, folds, run) for k in args.only]
    keys = [key for part in parts for key in part[0]]
    assert len(set(keys)) == len(keys), "a prompt was scored twice: folds overlap"
    sp, sm, ww = (torch.cat([part[i] for part in parts]).numpy() for i in (1, 2, 3))
    res, src = summarize(args, keys, sp, sm, ww, [part[4] for part in parts], source_of, t0)
    save_out_of_fold(out, [part[5] for part in parts], source_of)
    atomic_write(out / "prompts.jsonl", "".join(json.dumps({"prompt": key, "source": s, "p2l": float(a), "marginal": float(b),
                                                            "w": float(c)}, ensure_ascii=False) + "\n"
                                                for key, s, a, b, c in zip(keys, src, sp, sm, ww)))
    write_json(out / "cv.json", res)  # last: its presence marks a finished run
    (d_lo, d_hi), (r_lo, r_hi) = res["diff_ci"], res["rel_ci"]
    print(f"CV ({len(args.only)} of {args.folds} folds, {len(keys)} prompts): judge NLL P2L {res['p2l_nll']:.4f} vs marginal "
          f"{res['marginal_nll']:.4f}: {100 * res['rel']:+.2f}% [{100 * r_lo:+.2f}%, {100 * r_hi:+.2f}%] "
          f"(diff {res['diff']:+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]; paired bootstrap over prompts, {args.boot} resamples); "
          f"{res['minutes']:.1f} min, {res['train_minutes']:.1f} in train.py; {out / 'cv.json'}")
    if len(res["per_source"]) > 1:
        for name, r in res["per_source"].items():
            print(f"  {name}: {r['prompts']} prompts, P2L {r['p2l_nll']:.4f} vs marginal {r['marginal_nll']:.4f}: "
                  f"{100 * r['rel']:+.2f}% [{100 * r['rel_ci'][0]:+.2f}%, {100 * r['rel_ci'][1]:+.2f}%]")
    lock.close()


if __name__ == "__main__":
    main()
