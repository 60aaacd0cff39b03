"""serve.py hardening (issue 20: bad text, failed batches, OpenAI errors, the circuit breaker, client
hang-ups, leaderboard jobs vs chat) and the explorer page at / (issue 22), tested in headless Chromium.
Real servers on 127.0.0.1 only, in threads of this process (test_p2l's helpers and fixtures)."""
import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

import serve as S
import test_p2l as T
from test_p2l import serve_ck, tiny_qwen, upstream  # noqa: F401 - fixtures

KEY = {"Authorization": f"Bearer {T.CLIENT_KEY}"}


@contextlib.contextmanager
def router(serve_ck, up_url, behaviour="ok", *extra, checkpoint=None, log_level="warning"):
    """test_p2l.router with a checkpoint dir of our own (e.g. one with a marginal.json) and a log level."""
    d, model, tok = serve_ck
    mf = T.models_file(d / f"models-{time.time_ns()}.json", up_url, behaviour)
    args = S.parse_args(["--checkpoint", str(checkpoint or d / "ck"), "--models", str(mf), "--budget", "4",
                         "--max-budget", "10", "--upstream-timeout", "30", "--connect-timeout", "10", *map(str, extra)])
    svc = S.Service(model, tok, args, S.read_models(mf, T.MODELS))
    svc.keys = [hashlib.sha256(T.CLIENT_KEY.encode()).digest()]
    with serving(S.build_app(svc), log_level) as url:
        yield url, svc


@contextlib.contextmanager
def serving(app, log_level):
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level=log_level, timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        assert th.is_alive() and time.time() - t0 < 60, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(15)


def openai_error(r, status, code="any"):
    """r is OpenAI's error object: {"error": {message, type, param, code}}, code a string or null."""
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(e) and isinstance(e["message"], str) and e["message"]
    assert e["code"] is None or isinstance(e["code"], str)
    if code != "any":
        assert e["code"] == code, e
    return e


def chat_body(text, **kw):
    return {"model": "p2l", "messages": T.ask(text), **kw}

# -----------------------------------------------------------------------------
# one bad request never fails the others


@pytest.mark.slow
def test_serve_lone_surrogate_is_400_and_its_batchmates_answer(serve_ck, upstream):
    """31 normal requests and one whose text holds a lone surrogate (a JSON escape, as a JavaScript client
    that cut an emoji in half sends it), all at once: 400 for that one, the right answer for the rest."""
    bad = b'{"model": "p2l", "messages": [{"role": "user", "content": "half an emoji \\ud83d here"}]}'

    async def run(url):
        async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as c:
            good = [c.post("/v1/chat/completions", json=chat_body(f"normal request {k}")) for k in range(31)]
            return await asyncio.gather(c.post("/v1/chat/completions", content=bad), *good)
    with router(serve_ck, upstream[0], "ok", "--batch-wait-ms", 50) as (url, svc):
        got = asyncio.run(run(url))
    e = openai_error(got[0], 400, "invalid_unicode")
    assert "lone surrogate \\ud83d at character 14" in e["message"] and e["param"] == "messages[0].content"
    for k, r in enumerate(got[1:]):
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].endswith(f"normal request {k}")


