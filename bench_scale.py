"""Scale benchmark: P2L's data stages on synthetic battles at the paper's size (1.5M battles, 130
models), and at a small size, so growth shows as a ratio. Each stage runs in a fresh process and
prints its wall time and peak resident memory (ru_maxrss; the tokenizer's worker processes too).

    python bench_scale.py --sizes 2000 --tokenize-prompts 2000 --steps 2 --out out/bench-scale-tiny   # CPU, ~1 min
    python bench_scale.py                                                       # make bench-scale: 10k and 1.5M

Synthetic battles: prompt texts are slices of the bundled real prompts (AlpacaEval, LiveBench), with
lengths resampled from those prompts' lengths, plus a 3% tail of long prompts (1k-8k tokens) as in
Arena; --unique of the battles have a prompt of their own, the rest repeat an earlier one; models
by a Zipf-like popularity; outcomes (a, b, tie, both bad) from a random grounded-RK leaderboard.
Stages:
  index     C.index_votes: one streaming pass, votes as flat arrays (no prompt text held)
  parquet   the same battles as an Arena-schema parquet file (conversation_a, winner, id, language;
            row groups of 50k), read by C.index_votes through C.read_parquet's record batches
  tokenize  C.token_cache with one worker per CPU on the first --tokenize-prompts unique prompts;
            at sizes above that the time for all prompts is EXTRAPOLATED from the measured tokens/s
  sampler   one epoch of C.token_batches (--max-tokens, length-grouped) and of the fixed-count
            random sampler (--batch-size, train.py's default); padding fraction of each. Above
            --tokenize-prompts, the lengths of the rest are resampled from the tokenized ones
  train     --steps real optimizer steps of a small random BERT (MiniLM tokenizer and vocabulary,
            2 layers, grk head on all models) with each sampler, on the tokenized prompts clipped to
            their last --train-len tokens: useful (non-pad) tokens/s and padding of the batches run
Aggregation with bootstrap and routing on the prediction rows are aggregate.py / route.py commands
(see the Makefile's bench-scale target).
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--sizes", default="10000,1500000", help="battle counts to run, comma-separated (small first: the ratio is big/small)")
p.add_argument("--models", type=int, default=130, help="the paper's model count")
p.add_argument("--unique", type=float, default=0.85, help="fraction of battles with a prompt of their own (Arena prompts are mostly unique)")
p.add_argument("--tokenize-prompts", type=int, default=100_000, help="unique prompts actually tokenized per size; the rest extrapolated")
p.add_argument("--max-len", type=int, default=8192, help="tokens kept per prompt (the long tail reaches it)")
p.add_argument("--max-tokens", type=int, default=16384, help="token budget per micro-batch of the length-grouped sampler")
p.add_argument("--batch-size", type=int, default=8, help="prompts per micro-batch of today's fixed-count sampler (train.py's default)")
p.add_argument("--steps", type=int, default=4, help="optimizer steps timed per sampler in the train stage")
p.add_argument("--train-len", type=int, default=1024, help="train stage only: prompts keep their last N tokens (on this CPU "
               "one 8k-token prompt takes ~100 s forward + backward even in a 2-layer model: attention is quadratic)")
p.add_argument("--train-max-tokens", type=int, default=4096, help="train stage: token budget of the length-grouped batches")
p.add_argument("--stages", default="index,parquet,tokenize,sampler,train",
               help="stages to run, comma-separated (e.g. index,parquet: the readers' time and peak memory alone)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="out/bench-scale", help="synthetic battle files, the token caches, results.json")
p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this (fresh) process
p.add_argument("--size", type=int, help=argparse.SUPPRESS)
args = p.parse_args()
out = Path(args.out)


def peak_rss_mib(children=False):
    # this process's own high-water mark (VmHWM): ru_maxrss survives exec on Linux, so a stage child would
    # report at least the driver's RSS at fork time (the same number for every stage)
    with open("/proc/self/status") as f:
        r = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    if children:
        r = max(r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return r / 1024  # Linux reports KiB

# -----------------------------------------------------------------------------
# synthetic battles


def real_prompts():
    import common as C
    texts = [" ".join(b["prompt"]) for f in ("data/alpaca_eval/train.jsonl.gz", "data/alpaca_eval/val.jsonl.gz")
             for b in C.read_battles(HERE / f)]
    texts += [" ".join(r["turns"]) for _, r in C.read_jsonl(HERE / "data/livebench/questions.jsonl.gz")]
    return list(dict.fromkeys(texts))


def generate(n, path, head_path):
    """n battles as JSONL; head_path gets the first lines up to --tokenize-prompts unique prompts."""
    rng = np.random.default_rng(args.seed)
    texts = real_prompts()
    corpus = "\n\n".join(texts)
    lens = np.array([len(t) for t in texts])
    n_unique = max(1, int(args.unique * n))
    # char lengths: resampled from the real prompts, 3% from a log-uniform 4k-32k chars (~1k-8k tokens)
    L = rng.choice(lens, n_unique)
    tail = rng.random(n_unique) < 0.03
    L[tail] = np.exp(rng.uniform(math.log(4000), math.log(32000), tail.sum())).astype(int)
    L = np.minimum(L, len(corpus) - 1)
    start = (rng.random(n_unique) * (len(corpus) - L)).astype(int)
    prompt = np.concatenate([np.arange(n_unique), rng.integers(0, n_unique, n - n_unique)])
    prompt = prompt[rng.permutation(n)]
    pop = 1.0 / np.arange(1, args.models + 1) ** 0.8
    a = rng.choice(args.models, n, p=pop / pop.sum())
    b = (a + rng.integers(1, args.models, n)) % args.models
    beta, eta = rng.normal(0, 1, args.models), -0.5
    phi_a, phi_b, theta = np.exp(beta[a]), np.exp(beta[b]), 1 + math.exp(eta)
    pa, pb, pbad = phi_a / (phi_a + theta * phi_b + 1), phi_b / (phi_b + theta * phi_a + 1), 1 / (1 + phi_a + phi_b)
    u = rng.random(n)
    winner = np.select([u < pa, u < pa + pb, u < pa + pb + pbad], [0, 1, 3], 2)
    names = [f"model-{i:03d}" for i in range(args.models)]
    wname = ["model_a", "model_b", "tie", "tie (bothbad)"]
    seen = set()
    with open(path, "w") as f, open(head_path, "w") as h:
        for i in range(n):
            z = int(prompt[i])
            text = f"#{z} " + corpus[start[z]:start[z] + L[z]]
            line = json.dumps({"prompt": text, "model_a": names[a[i]], "model_b": names[b[i]], "winner": wname[winner[i]]}) + "\n"
            f.write(line)
            if len(seen) < args.tokenize_prompts:
                seen.add(z)
                h.write(line)
    return n_unique

def to_parquet(path, pq_path, rows_per_group=50_000):
    """The JSONL battles as a parquet file in LMArena's schema (conversation_a as role/content turns,
    winner, id, language), written row group by row group: never the whole file in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("model_a", pa.string()), ("model_b", pa.string()), ("winner", pa.string()),
                        ("conversation_a", pa.list_(turn)), ("language", pa.string())])
    with open(path) as f, pq.ParquetWriter(pq_path, schema) as w:
        buf = []
        for i, line in enumerate(f):
            r = json.loads(line)
            buf.append({"id": f"b{i}", "model_a": r["model_a"], "model_b": r["model_b"], "winner": r["winner"],
                        "conversation_a": [{"role": "user", "content": r["prompt"]}], "language": "English"})
            if len(buf) == rows_per_group:
                w.write_table(pa.Table.from_pylist(buf, schema))
                buf = []
        if buf:
            w.write_table(pa.Table.from_pylist(buf, schema))

