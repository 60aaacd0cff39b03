"""Evaluate a P2L checkpoint on held-out votes: does the prompt-conditioned leaderboard predict
them better than the averaged one? Writes per-prompt predictions (aggregate.py and route.py reuse
them), metrics.json and a table: P2L vs the marginal, per-category and uniform leaderboards
fitted on the checkpoint's training votes, a paired bootstrap CI over prompts of P2L's NLL minus
the marginal's, and how well the aggregated P2L leaderboard matches a fit to the held-out votes.

    python train.py --model minilm --max-steps 10 --out out/tiny                            # a checkpoint, CPU ~1 min
    python evaluate.py --checkpoint out/tiny --data data/alpaca_eval/val.jsonl.gz --out out/eval-tiny   # CPU ~30 s
    python evaluate.py --checkpoint out/tiny --preds out/eval-tiny --out out/eval-tiny   # again, no forward pass

Metrics, over the votes whose two models the checkpoint knows, each vote weighted by its weight w
(plain bt gives hard-label ties w = 0, as in training), all in float64:
- nll: mean −log-likelihood under the head's own outcome model (pair_nll): bt / bt-tie the
  soft-label cross-entropy −p·log σ(Δ) − (1−p)·log σ(−Δ); rk / grk −log P(observed outcome).
  The same number train.py reports as val NLL.
- accuracy: decisive votes only (winner model_a or model_b): the vote counts as right when the
  predicted P(a wins) > P(b wins) points at the winner, ½ when they are equal (the uniform
  leaderboard scores exactly ½). For all three heads P(a wins) > P(b wins) ⇔ β_a > β_b.
- brier: bt / bt-tie (P(a≻b) − p)² with p the soft label (1/0 decisive, ½ a tie under bt-tie);
  rk / grk the multi-class Σ_k (P(k) − 1[y = k])² over the head's outcomes (rk: a, b, tie with
  both-bad counted as a tie; grk: a, b, tie, both-bad), in [0, 2].
- tie_nll (rk, grk), bothbad_nll (grk): the mean −log P over the votes with that outcome.
Baselines: marginal = one leaderboard for every prompt (marginal.json, the head's starting
point); category = fit_marginal on the training votes of the vote's category, the marginal for
a category with no training votes (listed in the output); uniform = all β equal, which is
P(a≻b) = ½ for bt; rk fits η alone, grk fits η and the common β (β sets how often both are bad),
so uniform matches the base rates of ties and both-bad but knows nothing about models.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from aggregate import aggregate, fit_marginal
from common import (
    A, add_checkpoint_options, autodetect_device, B, batch_nll, BOTHBAD, cat_pairs, check_out, checkpoint_config,
    checkpoint_fingerprint, encode_for, group_by_prompt, HEAD_OF_LOSS, load_checkpoint, load_predictions, LOSSES,
    outcome_logprobs, OutputSet, pair_nll, predict, predictions_meta, prompt_key, read_battles, read_marginal,
    save_predictions, sha256_file, TIE, write_json,
)


# -----------------------------------------------------------------------------
# what other stages import from here: prediction split over torchrun ranks (route.py, livebench_eval.py)
# and the paired bootstrap (cv.py, extend_eval.py)


def dist_env():
    """(rank, world, local_rank) from the launcher's environment (torchrun, deepspeed); (0, 1, 0) alone."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def predict_prompts(model, tok, prompts, shard_dir, batch_size=16, device="cpu", autocast_dtype=None, max_tokens=0):
    """predict() for prompts (lists of turns), split over the ranks of a torchrun launch: rank r
    tokenizes and runs prompts r, r+N, ..., writes its shard into shard_dir, and rank 0 merges the
    shards into the (beta, eta) one process would have computed. Other ranks get None back and
    should exit. Alone (no launcher) it is plain encode + predict."""
    rank, world, local_rank = dist_env()
    if world > 1 and str(device).startswith("cuda"):
        device = f"cuda:{local_rank}"
    model.to(device)
    mine = list(range(rank, len(prompts), world))
    beta, eta = predict(model, encode_for(model, tok, [prompts[i] for i in mine]), tok.pad_token_id,
                        batch_size, device, autocast_dtype, max_tokens)
    if world == 1:
        return beta, eta
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=shard_dir, prefix=f".shard-{rank}.")
    os.close(fd)
    torch.save({"rows": torch.tensor(mine, dtype=torch.long), "beta": beta, "eta": eta}, tmp)
    os.replace(tmp, shard_dir / f".shard-{rank}-of-{world}.pt")
    dist.barrier()  # every shard is on disk
    out = None
    if rank == 0:
        out = [None, None]
        for r in range(world):
            f = shard_dir / f".shard-{r}-of-{world}.pt"
            sh = torch.load(f, weights_only=True)
            f.unlink()
            if sh["beta"] is None:  # more ranks than prompts
                continue
            if out[0] is None:
                out = [torch.empty(len(prompts), sh["beta"].shape[1]), torch.empty(len(prompts)) if sh["eta"] is not None else None]
            if len(sh["rows"]):
                out[0][sh["rows"]] = sh["beta"]
                if out[1] is not None:
                    out[1][sh["rows"]] = sh["eta"]
        out = tuple(out)
    dist.barrier()
    dist.destroy_process_group()
    return out