def test_serve_failed_batch_reruns_its_prompts_one_by_one(serve_ck):
    """A forward that fails for one prompt of a gathered batch (and a prompt the tokenizer refuses) fails
    that prompt's request only; the others get the coefficients they get alone."""
    d, model, tok = serve_ck
    mf = T.models_file(d / "m-rerun.json", "http://127.0.0.1:9", "ok")
    args = S.parse_args(["--checkpoint", str(d / "ck"), "--models", str(mf), "--budget", "4", "--batch-wait-ms", "200"])
    svc = S.Service(model, tok, args, S.read_models(mf, T.MODELS))
    prompts = [[f"prompt {k}"] for k in range(6)]
    poison = S.encode_for(model, tok, [["poison prompt"]])[0]
    forward, calls = svc.forward, []

    def flaky(ids):  # a forward that fails whenever the poison prompt is in it
        calls.append(len(ids))
        if any(list(x) == poison for x in ids):
            raise RuntimeError("simulated failure of a batch")
        return forward(ids)

    async def run():
        await svc.start()
        svc.forward = flaky
        try:
            return await asyncio.gather(*(svc.coefficients(p) for p in prompts + [["poison prompt"], ["x \ud800 y"]]),
                                        return_exceptions=True)
        finally:
            await svc.stop()
    got = asyncio.run(run())
    want, _ = T.C.predict(model, S.encode_for(model, tok, prompts), tok.pad_token_id)
    for k in range(6):
        assert not isinstance(got[k], Exception) and np.allclose(got[k][0], want[k].double().numpy(), atol=1e-5)
    assert isinstance(got[6], RuntimeError) and isinstance(got[7], Exception)
    assert calls == [7] + [1] * 7  # one batch of 7 (the 8th never tokenized), then each alone


# -----------------------------------------------------------------------------
# OpenAI's conventions


@pytest.mark.slow
def test_serve_errors_are_openai_shaped_and_nothing_is_open_without_a_key(serve_ck, upstream, monkeypatch):
    with router(serve_ck, upstream[0]) as (url, svc):
        post = lambda path, **kw: httpx.post(url + path, timeout=30, **{"headers": KEY, **kw})
        openai_error(post("/v1/chat/completions", content=b"[" * 100_000), 400)  # was RecursionError -> plain 500
        openai_error(post("/v1/chat/completions", content=b'{"a":' * 70 + b"1" + b"}" * 70), 400)  # deep but parseable
        openai_error(post("/v1/chat/completions", content=b"{not json"), 400)
        openai_error(post("/v1/nope", json={}), 404, "unknown_url")
        openai_error(httpx.get(url + "/v1/chat/completions", headers=KEY, timeout=30), 405, "method_not_allowed")
        openai_error(post("/v1/chat/completions", json=chat_body("hi", budget="cheap")), 400)
        openai_error(post("/v1/chat/completions", json={**chat_body("hi"), "model": "gpt-9"}), 404, "model_not_found")
        openai_error(post("/v1/chat/completions", json=chat_body("hi"), headers={"Authorization": "Bearer sk-wrong"}),
                     401, "invalid_api_key")
        openai_error(post("/v1/chat/completions", json=chat_body("hi"), headers={}), 401)
        for path in ("/docs", "/openapi.json", "/redoc"):
            openai_error(httpx.get(url + path, timeout=30), 404)
        h = httpx.get(url + "/health", timeout=30)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert "ck" not in json.dumps(h.json()) and str(serve_ck[0]) not in h.text and "models" not in h.text
        page = httpx.get(url + "/", timeout=30)  # the explorer: no key needed, talks to this server only
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"] and "<script>" in page.text
        monkeypatch.setattr(svc, "decide", lambda *a, **k: 1 / 0)  # a bug anywhere: still OpenAI's shape
        e = openai_error(post("/v1/chat/completions", json=chat_body("hi")), 500)
        assert e["type"] == "server_error" and "ZeroDivisionError" in e["message"]


@pytest.mark.slow
def test_serve_access_log_has_no_query_string_key(serve_ck, upstream):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    h = Keep()
    with router(serve_ck, upstream[0], log_level="info") as (url, svc):
        logging.getLogger("uvicorn.access").addHandler(h)
        try:
            r = httpx.get(url + "/v1/models?api_key=sk-query-secret-555", headers=KEY, timeout=30)
        finally:
            time.sleep(0.2)
            logging.getLogger("uvicorn.access").removeHandler(h)
    assert r.status_code == 200
    assert any("/v1/models" in m for m in records), records
    assert not any("sk-query-secret-555" in m for m in records), records

# -----------------------------------------------------------------------------
# failing upstreams: remembered, routed around under the same budget; a client that hangs up cancels


