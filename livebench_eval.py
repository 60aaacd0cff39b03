"""P2L as a router on LiveBench, an out-of-distribution check (docs/design.md §2, §4): for each LiveBench
question P2L's coefficients pick a model among those that have LiveBench scores (within a cost
budget if given), and the picks are scored exactly as LiveBench scores a model: the mean score of
each task, the mean of a category's task means, the mean of the categories, x100.

    # the bundled AlpacaEval P2L (make run's out/train) on the 732 questions of release 2024-11-25, CPU ~30 s
    python livebench_eval.py --checkpoint out/train --name-map data/livebench/name_map_alpaca_eval.json --out out/livebench/alpaca
    # a small grk P2L trained on LiveBench-derived outcomes, 2-fold cross-validated by question, CPU ~2.5 min
    python livebench_eval.py --train-cv 2 --out out/livebench/cv
    # its predictions again, routed under a proxy cost budget (no training, seconds)
    python livebench_eval.py --preds out/livebench/cv --costs data/livebench/costs_params.json --budget 8,16,32 --out out/livebench/cv-budget

Questions: LiveBench's question.jsonl format (question_id, category, task, turns, and the
livebench_release_date / livebench_removal_date of each question). As LiveBench does for a release
R, only questions released on or before R and not removed by R count (R = --release, default the
newest release date among the questions: the release whose scores match these questions).
Scores, either (1) LiveBench's per-question judgments, JSONL with question_id, model, score in
[0, 1] (score -1 marks an unscored answer and is skipped, as LiveBench does), or (2) a per-task
table as the LiveBench site publishes it (CSV: model, then one column per task, 0 to 100): then a
routed model is credited with its TASK MEAN on every question of the task, which the output says.
Models: the P2L's names map to LiveBench's through --name-map ({p2l: livebench} or {p2l:
{"livebench": name, "approximate": why}}; none = the same names). Each question is routed among the
mapped models that have a score on it (and a cost, with --costs), with opponents q uniform over
them: s = Wq, W_ab = σ(β_a − β_b) (rk/grk β used as BT coefficients, docs/design.md §2), π* = argmax π·s
s.t. c·π <= budget on every question (route.route_all, exact).
Policies, each scored by its expected score Σ_m π_m s(question, m), at no budget and at each budget:
  router       P2L as above
  oracle       the best mixture for each question picked WITH its true scores (an upper bound: the
               router's π is one of the mixtures it considers, so oracle >= router, question by question)
  best_single  the one model with the best LiveBench score among those scored on every question (and
               affordable), picked WITH the scores; p2l_single: the model P2L's averaged leaderboard
               over these questions ranks first (picked without the scores)
  best_mixture at a budget, the best fixed (question-independent) mix of two such models whose cost
               is the budget, picked WITH the scores: the fair baseline for a router that may mix
  random       uniform over the models that have a score on the question (and are affordable)
  every single model scored on every question
--train-cv K trains a grk P2L (train.py, MiniLM) on outcomes derived from the scores, split by
question into K folds (stratified by task): every question is routed by the fold model that never
saw it. Outcomes: if a and b are right with probabilities s_a and s_b, independently, then a wins
with s_a(1 − s_b), b with s_b(1 − s_a), both right is a tie (s_a s_b), both wrong is both-bad
((1 − s_a)(1 − s_b)): four votes of those weights per sampled pair (--pairs per question).
Training goes through train.py's command line, and its checkpoint is read back through its files
(config.json's model list, marginal.json), in a temporary directory: each fold<k>/ keeps
questions.json (its train/test split) and train.log.
Outputs in --out: table.csv, metrics.json, livebench.png, routes.jsonl, predictions.* (reusable with --preds).
"""
import argparse
import contextlib
import csv
import datetime
import io
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from aggregate import aggregate
from evaluate import dist_env, predict_prompts
from common import (
    add_checkpoint_options, atomic_write, autodetect_device, batch_nll, check_out, checkpoint_config, encode_for,
    load_checkpoint, load_predictions, OutputSet, predict, read_json_object, read_jsonl, read_marginal, save_png,
    save_predictions, WINNERS, write_json,
)
from route import hull_route, read_model_numbers, route_all, win_rates

HERE = Path(__file__).resolve().parent
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
POLICIES = ("router", "oracle", "best_single", "best_mixture", "p2l_single", "random")  # the order they print in

# -----------------------------------------------------------------------------
# inputs; every bad value is an error naming the file (and line)


def read_questions(path):
    qs, seen = [], set()
    for where, q in read_jsonl(path):
        for k in ("question_id", "category", "task"):
            if not isinstance(q.get(k), (str, int)) or q[k] == "":
                raise ValueError(f"{where}: missing '{k}'")
        turns = q.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns) or not any(t.strip() for t in turns):
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
        rel, rem = str(q.get("livebench_release_date") or "")[:10], str(q.get("livebench_removal_date") or "")[:10]
        if not is_date(rel) or not (rem == "" or is_date(rem)):
            raise ValueError(f"{where}: livebench_release_date must be YYYY-MM-DD and livebench_removal_date "
                             f"YYYY-MM-DD or empty, got {rel!r}, {rem!r}")
        qid = str(q["question_id"])
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid}")
        seen.add(qid)
        qs.append({"question_id": qid, "category": str(q["category"]), "task": str(q["task"]), "turns": turns,
                   "release": rel, "removal": rem, "line": where})
    if not qs:
        raise ValueError(f"{path}: no questions")
    cat = {}
    for q in qs:
        if cat.setdefault(q["task"], q["category"]) != q["category"]:
            raise ValueError(f"{q['line']}: task {q['task']} is in category {cat[q['task']]} elsewhere, here {q['category']}")
    return qs