def paired_bootstrap(s1, s2, w, n_boot, seed):
    """95% percentile CIs of Σs1/Σw − Σs2/Σw and of Σs1/Σs2 − 1 over prompts resampled with replacement,
    the same prompts for both (paired): s1, s2 per-prompt weighted NLL sums of two models, w the
    per-prompt weights (numpy). One resample at a time, so memory stays O(prompts)."""
    rng = np.random.default_rng(seed)
    diff, rel = np.empty(n_boot), np.empty(n_boot)
    for k in range(n_boot):
        i = rng.integers(0, len(w), len(w))
        a, b = s1[i].sum(), s2[i].sum()
        diff[k], rel[k] = (a - b) / w[i].sum(), a / b - 1
    return np.percentile(diff, [2.5, 97.5]).tolist(), np.percentile(rel, [2.5, 97.5]).tolist()


# -----------------------------------------------------------------------------
# helpers


def checkpoint_info(ckpt):
    """(loss, model list) from a checkpoint's JSON files, without loading weights (None for the
    loss in the authors' layout, which does not record it)."""
    try:
        p2l, _ = checkpoint_config(ckpt, need_models=False)
    except (ValueError, OSError) as e:
        sys.exit(f"error: --checkpoint {ckpt}: {e}")
    return p2l.get("loss"), p2l["model_list"]


def fit_uniform(pairs, n_models, loss):
    """All β equal. bt: nothing to fit (β = 0). rk: η alone (the shift of β is irrelevant). grk: η and the
    common β, because β sets P(both bad) = 1/(1 + 2e^β) and must be free to match its base rate."""
    head = HEAD_OF_LOSS[loss]
    allp = cat_pairs(pairs)
    allp["row"] = torch.zeros_like(allp["row"])
    c = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    eta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    params = {"bt": [], "rk": [eta], "grk": [c, eta]}[head]
    if params:
        opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            s, w = batch_nll(c.expand(1, n_models), eta, allp, loss)
            (s / w).backward()
            return s / w
        opt.step(closure)
    return c.detach().expand(n_models).clone(), eta.detach()[0]


def vote_metrics(beta, eta, row, pairs, loss, n_prompts):
    """The metrics of the docstring for coefficients beta [R, M] (eta [R] or None), vote i scored with
    row row[i]; also the per-prompt weighted NLL sums (pairs['row'] is the prompt) for the bootstrap."""
    head = HEAD_OF_LOSS[loss]
    beta = beta.double()
    e = eta.double()[row] if eta is not None else None
    ba, bb = beta[row, pairs["a"]], beta[row, pairs["b"]]
    y, p, w = pairs["y"], pairs["p"], pairs["w"]
    nll = pair_nll(ba, bb, e, y, p, loss)
    prob = outcome_logprobs(ba, bb, e, head).exp()
    brier = (prob[:, A] - p) ** 2 if head == "bt" else ((prob - F.one_hot(y, 4).double()) ** 2).sum(-1)
    right = torch.where(ba > bb, (y == A).double(), torch.where(ba < bb, (y == B).double(), 0.5))

    def mean(x, keep):
        wk = w * keep
        return (x * wk).sum().item() / wk.sum().item() if wk.sum() > 0 else None
    out = {"nll": mean(nll, 1.0), "accuracy": mean(right, (y == A) | (y == B)), "brier": mean(brier, 1.0)}
    if head != "bt":
        out["tie_nll"] = mean(nll, y == TIE)
    if head == "grk":
        out["bothbad_nll"] = mean(nll, y == BOTHBAD)
    per_prompt = torch.zeros(n_prompts, dtype=torch.float64).index_add_(0, pairs["row"], nll * w)
    return out, per_prompt