@pytest.mark.slow
def test_serve_circuit_breaker_routes_around_under_the_budget_and_probes(serve_ck, upstream):
    up_url, up = upstream
    fails = lambda: sum(1 for s in list(up.state.seen) if s["behaviour"] == "fail")
    with router(serve_ck, up_url, {"cheap": "fail"}, "--breaker-failures", 1, "--breaker-seconds", 60) as (url, svc):
        post = lambda body: httpx.post(url + "/v1/chat/completions", headers=KEY, json=body, timeout=30)
        before = fails()
        assert post({**chat_body("direct"), "model": "cheap"}).status_code == 502
        e = openai_error(post({**chat_body("direct again"), "model": "cheap"}), 503, "upstream_down")
        assert "cheap" in e["message"] and fails() == before + 1  # remembered: not called again
        cost, expected, var = [], [], []
        for k in range(40):  # routed while cheap is down: over mid, zbase, pricey under the same budget of 4
            r = post(chat_body(f"routed request {k}", route_seed=k))
            assert r.status_code == 200, r.text
            pi = json.loads(r.headers["x-p2l-pi"])
            assert "cheap" not in pi and r.headers["x-p2l-model"] in pi and "x-p2l-fallback" not in r.headers
            assert float(r.headers["x-p2l-expected-cost"]) <= 4 + 1e-9 and r.headers["x-p2l-budget"] == "4"
            assert float(r.headers["x-p2l-cost"]) == T.COSTS[r.headers["x-p2l-model"]]
            cost.append(T.COSTS[r.headers["x-p2l-model"]])
            expected.append(float(r.headers["x-p2l-expected-cost"]))
            var.append(np.prod(list(pi.values())) * np.ptp([T.COSTS[m] for m in pi]) ** 2 if len(pi) == 2 else 0.0)
        assert fails() == before + 1
        assert abs(np.mean(cost) - np.mean(expected)) <= 4 * np.sqrt(sum(var)) / len(cost) + 1e-9  # the cost incurred
        # budget 2 with cheap down: no model the budget can pay for is up -> 503, never a dearer model
        openai_error(post(chat_body("tight", budget=2)), 503, "upstreams_down")
        svc.ups["cheap"]["base_url"] = f"{up_url}/ok/v1"  # it recovers; after the cool-down one request probes it
        svc.breaker["cheap"]["open_until"] = time.monotonic()  # (the cool-down, without waiting 60 s)
        r = post({**chat_body("probe"), "model": "cheap"})
        assert r.status_code == 200 and svc.breaker["cheap"]["fails"] == 0 and "cheap" not in svc.down()


@pytest.mark.slow
def test_serve_retry_reroutes_under_the_same_budget(serve_ck, upstream):
    """Before the breaker opens (default 3 failures), a failed model's request is routed again over the
    others under the same budget: the fallback's decision has expected cost <= the budget and the
    x-p2l-* headers describe it (the old fallback took π's other model, often dearer than the budget)."""
    with router(serve_ck, upstream[0], {"cheap": "fail"}, "--breaker-failures", 1000) as (url, svc):
        n_fb = 0
        for k in range(24):
            r = httpx.post(url + "/v1/chat/completions", headers=KEY, timeout=30,
                           json=chat_body(f"retry request {k}", budget=3.5, route_seed=k))
            assert r.status_code == 200, r.text
            pi = json.loads(r.headers["x-p2l-pi"])
            assert float(r.headers["x-p2l-expected-cost"]) <= 3.5 + 1e-9 and r.headers["x-p2l-model"] in pi
            if "x-p2l-fallback" in r.headers:
                n_fb += 1
                assert r.headers["x-p2l-fallback"].startswith("cheap failed") and "cheap" not in pi
    assert n_fb >= 2  # otherwise the re-route was never exercised


