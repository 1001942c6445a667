"""Checkpoints that name their classes in another order than the dataset are scored right."""
from types import SimpleNamespace

import numpy as np
import torch

from dataset.glue import TASKS
from evaluate.glue import evaluate_task
from evaluate.tasks import class_to_label

MNLI = TASKS["mnli"]  # dataset order: entailment, neutral, contradiction


def config(*names):
    return SimpleNamespace(id2label=dict(enumerate(names)))


def test_mapping_only_when_the_names_say_so():
    assert class_to_label(MNLI, config("LABEL_0", "LABEL_1", "LABEL_2")) is None
    assert class_to_label(MNLI, config("ENTAILMENT", "Neutral", "contradiction")) is None  # same order
    assert class_to_label(MNLI, config("yes", "maybe", "no")) is None  # names that say nothing known
    # the original GLUE processors' order: class 0 is contradiction (dataset label 2), ...
    assert class_to_label(MNLI, config("CONTRADICTION", "ENTAILMENT", "NEUTRAL")).tolist() == [2, 0, 1]
    assert class_to_label(TASKS["stsb"], config("LABEL_0")) is None


class ClassOfToken(torch.nn.Module):
    """A 'classifier' whose class is the first input id: its logits are one-hot."""

    def __init__(self, *names):
        super().__init__()
        self.config = config(*names)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids[:, 0], 3).float())


def test_predictions_are_mapped_to_the_dataset_order():
    labels = torch.tensor([0, 1, 2, 2, 1, 0])  # dataset labels
    checkpoint_class = torch.tensor([1, 2, 0, 0, 2, 1])  # the same answers in the legacy order
    batch = {"input_ids": checkpoint_class[:, None], "attention_mask": torch.ones(6, 1, dtype=torch.long),
             "labels": labels}
    model = ClassOfToken("contradiction", "entailment", "neutral")
    batches = {split: [batch] for split in MNLI.eval_splits}
    mapping = class_to_label(MNLI, model.config)
    assert evaluate_task(model, MNLI, batches, "cpu", class_to_label=mapping)["accuracy"] == 1.0
    assert evaluate_task(model, MNLI, batches, "cpu")["accuracy"] == 0.0
    assert np.array_equal(mapping[checkpoint_class.numpy()], labels.numpy())