def agreement(beta1, eta1, beta2, eta2, keep, head):
    """Spearman and Kendall τ of two leaderboards' coefficients, and the mean over ordered pairs i ≠ j
    of |P1(i beats j) − P2(i beats j)| under the head's outcome model, over the models in keep."""
    def p_win(b, e):
        b = b.double()[keep]
        n = len(b)
        return outcome_logprobs(b[:, None].expand(n, n), b[None, :].expand(n, n),
                                  torch.full((n, n), float(e), dtype=torch.float64), head)[..., A].exp()
    off = ~torch.eye(int(keep.sum()), dtype=torch.bool)
    x, y = beta1[keep].tolist(), beta2[keep].tolist()
    defined = len(set(x)) > 1 and len(set(y)) > 1  # else a rank correlation is undefined: None, not NaN
    return {"spearman": float(stats.spearmanr(x, y)[0]) if defined else None,
            "kendall": float(stats.kendalltau(x, y)[0]) if defined else None,
            "mean_abs_dp": (p_win(beta1, eta1) - p_win(beta2, eta2)).abs()[off].mean().item()}


def check_device(device, flag="--device"):
    """A clear error for a device this machine does not have, before anything is loaded."""
    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: no CUDA device on this machine (use cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: no MPS device on this machine (use cpu)")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {device}: expected cpu, cuda, cuda:N or mps")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what is scored: a checkpoint (or its saved predictions) on held-out votes")
    what.add_argument("--checkpoint", help="P2L checkpoint dir (this project's or the authors' released layout); its "
                      "marginal.json supplies the baselines. With --preds only its config.json and marginal.json are read")
    what.add_argument("--preds", metavar="DIR", help="evaluate the predictions already in DIR (from an earlier run) instead of "
                      "running the model: they are what aggregate.py and route.py read, so no forward pass is repeated; "
                      "predictions made by another checkpoint than --checkpoint (model list, fingerprint) are refused")
    add_checkpoint_options(what, "; also the outcome model the predictions are scored with")
    what.add_argument("--data", default="data/alpaca_eval/val.jsonl.gz", help="held-out battles JSONL(.gz), docs/design.md §3; "
                      "soft labels (p_a) and the Arena column forms are read too")
    what.add_argument("--strict", action="store_true", help="a vote naming a model the checkpoint does not know is an error "
                      "(file:line) instead of being skipped and counted")
    base = p.add_argument_group("the baselines and the P2L − marginal confidence interval")
    base.add_argument("--train-votes", metavar="FILE", help="the votes the checkpoint was trained on, to fit the baselines "
                      "when it has no marginal.json (or its `train` path is gone); given, it overrides marginal.json")
    base.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples over prompts for the P2L − marginal NLL CI")
    base.add_argument("--seed", type=int, default=0, help="bootstrap seed: the CI is reproducible")
    fwd = p.add_argument_group("the forward passes (none with --preds)")
    fwd.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (batched by length, little padding)")
    fwd.add_argument("--max-tokens", type=int, default=0, help="instead of --batch-size: as many prompts (sorted by length) as "
                     "fit this many padded tokens per forward pass; `torchrun --nproc_per_node N evaluate.py ...` splits prompts over N ranks")
    fwd.add_argument("--device", default=autodetect_device(), help="cuda / mps / cpu (default: what is there)")
    fwd.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast is faster on GPUs; fp32 "
                     "reproduces the NLL train.py reported to ~1e-6")
    p.add_argument("--out", default="out/eval", help="predictions.safetensors + predictions.jsonl and metrics.json, written "
                   "as one set when everything has succeeded (metrics.json last; it records the predictions' sha256)")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.preds:
        p.error("pass --checkpoint DIR (or --preds DIR with --loss and --train-votes)")
    for flag, v in (("--bootstrap", args.bootstrap), ("--batch-size", args.batch_size), ("--max-len", args.max_len or 1),
                    ("--max-tokens", args.max_tokens or 1)):
        if v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    try:
        check_out(args.out)
        if not args.preds:
            check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