def is_date(s):
    """YYYY-MM-DD and a real day (2099-13-45 matches the pattern but is none)."""
    try:
        return bool(DATE.match(s)) and datetime.date.fromisoformat(s) is not None
    except ValueError:
        return False


def in_release(q, release):
    """LiveBench's rule for release R: released on or before R, and not removed by R."""
    return q["release"] <= release and (q["removal"] == "" or q["removal"] > release)


def read_scores(path, questions):
    """(LiveBench model names, S [N, M] in [0, 1] with NaN where a model has no score, kind, note)."""
    path = str(path)
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if not rows or not rows[0] or rows[0][0] != "model":
            raise ValueError(f"{path}:1: a task table starts with a 'model' column, then one column per task")
        header = rows[0]
        missing = sorted({q["task"] for q in questions} - set(header))
        if missing:
            raise ValueError(f"{path}:1: no column for the tasks {', '.join(missing)} of the questions")
        col = {t: header.index(t) for t in header[1:]}
        models, table = [], {}
        for lineno, r in enumerate(rows[1:], 2):
            if not r:
                continue
            if len(r) != len(header) or r[0] in table:
                raise ValueError(f"{path}:{lineno}: {len(r)} fields for {len(header)} columns, or a repeated model {r[0]!r}")
            vals = {}
            for t, j in col.items():
                try:
                    v = float(r[j]) if r[j].strip() else math.nan
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: {t} of {r[0]} is not a number: {r[j]!r}") from None
                if not (math.isnan(v) or 0 <= v <= 100):
                    raise ValueError(f"{path}:{lineno}: {t} of {r[0]} must be in [0, 100], got {v}")
                vals[t] = v / 100
            models.append(r[0])
            table[r[0]] = vals
        S = np.array([[table[m][q["task"]] for m in models] for q in questions])
        note = ("per-task table: a routed model is credited with its TASK MEAN on every question of the task "
                "(no per-question scores), so the oracle is the best model of each task")
        return models, S, "task_table", note
    # LiveBench's ground_truth_judgment.jsonl: one row per (question, model), more fields allowed
    row_of = {q["question_id"]: z for z, q in enumerate(questions)}
    got = {}
    for where, j in read_jsonl(path):
        if not isinstance(j, dict) or "question_id" not in j or not isinstance(j.get("model"), str) or "score" not in j:
            raise ValueError(f"{where}: a judgment needs question_id, model and score")
        s = j["score"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (s == -1 or 0 <= s <= 1):
            raise ValueError(f"{where}: score must be in [0, 1] (or -1: unscored), got {s!r}")
        key = (str(j["question_id"]), j["model"])
        if key in got:
            raise ValueError(f"{where}: a second score for question {key[0]} and model {key[1]}")
        got[key] = float(s)
    models = sorted({m for (qid, m), s in got.items() if qid in row_of and s != -1})
    col = {m: i for i, m in enumerate(models)}
    S = np.full((len(questions), len(models)), math.nan)
    for (qid, m), s in got.items():
        if qid in row_of and s != -1:
            S[row_of[qid], col[m]] = s
    return models, S, "judgments", "per-question judgments: a routed model is credited with its own score on the question"


def read_name_map(path, p2l_models):
    """{p2l name: (livebench name, None or why the match is approximate)}; no file = the same names."""
    if path is None:
        return {m: (m, None) for m in p2l_models}
    obj = read_json_object(path, "the name map {p2l name: livebench name}")
    out, known = {}, set(p2l_models)
    for k, v in obj.items():
        if k.startswith("_"):
            continue
        if k not in known:
            raise ValueError(f"{path}: {k!r} is not a model of the P2L (its model list has {len(known)} names)")
        if isinstance(v, str):
            out[k] = (v, None)
        elif isinstance(v, dict) and isinstance(v.get("livebench"), str):
            out[k] = (v["livebench"], v.get("approximate"))
        else:
            raise ValueError(f"{path}: the value of {k!r} must be a name or {{\"livebench\": name, \"approximate\": why}}")
    lb = [v for v, _ in out.values()]
    if len(set(lb)) != len(lb):
        raise ValueError(f"{path}: two P2L models map to the same LiveBench model ({sorted(x for x in lb if lb.count(x) > 1)[0]})")
    return out


def read_costs(path, models):
    """{model: cost per query} for the models the file prices (keys starting with '_' are documentation)."""
    costs = read_model_numbers(path, "cost")
    return {m: costs[m] for m in models if m in costs}

# -----------------------------------------------------------------------------
# LiveBench's aggregation, and the policies it scores


def livebench_score(v, questions):
    """Per-question scores v [N] in [0, 1] -> {"overall", <category>..., "tasks": {...}}, x100, as
    LiveBench's show_livebench_result.py: mean per task, mean of each category's task means, mean
    of the categories (every category weighs the same, whatever its number of tasks or questions)."""
    by_task, cat_of = {}, {}
    for x, q in zip(v, questions):
        by_task.setdefault(q["task"], []).append(float(x))
        cat_of[q["task"]] = q["category"]
    tasks = {t: 100 * sum(xs) / len(xs) for t, xs in sorted(by_task.items())}
    cats = {}
    for t, s in tasks.items():
        cats.setdefault(cat_of[t], []).append(s)
    cats = {c: sum(s) / len(s) for c, s in sorted(cats.items())}
    return {"overall": sum(cats.values()) / len(cats), **cats, "tasks": tasks}


def by_pattern(avail):
    """Questions grouped by which models have a score on them (one group per task for a task table)."""
    groups = {}
    for z in range(len(avail)):
        groups.setdefault(avail[z].tobytes(), []).append(z)
    return [(np.array(rows), np.flatnonzero(avail[rows[0]])) for rows in groups.values()]


def mixtures(score_of, avail, c, budget):
    """π [N, M]: per question, the best mixture (route.route_all, exact) of the models scored on it,
    for the per-model scores score_of(rows, cols) [len(rows), len(cols)], under the budget (checked
    feasible by the caller: some model scored on each question costs <= budget)."""
    pi = np.zeros(avail.shape)
    for rows, cols in by_pattern(avail):
        s = score_of(rows, cols)
        I, J, W = route_all("optimal", s, s, c[cols], budget)
        np.add.at(pi, (rows, cols[I]), W)
        np.add.at(pi, (rows, cols[J]), 1 - W)
    return pi


def p2l_router(beta, avail):
    """score_of for the P2L router: each model's predicted win rate Wq against q uniform over the
    models scored on the question."""
    def score_of(rows, cols):
        return win_rates(beta[np.ix_(rows, cols)], np.full(len(cols), 1.0 / len(cols)))
    return score_of

# -----------------------------------------------------------------------------
# P2L coefficients: a checkpoint, saved predictions, or K-fold training on LiveBench outcomes


def load_model(ckpt, loss=None, max_len=None):
    """(model, tok) of a checkpoint; a damaged one (truncated weights, non-finite weights, ...) is one line."""
    try:
        return load_checkpoint(ckpt, loss, max_len=max_len)
    except (ValueError, OSError) as e:
        sys.exit(f"error: --checkpoint {ckpt}: {e}")


def predict_questions(model_tok, questions, shard_dir=None):
    """(beta, eta, model list) of a loaded checkpoint (model, tok) on the questions. With shard_dir,
    a torchrun launch splits the questions over its ranks (predict_prompts): rank 0 gets the merged
    result, the other ranks exit here."""
    model, tok = model_tok
    device = autodetect_device()
    turns = [q["turns"] for q in questions]
    if shard_dir is None:
        beta, eta = predict(model.to(device), encode_for(model, tok, turns), tok.pad_token_id, batch_size=16, device=device)
    else:
        res = predict_prompts(model, tok, turns, shard_dir, 16, device)
        if res is None:
            sys.exit(0)
        beta, eta = res
    return beta, eta, model.p2l["model_list"]


def outcome_votes(zs, questions, S, models, pairs, rng):
    """Weighted votes (docs/design.md §3 rows) for questions zs: `pairs` random pairs of models scored on
    each question, four outcomes each, weight = its probability (module docstring)."""
    rows = []
    for z in zs:
        ok = np.flatnonzero(~np.isnan(S[z]))
        a_all, b_all = np.triu_indices(len(ok), 1)
        for k in rng.permutation(len(a_all))[:pairs]:
            a, b = (ok[a_all[k]], ok[b_all[k]]) if rng.random() < 0.5 else (ok[b_all[k]], ok[a_all[k]])
            sa, sb = S[z, a], S[z, b]
            for winner, w in (("model_a", sa * (1 - sb)), ("model_b", sb * (1 - sa)), ("tie", sa * sb), ("tie (bothbad)", (1 - sa) * (1 - sb))):
                if w > 0:
                    rows.append({"prompt": questions[z]["turns"], "model_a": models[a], "model_b": models[b], "winner": winner,
                                 "weight": round(float(w), 6), "category": questions[z]["task"], "id": questions[z]["question_id"]})
    return rows


def heldout_nll(beta, eta, votes, row_of, index):
    """Weighted grk NLL per vote of votes under per-question (beta [n, M], eta [n])."""
    pairs = {"a": torch.tensor([index[v["model_a"]] for v in votes]), "b": torch.tensor([index[v["model_b"]] for v in votes]),
             "y": torch.tensor([WINNERS[v["winner"]] for v in votes]), "p": torch.zeros(len(votes), dtype=torch.float64),
             "w": torch.tensor([v["weight"] for v in votes], dtype=torch.float64), "row": torch.tensor([row_of[v["id"]] for v in votes])}
    s, w = batch_nll(beta.double(), eta.double(), pairs, "grk")
    return (s / w).item()


# train.py is called through its command line and read back through its checkpoint (config.json's model
# list, marginal.json): the interface any user has. It validates every --eval-every steps and at the last
# step; a period longer than any run means "only at the end" (the real held-out measure is ours, below).
VALIDATE_ONLY_AT_END = "1000000000"


@contextlib.contextmanager
def train_fold(args, d, train_v, val_v):
    """Train one fold's P2L with train.py into a temporary checkpoint dir inside d: `with` it to read
    the checkpoint; the votes files and the checkpoint (with its resumable state) go afterwards."""
    with tempfile.TemporaryDirectory(dir=d, prefix=".train.") as tmp:
        tmp = Path(tmp)
        for name, rows in (("train.jsonl", train_v), ("val.jsonl", val_v)):
            atomic_write(tmp / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        cmd = [sys.executable, str(HERE / "train.py"), "--model", args.cv_model, "--loss", "grk", "--train", str(tmp / "train.jsonl"),
               "--val", str(tmp / "val.jsonl"), "--out", str(tmp / "p2l"), "--epochs", str(args.cv_epochs), "--batch-size", "16",
               "--max-len", str(args.cv_max_len), "--head-lr", str(args.cv_head_lr), "--eval-every", VALIDATE_ONLY_AT_END,
               "--seed", str(args.seed)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        atomic_write(d / "train.log", " ".join(cmd) + "\n" + r.stdout + r.stderr)
        if r.returncode != 0:
            sys.exit(f"error: {d.name}: train.py failed (log: {d / 'train.log'}):\n{r.stderr[-2000:]}")
        yield tmp / "p2l"


def in_order(beta, have, want, where):
    """The columns of beta [..., len(have)] for the models `want`, in that order."""
    if sorted(have) != sorted(want):
        sys.exit(f"error: {where}: its model list is not the {len(want)} scored models")
    return beta[..., [have.index(m) for m in want]]


def train_cv(args, questions, S, models, out):
    """β [N, M], η [N] for every question from the fold model that did not train on it."""
    N, K = len(questions), args.train_cv
    rng = np.random.default_rng(args.seed)
    fold = np.zeros(N, dtype=int)
    for t in sorted({q["task"] for q in questions}):  # stratified: each task dealt round-robin in a random order
        zs = [z for z in range(N) if questions[z]["task"] == t]
        fold[np.array(zs)[rng.permutation(len(zs))]] = np.arange(len(zs)) % K
    beta, eta = torch.zeros(N, len(models)), torch.zeros(N)
    index = {m: i for i, m in enumerate(models)}
    nll = {"p2l": 0.0, "marginal": 0.0}
    for k in range(K):
        d = out / f"fold{k}"
        d.mkdir(parents=True, exist_ok=True)
        train_z, test_z = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        train_v = outcome_votes(train_z, questions, S, models, args.pairs, rng)
        test_v = outcome_votes(test_z, questions, S, models, args.pairs, rng)
        missing = set(models) - {v[side] for v in train_v for side in ("model_a", "model_b")}
        if missing:  # train.py's model list is the models its votes name: it must be all of them
            sys.exit(f"error: fold {k}: no training vote names {', '.join(sorted(missing))}: raise --pairs")
        write_json(d / "questions.json", {"train": [questions[z]["question_id"] for z in train_z],
                                             "test": [questions[z]["question_id"] for z in test_z]})
        # train.py wants a validation file: a few held-out questions (the real held-out measure is below, on all of fold k)
        few = {questions[z]["question_id"] for z in test_z[:16]}
        t0 = time.time()
        with train_fold(args, d, train_v, [v for v in test_v if v["id"] in few]) as ck:
            b, e, ck_models = predict_questions(load_model(ck), [questions[z] for z in test_z])
            marg = read_marginal(ck)
            b = in_order(b, ck_models, models, f"fold {k}'s checkpoint")
            mb = in_order(torch.tensor(marg["beta"]), marg["model_list"], models, f"fold {k}'s marginal.json")
        beta[test_z], eta[test_z] = b, e
        row_of = {questions[z]["question_id"]: i for i, z in enumerate(test_z)}
        n = len(test_z)
        fold_nll = {"p2l": heldout_nll(b, e, test_v, row_of, index),
                    "marginal": heldout_nll(mb.expand(n, -1), torch.full((n,), marg["eta"]), test_v, row_of, index)}
        for key in nll:
            nll[key] += fold_nll[key] * n / N
        print(f"fold {k + 1}/{K}: trained on {len(train_z)} questions ({len(train_v):,} weighted votes) in {time.time() - t0:.0f} s; "
              f"held-out grk NLL on its {n} questions: P2L {fold_nll['p2l']:.4f}, marginal {fold_nll['marginal']:.4f}")
    print(f"held-out grk NLL, all {N} questions: P2L {nll['p2l']:.4f} vs marginal {nll['marginal']:.4f} "
          f"({100 * (nll['p2l'] / nll['marginal'] - 1):+.2f}%)")
    return beta, eta, fold, nll

# -----------------------------------------------------------------------------
# the run: load -> pool -> coefficients -> score -> report


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Formats, policies and the --train-cv outcome "
                                "model: the docstring of livebench_eval.py; the maths: docs/design.md §2, §4.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a P2L checkpoint dir: run it on the questions (predictions saved into --out for reuse)")
    src.add_argument("--preds", metavar="DIR", help="predictions saved by an earlier run (matched by question_id): no forward passes")
    src.add_argument("--train-cv", type=int, metavar="K", help="train a grk P2L on outcomes derived from --scores, K folds by question "
                     "(every question routed by a model that never saw it); the model list is the scored models")
    p.add_argument("--questions", default="data/livebench/questions.jsonl.gz", help="LiveBench question.jsonl(.gz) "
                   "(default: the 1,118 bundled questions)")
    p.add_argument("--scores", default="data/livebench/table_2024_11_25.csv", help="per-question judgments JSONL (question_id, "
                   "model, score in [0, 1]) or a per-task table CSV from the LiveBench site (default: release 2024-11-25's)")
    p.add_argument("--release", help="LiveBench release YYYY-MM-DD whose questions count (default: the newest question "
                   "release date, the release a table of these questions was computed on)")
    p.add_argument("--name-map", help="JSON {p2l name: livebench name, or {livebench, approximate}}: which LiveBench scores "
                   "credit which P2L model (default: the same names)")
    p.add_argument("--models", help="comma-separated LiveBench names: route among these only (e.g. to compare two routers on one pool)")
    p.add_argument("--costs", help="JSON {livebench model: cost per query}; models it does not price are left out of the pool")
    p.add_argument("--budget", help="comma-separated budgets (expected cost per query, --costs units) to report besides "
                   "no budget (default with --costs: 5 from the cheapest to the dearest model)")
    p.add_argument("--pairs", type=int, default=24, help="--train-cv: model pairs sampled per question (4 weighted votes each); "
                   "24 keeps a fold (366 questions, MiniLM, 2 epochs) at ~70 s on a 2-core CPU")
    p.add_argument("--cv-model", default="minilm", help="--train-cv backbone (train.py --model)")
    p.add_argument("--cv-epochs", type=float, default=2, help="--train-cv epochs per fold")
    p.add_argument("--cv-max-len", type=int, default=128, help="--train-cv tokens per question (the end is kept: the answer "
                   "format instructions, which say which task it is, are at the end of LiveBench questions)")
    p.add_argument("--cv-head-lr", type=float, default=1e-2, help="--train-cv head learning rate")
    p.add_argument("--seed", type=int, default=0, help="folds and pair sampling (training seeds too): reruns agree")
    p.add_argument("--out", default="out/livebench", help="table.csv, metrics.json, livebench.png, routes.jsonl, predictions: "
                   "written as one set at the end (metrics.json last); locked against a second run for the whole run")
    add_checkpoint_options(p)
    args = p.parse_args(argv)
    if args.train_cv is not None and (args.train_cv < 2 or args.name_map):
        p.error("--train-cv needs K >= 2 and no --name-map (it trains on the LiveBench names)")
    if args.budget and not args.costs:
        p.error("--budget needs --costs")
    return args


def load(args):
    """Everything that can fail on bad input fails here, before any output is written (ValueError)."""
    check_out(args.out)
    all_q = read_questions(args.questions)
    release = args.release or max(q["release"] for q in all_q)
    if not is_date(release):
        raise ValueError(f"--release must be a date YYYY-MM-DD, got {release!r}")
    known = sorted({q["release"] for q in all_q} | {q["removal"] for q in all_q if q["removal"]})
    if release not in known:  # another date would count a set of questions no LiveBench release ever had
        raise ValueError(f"--release {release}: not a release of {args.questions} (its release and removal dates: "
                         f"{', '.join(known)})")
    table = re.search(r"table_(\d{4})_(\d{2})_(\d{2})\.csv$", str(args.scores))
    if table and "-".join(table.groups()) != release:
        raise ValueError(f"--release {release}: --scores {args.scores} is release {'-'.join(table.groups())}'s table; "
                         f"scoring release {release}'s questions with it mixes releases: pass that release's table "
                         f"(data/livebench/prepare.py --release {release})")
    questions = [q for q in all_q if in_release(q, release)]
    if not questions:
        raise ValueError(f"{args.questions}: no question is in release {release}")
    lb_models, S, kind, note = read_scores(args.scores, questions)
    scored = ~np.isnan(S).all(1)
    dropped = [q["question_id"] for q, ok in zip(questions, scored) if not ok]
    questions, S = [q for q, ok in zip(questions, scored) if ok], S[scored]
    if not questions:
        raise ValueError(f"{args.scores}: no model has a score on any question of release {release}")
    preds, ck_loss = None, "grk"  # --train-cv trains grk
    if args.preds:
        pb, _, p2l_models, prow = load_predictions(args.preds)
        where = {str(r.get("question_id")): i for i, r in enumerate(prow)}
        missing = [q for q in questions if q["question_id"] not in where]
        if missing:
            raise ValueError(f"{missing[0]['line']}: question {missing[0]['question_id']} is not in --preds {args.preds} "
                             f"({len(missing)} of {len(questions)} missing)")
        preds = (pb, where)
    elif args.checkpoint:
        cfg, _ = checkpoint_config(args.checkpoint)
        p2l_models, ck_loss = cfg["model_list"], args.loss or cfg.get("loss")
    else:
        p2l_models = sorted(m for m in lb_models if (~np.isnan(S[:, lb_models.index(m)])).any())  # as train.py sorts them
    chosen = args.models.split(",") if args.models else None
    if chosen and set(chosen) - set(lb_models):
        raise ValueError(f"--models: not in {args.scores}: {', '.join(sorted(set(chosen) - set(lb_models)))}")
    try:
        budgets = [float(x) for x in args.budget.split(",")] if args.budget else None
    except ValueError:
        raise ValueError(f"--budget must be numbers separated by commas, got {args.budget!r}") from None
    if any(not (b >= 0) for b in budgets or []):
        raise ValueError(f"--budget must be >= 0 (inf: no budget), got {args.budget!r}")
    return SimpleNamespace(all_q=all_q, release=release, questions=questions, dropped=dropped, lb_models=lb_models, S=S,
                           kind=kind, note=note, preds=preds, p2l_models=p2l_models, loss=ck_loss,
                           name_map=read_name_map(args.name_map, p2l_models),
                           costs=read_costs(args.costs, lb_models) if args.costs else None, chosen=chosen, budgets=budgets)


def make_pool(args, inp):
    """The models routed among: P2L models with a LiveBench counterpart that has scores (and a cost);
    the questions where at least one of them has a score; the budgets, each feasible on every question."""
    lb_index = {m: i for i, m in enumerate(inp.lb_models)}
    pool = sorted((lb, p2l, why) for p2l, (lb, why) in inp.name_map.items() if lb in lb_index
                  and (inp.chosen is None or lb in inp.chosen) and (inp.costs is None or lb in inp.costs))
    if not pool:
        sys.exit(f"error: no P2L model has a LiveBench counterpart with scores{' and a cost' if inp.costs else ''} "
                 f"(check --name-map{', --costs' if inp.costs else ''}{', --models' if inp.chosen else ''})")
    names = [lb for lb, _, _ in pool]
    Sp = inp.S[:, [lb_index[m] for m in names]]
    keep = (~np.isnan(Sp)).any(1)  # where no pooled model has a score, nothing can be routed
    questions = [q for q, k in zip(inp.questions, keep) if k]
    dropped = inp.dropped + [q["question_id"] for q, k in zip(inp.questions, keep) if not k]
    S, Sp = inp.S[keep], Sp[keep]
    avail = ~np.isnan(Sp)
    c = np.array([inp.costs[m] for m in names]) if inp.costs else np.zeros(len(names))
    budgets = inp.budgets
    if inp.costs and budgets is None:
        budgets = sorted(set(np.round(np.geomspace(max(c.min(), 1e-9), c.max(), 5), 3).tolist()))
    budgets = [math.inf] + sorted(set(budgets or []) - {math.inf})
    for bgt in budgets:
        for rows, cols in by_pattern(avail):
            if c[cols].min() > bgt:
                sys.exit(f"error: budget {bgt:g} is infeasible on task {questions[rows[0]]['task']} ({questions[rows[0]]['line']}): "
                         f"the cheapest model scored there costs {c[cols].min():g} ({args.costs})")
    mapped = {lb for lb, _ in inp.name_map.values()}
    return SimpleNamespace(
        pool=pool, names=names, questions=questions, dropped=dropped, S=S, Sp=Sp, avail=avail, c=c, budgets=budgets,
        S_p2l=S[:, [lb_index[m] for m in inp.p2l_models]] if args.train_cv else None,  # --train-cv trains on every scored model
        unmatched_p2l=sorted(p for p in inp.p2l_models if p not in inp.name_map or inp.name_map[p][0] not in lb_index),
        unmatched_lb=sorted(m for m in inp.lb_models if m not in mapped),
        no_cost=sorted(lb for lb, _ in inp.name_map.values() if lb in lb_index and inp.costs is not None and lb not in inp.costs))


def coefficients(args, inp, pool, model_tok, out, stage):
    """P2L's β [N, pooled models] for the routed questions: from --preds, or predicted (the loaded
    checkpoint model_tok, or the --train-cv fold models, which keep their logs in out/fold<k>) and
    saved into stage (--out's staging dir) for reuse; and the --train-cv summary."""
    if args.preds:
        pb, where = inp.preds
        beta_all = pb.double().numpy()[[where[q["question_id"]] for q in pool.questions]]
        cv = None
    else:
        if args.checkpoint:
            raw_b, raw_e, ck_models = predict_questions(model_tok, pool.questions, shard_dir=out)
            raw_b = in_order(raw_b, ck_models, inp.p2l_models, f"--checkpoint {args.checkpoint}")
            fold, cv = None, None
        else:
            raw_b, raw_e, fold, nll = train_cv(args, pool.questions, pool.S_p2l, inp.p2l_models, out)
            cv = {"folds": args.train_cv, "pairs_per_question": args.pairs, "backbone": args.cv_model, "epochs": args.cv_epochs,
                  "max_len": args.cv_max_len, "head_lr": args.cv_head_lr, "heldout_grk_nll": nll}
        rows = [{"question_id": q["question_id"], "task": q["task"], "category": q["category"], "prompt": q["turns"],
                 **({"fold": int(fold[z])} if fold is not None else {})} for z, q in enumerate(pool.questions)]
        save_predictions(stage, raw_b, raw_e, inp.p2l_models, rows, loss=inp.loss, checkpoint=args.checkpoint)
        beta_all = raw_b.double().numpy()
    p2l_index = {m: i for i, m in enumerate(inp.p2l_models)}
    return beta_all[:, [p2l_index[p2l] for _, p2l, _ in pool.pool]], cv


def score(pool, beta):
    """Every policy at every budget, scored the LiveBench way: {(policy, budget): result}, the single
    models' results, the rows of table.csv and routes.jsonl, and the router's π with no budget."""
    names, Sp, avail, c, questions = pool.names, pool.Sp, pool.avail, pool.c, pool.questions
    N, M = Sp.shape
    complete = avail.all(0)  # a single model is listed only where it has a score on every question, as LiveBench requires
    singles = {names[m]: livebench_score(Sp[:, m], questions) for m in range(M) if complete[m]}
    p2l_bbar = aggregate(torch.from_numpy(beta), None, "bt")[0].numpy()  # P2L's averaged leaderboard, docs/design.md §2
    table, routes, at, router_pi = [], [], {}, {}
    for bgt in pool.budgets:
        ok = c <= bgt
        pi = {"router": mixtures(p2l_router(beta, avail), avail, c, bgt),
              "oracle": mixtures(lambda r, k: Sp[np.ix_(r, k)], avail, c, bgt)}
        rand = avail & ok
        pi["random"] = rand / rand.sum(1, keepdims=True)
        picked = fixed_policies(pi, singles, names, c, complete, p2l_bbar, bgt, N)
        for name, P in pi.items():
            res = livebench_score((P * np.nan_to_num(Sp)).sum(1), questions)
            res = {**({"model": picked[name]} if name in picked else {}), "expected_cost": float((P @ c).mean()), **res}
            at[name, bgt] = res
            table.append({"policy": name, "budget": bgt, **res})
        router_pi[bgt] = pi["router"]
        for z, q in enumerate(questions):
            routes.append({"question_id": q["question_id"], "task": q["task"], "budget": bgt if math.isfinite(bgt) else "inf",
                           "pi": {names[m]: round(float(pi["router"][z, m]), 6) for m in np.flatnonzero(pi["router"][z] > 0)},
                           "score": float(pi["router"][z] @ np.nan_to_num(Sp[z]))})
    for m in sorted(singles, key=lambda m: -singles[m]["overall"]):
        table.append({"policy": "model", "model": m, "budget": "", "expected_cost": c[names.index(m)], **singles[m]})
    return SimpleNamespace(at=at, singles=singles, table=table, routes=routes, free=router_pi[math.inf])


def fixed_policies(pi, singles, names, c, complete, p2l_bbar, bgt, N):
    """Add the question-independent policies at budget bgt to pi (best_single, p2l_single,
    best_mixture); returns {policy: the model(s) it picked}."""
    M, ok = len(names), c <= bgt
    cand = [m for m in range(M) if complete[m] and ok[m]]
    best = max(cand, key=lambda m: (singles[names[m]]["overall"], -c[m]), default=None)
    top = max(cand, key=lambda m: p2l_bbar[m], default=None)
    picked = {}
    for name, m in (("best_single", best), ("p2l_single", top)):
        if m is not None:
            pi[name] = np.zeros((N, M))
            pi[name][:, m] = 1
            picked[name] = names[m]
    comp = np.flatnonzero(complete)
    if math.isfinite(bgt) and len(comp) and c[comp].min() <= bgt:
        # the best prompt-independent mixture of two models at this cost, picked with the scores: LiveBench's
        # score is linear in the per-question scores, so a mixture scores the mix of the two overall scores
        sc = np.array([singles[names[m]]["overall"] for m in comp])
        i, j, w = hull_route(sc, c[comp], bgt, np.argsort(c[comp], kind="stable").tolist())
        pi["best_mixture"] = np.zeros((N, M))
        pi["best_mixture"][:, comp[i]] += w
        pi["best_mixture"][:, comp[j]] += 1 - w
        picked["best_mixture"] = names[comp[i]] if w == 1 else f"{w:.2f} {names[comp[i]]} + {1 - w:.2f} {names[comp[j]]}"
    return picked


def write_outputs(args, inp, pool, res, cv, src, out, seconds):
    """metrics.json, table.csv, routes.jsonl, livebench.png into out (--out's staging dir: the set is
    renamed in at the end, metrics.json last)."""
    at, singles, names, budgets = res.at, res.singles, pool.names, pool.budgets
    cats = sorted({q["category"] for q in pool.questions})
    tasks = sorted({q["task"] for q in pool.questions})
    metrics = {k: strip(at.get((k, math.inf), {})) for k in ("router", "best_single", "random", "oracle", "p2l_single")}
    metrics.update({
        "budgets": [{"budget": b, **{k: strip(at[k, b]) for k in POLICIES if (k, b) in at}} for b in budgets[1:]],
        "models": {m: strip(s) for m, s in singles.items()},
        "release": inp.release, "questions": {"read": len(inp.all_q), "in_release": len(pool.questions) + len(pool.dropped),
                                              "routed": len(pool.questions), "dropped_no_score": len(pool.dropped)},
        "scores": {"file": args.scores, "kind": inp.kind, "note": inp.note}, "source": src, "pool": names,
        "name_map": {"file": args.name_map, "exact": [lb for lb, p2l, why in pool.pool if why is None],
                     "approximate": {p2l: {"livebench": lb, "why": why} for lb, p2l, why in pool.pool if why is not None},
                     "p2l_without_livebench_scores": pool.unmatched_p2l, "livebench_not_in_p2l": pool.unmatched_lb,
                     "without_cost": pool.no_cost},
        "costs": args.costs, "opponents": "uniform over the pooled models scored on each question",
        "cv": cv, "seconds": round(seconds, 1), "seed": args.seed})
    write_json(out / "metrics.json", metrics)
    buf = io.StringIO()
    cols = ["policy", "model", "budget", "expected_cost", "overall"] + cats + tasks
    wr = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    wr.writeheader()
    for t in res.table:
        wr.writerow({k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in {**t, **t["tasks"]}.items()})
    atomic_write(out / "table.csv", buf.getvalue())
    atomic_write(out / "routes.jsonl", "".join(json.dumps(r) + "\n" for r in res.routes))
    plot(at, singles, names, pool.c, budgets, inp.costs is not None, out / "livebench.png",
         f"LiveBench {inp.release}, {len(pool.questions)} questions: P2L {Path(src).name if not args.train_cv else 'grk CV'} "
         f"among {len(names)} models")


def report(args, inp, pool, res, src, out, seconds):
    """The printed summary: inputs, name matching, the policy table, the router's favourite per task."""
    at, singles, names, c, questions = res.at, res.singles, pool.names, pool.c, pool.questions
    cats = sorted({q["category"] for q in questions})
    tasks = sorted({q["task"] for q in questions})
    exact = [lb for lb, p2l, why in pool.pool if why is None]
    approx = {p2l: (lb, why) for lb, p2l, why in pool.pool if why is not None}
    dropped = pool.dropped
    print(f"LiveBench release {inp.release}: {len(questions) + len(dropped)} of {len(inp.all_q)} questions are in it; {len(questions)} routed"
          f"{f' ({len(dropped)} have no score)' if dropped else ''}; {len(tasks)} tasks in {len(cats)} categories")
    print(f"scores: {args.scores}: {inp.note}")
    print(f"P2L: {src}, {len(inp.p2l_models)} models; routing among the {len(names)} that have LiveBench scores"
          f"{' and a cost' if inp.costs else ''}: {len(exact)} exact name matches, {len(approx)} approximate")
    for p2l, (lb, why) in approx.items():
        print(f"  approximate: {p2l} -> {lb} ({why})")
    if len(exact) <= 8:
        for m in exact:
            print(f"  exact: {m}")
    print(f"  unmatched: {len(pool.unmatched_p2l)} P2L models have no LiveBench scores, {len(pool.unmatched_lb)} LiveBench models are not "
          f"in the P2L (lists in metrics.json){f'; {len(pool.no_cost)} have no cost: left out' if pool.no_cost else ''}")
    cw = [max(7, len(x)) for x in cats]
    cost = (lambda x: f"{x:.2f}") if inp.costs else (lambda x: "-")
    line = lambda label, bgt, r, who="": (f"{label:15s} {bgt:>7s} {cost(r['expected_cost']):>7s} {r['overall']:7.2f} "
                                          + " ".join(f"{r[x]:{n}.2f}" for x, n in zip(cats, cw)) + f"  {who}")
    print("\nLiveBench score x100 (task mean -> category mean -> overall mean of categories)")
    print(f"{'policy':15s} {'budget':>7s} {'cost':>7s} {'overall':>7s} " + " ".join(f"{x:>{n}s}" for x, n in zip(cats, cw)) + "  model")
    label = {"router": "P2L router", "oracle": "oracle", "best_single": "best single", "best_mixture": "best mixture",
             "p2l_single": "P2L top single", "random": "random"}
    for bgt in pool.budgets:
        for k in POLICIES:
            if (k, bgt) in at:
                print(line(label[k], "none" if not math.isfinite(bgt) else f"{bgt:g}", at[k, bgt], at[k, bgt].get("model", "")))
    ranked = sorted(singles, key=lambda m: -singles[m]["overall"])
    print(f"every single model scored on every question ({len(ranked)}), best first:")
    for m in ranked[:10]:
        print(line("model", "", dict(singles[m], expected_cost=c[names.index(m)]), m))
    if len(ranked) > 10:
        print(f"... {len(ranked) - 10} more in {out / 'table.csv'}")
    picks = {}
    for z, q in enumerate(questions):  # which model the unconstrained router favours on each task
        picks.setdefault(q["task"], []).append(names[int(np.argmax(res.free[z]))])
    top = {t: Counter(sorted(v)).most_common(1)[0] for t, v in sorted(picks.items())}  # ties: the first name
    print("router's most chosen model per task (unconstrained): " + "; ".join(f"{t} {m} {n}/{len(picks[t])}" for t, (m, n) in top.items()))
    r0, b0 = at["router", math.inf], at.get(("best_single", math.inf), {"overall": math.nan})
    print(f"unconstrained: router {r0['overall']:.2f} vs best single {b0['overall']:.2f} ({r0['overall'] - b0['overall']:+.2f}), "
          f"oracle {at['oracle', math.inf]['overall']:.2f}, random {at['random', math.inf]['overall']:.2f}; {seconds:.0f} s")
    print(f"-> {out / 'table.csv'}, {out / 'metrics.json'}, {out / 'livebench.png'}, {out / 'routes.jsonl'}")


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    try:
        inp = load(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    pool = make_pool(args, inp)
    out = Path(args.out)
    model_tok = load_model(args.checkpoint, args.loss, args.max_len) if args.checkpoint else None  # fails before --out is touched
    if model_tok is not None and dist_env()[0] != 0:  # a torchrun rank > 0 runs its share of the forward passes, then exits
        predict_questions(model_tok, pool.questions, shard_dir=out)
    src = args.checkpoint or args.preds or f"--train-cv {args.train_cv} ({args.cv_model}, grk)"
    try:
        with OutputSet(out) as o:  # locked to the end; the files are staged and renamed in as one set, metrics.json last
            beta, cv = coefficients(args, inp, pool, model_tok, out, o.stage)
            res = score(pool, beta)
            write_outputs(args, inp, pool, res, cv, src, o.stage, time.time() - t_start)
            o.commit(marker="metrics.json")
    except ValueError as e:  # --out held by another run
        sys.exit(f"error: {e}")
    report(args, inp, pool, res, src, out, time.time() - t_start)


def strip(r):
    """A policy's result for metrics.json: overall, categories, cost (tasks stay in table.csv)."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "tasks"}


def plot(at, singles, names, c, budgets, with_costs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if with_costs else 1, figsize=(13 if with_costs else 7, 5.5), dpi=110, squeeze=False)
    ax = axes[0, 0]
    bars = [("oracle", at["oracle", math.inf]["overall"], "C2"), ("P2L router", at["router", math.inf]["overall"], "C0"),
            (f"best single ({at['best_single', math.inf]['model']})", at["best_single", math.inf]["overall"], "C3"),
            ("random", at["random", math.inf]["overall"], "C7")]
    ranked = sorted(singles.items(), key=lambda kv: -kv[1]["overall"])
    bars += [(m, s["overall"], "0.6") for m, s in ranked[:15]]
    ax.barh(range(len(bars))[::-1], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_yticks(range(len(bars))[::-1], [b[0][:40] for b in bars], fontsize=7)
    ax.set_xlabel("LiveBench score (no budget)")
    ax.grid(axis="x", alpha=0.3)
    if with_costs:
        ax = axes[0, 1]
        ax.scatter([c[names.index(m)] for m in singles], [s["overall"] for s in singles.values()], s=14, c="k", label="single models")
        for k, color, style in (("router", "C0", "-"), ("oracle", "C2", "-"), ("best_mixture", "k", "--"), ("random", "C7", "-"),
                                ("best_single", "C3", "none")):  # the best single model at each budget: points, not a curve
            pts = [(at[k, b]["expected_cost"], at[k, b]["overall"]) for b in budgets if (k, b) in at]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", ms=4 if style != "none" else 8, mfc=None if style != "none" else "none",
                        ls=style, color=color, label=k.replace("_", " ") + (" (picked with the scores)" if k.startswith("best") else ""))
        ax.set_xscale("log")
        ax.set_xlabel("expected cost per query")
        ax.set_ylabel("LiveBench score")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


if __name__ == "__main__":
    main()
