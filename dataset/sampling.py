"""Kwon et al.'s draw of a labelled calibration sample (their main.py).

Their script seeds numpy's global generator (transformers.set_seed(seed) calls
np.random.seed(seed)) and then draws `np.random.choice(len(training_set), num_samples)`: indices
*with* replacement, in the order drawn, from the legacy generator. `RandomState(seed)` is that
generator without the global state, so the same seed gives the same indices.
"""
import numpy as np

from utils.errors import UserError


def draw_with_replacement(population, n, seed):
    """n indices into range(population), drawn with replacement as Kwon et al. draw them."""
    if n < 1:
        raise UserError(f"the number of samples must be positive, got {n}")
    if population < 1:
        raise UserError("the training set is empty: nothing to draw a sample from")
    return np.random.RandomState(seed).choice(population, n)