class Inputs(NamedTuple):
    """What read_inputs checked: the held-out votes, the outcome model, the model list (the
    checkpoint's, or --preds'), the baselines' sources, and --preds' (beta, eta, model_list, rows)."""
    battles: list
    loss: str
    model_list: list
    unknown: Counter  # votes' models the checkpoint does not know -> count
    mj: Optional[dict]  # marginal.json when it is usable as the marginal baseline as it stands
    train_path: str
    train: Optional[list]  # the training votes, when a baseline has to be fitted on them
    preds: Optional[tuple]

    @property
    def head(self):
        return HEAD_OF_LOSS[self.loss]

    @property
    def index(self):
        return {m: i for i, m in enumerate(self.model_list)}


def read_preds(args, ck_models):
    """--preds' (beta, eta, model_list, rows), refused when they come from another checkpoint than
    --checkpoint: another model list, or another checkpoint_fingerprint than the one they record
    (the baselines would then belong to another model and the comparison would be meaningless)."""
    try:
        preds, meta = load_predictions(args.preds), predictions_meta(args.preds)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: --preds {args.preds}: {e}")
    if not args.checkpoint:
        return preds
    if ck_models is not None and preds[2] != ck_models:
        diff = sorted(set(preds[2]) ^ set(ck_models))
        sys.exit(f"error: --preds {args.preds} were made for {len(preds[2])} models, --checkpoint {args.checkpoint} lists "
                 f"{len(ck_models)} ({'e.g. ' + repr(diff[0]) + ' in one only' if diff else 'in another order'}): "
                 "predictions of another checkpoint; rerun evaluate.py --checkpoint without --preds")
    if "checkpoint_fingerprint" in meta:
        if meta["checkpoint_fingerprint"] != checkpoint_fingerprint(args.checkpoint):
            sys.exit(f"error: --preds {args.preds} were made by the checkpoint {meta['checkpoint']}, and --checkpoint "
                     f"{args.checkpoint} is another one (its files differ): its baselines do not belong to these "
                     "predictions; pass that checkpoint, or rerun evaluate.py --checkpoint without --preds")
    else:
        print(f"note: --preds {args.preds} record no checkpoint fingerprint"
              f"{' (made by ' + meta['checkpoint'] + ')' if 'checkpoint' in meta else ''}: could not check that "
              f"--checkpoint {args.checkpoint} made them")
    return preds


