"""Benchmarks: every speed and memory measurement of P2L's stages, in one script. A benchmark imports
the stage it measures (route, aggregate, serve, common); no stage imports this file.

    python bench.py route                                # one routing decision at M=130 vs scipy HiGHS, warm and cold
    python bench.py route --authors /work/peer/p2l       # ... and vs the authors' cvxpy router (needs cvxpy)
    python bench.py aggregate                            # N=10k x M=130 predictions -> leaderboard vs torch L-BFGS
    python bench.py aggregate --authors /work/peer/p2l   # ... and vs the authors' train_aggr_prob, time and memory
    python bench.py serve --checkpoint out/train         # serve.py's decisions/s, batched vs one forward per request
    python bench.py train --batch-size 2 --steps 3       # training pairs/s, grouped by prompt vs one forward per vote
    python bench.py scale --sizes 10000,1500000          # the data stages on synthetic battles at Arena size
    python bench.py route-scale 1500000                  # route.py end to end on N synthetic prompts (and on 10k)
    python bench.py aggregate-scale 1500000 --bootstrap 200   # aggregate.py --preds likewise

Each writes <--out>/<subcommand>.json. WARM: the same call repeated in one process (best of a few loops:
a hot loop, caches and allocators warm). COLD: one call in a fresh Python process whose imports are
done but which has run nothing yet (the median of --cold processes): what a new instance pays on its
first request. Peak memory is always a fresh process's (ru_maxrss, with its worker processes).
Answers are checked against each other in the same run (objective or coefficient gaps are printed).

--authors DIR: a checkout of the paper's code (github.com/lmarena/p2l). Its functions are imported from
DIR at run time, never copied here: p2l/auto_eval_utils.py train_aggr_prob (which imports pandas and
transformers) and route/cost_optimizers.py OptimalLPCostOptimizer (which needs cvxpy; neither is a
dependency of this project: install them beside it, e.g. a venv that sees this one's packages).

scale: synthetic battles (prompt texts are slices of the bundled real prompts, lengths resampled from
theirs, plus a 3% tail of 1k-8k-token prompts as in Arena; --unique of the battles have a prompt of
their own; models by a Zipf-like popularity; outcomes from a random grounded-RK leaderboard), each
stage in a fresh process:
  index     train.index_votes: one streaming pass, votes as flat arrays (no prompt text held)
  parquet   the same battles as an Arena-schema parquet file (conversation_a, winner, id, language;
            row groups of 50k), read by train.index_votes through C.read_parquet's record batches
  tokenize  train.token_cache with one worker per CPU on the first --tokenize-prompts unique prompts;
            at sizes above that the time for all prompts is EXTRAPOLATED from the measured tokens/s
  sampler   one epoch of C.token_batches (--max-tokens, length-grouped) and of the fixed-count
            random sampler (--batch-size, train.py's default); padding fraction of each. Above
            --tokenize-prompts, the lengths of the rest are resampled from the tokenized ones
  train     --steps real optimizer steps of a small random BERT (MiniLM tokenizer and vocabulary,
            2 layers, grk head on all models) with each sampler, on the tokenized prompts clipped to
            their last --train-len tokens: useful (non-pad) tokens/s and padding of the batches run
"""
import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linprog
from scipy.special import expit

import common as C
import train as TR
from aggregate import all_pairs, leaderboard_rows, mean_pair_probs, solve_many
from route import read_model_numbers, route_all, route_one, solve_theta_many, win_rates

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# the one fresh-process runner: a script's argv in a new Python process, its wall time and peak memory.
# The script runs as __main__ (runpy), so a stage is measured exactly as a user runs it; the peak is read
# in that process after the script ends (also when it exits by sys.exit), its worker processes included.
# The peak is /proc's VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss over fork and exec, so a
# child's ru_maxrss is at least the parent's peak when it started (measured: 811 MiB for an empty child
# of an 800 MiB parent, whose VmHWM was 9 MiB). Its workers' ru_maxrss is bounded by its own peak at fork.
RUNNER = """import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM:'))
    print('PEAK_RSS_KB', max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)
"""


