"""Issue 20 (hardening round 2) for evaluate.py, cv.py, livebench_eval.py, train.py's flags, the token
cache and the predictions files: each test names the item it covers and fails on the code before it."""
import gzip
import hashlib
import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import aggregate as AG
import common as C
import cv
import livebench_eval as L
import route
import test_p2l as T
from test_p2l import setup, small_data, tiny_qwen  # noqa: F401  (fixtures)

ROOT, ENV = T.ROOT, T.ENV
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
    tok, backbone = C.load_backbone(tiny_qwen)
    C.add_cls_token(tok, backbone)
    model = C.P2LModel(backbone, {"model_list": list(models), "loss": "bt", "pooling": "last", "cls_token": C.CLS_TOKEN,
                                  "max_len": 64})
    model.init_head(torch.tensor(bias), torch.tensor(0.0))
    marginal = {"model_list": list(models), "beta": list(bias), "eta": 0.0, "loss": "bt", "train": str(train)}
    C.save_checkpoint(d, model.state_dict(), model, tok, {"marginal.json": json.dumps(marginal)})
    return d

# -----------------------------------------------------------------------------
# silent wrong answers


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
    data = T.write_jsonl(tmp_path / "val.jsonl", [{"prompt": f"prompt {i}", "model_a": "m0", "model_b": f"m{1 + i % 2}",
                                                    "winner": "model_a" if i % 3 else "model_b"} for i in range(6)])
    ck = tiny_checkpoint(tiny_qwen, tmp_path / "ck", train=data)
    sha = []
    for out in ("a", "b"):
        T.ok(T.evaluate("--checkpoint", ck, "--data", data, "--out", tmp_path / out, "--bootstrap", 20))
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
    err = T.in_process(route.main, "--preds", a, "--prompts", a / "predictions.jsonl", "--budget", "1", "--out",
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
    data, train, _, _ = T.bt_case(tmp_path)
    ck_a = ck_dir(tmp_path / "ckA", ["x", "y"], [math.log(2), 0.0], train)
    ck_b = ck_dir(tmp_path / "ckB", ["x", "y", "z"], [0.0, 0.0, 0.0], train)
    ck_c = ck_dir(tmp_path / "ckC", ["x", "y"], [3.0, 0.0], train)  # same models, another marginal
    preds = tmp_path / "pa"
    C.save_predictions(preds, torch.tensor([[math.log(3), 0.0], [0.0, math.log(4)], [0.0, 0.0]]), None, ["x", "y"],
                       [{"prompt": [p]} for p in ("p1", "p2", "p3")], loss="bt", checkpoint=ck_a)
    err, _ = T.evaluate("--checkpoint", ck_b, "--preds", preds, "--data", data, "--out", tmp_path / "e1")
    assert "were made for 2 models" in err and "lists 3" in err and not (tmp_path / "e1").exists()
    err, _ = T.evaluate("--checkpoint", ck_c, "--preds", preds, "--data", data, "--out", tmp_path / "e2")
    assert f"were made by the checkpoint {ck_a}" in err and not (tmp_path / "e2").exists()
    T.ok(T.evaluate("--checkpoint", ck_a, "--preds", preds, "--data", data, "--out", tmp_path / "e3"))
    moved = tmp_path / "moved"
    shutil.move(ck_a, moved)  # the same checkpoint elsewhere is still the one that made them
    T.ok(T.evaluate("--checkpoint", moved, "--preds", preds, "--data", data, "--out", tmp_path / "e4"))
    m3, m4 = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("e3", "e4"))
    assert m3["p2l"] == m4["p2l"] and m3["marginal"] == m4["marginal"]


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


