"""Pruned checkpoints written by earlier code keep loading (tests/fixtures/checkpoint-v1)."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "checkpoint-v1")
AUTO = {"bert": AutoModelForSequenceClassification, "opt": AutoModelForCausalLM}

# expected.pt holds logits computed on another machine: the same float32 arithmetic, but another
# CPU and BLAS may sum the dot products in another order (or with FMA), so they agree to the last
# few bits, not bit for bit. These models are tiny (2 layers, hidden 16, 1 + 0 heads and 7 + 3
# neurons left, sequences of 10): each logit is a chain of a few dozen roundings of dot products
# of length <= 16, with LayerNorms that keep the scale near 1, so another summation order moves a
# logit by a few ulps of float32 *of the logits' scale* (a logit near zero is no more precise
# than that): 2.6 ulps (BERT) and 1.6 (OPT) on an AMD EPYC against the machine that wrote the
# file, whatever the thread count. 64 ulps of the largest |logit| (5e-7 for BERT, 2e-6 for OPT)
# leaves room for other CPUs and stays below what a wrongly loaded weight does: one weight of
# layer 1's FFN (std 0.02) off by 1e-3 moves the logits by ~150 ulps (BERT) and ~14,000 (OPT),
# two of its kept neurons swapped by 5e4 (BERT) and 5e6 (OPT).
ULPS = 64


def assert_same_logits(got, expected):
    atol = ULPS * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("family", AUTO)
def test_a_checkpoint_without_a_layout_loads_to_the_same_logits(family):
    path = os.path.join(FIXTURES, family)
    expected = torch.load(os.path.join(path, "expected.pt"))
    inputs = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    here = load_model(path)
    anywhere = AUTO[family].from_pretrained(path, trust_remote_code=True).eval()  # its own modeling_stat.py
    with torch.no_grad():
        assert_same_logits(here(**inputs).logits, expected["logits"])
        assert_same_logits(anywhere(**inputs).logits, expected["logits"])
        # both loaders, in this process, compute bit for bit the same
        assert torch.equal(anywhere(**inputs).logits, here(**inputs).logits)
    adapter = adapter_for(here)
    assert adapter.shape(here) == (here.config.stat_heads, here.config.stat_ffn) == ([1, 0], [7, 3])
    # the tolerance still tells a wrongly loaded layer apart: two of layer 1's neurons swapped
    producer = adapter.get(adapter.layers(here)[1], adapter.ffn_producers[0])
    with torch.no_grad():
        producer.weight[[0, 1]] = producer.weight[[1, 0]].clone()
        with pytest.raises(AssertionError):
            assert_same_logits(here(**inputs).logits, expected["logits"])
