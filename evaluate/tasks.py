"""The encoder tasks prune_bert.py runs: what to calibrate on, how to score, which S for MACs.

A task loads (and checks) all its data when it is made, so that bad input fails before any
model work starts.
"""

import functools
import sys

import numpy as np

from dataset import glue, squad
from dataset.sampling import draw_with_replacement
from evaluate.glue import evaluate_task
from evaluate.inputs import accepted_inputs, labelled_inputs
from evaluate.squad import evaluate_squad
from utils.cache import fingerprint
from utils.errors import UserError

SQUAD_VERSIONS = {"squad": "1.1", "squad_v2": "2.0"}
SQUAD_MAC_SEQ_LEN = 170  # Kwon et al.'s choice for SQuAD


def task_names():
    return list(glue.TASKS) + list(SQUAD_VERSIONS)


def make_task(name, tokenizer, data_dir=None, batch_size=64):
    """name is one of task_names(): callers check it before they load anything."""
    if name in SQUAD_VERSIONS:
        return SquadTask(name, tokenizer, data_dir, batch_size)
    return GlueTask(name, tokenizer, data_dir, batch_size)


def check_checkpoint(name, config):
    """Fail before anything loads when the checkpoint does not fit the task."""
    architecture = (config.architectures or ["?"])[0]
    needs = "ForQuestionAnswering" if name in SQUAD_VERSIONS else "ForSequenceClassification"
    if not architecture.endswith(needs):
        kind = "question-answering" if name in SQUAD_VERSIONS else "sequence-classification"
        raise UserError(f"task {name} needs a {kind} checkpoint (*{needs}), this one is {architecture}")
    if name in glue.TASKS and config.num_labels != glue.TASKS[name].num_labels:
        raise UserError(f"the checkpoint has {config.num_labels} labels, task {name} needs "
                        f"{glue.TASKS[name].num_labels}")


def class_to_label(spec, config):
    """The dataset label of each of the checkpoint's classes, as an index array, when the
    checkpoint names its classes with the task's label names in another order (MNLI models
    trained with the original GLUE processors put contradiction first); None when the orders
    agree or the names say nothing (LABEL_0, ...), and the dataset's order is assumed."""
    if spec.is_regression or not spec.label_names:
        return None
    names = [str(config.id2label.get(i, "")).lower() for i in range(spec.num_labels)]
    if sorted(names) != sorted(spec.label_names):
        return None
    order = [spec.label_names.index(name) for name in names]
    return None if order == sorted(order) else np.array(order)