def read_inputs(args):
    """Everything that can be wrong with the inputs fails here: before the (slow) model load, any
    forward pass, or anything written."""
    try:
        battles = read_battles(args.data)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ck_loss, ck_models = checkpoint_info(args.checkpoint) if args.checkpoint else (None, None)
    loss = args.loss or ck_loss
    if loss not in LOSSES:
        sys.exit(f"error: {args.checkpoint or args.preds}: no loss recorded (the authors' released layout does not say): "
                 f"pass --loss ({'|'.join(LOSSES)})")
    preds = read_preds(args, ck_models) if args.preds else None
    if preds is None and ck_models is None:
        sys.exit(f"error: --checkpoint {args.checkpoint}: no model list (config.json p2l.model_list or model_list.json)")
    model_list = preds[2] if preds else ck_models
    index = {m: i for i, m in enumerate(model_list)}
    unknown = Counter(m for b in battles for m in (b["model_a"], b["model_b"]) if m not in index)
    if unknown and args.strict:
        k = next(i for i, b in enumerate(battles) if b["model_a"] not in index or b["model_b"] not in index)
        bad = [m for m in (battles[k]["model_a"], battles[k]["model_b"]) if m not in index]
        sys.exit(f"error: {battles[k]['where']}: model {bad[0]!r} is not in the checkpoint's model list "
                 f"({len(unknown)} unknown models in all; drop --strict to skip and count such votes)")
    # the marginal leaderboard and the training votes behind it, read now when a baseline needs them
    try:  # its `train` is found again if the checkpoint was moved
        mj = read_marginal(args.checkpoint) if args.checkpoint else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    train_path = args.train_votes or (mj or {}).get("train")
    if train_path is None:
        sys.exit(f"error: {f'--checkpoint {args.checkpoint} has no marginal.json' if args.checkpoint else 'no --checkpoint'} "
                 "to take the baselines from: pass --train-votes FILE (the votes the checkpoint was trained on) to fit them")
    use_mj = mj is not None and not args.train_votes and mj.get("loss") == loss and all(m in mj.get("model_list", []) for m in model_list)
    need_train = not use_mj or any(b["category"] is not None for b in battles) or HEAD_OF_LOSS[loss] != "bt"
    train = None
    if need_train:
        if not Path(train_path).exists():
            sys.exit(f"error: training votes {train_path} (marginal.json's `train`) not found: pass --train-votes FILE")
        try:
            train = read_battles(train_path)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    return Inputs(battles, loss, model_list, unknown, mj if use_mj else None, train_path, train, preds)


class Votes(NamedTuple):
    """The held-out votes grouped by prompt: keys[i] / prompts[i] is prompt i (first-seen order);
    pairs holds every kept vote with pairs["row"] its prompt; vote_cat the category of each."""
    keys: list
    prompts: list
    by_prompt: dict  # prompt key -> its battles
    pairs_list: list  # per kept prompt, group_by_prompt's pairs (the vote fit takes them as they are)
    pairs: dict
    vote_cat: list
    n_skipped: int

    @property
    def P(self):
        return len(self.keys)

    @property
    def n_votes(self):
        return len(self.vote_cat)


def group_votes(args, inp):
    """Votes grouped by prompt; every unique prompt gets a prediction, even one whose votes were all skipped."""
    battles, index, loss = inp.battles, inp.index, inp.loss
    keys = list(dict.fromkeys(prompt_key(b["prompt"]) for b in battles))
    pos = {k: i for i, k in enumerate(keys)}
    by_prompt = {}
    for b in battles:
        by_prompt.setdefault(prompt_key(b["prompt"]), []).append(b)
    kept_prompts, pairs_list, n_skipped = group_by_prompt(battles, index, loss)
    if not pairs_list:
        sys.exit(f"error: {args.data}: none of its {len(battles)} votes is between two models the checkpoint knows")
    pairs = cat_pairs(pairs_list)
    pairs["row"] = torch.tensor([pos[prompt_key(t)] for t in kept_prompts])[pairs["row"]]  # -> index into prompts
    # the category of each kept vote, in the order group_by_prompt emitted them
    vote_cat = [b["category"] for t in kept_prompts for b in by_prompt[prompt_key(t)]
                if b["model_a"] in index and b["model_b"] in index]
    if pairs["w"].sum() == 0:
        sys.exit(f"error: {args.data}: no vote carries weight (plain bt drops hard-label ties): try --loss bt-tie")
    print(f"{args.data}: {len(vote_cat)} votes on {len(keys)} prompts, {n_skipped} skipped (unknown model: "
          f"{', '.join(f'{m} ×{c}' for m, c in inp.unknown.most_common(5)) or 'none'}); {len(inp.model_list)} models, loss {loss}")
    return Votes(keys, [json.loads(k) for k in keys], by_prompt, pairs_list, pairs, vote_cat, n_skipped)


def reused_predictions(args, inp, votes):
    """(beta [P, M], eta [P] or None) for the prompts of --data, from --preds."""
    pred_beta, pred_eta, _, pred_rows = inp.preds
    where = {prompt_key(r["prompt"]): i for i, r in enumerate(pred_rows)}
    missing = [k for k in votes.keys if k not in where]
    if missing:
        b = next(b for b in inp.battles if prompt_key(b["prompt"]) == missing[0])
        sys.exit(f"error: {b['where']}: prompt not in --preds {args.preds} ({len(missing)} of {votes.P} prompts missing)")
    take = torch.tensor([where[k] for k in votes.keys])
    beta, eta = pred_beta[take], (pred_eta[take] if pred_eta is not None else None)
    if (eta is None) != (inp.head == "bt"):
        sys.exit(f"error: --preds {args.preds} {'has no' if eta is None else 'has an'} eta but the loss is {inp.loss}")
    return beta, eta


