"""numerics: issue 20 (numerics at the extremes, a tie-only group under --loss bt --by), issue 22 items 1
(leaderboard pictures) and 3 (Arena parquet battle files)."""
import json
import math

import pytest
import torch

import aggregate as AG
import common as C
import route
import test_p2l as T
from test_p2l import tiny_qwen  # noqa: F401

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
    a, b = C.all_pairs(5)
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
    a, b = C.all_pairs(3)
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]], dtype=D64)
    for head, t in (("bt", target), ("rk", torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.4, 0.4, 0.2]]], dtype=D64))):
        bb, _, info = C.fit_pairs(a, b, t, 3, head)
        assert not info["converged"] and not info["converged_rows"].any(), (head, bb, info)


def test_fit_pairs_still_converges_on_ordinary_problems_with_and_without_ridge():
    g = torch.Generator().manual_seed(1)
    beta = torch.randn(50, 6, generator=g, dtype=D64) * 2
    eta = 0.3 * torch.randn(50, generator=g, dtype=D64)
    for head in ("bt", "rk", "grk"):
        target = AG.mean_pair_probs(beta, eta if head != "bt" else None, head)
        a, b = C.all_pairs(6)
        for l2 in (0.0, 1e-3):
            bb, ee, info = C.fit_pairs(a, b, target, 6, head, l2=l2)
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
    _, _, info = C.fit_votes(allp, 3, loss, l2=0.0, names=["x", "y", "z"])
    assert info["separated"][0] is not None and word in info["separated"][0], info["separated"]
    bb, ee, info = C.fit_votes(allp, 3, loss, l2=1e-4)  # "with l2 > 0 every fit exists": now true for eta too
    assert info["converged"] and abs(ee.item()) < 60 and torch.isfinite(bb).all(), (ee, info)
    with pytest.raises(ValueError, match=word):
        C.fit_marginal(_votes(rows, loss), 3, loss, l2=0.0)
    notes = []
    beta, eta = C.fit_marginal(_votes(rows, loss), 3, loss, l2=1e-4, note=notes.append)
    assert len(notes) == 1 and word in notes[0] and "ridge" in notes[0] and abs(eta.item()) < 60


def test_fit_marginal_with_a_proper_fit_says_nothing_and_is_unchanged_by_eta_ridge_direction():
    notes = []
    beta, eta = C.fit_marginal(_votes(CYCLE + TIES + BOTHBAD, "grk"), 3, "grk", l2=0.0, note=notes.append)
    beta2, eta2 = C.fit_marginal(_votes(CYCLE + TIES + BOTHBAD, "grk"), 3, "grk", l2=1e-6, note=notes.append)
    assert not notes and torch.isfinite(beta).all() and abs(eta.item() - eta2.item()) < 1e-3


# -----------------------------------------------------------------------------
# issue 20, tracebacks: a tie-only group under --loss bt --by

def test_votes_tie_only_group_under_plain_bt_names_group_and_file(tmp_path, capsys):
    rows = [{"prompt": f"p{i}", "model_a": "x", "model_b": "y", "winner": "model_a" if i % 3 else "model_b",
             "category": "decided"} for i in range(12)]
    rows += [{"prompt": f"t{i}", "model_a": "x", "model_b": "y", "winner": "tie", "category": "tied"} for i in range(4)]
    f = tmp_path / "votes.jsonl"
    T.write_jsonl(f, rows)
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
    jl = T.write_jsonl(tmp_path / "b.jsonl", rows)
    got, want = C.read_battles(pq_path), C.read_battles(jl)
    strip = lambda bs: [{k: v for k, v in b.items() if k != "where"} for b in bs]  # noqa: E731
    assert strip(got) == strip(want) and got[4]["where"] == f"{pq_path}:row 5"
    assert got[0]["prompt"] == [rows[0]["conversation_a"][0]["content"]] + (
        [rows[0]["conversation_a"][2]["content"]] if len(rows[0]["conversation_a"]) > 2 else [])
    assert "conversation_b" not in got[0] and got[0]["language"] in ("English", "German")
    # streamed in record batches: any batch size gives the same rows
    assert [r for _, r in C.read_parquet(pq_path, batch_size=4)] == [r for _, r in C.read_parquet(pq_path)]
    for loss in ("bt", "grk"):
        v1, v2 = C.index_votes(pq_path, loss), C.index_votes(jl, loss)
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
        for read in (C.read_battles, lambda p: C.index_votes(p, "bt")):
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
            files[kind] = (T.write_jsonl(d / "train.jsonl", tr), T.write_jsonl(d / "val.jsonl", va))
        T.run_train(tiny_qwen, tuple(map(str, files[kind])), d / "ck", "--max-steps", "1", "--loss", "bt-tie")
        for argv in (["evaluate.py", "--checkpoint", d / "ck", "--data", files[kind][1], "--out", d / "eval"],
                     ["aggregate.py", "--votes", files[kind][0], "--by", "language", "--bootstrap", "10", "--out", d / "votes"]):
            r = subprocess.run([sys.executable, *map(str, argv)], cwd=T.ROOT, env=T.ENV, capture_output=True, text=True,
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


def test_votes_pictures_blank_where_a_group_lacks_a_model(tmp_path, monkeypatch):
    rows = []
    for i in range(30):
        a, b = [("x", "y"), ("y", "z"), ("x", "z")][i % 3]
        rows.append({"prompt": f"q{i}", "model_a": a, "model_b": b, "winner": "model_a" if i % 4 else "model_b",
                     "category": "one" if i < 18 else "two"})
    rows += [{"prompt": "w", "model_a": "w", "model_b": "x", "winner": "model_b", "category": "one"},
             {"prompt": "w2", "model_a": "w", "model_b": "y", "winner": "model_a", "category": "one"}]
    f = T.write_jsonl(tmp_path / "v.jsonl", rows)
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
    data = (str(T.write_jsonl(tmp_path / "tr.jsonl", tr)), str(T.write_jsonl(tmp_path / "va.jsonl", arena_rows(4, seed=4))))
    T.run_train(tiny_qwen, data, tmp_path / "ck", "--max-steps", "1", "--loss", "bt-tie")
    r = subprocess.run([sys.executable, "aggregate.py", "--checkpoint", str(tmp_path / "ck"), "--prompt", "Write a haiku",
                        "--out", str(tmp_path / "p")], cwd=T.ROOT, env=T.ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _is_png(tmp_path / "p" / "leaderboard.png")
    board = json.loads((tmp_path / "p" / "leaderboard.json").read_text())["leaderboard"]
    mj = json.loads((tmp_path / "ck" / "marginal.json").read_text())
    want = {r["model"]: r for r in AG.leaderboard_rows(mj["model_list"], mj["beta"])}
    assert all(r["marginal_rating"] == want[r["model"]]["rating"] and r["marginal_rank"] == want[r["model"]]["rank"]
               for r in board)