class GlueTask:
    # Kwon et al.'s mini-batches for their Fisher importance (its value depends on them: it
    # sums squared mini-batch gradients); the last layer of a classifier is tuned on [CLS] only
    labelled_batch_size = 32
    classification = True

    def __init__(self, name, tokenizer, data_dir, batch_size):
        self.spec = glue.get_task(name)
        self.name = name
        self.metric_name = self.spec.primary_metric
        self.mac_seq_len = self.spec.mac_seq_len
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.train = glue.load_examples(self.spec, "train", data_dir)
        self.eval_sets = {split: glue.encode(glue.load_examples(self.spec, split, data_dir), tokenizer, self.spec)
                          for split in self.spec.eval_splits}
        self._told_mapping = False

    def _batches(self, encoded, model):
        return [accepted_inputs(model, b) | {"labels": b["labels"]}
                for b in glue.batches(encoded, self.batch_size, self.tokenizer.pad_token_id)]

    def calibration_batches(self, model, n, seed, sampler="distinct"):
        return self.batch_calibration(model, self.calibration_sample(n, seed, sampler))

    def calibration_sample(self, n, seed, sampler="distinct"):
        """n encoded training examples (dataset/glue.py's samplers); needs no model, so a bad n
        fails before any model work."""
        sample = glue.encode(glue.sample_calibration(self.train, n, seed, sampler), self.tokenizer, self.spec)
        sample.sort(key=lambda item: len(item["input_ids"]))  # less padding, same examples
        return sample

    def batch_calibration(self, model, sample):
        return [accepted_inputs(model, b) for b in glue.batches(sample, self.batch_size, self.tokenizer.pad_token_id)]

    def search_batches(self, model, n, seed, calibration_n, sampler="distinct", batches=8):
        """--allocation search's data: n training examples that the calibration sample
        (calibration_n, seed, sampler) does not draw, seeded, in `batches` batches; not sorted by
        length, since the search's first stage scores the first quarter of the batches."""
        used = set(glue.calibration_indices(len(self.train), calibration_n, seed, sampler))
        free = [i for i in range(len(self.train)) if i not in used]
        if n > len(free):
            raise UserError(f"--search_examples {n}: the training set has {len(free)} examples besides the "
                            "calibration sample")
        # a stream of its own ([seed, 22]), so the draw never repeats the calibration sample's generator
        picks = np.random.default_rng([seed, 22]).choice(free, size=n, replace=False)
        encoded = glue.encode([self.train[i] for i in picks], self.tokenizer, self.spec)
        return [accepted_inputs(model, b) for b in glue.batches(encoded, -(-n // batches), self.tokenizer.pad_token_id)]

    def labelled_sample(self, n, seed):
        """Kwon et al.'s sample: n encoded training examples with their labels, drawn with
        replacement (dataset/sampling.py), in the order drawn."""
        picks = draw_with_replacement(len(self.train), n, seed)
        return glue.encode([self.train[i] for i in picks], self.tokenizer, self.spec)

    def labelled_batches(self, model, sample):
        return [labelled_inputs(model, b)
                for b in glue.batches(sample, self.labelled_batch_size, self.tokenizer.pad_token_id)]

    def evaluate(self, model, device):
        batches = {split: self._batches(encoded, model) for split, encoded in self.eval_sets.items()}
        mapping = class_to_label(self.spec, model.config)
        if mapping is not None and not self._told_mapping:
            print(f"note: the checkpoint orders the {self.name} classes "
                  f"{[model.config.id2label[i] for i in range(len(mapping))]}; its predictions are mapped to "
                  f"the dataset's order {list(self.spec.label_names)}", file=sys.stderr)
            self._told_mapping = True
        return evaluate_task(model, self.spec, batches, device, class_to_label=mapping)

    def eval_fingerprint(self):
        """A hash of everything the evaluation reads (tokens and labels of every split)."""
        return fingerprint([self.name, self.eval_sets])

    def latency_batch(self, model, size=32):
        """A fixed batch of dev examples, padded to the longest, for timing forward passes."""
        first = next(iter(self.eval_sets.values()))[:size]
        return accepted_inputs(model, glue.collate(first, self.tokenizer.pad_token_id))


class SquadTask:
    labelled_batch_size = 12  # Kwon et al.'s, for SQuAD
    classification = False

    def __init__(self, name, tokenizer, data_dir, batch_size):
        self.name = name
        self.version = SQUAD_VERSIONS[name]
        self.metric_name = "f1"
        self.mac_seq_len = SQUAD_MAC_SEQ_LEN
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.train = squad.load_squad(self.version, "train", data_dir)
        self.examples = squad.load_squad(self.version, "validation", data_dir)
        self.features = squad.prepare_eval_features(self.examples, tokenizer)

    def calibration_batches(self, model, n, seed, sampler="distinct"):
        return self.batch_calibration(model, self.calibration_sample(n, seed, sampler))

    def calibration_sample(self, n, seed, sampler="distinct"):
        """n training features; needs no model, so a bad n fails before any model work.

        with_replacement draws, as Kwon et al., among the features of the whole training set:
        the same draw as their labelled sample, which counts the features and makes only those
        drawn; distinct among those of a seeded random part of it (_some_train_features)."""
        if sampler == "with_replacement":
            if n < 1:
                raise UserError(f"the calibration sample size must be positive, got {n}")
            sample = self.labelled_sample(n, seed)
        else:
            sample = squad.sample_calibration_features(self._some_train_features(n, seed), n, seed, sampler)
        sample.sort(key=lambda f: len(f["input_ids"]))
        return sample

    def batch_calibration(self, model, sample):
        return [accepted_inputs(model, squad.collate(chunk, self.tokenizer.pad_token_id))
                for chunk in squad.batches(sample, self.batch_size)]

    def search_batches(self, model, n, seed, calibration_n, sampler="distinct", batches=8, chunk=1000):
        """--allocation search's data: n training features of examples that the calibration
        sample (calibration_n, seed, sampler) draws no feature of, seeded, in `batches` batches:
        the first n features of those examples taken in a random order of their own."""
        used = {f["example_index"] for f in self.calibration_sample(calibration_n, seed, sampler)}
        # a stream of its own ([seed, 22]), so the order never repeats the calibration sample's
        free = [int(i) for i in np.random.default_rng([seed, 22]).permutation(len(self.train)) if int(i) not in used]
        features = []
        for start in range(0, len(free), chunk):
            features += squad.prepare_train_features([self.train[i] for i in free[start:start + chunk]], self.tokenizer)
            if len(features) >= n:
                break
        if n > len(features):
            raise UserError(f"--search_examples {n}: the training set has {len(features)} features besides the "
                            "calibration sample's examples")
        return [accepted_inputs(model, squad.collate(part, self.tokenizer.pad_token_id))
                for part in squad.batches(features[:n], -(-n // batches))]

    def labelled_sample(self, n, seed):
        """Kwon et al.'s sample: n of all the training features (with the answers' start and
        end positions), drawn with replacement, in the order drawn."""
        counts = self._train_feature_counts
        picks = draw_with_replacement(int(counts.sum()), n, seed)
        return squad.train_features_at(self.train, self.tokenizer, picks, counts)

    @functools.cached_property
    def _train_feature_counts(self):
        """Every training example's number of features: a pass over the whole training set,
        made once (the search's held-out draw asks for the calibration sample again)."""
        return squad.train_feature_counts(self.train, self.tokenizer)

    def labelled_batches(self, model, sample):
        return [labelled_inputs(model, squad.collate(chunk, self.tokenizer.pad_token_id, with_positions=True))
                for chunk in squad.batches(sample, self.labelled_batch_size)]

    def _some_train_features(self, n, seed, chunk=1000):
        """Features of training examples taken in a seeded random order until there are at
        least 2n of them: featurising all ~130k examples would take minutes for 512 features."""
        order = np.random.default_rng(seed).permutation(len(self.train))
        features = []
        for start in range(0, len(order), chunk):
            part = squad.prepare_train_features([self.train[i] for i in order[start:start + chunk]], self.tokenizer)
            features += [dict(f, example_index=int(order[start + f["example_index"]])) for f in part]
            if len(features) >= 2 * n:
                break
        return features

    def evaluate(self, model, device):
        metrics = evaluate_squad(model, self.examples, self.features, self.version, device, self.batch_size)
        self.last_timing = {k: metrics.pop(k) for k in ("forward_seconds", "postprocess_seconds")}
        return metrics

    def eval_fingerprint(self):
        """A hash of everything the evaluation reads (the examples, their answers, the features)."""
        return fingerprint([self.name, self.examples, self.features])

    def latency_batch(self, model, size=32):
        return accepted_inputs(model, squad.collate(self.features[:size], self.tokenizer.pad_token_id))
