"""--lora-modules over HTTP: an adapter is a model name of its own on the primary model's weights
(vLLM's multi-LoRA serving), in the same batch as base requests; --hybrid-adapter runs the
hybrid loop's large-model stages with it while direct requests keep the base weights."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import pytest

from engine.generate import SamplingParams, generate
from engine.runner import load_model
from server.config import ServerConfig
from tests.helpers import save_peft_adapter
from tests.live_server import LiveServer

PROMPT = [5, 9, 2, 7, 11, 3, 8]
HYB = {"loops": 1, "cot_groups": 2, "cot_group_tokens": 5, "condense_tokens": 3, "condense_with": "truncate"}
Q = [{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many apples?"}]


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "reason"
    save_peft_adapter(llama_dir, out, seed=3)
    return out


@pytest.fixture(scope="module")
def srv(llama_artifact, gemma_artifact, adapter_dir):
    s = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}", f"tiny-base={gemma_artifact}"],
                                lora_modules=[f"reason={adapter_dir}"], hybrid_adapter="reason",
                                memory_model=None, max_model_len=512)).wait()
    yield s
    s.close()


def _complete(srv, model: str) -> list[int]:
    r = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6,
                                                       "temperature": 0, "ignore_eos": True, "logprobs": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


def _offline(llama_artifact, adapter_dir, adapter: str | None) -> str:
    lm = load_model(llama_artifact, adapters={"reason": adapter_dir})
    toks = [o.tokens[0] for o in generate(lm.model, PROMPT, SamplingParams(max_tokens=6, temperature=0,
                                                                          ignore_eos=True), set(), adapter=adapter)]
    return lm.tokenizer.decode(toks)


def test_models_list_names_the_adapter_with_its_parent(srv):
    data = {m["id"]: m for m in httpx.get(srv.url + "/v1/models").json()["data"]}
    assert list(data) == ["tiny-chat", "tiny-base", "reason"]
    assert data["reason"]["parent"] == "tiny-chat" and data["tiny-chat"]["parent"] is None
    assert data["reason"]["meta"]["adapter"].endswith("reason")


def test_adapter_and_base_requests_answer_as_each_would_alone(srv, llama_artifact, adapter_dir):
    want = {"reason": _offline(llama_artifact, adapter_dir, "reason"),
            "tiny-chat": _offline(llama_artifact, adapter_dir, None)}
    assert want["reason"] != want["tiny-chat"]
    got, threads = {}, []
    for model in ["reason", "tiny-chat"] * 3:  # concurrent: both kinds of row in one batch
        threads.append(threading.Thread(target=lambda m=model: got.setdefault(m, set()).add(_complete(srv, m))))
        threads[-1].start()
    for t in threads:
        t.join()
    assert got == {k: {v} for k, v in want.items()}


def _hybrid(srv, model: str) -> dict:
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": model, "messages": Q, "hybrid": HYB,
                                                            "max_tokens": 5, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_hybrid_adapter_reasons_with_the_adapter_and_answers_plain_requests_without(srv):
    via_default = _hybrid(srv, "tiny-chat")
    via_adapter = _hybrid(srv, "reason")
    assert via_default["model"] == "tiny-chat"
    for key in ("content", "reasoning_content"):  # the same stages, the same weights
        assert via_default["choices"][0]["message"][key] == via_adapter["choices"][0]["message"][key]
    plain = {m: httpx.post(srv.url + "/v1/chat/completions", json={"model": m, "messages": Q, "max_tokens": 6,
                                                                   "temperature": 0}, timeout=60).json()
             for m in ("tiny-chat", "reason")}
    assert plain["tiny-chat"]["choices"][0]["message"]["content"] != plain["reason"]["choices"][0]["message"]["content"]


@pytest.mark.parametrize("args,match", [
    (["--lora-modules", "x=/nonexistent"], "is not a LoRA adapter"),
    (["--lora-modules", "x"], "takes NAME=DIR"),
    (["--lora-modules", "tiny={adapter}", "--artifact", "tiny={artifact}"], "already used"),
    (["--lora-modules", "x={adapter}", "--hybrid-adapter", "y"], "not one of the --lora-modules"),
])
def test_bad_lora_flags_exit_with_one_line(llama_artifact, adapter_dir, args, match):
    args = [a.format(adapter=adapter_dir, artifact=llama_artifact) for a in args]
    if "--artifact" not in args:
        args += ["--artifact", str(llama_artifact)]
    cli = subprocess.run([sys.executable, "-m", "server", *args, "--memory-model", "none"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and match in cli.stderr and len(cli.stderr.strip().splitlines()) == 1, cli.stderr


def test_an_adapter_that_does_not_fit_fails_the_load_with_a_clear_error(gemma_artifact, adapter_dir):
    s = LiveServer(ServerConfig(artifacts=[str(gemma_artifact)], lora_modules=[f"reason={adapter_dir}"],
                                memory_model=None)).wait(status=503)
    try:
        msg = httpx.get(s.url + "/health").json()["message"]
        assert "AdapterError" in msg and "do not fit" in msg
    finally:
        s.close()


def test_an_exported_adapter_is_verified_and_must_come_from_the_primary_weights(llama_dir, gemma_artifact, tmp_path):
    from compress.artifact import export_adapter
    from tests.helpers import build_artifact

    kept = build_artifact(llama_dir, tmp_path / "k", "lora(steps=1,seq_len=16,merge=false,targets=attn)")
    out = tmp_path / "tuned"
    export_adapter(kept, out)
    base = build_artifact(llama_dir, tmp_path / "b", "none")

    def serve(artifact) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server", "--artifact", str(artifact), "--lora-modules",
                               f"tuned={out}", "--memory-model", "none", "--port", "1"], capture_output=True,
                              text=True, timeout=120)
    wrong = serve(gemma_artifact)
    assert wrong.returncode == 2 and "adapter 'tuned' was trained on" in wrong.stderr
    with open(out / "adapter_config.json", "a") as f:
        f.write(" ")
    tampered = serve(base)
    assert tampered.returncode == 2 and "checksum mismatch in adapter_config.json" in tampered.stderr