def test_cv_reuses_a_fold_only_for_the_same_split(tmp_path, monkeypatch, capsys):
    """Issue 20, silent wrong answers 1: a fold checkpoint trained under another --seed (another split) was
    reused because train.py's argv matched ("fold0: trained already, reusing"), scoring prompts with
    models that had trained on them. Now the fold's split and data must match too."""
    rows = [{"prompt": f"q{i}", "model_a": "x", "model_b": "y", "winner": "model_a" if i % 3 else "model_b"} for i in range(12)]
    data = T.write_jsonl(tmp_path / "d.jsonl", rows)
    calls = []
    cv_fakes(monkeypatch, calls)
    base = ["--data", data, "--folds", "2", "--boot", "10", "--out", tmp_path / "cv"]
    run_cv(monkeypatch, *base)
    assert len(calls) == 2
    run_cv(monkeypatch, *base)  # the same run again: both folds reused
    assert len(calls) == 2 and capsys.readouterr().out.count("trained already") == 2
    run_cv(monkeypatch, *base, "--seed", "1")  # another split: both folds trained again
    assert len(calls) == 4 and "trained already" not in capsys.readouterr().out
    T.write_jsonl(data, rows[:11])  # other data under the same name
    run_cv(monkeypatch, *base, "--seed", "1")
    assert len(calls) == 6


def test_cv_out_is_locked_and_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys):
    """Issue 20, silent wrong answers 1 (two cv.py runs on one --out: AssertionError "a prompt was scored
    twice") and tracebacks (cv.py --out FILE, --boot 0, --compare / --scaling with a missing dir)."""
    rows = [{"prompt": f"q{i}", "model_a": "x", "model_b": "y", "winner": "model_a"} for i in range(6)]
    data = T.write_jsonl(tmp_path / "d.jsonl", rows)
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


def test_livebench_release_must_be_a_real_release_and_out_is_one_locked_set(setup, monkeypatch):
    """Issue 20, silent wrong answers 5: --release 2099-13-45 matched the pattern and scored against
    another release's table; livebench_eval.py took no --out lock and wrote metrics.json first."""
    d = setup
    base = ["--preds", d / "preds", "--questions", d / "q.jsonl", "--scores", d / "table.csv"]
    assert "--release must be a date YYYY-MM-DD" in T.run_eval(*base, "--release", "2099-13-45", "--out", d / "o", ok=False)
    assert "not a release of" in T.run_eval(*base, "--release", "2024-10-01", "--out", d / "o", ok=False)
    shutil.copy(d / "table.csv", d / "table_2024_11_25.csv")  # a site table names its release
    err = T.run_eval(*base[:-1], d / "table_2024_11_25.csv", "--release", "2024-06-24", "--out", d / "o", ok=False)
    assert "is release 2024-11-25's table" in err and not (d / "o").exists()
    lock = C.lock_dir(d / "busy")
    try:
        assert "another run is writing there" in T.run_eval(*base, "--out", d / "busy", ok=False)
    finally:
        lock.close()
    assert not (d / "busy" / "metrics.json").exists()

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(L, "plot", boom)  # the last file of the set fails: nothing of the set reaches --out
    with pytest.raises(RuntimeError):
        T.run_eval(*base, "--out", d / "o")
    assert [p.name for p in (d / "o").iterdir() if not p.name.startswith(".")] == []

# -----------------------------------------------------------------------------
# train.py's flags


@pytest.mark.slow
def test_train_refuses_reversed_clip_long_warmup_and_infinite_lr(tmp_path):
    """Issue 20, silent wrong answers 4 (--clip -1 reversed the gradients, --clip 0 zeroed them, --warmup
    beyond the run was accepted) and tracebacks (--head-lr inf wrote Infinity into training_args.json)."""
    good = T.write_jsonl(tmp_path / "good.jsonl", [T.GOOD, dict(T.GOOD, model_b="z", winner="model_b")])
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

