"""Tests of train.py's --train-layers, --inner-val and --patience (issue 18), on the tiny random Qwen2 and the
real MiniLM of test_p2l.py (its fixtures and helpers are imported; merge into test_p2l.py and drop the import).

    HF_HUB_OFFLINE=1 python -m pytest -q test_decoder_new.py
"""
import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common as C
from test_p2l import ENV, ROOT, run_train, small_data, tiny_qwen, train_cmd  # noqa: F401 (fixtures)


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
    start = AutoModel.from_pretrained(C.offline_backbone("minilm")[0]).state_dict()
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
    votes = C.index_votes(train_path, "bt")
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
    ids = C.token_cache(small_data[0], tok, 64, model.p2l["pooling"], tok.convert_tokens_to_ids(C.CLS_TOKEN),
                        root=tmp_path / "cache", log=lambda *a, **k: None)
    beta, eta = C.predict(model, [ids[i] for i in held], tok.pad_token_id, batch_size=3)
    s, w = C.batch_nll(beta.double(), None, C.pairs_of(votes, held), "bt")
    assert (s / w).item() == pytest.approx(iv["nll"], abs=1e-5)
    mj = json.loads((tmp_path / "ck" / "marginal.json").read_text())
    b_all, _ = C.fit_marginal(votes["pairs"], len(votes["models"]), "bt")
    b_rest, _ = C.fit_marginal(C.pairs_of(votes, rest), len(votes["models"]), "bt")
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
