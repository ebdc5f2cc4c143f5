"""Pure sampling functions."""

import torch

from engine.sampling import apply_top_k, apply_top_p, sample


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, temperature=0.0).tolist() == [1, 0]


def test_same_seed_same_samples():
    logits = torch.randn(4, 50)
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_top_k_one_is_greedy():
    logits = torch.randn(8, 100)
    for seed in range(5):
        out = sample(logits, 1.5, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out, logits.argmax(-1))


def test_top_k_keeps_exactly_k():
    kept = apply_top_k(torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]]), 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(apply_top_p(probs.log(), 0.8)).tolist()
    assert kept == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    # The most likely token always survives, even for a tiny top_p.
    assert torch.isfinite(apply_top_p(probs.log(), 1e-6)).tolist() == [[True, False, False, False]]


def test_sampling_follows_distribution():
    logits = torch.tensor([[0.0, 1.0]]).repeat(4000, 1)
    out = sample(logits, 1.0, generator=torch.Generator().manual_seed(0))
    p1 = out.float().mean().item()
    expected = torch.softmax(torch.tensor([0.0, 1.0]), 0)[1].item()
    assert abs(p1 - expected) < 0.03