def fresh(script, *argv):
    """(wall seconds, peak RSS in MiB, the dict of its last `RESULT {json}` stdout line or None)."""
    t0 = time.perf_counter()
    path = os.pathsep.join([str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", RUNNER, str(script), *map(str, argv)], capture_output=True, text=True,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=path))  # runpy adds no dir to sys.path
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(map(str, argv))} failed:\n{r.stderr[-3000:]}")
    rss = int(r.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 1024  # Linux reports KiB
    results = [line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    return secs, rss, (json.loads(results[-1]) if results else None)


def maxrss_kib():
    """This process's own peak resident memory (VmHWM: see RUNNER on why not ru_maxrss)."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))


def child_result(t, answer, rss_before_kib):
    """A cold child's RESULT line: the call's (wall, CPU) seconds, its answer, how far the call raised the peak RSS."""
    peak = maxrss_kib()
    print("RESULT " + json.dumps({"seconds": t[0], "cpu_seconds": t[1], "answer": answer, "rss_before_mib": rss_before_kib / 1024,
                                  "peak_rss_mib": peak / 1024, "call_rss_mib": (peak - rss_before_kib) / 1024}))


def timed(f):
    """((wall seconds, CPU seconds of this process), f()). On a busy machine the wall time holds the waits
    for a core; the CPU time does not (it adds up the process's threads), so both are reported."""
    w, c = time.perf_counter(), time.process_time()
    out = f()
    return (time.perf_counter() - w, time.process_time() - c), out


def best_of(f, reps):
    """((the fastest wall time, the least CPU time) of reps calls of f, the result of the fastest)."""
    runs = [timed(f) for _ in range(reps)]
    return (min(t[0] for t, _ in runs), min(t[1] for t, _ in runs)), min(runs, key=lambda r: r[0][0])[1]


def save(a, name, obj):
    C.write_json(Path(a.out) / f"{name}.json", C.finite_or_none(obj))
    print(f"-> {Path(a.out) / f'{name}.json'}")

# -----------------------------------------------------------------------------
# the authors' code, imported from their checkout (--authors DIR)


def authors_aggregate(d):
    """Their aggregation, as their evaluation calls it (aggr_p2l): train_aggr_prob(model_list,
    HeadOutputs(coefs=β [N, M]), labels, "bt", is_batch=False) -> coefs [1, M]; labels are unused for bt."""
    sys.path.append(str(Path(d) / "p2l"))  # their modules import each other by bare name (`from model import ...`)
    import auto_eval_utils
    import model as their_model

    def theirs(beta, models):
        coefs, _ = auto_eval_utils.train_aggr_prob(models, their_model.HeadOutputs(coefs=beta), None, "bt", is_batch=False)
        return coefs[0].double()
    return theirs


def authors_router(d):
    """Their OptimalLPCostOptimizer (route/cost_optimizers.py: W, Wq, then a cvxpy LP per request). Their
    package is named `route` like this project's route.py, so it holds that name only while it imports."""
    ours = sys.modules["route"]
    pkg = types.ModuleType("route")
    pkg.__path__ = [str(Path(d) / "route")]
    sys.modules["route"] = pkg
    try:
        mod = importlib.import_module("route.cost_optimizers")
    finally:
        sys.modules["route"] = ours
        sys.modules.pop("route.utils", None)
        sys.modules.pop("route.cost_optimizers", None)
    return mod.OptimalLPCostOptimizer


def authors_pi(select, *args):
    """The distribution their select_model samples from (it returns only the sampled name): np.random.choice
    is watched for the one call (checks only, never timed)."""
    seen = []
    real = np.random.choice
    np.random.choice = lambda names, p: seen.append(np.asarray(p)) or names[int(np.argmax(p))]
    try:
        select(*args)
    finally:
        np.random.choice = real
    return seen[0]

# -----------------------------------------------------------------------------
# route: one routing decision from β at M models (what serve.py runs per request), a batch of prompts


def lp_route(s, c, budget):
    """The same program by scipy's HiGHS LP solver. Its status says whether it solved; the objective
    value says nothing about that (the authors' code reads it as a status)."""
    res = linprog(-s, A_ub=c[None], b_ub=[budget], A_eq=np.ones((1, len(s))), b_eq=[1.0], bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"linprog: {res.message}")
    return res.x, -res.fun


def route_instance(seed, M, n):
    """n prompts' β (a shared leaderboard + per-prompt deviations), costs log-uniform over 1..100, the median
    cost as the budget (where mixing two models is common), uniform opponents."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(0, 1, M) + rng.normal(0, 1.5, (n, M))
    c = np.exp(rng.uniform(0, math.log(100), M))
    return beta, c, float(np.median(c)), np.full(M, 1.0 / M)


def deciders(a, c, budget, q):
    """name -> f(β): one decision, W built inside as a request does. Ours and HiGHS return the predicted win
    rate π·Wq; the authors' router returns the sampled model's name, and cvxpy_objective its π·Wq (checks)."""
    def highs(b):
        return lp_route(expit(b[:, None] - b[None, :]) @ q, c, budget)[1]

    def full_wq(b):  # the whole Wq first, as route.py's batch path does
        s = win_rates(b[None], q)
        i, j, w = route_all("optimal", b[None], s, c, budget)
        return w[0] * s[0, i[0]] + (1 - w[0]) * s[0, j[0]]
    out = {"ours": lambda b: route_one("optimal", b, q, c, budget)[3], "ours_full_wq": full_wq, "highs": highs}
    if a.authors:
        Opt = authors_router(a.authors)
        names = [f"model-{k:03d}" for k in range(len(c))]

        def cvxpy(b):  # a new optimizer instance per request; their W, Wq, Problem and solve
            return Opt().select_model(budget, names, c, b, b, q)
        out["cvxpy"] = cvxpy
        out["cvxpy_objective"] = lambda b: float(authors_pi(cvxpy, b) @ (expit(b[:, None] - b[None, :]) @ q))
    return out


def route_child(a):
    """A cold sample: one decision in this fresh process (imports done, nothing run yet)."""
    name, k = a.child.split(":")
    beta, c, budget, q = route_instance(a.seed, a.m, a.batch)
    f = deciders(a, c, budget, q)[name]
    before = maxrss_kib()
    t, _ = timed(lambda: f(beta[int(k)]))
    child_result(t, None, before)


def bench_route(a):
    beta, c, budget, q = route_instance(a.seed, a.m, a.batch)
    f = deciders(a, c, budget, q)
    n_lp = min(200, a.loop, a.batch)
    names = ["ours", "ours_full_wq", "highs"] + (["cvxpy"] if a.authors else [])

    def loop(g, n):  # per decision, on n different prompts
        t, _ = best_of(lambda: [g(beta[z]) for z in range(n)], 3)
        return [x / n for x in t]
    warm = {k: loop(f[k], min(a.loop, a.batch) if k.startswith("ours") else n_lp) for k in names}
    ref = [f["highs"](beta[z]) for z in range(n_lp)]
    gap = {k: max(abs(f[k if k != "cvxpy" else "cvxpy_objective"](beta[z]) - ref[z]) for z in range(n_lp))
           for k in names if k != "highs"}
    t0 = time.perf_counter()  # a batch: win_rates + route_all + θ* for all prompts at once
    Wq = win_rates(beta, q)
    I, J, Wt = route_all("optimal", beta, Wq, c, budget)
    z = np.arange(a.batch)
    R = Wt * Wq[z, I] + (1 - Wt) * Wq[z, J]
    solve_theta_many(beta, q, R, np.minimum(beta[z, I], beta[z, J]), np.maximum(beta[z, I], beta[z, J]))
    t_batch = (time.perf_counter() - t0) / a.batch
    gap["batch"] = max(abs(R[z] - ref[z]) for z in range(n_lp))
    cold = {}
    for k in (names if a.cold else []):
        extra = (["--authors", a.authors] if a.authors else []) + (["--threads", a.threads] if a.threads else [])
        runs = [fresh(__file__, "route", "--child", f"{k}:{s}", "--m", a.m, "--batch", a.batch, "--seed", a.seed, *extra)[2]
                for s in range(a.cold)]
        cold[k] = [float(np.median([r["seconds"] for r in runs])), float(np.median([r["cpu_seconds"] for r in runs]))]
    out = {"models": a.m, "threads": torch.get_num_threads(), "budget": budget, "warm_wall_cpu_s": warm,
           "cold_wall_cpu_s": cold, "cold_processes": a.cold, "batch_prompts": a.batch, "batch_s_per_prompt": t_batch,
           "max_abs_objective_gap_vs_highs": gap, "loop_decisions": {"ours": min(a.loop, a.batch), "others": n_lp},
           "load_average": os.getloadavg()}
    print_route(out)
    save(a, "route", out)
    return out


def print_route(r):
    w, c = r["warm_wall_cpu_s"], r["cold_wall_cpu_s"]
    print(f"routing decision at M={r['models']} ({r['threads']} torch threads), budget {r['budget']:.3g}, load average "
          f"{r['load_average'][0]:.1f}; predicted win rate equal to HiGHS's within "
          f"{max(r['max_abs_objective_gap_vs_highs'].values()):.1e}:")
    print(f"  {'µs per decision':34s} {'warm wall':>10s} {'warm CPU':>10s} {'cold wall':>10s} {'cold CPU':>10s}")
    label = {"ours": "ours (route_one)", "ours_full_wq": "ours, whole Wq (route_all)",
             "highs": "W + scipy linprog(highs)", "cvxpy": "authors' OptimalLPCostOptimizer"}
    for k in w:
        cold = "".join(f"{x * 1e6:11.1f}" for x in c[k]) if k in c else f"{'-':>11s}{'-':>11s}"
        print(f"  {label[k]:34s}{w[k][0] * 1e6:11.1f}{w[k][1] * 1e6:11.1f}{cold}")
    for k in ("highs", "cvxpy"):
        if k in w:
            print(f"  {k} / ours: warm {w[k][0] / w['ours'][0]:.1f}x (CPU {w[k][1] / w['ours'][1]:.1f}x)" +
                  (f", cold {c[k][0] / c['ours'][0]:.1f}x (CPU {c[k][1] / c['ours'][1]:.1f}x)" if k in c else ""))
    print(f"  {r['batch_prompts']} prompts at once (+ θ*): {r['batch_s_per_prompt'] * 1e6:.2f} µs per prompt, "
          f"{w['highs'][0] / r['batch_s_per_prompt']:.0f}x HiGHS per prompt")

# -----------------------------------------------------------------------------
# aggregate: N x M per-prompt coefficients -> the leaderboard (bt)


def agg_instance(seed, N, M):
    torch.manual_seed(seed)
    return (1.5 * torch.randn(M) + torch.randn(N, M)).float(), [f"m{k}" for k in range(M)]


def ours_aggregate(beta, models):
    """Ours as a user waits for it: the mean pairwise matrix, Newton, then the board's rows."""
    bb, _ = solve_many(beta, None, "bt", torch.ones(1, len(beta), dtype=torch.float64))
    leaderboard_rows(models, bb[0])
    return bb[0]


def agg_child(a):
    beta, models = agg_instance(a.seed, a.n, a.m)
    f = ours_aggregate if a.child == "ours" else authors_aggregate(a.authors)
    before = maxrss_kib()
    t, b = timed(lambda: f(beta, models))
    child_result(t, (b - b.mean()).tolist(), before)


def lbfgs_baseline(beta, want):
    """What a torch user writes: the per-prompt pairwise probabilities as one [N, P] tensor and torch L-BFGS
    on their cross-entropy summed over all prompts; timed to the first evaluation within 1e-6 of ours."""
    N, M = beta.shape
    a, b = all_pairs(M)
    t0 = time.perf_counter()
    bd = beta.double()
    probs = torch.sigmoid(bd[:, a] - bd[:, b])
    x = torch.zeros(M, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, max_eval=1000, tolerance_grad=1e-10, tolerance_change=0,
                            history_size=20, line_search_fn="strong_wolfe")
    hit, trace = [], []

    def closure():
        opt.zero_grad()
        d = x[a] - x[b]
        f = -(probs * F.logsigmoid(d) + (1 - probs) * F.logsigmoid(-d)).sum() / N
        f.backward()
        if not hit and ((x.detach() - x.detach().mean()) - want).abs().max() <= 1e-6:
            hit.append((time.perf_counter() - t0, len(trace) + 1))
        trace.append(f.item())
        return f
    opt.step(closure)  # runs on to its own tolerance
    xl = x.detach()
    return {"lbfgs_s": hit[0][0] if hit else math.nan, "lbfgs_evals_to_1e-6": hit[0][1] if hit else None,
            "lbfgs_evals": len(trace), "lbfgs_total_s": time.perf_counter() - t0,
            "lbfgs_gap": ((xl - xl.mean()) - want).abs().max().item()}


def division_rate():
    """Divisions per second on this CPU, one thread, in cache: the φ form's floor is one per pair."""
    x = torch.rand(2 ** 17, dtype=torch.float64) + 1
    with C.torch_threads(1):
        t = best_of(lambda: [x.reciprocal_() for _ in range(50)], 3)[0][0]
    return 50 * x.numel() / t


def bench_aggregate(a):
    beta, models = agg_instance(a.seed, a.n, a.m)
    P = a.m * (a.m - 1) // 2
    t_ours, bn = best_of(lambda: ours_aggregate(beta, models), 3)
    t_mean = best_of(lambda: mean_pair_probs(beta, None, "bt"), 3)[0][0]
    want = bn - bn.mean()
    out = {"N": a.n, "M": a.m, "head": "bt", "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
           "ours_s": t_ours[0], "ours_cpu_s": t_ours[1], "mean_pairs_s": t_mean, "pairs_per_s": a.n * P / t_mean,
           "division_per_s_one_thread": division_rate(), **lbfgs_baseline(beta, want)}
    out["ratio_lbfgs"] = out["lbfgs_s"] / t_ours[0]
    if a.authors:
        theirs = authors_aggregate(a.authors)
        (out["authors_s"], out["authors_cpu_s"]), bt = best_of(lambda: theirs(beta, models), 2)
        out["authors_gap"] = ((bt - bt.mean()) - want).abs().max().item()
        out["ratio_authors"] = out["authors_s"] / t_ours[0]
    extra = (["--authors", a.authors] if a.authors else []) + (["--threads", a.threads] if a.threads else [])
    for who in (["ours", "authors"] if a.authors else ["ours"]) if a.cold else []:
        runs = [fresh(__file__, "aggregate", "--child", who, "--n", a.n, "--m", a.m, "--seed", a.seed, *extra)[2]
                for _ in range(a.cold)]
        out[f"{who}_cold_s"] = float(np.median([r["seconds"] for r in runs]))
        out[f"{who}_cold_cpu_s"] = float(np.median([r["cpu_seconds"] for r in runs]))
        out[f"{who}_call_rss_mib"] = max(r["call_rss_mib"] for r in runs)
        out[f"{who}_peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        out[f"{who}_cold_gap"] = float(np.abs(np.array(runs[0]["answer"]) - want.numpy()).max())
    print_aggregate(out)
    save(a, "aggregate", out)
    return out


def print_aggregate(r):
    print(f"aggregation (bt) of N={r['N']} prompts x M={r['M']} models, {r['threads']} threads, load average "
          f"{r['load_average'][0]:.1f}, from the [N, M] predictions to the leaderboard:")

    def times(who):
        line = f"warm {r[f'{who}_s']:.3f} s (CPU {r[f'{who}_cpu_s']:.3f} s)"
        if f"{who}_cold_s" in r:
            line += (f"; cold {r[f'{who}_cold_s']:.3f} s (CPU {r[f'{who}_cold_cpu_s']:.3f} s), the call raised the peak "
                     f"RSS by {r[f'{who}_call_rss_mib']:.0f} MiB (process peak {r[f'{who}_peak_rss_mib']:.0f} MiB)")
        return line
    print(f"  ours (mean pairwise matrix + Newton + rows): {times('ours')}")
    print(f"    the mean matrix alone {r['mean_pairs_s']:.3f} s: {r['pairs_per_s'] / 1e6:.0f} M pairs/s; one division, in "
          f"cache, one thread: {r['division_per_s_one_thread'] / 1e6:.0f} M/s")
    print(f"  torch L-BFGS over the per-prompt [N, P] probabilities: {r['lbfgs_s']:.3f} s to within 1e-6 of ours "
          f"({r['lbfgs_evals_to_1e-6'] or '-'} of {r['lbfgs_evals']} evaluations; {r['lbfgs_total_s']:.1f} s in all; "
          f"final gap {r['lbfgs_gap']:.1e})")
    print(f"ratio L-BFGS / ours end to end: {r['ratio_lbfgs']:.1f}x")
    if "authors_s" in r:
        print(f"  authors' train_aggr_prob (float32 L-BFGS over [N, P]): {times('authors')}; centred coefficients "
              f"differ from ours by at most {r['authors_gap']:.1e}")
        line = f"ratio authors / ours: warm {r['ratio_authors']:.0f}x (CPU {r['authors_cpu_s'] / r['ours_cpu_s']:.0f}x)"
        if "authors_cold_s" in r:
            cpu = r["authors_cold_cpu_s"] / r["ours_cold_cpu_s"]
            line += (f", cold {r['authors_cold_s'] / r['ours_cold_s']:.0f}x (CPU {cpu:.0f}x); "
                     f"peak RSS raised by the call {r['authors_call_rss_mib']:.0f} vs "
                     f"{r['ours_call_rss_mib']:.0f} MiB, process peak {r['authors_peak_rss_mib'] / r['ours_peak_rss_mib']:.1f}x")
        print(line)

# -----------------------------------------------------------------------------
# serve: routing decisions/s and added latency of serve.py's Service, batched vs one forward per request


async def serve_cell(svc, prompts, budget, clients, n):
    """n routing decisions by `clients` concurrent callers: (decisions/s, latencies in ms, forward-pass counters)."""
    await svc.start()
    lat, nxt = [], iter(range(n))

    async def client():
        for k in nxt:
            t = time.perf_counter()
            await svc.route(prompts[k % len(prompts)], budget)
            lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    stats = dict(svc.stats)
    await svc.stop()
    return n / wall, [1000 * x for x in lat], stats


def serve_setup(a):
    """(serve's args for the Service, the model, its tokenizer, the upstream table, prompts, budget). The
    Service reads serve.py's own defaults, so they come from serve.py's parser; no upstream is called."""
    import serve
    from route import read_prompts
    ml = C.checkpoint_config(a.checkpoint)[0]["model_list"]
    if a.models:
        ups = serve.read_models(a.models, ml)
    else:
        costs = read_model_numbers(a.costs, "cost")
        missing = [m for m in ml if m not in costs]
        if missing:
            raise ValueError(f"{a.costs}: no cost for {len(missing)} of the checkpoint's models (pass --models)")
        ups = {m: {"base_url": "http://unused", "model": m, "cost": costs[m], "key": None} for m in ml}
    budget = a.budget if a.budget is not None else float(np.median([u["cost"] for u in ups.values()]))
    sargs = serve.parse_args(["--checkpoint", a.checkpoint, "--models", a.models or a.costs, "--budget", repr(budget),
                              "--max-batch", str(a.max_batch), "--batch-wait-ms", str(a.batch_wait_ms),
                              "--max-padding", str(a.max_padding)] + (["--loss", a.loss] if a.loss else []))
    prompts = [p["prompt"] for p in read_prompts(a.prompts)]
    model, tok = C.load_checkpoint(a.checkpoint, loss=a.loss)
    return sargs, model.to(C.autodetect_device()), tok, ups, prompts, budget


def bench_serve(a):
    import serve
    sargs, model, tok, ups, prompts, budget = serve_setup(a)
    ml, threads = model.p2l["model_list"], torch.get_num_threads()
    print(f"routing decisions on {a.checkpoint} ({model.model.config.model_type}, {len(ml)} models, {len(ups)} routable), "
          f"{next(model.parameters()).device.type}, {threads} torch threads; budget {budget:g}; prompts from {a.prompts}; "
          f"{a.requests} decisions per run, {a.reps} runs per cell alternating the two modes (median decisions/s; "
          f"p50/p99 over all runs)")
    rows = []
    for clients in a.clients:
        runs = {"single": [], "batched": []}
        for _ in range(a.reps):  # alternate, so that a busy spell on the machine hits both modes
            for mode, most, wait in (("single", 1, 0.0), ("batched", a.max_batch, a.batch_wait_ms)):
                s = argparse.Namespace(**{**vars(sargs), "max_batch": most, "batch_wait_ms": wait})
                runs[mode].append(asyncio.run(serve_cell(serve.Service(model, tok, s, ups), prompts, budget, clients,
                                                         a.requests)))
        cell = {"clients": clients}
        for mode, rs in runs.items():
            ms = np.concatenate([r[1] for r in rs])
            cell[mode] = {"decisions_per_s": round(float(np.median([r[0] for r in rs])), 2),
                          "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
                          "mean_batch": round(sum(r[2]["prompts"] for r in rs) / sum(r[2]["batches"] for r in rs), 2),
                          "prompts_per_forward": round(sum(r[2]["prompts"] for r in rs) / sum(r[2]["forward_passes"] for r in rs), 2),
                          "runs_decisions_per_s": [round(r[0], 2) for r in rs]}
        cell["ratio"] = round(cell["batched"]["decisions_per_s"] / cell["single"]["decisions_per_s"], 2)
        rows.append(cell)
    print_serve(a, rows)
    out = {"checkpoint": a.checkpoint, "models": len(ml), "routable": len(ups), "device": next(model.parameters()).device.type,
           "torch_threads": threads, "budget": budget, "requests_per_run": a.requests, "runs": a.reps,
           "max_batch": a.max_batch, "batch_wait_ms": a.batch_wait_ms, "max_padding": a.max_padding, "cells": rows}
    save(a, "serve", out)
    return out


def print_serve(a, rows):
    print(f"{'clients':>7s} | {'one forward per request':^30s} | "
          f"{f'batched (<= {a.max_batch}, {a.batch_wait_ms:g} ms wait, padding <= {a.max_padding:.0%})':^51s} | ratio")
    print(f"{'':7s} | {'dec/s':>8s} {'p50 ms':>10s} {'p99 ms':>10s} | {'dec/s':>8s} {'p50 ms':>9s} {'p99 ms':>9s} "
          f"{'batch':>6s} {'per fwd':>7s} | (dec/s)")
    for r in rows:
        s, b = r["single"], r["batched"]
        print(f"{r['clients']:7d} | {s['decisions_per_s']:8.1f} {s['p50_ms']:10.1f} {s['p99_ms']:10.1f} | "
              f"{b['decisions_per_s']:8.1f} {b['p50_ms']:9.1f} {b['p99_ms']:9.1f} {b['mean_batch']:6.1f} "
              f"{b['prompts_per_forward']:7.1f} | {r['ratio']:.2f}x")

# -----------------------------------------------------------------------------
# train: the same training micro-batches, grouped by prompt (train.py's way: all votes of a prompt share
# its forward pass) vs one forward pass per vote (the prompt repeated)


def train_setup(a):
    """(model, tokenizer, votes, token cache, micro-batches of prompt numbers, device, autocast)."""
    votes = TR.index_votes(a.train, a.loss)
    tok, backbone = TR.load_backbone(a.model)
    pooling = C.default_pooling(tok)
    cls_id = TR.add_cls_token(tok, backbone) if pooling == "last" else None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    p2l = {"model_list": votes["models"], "loss": a.loss, "pooling": pooling, "max_len": a.max_len,
           "cls_token": C.CLS_TOKEN if pooling == "last" else None}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = C.P2LModel(backbone, p2l).to(device)  # the head's start does not change what a step costs
    ids = TR.token_cache(a.train, tok, TR.Encoding(a.max_len, pooling, cls_id), log=lambda *x: None)
    prompts = np.unique(votes["pairs"]["row"].numpy())
    order = list(range(len(prompts)))
    random.Random(a.seed).shuffle(order)  # train.py's --batch-size sampler, epoch 0
    batches = [prompts[order[i:i + a.batch_size]] for i in range(0, len(order), a.batch_size)][:a.steps + 1]
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return model, tok, votes, ids, batches, device, autocast


def bench_train(a):
    torch.manual_seed(a.seed)
    model, tok, votes, ids, batches, device, autocast = train_setup(a)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    model.train()
    out = {}
    for mode in ("grouped", "per_pair"):
        n_pairs, t0 = 0, None
        for i, batch in enumerate(batches):
            if i == 1:  # the first micro-batch warms up allocators and kernels, untimed
                t0 = time.perf_counter()
            pairs = TR.pairs_of(votes, batch)
            seqs = [ids[k] for k in batch]
            if mode == "per_pair":
                seqs = [seqs[r] for r in pairs["row"].tolist()]
                pairs["row"] = torch.arange(len(seqs))
            x, m = C.collate(seqs, tok.pad_token_id)
            with autocast():
                beta, eta = model(x.to(device), m.to(device))
            s, w = C.batch_nll(beta, eta, {k: v.to(device) for k, v in pairs.items()}, a.loss)
            (s / w.clamp_min(1e-12)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            n_pairs += len(pairs["a"]) if i >= 1 else 0
        out[mode] = n_pairs / (time.perf_counter() - t0)
        print(f"{mode:9s}: {out[mode]:8.2f} training pairs/s over {len(batches) - 1} micro-batches of {a.batch_size} prompts")
    out["ratio"] = out["grouped"] / out["per_pair"]
    print(f"grouped / per-pair = {out['ratio']:.1f}x ({a.model}, {device})")
    save(a, "train", dict(out, model=a.model, device=device, batch_size=a.batch_size, micro_batches=len(batches) - 1))
    return out

# -----------------------------------------------------------------------------
# route-scale, aggregate-scale: the stage end to end on N synthetic prompts x 130 models, and on --small


def synthetic_run(d, N, M=130, seed=0, block=100_000):
    """Files for route.py / aggregate.py on N synthetic prompts x M models in dir d: predictions (β = a shared
    leaderboard + per-prompt deviations), prompts.jsonl, costs.json (log-uniform over 1..100).
    Returns the budget of a routed run (the median cost, where mixing is common)."""
    d = Path(d)
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, M)
    beta = torch.empty(N, M)
    for s in range(0, N, block):
        beta[s:s + block] = torch.from_numpy((base + rng.normal(0, 1.5, (min(block, N - s), M))).astype(np.float32))
    models = [f"model-{k:03d}" for k in range(M)]
    C.save_predictions(d, beta, None, models, [{"prompt": [f"synthetic prompt {i}"]} for i in range(N)])
    with open(d / "prompts.jsonl", "w") as f:
        for s in range(0, N, block):
            f.write("".join(f'{{"prompt": "synthetic prompt {i}", "id": {i}}}\n' for i in range(s, min(s + block, N))))
    c = np.exp(rng.uniform(0, math.log(100), M))
    (d / "costs.json").write_text(json.dumps({"_about": "synthetic", **dict(zip(models, c.tolist()))}))
    return float(np.median(c))


def stage_scale(a, stage):
    """route.py (budgeted) or aggregate.py (--bootstrap) in a fresh process at --small and N prompts."""
    rows = []
    for n in sorted({a.small, a.n}):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            budget = synthetic_run(d, n, seed=a.seed)
            t_files = time.perf_counter() - t0
            argv = (["--preds", d, "--prompts", f"{d}/prompts.jsonl", "--costs", f"{d}/costs.json", "--budget", budget]
                    if stage == "route" else ["--preds", d, "--bootstrap", a.bootstrap])
            secs, rss, _ = fresh(HERE / f"{stage}.py", *argv, "--out", f"{d}/out")
        rows.append({"prompts": n, "models": 130, "seconds": secs, "peak_rss_gib": rss / 1024, "files_s": t_files,
                     **({"bootstrap": a.bootstrap} if stage == "aggregate" else {})})
        what = "budgeted" if stage == "route" else f"{a.bootstrap} bootstrap resamples"
        print(f"{stage}.py, {n} prompts x 130 models, {what}: {secs:.1f} s, peak RSS {rss / 1024:.2f} GiB "
              f"(writing the synthetic files: {t_files:.1f} s, not counted)", flush=True)
    out = {"runs": rows}
    if len(rows) == 2:
        out["time_growth_vs_linear"] = (rows[1]["seconds"] / rows[0]["seconds"]) / (rows[1]["prompts"] / rows[0]["prompts"])
        print(f"time grew {rows[1]['seconds'] / rows[0]['seconds']:.1f}x for {rows[1]['prompts'] / rows[0]['prompts']:.0f}x "
              f"the prompts ({out['time_growth_vs_linear']:.2f} of linear)")
    save(a, f"{stage}_scale", out)
    return out

# -----------------------------------------------------------------------------
# scale: synthetic battles at Arena size, each data stage in a fresh process (module docstring)


def real_prompts():
    texts = [" ".join(b["prompt"]) for f in ("data/alpaca_eval/train.jsonl.gz", "data/alpaca_eval/val.jsonl.gz")
             for b in C.read_battles(HERE / f)]
    texts += [" ".join(r["turns"]) for _, r in C.read_jsonl(HERE / "data/livebench/questions.jsonl.gz")]
    return list(dict.fromkeys(texts))


def generate(a, n, path, head_path):
    """n battles as JSONL; head_path gets the first lines up to --tokenize-prompts unique prompts."""
    rng = np.random.default_rng(a.seed)
    texts = real_prompts()
    corpus = "\n\n".join(texts)
    lens = np.array([len(t) for t in texts])
    n_unique = max(1, int(a.unique * n))
    # char lengths: resampled from the real prompts, 3% from a log-uniform 4k-32k chars (~1k-8k tokens)
    L = rng.choice(lens, n_unique)
    tail = rng.random(n_unique) < 0.03
    L[tail] = np.exp(rng.uniform(math.log(4000), math.log(32000), tail.sum())).astype(int)
    L = np.minimum(L, len(corpus) - 1)
    start = (rng.random(n_unique) * (len(corpus) - L)).astype(int)
    prompt = np.concatenate([np.arange(n_unique), rng.integers(0, n_unique, n - n_unique)])
    prompt = prompt[rng.permutation(n)]
    pop = 1.0 / np.arange(1, a.models + 1) ** 0.8
    ma = rng.choice(a.models, n, p=pop / pop.sum())
    mb = (ma + rng.integers(1, a.models, n)) % a.models
    beta, eta = rng.normal(0, 1, a.models), -0.5
    phi_a, phi_b, theta = np.exp(beta[ma]), np.exp(beta[mb]), 1 + math.exp(eta)
    pa, pb, pbad = phi_a / (phi_a + theta * phi_b + 1), phi_b / (phi_b + theta * phi_a + 1), 1 / (1 + phi_a + phi_b)
    u = rng.random(n)
    winner = np.select([u < pa, u < pa + pb, u < pa + pb + pbad], [0, 1, 3], 2)
    names = [f"model-{i:03d}" for i in range(a.models)]
    wname = ["model_a", "model_b", "tie", "tie (bothbad)"]
    seen = set()
    with open(path, "w") as f, open(head_path, "w") as h:
        for i in range(n):
            z = int(prompt[i])
            text = f"#{z} " + corpus[start[z]:start[z] + L[z]]
            line = json.dumps({"prompt": text, "model_a": names[ma[i]], "model_b": names[mb[i]], "winner": wname[winner[i]]}) + "\n"
            f.write(line)
            if len(seen) < a.tokenize_prompts:
                seen.add(z)
                h.write(line)
    return n_unique


def to_parquet(path, pq_path, rows_per_group=50_000):
    """The JSONL battles as a parquet file in LMArena's schema (conversation_a as role/content turns,
    winner, id, language), written row group by row group: never the whole file in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("model_a", pa.string()), ("model_b", pa.string()), ("winner", pa.string()),
                        ("conversation_a", pa.list_(turn)), ("language", pa.string())])
    with open(path) as f, pq.ParquetWriter(pq_path, schema) as w:
        buf = []
        for i, line in enumerate(f):
            r = json.loads(line)
            buf.append({"id": f"b{i}", "model_a": r["model_a"], "model_b": r["model_b"], "winner": r["winner"],
                        "conversation_a": [{"role": "user", "content": r["prompt"]}], "language": "English"})
            if len(buf) == rows_per_group:
                w.write_table(pa.Table.from_pylist(buf, schema))
                buf = []
        if buf:
            w.write_table(pa.Table.from_pylist(buf, schema))


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TR.offline_backbone("minilm")[0])


def stage_index(a, n):
    t0 = time.perf_counter()
    v = TR.index_votes(Path(a.out) / f"battles-{n}.jsonl", "grk")
    return {"seconds": time.perf_counter() - t0, "battles": v["n_battles"], "prompts": v["n_prompts"],
            "models": len(v["models"])}


def stage_parquet(a, n):
    """index_votes on the same battles as Arena-schema parquet (C.read_parquet streams record batches)."""
    t0 = time.perf_counter()
    v = TR.index_votes(Path(a.out) / f"battles-{n}.parquet", "grk")
    return {"seconds": time.perf_counter() - t0, "battles": v["n_battles"], "prompts": v["n_prompts"],
            "models": len(v["models"]), "batch_rows": C.PARQUET_BATCH}


def stage_tokenize(a, n):
    root = Path(a.out) / f"cache-{n}"
    shutil.rmtree(root, ignore_errors=True)  # time a build, not a reuse
    t0 = time.perf_counter()
    c = TR.token_cache(Path(a.out) / f"battles-{n}-head.jsonl", tokenizer(), TR.Encoding(a.max_len, "mean"), root=root, log=lambda *x: None)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "prompts": len(c), "tokens": int(c.offsets[-1]), "tokens_per_s": c.offsets[-1] / secs,
            "workers": c.meta["workers"], "disk_mib": (c.tokens.nbytes + c.offsets.nbytes) / 2 ** 20}


def lengths_for(a, n, n_unique):
    """Token lengths of all n_unique prompts: the tokenized ones, the rest resampled from them."""
    root = Path(a.out) / f"cache-{n}"
    c = TR.TokenCache(next(d for d in root.iterdir() if (d / "meta.json").exists()))
    L = c.lengths
    if n_unique > len(L):
        L = np.concatenate([L, np.random.default_rng(a.seed).choice(L, n_unique - len(L))])
    return L, c


def fixed_batches(a, n_prompts, epoch):
    """train.py's --batch-size sampler: a seeded shuffle cut into fixed-count batches."""
    order = list(range(n_prompts))
    random.Random(a.seed + epoch).shuffle(order)
    return [np.array(order[i:i + a.batch_size]) for i in range(0, n_prompts, a.batch_size)]


def padding_fraction(lengths, batches):
    """Pad tokens / all tokens fed, for right-padded batches of these prompt lengths."""
    lengths = np.asarray(lengths)
    fed = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - sum(int(lengths[b].sum()) for b in batches) / max(fed, 1)


def stage_sampler(a, n, n_unique):
    L, c = lengths_for(a, n, n_unique)
    t0 = time.perf_counter()
    tb = C.token_batches(L, a.max_tokens, seed=a.seed)
    secs = time.perf_counter() - t0
    t0 = time.perf_counter()
    fb = fixed_batches(a, len(L), 0)
    fixed_secs = time.perf_counter() - t0
    pad_t, pad_f = padding_fraction(L, tb), padding_fraction(L, fb)
    return {"seconds": secs, "fixed_seconds": fixed_secs, "prompts": len(L), "batches": len(tb), "fixed_batches": len(fb),
            "padding_token_budget": pad_t, "padding_fixed": pad_f, "padding_cut": pad_f / pad_t,
            "lengths_resampled": len(L) - len(c), "mean_len": float(L.mean()), "max_len": int(L.max())}


def stage_train(a, n):
    from transformers import BertConfig, BertModel
    torch.manual_seed(a.seed)
    tok = tokenizer()
    v = TR.index_votes(Path(a.out) / f"battles-{n}-head.jsonl", "grk")
    _, c = lengths_for(a, n, 0)
    prompts = np.unique(v["pairs"]["row"].numpy())
    clip = np.minimum(c.lengths, a.train_len)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=a.train_len)
    model = C.P2LModel(BertModel(cfg), {"model_list": v["models"], "loss": "grk", "pooling": "mean", "max_len": a.max_len})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    res = {}
    for name, batches in (("fixed", [prompts[b] for b in fixed_batches(a, len(prompts), 0)]),
                          ("token_budget", [prompts[b] for b in C.token_batches(clip[prompts], a.train_max_tokens, seed=a.seed)])):
        useful = fed = 0
        for i, batch in enumerate(batches[:a.steps + 1]):
            if i == 1:  # the first step warms up allocators, untimed
                t0 = time.perf_counter()
            x, m = C.collate([c[j][-a.train_len:] for j in batch], tok.pad_token_id)
            beta, eta = model(x, m)
            s, w = C.batch_nll(beta, eta, TR.pairs_of(v, batch), "grk")
            (s / w.clamp_min(1e-12)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 1:
                useful, fed = useful + int(m.sum()), fed + m.numel()
        secs = time.perf_counter() - t0
        res[name] = {"seconds_per_step": secs / a.steps, "useful_tokens_per_s": useful / secs, "padding": 1 - useful / fed}
    res["useful_tokens_per_s_ratio"] = res["token_budget"]["useful_tokens_per_s"] / res["fixed"]["useful_tokens_per_s"]
    return res


def scale_child(a):
    """One stage in this fresh process: its result as a RESULT line (fresh() reads the peak memory)."""
    n_unique = max(1, int(a.unique * a.size))
    r = {"index": lambda: stage_index(a, a.size), "parquet": lambda: stage_parquet(a, a.size),
         "tokenize": lambda: stage_tokenize(a, a.size),
         "sampler": lambda: stage_sampler(a, a.size, n_unique), "train": lambda: stage_train(a, a.size)}[a.stage]()
    print("RESULT " + json.dumps(r))


def bench_scale(a):
    Path(a.out).mkdir(parents=True, exist_ok=True)
    results = {}
    for n in a.sizes:
        path, head = Path(a.out) / f"battles-{n}.jsonl", Path(a.out) / f"battles-{n}-head.jsonl"
        t0 = time.perf_counter()
        n_unique = generate(a, n, path, head)
        print(f"{n} battles, {n_unique} unique prompts, {a.models} models: generated in {time.perf_counter() - t0:.0f} s "
              f"({path.stat().st_size / 2 ** 20:.0f} MiB)", flush=True)
        if "parquet" in a.stages:
            t0 = time.perf_counter()
            to_parquet(path, Path(a.out) / f"battles-{n}.parquet")
            mib = (Path(a.out) / f"battles-{n}.parquet").stat().st_size / 2 ** 20
            print(f"  as parquet (Arena schema): {time.perf_counter() - t0:.0f} s ({mib:.0f} MiB)", flush=True)
        res = {"battles": n, "unique_prompts": n_unique}
        for stage in a.stages:
            _, rss, res[stage] = fresh(__file__, *a.argv, "--stage", stage, "--size", n)
            res[stage]["peak_rss_mib"] = rss
            print(f"  {stage:8s} {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res[stage].items()})}", flush=True)
        if "tokenize" in res:
            tk = res["tokenize"]
            tk["extrapolated"] = n_unique > tk["prompts"]
            tk["seconds_all"] = tk["seconds"] * n_unique / tk["prompts"]  # tokens/s measured, applied to all prompts
        results[n] = res
        path.unlink()  # GiBs at full size; regenerated from the seed
        head.unlink()
        (Path(a.out) / f"battles-{n}.parquet").unlink(missing_ok=True)
    print_scale(a, results)
    save(a, "scale", {"args": {k: v for k, v in vars(a).items() if k not in ("argv", "func")}, "cpus": os.cpu_count(),
                      "results": results})
    return results


def print_scale(a, results):
    sizes = a.sizes
    rows = [("index: battle file -> flat arrays", "index", "seconds"), ("index: the same as Arena parquet", "parquet", "seconds"),
            ("tokenize (all prompts)", "tokenize", "seconds_all"), ("sampler: one epoch, token budget", "sampler", "seconds"),
            ("train step, token budget", "train", None)]
    rows = [r for r in rows if r[1] in a.stages]
    print(f"\n{'stage':36s}" + "".join(f"{f'{n} s':>12s}{f'{n} MiB':>12s}" for n in sizes)
          + ("  time ratio / size ratio" if len(sizes) > 1 else ""))
    for label, st, key in rows:
        secs = [results[n][st][key] if key else results[n][st]["token_budget"]["seconds_per_step"] for n in sizes]
        rss = [results[n][st]["peak_rss_mib"] for n in sizes]
        line = f"{label:36s}" + "".join(f"{s:12.2f}{r:12.0f}" for s, r in zip(secs, rss))
        if len(sizes) > 1:
            line += f"  {(secs[-1] / secs[0]) / (sizes[-1] / sizes[0]):.2f}" if key else "  (per step: size-independent)"
        print(line)
    for n in (sizes if {"tokenize", "sampler", "train"} <= set(a.stages) else []):
        tk, sa, tr = results[n]["tokenize"], results[n]["sampler"], results[n]["train"]
        print(f"{n}: tokenized {tk['prompts']} prompts, {tk['tokens']} tokens at {tk['tokens_per_s']:.0f} tokens/s "
              f"({tk['workers']} workers){'; all ' + str(results[n]['unique_prompts']) + ' prompts EXTRAPOLATED' if tk['extrapolated'] else ''}; "
              f"padding {sa['padding_fixed']:.1%} (--batch-size {a.batch_size}) -> {sa['padding_token_budget']:.1%} "
              f"(--max-tokens {a.max_tokens}), {sa['padding_cut']:.1f}x less; useful tokens/s in training "
              f"{tr['fixed']['useful_tokens_per_s']:.0f} -> {tr['token_budget']['useful_tokens_per_s']:.0f} "
              f"({tr['useful_tokens_per_s_ratio']:.1f}x)")

# -----------------------------------------------------------------------------
# command line: sizes are whole numbers >= 1 (a size of 0 measures nothing and divides by zero);
# counts of repeats may be 0 where the help says what 0 skips


SCALE_STAGES = ("index", "parquet", "tokenize", "sampler", "train")


def stage_list(s):
    stages = s.split(",")
    if not stages or not set(stages) <= set(SCALE_STAGES):
        raise argparse.ArgumentTypeError(f"choose from {','.join(SCALE_STAGES)}, got {s!r}")
    return stages


def whole(least):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {s!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {s!r}")
        return v
    return parse


def whole_list(s):
    try:
        return [whole(1)(x) for x in s.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be whole numbers >= 1 separated by commas, got {s!r}") from None


def positive(s):
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return v


def add_route(sub):
    p = sub.add_parser("route", help="one routing decision at M models: ours vs scipy HiGHS (and the authors' cvxpy router)")
    p.add_argument("--m", type=whole(2), default=130, help="models (the paper's 130)")
    p.add_argument("--batch", type=whole(1), default=20000, help="prompts routed at once (win_rates + route_all + θ*)")
    p.add_argument("--loop", type=whole(1), default=1000, help="decisions per warm loop for ours (HiGHS and cvxpy: at most 200)")
    p.add_argument("--cold", type=whole(0), default=5, help="fresh processes per method for the cold time (0: skip, no processes)")
    p.add_argument("--authors", metavar="DIR", help="a checkout of lmarena/p2l: also time its OptimalLPCostOptimizer (cvxpy)")
    p.add_argument("--threads", type=whole(1), help="torch threads for every method, in this process and the cold ones "
                   "(default: torch's; on a busy machine 1 is fairer: threads that meet at a barrier wait for time slices)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one cold decision in this fresh process
    p.set_defaults(func=lambda a: route_child(a) if a.child else bench_route(a))


def add_aggregate(sub):
    p = sub.add_parser("aggregate", help="N x M predictions -> the leaderboard (bt): ours vs torch L-BFGS (and the authors')")
    p.add_argument("--n", type=whole(1), default=10000, help="prompts")
    p.add_argument("--m", type=whole(2), default=130, help="models")
    p.add_argument("--cold", type=whole(0), default=1, help="fresh processes per method for the cold time and the "
                   "memory (0: skip, no processes)")
    p.add_argument("--authors", metavar="DIR", help="a checkout of lmarena/p2l: also time its train_aggr_prob")
    p.add_argument("--threads", type=whole(1), help="torch threads for every method, in this process and the cold ones "
                   "(default: torch's; on a busy machine 1 is fairer: threads that meet at a barrier wait for time slices)")
    p.add_argument("--child", choices=("ours", "authors"), help=argparse.SUPPRESS)
    p.set_defaults(func=lambda a: agg_child(a) if a.child else bench_aggregate(a))


def add_serve(sub):
    p = sub.add_parser("serve", help="serve.py's routing decisions/s and latency, batched vs one forward per request")
    p.add_argument("--checkpoint", required=True, help="P2L checkpoint dir (as serve.py's)")
    p.add_argument("--loss", choices=C.LOSSES, help="only for checkpoints without a p2l section (the authors' released ones)")
    p.add_argument("--models", help="serve.py's upstream table (only its costs are used; nothing is called)")
    p.add_argument("--costs", default="data/costs/alpaca_eval.json", help="without --models: these costs per query")
    p.add_argument("--budget", type=positive, help="expected cost per query (default: the median model cost)")
    p.add_argument("--prompts", default="data/alpaca_eval/val.jsonl.gz", help="real prompts, sent in turn")
    p.add_argument("--clients", type=whole_list, default=[1, 8, 32], metavar="N,N,...", help="concurrent callers per cell")
    p.add_argument("--requests", type=whole(1), default=128, help="decisions timed per run")
    p.add_argument("--reps", type=whole(1), default=2, help="runs per mode and client count, alternating the modes")
    p.add_argument("--max-batch", type=whole(1), default=32, help="serve.py's: most prompts in one forward pass")
    p.add_argument("--batch-wait-ms", type=positive, default=2.0, help="serve.py's: how long a batch waits for others")
    p.add_argument("--max-padding", type=positive, default=0.25, help="serve.py's: padding bound of a batch's groups")
    p.set_defaults(func=bench_serve)


def add_train(sub):
    p = sub.add_parser("train", help="training pairs/s, grouped by prompt vs one forward pass per vote")
    p.add_argument("--model", default="minilm", help="backbone, as train.py's --model")
    p.add_argument("--train", default="data/alpaca_eval/train.jsonl.gz", help="battles JSONL(.gz)")
    p.add_argument("--loss", default="bt", choices=C.LOSSES)
    p.add_argument("--steps", type=whole(1), default=3, help="micro-batches timed per mode (after one untimed warm-up)")
    p.add_argument("--batch-size", type=whole(1), default=2, help="prompts per micro-batch")
    p.add_argument("--max-len", type=whole(8), default=256, help="tokens per prompt")
    p.add_argument("--lr", type=positive, default=2e-5)
    p.set_defaults(func=bench_train)


def add_scales(sub):
    for stage in ("route", "aggregate"):
        p = sub.add_parser(f"{stage}-scale", help=f"{stage}.py end to end on N synthetic prompts x 130 models (and on --small)")
        p.add_argument("n", type=whole(1), metavar="N", help="prompts")
        p.add_argument("--small", type=whole(1), default=10000, help="also this many, so growth shows as a ratio")
        if stage == "aggregate":
            p.add_argument("--bootstrap", type=whole(0), default=200, help="aggregate.py's bootstrap resamples")
        p.set_defaults(func=lambda a, stage=stage: stage_scale(a, stage), out_default="out/bench-scale")
    p = sub.add_parser("scale", help="the data stages on synthetic battles at Arena size (module docstring)")
    p.add_argument("--sizes", type=whole_list, default=[10000, 1500000], help="battle counts, comma-separated (small first)")
    p.add_argument("--models", type=whole(2), default=130, help="the paper's model count")
    p.add_argument("--unique", type=float, default=0.85, help="fraction of battles with a prompt of their own")
    p.add_argument("--tokenize-prompts", type=whole(1), default=100_000, help="unique prompts tokenized per size; the rest extrapolated")
    p.add_argument("--max-len", type=whole(8), default=8192, help="tokens kept per prompt (the long tail reaches it)")
    p.add_argument("--max-tokens", type=whole(1), default=16384, help="token budget per micro-batch of the length-grouped sampler")
    p.add_argument("--batch-size", type=whole(1), default=8, help="prompts per micro-batch of the fixed-count sampler (train.py's default)")
    p.add_argument("--steps", type=whole(1), default=4, help="optimizer steps timed per sampler in the train stage")
    p.add_argument("--train-len", type=whole(8), default=1024, help="train stage only: prompts keep their last N tokens (on "
                   "a CPU one 8k-token prompt takes ~100 s forward + backward even in a 2-layer model)")
    p.add_argument("--train-max-tokens", type=whole(1), default=4096, help="train stage: token budget of the length-grouped batches")
    p.add_argument("--stages", type=stage_list, default=list(SCALE_STAGES), help="stages to run, comma-separated "
                   "(e.g. index,parquet: the two battle readers' time and peak memory alone)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: one stage in this fresh process
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda a: scale_child(a) if a.stage else bench_scale(a), out_default="out/bench-scale")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{route,aggregate,serve,train,scale,route-scale,aggregate-scale}")
    for add in (add_route, add_aggregate, add_serve, add_train, add_scales):
        add(sub)
    for sp in sub.choices.values():
        sp.add_argument("--seed", type=int, default=0, help="instances, samplers and draws are seeded")
        sp.add_argument("--out", help="where <subcommand>.json goes (default out/bench; scale runs: out/bench-scale)")
    a = p.parse_args(argv)
    if a.cmd == "scale" and not 0 < a.unique <= 1:
        sub.choices["scale"].error(f"--unique must be in (0, 1], got {a.unique}")
    a.out = a.out or getattr(a, "out_default", "out/bench")
    a.argv = list(argv)
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with C.torch_threads(getattr(a, "threads", None) or torch.get_num_threads()):  # restored after (tests call main)
            return a.func(a)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: a fresh process failed (its stderr follows)
        sys.exit(f"bench.py {a.cmd}: error: {e}")


if __name__ == "__main__":
    main()
