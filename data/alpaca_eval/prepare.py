"""
AlpacaEval 2 annotations -> P2L battles with prompt text, split 80/20 by prompt.

Reads  <shared>/tatsu-lab__alpaca_eval/results/<model>/weighted_alpaca_eval_gpt4_turbo/annotations.json.gz
       (58 gzipped JSON lists; each row has instruction, dataset, generator_1 = gpt4_1106_preview,
       generator_2 = the evaluated model, preference in [1, 2] where 2 = generator_2 better,
       judged by GPT-4-turbo with logprob weighting). <shared> defaults to ../shared/data
       next to the repo root (copied from tatsu-lab/alpaca_eval, commit cd543a1; see manifest.tsv).
Writes data/alpaca_eval/train.jsonl.gz and data/alpaca_eval/val.jsonl.gz, one battle per line:
       {"id", "prompt", "model_a", "model_b", "winner", "p_a", "category"}
       model_a = generator_2 (the evaluated model), model_b = "gpt4_1106_preview" (the fixed baseline),
       p_a = preference - 1 rounded to 6 decimals and clipped to [0, 1] (soft P(model_a preferred)),
       winner = model_a if p_a > 0.5, model_b if p_a < 0.5, tie if p_a == 0.5,
       category = the AlpacaEval sub-source (helpful_base, koala, oasst, selfinstruct, vicuna),
       id = sha1(instruction)[:10] + "/" + model_a.
Dropped: results/NullModel (generator_2 = "example": the known constant-output cheat) and the
       baseline's comparison with itself (every label is exactly 0.5). Rows whose preference is
       missing, NaN or unparseable are skipped and counted.
Split: the sorted list of unique instruction strings is shuffled with random.Random(0); the first
       80% of prompts are train, the rest val, so no prompt is on both sides.
Output is deterministic: rows sorted by (prompt, model_a), gzip with mtime=0 and no file name.
License: the AlpacaEval data is CC BY-NC 4.0 (Dubois, Li et al., "AlpacaEval" / "Length-Controlled
       AlpacaEval", tatsu-lab); so are these derived files. See README.md in this folder.
Run:   python data/alpaca_eval/prepare.py [--shared PATH]
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ANNOTATIONS = "tatsu-lab__alpaca_eval/results/{}/weighted_alpaca_eval_gpt4_turbo/annotations.json.gz"
BASELINE = "gpt4_1106_preview"
DROP_DIRS = {"NullModel": 'generator_2 is "example", the known null-model cheat',
             BASELINE: "the baseline compared with itself, every label is 0.5"}
VAL_FRACTION = 0.2
SEED = 0

def write_jsonl_gz(path, rows):
    # atomic and byte-reproducible: temp file in the same folder, gzip mtime=0 and empty name
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(tmp, path)

def parse_preference(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="root of the shared data copy")
    args = ap.parse_args()

    results = args.shared / "tatsu-lab__alpaca_eval" / "results"
    model_dirs = sorted(p.name for p in results.iterdir() if (args.shared / ANNOTATIONS.format(p.name)).exists())
    print(f"found {len(model_dirs)} annotation files under {results}")

    rows, n_bad, n_clipped, renamed = [], 0, 0, []
    for d in model_dirs:
        if d in DROP_DIRS:
            print(f"dropping {d}: {DROP_DIRS[d]}")
            continue
        with gzip.open(args.shared / ANNOTATIONS.format(d), "rt", encoding="utf-8") as f:
            annotations = json.load(f)
        names = sorted({a["generator_2"] for a in annotations})
        if names != [d]:
            renamed.append((d, names))
        for a in annotations:
            if a["generator_1"] != BASELINE:
                raise ValueError(f"{d}: generator_1 is {a['generator_1']!r}, expected {BASELINE!r}")
            pref = parse_preference(a.get("preference"))
            if pref is None:
                n_bad += 1
                continue
            p_a = round(pref - 1, 6)
            if not 0 <= p_a <= 1:
                n_clipped += 1
                p_a = min(max(p_a, 0.0), 1.0)
            model = a["generator_2"]
            winner = "model_a" if p_a > 0.5 else "model_b" if p_a < 0.5 else "tie"
            pid = hashlib.sha1(a["instruction"].encode("utf-8")).hexdigest()[:10]
            rows.append({"id": f"{pid}/{model}", "prompt": a["instruction"], "model_a": model,
                         "model_b": BASELINE, "winner": winner, "p_a": p_a, "category": a["dataset"]})
    for d, names in renamed:
        print(f"WARNING: directory {d} has generator_2 {names}; using the generator_2 name")
    print(f"skipped {n_bad} rows with missing/NaN/unparseable preference; clipped {n_clipped} p_a values to [0, 1]")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate (prompt, model) pairs"

    # split by prompt: shuffle the sorted unique prompts with a fixed seed
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(SEED).shuffle(prompts)
    n_val = round(VAL_FRACTION * len(prompts))
    train_prompts = set(prompts[:len(prompts) - n_val])
    splits = {"train": [r for r in rows if r["prompt"] in train_prompts],
              "val": [r for r in rows if r["prompt"] not in train_prompts]}

    print(f"models: {len({r['model_a'] for r in rows})} (each vs {BASELINE}), prompts: {len(prompts)}, rows: {len(rows)}")
    for name, split in splits.items():
        split.sort(key=lambda r: (r["prompt"], r["model_a"]))
        path = HERE / f"{name}.jsonl.gz"
        write_jsonl_gz(path, split)
        n = len(split)
        wins = sum(r["winner"] == "model_a" for r in split) / n
        ties = sum(r["winner"] == "tie" for r in split)
        mean_p = sum(r["p_a"] for r in split) / n
        print(f"{name:5s}: {len({r['prompt'] for r in split})} prompts, {n} rows, model_a wins {wins:.4f}, "
              f"ties {ties}, mean p_a {mean_p:.4f}, {path.name} {path.stat().st_size:,} bytes")

if __name__ == "__main__":
    main()
