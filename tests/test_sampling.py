"""The collector's and evaluator's sampler draws from transformers' own distribution (temperature, then top-p), only
faster: checked against transformers' warpers on logits whose nucleus falls in each of the sampler's tiers."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import ROOT
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

sys.path.insert(0, str(ROOT / "shared_blocks"))  # the canonical copy (test_shared_copies: the rest)
from sampling import NucleusSampler, sampling_options  # noqa: E402


def transformers_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0].double()


@pytest.mark.parametrize(
    ("vocab", "spread", "temperature", "top_p", "draws"),
    [
        (64, 0.7, 0.8, 0.9, 100_000),  # a nucleus of about 40 tokens: the first tier (256)
        (3000, 0.1, 0.7, 0.9, 40_000),  # about 2,600: the second tier (4096)
        (5000, 0.02, 1.0, 0.95, 10_000),  # about 4,700: the whole vocabulary
        (300, 1.0, 1.3, 1.0, 100_000),  # no top-p: every token
    ],
)
def test_draws_follow_transformers_distribution(vocab, spread, temperature, top_p, draws):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(1, vocab, generator=generator) * spread
    expected = transformers_distribution(logits, temperature, top_p)
    torch.manual_seed(0)
    counts = torch.zeros(vocab, dtype=torch.float64)
    sampler = NucleusSampler(temperature, top_p)
    for _ in range(draws // 2000):  # 2,000 rows a call: a batch of that many identical prompts
        scores = sampler(None, logits.expand(2000, vocab).clone())
        assert bool((scores.isfinite().sum(dim=-1) == 1).all())  # one token left for generate()'s greedy pick
        counts += torch.bincount(scores.argmax(dim=-1), minlength=vocab).double()
    observed = counts / counts.sum()
    assert observed[expected == 0].sum() == 0  # never a token outside the nucleus
    # total variation against the noise of `draws` draws (about 0.5 * sqrt(2K / (pi n)) for K tokens kept)
    kept = int((expected > 0).sum())
    noise = 0.5 * math.sqrt(2 * kept / (math.pi * draws))
    assert 0.5 * (observed - expected).abs().sum() < 1.3 * noise + 0.002


def test_the_seed_decides_the_draws_and_temperature_zero_is_greedy():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(1))
    sampler = NucleusSampler(0.8, 0.9)
    torch.manual_seed(7)
    first = sampler(None, logits.clone()).argmax(dim=-1)
    torch.manual_seed(7)
    assert torch.equal(sampler(None, logits.clone()).argmax(dim=-1), first)
    assert sampling_options(0, 0.9) == {"do_sample": False}
    assert sampling_options(0.7, 0.9)["do_sample"] is False  # generate() picks the sampler's token greedily
