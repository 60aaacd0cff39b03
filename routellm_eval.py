"""RouteLLM's own benchmark on P2L (lm-sys/RouteLLM routellm/evals/evaluate.py + benchmarks.py, written
afresh in numpy): route GPT-4-1106 (strong) vs Mixtral-8x7B (weak) on MMLU, GSM8K and MT-bench by
P2L's Δβ = β_strong − β_weak, and score it the way RouteLLM scores routers, against its random
router and its oracle. The same shape as livebench_eval.py: load → route → score → report.

    python routellm_eval.py --preds out/cv-pooled --out out/routellm   # CPU, seconds: cv.py's out-of-fold predictions

--preds must be out-of-fold (cv.py), so that no question is scored by a P2L that saw it; `make routellm`
trains them (cv.py over AlpacaEval + the three benchmarks) and then runs this.
Metrics (routellm/evals/evaluate.py): 11 thresholds at the edges of 10 equal-count bins of the router's
scores; cost = % of calls to the strong model; AUC = trapezoid of performance over that %; APGR =
(AUC − weak) / (strong − weak) areas; CPT(p%) = the strong-call % where performance first reaches
weak + p%·(strong − weak). MT-bench is routed on turn 1 and scored on both turns; questions RouteLLM
marks as contaminated are dropped.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

from common import (
    OutputSet, check_out, finite_or_none, load_predictions, parse_turns, prompt_key, read_jsonl, save_png, write_json,
)

STRONG, WEAK = "gpt4_1106_preview", "Mixtral-8x7B-Instruct-v0.1_concise"
# (file stem, title, label field, scale): MMLU/GSM8K performance in % correct, MT-bench in judge points
ROUTELLM_BENCHES = (("mmlu", "MMLU", "correct", 100.0), ("gsm8k", "GSM8K", "correct", 100.0),
                    ("mt_bench", "MT-bench", "score", 1.0))


def read_routellm(path, label):
    """One benchmark file as questions, contaminated ones dropped (RouteLLM's evaluation drops them).
    Returns ([(where, prompt key)], strong results, weak results, questions dropped). MT-bench has a
    row per (question, turn): a question is routed on its turn-1 prompt, as RouteLLM routes, scores
    the mean over its turns, and goes when any of its turns is contaminated."""
    ok = (lambda v: isinstance(v, bool)) if label == "correct" else \
        (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    qs = {}
    for where, row in read_jsonl(path):
        res = row.get(label)
        if not isinstance(res, dict) or not all(ok(res.get(m)) for m in (STRONG, WEAK)):
            raise ValueError(f"{where}: '{label}' must give both {STRONG} and {WEAK} a "
                             f"{'true/false' if label == 'correct' else 'finite number'}")
        if not isinstance(row.get("contaminated"), bool):
            raise ValueError(f"{where}: 'contaminated' must be true or false")
        qid, turn = where, 1
        if label == "score":  # the turns of a question share the id's "<qid>/" prefix
            if not isinstance(row.get("id"), str) or "/" not in row["id"]:
                raise ValueError(f"{where}: MT-bench rows need an id '<question>/<turn>'")
            qid, turn = row["id"].rsplit("/", 1)[0], row.get("turn")
        q = qs.setdefault(qid, {"turns": {}, "contaminated": False})
        if type(turn) is not int or turn < 1 or turn in q["turns"]:
            raise ValueError(f"{where}: question {qid}: turn {turn!r} is not a new turn number >= 1")
        q["contaminated"] |= row["contaminated"]
        q["turns"][turn] = (where, prompt_key(parse_turns(row, where)), float(res[STRONG]), float(res[WEAK]))
    kept = [q["turns"] for q in qs.values() if not q["contaminated"]]
    if not kept:
        raise ValueError(f"{path}: no uncontaminated questions")
    for t in kept:
        if 1 not in t:
            raise ValueError(f"{next(iter(t.values()))[0]}: question has no turn 1, the prompt it is routed on")
    mean = lambda t, k: sum(v[k] for v in t.values()) / len(t)
    return [t[1][:2] for t in kept], np.array([mean(t, 2) for t in kept]), np.array([mean(t, 3) for t in kept]), \
        len(qs) - len(kept)


def threshold_curve(scores, strong, weak, scale, bins=10):
    """RouteLLM's points for a router's per-question scores (higher: strong): thresholds at the edges
    of `bins` equal-count bins (np.quantile's linear interpolation is where pandas qcut cuts), strong
    where score >= edge, except at the top edge, where score > edge, so the last point is all weak.
    Returns (strong % of calls, performance, thresholds), one per edge."""
    t = np.quantile(scores, np.linspace(0, 1, bins + 1))
    to_strong = scores[None] >= t[:, None]
    to_strong[-1] = scores > t[-1]
    perf = scale * (weak.sum() + to_strong @ (strong - weak)) / len(scores)
    return 100 * to_strong.mean(1), perf, t


def oracle_curve(strong, weak, label, scale):
    """RouteLLM's get_optimal_accuracy at 0, 10, ..., 100% strong calls (x is that nominal share, even
    where the oracle needs fewer). Correctness: the strong calls go to questions only the strong model
    gets right, min(n·f, their count) of them (fractional, as RouteLLM counts). Judge scores: the
    int(n·f) questions with the largest positive strong − weak gap (RouteLLM's inclusive .loc[:k]
    slice hands k + 1 questions to the strong model; k is what its budget allows)."""
    n, pct, d = len(strong), np.arange(0, 101, 10), strong - weak
    if label == "correct":
        perf = [(weak.sum() + min(n * (p / 100), (d > 0).sum())) / n for p in pct]
    else:
        gain = np.maximum(np.sort(d)[::-1], 0)  # only a positive gap is worth a strong call
        perf = [(weak.sum() + gain[:int(n * (p / 100))].sum()) / n for p in pct]
    return pct.astype(float), scale * np.array(perf)


def first_crossing(x, y, target):
    """The strong % at which the piecewise-linear curve (x ascending) first reaches target; None: never.
    RouteLLM's np.interp(target, y, x) assumes y rises with x; where it rises strictly this is the same
    number, and on a curve that dips it is still the least strong share that reaches the target."""
    if y[0] >= target:
        return float(x[0])
    for i in range(1, len(y)):
        if y[i] >= target:
            return float(x[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))
    return None


def curve_metrics(x, perf, weak, strong):
    """RouteLLM's metrics of one router's points, sorted by strong %: AUC = trapezoid of performance over
    the strong fraction; APGR = (AUC − weak's) / (strong's − weak's), the constant lines integrated over
    the same x (None when the models tie); CPT(p%) = first_crossing of weak + p%·(strong − weak)."""
    o = np.argsort(x, kind="stable")
    x, perf = np.asarray(x, float)[o], np.asarray(perf, float)[o]
    area = lambda y: float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x / 100)))
    auc, lo, hi = area(perf), area(np.full_like(perf, weak)), area(np.full_like(perf, strong))
    return {"strong_pct": x.tolist(), "performance": perf.tolist(), "auc": auc,
            "apgr": (auc - lo) / (hi - lo) if hi != lo else None,
            **{f"cpt{p}": first_crossing(x, perf, weak + p / 100 * (strong - weak)) for p in (20, 50, 80)}}


def bootstrap_apgr(scores, strong, weak, scale, rng, n_boot):
    """95% interval of a router's APGR over questions resampled with replacement; each resample gets
    its own thresholds and weak/strong lines, as a fresh benchmark of that size would."""
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(scores), len(scores))
        x, perf, _ = threshold_curve(scores[i], strong[i], weak[i], scale)
        vals.append(curve_metrics(x, perf, scale * weak[i].mean(), scale * strong[i].mean())["apgr"])
    vals = [v for v in vals if v is not None]
    return np.percentile(vals, [2.5, 97.5]).tolist() if vals else None


def random_router(strong, weak, scale, rng, draws):
    """RouteLLM's random router (a uniform score per question) over seeded draws: the mean curve, and each
    metric's mean and sd over the draws that have it (cptNN_n: how many reached the target)."""
    wp, sp = scale * weak.mean(), scale * strong.mean()
    curves = [threshold_curve(rng.random(len(strong)), strong, weak, scale)[:2] for _ in range(draws)]
    ms = [curve_metrics(x, perf, wp, sp) for x, perf in curves]
    out = {k: v for k, v in curve_metrics(*np.mean(curves, 0), wp, sp).items() if k in ("strong_pct", "performance")}
    out["draws"] = draws
    for k in ("auc", "apgr", "cpt20", "cpt50", "cpt80"):
        v = np.array([m[k] for m in ms if m[k] is not None])
        out[k], out[f"{k}_sd"] = (float(v.mean()) if len(v) else None), (float(v.std(ddof=1)) if len(v) > 1 else None)
        if k.startswith("cpt"):
            out[f"{k}_n"] = len(v)
    return out


def score_routellm(b, seed, n_boot=1000, draws=20):
    """One benchmark (a read_routellm_inputs entry): P2L, random and oracle as RouteLLM scores them."""
    s, strong, weak, scale = b["scores"], b["strong"], b["weak"], b["scale"]
    wp, sp = scale * weak.mean(), scale * strong.mean()
    x, perf, t = threshold_curve(s, strong, weak, scale)
    p2l = {**curve_metrics(x, perf, wp, sp), "thresholds_delta_beta": t.tolist(), "bootstrap": n_boot,
           "apgr_ci95": bootstrap_apgr(s, strong, weak, scale, np.random.default_rng([seed, 1]), n_boot)}
    routers = {"p2l": p2l, "random": random_router(strong, weak, scale, np.random.default_rng([seed, 2]), draws),
               "oracle": curve_metrics(*oracle_curve(strong, weak, b["label"], scale), wp, sp)}
    keep = ("name", "title", "file", "questions", "dropped_contaminated", "without_predictions", "unit")
    return {**{k: b[k] for k in keep}, "weak_performance": wp, "strong_performance": sp, "routers": routers}


def p2l_scores(args):
    """{prompt key: Δβ = β_strong − β_weak} of --preds, P2L's routing score (any monotone map of it, e.g.
    the predicted win rate σ(Δβ), cuts the same bins), and where each row is, for errors."""
    beta, _, model_list, rows = load_predictions(args.preds)
    missing = [m for m in (STRONG, WEAK) if m not in model_list]
    if missing:
        raise ValueError(f"--preds {args.preds}: no coefficients for {', '.join(missing)} (RouteLLM's pair is "
                         f"{STRONG} vs {WEAK}; the predictions have {len(model_list)} models)")
    d = (beta[:, model_list.index(STRONG)].double() - beta[:, model_list.index(WEAK)].double()).numpy()
    jl, of = Path(args.preds) / "predictions.jsonl", {}
    for i, r in enumerate(rows):
        of.setdefault(prompt_key(parse_turns(r, f"{jl}:{i + 1}")), (d[i], f"{jl}:{i + 1}"))
    return of


def read_routellm_inputs(args):
    """The three benchmark files and the predictions, every check done before any output is written."""
    check_out(args.out)
    read = [(b, Path(args.data) / f"{b[0]}.jsonl.gz") for b in ROUTELLM_BENCHES]
    read = [(b, f, *read_routellm(f, b[2])) for b, f in read]
    of, out = p2l_scores(args), []
    for (name, title, label, scale), f, wk, strong, weak, dropped in read:
        hit = np.array([k in of for _, k in wk])
        if not hit.all() and not args.covered_only:
            raise ValueError(f"{wk[int(np.argmin(hit))][0]}: question not in --preds {args.preds} ({(~hit).sum()} of "
                             f"{len(hit)} missing; --covered-only scores just those it has, e.g. after cv.py --max-prompts)")
        if not hit.any():
            raise ValueError(f"{f}: --preds {args.preds} has none of its {len(hit)} questions")
        s, at = zip(*(of[k] for (_, k), h in zip(wk, hit) if h))
        s = np.array(s)
        if not np.isfinite(s).all():
            raise ValueError(f"{at[int(np.argmin(np.isfinite(s)))]}: non-finite coefficients")
        out.append({"name": name, "title": title, "label": label, "scale": scale, "file": str(f), "scores": s,
                    "strong": strong[hit], "weak": weak[hit], "questions": int(hit.sum()), "dropped_contaminated": dropped,
                    "without_predictions": int((~hit).sum()),
                    "unit": "% of questions correct" if label == "correct" else "mean GPT-4 judge score (1-10) over both turns"})
    return out


def run(args):
    """--routellm: route GPT-4-1106 vs Mixtral on RouteLLM's questions by P2L's Δβ and score it the way
    RouteLLM scores routers: routellm.json, routellm.png and a printed table, in --out as one set."""
    try:
        benches = read_routellm_inputs(args)
    except (ValueError, OSError) as e:  # OSError: a missing benchmark file, a broken .gz
        sys.exit(f"error: {e}")
    results = [score_routellm(b, args.seed) for b in benches]
    report = {"strong": STRONG, "weak": WEAK, "preds": args.preds, "routellm": args.data, "seed": args.seed,
              "covered_only": args.covered_only,
              "note": "RouteLLM's metrics (routellm/evals/evaluate.py): 11 thresholds at the edges of 10 equal-count "
                      "bins of each router's scores (P2L: Δβ = β_strong − β_weak); AUC = trapezoid of performance "
                      "over the strong fraction, APGR = (AUC − weak) / (strong − weak) areas, CPT(p%) = strong-call % "
                      "where performance first reaches weak + p%·(strong − weak) (null: never); random: mean and sd "
                      "over seeded draws; oracle: RouteLLM's get_optimal_accuracy; apgr_ci95: bootstrap over questions",
              "benchmarks": {r["name"]: r for r in results}}
    try:
        with OutputSet(args.out) as o:
            write_json(o.stage / "routellm.json", finite_or_none(report))
            plot_routellm(results, o.stage / "routellm.png")
            o.commit(marker="routellm.json")
    except ValueError as e:  # --out locked by another run
        sys.exit(f"error: {e}")
    print_routellm(results)
    print(f"-> {Path(args.out) / 'routellm.json'}, {Path(args.out) / 'routellm.png'}")


def print_routellm(results):
    num = lambda v, sd=None, f="{:.3f}": "-" if v is None else f.format(v) + ("" if sd is None else " ± " + f.format(sd))
    pct = lambda v, sd=None: num(v, sd, "{:.1f}%")
    print(f"RouteLLM's benchmark, strong {STRONG} vs weak {WEAK}; CPT: strong-call % to reach that share of the gap")
    print(f"{'benchmark':10s} {'router':7s} {'APGR':>22s} {'CPT(50%)':>14s} {'CPT(80%)':>14s}")
    for r in results:
        p, rn, orc = (r["routers"][k] for k in ("p2l", "random", "oracle"))
        ci = p["apgr_ci95"]
        rows = (("P2L", num(p["apgr"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""), pct(p["cpt50"]), pct(p["cpt80"])),
                ("random", num(rn["apgr"], rn["apgr_sd"]), pct(rn["cpt50"], rn["cpt50_sd"]), pct(rn["cpt80"], rn["cpt80_sd"])),
                ("oracle", num(orc["apgr"]), pct(orc["cpt50"]), pct(orc["cpt80"])))
        for name, apgr, c50, c80 in rows:
            print(f"{r['title']:10s} {name:7s} {apgr:>22s} {c50:>14s} {c80:>14s}")
    for r in results:
        print(f"  {r['title']}: {r['questions']} questions ({r['dropped_contaminated']} contaminated dropped, "
              f"{r['without_predictions']} without predictions); weak {r['weak_performance']:.2f}, "
              f"strong {r['strong_performance']:.2f} ({r['unit']})")


def plot_routellm(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], results):
        for key, label, style in (("p2l", "P2L (Δβ)", {"marker": "."}), ("random", "random (mean of draws)", {"marker": "."}),
                                  ("oracle", "oracle", {"marker": "x"})):
            c = r["routers"][key]
            apgr = "-" if c["apgr"] is None else f"{c['apgr']:.3f}"
            ax.plot(c["strong_pct"], c["performance"], label=f"{label}, APGR {apgr}", **style)
        ax.axhline(r["strong_performance"], color="red", ls="--", lw=0.8, label=f"strong: {STRONG}")
        ax.axhline(r["weak_performance"], color="grey", ls="--", lw=0.8, label=f"weak: {WEAK}")
        ax.set_title(f"{r['title']}: {r['questions']} questions", fontsize=9)
        ax.set_xlabel("strong model calls (%)")
        ax.set_ylabel(r["unit"], fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
        ax.grid(alpha=0.3)
    save_png(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preds", required=True, help="out-of-fold predictions (cv.py --out DIR): every question scored by a "
                   "P2L that never saw it")
    p.add_argument("--data", default="data/routellm", help="dir with mmlu/gsm8k/mt_bench.jsonl.gz (data/routellm/prepare.py)")
    p.add_argument("--covered-only", action="store_true", help="score only the questions --preds has (cv.py --max-prompts "
                   "predicts a subset); without it a missing question is an error, so a wrong --preds cannot pass for "
                   "a smaller benchmark")
    p.add_argument("--seed", type=int, default=0, help="seeds the random router's draws and the bootstrap: reruns agree")
    p.add_argument("--out", default="out/routellm", help="routellm.json and routellm.png, written as one set")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