def load_model(args, inp):
    try:
        return load_checkpoint(args.checkpoint, inp.loss, max_len=args.max_len)
    except (ValueError, OSError) as e:
        sys.exit(f"error: --checkpoint {args.checkpoint}: {e}")


def predictions(args, votes, model, tok):
    """(beta [P, M], eta [P] or None, rows): one forward per unique prompt, batched by length."""
    # under torchrun each rank runs every N-th prompt into a shard in --out; rank 0 merges them and
    # carries on alone (it alone holds --out's lock and writes the outputs)
    res = predict_prompts(model, tok, votes.prompts, args.out, args.batch_size, args.device,
                          torch.bfloat16 if args.dtype == "bf16" else None, args.max_tokens)
    if res is None:
        sys.exit(0)
    beta, eta = res
    rows = []
    for k, t in zip(votes.keys, votes.prompts):
        cats = sorted({str(b["category"]) for b in votes.by_prompt[k] if b["category"] is not None})
        row = {"prompt": t, "prompt_id": hashlib.sha1(k.encode()).hexdigest()[:12], "ids": [b["id"] for b in votes.by_prompt[k]]}
        if cats:
            row["category"] = cats[0] if len(cats) == 1 else cats
        rows.append(row)
    if not torch.isfinite(beta).all() or (eta is not None and not torch.isfinite(eta).all()):
        sys.exit(f"error: --checkpoint {args.checkpoint}: the model predicts non-finite coefficients")
    return beta, eta, rows


class Baselines(NamedTuple):
    """The leaderboards P2L is compared with: marginal (mbeta, meta), per category (row 0 the
    marginal, row 1 + i categories[i]; fallback: categories without training votes), uniform."""
    mbeta: torch.Tensor
    meta: torch.Tensor
    categories: list
    cat_beta: list
    cat_eta: list
    fallback: list
    ubeta: torch.Tensor
    ueta: torch.Tensor
    notes: list


def baselines(inp, votes):
    """The marginal, per-category and uniform leaderboards, fitted on the training votes (or marginal.json)."""
    loss, M, index, head = inp.loss, len(inp.model_list), inp.index, inp.head

    def train_pairs(category=None):  # the training votes (all, or one category's) grouped for the loss; None if none weigh
        tb = [b for b in inp.train if category is None or b["category"] == category]
        _, tp, _ = group_by_prompt(tb, index, loss)
        return tp if tp and sum(t["w"].sum().item() for t in tp) > 0 else None

    notes, mj = [], inp.mj
    if mj is not None:
        mbeta = torch.tensor(mj["beta"], dtype=torch.float64)[[mj["model_list"].index(m) for m in inp.model_list]]
        meta = torch.tensor(float(mj["eta"]), dtype=torch.float64)
    else:  # no marginal.json, another loss, or other models: refit on the training votes
        notes.append(f"marginal refitted on {inp.train_path} for loss {loss}")
        tp = train_pairs()
        if tp is None:
            sys.exit(f"error: {inp.train_path}: no training votes between models the checkpoint knows")
        try:
            mbeta, meta = (t.double() for t in fit_marginal(tp, M, loss))
        except ValueError as e:  # a fit that does not converge is refused, never a silent number
            sys.exit(f"error: {inp.train_path}: {e}")
    categories = sorted({c for c in votes.vote_cat if c is not None}, key=str)
    cat_beta, cat_eta, fallback = [mbeta], [meta], []  # row 0: the marginal, for votes without a category
    for c in categories:
        tp = train_pairs(c)
        if tp is None:
            fallback.append(c)
            b_, e_ = mbeta, meta
        else:
            try:
                b_, e_ = (t.double() for t in fit_marginal(tp, M, loss, note=lambda m, c=c: print(f"category {c!r}: {m}")))
            except ValueError as e:  # no fit for this category's votes: the marginal stands in, and says so
                notes.append(f"category {c!r}: {e}; the marginal used there")
                b_, e_ = mbeta, meta
        cat_beta.append(b_)
        cat_eta.append(e_)
    if fallback:
        notes.append(f"category: no training votes for {fallback}, the marginal used there")
    if not categories:
        notes.append("category: the votes have no `category` field")
    if head != "bt":
        tp = train_pairs()
        if tp is None:
            sys.exit(f"error: {inp.train_path}: no training votes between models the checkpoint knows")
        ubeta, ueta = fit_uniform(tp, M, loss)
    else:
        ubeta, ueta = torch.zeros(M, dtype=torch.float64), torch.tensor(0.0)
    return Baselines(mbeta, meta, categories, cat_beta, cat_eta, fallback, ubeta, ueta, notes)


