"""What every entry script shares: one-line errors, argparse value types, device choice, seeding.

A leaf: it imports nothing of the project but utils.errors."""
import argparse
import os
import random
import sys
import warnings

import numpy as np
import torch

from utils.errors import UserError


def parse_command(parser, argv, script):
    """parser.parse_args(argv), with the command line the run was given as `args.command`
    (the script's name, then its arguments), for the run's record."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = [script, *argv]
    return args


def is_flag(token):
    """--mu or -h is a flag; -1 is a value (--groupsize -1)."""
    return token.startswith("--") or (len(token) > 1 and token[0] == "-" and token[1].isalpha())


def flag_pairs(argv):
    """A command line's flags as (flag, values) pairs in order; `--mu=0.5` is `--mu 0.5`, and a
    switch has the values None."""
    pairs, flag, values = [], None, []
    for token in argv:
        if is_flag(token):
            if flag is not None:
                pairs.append((flag, tuple(values) or None))
            flag, _, value = token.partition("=") if token.startswith("--") else (token, "", "")
            values = [value] if value else []
        elif flag is not None:
            values.append(token)
    if flag is not None:
        pairs.append((flag, tuple(values) or None))
    return pairs


def run_main(main):
    """Call main(); turn a UserError into `error: <message>` and exit status 2. Warnings are
    printed as one line `warning: <message>` (not Python's file:line and source line)."""
    python_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.formatwarning = python_format


def _one_line_warning(message, *_args, **_kwargs):
    return f"warning: {message}\n"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is reported in one line (no usage dump) with exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _share(text, name):
    """A float in (0, 1], or an argparse error that names the option."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got {text!r}")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {value}")
    return value


def mu_value(text):
    """argparse type for the MAC budget μ."""
    return _share(text, "mu")


def fraction_value(text):
    """argparse type for a share of something (the calibration set)."""
    return _share(text, "the fraction")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def seed_value(text):
    """argparse type for --seed: numpy's global seed must fit in 32 bits, unsigned."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed must be in 0..{2**32 - 1}, got {value}")
    return value


def output_dir(text):
    """argparse type for a folder the run writes into (--output_dir, --save_model).

    Checked at parse time: writing happens at the very end of a run, and a path under an
    existing file would fail only then, after all the work.
    """
    existing = os.path.abspath(text)
    while not os.path.lexists(existing):  # the folders not there yet are made when writing
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"cannot write to {text}: {existing} is not a folder")
    return text


def output_file(text):
    """argparse type for a file the run writes at its end: not a folder, nor under a file."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write to {text}: it is a folder")
    output_dir(os.path.dirname(os.path.abspath(text)))
    return text


def existing_dir(text):
    """argparse type for a folder that must already be there."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a folder: {text}")
    return text


def resolve_device(name):
    """'auto' means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
