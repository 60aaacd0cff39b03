"""
arena-catalog Chatbot Arena votes -> P2L battles (topic as prompt), plus a slice of the official
category leaderboards for the same models.

Reads  <shared>/lmarena__arena-catalog/topic_clustering/data/embedding_ablation/mpnet/recent_english_llm_category.csv
       10,000 real human Chatbot Arena votes (mid 2024, English, 55 models): question_id,
       broad_category_id, broad_category, narrower_category_id, narrower_category, model_a,
       model_b, winner (model_a / model_b / tie / tie (bothbad)). There is NO prompt text.
       <shared>/lmarena__arena-catalog/data/test.csv: official category leaderboards
       (~Jan 2025; 200 models x 20 categories, with and without style control).
       <shared> defaults to ../shared/data next to the repo root (commits in its manifest.tsv).
Writes data/arena_catalog/train.jsonl.gz and data/arena_catalog/val.jsonl.gz, one vote per line:
       {"id": question_id, "prompt": narrower_category, "model_a", "model_b", "winner",
        "category": broad_category}
       The narrower topic label (145 of them) stands in for the prompt, so a P2L trained on these
       files learns a topic-conditioned leaderboard, not a prompt-conditioned one.
       data/arena_catalog/leaderboards.csv: the test.csv rows whose model_name is one of the vote
       models (exact name match), columns model_name, rating, rating_q025, rating_q975,
       num_battles, category, style_control, values copied verbatim, sorted by
       (category, style_control, -rating, model_name).
Split: each vote is its own conversation, so the sorted question_ids are shuffled with
       random.Random(0); the first 80% are train, the rest val.
Output is deterministic: battles sorted by (prompt, id), gzip with mtime=0 and no file name.
License: lmarena/arena-catalog has no LICENSE file. The votes and leaderboards are LMArena's public
       data; these files are a compact derived sample redistributed for research, attributed to
       lmarena/arena-catalog. See README.md in this folder.
Run:   python data/arena_catalog/prepare.py [--shared PATH]
"""
import argparse
import csv
import gzip
import io
import json
import os
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VOTES = "lmarena__arena-catalog/topic_clustering/data/embedding_ablation/mpnet/recent_english_llm_category.csv"
LEADERBOARDS = "lmarena__arena-catalog/data/test.csv"
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
LB_COLUMNS = ["model_name", "rating", "rating_q025", "rating_q975", "num_battles", "category", "style_control"]
VAL_FRACTION = 0.2
SEED = 0

def write_atomic(path, data):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

def jsonl_gz(rows):
    # gzip with mtime=0 and an empty file name, so re-running gives identical bytes
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return buf.getvalue()

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="root of the shared data copy")
    args = ap.parse_args()

    # read every input before writing anything
    with open(args.shared / LEADERBOARDS, newline="", encoding="utf-8") as f:
        board = list(csv.DictReader(f))

    # votes -> battles, failing loudly on anything unexpected
    path = args.shared / VOTES
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for v in reader:
            where = f"{path}:{reader.line_num}"
            if v["winner"] not in WINNERS:
                raise ValueError(f"{where}: winner {v['winner']!r} not in {WINNERS}")
            if not all(v[k] for k in ("question_id", "narrower_category", "broad_category", "model_a", "model_b")):
                raise ValueError(f"{where}: empty field in {v}")
            if v["model_a"] == v["model_b"]:
                raise ValueError(f"{where}: model_a == model_b == {v['model_a']!r}")
            rows.append({"id": v["question_id"], "prompt": v["narrower_category"], "model_a": v["model_a"],
                         "model_b": v["model_b"], "winner": v["winner"], "category": v["broad_category"]})
    ids = sorted(r["id"] for r in rows)
    assert len(ids) == len(set(ids)), "duplicate question_id: votes would not be independent conversations"
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    print(f"{len(rows)} votes, {len(models)} models, {len({r['category'] for r in rows})} broad categories, "
          f"{len({r['prompt'] for r in rows})} narrower categories (used as the prompt)")

    # split by question_id
    random.Random(SEED).shuffle(ids)
    train_ids = set(ids[:len(ids) - round(VAL_FRACTION * len(ids))])
    splits = {"train": [r for r in rows if r["id"] in train_ids], "val": [r for r in rows if r["id"] not in train_ids]}
    for name, split in splits.items():
        split.sort(key=lambda r: (r["prompt"], r["id"]))
        out = HERE / f"{name}.jsonl.gz"
        write_atomic(out, jsonl_gz(split))
        counts = " ".join(f"{w}={sum(r['winner'] == w for r in split)}" for w in WINNERS)
        print(f"{name:5s}: {len(split)} votes, {len({r['prompt'] for r in split})} topics, {counts}, "
              f"{out.name} {out.stat().st_size:,} bytes")

    # official category leaderboards, only the models that appear in the votes
    names = {b["model_name"] for b in board}
    matched = [m for m in models if m in names]
    keep = [{k: b[k] for k in LB_COLUMNS} for b in board if b["model_name"] in set(models)]
    keep.sort(key=lambda b: (b["category"], b["style_control"], -float(b["rating"]), b["model_name"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LB_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(keep)
    out = HERE / "leaderboards.csv"
    write_atomic(out, buf.getvalue().encode("utf-8"))
    boards = sorted({(b["category"], b["style_control"]) for b in keep})
    print(f"leaderboards: {len(matched)}/{len(models)} vote models found in test.csv (exact name), "
          f"{len(keep)} rows over {len(boards)} (category, style_control) boards, {out.name} {out.stat().st_size:,} bytes")
    print(f"unmatched: {', '.join(m for m in models if m not in names)}")

if __name__ == "__main__":
    main()
