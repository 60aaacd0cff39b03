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

Endpoints (all but /health need `Authorization: Bearer KEY`, KEY one of $P2L_API_KEYS, comma-separated):
  POST /v1/chat/completions  OpenAI chat, streamed or not. model "p2l" (or --name) routes: P2L reads the
        user turns, Algorithm 1 gives π under the budget, one model is sampled from π (argmax with
        --deterministic) and the request goes there. Any other routable name goes straight to it.
        Extra body fields (removed before forwarding): `budget` (per query; `cost` is accepted, the
        authors' name) within [cheapest model, --max-budget]; `route_seed` (int): sample with
        u = default_rng(route_seed).random(), the draw route.py --seed route_seed makes for a
        one-prompt file; without it the server's generator (seeded by --seed) draws in decision order.
        Response: the upstream's answer with `model` set to the routed model, and the headers
        x-p2l-model (who answered), x-p2l-pi (JSON), x-p2l-theta, x-p2l-rating, x-p2l-win-rate,
        x-p2l-expected-cost, x-p2l-budget, x-p2l-cost (of the model that answered), x-p2l-fallback.
  GET  /v1/models       the router and the routable models (with their cost)
  POST /v1/leaderboard  {"prompt": str | [turns]} or {"prompts": [...]}: each prompt's coefficients and
        ratings, and the leaderboard of the set, as aggregate.py --prompt computes it
  GET  /health          200 when the model is loaded (and warmed up) and the upstream table was read

Faults: an upstream that cannot connect, times out (--connect-timeout, --upstream-timeout), drops
the connection, or answers 408/429/5xx (or 401/403/404: the operator's key or name is wrong, not the
client's request) is retried ONCE: on the other model of π when π mixes two, else on the best
remaining model whose cost is within the budget; x-p2l-fallback says so. When nothing answers: 502
with the upstreams tried. Upstream 400/413/422 (the client's request) pass through. A stream that
fails after its first event cannot move: it ends with an OpenAI error event. A client that hangs up
mid-stream closes the upstream stream. Requests: bad JSON or fields 400, unknown model 404, budget
below the cheapest model 400, body over --max-body-kb 413. Keys and prompt text never reach the log
(--log-prompts adds the prompts).

Batching: concurrent requests share forward passes. A queue gathers requests for --batch-wait-ms
after the first, or up to --max-batch, and one worker thread runs them while the event loop keeps
streaming other answers: as one forward when their lengths are alike, else as length-sorted groups
whose padding stays under --max-padding (padding is wasted compute; `bench.py serve` measures both modes).
"""
import argparse
import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from aggregate import aggregate, leaderboard_rows
from common import (
    HEAD_OF_LOSS, LOSSES, autodetect_device, checkpoint_config, encode_for, load_checkpoint, parse_turns, predict,
    rating, read_json_object,
)
from route import ROUTERS, route_one, solve_theta

# serving dependencies (requirements-serve.txt): the training stages run without them
import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

log = logging.getLogger("p2l.serve")
EXTRA_FIELDS = ("budget", "cost", "route_seed")  # ours: removed before a request goes upstream
RETRY_STATUS = {401, 403, 404, 408, 429} | set(range(500, 600))  # upstream faults; other 4xx are the client's


class Problem(Exception):
    """An HTTP error answered in OpenAI's error shape: {"error": {"message", "type", "code", ...}}."""

    def __init__(self, status, message, kind="invalid_request_error", **extra):
        super().__init__(message)
        self.status, self.message, self.kind, self.extra = status, message, kind, extra


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
        self.stats = {"batches": 0, "forward_passes": 0, "prompts": 0, "largest_batch": 0}  # counters: memory stays flat
        self.queue = self.worker = self.http = None

    def check_budget(self, budget, where):
        if budget < self.c[self.cheap]:
            raise Problem(400, f"{where} {budget:g} is below the cheapest model, {self.names[self.cheap]}, which costs "
                               f"{self.c[self.cheap]:g} per query", param="budget")
        return budget

    async def start(self):
        self.queue = asyncio.Queue()
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

    # -- batching -------------------------------------------------------------

    async def coefficients(self, turns):
        """(β [M] float64 over the checkpoint's models, η or None) for one prompt, batched with others."""
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((turns, fut))
        return await fut

    async def batch_loop(self):
        loop = asyncio.get_running_loop()
        wait, most = self.args.batch_wait_ms / 1000, self.args.max_batch
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + wait
            while len(items) < most:
                try:  # what is queued already, then whatever arrives before the deadline
                    items.append(self.queue.get_nowait() if deadline <= loop.time() else
                                 await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            items = [(t, f) for t, f in items if not f.done()]  # a cancelled request needs no forward
            if not items:
                continue
            try:
                beta, eta = await loop.run_in_executor(self.pool, self.forward, [t for t, _ in items])
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the loop lives on
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            st = self.stats
            st["batches"] += 1
            st["prompts"] += len(items)
            st["largest_batch"] = max(st["largest_batch"], len(items))
            for k, (_, f) in enumerate(items):
                if not f.done():
                    f.set_result((beta[k], eta[k]))

    def forward(self, prompts):
        """One gathered batch. Real prompts differ in length (AlpacaEval's: 12 to 256+ tokens), and one padded
        tensor for all of them spends most of its compute on padding; so the batch runs as length-sorted
        groups whose padding stays under --max-padding of their tokens (a group per forward pass)."""
        ids = encode_for(self.model, self.tok, prompts)
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

    def decide(self, beta_all, budget, seed=None):
        """π over the routable models for one prompt's β, the sampled model and its fallback."""
        b = beta_all[self.idx]
        i, j, w, R = route_one(self.args.router, b, self.q, self.c, budget)
        u = np.random.default_rng(seed).random() if seed is not None else self.rng.random()
        chosen = i if (w >= 0.5 if self.args.deterministic else u < w) else j  # route.py's rule
        if w < 1:  # π mixes two models: the other one
            fallback = j if chosen == i else i
        else:  # the best remaining affordable model (cheapest on ties); β ranks models as Wq does
            ok = [k for k in range(len(self.c)) if self.c[k] <= budget and k != chosen]
            fallback = max(ok, key=lambda k: (b[k], -self.c[k])) if ok else None
        theta = float(b[i]) if w == 1 else solve_theta(b, self.q, R)
        pi = {self.names[i]: round(w, 6)} | ({self.names[j]: round(1 - w, 6)} if w < 1 else {})
        return {"pi": pi, "chosen": self.names[chosen], "fallback": None if fallback is None else self.names[fallback],
                "expected_cost": w * self.c[i] + (1 - w) * self.c[j], "win_rate": float(R), "theta": theta,
                "rating": float(rating(theta)), "budget": budget}

    async def route(self, turns, budget, seed=None):
        beta, _ = await self.coefficients(turns)
        return self.decide(beta, budget, seed)

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
    got = hashlib.sha256(auth[7:].strip().encode()).digest()
    if not any([hmac.compare_digest(got, k) for k in svc.keys]):  # a list: every key compared, no early exit
        raise Problem(403, "invalid API key", "permission_error")


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
    if not isinstance(obj, dict):
        raise Problem(400, "body must be a JSON object")
    return obj


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
    """The FastAPI app: the handlers below, with svc in app.state; svc starts and stops with the server."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await svc.start()
        yield
        await svc.stop()

    app = FastAPI(title="P2L router", lifespan=lifespan)
    app.state.svc = svc
    app.add_exception_handler(Problem, problem)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/leaderboard", leaderboard, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    return app


async def problem(request, e):
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status, **e.extra}}, e.status)


async def health(request: Request):
    svc, args = request.app.state.svc, request.app.state.svc.args
    body = {"status": "ok" if svc.ready else "starting", "model_loaded": True, "upstream_table": args.models,
            "routable": len(svc.names), "checkpoint": args.checkpoint, "router": args.name, **svc.stats}
    return JSONResponse(body, 200 if svc.ready else 503)


async def models(request: Request):
    svc, args = request.app.state.svc, request.app.state.svc.args
    check_key(svc, request)
    data = [{"id": args.name, "object": "model", "created": 0, "owned_by": "p2l",
             "routes_over": svc.names, "budget": jnum(args.budget), "max_budget": jnum(args.max_budget)}]
    data += [{"id": m, "object": "model", "created": 0, "owned_by": "p2l", "cost": svc.ups[m]["cost"]} for m in svc.names]
    return {"object": "list", "data": data}


async def leaderboard(request: Request):
    svc, args = request.app.state.svc, request.app.state.svc.args
    check_key(svc, request)
    body = await read_json(svc, request)
    if ("prompt" in body) == ("prompts" in body):
        raise Problem(400, "send 'prompt' (a string or a list of user turns) or 'prompts' (a list of those)")
    raw = [body["prompt"]] if "prompt" in body else body["prompts"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= args.max_prompts:
        raise Problem(400, f"'prompts' must be a list of 1 to {args.max_prompts} prompts (--max-prompts)")
    try:
        prompts = [parse_turns({"prompt": p}, f"prompts[{k}]") for k, p in enumerate(raw)]
    except ValueError as e:
        raise Problem(400, str(e)) from None
    got = await asyncio.gather(*(svc.coefficients(p) for p in prompts))
    beta = torch.from_numpy(np.stack([g[0] for g in got]))
    eta = torch.tensor([g[1] for g in got], dtype=torch.float64) if got[0][1] is not None else None
    head = HEAD_OF_LOSS[svc.loss]
    bb, ee = await asyncio.to_thread(aggregate, beta, eta, svc.loss)  # aggregate.py --prompt's computation
    rows = leaderboard_rows(svc.model_list, bb, ee if head != "bt" else None, head)
    per = [{"coefficients": dict(zip(svc.model_list, map(float, g[0]))),
            "ratings": {m: round(float(rating(x)), 2) for m, x in zip(svc.model_list, g[0])}}
           | ({"eta": g[1]} if g[1] is not None else {}) for g in got]
    return {"models": svc.model_list, "loss": svc.loss, "prompts": per, "leaderboard": rows,
            **({"eta": ee} if head != "bt" else {})}


async def chat(request: Request):
    svc = request.app.state.svc
    t0 = time.perf_counter()
    check_key(svc, request)
    body = await read_json(svc, request)
    model, stream = body.get("model"), body.get("stream", False)
    if not isinstance(model, str) or not model:
        raise Problem(400, "'model' is required: 'p2l' to route, or a model name", param="model")
    if not isinstance(stream, bool):
        raise Problem(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    turns = user_turns(body.get("messages"))
    if "budget" in body and "cost" in body:
        raise Problem(400, "send 'budget' or 'cost' (the same thing), not both", param="budget")
    budget = number(body, "budget") if "budget" in body else number(body, "cost")
    seed = number(body, "route_seed", integer=True)
    payload = {k: v for k, v in body.items() if k not in EXTRA_FIELDS}
    tries, headers, d = await plan(svc, model, turns, budget, seed)
    failed = []
    for name in tries:
        try:
            got = await svc.attempt(name, payload, stream)
            break
        except UpstreamFault as e:
            failed.append({"model": name, "error": str(e)})
    else:
        msg = "no upstream answered: " + "; ".join(f"{f['model']} ({f['error']})" for f in failed)
        note(svc, d, model, None, failed, 502, t0, turns)
        raise Problem(502, msg, "upstream_error", tried=failed)
    if failed:
        headers["x-p2l-fallback"] = f"{failed[0]['model']} failed ({failed[0]['error']}); answered by {name}"
    headers["x-p2l-model"] = name
    headers["x-p2l-cost"] = f"{svc.ups[name]['cost']:g}"
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


async def plan(svc, model, turns, budget, seed):
    """Which upstreams to try, in order, and the routing headers: P2L's draw from π and its fallback,
    or the one model asked for."""
    args = svc.args
    if model in svc.ups:
        return [model], {}, None
    if model not in svc.router_names:
        raise Problem(404, f"model {model!r} not found: use {args.name!r} (or 'p2l') to route, or one of "
                           f"{', '.join(svc.names)}", param="model", kind="not_found_error")
    if not turns:
        raise Problem(400, "no user message with text: P2L routes on the user turns", param="messages")
    if budget is None:
        budget = args.budget
    elif budget > args.max_budget:
        raise Problem(400, f"budget {budget:g} is above this server's limit of {args.max_budget:g} per query "
                           f"(--max-budget)", param="budget")
    d = await svc.route(turns, svc.check_budget(budget, "budget"), seed)
    headers = {"x-p2l-pi": json.dumps(d["pi"]), "x-p2l-theta": f"{d['theta']:.6f}",
               "x-p2l-rating": f"{d['rating']:.2f}", "x-p2l-win-rate": f"{d['win_rate']:.6f}",
               "x-p2l-expected-cost": f"{d['expected_cost']:.6g}", "x-p2l-budget": f"{budget:g}",
               "x-p2l-router": args.name}
    return [d["chosen"]] + ([d["fallback"]] if d["fallback"] else []), headers, d


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
    whose client went away before the end."""
    app = FastAPI(title="fake upstream")
    app.state.seen, app.state.hung_up = collections.deque(maxlen=1000), []

    @app.post("/{behaviour}/v1/chat/completions")
    async def chat(behaviour: str, request: Request):
        body = await request.json()
        app.state.seen.append({"behaviour": behaviour, "model": body.get("model"), "body": body,
                               "authorization": request.headers.get("authorization")})
        if behaviour == "fail":
            return JSONResponse({"error": {"message": "fake upstream failure", "type": "server_error"}}, 500)
        if behaviour == "slow":
            await asyncio.sleep(30)
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
    p.add_argument("--checkpoint", help="P2L checkpoint dir (train.py's --out, or the authors' layout with --loss)")
    p.add_argument("--loss", choices=LOSSES, help="only for checkpoints without a p2l section (the authors' released ones)")
    p.add_argument("--models", help="JSON {P2L model: {base_url, model, cost, api_key_env}}: the upstreams; only these are routable")
    p.add_argument("--budget", type=float, help="default expected cost per query (units of the models file's costs; inf: "
                   "unconstrained); a request may send its own 'budget'")
    p.add_argument("--max-budget", type=float, help="the most a request may ask to spend per query (default: --budget, "
                   "so clients can only spend less than the operator's default)")
    p.add_argument("--router", default="optimal", choices=ROUTERS, help="as route.py: optimal is "
                   "the paper's (max predicted win rate), simple max Σπβ, strict the best single affordable model")
    p.add_argument("--deterministic", action="store_true", help="route to argmax π instead of sampling (then the budget "
                   "holds per request only for single-model π, not on average)")
    p.add_argument("--seed", type=int, default=0, help="seeds the server's draws from π (requests without route_seed)")
    p.add_argument("--name", default="p2l-router", help="the router's model name in /v1/models ('p2l' always works too)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; loopback by default (put a TLS proxy in front "
                   "before exposing it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-env", default="P2L_API_KEYS", help="environment variable with the client keys, "
                   "comma-separated (keys never go on the command line, where `ps` shows them)")
    p.add_argument("--no-auth", action="store_true", help="accept requests without a key (loopback --host only)")
    p.add_argument("--max-batch", type=int, default=32, help="most prompts in one P2L forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long the first request of a batch waits for "
                   "others: more gathers bigger batches under load, but adds up to this much latency when idle")
    p.add_argument("--max-padding", type=float, default=0.25, help="a gathered batch runs as length-sorted groups "
                   "whose padding is at most this fraction of their tokens (padding is wasted compute)")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an upstream before trying the fallback")
    p.add_argument("--upstream-timeout", type=float, default=120.0, help="seconds an upstream may take to answer (or "
                   "between two streamed chunks) before it counts as down")
    p.add_argument("--max-body-kb", type=int, default=1024, help="larger request bodies get 413")
    p.add_argument("--max-prompts", type=int, default=256, help="most prompts per /v1/leaderboard request")
    p.add_argument("--log-prompts", action="store_true", help="also log each request's user turns (off: no prompt text in logs)")
    p.add_argument("--fake-upstream", action="store_true", help="run the stand-in upstream instead (fake_upstream_app) on --port")
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
