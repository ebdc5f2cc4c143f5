"""The hybrid loop with tiny random models: stage counts, budgets, accounting, streaming,
KV-cache prefix reuse, cancellation mid-loop, and the request/response extensions."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import torch

from engine.events import Stats, TokenStep
from server.config import ServerConfig

from tests.live_server import LiveServer

Q = [{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many apples?"}]
SMALL = {"loops": 2, "cot_groups": 2, "cot_group_tokens": 5, "condense_tokens": 4}


@pytest.fixture(scope="module")
def hybrid_srv(llama_artifact, mm_checkpoint):
    srv = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], memory_model=str(mm_checkpoint),
                                  max_model_len=1024, ping_interval_s=0.01)).wait()
    yield srv
    srv.close()


def _chat(srv, **body):
    return httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny-chat", "messages": Q, **body},
                      timeout=60)


def test_hybrid_response_reports_every_stage_within_budgets(hybrid_srv):
    r = _chat(hybrid_srv, hybrid=SMALL, max_tokens=6, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert isinstance(msg["content"], str)
    assert "[loop 1] reasoning" in msg["reasoning_content"] and "[loop 2] condensed prompt" in msg["reasoning_content"]
    assert msg["reasoning"] == msg["reasoning_content"]
    u = body["usage"]
    h = u["hybrid"]
    assert h["loops"] == 2
    assert 0 < h["raw_reasoning_tokens"] <= 2 * 2 * 5  # loops x groups x tokens per group
    assert h["condensed_tokens"] <= 2 * 4
    answer = h["large"]["completion_tokens"] - h["raw_reasoning_tokens"]
    assert 0 < answer <= 6
    assert u["completion_tokens_details"]["reasoning_tokens"] == h["raw_reasoning_tokens"] + h["condensed_tokens"]
    assert u["completion_tokens"] == answer + u["completion_tokens_details"]["reasoning_tokens"]
    assert h["small"]["completion_tokens"] == h["condensed_tokens"]
    # three large-model prompts (2 CoT + answer) share the chat template's header
    assert h["large"]["cached_tokens"] > 0
    assert h["peak_context_tokens"] >= u["prompt_tokens"]
    assert set(h["seconds"]) == {"cot", "condense", "answer"} and all(v >= 0 for v in h["seconds"].values())


def test_stream_sends_reasoning_first_then_the_same_answer(hybrid_srv):
    plain = _chat(hybrid_srv, hybrid=SMALL, max_tokens=6, temperature=0).json()
    reasoning, content, order, usage, pings = "", "", [], None, 0
    body = {"model": "tiny-chat", "messages": Q, "hybrid": SMALL, "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    import json

    with httpx.stream("POST", hybrid_srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(":"):
                pings += 1
                continue
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                d = c["delta"]
                if d.get("reasoning_content"):
                    assert d["reasoning"] == d["reasoning_content"]
                    reasoning += d["reasoning_content"]
                    order.append("r")
                if d.get("content"):
                    content += d["content"]
                    order.append("c")
    assert reasoning == plain["choices"][0]["message"]["reasoning_content"]
    assert content == plain["choices"][0]["message"]["content"]
    assert "r" in order and order.index("r") < (order.index("c") if "c" in order else len(order))
    assert "c" not in order or "r" not in order[order.index("c"):]  # no reasoning after the answer starts
    assert usage["hybrid"]["loops"] == 2


def test_answer_prefix_opens_the_answer(hybrid_srv):
    plain = _chat(hybrid_srv, hybrid=SMALL, max_tokens=4, temperature=0).json()
    r = _chat(hybrid_srv, hybrid={**SMALL, "answer_prefix": "The answer is"}, max_tokens=4, temperature=0).json()
    content = r["choices"][0]["message"]["content"]
    assert content.startswith("The answer is") and content != plain["choices"][0]["message"]["content"]
    assert r["usage"]["hybrid"]["large"]["completion_tokens"] - r["usage"]["hybrid"]["raw_reasoning_tokens"] <= 4


def test_hidden_reasoning_sends_keepalive_pings(hybrid_srv):
    body = {"model": "tiny-chat", "messages": Q, "max_tokens": 2, "stream": True,
            "hybrid": {"loops": 6, "cot_groups": 4, "cot_group_tokens": 30, "return_reasoning": False}}
    lines = []
    with httpx.stream("POST", hybrid_srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = list(r.iter_lines())
    assert any(line.startswith(": ping") for line in lines)
    assert not any("reasoning_content" in line for line in lines)
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"


def test_reasoning_effort_maps_onto_loops(hybrid_srv):
    low = _chat(hybrid_srv, reasoning_effort="low", max_tokens=2,
                hybrid={"cot_groups": 1, "cot_group_tokens": 3, "condense_tokens": 2}).json()
    assert low["usage"]["hybrid"]["loops"] == 1
    direct = _chat(hybrid_srv, reasoning_effort="none", max_tokens=2).json()
    assert direct["usage"].get("hybrid") is None and not direct["choices"][0]["message"].get("reasoning_content")
    off = _chat(hybrid_srv, hybrid={"enabled": False}, max_tokens=2).json()
    assert off["usage"].get("hybrid") is None


@pytest.mark.parametrize("extra,param", [
    ({"hybrid": {"loops": 2, "bogus": 1}}, "hybrid.bogus"),
    ({"hybrid": {"loops": -1}}, "hybrid.loops"),
    ({"hybrid": {"loops": 1}, "n": 2}, "n"),
    ({"hybrid": {"loops": 1}, "logprobs": True}, "logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
])
def test_bad_hybrid_requests_are_openai_errors(hybrid_srv, extra, param):
    r = _chat(hybrid_srv, max_tokens=2, **extra)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or "")


def test_hybrid_without_memory_model_is_refused(live):
    r = httpx.post(live.url + "/v1/chat/completions", timeout=30,
                   json={"model": "tiny-chat", "messages": Q, "hybrid": {"loops": 1}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "hybrid_unavailable"


def test_hybrid_metrics_are_exported(hybrid_srv):
    _chat(hybrid_srv, hybrid=SMALL, max_tokens=2)
    text = httpx.get(hybrid_srv.url + "/metrics").text
    for name in ("hybrid_loop_requests_total", 'hybrid_loop_stage_seconds_count{model="tiny-chat",stage="condense"}',
                 'hybrid_loop_tokens_total{kind="cached",model="tiny-chat",role="large"}',
                 'hybrid_loop_reasoning_tokens_total{kind="raw",model="tiny-chat"}',
                 "hybrid_loop_peak_context_tokens_bucket"):
        assert name in text, name


def _texts(events) -> list:
    """What a client sees of a job's events (TokenStep times left out)."""
    return [(type(e).__name__, e.text if hasattr(e, "text") else getattr(e, "deltas", e)) for e in events]


