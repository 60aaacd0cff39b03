"""Known-answer tests of route.py --sweep's no-peek baselines and decision variety, and head_eval.py."""
import json
import math

import numpy as np
import pytest
import torch

import common as C
import head_eval as HE
import route
from test_p2l import in_process, write_jsonl

MODELS = ["a", "h", "x", "y"]  # h: the hub every vote is against (AlpacaEval-like)
COSTS = {"_about": "test costs", "a": 1.0, "h": 2.0, "x": 10.0, "y": 10.0}


def hub_votes(prompts, labels):
    """One vote of every model but h against h per prompt; labels[m] = p_a of m vs h."""
    return [{"prompt": p, "model_a": m, "model_b": "h", "winner": "model_a", "p_a": labels[m]}
            for p in prompts for m in ("a", "x", "y")]


def files(d, beta, folds, labels, prompts):
    """Predictions (rows carry their fold when folds is given), votes split over two files, costs."""
    rows = [{"prompt": [p]} | ({} if folds is None else {"fold": k}) for p, k in zip(prompts, folds or [0] * len(prompts))]
    C.save_predictions(d / "preds", torch.tensor(beta, dtype=torch.float32), None, MODELS, rows)
    votes = [v for p, lab in zip(prompts, labels) for v in hub_votes([p], lab)]
    half = len(votes) // 2
    write_jsonl(d / "v1.jsonl", votes[:half])
    write_jsonl(d / "v2.jsonl", votes[half:])
    (d / "costs.json").write_text(json.dumps(COSTS))


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
