"""How well does `train.py --extend` place a model the P2L never saw? Leave-models-out on a battle
file: CK is a P2L trained without the held-out models; each held-out model alone is added to it
from k of its training battles (seeded subsets; k = all: every one), and its votes on the
held-out prompts are scored under
  (a) marginal-only: one constant coefficient fitted on the same k battles, every other model's
      coefficient per prompt from CK (the cheapest placement, no head row),
  (b) the full retrain (--full): a P2L trained on all the training battles, the model included,
  (c) the extended P2L (extend.extend_head, the fit train.py --extend runs),
  (d) the marginal leaderboard of the extension (marginal.json: constants for every model).
Paired bootstrap CIs over prompts, per model and pooled over the held-out models. The prompt
features are computed once for all prompts (the same forward train.py --extend runs per
extension, timed); --time-cli also times the real command and checks it gives the same row.

    python extend_eval.py --checkpoint out/minus --full out/train --heldout claude-2.1,vicuna-13b-v1.5 --out out/extend-eval
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import extend as E
from evaluate import paired_bootstrap
from common import (
    cat_pairs, encode_for, file_ref, group_by_prompt, load_checkpoint, OutputSet, pair_nll, predict, prompt_key,
    read_battles, read_jsonl, read_marginal, save_png, sha256_file, write_json,
)

METHODS = ("marginal_only", "full_retrain", "extended", "marginal_board")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="CK: a P2L trained WITHOUT the held-out models' battles")
    p.add_argument("--full", help="the full retrain: the same recipe on every training battle")
    p.add_argument("--heldout", required=True, help="comma-separated models to add, one at a time")
    p.add_argument("--train", default="data/alpaca_eval/train.jsonl.gz", help="the held-out models' training battles come from here")
    p.add_argument("--val", default="data/alpaca_eval/val.jsonl.gz", help="held-out prompts: the models' votes here are scored")
    p.add_argument("--ks", default="10,40,160,all", help="battles per extension ('all': every training battle of the model)")
    p.add_argument("--seeds", type=int, default=5, help="random subsets per k < all (their per-prompt NLLs are averaged)")
    p.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples over prompts")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--time-cli", default="", help="k values to also run as `train.py --extend` for the first held-out model "
                   "(timed end to end; the CLI's row must equal this script's)")
    p.add_argument("--out", help="results.json, table.md, nll_vs_k.png, cache/ (prompt features)")
    p.add_argument("--write-train-without", metavar="FILE", help="only write --train without the --heldout models' "
                   "battles to FILE (.jsonl.gz), CK's training data, and exit")
    args = p.parse_args(argv)
    if not args.write_train_without and not (args.checkpoint and args.full and args.out):
        p.error("--checkpoint, --full and --out are required (or --write-train-without FILE)")
    return args


def write_train_without(args, held):
    """The training battles without any held-out model, byte-for-byte rows (gzip without a timestamp)."""
    try:
        rows = [r for _, r in read_jsonl(args.train) if r.get("model_a") not in held and r.get("model_b") not in held]
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    Path(args.write_train_without).parent.mkdir(parents=True, exist_ok=True)
    with open(args.write_train_without, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:  # no name, no time
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    print(f"{args.write_train_without}: {len(rows)} battles without {len(held)} held-out models")


def cached(out, name, key, compute):
    """compute() once per key (a checkpoint's weights hash): features take minutes on a busy CPU."""
    f = Path(out) / "cache" / f"{name}-{key[:16]}.pt"
    if f.exists():
        return torch.load(f, weights_only=False)
    t0 = time.time()
    val = compute()
    val["seconds"] = time.time() - t0
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save(val, f)
    return val


def per_prompt(beta, eta, pairs, loss, n):
    """(weighted NLL sum, weight sum) per prompt row, float64 numpy."""
    r = pairs["row"]
    nll = pair_nll(beta[r, pairs["a"]], beta[r, pairs["b"]], None if eta is None else eta[r], pairs["y"], pairs["p"], loss)
    w = pairs["w"].double()
    return (np.bincount(r.numpy(), (nll * w).numpy(), n), np.bincount(r.numpy(), w.numpy(), n))


def votes_of(battles, model, index, loss, row_of):
    """The battles of `model` as pairs over `index`, rows = feature rows of their prompts (row_of)."""
    mine = [b for b in battles if model in (b["model_a"], b["model_b"])]
    prompts, groups, skipped = group_by_prompt(mine, index, loss)
    assert not skipped, f"{model}: {skipped} battles against a model CK does not know"
    pairs = cat_pairs(groups)
    pairs["row"] = torch.tensor([row_of[prompt_key(t)] for t in prompts])[pairs["row"]]
    return pairs, mine


def subset(pairs, k, seed):
    """The votes of k prompts drawn without replacement (all of them for k = None)."""
    rows = torch.unique(pairs["row"])
    if k is not None:
        rows = rows[torch.from_numpy(np.random.default_rng(seed).choice(len(rows), k, replace=False))]
    keep = torch.isin(pairs["row"], rows)
    return {key: v[keep] for key, v in pairs.items()}


def one_extension(ctx, h, train_pairs, val_pairs):
    """Fit (a) and (c) for model h from train_pairs; per-prompt NLL sums of (a), (c), (d) on val_pairs."""
    model, loss, F = ctx["model"], ctx["loss"], ctx["feat"]
    rows = torch.unique(train_pairs["row"])  # fit on the features of these prompts only, as the command would
    local = dict(train_pairs, row=torch.searchsorted(rows, train_pairs["row"]))
    t0 = time.perf_counter()
    fit = E.extend_head(model, F["x"][rows], local, [h], ctx["marg_old"], ctx["eta_marg"])
    t_fit = time.perf_counter() - t0
    assert all(i["converged"] for i in fit["info"].values()), fit["info"]
    col = fit["cols"]
    W = local["w"].sum().item()
    base = torch.zeros(len(rows), len(fit["models"]), dtype=torch.float64)
    old_cols = torch.tensor([i for i in range(len(fit["models"])) if i != col.item()])
    base[:, old_cols] = fit["beta_old"]
    const, info = E.fit_rows(E.Problem(base, fit["eta"], torch.ones(len(rows), 1, dtype=torch.float64), local, col, loss),
                             E.Prior(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([2 * E.MARGINAL_L2 * W])))
    assert info["converged"], info
    vb = torch.zeros(len(F["x"]), len(fit["models"]), dtype=torch.float64)
    vb[:, old_cols] = F["beta_old"]
    n = len(F["x"])
    out = {}
    for name, colv in (("extended", F["feats"] @ fit["rows"][col.item()]), ("marginal_only", const[0, 0].expand(n))):
        b = vb.clone()
        b[:, col] = colv[:, None]
        out[name] = per_prompt(b, F["eta"], val_pairs, loss, n)[0]
    board = fit["marginal"].expand(n, -1)
    eta_m = None if F["eta"] is None else torch.full((n,), float(ctx["eta_marg"]), dtype=torch.float64)
    out["marginal_board"] = per_prompt(board, eta_m, val_pairs, loss, n)[0]
    return out, {"fit_seconds": t_fit, "row": fit["rows"][col.item()].tolist(), "marginal": fit["marginal"][col.item()].item(),
                 "const": const[0, 0].item(), "strength": E.strength_label(fit.get("strength", {}).get("chosen"))}


def features(args, model, tok, prompts, key):
    def compute():
        x = E.pooled_features(model, tok, prompts, args.batch_size)
        beta_old, eta, feats, _ = E.head_terms(model, x)
        return {"x": x, "beta_old": beta_old, "eta": eta, "feats": feats}
    return cached(args.out, "features", key, compute)


def full_predictions(args, prompts):
    def compute():
        model, tok = load_checkpoint(args.full)
        beta, eta = predict(model, encode_for(model, tok, prompts), tok.pad_token_id, args.batch_size)
        return {"beta": beta.double(), "eta": None if eta is None else eta.double(), "models": model.p2l["model_list"]}
    return cached(args.out, "full", sha256_file(Path(args.full) / "model.safetensors"), compute)


def score_model(ctx, h, ks, seeds):
    """Every method's per-val-prompt NLL sums for held-out model h, k by k (subsets averaged over seeds)."""
    loss, nt = ctx["loss"], ctx["n_train_rows"]
    index = {m: i for i, m in enumerate(sorted(ctx["old"] + [h]))}
    tp, mine = votes_of(ctx["train"], h, index, loss, ctx["row_of"])
    vp, _ = votes_of(ctx["val"], h, index, loss, ctx["row_of"])
    n = len(ctx["feat"]["x"])
    fidx = {m: i for i, m in enumerate(ctx["full"]["models"])}
    vf, _ = votes_of(ctx["val"], h, fidx, loss, ctx["val_row_of"])
    s_full, w = per_prompt(ctx["full"]["beta"], ctx["full"]["eta"], vf, loss, n - nt)
    n_train = len(torch.unique(tp["row"]))
    res = {"train_battles": len(mine), "train_prompts": n_train, "w": w, "k": {}}
    for k in ks:
        kk = None if k is None or k >= n_train else k
        runs = [one_extension(ctx, h, subset(tp, kk, seed), vp) for seed in (range(seeds) if kk else [0])]
        sums = {m: np.mean([r[0][m][nt:] for r in runs], 0) for m in ("extended", "marginal_only", "marginal_board")}
        sums["full_retrain"] = s_full
        res["k"]["all" if kk is None else str(k)] = {"sums": sums, "fit_seconds": float(np.mean([r[1]["fit_seconds"] for r in runs])),
                                                     "runs": [r[1] for r in runs], "battles": kk or len(mine)}
    return res


def compare(sums, w, n_boot, seed=0):
    """NLL per method and the paired CIs of extended − marginal_only and extended − full_retrain."""
    out = {m: float(sums[m].sum() / w.sum()) for m in METHODS}
    for other in ("marginal_only", "full_retrain"):
        ci, rel = paired_bootstrap(sums["extended"], sums[other], w, n_boot, seed)
        out[f"extended_minus_{other}"] = out["extended"] - out[other]
        out[f"extended_minus_{other}_ci"] = ci
    return out


def control(ctx, n_boot):
    """CK vs the full retrain on the votes of models BOTH saw: how much of a gap to the full retrain
    comes from CK's backbone having seen fewer models (or less training), not from the extension."""
    loss, nt, old = ctx["loss"], ctx["n_train_rows"], ctx["old"]
    both = [b for b in ctx["val"] if b["model_a"] in old and b["model_b"] in old]
    index = {m: i for i, m in enumerate(old)}
    fidx = {m: i for i, m in enumerate(ctx["full"]["models"])}
    n = len(ctx["feat"]["x"])
    sc, w = (a[nt:] for a in per_prompt(ctx["feat"]["beta_old"], ctx["feat"]["eta"], votes_of_all(both, index, loss, ctx["row_of"]), loss, n))
    sf, _ = per_prompt(ctx["full"]["beta"], ctx["full"]["eta"], votes_of_all(both, fidx, loss, ctx["val_row_of"]), loss, n - nt)
    ci, _ = paired_bootstrap(sc, sf, w, n_boot, 0)
    return {"votes": len(both), "ck": float(sc.sum() / w.sum()), "full_retrain": float(sf.sum() / w.sum()),
            "ck_minus_full": float((sc.sum() - sf.sum()) / w.sum()), "ck_minus_full_ci": ci}


def votes_of_all(battles, index, loss, row_of):
    prompts, groups, _ = group_by_prompt(battles, index, loss)
    pairs = cat_pairs(groups)
    pairs["row"] = torch.tensor([row_of[prompt_key(t)] for t in prompts])[pairs["row"]]
    return pairs


def time_cli(args, ctx, h, ks):
    """`train.py --extend` for model h on the seed-0 subsets of k battles: wall time, its own phase
    times, and the largest difference between its new head row and this script's."""
    out = []
    index = {m: i for i, m in enumerate(sorted(ctx["old"] + [h]))}
    tp, mine = votes_of(ctx["train"], h, index, ctx["loss"], ctx["row_of"])
    inv = {i: k for k, i in ctx["row_of"].items()}
    raw = [(r, b) for (_, r), b in zip(read_jsonl(args.train), ctx["train"]) if h in (b["model_a"], b["model_b"])]
    for k in ks:
        sub = subset(tp, None if k == "all" or int(k) >= len(mine) else int(k), 0)
        keys = {inv[i] for i in torch.unique(sub["row"]).tolist()}
        rows = [r for r, b in raw if prompt_key(b["prompt"]) in keys]
        f = Path(args.out) / "cache" / f"cli-{k}.jsonl.gz"
        with open(f, "wb") as fh, gzip.GzipFile("", "wb", fileobj=fh, mtime=0) as g:
            g.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        ck2 = Path(args.out) / "cache" / f"cli-ck2-{k}"
        load0, t0 = os.getloadavg()[0], time.time()
        r = subprocess.run([sys.executable, "train.py", "--extend", os.path.abspath(args.checkpoint), "--train", os.path.abspath(f),
                            "--out", os.path.abspath(ck2)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
        wall = time.time() - t0
        if r.returncode:
            sys.exit(f"error: train.py --extend failed: {r.stderr[-1000:]}")
        m = json.loads((ck2 / "metrics.json").read_text())
        ck, _ = load_checkpoint(ck2)
        col = ck.p2l["model_list"].index(h)
        row = torch.cat([ck.head.head.bias[col:col + 1], ck.head.head.weight[col]]).detach().double()
        mine_row = torch.tensor(one_extension(ctx, h, sub, sub)[1]["row"])
        out.append({"model": h, "k": k, "battles": len(rows), "wall_seconds": round(wall, 1), "phases": m["extend"]["seconds"],
                    "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
                    "row_max_abs_diff_vs_script": float((row - mine_row).abs().max())})
        print(f"train.py --extend {h} k={k}: {wall:.1f} s wall {m['extend']['seconds']} (load {load0:.1f}); "
              f"row differs from the script's by {out[-1]['row_max_abs_diff_vs_script']:.2e}")
        import shutil
        shutil.rmtree(ck2)
    return out


def report(args, held, per, pooled, ctl, timing):
    """table.md: pooled rows first, then per model; every NLL on the held-out model's val votes."""
    def ci(c):
        return f"[{c[0]:+.4f}, {c[1]:+.4f}]"
    lines = ["| held-out model | k | (a) marginal-only | (b) full retrain | (c) extended | (c) − (a) [95% CI] | (c) − (b) [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in [("**pooled, all 8**" if len(held) == 8 else "**pooled**", pooled)] + [(h, per[h]) for h in held]:
        for k, r in rows.items():
            lines.append(f"| {name} | {k} | {r['marginal_only']:.4f} | {r['full_retrain']:.4f} | {r['extended']:.4f} | "
                         f"{r['extended_minus_marginal_only']:+.4f} {ci(r['extended_minus_marginal_only_ci'])} | "
                         f"{r['extended_minus_full_retrain']:+.4f} {ci(r['extended_minus_full_retrain_ci'])} |")
    lines += ["", f"Control (models both P2Ls saw, {ctl['votes']} val votes): CK {ctl['ck']:.4f} vs full retrain "
              f"{ctl['full_retrain']:.4f}, CK − full {ctl['ck_minus_full']:+.4f} {ci(ctl['ck_minus_full_ci'])}.", ""]
    f = timing["features"]
    lines.append(f"Time: prompt features {f['seconds']:.1f} s for {f['prompts']} prompts ({f['seconds'] / f['prompts']:.2f} s/prompt, "
                 f"load {f['load_avg_1min']}); fit of one new row {timing['fit_seconds_mean']:.2f} s (mean over extensions).")
    for c in timing.get("cli", []):
        lines.append(f"`train.py --extend` ({c['model']}, k = {c['k']}, {c['battles']} battles): {c['wall_seconds']} s wall "
                     f"(phases {c['phases']}; 1-min load {c['load_avg_1min']}); its row = this script's to {c['row_max_abs_diff_vs_script']:.1e}")
    return "\n".join(lines) + "\n"


def figure(pooled, per, held, full_k):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = list(pooled)
    x = [full_k if k == "all" else int(k) for k in ks]
    for m, style, label in (("marginal_only", "s--", "(a) marginal-only (constant from k battles)"),
                            ("extended", "o-", "(c) extended P2L (train.py --extend)"),
                            ("marginal_board", "x:", "(d) marginal leaderboard")):
        ax.plot(x, [pooled[k][m] for k in ks], style, label=label)
    ax.axhline(pooled[ks[-1]]["full_retrain"], color="k", lw=1, label="(b) full retrain (saw the model)")
    ax.set_xscale("log")
    ax.set_xticks(x, [k if k != "all" else f"all ({full_k})" for k in ks])
    ax.set_xlabel("battles of the new model used (k)")
    ax.set_ylabel(f"NLL on its held-out votes (pooled over {len(held)} models)")
    ax.legend(fontsize=8)
    ax.set_title("Adding a model to a trained P2L without retraining")
    return fig


def main(argv=None):
    args = parse_args(argv)
    held = [m.strip() for m in args.heldout.split(",") if m.strip()]
    ks = [None if k == "all" else int(k) for k in args.ks.split(",")]
    if args.write_train_without:
        return write_train_without(args, set(held))
    try:
        train, val = read_battles(args.train), read_battles(args.val)
        model, tok = load_checkpoint(args.checkpoint)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    mj = read_marginal(args.checkpoint)
    old, loss = model.p2l["model_list"], model.p2l["loss"]
    if seen := [h for h in held if h in old]:
        sys.exit(f"error: --checkpoint {args.checkpoint} was trained on {seen}: not held out")
    tr = list(dict.fromkeys(prompt_key(b["prompt"]) for b in train if {b["model_a"], b["model_b"]} & set(held)))
    va = list(dict.fromkeys(prompt_key(b["prompt"]) for b in val))
    keys = tr + va
    t0, load0 = time.time(), os.getloadavg()[0]
    feat = features(args, model, tok, [json.loads(k) for k in keys], sha256_file(Path(args.checkpoint) / "model.safetensors"))
    full = full_predictions(args, [json.loads(k) for k in va])
    if missing := [h for h in held if h not in full["models"]]:
        sys.exit(f"error: --full {args.full} does not know {missing}")
    ctx = {"model": model, "loss": loss, "old": old, "train": train, "val": val, "feat": feat, "full": full,
           "row_of": {k: i for i, k in enumerate(keys)}, "val_row_of": {k: i for i, k in enumerate(va)}, "n_train_rows": len(tr),
           "marg_old": torch.tensor(mj["beta"], dtype=torch.float64)[[mj["model_list"].index(m) for m in old]], "eta_marg": mj["eta"]}
    per_raw = {h: score_model(ctx, h, ks, args.seeds) for h in held}
    per = {h: {k: compare(r["sums"], per_raw[h]["w"], args.bootstrap) for k, r in per_raw[h]["k"].items()} for h in held}
    pooled = {}
    for k in per[held[0]]:
        sums = {m: sum(per_raw[h]["k"][k]["sums"][m] for h in held) for m in METHODS}
        pooled[k] = compare(sums, sum(per_raw[h]["w"] for h in held), args.bootstrap)
    ctl = control(ctx, args.bootstrap)
    fits = [r["fit_seconds"] for h in held for r in per_raw[h]["k"].values()]
    timing = {"features": {"seconds": round(feat["seconds"], 1), "prompts": len(keys), "load_avg_1min": round(load0, 2)},
              "full_predictions_seconds": round(full["seconds"], 1), "fit_seconds_mean": float(np.mean(fits))}
    if args.time_cli:
        timing["cli"] = time_cli(args, ctx, held[0], args.time_cli.split(","))
    results = {"checkpoint": file_ref(Path(args.checkpoint) / "model.safetensors", args.out), "full": args.full,
               "heldout": held, "ks": args.ks, "seeds": args.seeds, "loss": loss, "pooled": pooled, "per_model": per,
               "control": ctl, "timing": timing,
               "models": {h: {"train_battles": per_raw[h]["train_battles"],
                              "runs": {k: r["runs"] for k, r in per_raw[h]["k"].items()}} for h in held}}
    table = report(args, held, per, pooled, ctl, timing)
    print(table)
    with OutputSet(args.out) as o:
        write_json(o.stage / "results.json", results)
        (o.stage / "table.md").write_text(table)
        save_png(figure(pooled, per, held, max(per_raw[h]["train_prompts"] for h in held)), o.stage / "nll_vs_k.png")
        o.commit("results.json")
    print(f"{time.time() - t0:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