def score(args, inp, votes, beta, eta, base):
    """Every metric of the docstring, the paired bootstrap CI and the leaderboard agreement."""
    loss, head, pairs, P, M = inp.loss, inp.head, votes.pairs, votes.P, len(inp.model_list)
    eta1 = (lambda e: e.reshape(1)) if head != "bt" else (lambda e: None)  # one leaderboard's eta as a 1-row tensor
    zero = torch.zeros(votes.n_votes, dtype=torch.long)
    p2l, p2l_pp = vote_metrics(beta, eta, pairs["row"], pairs, loss, P)
    marg, marg_pp = vote_metrics(base.mbeta[None], eta1(base.meta), zero, pairs, loss, P)
    results = {"p2l": p2l, "marginal": marg, "category": None}
    if base.categories:
        cat_row = torch.tensor([0 if c is None else 1 + base.categories.index(c) for c in votes.vote_cat])
        results["category"] = vote_metrics(torch.stack(base.cat_beta), torch.stack(base.cat_eta) if head != "bt" else None,
                                           cat_row, pairs, loss, P)[0]
    results["uniform"] = vote_metrics(base.ubeta[None], eta1(base.ueta), zero, pairs, loss, P)[0]
    # paired bootstrap over prompts: resample prompts with replacement, NLL = Σ weighted NLL / Σ weight of the resample
    w_pp = torch.zeros(P, dtype=torch.float64).index_add_(0, pairs["row"], pairs["w"])
    live = w_pp > 0  # prompts whose votes all weigh 0 (or were skipped) say nothing
    s1, s2, wp = p2l_pp[live].numpy(), marg_pp[live].numpy(), w_pp[live].numpy()
    diff_ci, rel_ci = paired_bootstrap(s1, s2, wp, args.bootstrap, args.seed)
    boot = {"nll_diff": p2l["nll"] - marg["nll"], "n_live": len(wp), "nll_diff_ci": diff_ci,
            "nll_rel_diff_pct_ci": [100 * x for x in rel_ci]}
    # leaderboard agreement: the aggregated P2L leaderboard on these prompts (each prompt weighted by its votes, so
    # both leaderboards average over the same prompts) vs a leaderboard fitted to these votes
    agg_beta, agg_eta = aggregate(beta[live], eta[live] if eta is not None else None, loss, weights=w_pp[live])
    vbeta, veta = fit_marginal(votes.pairs_list, M, loss)
    seen = torch.zeros(M, dtype=torch.bool)
    seen[pairs["a"][pairs["w"] > 0]] = True
    seen[pairs["b"][pairs["w"] > 0]] = True  # a model with no votes here has only the ridge's 0 in the vote fit: left out
    board = {"n_models": int(seen.sum()),
             "p2l": agreement(agg_beta, agg_eta, vbeta, veta, seen, head),
             "marginal": agreement(base.mbeta, base.meta, vbeta, veta, seen, head),
             "models": inp.model_list, "p2l_beta": agg_beta.tolist(), "p2l_eta": float(agg_eta),
             "votes_beta": vbeta.tolist(), "votes_eta": float(veta)}
    return results, boot, board