@pytest.mark.slow
def test_serve_client_hang_up_cancels_a_non_streamed_upstream_call(serve_ck, upstream):
    up_url, up = upstream
    with router(serve_ck, up_url, "slow") as (url, svc):  # every upstream takes 30 s; the router would wait 30 s
        before = len(up.state.abandoned)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", headers=KEY, json=chat_body("never mind"), timeout=2)
        t0 = time.time()
        while len(up.state.abandoned) == before and time.time() - t0 < 5:
            time.sleep(0.05)
        assert len(up.state.abandoned) == before + 1  # the upstream saw its caller go: the call was cancelled
        assert svc.breaker[up.state.seen[-1]["model"][3:]]["fails"] == 0  # a hang-up is not the upstream's fault

# -----------------------------------------------------------------------------
# a big leaderboard job does not stall chat routing


@pytest.mark.slow
def test_serve_leaderboard_job_lets_chat_go_first_and_caps_tokens(serve_ck, upstream):
    with router(serve_ck, upstream[0], "ok", "--max-batch", 4, "--max-request-tokens", 3000) as (url, svc):
        forward = svc.forward

        def slow(ids):  # each forward takes >= 0.1 s: the job below needs >= 12 of them
            time.sleep(0.1)
            return forward(ids)
        svc.forward = slow
        done = {}

        def board():
            r = httpx.post(url + "/v1/leaderboard", headers=KEY, timeout=120,
                           json={"prompts": [f"leaderboard prompt {k} " + "word " * 20 for k in range(48)]})
            done["board"] = (time.time(), r)
        th = threading.Thread(target=board)
        th.start()
        t0 = time.time()
        while svc.stats["batches"] < 1 and time.time() - t0 < 60:
            time.sleep(0.01)
        r = httpx.post(url + "/v1/chat/completions", headers=KEY, json=chat_body("quick question"), timeout=120)
        done["chat"] = time.time()
        th.join(120)
        assert r.status_code == 200 and done["board"][1].status_code == 200
        assert done["chat"] < done["board"][0]  # the chat decision went before the rest of the job
        e = openai_error(httpx.post(url + "/v1/leaderboard", headers=KEY, timeout=60,
                                    json={"prompts": ["word " * 60] * 60}), 413, "too_many_tokens")
        assert "--max-request-tokens" in e["message"]

# -----------------------------------------------------------------------------
# /v1/route: the explorer's decision for a budget, and the frontier


def with_marginal(serve_ck, tmp_path):
    """A copy of the test checkpoint with a marginal.json (train.py writes one; the fixture's has none)."""
    ck = tmp_path / "ck"
    shutil.copytree(serve_ck[0] / "ck", ck)
    marginal = {"model_list": T.MODELS, "beta": [0.3, -0.2, 0.9, 0.1], "eta": None, "loss": "bt", "train": None}
    (ck / "marginal.json").write_text(json.dumps(marginal))
    return ck


@pytest.mark.slow
def test_serve_route_endpoint_is_the_decision_and_frontier(serve_ck, upstream, tmp_path):
    with router(serve_ck, upstream[0], checkpoint=with_marginal(serve_ck, tmp_path)) as (url, svc):
        post = lambda path, body: httpx.post(url + path, headers=KEY, json=body, timeout=30)
        lb = post("/v1/leaderboard", {"prompt": "route me"}).json()
        beta = np.array([lb["prompts"][0]["coefficients"][m] for m in T.MODELS])
        assert [r["model"] for r in lb["marginal"]] == ["pricey", "cheap", "zbase", "mid"]
        for budget in (1, 2.5, 4, 7.25, 10):
            r = post("/v1/route", {"prompt": "route me", "budget": budget}).json()
            want = svc.decide(beta, float(budget), u=0.5)
            d = r["decision"]
            assert d["pi"] == want["pi"] and d["budget"] == budget
            for k in ("expected_cost", "win_rate", "theta", "rating"):
                assert d[k] == pytest.approx(want[k], abs=1e-6)
            hull = {m["model"]: m for m in r["models"] if m["model"] in r["frontier"]}
            pts = sorted((m["cost"], m["win_rate"]) for m in hull.values())
            assert [h[0] for h in pts] == sorted(h[0] for h in pts) and all(b[1] > a[1] for a, b in zip(pts, pts[1:]))
            on = np.interp(d["expected_cost"], [p[0] for p in pts], [p[1] for p in pts])
            assert d["win_rate"] == pytest.approx(on, abs=1e-9)  # the decision lies on the frontier
        openai_error(post("/v1/route", {"prompt": "x", "budget": 0.5}), 400)
        openai_error(httpx.post(url + "/v1/route", json={"prompt": "x"}, timeout=30), 401)

