"""What two or more P2L stages share (what only training uses, the vote index, the backbone
loader and the token cache, is in train.py). Nothing here runs by itself. Its sections, in order:
  battles         battle files (JSONL(.gz), parquet, the Arena column forms) and votes grouped by prompt
  outcome models  bt / rk / grk in log space, the per-vote losses
  tokenization    how a backbone reads a prompt: chat template, CLS token, left truncation; right padding
  batches         token_batches: length-grouped batches under a padded-token budget
  the P2L model   backbone + head, predict(); torch_threads
  files           atomic writes, --out locks, reading checkpoints, predictions files, the shared CLI options
The leaderboard solver (the pairwise sweeps, the Newton fit to target probabilities or to votes, and
the marginal leaderboard fit) is aggregation's algorithm: it lives in aggregate.py, which train.py,
evaluate.py, head_eval.py and route.py import for it. Likewise prediction split over torchrun ranks and
the paired bootstrap are evaluate.py's, writing checkpoints is train.py's, cost files are route.py's.

    python -c "import common; print(common.outcome_logprobs.__doc__)"
"""
import contextlib
import gzip
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLS_TOKEN = "<|cls|>"  # the authors' released checkpoints use this exact string
A, B, TIE, BOTHBAD = 0, 1, 2, 3  # outcome indices, the order of outcome_logprobs' last axis
WINNERS = {"model_a": A, "model_b": B, "tie": TIE, "tie (bothbad)": BOTHBAD}
LOSSES = ("bt", "bt-tie", "rk", "grk", "rk-soft", "grk-soft")
HEAD_OF_LOSS = {"bt": "bt", "bt-tie": "bt", "rk": "rk", "grk": "grk", "rk-soft": "rk", "grk-soft": "grk"}
SOFT_LOSSES = ("rk-soft", "grk-soft")  # tie-aware heads scored on a judge's soft label p_a itself (judge_logprobs)
LN10 = math.log(10.0)


def rating(beta):
    """Arena rating scale: 400 Elo points per factor 10 in odds."""
    return 1000.0 + 400.0 * beta / LN10

# -----------------------------------------------------------------------------
# battles: one vote per JSONL line (docs/design.md §3), also the public Arena column forms

def _text_of(content):
    """A turn's text: a string, or (LMArena's newer releases) a list of parts {type, text}, whose
    text parts are joined; anything else is returned as it is for parse_turns to refuse."""
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    return content


def parse_turns(row, where):
    """The user turns of a row: `prompt` (a string or a list of strings) or, in the Arena form,
    the user turns of `conversation_a`. An empty turn inside a list is kept as it is (the user did
    send an empty message, and the chat template renders it); only a prompt whose every turn is
    empty is refused, because the model would see no text at all."""
    prompt = row.get("prompt")
    if prompt is None and "conversation_a" in row:  # Arena form: keep the user turns only
        conv = row["conversation_a"]
        if not isinstance(conv, list):
            raise ValueError(f"{where}: conversation_a must be a list of {{role, content}}")
        prompt = [_text_of(t.get("content")) for t in conv if isinstance(t, dict) and t.get("role") == "user"]
    if prompt is None:
        raise ValueError(f"{where}: missing 'prompt' (a string or a list of strings)")
    turns = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: prompt must be a string or list of strings, got {json.dumps(prompt)[:60]}")
    if not any(t.strip() for t in turns):
        raise ValueError(f"{where}: empty prompt")
    return turns


ARENA_FLAGS = ("winner_model_a", "winner_model_b", "winner_tie")
# fields a battle carries under its own names; every other field of a row travels along (e.g. for --by)
_BATTLE_KEYS = {"prompt", "conversation_a", "conversation_b", "model_a", "model_b", "winner", *ARENA_FLAGS,
                "p_a", "weight", "id", "where", "outcome"}


def _number(x):
    """True for an int or float that is not a bool (JSON true would otherwise read as 1)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_battle(row, where):
    turns = parse_turns(row, where)
    for key in ("model_a", "model_b"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ValueError(f"{where}: missing model field '{key}'")
    if row["model_a"] == row["model_b"]:
        raise ValueError(f"{where}: model_a and model_b are both '{row['model_a']}'")
    if "winner" in row:
        w = row["winner"]
        if not isinstance(w, str) or w not in WINNERS:
            raise ValueError(f"{where}: unknown winner {w!r}; expected one of {list(WINNERS)}")
        outcome = WINNERS[w]
    elif any(k in row for k in ARENA_FLAGS):  # Arena 0/1 columns: each must be 0 or 1 (false/true too), one of them 1
        flags = []
        for k in ARENA_FLAGS:
            v = row.get(k, 0)
            if v not in (0, 1) or not isinstance(v, (int, float, bool)):
                raise ValueError(f"{where}: {k} must be 0 or 1, got {json.dumps(v)}")
            flags.append(int(v))
        if sum(flags) != 1:
            raise ValueError(f"{where}: exactly one of winner_model_a/winner_model_b/winner_tie must be 1, got {flags}")
        outcome = flags.index(1)
    else:
        raise ValueError(f"{where}: missing 'winner' (or the winner_model_a/b/tie columns)")
    p_a = row.get("p_a")
    if p_a is not None and not (_number(p_a) and 0.0 <= p_a <= 1.0):
        raise ValueError(f"{where}: p_a must be a number in [0, 1], got {json.dumps(p_a)}")
    weight = row.get("weight", 1.0)
    if not (_number(weight) and weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"{where}: weight must be a finite number >= 0, got {json.dumps(weight)}")
    extra = {k: v for k, v in row.items() if k not in _BATTLE_KEYS}
    return {**extra, "prompt": turns, "model_a": row["model_a"], "model_b": row["model_b"], "outcome": outcome,
            "p_a": None if p_a is None else float(p_a), "weight": float(weight),
            "category": row.get("category"), "id": row.get("id", where), "where": where}


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800..\udfff in JSON text: maybe a lone surrogate


def _lone_surrogate(x):
    """True if a parsed JSON value holds a string that is not valid Unicode (a lone UTF-16
    surrogate such as "\\ud800": half of an emoji a client cut in two). JSON lets it through; the
    tokenizer raises a TypeError on it and UTF-8 cannot encode it."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(x, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in x.items())
    return isinstance(x, list) and any(_lone_surrogate(v) for v in x)


