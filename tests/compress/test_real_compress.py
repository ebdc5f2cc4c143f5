"""GPTQ + EoRA on the real SmolLM2-135M-Instruct: the 4-bit artifact is served by the engine's
int4 kernel, still answers, and stays near the float model's perplexity.

Marked slow: quantizing 210 matrices column by column takes about two minutes on 2 cores.
"""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gptq(tmp_path_factory):
    from compress.build import build
    from compress.sources import ensure_hf_dir

    hf = ensure_hf_dir("smollm2-135m-instruct", progress=False)
    out = tmp_path_factory.mktemp("real-gptq") / "smollm2-gptq-eora"
    build(hf, out, "gptq(calib_samples=8),eora(rank=16,calib_samples=8)", {"name": "smollm2-135m-instruct"},
          progress=False)
    return hf, out


def test_gptq_smollm2_is_served_in_int4_and_stays_close_to_float(smollm2_gptq):
    from transformers import AutoTokenizer

    from compress.build import load_hf_dir
    from compress.data import heldout_text
    from compress.evaluate import perplexity
    from engine.config import ModelArgs
    from engine.gptq_format import Int4Linear
    from engine.loader import build_model
    from engine.runner import load_model

    hf, art = smollm2_gptq
    lm = load_model(art)
    assert isinstance(lm.model.layers[0].mlp.w13.base, Int4Linear)  # K=576, group 128: kernel at group 64
    ids = AutoTokenizer.from_pretrained(hf)(heldout_text(), add_special_tokens=False)["input_ids"][:1025]
    config, state = load_hf_dir(hf)
    fp32 = build_model(ModelArgs.from_hf_config(config), state, max_len=600)
    ppl_fp32 = perplexity(fp32, ids, 512, progress=False)["perplexity"]
    ppl_q = perplexity(lm.model, ids, 512, progress=False)["perplexity"]
    assert ppl_fp32 < ppl_q < 1.4 * ppl_fp32, (ppl_fp32, ppl_q)

    from engine.generate import SamplingParams, generate

    prompt, _ = lm.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = [s.tokens[0] for s in generate(lm.model, prompt, SamplingParams(max_tokens=16, temperature=0), lm.eos_ids)]
    assert "Paris" in lm.tokenizer.decode(out, skip_special_tokens=True)
    with torch.inference_mode():
        assert torch.isfinite(lm.model(torch.tensor([ids[:32]]))).all()
