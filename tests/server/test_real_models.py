"""End to end with the real packaged models (SmolLM2-135M-Instruct, Gemma-3-270M base).

Marked slow: the one-time GGUF conversion and CPU generation take about a minute or two.
"""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_artifacts(tmp_path_factory):
    from compress.build import build
    from compress.sources import ensure_hf_dir

    out = tmp_path_factory.mktemp("real")
    arts = {}
    for name, recipe in [("smollm2-135m-instruct", "int8"), ("gemma3-270m", "int8")]:
        hf = ensure_hf_dir(name, progress=False)
        arts[name] = build(hf, out / f"{name}-{recipe}", recipe, {"name": name}) and out / f"{name}-{recipe}"
    return arts


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_engine_matches_transformers_on_real_weights(name):
    from transformers import AutoModelForCausalLM

    from compress.build import load_hf_dir
    from compress.sources import ensure_hf_dir
    from engine.config import ModelArgs
    from engine.loader import build_model

    hf_dir = ensure_hf_dir(name, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    config, state = load_hf_dir(hf_dir)
    eng = build_model(ModelArgs.from_hf_config(config), state, max_len=128)
    ids = torch.randint(0, eng.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(eng(ids), hf(ids).logits, atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def real_server(real_artifacts):
    from server.config import ServerConfig
    from tests.live_server import LiveServer

    from server.__main__ import DEFAULT_MEMORY_MODEL

    srv = LiveServer(ServerConfig(artifacts=[f"smollm2={real_artifacts['smollm2-135m-instruct']}",
                                             f"gemma={real_artifacts['gemma3-270m']}"],
                                  memory_model=str(DEFAULT_MEMORY_MODEL))).wait(timeout=300)
    yield srv
    srv.close()


def test_smollm2_answers_a_chat_question(real_server):
    from openai import OpenAI

    client = OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=30,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # ends on <|im_end|>, not the token budget


def test_gemma_completes_text(real_server):
    from openai import OpenAI

    client = OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.completions.create(model="gemma", prompt="The Eiffel Tower is located in the city of",
                                  temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].text


def test_shipped_memory_model_condenses_in_the_hybrid_loop(real_server):
    """The shipped memory model with SmolLM2: the condensed prompt carries the correct
    intermediate result that SmolLM2's own chain-of-thought lacks (held-out problem 1:
    12 + 21 = 33, measured in the README's benchmark)."""
    import httpx

    from memory_model.problems import make_splits

    prob = make_splits({"train": 768, "heldout": 1})["heldout"][0]
    r = httpx.post(real_server.url + "/v1/chat/completions", timeout=300, json={
        "model": "smollm2", "temperature": 0, "max_tokens": 64, "hybrid": {"loops": 1},
        "messages": [{"role": "user", "content": prob.question}]}).json()
    reasoning = r["choices"][0]["message"]["reasoning_content"]
    condensed = reasoning.split("condensed prompt:")[1]
    assert f"= {prob.answer}" in condensed, reasoning
    assert r["usage"]["hybrid"]["loops"] == 1 and r["usage"]["hybrid"]["condensed_tokens"] > 0


def test_a_real_svamp_dev_problem_goes_through_the_hybrid_loop_condensed(real_server):
    """One fixed held-out SVAMP problem (the first of svamp-dev) through the served hybrid loop
    with the shipped memory model: the answer stage reads a condensed P shorter than the
    question plus the chain-of-thought it condensed."""
    import httpx

    from tasks.data import load

    prob = load("svamp-dev")[0]
    r = httpx.post(real_server.url + "/v1/chat/completions", timeout=300, json={
        "model": "smollm2", "temperature": 0, "max_tokens": 16,
        "hybrid": {"loops": 1, "cot_groups": 3, "answer_prefix": "The answer is"},
        "messages": [{"role": "user", "content": prob.question}]}).json()
    h = r["usage"]["hybrid"]
    question_tokens = len(_smollm2_tokenizer()(prob.question, add_special_tokens=False)["input_ids"])
    assert h["loops"] == 1 and h["raw_reasoning_tokens"] > 0 and h["condensed_tokens"] > 0, h
    assert h["final_prompt_tokens"] < question_tokens + h["raw_reasoning_tokens"], h
    assert r["choices"][0]["message"]["content"].startswith("The answer is")


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from compress.sources import ensure_hf_dir

    return AutoTokenizer.from_pretrained(str(ensure_hf_dir("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def reasoning_server(real_artifacts):
    """`make serve`'s reasoning setup: the default int8 SmolLM2 with the shipped SVAMP LoRA adapter
    (adapters/smollm2-135m-svamp) for the hybrid loop and the shipped 70M memory model."""
    from pathlib import Path

    from server.config import ServerConfig
    from tests.live_server import LiveServer

    root = Path(__file__).resolve().parents[2]
    srv = LiveServer(ServerConfig(artifacts=[f"smollm2={real_artifacts['smollm2-135m-instruct']}"],
                                  lora_modules=[f"svamp={root / 'adapters' / 'smollm2-135m-svamp'}"],
                                  hybrid_adapter="svamp", memory_model=str(root / "memory_model/checkpoints/svamp-70m"),
                                  memory_model_quant="int8")).wait(timeout=300)
    yield srv
    srv.close()


def test_shipped_adapter_reasons_in_the_hybrid_loop_while_chat_keeps_the_base_weights(reasoning_server):
    """A held-out SVAMP dev problem (chal-719, right in results/reasoning_eval_adapter.json with
    the adapter's hybrid loop and full CoT, wrong directly and from the memory model alone) at the
    evaluation's settings, on the default model name; a chat question on the same name is
    answered by the untuned weights."""
    import httpx

    from tasks.answers import is_correct
    from tasks.data import load

    prob = next(p for p in load("svamp-dev") if p.id == "chal-719")
    r = httpx.post(reasoning_server.url + "/v1/chat/completions", timeout=300, json={
        "model": "smollm2", "temperature": 0, "max_tokens": 12,
        "hybrid": {"loops": 1, "cot_groups": 1, "cot_group_tokens": 24, "condense_tokens": 100,
                   "answer_prefix": "The answer is"},
        "messages": [{"role": "user", "content": prob.question}]}).json()
    assert r["model"] == "smollm2" and r["usage"]["hybrid"]["condensed_tokens"] > 0, r
    assert is_correct(r["choices"][0]["message"]["content"], prob.answer), r["choices"][0]["message"]
    chat = {m: httpx.post(reasoning_server.url + "/v1/chat/completions", timeout=300, json={
        "model": m, "temperature": 0, "max_tokens": 30,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()["choices"][0]
        for m in ("smollm2", "svamp")}
    assert "Paris" in chat["smollm2"]["message"]["content"]
    assert "Paris" not in chat["svamp"]["message"]["content"]  # the tuned weights answer with a number