def test_later_stages_reuse_the_shared_prefix_and_give_the_same_output(llama_artifact, mm_checkpoint):
    """Each stage's KV goes to the prefix cache when its row leaves the batch: the next stage
    prefills only what it does not share (the chat template's header for the large model), with
    the same tokens as without the cache."""
    from engine.batching import drive
    from engine.generate import SamplingParams
    from engine.prefix_cache import PrefixCache
    from engine.runner import load_model
    from memory_model.condense import MemoryModel
    from server.hybrid import HybridParams, hybrid_work

    lm, mm = load_model(llama_artifact), MemoryModel(mm_checkpoint)
    hp = HybridParams(loops=2, cot_groups=2, cot_group_tokens=6, condense_tokens=6)
    runs = []
    for cache in (None, PrefixCache(64 * 2**20)):
        work = hybrid_work(lm, mm, Q, hp, SamplingParams(max_tokens=6, temperature=0), [])
        evs = list(drive(work(threading.Event()), prefix_cache=cache))
        runs.append(([e for e in evs if not isinstance(e, Stats)], next(e.stats for e in evs if isinstance(e, Stats))))
    (cold, a), (warm, b) = runs
    assert _texts(cold) == _texts(warm) and any(isinstance(e, TokenStep) for e in cold)
    assert a.large.cached_tokens == 0 and b.large.cached_tokens > 0 and b.small.cached_tokens > 0
    assert a.large.prompt_tokens == b.large.prompt_tokens + b.large.cached_tokens
    assert a.raw_reasoning_tokens == b.raw_reasoning_tokens and a.condensed_tokens == b.condensed_tokens


