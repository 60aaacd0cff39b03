"""Serve the P2L router as an OpenAI-compatible chat service (docs/design.md §7): point any OpenAI client at
it, send `model="p2l"`, and each request is routed under a cost budget (the paper's Algorithm 1,
route.route_one) to one of the models in --models and forwarded there.

    python serve.py --fake-upstream --port 9000 &         # a stand-in upstream that echoes (no keys, offline)
    P2L_API_KEYS=sk-local-1 python serve.py --checkpoint out/train --models models.json --budget 10 --port 8000
    python bench.py serve --checkpoint out/train           # routing decisions/s, p50/p99: batched vs one forward each

--models maps each P2L model name to its upstream, any OpenAI-compatible server (vLLM, llama.cpp
server, OpenAI, OpenRouter, a LiteLLM proxy); keys starting with '_' are comments:
    {"gpt-4o-2024-05-13": {"base_url": "https://api.openai.com/v1", "model": "gpt-4o-2024-05-13",
                           "cost": 7.5, "api_key_env": "OPENAI_API_KEY"}, ...}
`model` (default: the P2L name) is what the upstream calls it; `cost` is per query, in the units of
--budget; `api_key_env` names the environment variable holding the upstream's key (never the key).
Only listed models are routable: routing runs over them alone (β restricted to them, opponents q
uniform over them), so a request routes as route.py would with --costs holding those models.

Endpoints (all but / and /health need `Authorization: Bearer KEY`, KEY one of $P2L_API_KEYS, comma-separated;
a missing or wrong key is 401; every error is OpenAI's {"error": {"message", "type", "param", "code"}}):
  POST /v1/chat/completions  OpenAI chat, streamed or not. model "p2l" (or --name) routes: P2L reads the
        user turns, Algorithm 1 gives π under the budget, one model is sampled from π (argmax with
        --deterministic) and the request goes there. Any other routable name goes straight to it.
        Extra body fields (removed before forwarding): `budget` (per query; `cost` is accepted, the
        authors' name) within [cheapest model, --max-budget]; `route_seed` (int): sample with
        u = default_rng(route_seed).random(), the draw route.py --seed route_seed makes for a
        one-prompt file; without it the server's generator (seeded by --seed) draws in decision order.
        Response: the upstream's answer with `model` set to the routed model, and the headers
        x-p2l-model (who answered), x-p2l-cost (what it cost), x-p2l-pi (JSON), x-p2l-theta,
        x-p2l-rating, x-p2l-win-rate, x-p2l-expected-cost, x-p2l-budget (of the decision the answering
        model was drawn from), x-p2l-fallback (which model failed first).
  GET  /v1/models       the router and the routable models (with their cost)
  POST /v1/leaderboard  {"prompt": str | [turns]} or {"prompts": [...]}: each prompt's coefficients and
        ratings, and the leaderboard of the set, as aggregate.py --prompt computes it; `marginal`: the
        checkpoint's marginal leaderboard (train.py's marginal.json; null without one)
  POST /v1/route        {"prompt": ..., "budget": B}: the decision for that budget (π, expected cost, win
        rate, θ, rating; no draw, no upstream call) and the cost-quality frontier of the routable models
  GET  /                the explorer (explorer.html): a static page, no key needed to load it; it calls
        the endpoints above with the key typed into it, held in the page's memory only
  GET  /health          200 when the model is loaded (and warmed up); counts only (no paths or names)

Faults: an upstream that cannot connect, times out (--connect-timeout, --upstream-timeout), drops
the connection, or answers 408/429/5xx (or 401/403/404: the operator's key or name is wrong, not the
client's request) is retried ONCE: the request is routed again, with the same draw, over the models
not tried that are up, under the same budget (so never to a model the budget cannot pay for);
x-p2l-fallback says so. When nothing answers: 502 with the upstreams tried. An upstream that fails
--breaker-failures times in a row is skipped for --breaker-seconds (a circuit breaker: routing goes
over the others as if the models file held them alone; a request naming it gets 503), then one
request probes it. Upstream 400/413/422 (the client's request) pass through. A stream that fails
after its first event cannot move: it ends with an OpenAI error event. A client that hangs up closes
the upstream call (streamed or not). Requests: bad JSON, fields, text that is not valid Unicode (a
lone surrogate) or JSON nested deeper than 64 levels 400; unknown model 404; budget below the
cheapest model 400; body over --max-body-kb, or a leaderboard over --max-request-tokens, 413. Keys
(also one sent as ?api_key=) and prompt text never reach the log (--log-prompts adds the prompts).

Batching: concurrent requests share forward passes. A queue gathers requests for --batch-wait-ms
after the first, or up to --max-batch prompts and --max-batch-tokens tokens, and one worker thread
runs them while the event loop keeps streaming other answers: as one forward when their lengths are
alike, else as length-sorted groups whose padding stays under --max-padding (padding is wasted
compute; `bench.py serve` measures both modes). Chat decisions go before leaderboard prompts, so a big
leaderboard job delays a chat request by one small forward at most. A batch whose forward fails is
run again one prompt at a time: one bad prompt fails its own request only.
"""
import argparse
import asyncio
import collections
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from aggregate import aggregate, leaderboard_rows
from common import (
    HEAD_OF_LOSS, LOSSES, autodetect_device, checkpoint_config, encode_for, load_checkpoint, parse_turns, predict,
    rating, read_json_object, read_marginal,
)
from route import ROUTERS, route_one, solve_theta, win_rates

# serving dependencies (requirements-serve.txt): the training stages run without them
import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException


log = logging.getLogger("p2l.serve")
EXTRA_FIELDS = ("budget", "cost", "route_seed")  # ours: removed before a request goes upstream
RETRY_STATUS = {401, 403, 404, 408, 429} | set(range(500, 600))  # upstream faults; other 4xx are the client's
CHAT, LEADERBOARD = 0, 1  # forward-queue priorities: a chat decision never waits behind a leaderboard job
MAX_DEPTH = 64  # JSON nesting a request may use (OpenAI's bodies need ~6); deeper is refused, not recursed into
MAX_TRIES = 2  # upstream attempts per chat request: the routed model, then one re-route over the others
EXPLORER = Path(__file__).resolve().parent / "explorer.html"


