"""Run a sequence-classification model over GLUE dev batches and score it."""
import sys

import numpy as np
import torch
from tqdm import tqdm

from evaluate.glue_metrics import glue_metrics
from evaluate.inputs import accepted_inputs


def predict(model, batches, device, desc="eval", class_to_label=None):
    """(predictions, labels) as numpy arrays over all batches.

    A prediction is the argmax of the logits (mapped through `class_to_label` when the
    checkpoint orders its classes differently from the dataset), or the value itself for a
    regression head (one output). The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, total=total, file=sys.stderr, leave=False):
            inputs = {k: v.to(device) for k, v in accepted_inputs(model, batch).items()}
            logits = model(**inputs).logits
            if logits.shape[-1] == 1:
                predictions.append(logits[:, 0].float().cpu().numpy())
            else:
                classes = logits.argmax(dim=-1).cpu().numpy()
                predictions.append(classes if class_to_label is None else class_to_label[classes])
            labels.append(batch["labels"].cpu().numpy())
    model.train(was_training)
    return np.concatenate(predictions), np.concatenate(labels)


def evaluate_task(model, spec, eval_batches_by_split, device, class_to_label=None):
    """The task's metrics on each of its eval splits, in one flat dict.

    eval_batches_by_split maps each of spec.eval_splits to its batches. The first split
    keeps the plain metric names; MNLI's mismatched split gets a `_mm` suffix
    ("accuracy_mm"), so "accuracy" stays the matched, primary, number.
    """
    results = {}
    for split in spec.eval_splits:
        if split not in eval_batches_by_split:
            raise ValueError(f"no batches given for the {split!r} split of {spec.name}")
        predictions, labels = predict(model, eval_batches_by_split[split], device,
                                      desc=f"{spec.name} {split}", class_to_label=class_to_label)
        suffix = "_mm" if split == "validation_mismatched" else ""
        for name, value in glue_metrics(spec, predictions, labels).items():
            results[name + suffix] = value
    return results