def test_cancel_mid_loop_stops_before_the_answer(llama_artifact, mm_checkpoint):
    from engine.batching import drive
    from engine.events import Reasoning, Stats, TokenStep, Usage
    from engine.generate import SamplingParams
    from engine.runner import load_model
    from memory_model.condense import MemoryModel
    from server.hybrid import HybridParams, hybrid_work

    lm, mm = load_model(llama_artifact), MemoryModel(mm_checkpoint)
    hp = HybridParams(loops=4, cot_groups=3, cot_group_tokens=20, condense_tokens=8)
    cancel = threading.Event()
    events = []
    for ev in drive(hybrid_work(lm, mm, Q, hp, SamplingParams(max_tokens=50, temperature=0), [])(cancel)):
        events.append(type(ev))
        if isinstance(ev, Reasoning) and "condensed prompt" in ev.text:
            cancel.set()  # client gone after the first loop
    assert TokenStep not in events and Usage not in events
    # a full run of the same work reaches the answer
    kinds = [type(ev) for ev in drive(hybrid_work(lm, mm, Q, hp, SamplingParams(max_tokens=5, temperature=0), [])(
        threading.Event()))]
    assert kinds[-2:] == [Stats, Usage] and TokenStep in kinds


class _RecordingModel:
    """The loaded large model, recording every message list it renders."""

    def __init__(self, lm):
        self.lm, self.rendered = lm, []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def encode_chat(self, messages):
        self.rendered.append(messages)
        return self.lm.encode_chat(messages)


@pytest.mark.parametrize("condensed", ["Sam has 7 apples.", ""])
def test_answer_stage_reads_exactly_the_condensed_prompt(llama_artifact, condensed):
    """Algorithm 1: the large model answers from P = the memory model's output, or from the
    user's prompt when the memory model wrote nothing."""
    from engine.batching import drive
    from engine.generate import SamplingParams
    from engine.runner import load_model
    from memory_model.large import answer_messages, cot_messages
    from server.hybrid import HybridParams, hybrid_work

    lm = _RecordingModel(load_model(llama_artifact))
    seen = []

    def stub(stats):
        def condense(prompt, cot, max_tokens, cancel):
            seen.append(prompt)
            return condensed
        return condense

    history = [{"role": "system", "content": "Be brief."}]
    hp = HybridParams(loops=2, cot_groups=1, cot_group_tokens=4)
    work = hybrid_work(lm, None, history + Q, hp, SamplingParams(max_tokens=3, temperature=0), [], condenser=stub)
    list(drive(work(threading.Event())))
    p = condensed or Q[0]["content"]
    assert seen == [Q[0]["content"], p]  # loop 2 condenses the P loop 1 produced
    assert lm.rendered == [history + cot_messages(Q[0]["content"]), history + cot_messages(p),
                           history + answer_messages(p)]


def test_chat_client_shows_hybrid_reasoning(hybrid_srv):
    from clients.chat import stream_chat

    body = {"model": "tiny-chat", "messages": Q, "max_tokens": 3, "temperature": 0, "hybrid": SMALL}
    with httpx.Client(base_url=hybrid_srv.url, timeout=60) as c:
        kinds = [k for k, _ in stream_chat(c, body)]
    assert kinds[0] == "reasoning" and "content" in kinds
    assert "reasoning" not in kinds[kinds.index("content"):]


