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