# -----------------------------------------------------------------------------
# stages, each in its own process


def tokenizer():
    import common as C
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(C.offline_backbone("minilm")[0])


def stage_index(n):
    import common as C
    t0 = time.perf_counter()
    v = C.index_votes(out / f"battles-{n}.jsonl", "grk")
    return {"seconds": time.perf_counter() - t0, "battles": v["n_battles"], "prompts": v["n_prompts"],
            "models": len(v["models"])}


def stage_parquet(n):
    import common as C
    t0 = time.perf_counter()
    v = C.index_votes(out / f"battles-{n}.parquet", "grk")
    return {"seconds": time.perf_counter() - t0, "battles": v["n_battles"], "prompts": v["n_prompts"],
            "models": len(v["models"]), "batch_rows": C.PARQUET_BATCH}


def stage_tokenize(n):
    import common as C
    import shutil
    root = out / f"cache-{n}"
    shutil.rmtree(root, ignore_errors=True)  # time a build, not a reuse
    t0 = time.perf_counter()
    c = C.token_cache(out / f"battles-{n}-head.jsonl", tokenizer(), args.max_len, "mean", root=root, log=lambda *a: None)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "prompts": len(c), "tokens": int(c.offsets[-1]), "tokens_per_s": c.offsets[-1] / secs,
            "workers": c.meta["workers"], "disk_mib": (c.tokens.nbytes + c.offsets.nbytes) / 2 ** 20}