def _metric(srv, name):
    lines = [line for line in httpx.get(srv.url + "/metrics").text.splitlines() if line.startswith(name)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_disconnect_mid_loop_frees_the_worker(hybrid_srv):
    import time

    before = _metric(hybrid_srv, "hybrid_requests_cancelled_total")
    done_before = _metric(hybrid_srv, "hybrid_loop_requests_total")
    body = {"model": "tiny-chat", "messages": Q, "max_tokens": 50, "stream": True,
            "hybrid": {"loops": 16, "cot_groups": 8, "cot_group_tokens": 64, "condense_tokens": 64}}
    with httpx.stream("POST", hybrid_srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if "reasoning_content" in line:
                break  # first reasoning delta, then hang up
    deadline = time.time() + 20
    while _metric(hybrid_srv, "hybrid_requests_cancelled_total") <= before and time.time() < deadline:
        time.sleep(0.02)
    assert _metric(hybrid_srv, "hybrid_requests_cancelled_total") == before + 1
    while _metric(hybrid_srv, "hybrid_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.02)
    assert _metric(hybrid_srv, "hybrid_requests_running") == 0
    # the loop never reached its answer (no hybrid stats recorded) and the server serves again
    assert _metric(hybrid_srv, "hybrid_loop_requests_total") == done_before
    assert _chat(hybrid_srv, hybrid=SMALL, max_tokens=2).status_code == 200


def test_empty_cot_control_condenses_the_prompt_alone(hybrid_srv):
    r = _chat(hybrid_srv, hybrid={**SMALL, "loops": 1, "cot_groups": 0}, max_tokens=4, temperature=0)
    assert r.status_code == 200, r.text
    h = r.json()["usage"]["hybrid"]
    assert h["raw_reasoning_tokens"] == 0 and h["loops"] == 1 and h["small"]["prompt_tokens"] > 0
    assert "reasoning:" not in r.json()["choices"][0]["message"]["reasoning_content"]


def test_truncate_control_keeps_the_question_and_the_cot_tail_without_a_memory_model(llama_artifact):
    srv = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], memory_model=None,
                                  max_model_len=1024)).wait()
    try:
        hyb = {"loops": 1, "cot_groups": 2, "cot_group_tokens": 5, "condense_tokens": 3, "condense_with": "truncate"}
        r = _chat(srv, hybrid=hyb, max_tokens=4, temperature=0)
        assert r.status_code == 200, r.text
        body = r.json()
        reasoning, h = body["choices"][0]["message"]["reasoning_content"], body["usage"]["hybrid"]
        condensed = reasoning.split("condensed prompt:\n", 1)[1]
        assert condensed.startswith(Q[0]["content"] + "\n")  # P' = the question + the CoT's tail
        assert h["small"]["completion_tokens"] == 0 and h["raw_reasoning_tokens"] > 0
        # the memory model is still required for the real loop
        r = _chat(srv, hybrid={"loops": 1}, max_tokens=4)
        assert r.status_code == 400 and r.json()["error"]["code"] == "hybrid_unavailable"
    finally:
        srv.close()


def test_hybrid_answer_stage_is_the_constrained_one(hybrid_srv):
    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    r = _chat(hybrid_srv, hybrid=SMALL, max_tokens=200, temperature=1.0, seed=2, response_format=fmt)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "stop" and "[loop 1] reasoning" in c["message"]["reasoning_content"]
    jsonschema.validate(json.loads(c["message"]["content"]), schema)
    r = _chat(hybrid_srv, hybrid={**SMALL, "answer_prefix": "The answer is"}, response_format=fmt)
    assert r.status_code == 400 and r.json()["error"]["param"] == "hybrid"


