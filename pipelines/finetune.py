"""Fine-tuning runs (scripts/finetune.py): a BERT-family encoder fine-tuned on a GLUE task or
SQuAD 1.1/2.0, saved where prune_bert.py looks for it (models/<model_name>/<task_name>/).

A plain loop, deterministic on the CPU for a given seed and thread count: torch.manual_seed(seed)
just before the task head is initialised (from_pretrained draws it from torch's generator, and
dropout draws from it in training), and the examples' order each epoch from a generator of its
own seeded with the same seed. AdamW with a linear warm-up then linear decay to 0, no mixed
precision. The dev metric at the end comes from the same evaluation code prune_bert.py uses
(evaluate/tasks.py), so the two agree on the dense model.
"""
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from dataset import glue, squad
from evaluate.inputs import accepted_inputs
from evaluate.tasks import SQUAD_VERSIONS, make_task, task_names
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_config, load_tokenizer
from prerequisites.hub import resolve_checkpoint
from utils.atomic import atomic_folder
from utils.cli import resolve_device, set_seed
from utils.errors import UserError
from utils.results import now, provenance

RECORD_FILE = "finetune.json"  # how the checkpoint was made, saved beside its weights
SQUAD_MAX_LENGTH = 384


class GlueTrainSet:
    """The training examples of a GLUE task, tokenized a batch at a time: MNLI's 393k examples
    tokenized at once would hold gigabytes of Python lists, and a batch's tokens do not depend on
    the other examples."""

    def __init__(self, examples, tokenizer, spec):
        self.examples, self.tokenizer, self.spec = examples, tokenizer, spec

    def __len__(self):
        return len(self.examples)

    def batch(self, indices):
        items = glue.encode([self.examples[i] for i in indices], self.tokenizer, self.spec)
        return glue.collate(items, self.tokenizer.pad_token_id)


class SquadTrainSet:
    """SQuAD training features (windows of max_length tokens overlapping by stride, each with the
    token positions of its answer, or of CLS when the window holds none), made once and kept as
    int32 arrays: SQuAD 1.1's 88k features as Python lists of ints would take gigabytes."""

    def __init__(self, examples, tokenizer, max_length, stride, chunk=1000):
        self.pad_token_id = tokenizer.pad_token_id
        self.features = []
        for lo in tqdm(range(0, len(examples), chunk), desc="SQuAD training features", file=sys.stderr,
                       leave=False):
            for feature in squad.prepare_train_features(examples[lo:lo + chunk], tokenizer, max_length, stride):
                self.features.append({key: np.asarray(value, dtype=np.int32) if isinstance(value, list) else value
                                      for key, value in feature.items()})

    def __len__(self):
        return len(self.features)

    def batch(self, indices):
        chosen = [self.features[i] for i in indices]
        batch = squad.collate(chosen, self.pad_token_id)
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([feature[key] for feature in chosen], dtype=torch.long)
        return batch


def default_output_dir(args):
    """models/<model_name>/<task_name>, with model_name the last part of the base model's name
    (bert-base-uncased for google-bert/bert-base-uncased) unless given."""
    name = args.model_name or os.path.basename(os.path.normpath(args.model_name_or_path))
    return os.path.join("models", name, args.task_name)


def check_output_dir(path):
    """A finished model is never overwritten; an empty folder may be filled."""
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise UserError(f"{path} already exists: remove it, or choose another --output_dir")


def training_length(args):
    """The training length: --max_length, else the task's evaluation length (SQuAD 384; GLUE 128,
    SST-2, CoLA and movie-sentiment 64). Evaluation always keeps the task's own protocol."""
    if args.max_length is not None:
        return args.max_length
    return SQUAD_MAX_LENGTH if args.task_name in SQUAD_VERSIONS else glue.get_task(args.task_name).max_length


def train_set(task, tokenizer, args):
    if args.task_name in SQUAD_VERSIONS:
        return SquadTrainSet(task.train, tokenizer, training_length(args), args.doc_stride)
    spec = dataclasses.replace(glue.get_task(args.task_name), max_length=training_length(args))
    return GlueTrainSet(task.train, tokenizer, spec)