def lengths_for(n, n_unique):
    """Token lengths of all n_unique prompts: the tokenized ones, the rest resampled from them."""
    import common as C
    root = out / f"cache-{n}"
    c = C.TokenCache(next(d for d in root.iterdir() if (d / "meta.json").exists()))
    L = c.lengths
    if n_unique > len(L):
        L = np.concatenate([L, np.random.default_rng(args.seed).choice(L, n_unique - len(L))])
    return L, c


def fixed_batches(n_prompts, epoch):
    """train.py's --batch-size sampler: a seeded shuffle cut into fixed-count batches."""
    import random
    order = list(range(n_prompts))
    random.Random(args.seed + epoch).shuffle(order)
    return [np.array(order[i:i + args.batch_size]) for i in range(0, n_prompts, args.batch_size)]


def stage_sampler(n, n_unique):
    import common as C
    L, c = lengths_for(n, n_unique)
    t0 = time.perf_counter()
    tb = C.token_batches(L, args.max_tokens, seed=args.seed)
    secs = time.perf_counter() - t0
    t0 = time.perf_counter()
    fb = fixed_batches(len(L), 0)
    fixed_secs = time.perf_counter() - t0
    pad_t, pad_f = C.padding_fraction(L, tb), C.padding_fraction(L, fb)
    return {"seconds": secs, "fixed_seconds": fixed_secs, "prompts": len(L), "batches": len(tb), "fixed_batches": len(fb),
            "padding_token_budget": pad_t, "padding_fixed": pad_f, "padding_cut": pad_f / pad_t,
            "lengths_resampled": len(L) - len(c), "mean_len": float(L.mean()), "max_len": int(L.max())}