def test_a_plain_request_is_served_while_a_hybrid_request_runs(hybrid_srv):
    """The worker advances an exclusive job (the hybrid loop) one event at a time between batch
    steps: a plain stream that starts while a long hybrid request runs finishes while the hybrid
    request is still emitting, and both get exactly what they get alone."""
    import json
    import threading
    import time

    hybrid = dict(hybrid={"loops": 6, "cot_groups": 4, "cot_group_tokens": 40, "condense_tokens": 8},
                  max_tokens=200, ignore_eos=True, temperature=0)
    plain = dict(max_tokens=5, ignore_eos=True, temperature=0)
    alone = _chat(hybrid_srv, **hybrid).json()["choices"][0]["message"]["content"]
    alone_plain = _chat(hybrid_srv, **plain).json()["choices"][0]["message"]["content"]
    stamps, text, started = [], [], threading.Event()

    def read_hybrid():
        body = {"model": "tiny-chat", "messages": Q, "stream": True, **hybrid}
        with httpx.stream("POST", hybrid_srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
                    started.set()
                    for c in json.loads(line[6:])["choices"]:
                        text.append(c["delta"].get("content") or "")

    reader = threading.Thread(target=read_hybrid)
    reader.start()
    assert started.wait(30)
    together_plain = _chat(hybrid_srv, **plain).json()["choices"][0]["message"]["content"]
    plain_done = time.perf_counter()
    reader.join(60)
    assert together_plain == alone_plain and "".join(text) == alone
    assert sum(t > plain_done for t in stamps) > 20  # the hybrid request was still streaming


class _Recorder:
    """Wraps a model's batched forward, recording each call's rows (B)."""

    def __init__(self, model):
        self.model, self.rows, self._fwd = model, [], model.forward_rows

    def __enter__(self):
        self.model.forward_rows = lambda ids, rows, last_only=False, adapters=None: (
            self.rows.append(ids.shape[0]), self._fwd(ids, rows, last_only, adapters))[1]
        return self

    def __exit__(self, *exc):
        del self.model.forward_rows


def test_hybrid_stages_decode_in_the_batch_with_plain_requests(llama_artifact, mm_checkpoint):
    """Two hybrid requests and a plain one at once: the large model's stages share forwards
    with the plain request and each other, the memory model's condensations share theirs, and
    every request gets exactly what it gets alone."""
    from engine.batching import BatchConfig, drive
    from engine.events import Done
    from engine.generate import SamplingParams
    from engine.prefix_cache import PrefixCache
    from engine.runner import load_model
    from engine.textgen import TextRequest
    from memory_model.condense import MemoryModel
    from server.hybrid import HybridParams, hybrid_work
    from server.scheduler import Job, Scheduler

    lm, mm = load_model(llama_artifact), MemoryModel(mm_checkpoint)
    hp = HybridParams(loops=2, cot_groups=2, cot_group_tokens=6, condense_tokens=6)
    questions = [Q, [{"role": "user", "content": "Ann had 9 pens and gave away 2. How many pens are left?"}]]
    plain_ids = lm.encode_chat(Q)[0]

    def hybrid(q):
        return hybrid_work(lm, mm, q, hp, SamplingParams(max_tokens=8, temperature=0), [])

    def plain():
        return TextRequest(lm, plain_ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))

    alone = [_texts(e for e in drive(hybrid(q)(threading.Event())) if not isinstance(e, Stats)) for q in questions]
    alone.append(_texts(plain().work(threading.Event())))
    loop = asyncio.new_event_loop()
    sched = Scheduler(max_queue=4, batch=BatchConfig(max_num_seqs=4), prefix_cache=PrefixCache(64 * 2**20))
    try:
        with _Recorder(lm.model) as large, _Recorder(mm.model) as small:
            gate = threading.Event()
            sched.submit(Job(loop, work=lambda cancel: iter([gate.wait(10)])))  # holds the worker while all arrive
            jobs = [Job(loop, work=hybrid(q)) for q in questions] + [Job(loop, request=plain())]
            for j in jobs:
                sched.submit(j)
            gate.set()
            got = [loop.run_until_complete(_drain(j.events, Done)) for j in jobs]
    finally:
        sched.shutdown()
        loop.close()
    assert [_texts(e for e in evs if not isinstance(e, Stats)) for evs in got] == alone
    assert max(large.rows) == 3  # both hybrid stages and the plain request in one forward
    assert max(small.rows) == 2  # the two condensations together


async def _drain(queue, last) -> list:
    out = []
    while not isinstance(ev := await asyncio.wait_for(queue.get(), 60), last):
        out.append(ev)
    return out