def read_jsonl(path, keep_blank=False):
    """Yield (where, row) for each non-blank line of a JSONL(.gz) file, where = "path:line"; a line
    that is not a JSON object, a string that is not valid Unicode (a lone surrogate), a truncated or
    corrupt .gz, bytes that are not UTF-8, or a path that is not a readable file raise ValueError
    naming the file (and line). keep_blank: blank lines yield row None. Lines are read as bytes and
    decoded one by one, so a bad byte is reported at its own line (a text-mode reader decodes ahead
    in 8 KB blocks, and its error came lines early); a UTF-8 byte-order mark is skipped. A .parquet
    file is read by read_parquet instead (the same (where, row) pairs)."""
    if str(path).endswith(".parquet"):
        yield from read_parquet(path)
        return
    import zlib
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory, expected a file")
    lineno = 0
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if not line.strip():
                    if keep_blank:
                        yield where, None
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
                if _SURROGATE_ESCAPE.search(line) and _lone_surrogate(row):
                    raise ValueError(f"{where}: a string holds a lone UTF-16 surrogate (e.g. \"\\ud800\", half of an "
                                     "emoji cut in two): not valid Unicode text; fix or drop the line")
                yield where, row
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}:{lineno + 1}: truncated or corrupt gzip file ({e or type(e).__name__})") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None


PARQUET_BATCH = 1024  # rows per record batch: memory holds one batch as Python dicts, whatever the file's size


