"""
A per-query cost for each of the 57 bundled AlpacaEval models, for route.py. NO REAL PRICES: none
are available offline, so the cost is a stated proxy for decode compute per answer:

    cost = params_B * mean_chars / 1000

mean_chars  the mean character length of the model's AlpacaEval 2 outputs (`output_2`, or
            `output_1` for the baseline gpt4_1106_preview), over the non-null outputs of its
            annotations file: <shared>/tatsu-lab__alpaca_eval/results/<model>/
            weighted_alpaca_eval_gpt4_turbo/annotations.json.gz (tatsu-lab/alpaca_eval, commit
            cd543a1). MEASURED. The leaderboard CSV's `avg_length` column (same quantity, rounded;
            text_davinci_003 is not in that CSV) is copied beside it as a check.
params_B    the parameter count in billions PARSED FROM THE MODEL NAME ("13b" -> 13, "Llama-3.2-1B"
            -> 1, "8x7B" -> 56, i.e. total not active parameters). A PROXY for the per-token price.
            Names that give no size (API models: claude*, gpt*, text_davinci*, jina-chat; and
            phi-2*, alpaca-farm-*) get --unnamed-size (default 70 = the largest size named in the
            set): an ASSUMPTION, not a fact about those models.
Decode compute is about 2 * params * tokens FLOPs; with tokens proportional to characters, cost is
proportional to it. The constant does not matter: route.py's --budget is in the same units.

Reads  <shared>/tatsu-lab__alpaca_eval/... (annotations as above, and
       src/alpaca_eval/leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv)
       and the model list of data/alpaca_eval/train.jsonl.gz.
Writes data/costs/alpaca_eval.json ({model: cost}, plus "_about"/"_formula" keys that route.py
       skips) and data/costs/alpaca_eval.csv (every input of every number). Deterministic.
License: derived from AlpacaEval data, CC BY-NC 4.0 (tatsu-lab), see data/alpaca_eval/README.md.
Run:   python data/costs/prepare.py [--shared PATH] [--unnamed-size 70]
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
ANNOTATIONS = "tatsu-lab__alpaca_eval/results/{}/weighted_alpaca_eval_gpt4_turbo/annotations.json.gz"
LEADERBOARD = ("tatsu-lab__alpaca_eval/src/alpaca_eval/leaderboards/data_AlpacaEval_2/"
               "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv")
BASELINE = "gpt4_1106_preview"


def params_from_name(name):
    """Billions of parameters written in a model name, or None. '8x7B' is 8*7 = 56 (all experts);
    a size is digits followed by b/B and no other letter or digit ('7b_concise', '-13b-v1.5')."""
    m = re.search(r"(?<![\w.])(\d+)x(\d+(?:\.\d+)?)[bB](?![a-zA-Z0-9])", name)
    if m:
        return int(m.group(1)) * float(m.group(2)), m.group(0)
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z0-9])", name)
    return (float(m.group(1)), m.group(0)) if m else (None, None)


def atomic_write(path, text):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="root of the shared data copy")
    ap.add_argument("--unnamed-size", type=float, default=None, help="params_B assumed for names that give "
                    "no size (default: the largest size named in the set)")
    args = ap.parse_args()

    with gzip.open(ROOT / "data/alpaca_eval/train.jsonl.gz", "rt", encoding="utf-8") as f:
        models = sorted({m for line in f for r in [json.loads(line)] for m in (r["model_a"], r["model_b"])})
    with open(args.shared / LEADERBOARD, encoding="utf-8") as f:
        board = {r[""]: r for r in csv.DictReader(f)}

    named = {m: params_from_name(m) for m in models}
    largest = max(p for p, _ in named.values() if p is not None)
    unnamed = args.unnamed_size if args.unnamed_size is not None else largest
    rows = []
    for m in models:
        with gzip.open(args.shared / ANNOTATIONS.format(m), "rt", encoding="utf-8") as f:
            ann = json.load(f)
        key = "output_1" if m == BASELINE else "output_2"
        lengths = [len(a[key]) for a in ann if isinstance(a.get(key), str)]
        mean_chars = sum(lengths) / len(lengths)
        params, token = named[m]
        source = f"name '{token}'"
        if params is None:
            why = "--unnamed-size" if args.unnamed_size is not None else "largest named size"
            params, source = unnamed, f"not in name: assumed {unnamed:g} ({why})"
        rows.append({"model": m, "mean_chars": round(mean_chars, 1), "n_outputs": len(lengths),
                     "leaderboard_avg_length": board[m]["avg_length"] if m in board else "",
                     "params_b": params, "params_source": source, "cost": round(params * mean_chars / 1000, 4)})

    out = {"_about": "PROXY costs, not prices: cost per query = params_B * mean_chars / 1000. mean_chars = mean "
                     "character length of the model's AlpacaEval 2 outputs (802-805 non-null per model; measured, "
                     "tatsu-lab/alpaca_eval annotations, commit cd543a1); params_B = parameter count parsed from the model name, or "
                     f"{unnamed:g} (assumed) where the name gives none. See data/costs/README.md and alpaca_eval.csv.",
           "_units": "billions of parameters x thousands of output characters (proportional to decode FLOPs)"}
    out.update({r["model"]: r["cost"] for r in rows})
    atomic_write(HERE / "alpaca_eval.json", json.dumps(out, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(HERE / "alpaca_eval.csv", buf.getvalue())

    for r in rows:
        check = r["leaderboard_avg_length"] or "-"
        print(f"{r['model']:36s} {r['mean_chars']:7.1f} (leaderboard {check:>5s})  x {r['params_b']:5g}B "
              f"[{r['params_source']}]  = {r['cost']:8.3f}")
    n_unnamed = sum(r["params_source"].startswith("not in name") for r in rows)
    print(f"{len(rows)} models; {len(rows) - n_unnamed} sizes parsed from the name, {n_unnamed} assumed {unnamed:g}B; "
          f"wrote {HERE / 'alpaca_eval.json'} and alpaca_eval.csv")


if __name__ == "__main__":
    main()
