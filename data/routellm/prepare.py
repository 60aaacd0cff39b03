"""
RouteLLM's evaluation data (GPT-4-1106 vs Mixtral-8x7B, per question) -> battle files in the
project's format, for training a pooled P2L and for routing on RouteLLM's own benchmark.

Reads  <shared>/lm-sys__RouteLLM/routellm/evals/  (lm-sys/RouteLLM commit 0b64fda, Apache-2.0;
       <shared> defaults to ../shared/data next to the repo root, see its SOURCES.md #8-#11):
         mmlu/responses/mmlu_<subject>.csv   57 files, 14,042 questions: prompt, True/False per model
         gsm8k/gsm8k_responses.csv           1,319 questions (the responses themselves are dropped)
         mt_bench/judgements.jsonl           GPT-4 single-answer scores (1-10), 80 questions x 2 turns
         mt_bench/question.jsonl             the MT-bench turns (the judgements hold only rendered text)
         */contaminated_prompts.jsonl        questions RouteLLM found in Arena data: kept, flagged
Writes data/routellm/{mmlu,gsm8k,mt_bench}.jsonl.gz, one battle per question (per turn for MT-bench),
       model_a = GPT-4-1106, model_b = Mixtral, both under this project's AlpacaEval names
       (name_map.json; an upstream name missing from it is an error):
         correctness: a right, b wrong -> model_a; the reverse -> model_b; both right -> tie;
                      both wrong -> tie (bothbad)
         MT-bench:    the higher judge score wins; equal scores -> tie, or tie (bothbad) when both
                      are below 5 (the judge's midpoint)
       plus the raw per-model numbers ("correct" or "score": {model: value}) for routing, the
       subject / turn as "category", and "contaminated": true where RouteLLM flags the prompt.
Output is deterministic (sorted rows, gzip mtime 0).
Run:   python data/routellm/prepare.py [--shared PATH]
"""
import argparse
import csv
import glob
import gzip
import io
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_SHARED = ROOT.parent / "shared" / "data"
EVALS = "lm-sys__RouteLLM/routellm/evals"


def read_name_map(path=HERE / "name_map.json"):
    """{upstream name: project name}; entries are {"name": ..., "approximate": reason or null}."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: v["name"] for k, v in raw.items() if not k.startswith("_")}


def map_name(name, name_map, where):
    if name not in name_map:
        raise ValueError(f"{where}: model {name!r} is not in data/routellm/name_map.json; add it (say whether the match is exact)")
    return name_map[name]


def gzip_bytes(text):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    return buf.getvalue()


def write(path, rows):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(gzip_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)))
    os.replace(tmp, path)


def contaminated(evals, bench):
    with open(evals / bench / "contaminated_prompts.jsonl", encoding="utf-8") as f:
        return {json.loads(line)["eval_prompt"] for line in f if line.strip()}


def correctness_battle(prompt, correct, strong, weak, category, bench, bad):
    a, b = correct[strong], correct[weak]
    winner = "model_a" if a and not b else "model_b" if b and not a else "tie" if a else "tie (bothbad)"
    return {"prompt": prompt, "model_a": strong, "model_b": weak, "winner": winner, "correct": correct,
            "category": category, "source": bench, "contaminated": prompt in bad}


def read_correctness(files, name_map, bench, bad, category_of):
    """Rows of RouteLLM's CSVs: prompt plus one True/False column per model (extra columns skipped)."""
    rows = []
    for path in files:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            models = [c for c in reader.fieldnames if c != "prompt" and not c.endswith("_response")]
            names = {c: map_name(c, name_map, path) for c in models}
            for i, r in enumerate(reader, 2):
                if r[models[0]] not in ("True", "False") or r[models[1]] not in ("True", "False"):
                    raise ValueError(f"{path}:{i}: correctness must be True or False")
                correct = {names[c]: r[c] == "True" for c in models}
                strong, weak = names["gpt-4-1106-preview"], names["mistralai/Mixtral-8x7B-Instruct-v0.1"]
                rows.append(correctness_battle(r["prompt"], correct, strong, weak, category_of(path), bench, bad))
    return rows


def read_mt_bench(evals, name_map, bad):
    with open(evals / "mt_bench/question.jsonl", encoding="utf-8") as f:
        questions = {q["question_id"]: q for q in map(json.loads, f)}
    scores = {}
    with open(evals / "mt_bench/judgements.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            j = json.loads(line)
            model = map_name(j["model"], name_map, f"{evals}/mt_bench/judgements.jsonl:{i}")
            scores.setdefault((j["question_id"], j["turn"]), {})[model] = float(j["score"])
    strong, weak = name_map["gpt-4-1106-preview"], name_map["mistralai/Mixtral-8x7B-Instruct-v0.1"]
    rows = []
    for (qid, turn), s in sorted(scores.items()):
        q = questions[qid]
        a, b = s[strong], s[weak]
        winner = "model_a" if a > b else "model_b" if b > a else "tie" if a >= 5 else "tie (bothbad)"
        prompt = q["turns"][:turn]  # turn 2 is judged on the whole conversation
        rows.append({"prompt": prompt, "model_a": strong, "model_b": weak, "winner": winner, "score": s,
                     "category": q["category"], "turn": turn, "id": f"{qid}/{turn}", "source": "mt_bench",
                     "contaminated": q["turns"][0] in bad})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(DEFAULT_SHARED), help="the shared data directory (SOURCES.md)")
    args = ap.parse_args()
    evals = Path(args.shared) / EVALS
    name_map = read_name_map()
    mmlu_files = sorted(glob.glob(str(evals / "mmlu/responses/mmlu_*.csv")))
    if len(mmlu_files) != 57:
        raise SystemExit(f"error: expected 57 MMLU files under {evals}/mmlu/responses, found {len(mmlu_files)}")
    sets = {
        "mmlu": read_correctness(mmlu_files, name_map, "mmlu", contaminated(evals, "mmlu"),
                                 lambda p: Path(p).stem.removeprefix("mmlu_")),
        "gsm8k": read_correctness([evals / "gsm8k/gsm8k_responses.csv"], name_map, "gsm8k", contaminated(evals, "gsm8k"),
                                  lambda p: "gsm8k"),
        "mt_bench": read_mt_bench(evals, name_map, contaminated(evals, "mt_bench")),
    }
    for bench, rows in sets.items():
        if bench != "mt_bench":
            rows.sort(key=lambda r: (r["category"], r["prompt"]))
            for i, r in enumerate(rows):
                r["id"] = f"{bench}/{i}"
        write(HERE / f"{bench}.jsonl.gz", rows)
        wins = {w: sum(r["winner"] == w for r in rows) for w in ("model_a", "model_b", "tie", "tie (bothbad)")}
        print(f"{bench}: {len(rows)} battles, {len({json.dumps(r['prompt']) for r in rows})} prompts, "
              f"{sum(r['contaminated'] for r in rows)} flagged contaminated; outcomes {wins}")


if __name__ == "__main__":
    main()