class Problem(Exception):
    """An HTTP error answered in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, code a
    string or null (extra fields, such as the upstreams tried, go beside them)."""

    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None, **extra):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.extra = status, message, kind, param, code, extra


class UpstreamFault(Exception):
    """An upstream attempt that failed in a way worth retrying on another model."""

# -----------------------------------------------------------------------------
# start-up: the upstream table


def read_models(path, model_list):
    """--models -> {P2L name: {base_url, model, cost, key}} in the file's order; every bad value is
    an error naming the file and the model. Keys are read from the environment here, once."""
    ups = {}
    for name, u in read_json_object(path, "models file").items():
        if name.startswith("_"):
            continue
        where = f"{path}: {name!r}"
        if name not in model_list:  # most likely a typo: refuse instead of silently never routing there
            raise ValueError(f"{where} is not a model of the checkpoint (its {len(model_list)} models: "
                             f"{', '.join(model_list[:8])}{' ...' if len(model_list) > 8 else ''})")
        if not isinstance(u, dict):
            raise ValueError(f"{where} must be an object with base_url, model, cost, api_key_env")
        unknown = sorted(set(u) - {"base_url", "model", "cost", "api_key_env"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: base_url, model, cost, api_key_env)")
        base, model, cost, env = u.get("base_url"), u.get("model", name), u.get("cost"), u.get("api_key_env")
        if not isinstance(base, str) or not re.match(r"https?://[^/\s]+", base):
            raise ValueError(f"{where}: base_url must be an http(s) URL such as https://api.openai.com/v1, got {base!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{where}: model (the upstream's name for it) must be a non-empty string")
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
            raise ValueError(f"{where}: cost must be a finite number >= 0 per query, got {cost!r}")
        key = None
        if env is not None:
            if not isinstance(env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
                raise ValueError(f"{where}: api_key_env must NAME an environment variable (the key itself never "
                                 f"goes in this file)")
            key = os.environ.get(env)
            if not key:
                raise ValueError(f"{where}: environment variable {env} (its API key) is not set")
        ups[name] = {"base_url": base.rstrip("/"), "model": model, "cost": float(cost), "key": key}
    if not ups:
        raise ValueError(f"{path}: no models")
    return ups


def client_keys(args):
    """The client API keys from $--api-keys-env as sha256 digests (compared in constant time)."""
    raw = os.environ.get(args.api_keys_env, "")
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if args.no_auth:
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"--no-auth is only allowed on a loopback --host, not {args.host}")
        return None
    if not keys:
        raise ValueError(f"set {args.api_keys_env} to the client API keys (comma-separated), or pass --no-auth "
                         f"(loopback only)")
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def marginal_rows(checkpoint, model_list, loss):
    """The leaderboard the checkpoint's head started from (train.py's marginal.json), for the explorer;
    None when the checkpoint has none (the authors' released ones) or it is for other models."""
    mj = read_marginal(checkpoint) if checkpoint else None
    if not mj or mj.get("model_list") != model_list or not isinstance(mj.get("beta"), list):
        return None
    head = HEAD_OF_LOSS[loss]
    return leaderboard_rows(model_list, torch.tensor(mj["beta"], dtype=torch.float64),
                            mj.get("eta") if head != "bt" else None, head)

# -----------------------------------------------------------------------------
# the service: P2L behind a batching queue, Algorithm 1, the upstream table, one HTTP client


class Service:
    def __init__(self, model, tok, args, ups):
        self.model, self.tok, self.args, self.ups = model, tok, args, ups
        self.device = next(model.parameters()).device.type
        self.model_list = model.p2l["model_list"]
        self.loss = model.p2l["loss"]
        # the routable models in checkpoint order: β's columns, their costs, opponents uniform over them
        self.idx = [i for i, m in enumerate(self.model_list) if m in ups]
        self.names = [self.model_list[i] for i in self.idx]
        self.c = np.array([ups[m]["cost"] for m in self.names])
        self.q = np.full(len(self.idx), 1.0 / len(self.idx))
        self.cheap = int(np.argmin(self.c))
        self.router_names = {"p2l", args.name}
        self.rng = np.random.default_rng(args.seed)
        self.keys = None  # client key digests (None: --no-auth)
        self.ready = False
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="p2l-forward")  # one forward at a time
        # tokenization on its own single thread: it overlaps the forward, and a fast tokenizer must not be
        # entered from two threads at once
        self.tok_pool = ThreadPoolExecutor(1, thread_name_prefix="p2l-tokenize")
        self.stats = {"batches": 0, "forward_passes": 0, "prompts": 0, "largest_batch": 0}  # counters: memory stays flat
        # the circuit breaker: per upstream, consecutive failures, until when it is skipped, and whether
        # a half-open probe is in flight
        self.breaker = {m: {"fails": 0, "open_until": 0.0, "probe": False} for m in self.names}
        self.marginal = marginal_rows(args.checkpoint, self.model_list, self.loss)
        self.seq = itertools.count()  # arrival order inside a priority: the queue is FIFO per priority
        self.queue = self.worker = self.http = None

    def check_budget(self, budget, where):
        if budget < self.c[self.cheap]:
            raise Problem(400, f"{where} {budget:g} is below the cheapest model, {self.names[self.cheap]}, which costs "
                               f"{self.c[self.cheap]:g} per query", param="budget")
        return budget

    async def start(self):
        self.queue = asyncio.PriorityQueue()
        self.worker = asyncio.create_task(self.batch_loop())
        a = self.args
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(a.upstream_timeout, connect=a.connect_timeout),
                                      limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        await self.coefficients(["warm-up"])  # the first forward allocates; do it before /health says ready
        self.stats = dict.fromkeys(self.stats, 0)
        self.ready = True

    async def stop(self):
        self.ready = False
        if self.worker:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        if self.http:
            await self.http.aclose()
        self.pool.shutdown(wait=False)
        self.tok_pool.shutdown(wait=False)

    # -- batching -------------------------------------------------------------

    async def tokenize(self, prompts):
        """Token ids of each prompt (a list of user turns), as the model was trained to read them."""
        return await asyncio.get_running_loop().run_in_executor(self.tok_pool, encode_for, self.model, self.tok, prompts)

    async def coefficients(self, turns, priority=CHAT):
        """(β [M] float64 over the checkpoint's models, η or None) for one prompt, batched with others."""
        return await self.enqueue((await self.tokenize([turns]))[0], priority)

    async def enqueue(self, ids, priority):
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((priority, next(self.seq), ids, fut))
        return await fut

    async def batch_loop(self):
        while True:
            items = await self.gather_batch()
            if items:
                await self.run_batch(items)

    async def gather_batch(self):
        """The next batch: chat decisions before leaderboard prompts (the queue's priority), what is queued
        already, then whatever arrives within --batch-wait-ms, up to --max-batch prompts and
        --max-batch-tokens tokens (so one forward, and the chat requests behind it, never waits on a
        big leaderboard job: it runs as many small forwards)."""
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        tokens, deadline = len(items[0][2]), loop.time() + self.args.batch_wait_ms / 1000
        while len(items) < self.args.max_batch:
            try:
                it = (self.queue.get_nowait() if deadline <= loop.time() else
                      await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if tokens + len(it[2]) > self.args.max_batch_tokens:
                self.queue.put_nowait(it)  # keeps its place: (priority, arrival)
                break
            items.append(it)
            tokens += len(it[2])
        return [it for it in items if not it[3].done()]  # a cancelled request needs no forward

    async def run_batch(self, items):
        """One forward for the batch. When it fails, each prompt runs again alone, so that one bad prompt
        fails only its own request."""
        try:
            beta, eta = await asyncio.get_running_loop().run_in_executor(self.pool, self.forward, [it[2] for it in items])
        except Exception as e:  # noqa: BLE001 - the waiting requests get the error, the loop lives on
            if len(items) > 1:
                log.warning(f"a batch of {len(items)} prompts failed ({type(e).__name__}); running them one by one")
                for it in items:
                    await self.run_batch([it])
            elif not items[0][3].done():
                items[0][3].set_exception(e)
            return
        st = self.stats
        st["batches"] += 1
        st["prompts"] += len(items)
        st["largest_batch"] = max(st["largest_batch"], len(items))
        for k, it in enumerate(items):
            if not it[3].done():
                it[3].set_result((beta[k], eta[k]))

    def forward(self, ids):
        """One gathered batch of token ids. Real prompts differ in length (AlpacaEval's: 12 to 256+ tokens), and
        one padded tensor for all of them spends most of its compute on padding; so the batch runs as
        length-sorted groups whose padding stays under --max-padding of their tokens (a group per forward pass)."""
        groups, cur = [], []
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
            real = sum(len(ids[k]) for k in cur) + len(ids[i])  # sorted: ids[i] is the longest, all pad to it
            if cur and (len(cur) + 1) * len(ids[i]) > (1 + self.args.max_padding) * real:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        beta, eta = [None] * len(ids), [None] * len(ids)
        for g in groups:
            b, e = predict(self.model, [ids[i] for i in g], self.tok.pad_token_id, batch_size=len(g), device=self.device)
            for k, i in enumerate(g):
                beta[i], eta[i] = b[k].double().numpy(), (None if e is None else float(e[k]))
        self.stats["forward_passes"] += len(groups)
        return beta, eta

    # -- routing (Algorithm 1 is route.route_one: one prompt, one budget, one draw) ------------------

    def decide(self, beta_all, budget, seed=None, down=(), u=None):
        """π over the routable models that are up (not in `down`) for one prompt's β, and the model
        drawn from it with u (default: from route_seed, else the server's generator). The models that
        are up route as if the models file held them alone (β, costs and opponents q restricted to
        them), under the same budget; None when none of them is affordable."""
        keep = [k for k, m in enumerate(self.names) if m not in down]
        if not keep or self.c[keep].min() > budget:
            return None
        b, c, q = beta_all[self.idx][keep], self.c[keep], (self.q if len(keep) == len(self.names) else
                                                            np.full(len(keep), 1.0 / len(keep)))
        i, j, w, R = route_one(self.args.router, b, q, c, budget)
        if u is None:
            u = np.random.default_rng(seed).random() if seed is not None else self.rng.random()
        chosen = i if (w >= 0.5 if self.args.deterministic else u < w) else j  # route.py's rule
        theta = float(b[i]) if w == 1 else solve_theta(b, q, R)
        names = [self.names[k] for k in keep]
        pi = {names[i]: round(w, 6)} | ({names[j]: round(1 - w, 6)} if w < 1 else {})
        return {"pi": pi, "chosen": names[chosen], "expected_cost": w * c[i] + (1 - w) * c[j], "win_rate": float(R),
                "theta": theta, "rating": float(rating(theta)), "budget": budget, "u": u}

    async def route(self, turns, budget, seed=None):
        beta, _ = await self.coefficients(turns)
        return self.decide(beta, budget, seed)

    def frontier(self, beta_all, down=()):
        """The routable models that are up, with cost and predicted win rate against q (Wq), and the
        cost–quality frontier: the upper concave hull of those points, on which every decision of the
        optimal router lies (π mixes two neighbours on it)."""
        keep = [k for k, m in enumerate(self.names) if m not in down]
        b, c = beta_all[self.idx][keep], self.c[keep]
        s = win_rates(b[None], np.full(len(keep), 1.0 / len(keep)))[0] if keep else np.zeros(0)
        hull = []
        for k in sorted(range(len(keep)), key=lambda k: (c[k], -s[k])):
            if hull and s[k] <= s[hull[-1]]:
                continue  # no better than a cheaper model: dominated
            while len(hull) >= 2 and ((s[hull[-1]] - s[hull[-2]]) * (c[k] - c[hull[-2]]) <=
                                      (s[k] - s[hull[-2]]) * (c[hull[-1]] - c[hull[-2]])):
                hull.pop()  # on or below the chord from the vertex before it to k
            hull.append(k)
        rows = [{"model": self.names[k], "cost": float(c[n]), "win_rate": float(s[n]), "coefficient": float(b[n]),
                 "rating": round(float(rating(b[n])), 2)} for n, k in enumerate(keep)]
        return rows, [rows[n]["model"] for n in hull]

    # -- the circuit breaker: a failing upstream is skipped for --breaker-seconds, then one probe ----------

    def down(self):
        """The upstreams routing skips now: open circuits, and half-open ones whose probe is in flight."""
        now, k = time.monotonic(), self.args.breaker_failures
        return {m for m, s in self.breaker.items() if s["fails"] >= k and (now < s["open_until"] or s["probe"])}

    async def call(self, name, payload, stream, request=None):
        """attempt() with the breaker's bookkeeping; a non-streamed call is cancelled when the client hangs up."""
        s = self.breaker.get(name)
        probe = s is not None and s["fails"] >= self.args.breaker_failures
        if probe:
            s["probe"] = True  # half-open: this call is the probe, the others keep skipping the model
        ok = None
        try:
            work = self.attempt(name, payload, stream)
            got = await (work if stream or request is None else until_disconnect(request, work))
            ok = True
            return got
        except UpstreamFault:
            ok = False
            raise
        finally:
            if s is not None:
                s["probe"] = False
                if ok is not None:
                    s["fails"] = 0 if ok else s["fails"] + 1
                if ok is False and s["fails"] >= self.args.breaker_failures:
                    s["open_until"] = time.monotonic() + self.args.breaker_seconds
                    log.warning(f"upstream {name}: {s['fails']} failures in a row; skipped for "
                                f"{self.args.breaker_seconds:g} s")

    # -- upstreams --------------------------------------------------------------

    async def attempt(self, name, payload, stream):
        """One upstream call. Non-streaming: the answer (a dict). Streaming: (response, line iterator,
        the lines up to the first data event), so a stream that dies before its first event can still
        move to another model. Raises UpstreamFault on a retryable failure; returns ("pass", status,
        body) when the upstream rejected the client's request itself."""
        up, timeout = self.ups[name], self.args.upstream_timeout
        headers = {"Authorization": f"Bearer {up['key']}"} if up["key"] else {}
        req = self.http.build_request("POST", up["base_url"] + "/chat/completions",
                                      json={**payload, "model": up["model"]}, headers=headers)
        try:
            resp = await asyncio.wait_for(self.http.send(req, stream=True), timeout)
        except (httpx.HTTPError, asyncio.TimeoutError) as e:
            raise UpstreamFault(describe(e, timeout)) from None
        keep = False  # the response stays open only when a stream is handed on
        try:
            if resp.status_code >= 400:
                raw = await asyncio.wait_for(resp.aread(), timeout)
                if resp.status_code in RETRY_STATUS:
                    raise UpstreamFault(f"HTTP {resp.status_code}")
                try:
                    return "pass", resp.status_code, json.loads(raw)
                except ValueError:
                    return "pass", resp.status_code, {"error": {"message": raw[:2000].decode(errors="replace"),
                                                                "type": "upstream_error"}}
            if not stream:
                try:
                    obj = json.loads(await asyncio.wait_for(resp.aread(), timeout))
                except ValueError:
                    raise UpstreamFault("answer is not JSON") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
                    raise UpstreamFault("answer is not a chat completion")
                return {**obj, "model": name}
            lines, first = resp.aiter_lines(), []
            while not (first and first[-1].startswith("data:")):
                try:
                    first.append(await asyncio.wait_for(anext(lines), timeout))
                except StopAsyncIteration:
                    raise UpstreamFault("stream ended before its first event") from None
            keep = True
            return resp, lines, first
        except (httpx.HTTPError, asyncio.TimeoutError) as e:
            raise UpstreamFault(describe(e, timeout)) from None
        finally:
            if not keep:
                await resp.aclose()

    async def relay(self, name, resp, lines, first, done):
        """The upstream's SSE events with `model` set to `name`; closes the upstream stream however it ends
        (the client hung up: this generator is cancelled, and the close is shielded from that)."""
        status = "client-hung-up"  # unless the loop below ends otherwise
        try:
            for line in first:
                if (out := sse(line, name)) is not None:
                    yield out
            async for line in lines:
                if (out := sse(line, name)) is not None:
                    yield out
            status = 200
        except (httpx.HTTPError, asyncio.TimeoutError) as e:  # after the first event: too late to move
            status = "upstream-broke-mid-stream"
            yield sse_error(f"upstream {name} failed mid-stream: {describe(e, self.args.upstream_timeout)}")
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
            done(status)


def describe(e, timeout):
    if isinstance(e, (asyncio.TimeoutError, httpx.TimeoutException)):
        return f"timed out ({type(e).__name__}, limit {timeout:g} s)"
    return f"{type(e).__name__}"  # the message may quote the URL; the type says enough


def jnum(x):
    return x if math.isfinite(x) else str(x)  # valid JSON: no Infinity


def sse(line, name):
    if not line.startswith("data:"):
        return None  # blank separators, comments, event names: we frame events ourselves
    data = line[5:].strip()
    if data != "[DONE]":
        with contextlib.suppress(ValueError):
            obj = json.loads(data)
            if isinstance(obj, dict) and "model" in obj:
                data = json.dumps({**obj, "model": name}, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def sse_error(message):
    return f"data: {json.dumps({'error': {'message': message, 'type': 'upstream_error'}})}\n\n".encode()

# -----------------------------------------------------------------------------
# requests: auth, size, fields


def check_key(svc, request):
    if svc.keys is None:
        return
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer ") or not auth[7:].strip():
        raise Problem(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
    got = hashlib.sha256(auth[7:].strip().encode(errors="replace")).digest()
    if not any([hmac.compare_digest(got, k) for k in svc.keys]):  # a list: every key compared, no early exit
        raise Problem(401, "invalid API key", code="invalid_api_key")  # OpenAI's status and code for a wrong key


async def read_json(svc, request):
    limit = svc.args.max_body_kb * 1024
    if int(request.headers.get("content-length") or 0) > limit:
        raise Problem(413, f"request body over {svc.args.max_body_kb} KiB (--max-body-kb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Problem(413, f"request body over {svc.args.max_body_kb} KiB (--max-body-kb)")
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise Problem(400, f"body is not valid JSON: {e}") from None
    except RecursionError:  # the decoder recurses per level: 100k '[' would exhaust the stack
        raise Problem(400, f"body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not isinstance(obj, dict):
        raise Problem(400, "body must be a JSON object")
    check_tree(obj)
    return obj


def check_tree(obj):
    """Refuse, before any of it is used, a body nested deeper than MAX_DEPTH (json.dumps and the handlers
    recurse) or holding text that is not valid Unicode: a lone surrogate such as "\\ud800", which a
    JSON escape can carry and no tokenizer or UTF-8 encoder accepts. Iterative: no recursion to exhaust."""
    stack = [(obj, "body", 0)]
    while stack:
        x, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Problem(400, f"body is nested too deeply (at most {MAX_DEPTH} levels)")
        if isinstance(x, str):
            check_text(x, where)
        elif isinstance(x, dict):
            for k, v in x.items():
                check_text(k, f"a key of {where}")
                stack.append((v, f"{where}.{k}" if where != "body" else k, depth + 1))
        elif isinstance(x, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x))


def check_text(text, where):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # the message shows the code point escaped: never the surrogate itself
        raise Problem(400, f"{where}: text is not valid Unicode: a lone surrogate \\u{ord(text[e.start]):04x} at "
                           f"character {e.start} (a character cut in half; send whole UTF-16 pairs or UTF-8)",
                      param=where, code="invalid_unicode") from None


async def until_disconnect(request, work):
    """Await `work`, but cancel it (and with it the upstream call, which then is not paid to the end) when
    the client hangs up first. Once the body is read, receive() returns only at the disconnect."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError, UpstreamFault):
        await task
    raise Problem(499, "the client closed the request", code="client_closed")  # nginx's status: no one reads it


async def disconnected(request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def user_turns(messages):
    """The text of the user turns (what P2L reads), checking the messages' shape."""
    if not isinstance(messages, list) or not messages:
        raise Problem(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Problem(400, f"messages[{k}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: P2L reads the text ones
            if not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content):
                raise Problem(400, f"messages[{k}].content parts must be objects with a 'type'", param="messages")
            content = "\n".join(p["text"] for p in content if p["type"] == "text" and isinstance(p.get("text"), str))
        elif content is not None and not isinstance(content, str):
            raise Problem(400, f"messages[{k}].content must be a string or a list of content parts", param="messages")
        if m["role"] == "user" and content and content.strip():
            turns.append(content)
    return turns


def number(body, key, integer=False):
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    if isinstance(v, bool) or not ok or (integer and v < 0):
        raise Problem(400, f"'{key}' must be {'an integer >= 0' if integer else 'a finite number'}, got {v!r}", param=key)
    return v

# -----------------------------------------------------------------------------
# the app


def build_app(svc):
    """The FastAPI app: the handlers below, with svc in app.state; svc starts and stops with the server.
    No /docs or /openapi.json: they would describe the API to anyone without a key."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        redact = logging.getLogger("uvicorn.access")
        if not any(isinstance(f, RedactQuery) for f in redact.filters):
            redact.addFilter(RedactQuery())  # here: after uvicorn has configured its loggers
        await svc.start()
        yield
        await svc.stop()

    app = FastAPI(title="P2L router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.svc = svc
    app.state.page = EXPLORER.read_bytes()  # static: it holds no data, every call it makes carries the user's key
    app.add_exception_handler(Problem, problem)
    app.add_exception_handler(HTTPException, http_problem)  # unknown path, wrong method
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(Exception, server_problem)  # whatever is left: still OpenAI's shape
    app.add_api_route("/", explorer, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/leaderboard", leaderboard, methods=["POST"])
    app.add_api_route("/v1/route", route_decision, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    return app


class RedactQuery(logging.Filter):
    """uvicorn's access log writes the path with its query string, where a client may have put a key
    (?api_key=...): log the path alone."""

    def filter(self, record):
        if isinstance(record.args, tuple) and len(record.args) >= 3 and "?" in str(record.args[2]):
            record.args = record.args[:2] + (str(record.args[2]).split("?")[0] + "?<redacted>",) + record.args[3:]
        return True


async def problem(request, e):
    error = {"message": e.message, "type": e.kind, "param": e.param, "code": e.code, **e.extra}
    return JSONResponse({"error": error}, e.status)


async def http_problem(request, e):
    if e.status_code == 404:
        msg, code = f"unknown URL ({request.method} {request.url.path})", "unknown_url"
    elif e.status_code == 405:
        msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
    else:
        msg, code = str(e.detail), None
    return await problem(request, Problem(e.status_code, msg, code=code))


async def bad_request(request, e):
    return await problem(request, Problem(400, "bad request"))


async def server_problem(request, e):
    log.error(f"{request.method} {request.url.path}: {type(e).__name__} (traceback below)")
    return await problem(request, Problem(500, f"internal error ({type(e).__name__}); the server's log has the details",
                                          "server_error"))


async def explorer(request: Request):
    # the page may talk to this server only: nothing typed into it can be sent anywhere else
    csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(request.app.state.page, headers={"content-security-policy": csp, "cache-control": "no-store"})


async def health(request: Request):
    svc = request.app.state.svc  # open to all: counts only, no paths, names or keys
    body = {"status": "ok" if svc.ready else "starting", "model_loaded": True, "routable": len(svc.names),
            "upstreams_down": len(svc.down()), "router": svc.args.name, **svc.stats}
    return JSONResponse(body, 200 if svc.ready else 503)


async def models(request: Request):
    svc, args = request.app.state.svc, request.app.state.svc.args
    check_key(svc, request)
    data = [{"id": args.name, "object": "model", "created": 0, "owned_by": "p2l",
             "routes_over": svc.names, "budget": jnum(args.budget), "max_budget": jnum(args.max_budget)}]
    data += [{"id": m, "object": "model", "created": 0, "owned_by": "p2l", "cost": svc.ups[m]["cost"]} for m in svc.names]
    return {"object": "list", "data": data}


def read_prompt_list(svc, body):
    """/v1/leaderboard's prompts: {"prompt": p} or {"prompts": [p, ...]}, p a string or a list of user turns."""
    if ("prompt" in body) == ("prompts" in body):
        raise Problem(400, "send 'prompt' (a string or a list of user turns) or 'prompts' (a list of those)")
    raw = [body["prompt"]] if "prompt" in body else body["prompts"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= svc.args.max_prompts:
        raise Problem(400, f"'prompts' must be a list of 1 to {svc.args.max_prompts} prompts (--max-prompts)")
    try:
        return [parse_turns({"prompt": p}, f"prompts[{k}]") for k, p in enumerate(raw)]
    except ValueError as e:
        raise Problem(400, str(e)) from None


async def leaderboard(request: Request):
    svc = request.app.state.svc
    check_key(svc, request)
    prompts = read_prompt_list(svc, await read_json(svc, request))
    ids = await svc.tokenize(prompts)
    tokens = sum(map(len, ids))  # after truncation to the model's max_len: what the forwards will cost
    if tokens > svc.args.max_request_tokens:
        raise Problem(413, f"these prompts are {tokens} tokens, over this server's {svc.args.max_request_tokens} per "
                           f"request (--max-request-tokens): send them in several requests", code="too_many_tokens")
    # each prompt queues on its own behind every chat decision; forwards take them a few at a time
    got = await asyncio.gather(*(svc.enqueue(x, LEADERBOARD) for x in ids))
    beta = torch.from_numpy(np.stack([g[0] for g in got]))
    eta = torch.tensor([g[1] for g in got], dtype=torch.float64) if got[0][1] is not None else None
    head = HEAD_OF_LOSS[svc.loss]
    bb, ee = await asyncio.to_thread(aggregate, beta, eta, svc.loss)  # aggregate.py --prompt's computation
    rows = leaderboard_rows(svc.model_list, bb, ee if head != "bt" else None, head)
    per = [{"coefficients": dict(zip(svc.model_list, map(float, g[0]))),
            "ratings": {m: round(float(rating(x)), 2) for m, x in zip(svc.model_list, g[0])}}
           | ({"eta": g[1]} if g[1] is not None else {}) for g in got]
    return {"models": svc.model_list, "loss": svc.loss, "prompts": per, "leaderboard": rows,
            "marginal": svc.marginal, "tokens": tokens, **({"eta": ee} if head != "bt" else {})}


async def route_decision(request: Request):
    """{"prompt": p, "budget": B}: the router's decision for p under B (π, expected cost, win rate, θ and its
    rating), without a draw or an upstream call, and the cost–quality frontier of the routable models
    that are up. The explorer page's budget slider calls it."""
    svc, args = request.app.state.svc, request.app.state.svc.args
    check_key(svc, request)
    body = await read_json(svc, request)
    turns = read_prompt_list(svc, {"prompt": body.get("prompt")})[0]
    budget = number(body, "budget")
    budget = args.budget if budget is None else budget
    if budget > args.max_budget:
        raise Problem(400, f"budget {budget:g} is above this server's limit of {args.max_budget:g} per query "
                           f"(--max-budget)", param="budget")
    svc.check_budget(budget, "budget")
    beta, _ = await svc.coefficients(turns)
    down = svc.down()
    d = svc.decide(beta, budget, down=down, u=0.5)
    rows, hull = svc.frontier(beta, down)
    decision = None if d is None else {k: v for k, v in d.items() if k not in ("chosen", "u")}
    return {"decision": decision, "models": rows, "frontier": hull, "down": sorted(down), "router": args.router,
            "budget_range": [float(svc.c.min()), jnum(args.max_budget)]}


async def chat(request: Request):
    svc = request.app.state.svc
    t0 = time.perf_counter()
    check_key(svc, request)
    body = await read_json(svc, request)
    model, stream, turns, budget, seed = chat_fields(body)
    payload = {k: v for k, v in body.items() if k not in EXTRA_FIELDS}
    beta, d = await plan(svc, model, turns, budget, seed)
    try:
        name, got, d, failed = await try_upstreams(svc, request, model, beta, d, payload, stream)
    except Problem as e:
        note(svc, d, model, None, e.extra.get("tried", []), e.status, t0, turns)
        raise
    headers = routing_headers(svc, d, name, failed)
    if isinstance(got, tuple) and got[0] == "pass":
        note(svc, d, model, name, failed, got[1], t0, turns)
        return JSONResponse(got[2], got[1], headers=headers)
    if not stream:
        note(svc, d, model, name, failed, 200, t0, turns)
        return JSONResponse(got, headers=headers)
    resp, lines, first = got
    done = lambda status: note(svc, d, model, name, failed, status, t0, turns)
    return StreamingResponse(svc.relay(name, resp, lines, first, done), media_type="text/event-stream",
                             headers=headers)


def chat_fields(body):
    """(model, stream, user turns, budget or None, route_seed or None) of a chat request, checked."""
    model, stream = body.get("model"), body.get("stream", False)
    if not isinstance(model, str) or not model:
        raise Problem(400, "'model' is required: 'p2l' to route, or a model name", param="model")
    if not isinstance(stream, bool):
        raise Problem(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    turns = user_turns(body.get("messages"))
    if "budget" in body and "cost" in body:
        raise Problem(400, "send 'budget' or 'cost' (the same thing), not both", param="budget")
    budget = number(body, "budget") if "budget" in body else number(body, "cost")
    return model, stream, turns, budget, number(body, "route_seed", integer=True)


async def plan(svc, model, turns, budget, seed):
    """(β, the decision) for a routed request: P2L's draw from π over the upstreams that are up; (None,
    None) for a request to one model by name."""
    args = svc.args
    if model in svc.ups:
        if model in svc.down():
            raise Problem(503, f"upstream {model} is failing; it is skipped for up to {args.breaker_seconds:g} s "
                               f"(use {args.name!r} to route around it)", "upstream_error", code="upstream_down")
        return None, None
    if model not in svc.router_names:
        raise Problem(404, f"model {model!r} not found: use {args.name!r} (or 'p2l') to route, or one of "
                           f"{', '.join(svc.names)}", "not_found_error", param="model", code="model_not_found")
    if not turns:
        raise Problem(400, "no user message with text: P2L routes on the user turns", param="messages")
    if budget is None:
        budget = args.budget
    elif budget > args.max_budget:
        raise Problem(400, f"budget {budget:g} is above this server's limit of {args.max_budget:g} per query "
                           f"(--max-budget)", param="budget")
    beta, _ = await svc.coefficients(turns)
    down = svc.down()
    d = svc.decide(beta, svc.check_budget(budget, "budget"), seed, down=down)
    if d is None:
        raise Problem(503, f"every model within the budget {budget:g} is failing ({', '.join(sorted(down))}); "
                           f"try again later or with a larger budget", "upstream_error", code="upstreams_down")
    return beta, d


async def try_upstreams(svc, request, model, beta, d, payload, stream):
    """(who answered, their answer, the decision it was drawn from, the failures before it). A routed
    request whose model fails is routed again, with the same draw u, over the models that are up and
    not tried yet, under the same budget: never to a model the budget cannot pay for."""
    failed, name = [], model if d is None else d["chosen"]
    while True:
        try:
            return name, await svc.call(name, payload, stream, request), d, failed
        except UpstreamFault as e:
            failed.append({"model": name, "error": str(e)})
        if d is None or len(failed) >= MAX_TRIES:
            break
        d2 = svc.decide(beta, d["budget"], down=svc.down() | {f["model"] for f in failed}, u=d["u"])
        if d2 is None:
            break
        d, name = d2, d2["chosen"]
    msg = "no upstream answered: " + "; ".join(f"{f['model']} ({f['error']})" for f in failed)
    if d is not None and len(failed) < MAX_TRIES:
        msg += f" (no other model within the budget {d['budget']:g} is up)"
    raise Problem(502, msg, "upstream_error", tried=failed)


def routing_headers(svc, d, name, failed):
    """x-p2l-*: who answered and what that cost; for a routed request, the decision it was drawn from
    (after a re-route: the decision over the models left, whose expected cost is within the budget)."""
    h = {"x-p2l-model": name, "x-p2l-cost": f"{svc.ups[name]['cost']:g}"}
    if failed:
        h["x-p2l-fallback"] = f"{failed[0]['model']} failed ({failed[0]['error']}); answered by {name}"
    if d is not None:
        h |= {"x-p2l-pi": json.dumps(d["pi"]), "x-p2l-theta": f"{d['theta']:.6f}", "x-p2l-rating": f"{d['rating']:.2f}",
              "x-p2l-win-rate": f"{d['win_rate']:.6f}", "x-p2l-expected-cost": f"{d['expected_cost']:.6g}",
              "x-p2l-budget": f"{d['budget']:g}", "x-p2l-router": svc.args.name}
    return h


def note(svc, d, asked, answered, failed, status, t0, turns):
    """One log line per chat request: no keys, no prompt text unless --log-prompts."""
    msg = f"chat model={asked} answered_by={answered} status={status} ms={1000 * (time.perf_counter() - t0):.1f}"
    if d:
        msg += f" pi={json.dumps(d['pi'])} budget={d['budget']:g}"
    if failed:
        msg += f" failed={json.dumps(failed)}"
    if svc.args.log_prompts:
        msg += f" prompt={json.dumps(turns, ensure_ascii=False)}"
    log.info(msg)

# -----------------------------------------------------------------------------
# a stand-in upstream: try the router without keys, and the tests' faults


def fake_upstream_app():
    """An OpenAI-compatible upstream on http://HOST:PORT/<behaviour>/v1. It answers "[<upstream model>]
    <last user turn>", streamed word by word or not. behaviour: ok; fail (HTTP 500); slow (answers
    after 30 s); cut (streams two words, then drops the connection); trickle (streams 200 chunks,
    one per 50 ms). app.state.seen records each request (in memory), app.state.hung_up the streams
    whose client went away before the end, app.state.abandoned the slow requests whose client did."""
    app = FastAPI(title="fake upstream")
    app.state.seen, app.state.hung_up, app.state.abandoned = collections.deque(maxlen=1000), [], []

    @app.post("/{behaviour}/v1/chat/completions")
    async def chat(behaviour: str, request: Request):
        body = await request.json()
        app.state.seen.append({"behaviour": behaviour, "model": body.get("model"), "body": body,
                               "authorization": request.headers.get("authorization")})
        if behaviour == "fail":
            return JSONResponse({"error": {"message": "fake upstream failure", "type": "server_error"}}, 500)
        if behaviour == "slow":
            for _ in range(600):  # 30 s, noticing a client that goes away
                if await request.is_disconnected():
                    app.state.abandoned.append(time.time())
                    return JSONResponse({}, 499)
                await asyncio.sleep(0.05)
        user = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
        answer = f"[{body.get('model')}] {user[-1] if user else ''}"
        base = {"id": f"chatcmpl-fake-{len(app.state.seen)}", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            return {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(answer.split()), "total_tokens": 1 + len(answer.split())}}
        words = [f"tick{k} " for k in range(200)] if behaviour == "trickle" else answer.split(" ")

        def chunk(delta, finish=None):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

        async def events():
            finished = False
            try:
                for k, w in enumerate(words):
                    if behaviour == "cut" and k == 2:
                        raise ConnectionAbortedError("fake upstream drops the connection mid-stream")
                    text = w if k == len(words) - 1 or behaviour == "trickle" else w + " "
                    yield chunk(({"role": "assistant"} if k == 0 else {}) | {"content": text})
                    if behaviour == "trickle":
                        await asyncio.sleep(0.05)
                yield chunk({}, "stop")
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished and behaviour != "cut":
                    app.state.hung_up.append(time.time())

        return StreamingResponse(events(), media_type="text/event-stream")

    return app

# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    router = p.add_argument_group("the router: the checkpoint, the upstreams it routes over, and the budget")
    router.add_argument("--checkpoint", help="P2L checkpoint dir (train.py's --out, or the authors' layout with --loss)")
    router.add_argument("--loss", choices=LOSSES, help="only for checkpoints without a p2l section (the authors' released ones)")
    router.add_argument("--models", help="JSON {P2L model: {base_url, model, cost, api_key_env}}: the upstreams; only these are routable")
    router.add_argument("--budget", type=float, help="default expected cost per query (units of the models file's costs; inf: "
                        "unconstrained); a request may send its own 'budget'")
    router.add_argument("--max-budget", type=float, help="the most a request may ask to spend per query (default: --budget, "
                        "so clients can only spend less than the operator's default)")
    router.add_argument("--router", default="optimal", choices=ROUTERS, help="as route.py: optimal is "
                        "the paper's (max predicted win rate), simple max Σπβ, strict the best single affordable model")
    router.add_argument("--deterministic", action="store_true", help="route to argmax π instead of sampling (then the budget "
                        "holds per request only for single-model π, not on average)")
    router.add_argument("--seed", type=int, default=0, help="seeds the server's draws from π (requests without route_seed)")
    router.add_argument("--name", default="p2l-router", help="the router's model name in /v1/models ('p2l' always works too)")
    server = p.add_argument_group("the server and what a request may ask")
    server.add_argument("--host", default="127.0.0.1", help="bind address; loopback by default (put a TLS proxy in front "
                        "before exposing it)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-keys-env", default="P2L_API_KEYS", help="environment variable with the client keys, "
                        "comma-separated (keys never go on the command line, where `ps` shows them)")
    server.add_argument("--no-auth", action="store_true", help="accept requests without a key (loopback --host only)")
    server.add_argument("--max-body-kb", type=int, default=1024, help="larger request bodies get 413")
    server.add_argument("--max-prompts", type=int, default=256, help="most prompts per /v1/leaderboard request")
    server.add_argument("--max-request-tokens", type=int, default=65536, help="most tokens (after truncation to the "
                        "model's max_len) per /v1/leaderboard request: a bigger job is refused (413), not left to stall the queue")
    server.add_argument("--log-prompts", action="store_true", help="also log each request's user turns (off: no prompt text in logs)")
    upstreams = p.add_argument_group("the upstreams: timeouts and the circuit breaker")
    upstreams.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an upstream before trying the fallback")
    upstreams.add_argument("--upstream-timeout", type=float, default=120.0, help="seconds an upstream may take to answer (or "
                           "between two streamed chunks) before it counts as down")
    upstreams.add_argument("--breaker-failures", type=int, default=3, help="an upstream that fails this many times in a row "
                           "is skipped (routing goes over the others, under the same budget) ...")
    upstreams.add_argument("--breaker-seconds", type=float, default=30.0, help="... for this long; then one request probes "
                           "it, and a success brings it back")
    upstreams.add_argument("--fake-upstream", action="store_true", help="run the stand-in upstream instead (fake_upstream_app) on --port")
    batching = p.add_argument_group("batching prompts into P2L forward passes")
    batching.add_argument("--max-batch-tokens", type=int, default=4096, help="most tokens in one gathered batch: a large "
                          "leaderboard job runs as many small forwards, and chat decisions, which go first, wait for one at most")
    batching.add_argument("--max-batch", type=int, default=32, help="most prompts in one P2L forward pass")
    batching.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long the first request of a batch waits for "
                          "others: more gathers bigger batches under load, but adds up to this much latency when idle")
    batching.add_argument("--max-padding", type=float, default=0.25, help="a gathered batch runs as length-sorted groups "
                          "whose padding is at most this fraction of their tokens (padding is wasted compute)")
    args = p.parse_args(argv)
    if args.fake_upstream:
        return args
    if not args.checkpoint:
        p.error("--checkpoint is required")
    if not args.models or args.budget is None:
        p.error("--models and --budget are required (or --fake-upstream)")
    if args.budget is not None and (math.isnan(args.budget) or args.budget < 0):
        p.error("--budget must be a number >= 0")
    if args.max_budget is None:
        args.max_budget = args.budget
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        p.error("--max-batch must be >= 1 and --batch-wait-ms >= 0")
    if min(args.max_request_tokens, args.max_batch_tokens, args.breaker_failures) < 1 or not args.breaker_seconds >= 0:
        p.error("--max-request-tokens, --max-batch-tokens and --breaker-failures must be >= 1, --breaker-seconds >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.fake_upstream:
        uvicorn.run(fake_upstream_app(), host=args.host, port=args.port, log_level="warning")
        return
    try:  # everything that can fail on bad input fails before the model loads
        ml = checkpoint_config(args.checkpoint)[0]["model_list"]
        ups = read_models(args.models, ml) if args.models else None
        if ups and args.budget is not None:
            cheap = min(ups, key=lambda m: ups[m]["cost"])
            if args.budget < ups[cheap]["cost"]:
                raise ValueError(f"--budget {args.budget:g} is infeasible: the cheapest model, {cheap}, costs "
                                 f"{ups[cheap]['cost']:g} per query ({args.models})")
        keys = client_keys(args)
        model, tok = load_checkpoint(args.checkpoint, loss=args.loss)
        model = model.to(autodetect_device())
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    svc = Service(model, tok, args, ups)
    svc.keys = keys
    left = [m for m in ml if m not in ups]
    log.info(f"{len(svc.names)} of the checkpoint's {len(ml)} models are routable (cost {svc.c.min():g} to "
             f"{svc.c.max():g}); budget {args.budget:g} per query, requests may ask up to {args.max_budget:g}")
    if left:
        log.info(f"not routable (no upstream in {args.models}): {', '.join(left)}")
    log.info(f"serving {args.name} on http://{args.host}:{args.port}/v1 ({'no auth' if keys is None else f'keys from ${args.api_keys_env}'})")
    uvicorn.run(build_app(svc), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
