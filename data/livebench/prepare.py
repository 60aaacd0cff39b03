"""
LiveBench questions + the matching release's per-task score table -> compact files for livebench_eval.py.

Reads  <shared>/LiveBench__LiveBench/livebench/data/live_bench/<category>/<task>/question.jsonl
       (13 files, 1,118 questions; LiveBench/LiveBench commit 995e86f, Apache-2.0) and
       <shared>/LiveBench__livebench.github.io/public/table_<release>.csv + categories_<release>.json
       (LiveBench/livebench.github.io commit 4bf96c8; that repo has NO LICENSE file).
       <shared> defaults to ../shared/data next to the repo root (see its SOURCES.md #13-#15).
Writes data/livebench/questions.jsonl.gz  all 1,118 questions, only the fields livebench_eval.py reads:
                                          question_id, category, task, turns, livebench_release_date,
                                          livebench_removal_date (ground truth and task metadata dropped)
       data/livebench/table_<release>.csv  byte copy of the site's table for --release
       data/livebench/costs_params.json    PROXY cost per query = parameter count in billions parsed
                                          from the LiveBench model name; models whose name gives no
                                          size get no cost (no assumption is made for them)
       data/livebench/name_map_alpaca_eval.json  the bundled AlpacaEval P2L's model names -> LiveBench
                                          names: every pair is checked to exist on both sides
--release defaults to the newest livebench_release_date among the questions (2024-11-25): the one
release whose table was computed on questions with these dates. Checks: every question has the
fields, question ids are unique, and each question's own category agrees with the site's
task -> category map for the release. Output is deterministic (sorted rows, gzip mtime 0).
Run:   python data/livebench/prepare.py [--shared PATH] [--release 2024-11-25]
"""
import argparse
import csv
import gzip
import io
import json
import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_SHARED = ROOT.parent / "shared" / "data"
QUESTIONS = "LiveBench__LiveBench/livebench/data/live_bench"
SITE = "LiveBench__livebench.github.io/public"
KEEP = ("question_id", "category", "task", "turns", "livebench_release_date", "livebench_removal_date")

# The bundled P2L (AlpacaEval 2, 57 models) shares NO model exactly with the 2024-11-25 table. Its
# three FuseChat-3.0 models are fine-tunes of models that are in it: a different model with the same
# base, listed as approximate (livebench_eval.py prints them as such). No other AlpacaEval model
# has a same-family counterpart in that table (checked by eye against its 65 names).
NAME_MAP = {
    "FuseChat-Gemma-2-9B-Instruct": ("gemma-2-9b-it", "FuseChat-3.0 fine-tune of gemma-2-9b-it (SFT + DPO on outputs of larger models): same base, not the same weights"),
    "FuseChat-Llama-3.1-8B-Instruct": ("meta-llama-3.1-8b-instruct-turbo", "FuseChat-3.0 fine-tune of Llama-3.1-8B-Instruct; LiveBench's '-turbo' is that model as served by Together"),
    "FuseChat-Qwen-2.5-7B-Instruct": ("qwen2.5-7b-instruct-turbo", "FuseChat-3.0 fine-tune of Qwen2.5-7B-Instruct; LiveBench's '-turbo' is that model as served by Together"),
}


def atomic_write(path, data):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    os.replace(tmp, path)


def gzip_bytes(text):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    return buf.getvalue()


