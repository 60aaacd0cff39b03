"""Tests of train.py --extend (extend.py): the known answer of the row fit, the refusals, and the
round trip extend -> evaluate -> aggregate -> route -> serve on a tiny checkpoint.

    HF_HUB_OFFLINE=1 python -m pytest -q test_extend_new.py
"""
import contextlib
import io
import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common as C
import extend as E
import test_p2l as T
from test_p2l import tiny_qwen  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parent
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
    # a wrong answer must fail: the row the prior alone would give is far from the truth
    mu, _ = E.row_prior(rows, marg_old, fit["marginal"][[new]], feats)
    assert ((feats @ mu[0]) - truth).abs().max() > 5 * tol
    if loss == "bt":  # without the prior, exact soft labels give the truth itself: the likelihood's maximum is θ*
        base = torch.zeros(P, 11, dtype=torch.float64)
        base[:, :new] = beta_old
        th, info = E.fit_rows(base, None, feats, pairs, torch.tensor([new]), "bt", mu, torch.zeros(4, dtype=torch.float64))
        assert info["converged"] and torch.allclose(th[0], theta, atol=1e-5), th


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


def battle(prompt, a, b, p_a, category=None):
    row = {"prompt": prompt, "model_a": a, "model_b": b, "winner": "model_a" if p_a >= 0.5 else "model_b", "p_a": p_a}
    return dict(row, category=category) if category else row


@pytest.fixture(scope="module")
def base_ck(tmp_path_factory, tiny_qwen):  # noqa: F811
    d = tmp_path_factory.mktemp("extend")
    rng = np.random.default_rng(0)
    prompts = [f"question {i}: {'explain' if i % 2 else 'write code for'} topic {i * 7 % 11}" for i in range(40)]
    old_votes = [battle(p, OLD[i % 3], OLD[(i + 1) % 3], float(rng.uniform(0.2, 0.8)), category=f"c{i % 2}")
                 for i, p in enumerate(prompts[:24])]
    T.write_jsonl(d / "train.jsonl", old_votes)
    new = [battle(p, "zbase", OLD[i % 3], float(rng.uniform(0.5, 0.95)), category=f"c{i % 2}") for i, p in enumerate(prompts[:30])]
    new += [battle(prompts[0], "cheap", "mid", 0.4)]  # between known models: ignored
    T.write_jsonl(d / "new.jsonl", new)
    val = [battle(p, "zbase", OLD[i % 3], float(rng.uniform(0.4, 0.9)), category=f"c{i % 2}") for i, p in enumerate(prompts[30:])]
    val += [battle(p, "cheap", "pricey", 0.3, category="c0") for p in prompts[30:]]
    T.write_jsonl(d / "val.jsonl", val)
    torch.manual_seed(0)
    tok, backbone = C.load_backbone(tiny_qwen)
    C.add_cls_token(tok, backbone)
    p2l = {"model_list": OLD, "loss": "bt", "pooling": "last", "max_len": 64, "cls_token": C.CLS_TOKEN,
           "head_scale": True, "head_rank": 2}
    model = C.P2LModel(backbone, p2l)
    model.init_head(torch.tensor([0.0, 0.5, 1.0]), torch.tensor(0.0))
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.5)
        model.head.scale.weight.normal_(0, 0.05)
    marginal = {"model_list": OLD, "beta": [0.0, 0.5, 1.0], "eta": 0.0, "loss": "bt",
                "train": C.file_ref(d / "train.jsonl", d / "ck"), "val_nll": None}
    C.save_checkpoint(d / "ck", model.state_dict(), model, tok, {"marginal.json": json.dumps(marginal)})
    return d


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
        new = T.write_jsonl(tmp_path / "n.jsonl", [battle("p", "cheap", "mid", 0.6)])
    elif case == "no_known_opponent":
        new = T.write_jsonl(tmp_path / "n.jsonl", [battle("p", "zbase", "cheap", 0.6), battle("q", "zz", "zbase", 0.6)])
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


def test_extend_warns_on_few_battles_with_the_count(base_ck, tmp_path):
    few = T.write_jsonl(tmp_path / "few.jsonl", [battle(f"q{i}", "zbase", OLD[i % 3], 0.7) for i in range(3)])
    err, out, stderr = train_py("--extend", base_ck / "ck", "--train", few, "--out", tmp_path / "ck2")
    assert err is None, err
    assert "warning: new model 'zbase' has only 3 battles against known models" in stderr
    assert json.loads((tmp_path / "ck2/metrics.json").read_text())["extend"]["battles_vs_known"] == {"zbase": 3.0}


@pytest.mark.slow
def test_round_trip_extend_evaluate_aggregate_route_serve(base_ck, tmp_path, monkeypatch):
    """CK2 is a checkpoint like any other: the old models' coefficients are CK's exactly, and every
    stage reads it unchanged (evaluate with its category baselines from CK2's vote file, aggregate,
    route from the checkpoint and from the predictions, serve through the OpenAI client)."""
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
    T.ok(T.evaluate("--checkpoint", ck2, "--data", d / "val.jsonl", "--out", tmp_path / "eval", "--bootstrap", 50))
    ev = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert ev["p2l"]["nll"] == pytest.approx(m["val"]["p2l"]["nll"], abs=1e-5)
    beta, _, models, _ = C.load_predictions(tmp_path / "eval")
    assert models == sorted(OLD + ["zbase"]) and torch.isfinite(beta).all()
    AG.main(["--preds", str(tmp_path / "eval"), "--out", str(tmp_path / "agg")])
    board = json.loads((tmp_path / "agg/leaderboard.json").read_text())
    assert "zbase" in json.dumps(board)
    (tmp_path / "costs.json").write_text(json.dumps(T.COSTS))
    common_args = ["--prompts", d / "val.jsonl", "--costs", tmp_path / "costs.json", "--budget", 8]
    T.run_route("--checkpoint", ck2, *common_args, "--out", tmp_path / "r1")
    T.run_route("--preds", tmp_path / "eval", *common_args, "--out", tmp_path / "r2")
    assert (tmp_path / "r1/routes.jsonl").read_text() == (tmp_path / "r2/routes.jsonl").read_text()
    # serve: the new model is listed and routable
    monkeypatch.setenv("P2L_TEST_UPSTREAM_KEY", T.UPSTREAM_KEY)
    mf = T.models_file(tmp_path / "m.json", "http://127.0.0.1:9", "ok")
    app_args = S.parse_args(["--checkpoint", str(ck2), "--models", str(mf), "--budget", "10"])
    svc = S.Service(m2, tok, app_args, S.read_models(mf, models))
    r = svc.decide(np.array([0.0, 0.5, 1.0, 3.0]), 10.0)
    assert r["chosen"] == "zbase"
    app = S.fake_upstream_app()
    with T.serving(app) as up_url:
        mf = T.models_file(tmp_path / "m2.json", up_url, "ok")
        app_args = S.parse_args(["--checkpoint", str(ck2), "--models", str(mf), "--budget", "10", "--no-auth"])
        svc = S.Service(m2, tok, app_args, S.read_models(mf, models))
        with T.serving(S.build_app(svc)) as url:
            client = T.oai(url, key="unused")
            assert [x.id for x in client.models.list()] == ["p2l-router"] + sorted(OLD + ["zbase"])
            reply = client.chat.completions.create(model="zbase", messages=T.ask("hello"))
            assert reply.choices[0].message.content == "[up-zbase] hello"
            raw = client.chat.completions.with_raw_response.create(model="p2l", messages=T.ask("route me"))
            assert raw.headers["x-p2l-model"] in T.MODELS


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
