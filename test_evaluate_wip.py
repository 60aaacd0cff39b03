"""Tests for evaluate.py (to be merged into test_p2l.py): hand-computed metrics, a checkpoint built
from known coefficients, unknown models, the predictions round trip, bad input.

    HF_HUB_OFFLINE=1 python -m pytest -q test_evaluate_wip.py
"""
import contextlib
import io
import json
import math
import runpy
import subprocess
import sys

import pytest
import torch

import common as C
from test_p2l import ENV, ROOT, tiny_qwen, write_jsonl  # noqa: F401  (tiny_qwen is a fixture)


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
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["metrics.json"]  # --preds: no new predictions


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
    tok, backbone = C.load_backbone(tiny_qwen)
    C.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": models, "loss": "grk", "pooling": "last", "cls_token": C.CLS_TOKEN, "max_len": 64})
    model.init_head(beta, eta)
    marginal = {"model_list": models, "beta": beta.tolist(), "eta": eta, "loss": "grk", "train": str(train)}
    ck = tmp_path / "ck"
    C.save_checkpoint(ck, model.state_dict(), model, tok, {"marginal.json": json.dumps(marginal)})

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
    assert f"val.jsonl:7: model 'zz'" in err and not (tmp_path / "strict").exists()

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
