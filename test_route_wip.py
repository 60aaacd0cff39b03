"""Tests for route.py (to be merged into test_p2l.py): known answers for the exact router, a
cross-check against scipy's LP solver on random instances, θ* round trips, the realised win rate
of --sweep, and the command line (errors, outputs, a tiny checkpoint run). ~25 s on 2 CPU cores.

    HF_HUB_OFFLINE=1 python -m pytest -q test_route_wip.py
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from scipy.special import expit

import common as C
import route
from test_p2l import ENV, ROOT, tiny_qwen, write_jsonl  # noqa: F401 (tiny_qwen is a fixture)

# -----------------------------------------------------------------------------
# the exact two-constraint solution


def solve(s, c, budget):
    s, c = np.asarray(s, float), np.asarray(c, float)
    i, j, w = C.hull_route(s, c, budget, np.argsort(c, kind="stable").tolist())
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


def random_preds(N=20, M=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, M, generator=g, dtype=torch.float64).numpy() * 1.5


@pytest.mark.parametrize("router", route.ROUTERS)
def test_budget_is_respected(router):
    beta = random_preds()
    c = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    Wq = C.win_rates(beta, np.full(6, 1 / 6))
    for budget in (1.0, 1.7, 4.0, 9.5, 13.0):
        I, J, W = C.route_all(router, beta, Wq, c, budget)
        assert (W * c[I] + (1 - W) * c[J] <= budget + 1e-12).all()
        assert ((W >= 0) & (W <= 1)).all()


def test_unconstrained_routing_picks_argmax_wq():
    beta = random_preds()
    c = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    q = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    Wq = C.win_rates(beta, q)
    # Wq by its definition, one prompt at a time
    W0 = expit(beta[0][:, None] - beta[0][None, :])
    assert np.allclose(Wq[0], W0 @ q, atol=1e-15)
    for budget in (math.inf, c.max()):
        for router in ("optimal", "strict"):
            I, J, W = C.route_all(router, beta, Wq, c, budget)
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
        theta = C.solve_theta(beta, q, R)
        assert g(theta) == pytest.approx(R, abs=1e-12)
        assert min(beta[i], beta[j]) - 1e-9 <= theta <= max(beta[i], beta[j]) + 1e-9
    assert C.solve_theta(beta, q, g(beta[3])) == pytest.approx(beta[3], abs=1e-10)
    # a router better than every model on average: the root lies beyond max β and is still found
    theta = C.solve_theta(beta, q, 0.5 * (1 + g(beta.max())))
    assert theta > beta.max() and g(theta) == pytest.approx(0.5 * (1 + g(beta.max())), abs=1e-12)


def test_averaged_leaderboard_and_router_theta_on_it():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, 5)
    shifted = base[None, :] + rng.normal(0, 3, (7, 1))  # per-prompt shifts change no probability
    averaged = lambda b: C.aggregate(torch.from_numpy(b), None, "bt")[0].numpy()  # what route.py calls
    assert np.allclose(averaged(shifted), base - base.mean(), atol=1e-9)
    beta = rng.normal(0, 1.5, (40, 5))
    bbar = averaged(beta)
    # uniform q: a router that always picks model m has exactly m's averaged coefficient
    q = np.full(5, 0.2)
    Wq = C.win_rates(beta, q)
    for m in range(5):
        assert C.solve_theta(bbar, q, Wq[:, m].mean()) == pytest.approx(bbar[m], abs=1e-8)

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


def run_route(*args, ok=True):
    """route.py's main in this process (no interpreter and torch start-up per call); a failure is
    the SystemExit with the message the command line prints."""
    if ok:
        route.main([str(a) for a in args])
        return None
    with pytest.raises(SystemExit) as e:
        route.main([str(a) for a in args])
    assert e.value.code not in (0, None)
    return str(e.value.code)


def test_cli_routes_and_is_reproducible(preds, capsys):
    d = preds
    common = ["--preds", d / "preds", "--prompts", d / "votes.jsonl", "--costs", d / "costs.json", "--budget", 4]
    run_route(*common, "--out", d / "a")
    run_route(*common, "--out", d / "b")
    assert (d / "a/routes.jsonl").read_text() == (d / "b/routes.jsonl").read_text()  # seeded sampling
    routes = [json.loads(line) for line in (d / "a/routes.jsonl").read_text().splitlines()]
    assert len(routes) == 6 and "optimal router" in capsys.readouterr().out
    beta = random_preds(6, 4, seed=3).astype(np.float32).astype(np.float64)
    Wq = C.win_rates(beta, np.full(4, 0.25))
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
    assert "bad.jsonl:2: missing or empty 'prompt'" in err
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


def test_cli_checkpoint_then_preds_agree(tiny_qwen, preds):
    """--checkpoint runs the model (tiny random Qwen2, random head) and saves its predictions;
    --preds on them routes identically."""
    tok, backbone = C.load_backbone(tiny_qwen)
    C.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": MODELS, "loss": "bt", "pooling": "last", "max_len": 64, "cls_token": C.CLS_TOKEN})
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.head.weight, std=0.5)
    C.save_checkpoint(preds / "ck", model.state_dict(), model, tok)
    args = ["--prompts", preds / "votes.jsonl", "--costs", preds / "costs.json", "--budget", 4, "--sweep"]
    run_route("--checkpoint", preds / "ck", *args, "--out", preds / "r1")
    run_route("--preds", preds / "r1", *args, "--out", preds / "r2")
    for f in ("routes.jsonl", "sweep.csv"):
        assert (preds / "r1" / f).read_text() == (preds / "r2" / f).read_text()
    m1, m2 = (json.loads((preds / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert {**m1, "source": None} == {**m2, "source": None}
    assert len(set(json.loads(line)["model"] for line in (preds / "r1/routes.jsonl").read_text().splitlines())) > 1


def test_cli_bench_prints_ratio(tmp_path, capsys):
    run_route("--bench", "--out", tmp_path)
    b = json.loads((tmp_path / "bench.json").read_text())
    assert "hull / LP" in capsys.readouterr().out and b["ratio"] > 1 and b["max_abs_objective_gap"] < 1e-9