# -----------------------------------------------------------------------------
# tracebacks -> one line


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
    assert "truncated or corrupt" in T.in_process(route.main, "--preds", p, "--prompts", p / "predictions.jsonl", "--budget", "1",
                                                  "--out", tmp_path / "o", ok=False)
    data = T.write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p0", "model_a": "x", "model_b": "y", "winner": "model_a"}])
    err, _ = T.evaluate("--preds", p, "--loss", "bt", "--train-votes", data, "--data", data, "--out", tmp_path / "e")
    assert "truncated or corrupt" in err
    lb = setup / "preds" / "predictions.safetensors"
    lb.write_bytes(lb.read_bytes()[:20])
    assert "truncated or corrupt" in T.run_eval("--preds", setup / "preds", "--questions", setup / "q.jsonl", "--scores",
                                                setup / "table.csv", "--out", setup / "o", ok=False)
    assert not any((tmp_path / x).exists() for x in ("o", "e")) and not (setup / "o").exists()


def test_damaged_token_cache_names_its_dir_and_says_to_delete_it(tiny_qwen, tmp_path):
    """Issue 20, tracebacks: six kinds of damage to the token cache (truncated tokens.bin, bad meta.json,
    missing / truncated offsets.npy, out-of-vocabulary ids, an empty file) crashed or were read; ids that
    are in range but wrong were read unchecked. Each is now one ValueError naming the cache dir and saying
    to delete it (a checksum in meta.json catches the wrong ids)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    data = T.write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"prompt {i} " * (1 + i), "model_a": "x", "model_b": "y",
                                                  "winner": "model_a"} for i in range(5)])
    root = tmp_path / "cache"
    good = C.token_cache(data, tok, 32, "mean", workers=1, root=root, log=lambda *a: None)
    d = good.dir
    saved = {f.name: f.read_bytes() for f in d.iterdir()}
    tokens = np.frombuffer(saved["tokens.bin"], dtype=np.int32)

    def with_checksum():  # damage that keeps meta.json's checksum right: only the vocabulary check sees it
        meta = json.loads((d / "meta.json").read_text())
        meta["checksum"] = C.cache_checksum(d)
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
            C.token_cache(data, tok, 32, "mean", workers=1, root=root, log=lambda *a: None)
        msg = str(e.value)
        assert msg.startswith(f"token cache {d}:") and f"delete {d}" in msg and "\n" not in msg, (what, msg)
        for name, b in saved.items():
            (d / name).write_bytes(b)
    again = C.token_cache(data, tok, 32, "mean", workers=1, root=root, log=lambda *a: None)
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
    err, _ = T.evaluate("--preds", tmp_path / "none", "--loss", "bt", "--train-votes", f, "--data", tmp_path / "u.jsonl",
                        "--out", tmp_path / "e")
    assert "u.jsonl:30: not UTF-8 text" in err


def test_nonfinite_checkpoint_weights_are_named(tiny_qwen, tmp_path):
    """Issue 20, tracebacks: a checkpoint with NaN weights loaded, and a later solver said "did not converge:
    gradient norm nan"; load_checkpoint now names the weights."""
    ck = tiny_checkpoint(tiny_qwen, tmp_path / "ck")
    from safetensors.torch import load_file, save_file
    state = load_file(ck / "model.safetensors")
    state["head.head.bias"][1] = float("nan")
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: non-finite weights \(NaN or inf\) in 1 tensors, e.g. head.head.bias"):
        C.load_checkpoint(ck)


def test_livebench_truncated_checkpoint_is_one_line(tiny_qwen, setup):
    """Issue 20, tracebacks: a truncated checkpoint in livebench_eval.py --checkpoint raised a traceback."""
    ck = tiny_checkpoint(tiny_qwen, setup / "ck", models=("cheap", "mid", "star"), bias=(0.0, 1.0, 2.0))
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = T.run_eval("--checkpoint", ck, "--questions", setup / "q.jsonl", "--scores", setup / "table.csv", "--out",
                     setup / "o", ok=False)
    assert err.startswith(f"error: --checkpoint {ck}:") and "truncated or corrupt" in err and not (setup / "o").exists()
