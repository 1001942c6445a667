"""Pruned checkpoints written by earlier code keep loading (tests/fixtures/checkpoint-v1)."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "checkpoint-v1")
AUTO = {"bert": AutoModelForSequenceClassification, "opt": AutoModelForCausalLM}


@pytest.mark.parametrize("family", AUTO)
def test_a_checkpoint_without_a_layout_loads_to_the_same_logits(family):
    path = os.path.join(FIXTURES, family)
    expected = torch.load(os.path.join(path, "expected.pt"))
    inputs = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    here = load_model(path)
    anywhere = AUTO[family].from_pretrained(path, trust_remote_code=True).eval()  # its own modeling_stat.py
    with torch.no_grad():
        assert torch.equal(here(**inputs).logits, expected["logits"])
        assert torch.equal(anywhere(**inputs).logits, expected["logits"])
    adapter = adapter_for(here)
    assert adapter.shape(here) == (here.config.stat_heads, here.config.stat_ffn) == ([1, 0], [7, 3])