def test_a_failed_batch_forward_fails_the_hybrid_job_in_it_and_the_worker_serves_on(llama_artifact, mm_checkpoint):
    """The memory model's batch raises once: the hybrid job whose condensation was in it gets
    Failed (it does not wait forever for its sequence), and the next hybrid request completes."""
    from engine.batching import BatchConfig
    from engine.events import Done, Failed, Usage
    from engine.generate import SamplingParams
    from engine.runner import load_model
    from memory_model.condense import MemoryModel
    from server.hybrid import HybridParams, hybrid_work
    from server.scheduler import Job, Scheduler

    lm, mm = load_model(llama_artifact), MemoryModel(mm_checkpoint)
    hp = HybridParams(loops=1, cot_groups=1, cot_group_tokens=4, condense_tokens=4)
    fwd, calls = mm.model.forward_rows, []

    def broken_once(ids, rows, last_only=False, adapters=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("forward failed")
        return fwd(ids, rows, last_only, adapters)

    mm.model.forward_rows = broken_once
    loop = asyncio.new_event_loop()
    sched = Scheduler(max_queue=4, batch=BatchConfig(max_num_seqs=2))
    try:
        got = []
        for _ in range(2):
            job = Job(loop, work=hybrid_work(lm, mm, Q, hp, SamplingParams(max_tokens=3, temperature=0), []))
            sched.submit(job)
            got.append(loop.run_until_complete(_drain(job.events, Done)))
    finally:
        sched.shutdown()
        loop.close()
        del mm.model.forward_rows
    assert isinstance(got[0][-1], Failed) and "forward failed" in str(got[0][-1].error)
    assert isinstance(got[1][-1], Usage) and not any(isinstance(e, Failed) for e in got[1])


class _ScriptedDetok:
    """Stands in for the large model's detokenizer: whatever tokens the random model samples,
    the chain-of-thought reads as the script (one piece per token, then nothing)."""

    script: list[str] = []

    def __init__(self, tokenizer, prompt_ids):
        self.pieces = list(self.script)

    def push(self, tok):
        return self.pieces.pop(0) if self.pieces else ""

    def flush(self):
        return ""


@pytest.mark.parametrize("script, stop, condensed_cots, loops", [
    (["7 + 3", " = 10.", "\n", "The answer", " is", " 10."], True, ["7 + 3 = 10."], 1),  # reasoning, then the answer
    (["The answer is", " 10."], True, [], 1),  # the answer first: nothing to condense, P stands
    (["So the answer is", " 10."], True, ["So the answer is 10."] * 3, 3),  # not a line opening with the prefix
    (["7 + 3 = 10.", "\n", "The answer is", " 10."], False, ["7 + 3 = 10.\nThe answer is 10."] * 3, 3),  # off
])
def test_loops_end_at_the_line_that_states_the_answer(llama_artifact, monkeypatch, script, stop, condensed_cots,
                                                      loops):
    from engine.batching import drive
    from engine.events import Stats
    from engine.generate import SamplingParams
    from engine.runner import load_model
    from memory_model.large import answer_messages, cot_messages
    from server import hybrid

    monkeypatch.setattr(_ScriptedDetok, "script", script)
    lm = _RecordingModel(load_model(llama_artifact))
    seen = []

    def stub(stats):
        def condense(prompt, cot, max_tokens, cancel):
            seen.append(cot)
            return "Sam has 7 apples."
        return condense

    hp = hybrid.HybridParams(loops=3, cot_groups=2, cot_group_tokens=12, answer_prefix="The answer is",
                             stop_at_answer=stop)
    monkeypatch.setattr(hybrid, "IncrementalDetokenizer", _ScriptedDetok)
    work = hybrid.hybrid_work(lm, None, Q, hp, SamplingParams(max_tokens=3, temperature=0), [], condenser=stub)
    stats = [ev.stats for ev in drive(work(threading.Event())) if isinstance(ev, Stats)]
    assert seen == condensed_cots
    assert stats[0].loops == loops
    p = "Sam has 7 apples." if condensed_cots else Q[0]["content"]
    assert lm.rendered[-1] == answer_messages(p) and lm.rendered[0] == cot_messages(Q[0]["content"])
    assert len(lm.rendered) == loops + 1