def stage_train(n):
    import torch
    from transformers import BertConfig, BertModel
    import common as C
    torch.manual_seed(args.seed)
    tok = tokenizer()
    v = C.index_votes(out / f"battles-{n}-head.jsonl", "grk")
    _, c = lengths_for(n, 0)
    prompts = np.unique(v["pairs"]["row"].numpy())
    clip = np.minimum(c.lengths, args.train_len)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=args.train_len)
    p2l = {"model_list": v["models"], "loss": "grk", "pooling": "mean", "max_len": args.max_len}
    model = C.P2LModel(BertModel(cfg), p2l)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    res = {}
    for name, batches in (("fixed", [prompts[b] for b in fixed_batches(len(prompts), 0)]),
                          ("token_budget", [prompts[b] for b in C.token_batches(clip[prompts], args.train_max_tokens, seed=args.seed)])):
        useful = fed = 0
        for i, batch in enumerate(batches[:args.steps + 1]):
            if i == 1:  # the first step warms up allocators, untimed
                t0 = time.perf_counter()
            x, m = C.collate([c[j][-args.train_len:] for j in batch], tok.pad_token_id)
            beta, eta = model(x, m)
            s, w = C.batch_nll(beta, eta, C.pairs_of(v, batch), "grk")
            (s / w.clamp_min(1e-12)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 1:
                useful, fed = useful + int(m.sum()), fed + m.numel()
        secs = time.perf_counter() - t0
        res[name] = {"seconds_per_step": secs / args.steps, "useful_tokens_per_s": useful / secs, "padding": 1 - useful / fed}
    res["useful_tokens_per_s_ratio"] = res["token_budget"]["useful_tokens_per_s"] / res["fixed"]["useful_tokens_per_s"]
    return res


if args.stage:  # child process: one stage, its result and peak RSS as one JSON line
    sys.path.insert(0, str(HERE))
    n_unique = max(1, int(args.unique * args.size))
    r = {"index": lambda: stage_index(args.size), "parquet": lambda: stage_parquet(args.size),
         "tokenize": lambda: stage_tokenize(args.size),
         "sampler": lambda: stage_sampler(args.size, n_unique), "train": lambda: stage_train(args.size)}[args.stage]()
    r["peak_rss_mib"] = peak_rss_mib(children=args.stage == "tokenize")
    print("RESULT " + json.dumps(r))
    sys.exit(0)

# -----------------------------------------------------------------------------
# driver: generate, run each stage in a fresh process, print the table


def run_stage(stage, n):
    cmd = [sys.executable, __file__, "--stage", stage, "--size", str(n)] + [a for a in sys.argv[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if r.returncode != 0:
        sys.exit(f"error: stage {stage} at {n} battles failed:\n{r.stderr[-3000:]}")
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


sys.path.insert(0, str(HERE))
out.mkdir(parents=True, exist_ok=True)
sizes = [int(s) for s in args.sizes.split(",")]
stages = args.stages.split(",")
if not set(stages) <= {"index", "parquet", "tokenize", "sampler", "train"}:
    sys.exit(f"error: --stages {args.stages}: choose from index, parquet, tokenize, sampler, train")
results = {}
for n in sizes:
    path, head = out / f"battles-{n}.jsonl", out / f"battles-{n}-head.jsonl"
    t0 = time.perf_counter()
    n_unique = generate(n, path, head)
    print(f"{n} battles, {n_unique} unique prompts, {args.models} models: generated in {time.perf_counter() - t0:.0f} s "
          f"({path.stat().st_size / 2 ** 20:.0f} MiB)", flush=True)
    if "parquet" in stages:
        t0 = time.perf_counter()
        to_parquet(path, out / f"battles-{n}.parquet")
        size = (out / f"battles-{n}.parquet").stat().st_size / 2 ** 20
        print(f"  as parquet (Arena schema): {time.perf_counter() - t0:.0f} s ({size:.0f} MiB)", flush=True)
    res = {"battles": n, "unique_prompts": n_unique}
    for stage in stages:
        res[stage] = run_stage(stage, n)
        print(f"  {stage:8s} {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res[stage].items()})}", flush=True)
    if "tokenize" in res:
        tk = res["tokenize"]
        tk["extrapolated"] = n_unique > tk["prompts"]
        tk["seconds_all"] = tk["seconds"] * n_unique / tk["prompts"]  # tokens/s measured, applied to all prompts
    results[n] = res
    path.unlink()  # GiBs at full size; regenerated from the seed
    head.unlink()
    (out / f"battles-{n}.parquet").unlink(missing_ok=True)

rows = [("index: battle file -> flat arrays", "index", "seconds"), ("index: the same as Arena parquet", "parquet", "seconds"),
        ("tokenize (all prompts)", "tokenize", "seconds_all"),
        ("sampler: one epoch, token budget", "sampler", "seconds"), ("train step, token budget", "train", None)]
print(f"\n{'stage':36s}" + "".join(f"{f'{n} s':>12s}{f'{n} MiB':>12s}" for n in sizes)
      + ("  time ratio / size ratio" if len(sizes) > 1 else ""))
rows = [r for r in rows if r[1] in stages]
for label, st, key in rows:
    secs = [results[n][st][key] if key else results[n][st]["token_budget"]["seconds_per_step"] for n in sizes]
    rss = [results[n][st]["peak_rss_mib"] for n in sizes]
    line = f"{label:36s}" + "".join(f"{s:12.2f}{r:12.0f}" for s, r in zip(secs, rss))
    if len(sizes) > 1:
        line += f"  {(secs[-1] / secs[0]) / (sizes[-1] / sizes[0]):.2f}" if key else "  (per step: size-independent)"
    print(line)
for n in (sizes if {"tokenize", "sampler", "train"} <= set(stages) else []):
    tk, sa, tr = results[n]["tokenize"], results[n]["sampler"], results[n]["train"]
    print(f"{n}: tokenized {tk['prompts']} prompts, {tk['tokens']} tokens at {tk['tokens_per_s']:.0f} tokens/s "
          f"({tk['workers']} workers){'; all ' + str(results[n]['unique_prompts']) + ' prompts EXTRAPOLATED' if tk['extrapolated'] else ''}; "
          f"padding {sa['padding_fixed']:.1%} (--batch-size {args.batch_size}) -> {sa['padding_token_budget']:.1%} "
          f"(--max-tokens {args.max_tokens}), {sa['padding_cut']:.1f}x less; useful tokens/s in training "
          f"{tr['fixed']['useful_tokens_per_s']:.0f} -> {tr['token_budget']['useful_tokens_per_s']:.0f} "
          f"({tr['useful_tokens_per_s_ratio']:.1f}x)")
import common as C  # noqa: E402
C.write_json(out / "results.json", {"args": vars(args), "cpus": os.cpu_count(), "results": results})
