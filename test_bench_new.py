"""bench.py: every harness runs at tiny sizes and writes valid JSON; bad sizes are refused with one line;
the stages no longer take --bench flags; --authors imports a checkout's functions (a stand-in here)."""
import json
import math
import sys

import numpy as np
import pytest

import aggregate as AG
import bench
import route
import test_p2l as T
from test_p2l import serve_ck, small_data, tiny_qwen  # noqa: F401 (fixtures)


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
                        "--train-len", "256", "--train-max-tokens", "2048", "--out", tmp_path], cwd=T.ROOT, env=T.ENV,
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
    (tmp_path / "m.json").write_text(json.dumps({m: {"base_url": "http://127.0.0.1:9/v1", "cost": T.COSTS[m]} for m in T.MODELS}))
    T.write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"bench prompt {i} " + "more " * i} for i in range(10)])
    bench.main(["serve", "--checkpoint", str(d / "ck"), "--models", str(tmp_path / "m.json"), "--budget", "4",
                "--clients", "1,8", "--requests", "24", "--reps", "1", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path)])
    b = load(tmp_path / "serve.json")
    assert [c["clients"] for c in b["cells"]] == [1, 8] and "ratio" in capsys.readouterr().out
    assert b["cells"][0]["single"]["mean_batch"] == 1 and b["cells"][1]["batched"]["mean_batch"] > 1
    assert np.isfinite([c["ratio"] for c in b["cells"]]).all()