# -----------------------------------------------------------------------------
# the explorer in a real browser


def browser_or_skip():
    """(chromium, chromedriver) paths, or a one-line skip saying what is missing and how to get it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("explorer browser test: chromium/chromedriver not installed (`make browser`, i.e. "
                    "apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("explorer browser test: selenium not installed (requirements-serve.txt)")
    return chromium, driver


def chrome(chromium, driver, profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={profile}", "--window-size=1200,860"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def dom_decision(b):
    from selenium.webdriver.common.by import By
    pi = {e.get_attribute("data-model"): float(e.get_attribute("data-weight"))
          for e in b.find_elements(By.CSS_SELECTOR, "#pi .pi-entry")}
    vals = {k: float(b.find_element(By.ID, i).get_attribute("data-value"))
            for k, i in (("expected_cost", "expected-cost"), ("win_rate", "win-rate"), ("theta", "theta"),
                         ("rating", "theta-rating"))}
    return pi, vals


@pytest.mark.slow
def test_explorer_in_headless_chromium(serve_ck, upstream, tmp_path):
    """Type a key and a prompt, move the budget slider: the bars are /v1/leaderboard's ratings (the prompt's
    and the marginal's), the decision is /v1/route's for the slider's budget; the key is in no storage."""
    chromium, driver = browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    prompt = "Write a haiku about the sea"
    with router(serve_ck, upstream[0], checkpoint=with_marginal(serve_ck, tmp_path)) as (url, svc):
        api = lambda path, body: httpx.post(url + path, headers=KEY, json=body, timeout=30).json()
        b = chrome(chromium, driver, tmp_path / "profile")
        try:
            b.get(url + "/")
            b.find_element(By.ID, "key").send_keys(T.CLIENT_KEY)
            b.find_element(By.ID, "prompt").send_keys(prompt)
            b.find_element(By.ID, "go").click()
            wait = WebDriverWait(b, 60)
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
            assert b.find_element(By.ID, "status").text == ""
            lb = api("/v1/leaderboard", {"prompt": prompt})
            bars = [(e.get_attribute("data-model"), float(e.get_attribute("data-rating")))
                    for e in b.find_elements(By.CSS_SELECTOR, "#prompt-board .bar")]
            assert bars == sorted(lb["prompts"][0]["ratings"].items(), key=lambda x: -x[1])
            marg = [(e.get_attribute("data-model"), float(e.get_attribute("data-rating")))
                    for e in b.find_elements(By.CSS_SELECTOR, "#marginal-board .bar")]
            assert marg == [(r["model"], r["rating"]) for r in lb["marginal"]]
            slider = b.find_element(By.ID, "budget")
            seen = set()
            for moves in (0, 25):  # as loaded (the server's default budget), then 25 steps to the right
                if moves:
                    slider.send_keys(*[Keys.ARROW_RIGHT] * moves)
                value = slider.get_attribute("value")
                wait.until(lambda b: b.find_element(By.ID, "decision").get_attribute("data-budget") == value)
                want = api("/v1/route", {"prompt": prompt, "budget": float(value)})["decision"]
                pi, vals = dom_decision(b)
                assert pi == want["pi"] and vals == {k: want[k] for k in vals}
                assert len(b.find_elements(By.CSS_SELECTOR, "#frontier circle[data-model]")) == 4
                seen.add(float(value))
            assert len(seen) == 2 and max(seen) > 4  # the slider moved
            assert b.execute_script("return localStorage.length + sessionStorage.length + document.cookie.length") == 0
            b.save_screenshot(str(tmp_path / "explorer.png"))
        finally:
            b.quit()
    png = (tmp_path / "explorer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