def report(args, inp, votes, results, boot, board, notes, secs):
    head = inp.head
    cols = ["nll", "accuracy", "brier"] + (["tie_nll"] if head != "bt" else []) + (["bothbad_nll"] if head == "grk" else [])
    fmt = lambda v: f"{v:>12.4f}" if v is not None else f"{'-':>12}"
    marg, ci, rel_ci = results["marginal"], boot["nll_diff_ci"], boot["nll_rel_diff_pct_ci"]
    print(f"\n{'':10}" + "".join(f"{c:>12}" for c in cols) + f"{'vs marginal':>13}")
    for name in ("p2l", "marginal", "category", "uniform"):
        r = results[name]
        if r is not None:
            print(f"{name:10}" + "".join(fmt(r[c]) for c in cols) + f"{100 * (r['nll'] / marg['nll'] - 1):+12.2f}%")
    print(f"P2L − marginal NLL {boot['nll_diff']:+.4f}, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}] "
          f"({100 * boot['nll_diff'] / marg['nll']:+.2f}%, [{rel_ci[0]:+.2f}%, {rel_ci[1]:+.2f}%]); "
          f"paired bootstrap over {boot['n_live']} prompts, {args.bootstrap} resamples")
    print(f"leaderboard vs a fit to these votes ({board['n_models']} models):  spearman  kendall  mean|ΔP|")
    for name, label in (("p2l", "P2L aggregated"), ("marginal", "marginal (train)")):
        a = board[name]
        print(f"  {label:38}" + "".join(f"{v:9.4f}" if v is not None else f"{'-':>9}" for v in (a["spearman"], a["kendall"]))
              + f"{a['mean_abs_dp']:10.4f}")
    for n in notes:
        print(f"note: {n}")
    print(f"{votes.n_votes} votes, {votes.n_skipped} skipped; {secs:.1f} s; metrics -> {args.out}/metrics.json")


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    torch.manual_seed(0)
    inp = read_inputs(args)
    votes = group_votes(args, inp)
    t_pred = time.time()
    if args.preds:
        (beta, eta), rows = reused_predictions(args, inp, votes), None
    else:
        model, tok = load_model(args, inp)  # a bad checkpoint fails here, before --out is touched
        if dist_env()[0] != 0:  # a torchrun rank > 0 only runs its share of the forward passes, then exits
            predictions(args, votes, model, tok)
    try:
        with OutputSet(args.out) as out:  # locked from here to the commit: no second run interleaves its files
            if not args.preds:
                beta, eta, rows = predictions(args, votes, model, tok)
            pred_seconds = time.time() - t_pred
            print(f"predictions for {votes.P} prompts in {pred_seconds:.1f} s")
            base = baselines(inp, votes)
            results, boot, board = score(args, inp, votes, beta, eta, base)
            if rows is not None:  # staged: nothing reaches --out until the whole set is ready
                save_predictions(out.stage, beta, eta, inp.model_list, rows, loss=inp.loss, checkpoint=args.checkpoint)
            preds_dir = Path(args.preds) if args.preds else Path(args.out)
            digest = sha256_file((out.stage if rows is not None else preds_dir) / "predictions.safetensors")
            metrics = dict(results, n_votes=votes.n_votes, n_skipped=votes.n_skipped, nll_diff=boot["nll_diff"],
                           nll_diff_ci=boot["nll_diff_ci"], nll_rel_diff_pct_ci=boot["nll_rel_diff_pct_ci"], n_prompts=votes.P,
                           skipped_models=dict(inp.unknown.most_common()), leaderboard=board, loss=inp.loss,
                           checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                           preds=str(preds_dir.resolve()), predictions_sha256=digest,
                           data=str(Path(args.data).resolve()), train_votes=str(Path(inp.train_path).resolve()),
                           category_fallback=base.fallback, notes=base.notes, bootstrap=args.bootstrap, seed=args.seed,
                           predict_seconds=round(pred_seconds, 1), seconds=round(time.time() - t_start, 1))
            write_json(out.stage / "metrics.json", metrics)
            out.commit(marker="metrics.json")
    except ValueError as e:  # --out held by another run
        sys.exit(f"error: {e}")
    report(args, inp, votes, results, boot, board, base.notes, time.time() - t_start)


if __name__ == "__main__":
    main()