def read_parquet(path, batch_size=PARQUET_BATCH):
    """Yield (where, row) for each row of a battle parquet file, where = "path:row N" (N from 1), as
    read_jsonl does for JSONL: the schemas LMArena publishes its human-preference battles in
    (conversation_a as a list of {role, content}, winner in model_a / model_b / tie / tie (bothbad), or
    the winner_model_a/b/tie 0/1 columns; model_a, model_b; id or question_id; language, category and
    other scalar columns travel along, e.g. for --by). Streamed record batch by record batch
    (ParquetFile.iter_batches), so a 140k-row file never sits in memory as Python dicts. Not read at
    all: conversation_b (model_b's answers; the prompt is conversation_a's user turns) and nested,
    binary or time columns other than conversation_a (moderation tags, metadata structs, timestamps),
    which no stage uses and which would not survive a JSON round trip. A file that is not parquet, or
    a corrupt batch, is a ValueError naming the file (and the row where reading stopped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory, expected a file")
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    skip = (pa.types.is_nested, pa.types.is_temporal, pa.types.is_binary, pa.types.is_decimal)
    cols = [f.name for f in pf.schema_arrow
            if f.name == "conversation_a" or (f.name != "conversation_b" and not any(t(f.type) for t in skip))]
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            for row in batch.to_pylist():
                n += 1
                if "id" not in row and row.get("question_id") is not None:
                    row["id"] = row["question_id"]
                yield f"{path}:row {n}", row
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}:row {n + 1}: corrupt parquet data ({e})") from None


def read_battles(path):
    """Read a battle JSONL(.gz) or parquet file; any bad row raises ValueError naming file:line (file:row N)."""
    battles = [parse_battle(row, where) for where, row in read_jsonl(path)]
    if not battles:
        raise ValueError(f"{path}: no battles")
    return battles


def prompt_key(turns):
    return json.dumps(turns, ensure_ascii=False)


def vote_targets_of(outcome, p_a, weight, loss):
    """(y, p, w) numpy arrays for the loss from raw outcomes, soft labels (NaN: none) and weights:
    the BT target is the soft label when there is one, else 1/0 for decisive votes and 1/2 for
    ties; plain bt drops hard-label ties (weight 0) as the paper's BT head does; rk has no
    both-bad outcome, so it counts as a tie."""
    y = outcome.astype(np.int64)
    hard = np.isnan(p_a)
    p = np.where(hard, np.select([y == A, y == B], [1.0, 0.0], 0.5), p_a)
    if loss in SOFT_LOSSES:  # the soft label itself; NaN marks a hard vote, scored on its outcome y
        p = p_a.copy()
    w = weight.copy()
    if loss == "bt":
        w[hard & ((y == TIE) | (y == BOTHBAD))] = 0.0
    if HEAD_OF_LOSS[loss] == "rk":
        y[y == BOTHBAD] = TIE
    return y, p, w


def group_by_prompt(battles, model_index, loss):
    """Turn battles into per-prompt groups: one forward pass per prompt serves all its pairs.
    Returns (prompts, pairs): prompts[i] is a list of turns, pairs[i] a dict of tensors
    a, b (model indices), y (outcome), p (BT target prob.), w (weight) for prompt i, the targets
    by vote_targets_of. Votes for models outside model_index are skipped; the count is returned last."""
    groups, skipped = {}, 0
    for bt in battles:
        if bt["model_a"] not in model_index or bt["model_b"] not in model_index:
            skipped += 1
            continue
        g = groups.setdefault(prompt_key(bt["prompt"]), (bt["prompt"], []))
        g[1].append((model_index[bt["model_a"]], model_index[bt["model_b"]], bt["outcome"],
                     math.nan if bt["p_a"] is None else bt["p_a"], bt["weight"]))
    prompts, pairs = [], []
    for turns, rows in groups.values():
        a, b, y, p, w = (np.array(col) for col in zip(*rows))
        y, p, w = vote_targets_of(y, p.astype(np.float64), w.astype(np.float64), loss)
        prompts.append(turns)
        pairs.append({"a": torch.from_numpy(a), "b": torch.from_numpy(b), "y": torch.from_numpy(y),
                      "p": torch.from_numpy(p), "w": torch.from_numpy(w)})
    return prompts, pairs, skipped


def cat_pairs(pairs, offsets=None):
    """Concatenate per-prompt pair tensors; 'row' says which prompt (0..len-1) each pair belongs to.
    Flat pairs (a dict, e.g. train.index_votes' or pairs_of's) are already that and pass through."""
    if isinstance(pairs, dict):
        return pairs
    out = {k: torch.cat([pp[k] for pp in pairs]) for k in pairs[0]}
    out["row"] = torch.cat([torch.full((len(pp["a"]),), i) for i, pp in enumerate(pairs)])
    return out

# -----------------------------------------------------------------------------
# outcome models, all in log space (docs/design.md §1)

def outcome_logprobs(beta_a, beta_b, eta, head):
    """log P(outcome) for outcomes (a wins, b wins, tie, both bad) along a new last axis.
    bt:  P(a) = σ(Δ); no ties.
    rk:  η = softplus(eta) ≥ 0 (the authors' checkpoints map their raw output to this eta on load: P2LModel); P(a) = σ(Δ−η), P(b) = σ(−Δ−η), P(tie) = 1 − both; no both-bad.
    grk: φ = exp β, θ = 1 + exp(eta); P(a) = φa/(φa+θφb+1), P(b) = φb/(φb+θφa+1),
         P(both bad) = 1/(1+φa+φb), P(tie) = the rest = t·φa·φb·(2+(2+t)(φa+φb)) / (D0·Da·Db)
         with t = exp(eta) (derived by putting the four terms over one denominator).
    Impossible outcomes get -inf."""
    d = beta_a - beta_b
    ninf = torch.full_like(d, -math.inf)
    if head == "bt":
        return torch.stack([F.logsigmoid(d), F.logsigmoid(-d), ninf, ninf], -1)
    if head == "rk":
        zero = torch.zeros_like(d)
        e = torch.logaddexp(zero, eta)  # η = softplus(eta), exact (torch's softplus turns linear past 20)
        # 1 − σ(d−η) − σ(−d−η) = (e^{2η}−1)·φaφb / ((φa+e^η φb)(φb+e^η φa)), with log(e^{2η}−1) = 2η + log(1 − e^{−2η}).
        # For small η, log(1 − e^{−u}) = log u + log((1 − e^{−u})/u) (u = 2η, series) and log η = eta − e^eta/2 + ...
        # for eta < −20: no floor on η, so the gradient in eta never vanishes (a floor zeroed it below eta ≈ −18.4)
        far = eta < -20
        log_e = torch.where(far, eta - torch.exp(torch.where(far, eta, zero - 20)) / 2, torch.log(torch.where(far, zero + 1, e)))
        u = 2 * e
        small = u < 1e-3
        us = torch.where(small, zero + 1, u)
        series = torch.log1p(-u / 2 + u ** 2 / 6 - u ** 3 / 24 + u ** 4 / 120)
        log_1m = torch.where(small, math.log(2.0) + log_e + series, torch.log(-torch.expm1(-us)))
        log_tie = (u + log_1m + beta_a + beta_b
                   - torch.logaddexp(beta_a, e + beta_b) - torch.logaddexp(beta_b, e + beta_a))
        return torch.stack([F.logsigmoid(d - e), F.logsigmoid(-d - e), log_tie, ninf], -1)
    if head == "grk":
        zero = torch.zeros_like(d)
        log_theta = torch.logaddexp(zero, eta)  # log(1 + e^eta), exact where torch's softplus turns linear past 20
        log_da = torch.logsumexp(torch.stack([beta_a, log_theta + beta_b, zero]), 0)
        log_db = torch.logsumexp(torch.stack([beta_b, log_theta + beta_a, zero]), 0)
        log_d0 = torch.logsumexp(torch.stack([zero, beta_a, beta_b]), 0)
        log_2pt = torch.logaddexp(torch.full_like(d, math.log(2.0)), eta + zero)  # log(2 + t)
        log_num = torch.logsumexp(torch.stack([zero + math.log(2.0), log_2pt + beta_a, log_2pt + beta_b]), 0)
        log_tie = eta + beta_a + beta_b + log_num - log_d0 - log_da - log_db
        return torch.stack([beta_a - log_da, beta_b - log_db, log_tie, -log_d0], -1)
    raise ValueError(f"unknown head {head!r}")


def judge_logprobs(beta_a, beta_b, eta, head):
    """(log P(a preferred), log P(b preferred)) for a judge who must pick one of the two, as the
    AlpacaEval judge must (its soft label p_a is this choice's probability). Under rk / grk a tie
    or both-bad outcome leaves such a judge indifferent, so it picks each side half the time:
    P(a preferred) = P(a) + ½·(P(tie) + P(both bad)). The two sum to 1, and for bt they are σ(±Δ),
    so this NLL compares every head on the same labels."""
    lp = outcome_logprobs(beta_a, beta_b, eta, head)
    if head == "bt":
        return lp[..., A], lp[..., B]
    half = torch.logsumexp(lp[..., TIE:], -1) - math.log(2.0)
    return torch.logaddexp(lp[..., A], half), torch.logaddexp(lp[..., B], half)


def pair_nll(beta_a, beta_b, eta, y, p, loss):
    """Per-pair negative log-likelihood. bt / bt-tie use the (soft) target p = P(a preferred):
    −p·log σ(Δ) − (1−p)·log σ(−Δ); rk / grk use the hard outcome y. rk-soft / grk-soft: the
    expected NLL of the soft label, −p·log P(a preferred) − (1−p)·log P(b preferred) with the
    judge's choice probabilities of judge_logprobs; votes with p = NaN (no soft label) use y."""
    if loss in ("bt", "bt-tie"):
        d = beta_a - beta_b
        return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    lp = outcome_logprobs(beta_a, beta_b, eta, HEAD_OF_LOSS[loss])
    hard = -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if loss not in SOFT_LOSSES:
        return hard
    soft = ~torch.isnan(p)
    ps = torch.where(soft, p, torch.zeros_like(p))  # a NaN in the unused branch would still poison the gradient
    la, lb = judge_logprobs(beta_a, beta_b, eta, HEAD_OF_LOSS[loss])
    return torch.where(soft, -(ps * la + (1 - ps) * lb), hard)


def batch_nll(beta, eta, pairs, loss):
    """Weighted NLL sum and weight sum for pairs indexed into per-prompt coefficients beta [P, M]
    (eta [P] or None). pairs['row'] maps each pair to its prompt row."""
    r = pairs["row"]
    e = eta[r] if eta is not None else None
    nll = pair_nll(beta[r, pairs["a"]], beta[r, pairs["b"]], e, pairs["y"], pairs["p"].to(beta.dtype), loss)
    w = pairs["w"].to(beta.dtype)
    return (nll * w).sum(), w.sum()


# -----------------------------------------------------------------------------
# prompt tokenization: how a backbone reads a prompt (train.load_backbone loads one to train)

def default_pooling(tok):
    """Decoders (a chat template) read an appended CLS token at the end. Encoders average their
    tokens: on AlpacaEval, MiniLM mean-pooled beat its first ([CLS]) token (README)."""
    return "last" if tok.chat_template else "mean"


def render_prompt(tok, turns, system_turn=True):
    """The user turns as the backbone saw chats in pre-training. An empty system turn stops
    templates (Qwen, SmolLM2) from injecting their default system prompt into every prompt.
    system_turn=False renders the user turns alone: the authors' released checkpoints ship a
    template with the default system block removed and were trained without any system turn."""
    if not tok.chat_template:
        return "\n\n".join(turns)
    msgs = [{"role": "user", "content": t} for t in turns]
    if not system_turn:
        return tok.apply_chat_template(msgs, tokenize=False)
    try:
        return tok.apply_chat_template([{"role": "system", "content": ""}] + msgs, tokenize=False)
    except Exception:  # templates with no system role (e.g. Gemma)
        return tok.apply_chat_template(msgs, tokenize=False)


def encode_prompts(tok, prompts, max_len, pooling, cls_id=None, system_turn=True):
    """Token ids for each prompt (a list of turns), truncated on the LEFT so the end of the
    conversation and the pooling token always survive.
    last: chat template + one appended CLS token (a literal CLS string typed in a prompt is
    re-tokenized as plain text, so the only CLS is the last position). first/mean: the
    tokenizer's own special tokens ([CLS] ... [SEP]) around the left-truncated text.
    The tokenizer is only read: truncation is done here, not by setting tok.truncation_side
    (which would change the caller's tokenizer for every later call)."""
    texts = [render_prompt(tok, t, system_turn) for t in prompts]
    bodies = tok(texts, add_special_tokens=False)["input_ids"]
    if pooling != "last":
        # the tokenizer's own wrapping (e.g. [CLS] ... [SEP]), read off a probe, around the kept end
        plain, wrapped = (tok("a", add_special_tokens=s)["input_ids"] for s in (False, True))
        k = next(k for k in range(len(wrapped)) if wrapped[k:k + len(plain)] == plain)
        pre, post = wrapped[:k], wrapped[k + len(plain):]
        keep = max_len - len(pre) - len(post)
        return [pre + ids[len(ids) - min(len(ids), keep):] + post for ids in bodies]
    literal = tok(CLS_TOKEN, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    out = []
    for ids in bodies:
        if cls_id in ids:
            ids = [j for i in ids for j in (literal if i == cls_id else [i])]
        out.append(ids[len(ids) - min(len(ids), max_len - 1):] + [cls_id])
    return out


def collate(seqs, pad_id):
    """Right-pad token id sequences (lists or numpy arrays) into (input_ids, attention_mask)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[i, :len(s)] = 1
    return ids, mask

# -----------------------------------------------------------------------------
# batches: a fixed number of prompts, or a token budget filled by length-grouped sampling


def token_batches(lengths, max_tokens, seed=None, bucket_ratio=1.1):
    """Micro-batches (numpy index arrays) whose padded size len(batch) * longest <= max_tokens (a
    prompt longer than the budget goes alone). seed None: sorted by length, in order (prediction:
    least padding). With a seed (training): prompts are bucketed by length (each bucket spans a
    factor bucket_ratio, so padding within one is < 10%), shuffled within buckets, packed, and the
    batches shuffled across buckets; reproducible from the seed."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if seed is None:
        order = np.argsort(lengths, kind="stable")
    else:
        rng = np.random.default_rng(seed)
        bucket = np.floor(np.log(np.maximum(lengths, 1)) / math.log(bucket_ratio)).astype(np.int64)
        order = np.lexsort((rng.random(len(lengths)), bucket))
    # greedy packing in order: lengths ascend (by bucket), so a batch's longest is its newest prompt
    # up to the bucket's spread; the running max keeps the budget exact anyway
    cuts, n, top = [0], 0, 0
    for k, L in enumerate(lengths[order].tolist()):
        t = max(top, L)
        if n and (n + 1) * t > max_tokens:
            cuts.append(k)
            n, t = 0, L
        n, top = n + 1, t
    cuts.append(len(order))
    batches = [order[cuts[i]:cuts[i + 1]] for i in range(len(cuts) - 1) if cuts[i + 1] > cuts[i]]
    if seed is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

# -----------------------------------------------------------------------------
# the P2L model: backbone -> pooled hidden state -> beta (M coefficients) and eta

class P2LHead(nn.Module):
    """hidden -> beta [N, M] (and eta [N] for rk/grk). The plain head is linear: β = W·x + b, and b
    starts at the marginal leaderboard. scale: β = exp(s·x + s0)·b + W·x, a per-prompt scale on the
    leaderboard (how decisive the judge is on this prompt: on AlpacaEval one such free scale per
    prompt explains most of what the labels can say, README) plus a correction. rank r: the
    correction is W = U·V with V [r, hidden] (rank 0: none, the scale alone), fewer ways to overfit."""
    def __init__(self, hidden, n_models, head, scale=False, rank=None):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False) if rank else None
        self.head = nn.Linear(rank if rank else hidden, n_models)
        if rank == 0:  # no correction: only the bias (the leaderboard) is used
            self.head.weight.requires_grad_(False)
        self.scale = nn.Linear(hidden, 1) if scale else None
        self.eta_head = nn.Linear(hidden, 1) if head != "bt" else None

    def forward(self, x):
        # coefficients in fp32 even under bf16 autocast: bf16 would round beta to ~0.01
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(self.head.weight.dtype)
            eta = self.eta_head(x).squeeze(-1).float() if self.eta_head is not None else None
            corr = F.linear(self.down(x) if self.down is not None else x, self.head.weight)
            base = self.head.bias if self.scale is None else torch.exp(self.scale(x)) * self.head.bias
            return (base + corr).float(), eta

AUTHORS_RK = "authors-rk"  # p2l.eta_transform of the authors' rk checkpoints; this project's is "softplus" (the default)


def authors_rk_eta(raw):
    """The authors' RK head maps its raw output r to η = max(0.02, 10·softplus(0.1·(r − 22.5))); this
    returns the eta whose softplus is that η (outcome_logprobs' convention), so predictions files and
    every stage read one convention. softplus⁻¹(η) = η + log(1 − e^{−η}), finite since η >= 0.02."""
    t = 0.1 * (raw - 22.5)
    e = (10 * torch.logaddexp(torch.zeros_like(t), t)).clamp_min(0.02)
    return e + torch.log(-torch.expm1(-e))


class P2LModel(nn.Module):
    """Attribute names give the state-dict layout of the authors' checkpoints:
    backbone under 'model.', head under 'head.head.' and 'head.eta_head.'."""
    def __init__(self, backbone, p2l):
        super().__init__()
        self.model = backbone
        self.p2l = p2l  # model_list, loss, pooling, cls_token, max_len
        self.head = P2LHead(backbone.config.hidden_size, len(p2l["model_list"]), HEAD_OF_LOSS[p2l["loss"]],
                            scale=p2l.get("head_scale", False), rank=p2l.get("head_rank"))

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.p2l["pooling"] == "last":  # right padding: the CLS token is the last real token
            x = h[torch.arange(h.shape[0], device=h.device), attention_mask.sum(1) - 1]
        elif self.p2l["pooling"] == "first":
            x = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            x = (h * m).sum(1) / m.sum(1)
        beta, eta = self.head(x)
        if eta is not None and self.p2l.get("eta_transform") == AUTHORS_RK:
            eta = authors_rk_eta(eta)
        return beta, eta

    def init_head(self, beta, eta):
        """Start at the averaged leaderboard: zero weights (the correction's V stays random, else
        U and V would get no gradient), scale 1, bias = the marginal fit."""
        with torch.no_grad():
            self.head.head.weight.zero_()
            self.head.head.bias.copy_(beta)
            if self.head.scale is not None:
                self.head.scale.weight.zero_()
                self.head.scale.bias.zero_()
            if self.head.eta_head is not None:
                self.head.eta_head.weight.zero_()
                self.head.eta_head.bias.fill_(float(eta))


def encode_for(model, tok, prompts):
    """Token ids for prompts exactly as this P2L model was trained to read them."""
    p = model.p2l
    cls = tok.convert_tokens_to_ids(p["cls_token"]) if p["pooling"] == "last" else None
    return encode_prompts(tok, prompts, p["max_len"], p["pooling"], cls, p.get("system_turn", True))


@torch.no_grad()
def predict(model, ids, pad_id, batch_size=16, device="cpu", autocast_dtype=None, max_tokens=0):
    """Coefficients for each token-id sequence (lists, arrays or a train.TokenCache), batched by length
    (little padding): batch_size prompts at a time, or with max_tokens as many as fit that padded
    size. Results in input order as (beta [N, M] float32 on CPU, eta [N] or None), written into
    preallocated tensors (no per-prompt objects)."""
    lengths = getattr(ids, "lengths", None)
    lengths = np.array([len(x) for x in ids]) if lengths is None else lengths
    if max_tokens:
        batches = token_batches(lengths, max_tokens)
    else:
        order = np.argsort(lengths, kind="stable")
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    betas = etas = None
    for idx in batches:
        x, m = collate([ids[i] for i in idx], pad_id)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            beta, eta = model(x.to(device), m.to(device))
        if betas is None:
            betas = torch.empty(len(lengths), beta.shape[1])
            etas = torch.empty(len(lengths)) if eta is not None else None
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        betas[t] = beta.float().cpu()
        if eta is not None:
            etas[t] = eta.float().cpu()
    return betas, etas


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op thread count set to n inside the block. Small ops (a Newton step at M = 130)
    gain little from threads, and on a busy machine threads that meet at a barrier after every op
    wait there for whole time slices (measured here under load: 20x slower with 2 threads than 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

# -----------------------------------------------------------------------------
# files: atomic writes and checkpoints (docs/design.md §3)

def atomic_write(path, data):
    """Write text or bytes so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, path)


def check_out(out, flag="--out"):
    """Refuse an output path that cannot be a directory (an existing file, or a file on its path)
    before any work is done."""
    out = Path(out)
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise ValueError(f"{flag} {out}: {p} exists and is not a directory")
    return out


def lock_dir(out, flag="--out"):
    """Create out, take its lock (held until the returned file is closed or the process ends, even
    by kill -9), and remove leftovers of an interrupted save. A second run on the same dir gets an
    error, not a wait: two runs would interleave their files."""
    import fcntl
    out = check_out(out, flag)
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"{flag} {out}: another run is writing there (it holds {out}/.lock)") from None
    clean_leftovers(out)
    return lock


class OutputSet:
    """One stage's outputs in --out as one consistent set. `with OutputSet(out) as o:` locks out
    against a concurrent run (an error, not a wait: two runs would interleave their files) and
    removes leftovers of an interrupted save; files are written into o.stage (a hidden dir inside
    out, so renames stay on one filesystem); o.commit(marker) first removes the old marker (a
    stage's "this set is complete" file, e.g. metrics.json), then renames every staged file in,
    the marker last. A crash at any point leaves either the old complete set, or files without a
    marker (incomplete, and visibly so), never new files beside an old marker."""

    def __init__(self, out, flag="--out"):
        self.out, self.flag = check_out(out, flag), flag

    def __enter__(self):
        self._lock = lock_dir(self.out, self.flag)
        self.stage = Path(tempfile.mkdtemp(dir=self.out, prefix=".partial-"))
        return self

    def commit(self, marker=None):
        names = sorted(f.name for f in self.stage.iterdir())
        if marker is not None:
            (self.out / marker).unlink(missing_ok=True)
        for name in sorted(names, key=lambda n: n == marker):
            os.replace(self.stage / name, self.out / name)

    def __exit__(self, *exc):
        import shutil
        shutil.rmtree(self.stage, ignore_errors=True)
        self._lock.close()  # releases the lock; the empty .lock file stays (removing it would race)
        return False


def save_png(fig, path):
    """A matplotlib figure as a PNG, written atomically, and closed."""
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def read_json_object(path, what):
    """A JSON file holding one object; errors name the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {what} must be a JSON object")
    return obj


def finite_or_none(obj):
    """obj with every NaN or infinite float replaced by None (JSON has no NaN/Infinity), recursively;
    for outputs where "no value" is a legitimate answer (e.g. an unconstrained budget)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path, obj):
    """JSON only: a NaN or infinity raises ValueError instead of writing the invalid tokens NaN/Infinity."""
    atomic_write(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def clean_leftovers(out):
    """Remove what an interrupted save left in out: `.partial-*` staging dirs and `*.tmp` files
    (atomic_write's and the resume state's temp names). Call it holding out's lock (lock_out)."""
    import shutil
    out = Path(out)
    for f in list(out.glob(".partial-*")) + list(out.glob("*.tmp")) + list(out.glob(".*.tmp")) + \
            list(out.glob("resume/.*.tmp")):
        shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)


def _read_safetensors(path):
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    files = ([path / s for s in sorted(set(read_json_object(index, "shard index").get("weight_map", {}).values()))]
             if index.exists() else [path / "model.safetensors"])  # sharded, as larger released checkpoints are
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except FileNotFoundError:
            raise ValueError(f"{f}: missing") from None
        except Exception as e:  # safetensors' own error type: truncated or corrupt file
            raise ValueError(f"{f}: cannot read the weights, truncated or corrupt ({e})") from None
    return state


def add_checkpoint_options(p, loss_help=""):
    """The options every stage that loads a checkpoint shares (load_checkpoint's arguments)."""
    p.add_argument("--loss", choices=LOSSES, help="the head's outcome model; needed for the authors' released "
                   "layout, whose config.json does not say (default: the checkpoint's own)" + loss_help)
    p.add_argument("--max-len", type=int, help="tokens per prompt when the checkpoint does not record it "
                   "(default: the value stored at training, else the backbone's position limit)")


def backbone_max_len(cfg, tok):
    """The longest input the backbone takes: its position table, else the tokenizer's limit."""
    for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) > 0:
            return getattr(cfg, k)
    limit = getattr(tok, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10 ** 7 else 512


def checkpoint_config(path, need_models=True):
    """A checkpoint's `p2l` section from its JSON files alone (no weights): (p2l dict with
    model_list, authors_layout). The authors' layout has no `p2l` section: model_list.json beside
    config.json, and no loss. Every stage reads a checkpoint's model list through this.
    need_models=False: a missing model list is None (evaluate.py --preds needs only the loss)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a checkpoint directory (no config.json)")
    cfg_json = read_json_object(path / "config.json", "checkpoint config")
    p2l = dict(cfg_json.get("p2l") or {})
    if "model_list" not in p2l:
        if not (path / "model_list.json").is_file():
            if not need_models:
                return {**p2l, "model_list": None}, not cfg_json.get("p2l")
            raise ValueError(f"{path}: no model list (config.json p2l.model_list or model_list.json)")
        try:
            p2l["model_list"] = json.loads((path / "model_list.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}/model_list.json: malformed JSON ({e.msg})") from None
    ml = p2l["model_list"]
    if not isinstance(ml, list) or not ml or not all(isinstance(m, str) for m in ml) or len(set(ml)) != len(ml):
        raise ValueError(f"{path}: the model list must be a non-empty list of distinct names")
    return p2l, not cfg_json.get("p2l")


def load_checkpoint(path, loss=None, dtype=torch.float32, max_len=None):
    """Load a P2L checkpoint: this project's, or the authors' released layout (no 'p2l' section in
    config.json: model_list.json beside it, and the loss must be given). The ONE checkpoint reader:
    it fills what the authors' layout does not record (their rk η transform, no system turn in
    their template), max_len (stored, else max_len, else the backbone's limit), and a pad token.
    Returns (model, tok); the model list is model.p2l["model_list"]. Any problem: ValueError."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    path = Path(path)
    p2l, authors = checkpoint_config(path)
    p2l["loss"] = loss or p2l.get("loss")
    if p2l["loss"] not in LOSSES:
        raise ValueError(f"{path}/config.json has no p2l.loss: pass --loss ({'|'.join(LOSSES)})")
    if authors:  # the authors' rk head has its own η transform; their template has no system block
        p2l.setdefault("eta_transform", AUTHORS_RK if HEAD_OF_LOSS[p2l["loss"]] == "rk" else "softplus")
        p2l.setdefault("system_turn", False)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer or config ({e})") from None
    if tok.pad_token is None:  # decoders often have none; padding positions are masked anyway
        tok.pad_token = tok.eos_token
    p2l.setdefault("pooling", "last" if CLS_TOKEN in tok.get_vocab() else default_pooling(tok))
    p2l.setdefault("cls_token", CLS_TOKEN)
    if not p2l.get("max_len"):
        p2l["max_len"] = max_len or backbone_max_len(config, tok)
    state = _read_safetensors(path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # else every prediction is NaN and a later solver reports a baffling "did not converge"
        raise ValueError(f"{path}/model.safetensors: non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. "
                         f"{', '.join(bad[:3])}: the training that wrote it diverged")
    backbone = AutoModel.from_config(config, dtype=dtype)
    model = P2LModel(backbone, p2l)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        raise ValueError(f"{path}/model.safetensors does not fit the model: {str(e)[:300]}") from None
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval(), tok


def checkpoint_fingerprint(ckpt):
    """A cheap identity of a checkpoint that survives moving it: blake2b of its JSON files (config,
    model list, marginal) and of each weight file's size, header and first and last 4 MiB (a
    full hash of a 7B model would take a minute). Another training run, even of the same recipe
    with another seed, changes the weights there (the safetensors header holds their offsets)."""
    ckpt, h = Path(ckpt), hashlib.blake2b(digest_size=16)
    for name in ("config.json", "model_list.json", "marginal.json"):
        h.update(name.encode() + ((ckpt / name).read_bytes() if (ckpt / name).is_file() else b"-"))
    for f in sorted(ckpt.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as g:
            h.update(f"{f.name}:{size}".encode() + g.read(4 << 20))
            g.seek(max(0, size - (4 << 20)))
            h.update(g.read())
    return h.hexdigest()


def _write_safetensors(path, tensors, metadata):
    """The safetensors format (8-byte header length, JSON header, raw little-endian data) written
    here rather than by the library, which writes its metadata in a per-process random order: the
    same predictions must be the same bytes, or their sha256 (metrics.json's predictions_sha256)
    cannot say "same predictions". Float32 tensors, in name order."""
    header, arrays, off = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name].detach().cpu().float().numpy(), dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        arrays.append(a)
        off += a.nbytes
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned, as the library pads it
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))


def _jsonl_digest(data):
    """sha256 of predictions.jsonl's bytes, trailing blank lines aside (a reader allows them)."""
    return hashlib.sha256(data.rstrip()).hexdigest()


def save_predictions(out, beta, eta, model_list, rows, loss=None, checkpoint=None):
    """Per-prompt coefficients: predictions.safetensors holds beta [N, M] (and eta [N]) and, in its
    metadata, the model list, the loss of the head that produced them, its checkpoint (path and
    checkpoint_fingerprint), and the sha256 of predictions.jsonl, which holds one metadata row per
    prompt (prompt, id, category, ...), line i describing beta[i]: the two files are bound, so a
    .jsonl of another run beside them is refused (load_predictions). Deterministic bytes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"beta": beta} if eta is None else {"beta": beta, "eta": eta}
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    meta = {"model_list": json.dumps(model_list), "rows": str(len(rows)), "jsonl_sha256": _jsonl_digest(text)}
    if loss is not None:
        meta["loss"] = loss
    if checkpoint is not None:
        meta["checkpoint"] = os.path.abspath(checkpoint)
        meta["checkpoint_fingerprint"] = checkpoint_fingerprint(checkpoint)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".predictions.")
    os.close(fd)
    _write_safetensors(tmp, tensors, meta)
    os.chmod(tmp, 0o644)
    atomic_write(out / "predictions.jsonl", text)
    os.replace(tmp, out / "predictions.safetensors")


def _open_predictions(f):
    """safe_open on predictions.safetensors, a truncated or corrupt file a ValueError naming it."""
    from safetensors import safe_open
    if not f.exists():
        raise ValueError(f"{f.parent}: no predictions.safetensors")
    try:
        return safe_open(f, "pt")
    except Exception as e:  # safetensors' own error type: a header cut short, data past the end
        raise ValueError(f"{f}: cannot read it, truncated or corrupt ({e})") from None


def predictions_meta(path):
    """The metadata of predictions.safetensors: model_list (a list), and loss, checkpoint,
    checkpoint_fingerprint, jsonl_sha256 when the writer recorded them (older files and other
    tools' files may have none of them)."""
    f = Path(path) / "predictions.safetensors"
    with _open_predictions(f) as g:
        meta = dict(g.metadata() or {})
    if "model_list" not in meta:
        raise ValueError(f"{f}: no model_list in its metadata (not written by save_predictions)")
    try:
        meta["model_list"] = json.loads(meta["model_list"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: its model_list metadata is not JSON ({e.msg})") from None
    return meta


def load_predictions(path):
    """Returns (beta [N, M], eta [N] or None, model_list, rows). Line i of predictions.jsonl is row i
    (trailing blank lines are allowed, others would shift the rows); a bad line is named file:line;
    a predictions.jsonl other than the one written with the .safetensors (its sha256 is in the
    metadata) is refused. Files without that record (older ones, or a user's own β matrix in the
    documented format) are read with a note on stderr that the pairing could not be checked."""
    path = Path(path)
    f = path / "predictions.safetensors"
    meta = predictions_meta(path)
    model_list = meta["model_list"]
    try:
        with _open_predictions(f) as g:
            beta = g.get_tensor("beta")
            eta = g.get_tensor("eta") if "eta" in g.keys() else None
    except ValueError:
        raise
    except Exception as e:  # no beta, or data the header promises but the file lacks
        raise ValueError(f"{f}: cannot read its tensors, truncated or corrupt ({e})") from None
    jl = path / "predictions.jsonl"
    if not jl.exists():
        raise ValueError(f"{path}: no predictions.jsonl")
    rows, blank = [], None
    for where, row in read_jsonl(jl, keep_blank=True):
        if row is None:
            blank = blank or where
        elif blank:
            raise ValueError(f"{blank}: blank line before the last row (line i describes beta[i])")
        else:
            rows.append(row)
    if beta.ndim != 2 or len(rows) != beta.shape[0] or beta.shape[1] != len(model_list) or \
            (eta is not None and tuple(eta.shape) != (beta.shape[0],)):
        raise ValueError(f"{path}: predictions.jsonl has {len(rows)} rows, predictions.safetensors {tuple(beta.shape)} "
                         f"for {len(model_list)} models")
    if "jsonl_sha256" not in meta:
        print(f"note: {f} records no digest of predictions.jsonl (an older writer, or another tool): "
              "could not check that the two files belong together", file=sys.stderr)
    elif _jsonl_digest(jl.read_bytes()) != meta["jsonl_sha256"]:
        raise ValueError(f"{jl} is not the file written with {f.name} (its sha256 differs from the one recorded there): "
                         "the rows would describe another run's coefficients; keep the two files of one run together")
    return beta, eta, model_list, rows


def file_ref(path, base):
    """Where a file is, for a record kept in directory `base` that must survive moving it: the path
    relative to base, the absolute path, and the content's size and sha256 (to find it again and to
    refuse a different file under the same name)."""
    path = os.path.abspath(path)
    return {"path": os.path.relpath(path, os.path.abspath(base)), "abs": path,
            "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_ref(ref, base):
    """A file_ref (or a bare path, as older records kept it) -> (an existing path whose content is the
    recorded one, None) or (None, why not). Tried in order: relative to base (both moved together),
    then the absolute path (only base moved)."""
    if isinstance(ref, str):  # older records: the path as given, as before
        ref = {"abs": ref}
    tried = []
    for cand in dict.fromkeys(str(Path(base) / p) if k == "path" else p for k, p in ref.items() if k in ("path", "abs")):
        if not os.path.isfile(cand):
            tried.append(f"{cand} (missing)")
        elif "sha256" in ref and (os.path.getsize(cand) != ref.get("bytes") or sha256_file(cand) != ref["sha256"]):
            tried.append(f"{cand} (other content)")
        else:
            return cand, None
    return None, "tried " + ", ".join(tried)


def read_marginal(ckpt):
    """A checkpoint's marginal.json (the averaged leaderboard its head started from: model_list,
    beta, eta, loss, and `train`, the training votes), with `train` resolved to a file that exists
    and has the recorded content; None when the checkpoint has none. An unresolved `train` is kept
    as recorded, with `train_missing` saying where it was looked for."""
    f = Path(ckpt) / "marginal.json"
    if not f.exists():
        return None
    mj = json.loads(f.read_text())
    if mj.get("train") is not None:
        found, why = resolve_ref(mj["train"], ckpt)
        if found:
            mj["train"] = found
        else:
            rec = mj["train"]
            mj["train"], mj["train_missing"] = rec if isinstance(rec, str) else rec.get("abs", rec.get("path")), why
    return mj


def autodetect_device():
    return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