def params_from_name(name):
    """Billions of parameters written in a model name ('qwq-32b' -> 32, 'meta-llama-3.1-405b-...' -> 405), or None."""
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)b(?![a-z0-9])", name.lower())
    return float(m.group(1)) if m else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="root of the shared data copy")
    ap.add_argument("--release", help="which site table to copy (YYYY-MM-DD); default: the newest question release date")
    args = ap.parse_args()

    rows, seen = [], set()
    files = sorted((args.shared / QUESTIONS).glob("*/*/question.jsonl"))
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            q = json.loads(line)
            missing = [k for k in KEEP if k not in q]
            if missing or q["question_id"] in seen:
                raise SystemExit(f"{f}:{lineno}: missing {missing} or duplicate question_id")
            seen.add(q["question_id"])
            rows.append({k: q[k] for k in KEEP})
    rows.sort(key=lambda q: (q["category"], q["task"], q["livebench_release_date"], q["question_id"]))
    release = args.release or max(q["livebench_release_date"] for q in rows)
    stem = release.replace("-", "_")
    table_src = args.shared / SITE / f"table_{stem}.csv"
    cats = json.loads((args.shared / SITE / f"categories_{stem}.json").read_text())
    site_cat = {t: c for c, ts in cats.items() for t in ts}
    # the questions' category names (math, ...) differ from the site's (Mathematics, ...): check the partition agrees
    pairs = {(q["category"], site_cat.get(q["task"])) for q in rows}
    if len({a for a, _ in pairs}) != len(pairs) or len({b for _, b in pairs}) != len(pairs) or None in {b for _, b in pairs}:
        raise SystemExit(f"question categories disagree with categories_{stem}.json: {sorted(pairs, key=str)}")

    table = table_src.read_bytes()
    header, *body = list(csv.reader(io.StringIO(table.decode("utf-8"))))
    models = [r[0] for r in body]
    tasks = sorted({q["task"] for q in rows})
    if not set(tasks) <= set(header):
        raise SystemExit(f"{table_src}: no column for tasks {sorted(set(tasks) - set(header))}")
    for p2l, (lb, _) in NAME_MAP.items():
        if lb not in models:
            raise SystemExit(f"name map: {lb!r} is not a model of {table_src.name}")
    alpaca = {json.loads(line)["model_a"] for line in gzip.open(ROOT / "data/alpaca_eval/train.jsonl.gz", "rt")}
    for p2l in NAME_MAP:
        if p2l not in alpaca:
            raise SystemExit(f"name map: {p2l!r} is not a model of data/alpaca_eval/train.jsonl.gz")

    sizes = {m: params_from_name(m) for m in models}
    costs = {"_about": "PROXY costs, not prices: cost per query = parameter count in billions parsed from the LiveBench "
                       "model name (e.g. 'qwq-32b' -> 32). Models whose name gives no size (API models such as o1, "
                       "gemini-*, claude-*, gpt-4o*, and phi-*, mistral-small-*, deepseek-v3/r1) have NO cost here, so a "
                       "routing run with this file routes only among the sized open-weight models. Answer length is "
                       "ignored: no LiveBench answers are available offline, and reasoning models (qwq-32b, "
                       "deepseek-r1-distill-*) write far longer answers than the others. See data/livebench/README.md.",
             "_units": "billions of parameters (proportional to decode FLOPs per output token)",
             **{m: s for m, s in sorted(sizes.items()) if s is not None}}
    name_map = {"_about": "P2L model name (the bundled AlpacaEval 2 checkpoint) -> LiveBench model name in "
                          f"table_{stem}.csv. No exact matches exist; these are approximate (same base model, "
                          "different fine-tune), with the reason. See data/livebench/README.md.",
                **{p: {"livebench": lb, "approximate": why} for p, (lb, why) in NAME_MAP.items()}}

    q_text = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in rows)
    atomic_write(HERE / "questions.jsonl.gz", gzip_bytes(q_text))
    atomic_write(HERE / f"table_{stem}.csv", table)
    atomic_write(HERE / "costs_params.json", json.dumps(costs, indent=1) + "\n")
    atomic_write(HERE / "name_map_alpaca_eval.json", json.dumps(name_map, indent=1) + "\n")

    active = [q for q in rows if q["livebench_release_date"] <= release
              and (q["livebench_removal_date"] == "" or q["livebench_removal_date"] > release)]
    print(f"{len(rows)} questions from {len(files)} files; {len(active)} active in release {release} "
          f"(released on or before it and not removed by it)")
    for t in tasks:
        n_all = sum(q["task"] == t for q in rows)
        n_act = sum(q["task"] == t for q in active)
        cat = next(q["category"] for q in rows if q["task"] == t)
        print(f"  {cat:22s} {t:17s} {n_all:4d} questions, {n_act:4d} active")
    print(f"table_{stem}.csv: {len(models)} models x {len(header) - 1} tasks ({len(tasks)} with questions here)")
    print(f"costs_params.json: {sum(s is not None for s in sizes.values())} of {len(models)} models have a size in their name")
    for f in ("questions.jsonl.gz", f"table_{stem}.csv", "costs_params.json", "name_map_alpaca_eval.json"):
        print(f"  {f}: {(HERE / f).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