def load_for_task(source, task_name):
    """The base encoder with a freshly initialised head for the task (from torch's generator)."""
    import transformers

    try:
        if task_name in SQUAD_VERSIONS:
            return transformers.AutoModelForQuestionAnswering.from_pretrained(source, dtype=torch.float32)
        spec = glue.get_task(task_name)
        # The classes in the dataset's order, named, so prune_bert.py knows the order is the dataset's.
        labels = {} if spec.is_regression else {
            "id2label": dict(enumerate(spec.label_names)),
            "label2id": {name: i for i, name in enumerate(spec.label_names)}}
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=spec.num_labels, dtype=torch.float32, **labels)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load base model {source}: {' '.join(str(err).split())}")


def train(model, examples, args, device):
    """The loop: shuffle each epoch, AdamW, linear warm-up then decay, optional clipping."""
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    steps = args.epochs * steps_per_epoch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(args.warmup * steps), steps)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    with tqdm(total=steps, desc=f"fine-tuning on {args.task_name}", unit="step", file=sys.stderr) as bar:
        for _ in range(args.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for start in range(0, len(order), args.batch_size):
                batch = examples.batch(order[start:start + args.batch_size])
                inputs = accepted_inputs(model, batch) | ({"labels": batch["labels"]} if "labels" in batch else {})
                loss = model(**{k: v.to(device) for k, v in inputs.items()}).loss
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return steps


def save(model, tokenizer, out_dir, record):
    """Write into a temporary folder beside out_dir, then rename it (utils/atomic.py): a
    half-trained or half-written model never sits where prune_bert.py looks."""
    with atomic_folder(out_dir) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, RECORD_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)


def shown_path(path):
    """The path relative to the working folder when it lies inside it (models/...), else as is."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def format_metrics(metrics):
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))


def finetune(args):
    """Everything scripts/finetune.py does, from its parsed flags; returns the record."""
    device = resolve_device(args.device)
    if args.task_name not in task_names():
        raise UserError(f"unknown task {args.task_name!r} (known tasks: {', '.join(task_names())})")
    out_dir = args.output_dir or default_output_dir(args)
    check_output_dir(out_dir)
    source = resolve_checkpoint(args.model_name_or_path, "base model")
    if adapter_for(load_config(source)).is_decoder:  # and a family prune_bert.py cannot prune fails here
        raise UserError(f"{args.model_name_or_path} is a decoder; fine-tuning here is for BERT-family encoders")
    tokenizer = load_tokenizer(source)
    # all the data before the model: a malformed file fails at once, not after the download
    task = make_task(args.task_name, tokenizer, args.data_dir, args.eval_batch_size)
    examples = train_set(task, tokenizer, args)
    set_seed(args.seed)  # just before the head is initialised
    model = load_for_task(source, args.task_name).to(device)

    print(f"fine-tuning {args.model_name or args.model_name_or_path} on {args.task_name}: {len(examples)} training "
          f"{'features' if args.task_name in SQUAD_VERSIONS else 'examples'}, {args.epochs} epoch(s), "
          f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}, device {device}")
    start = time.perf_counter()
    steps = train(model, examples, args, device)
    metrics = task.evaluate(model, device)
    seconds = time.perf_counter() - start
    record = {
        "base_model": args.model_name_or_path, "task_name": args.task_name, "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "max_length": training_length(args), "doc_stride": args.doc_stride,
        "warmup": args.warmup, "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
        "seed": args.seed, "steps": steps, "train_size": len(examples), "metric_name": task.metric_name,
        "dev_metrics": metrics, "seconds": seconds, "device": str(device), "time": now(),
        **provenance(args.command),
    }
    save(model.cpu(), tokenizer, out_dir, record)
    print(f"fine-tuned in {seconds:.0f}s: dev {format_metrics(metrics)}")
    print(f"saved to {shown_path(out_dir)}")
    return record
