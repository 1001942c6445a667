"""The two protocols side by side: what `--protocol improved` (the default) and `--protocol
paper` set, per kind of run.

paper: the authors' released code, literally (docs/design.md §3): their allocation rule, their
fixed head/neuron MAC split, their order of measuring and pruning, their calibration draw,
GPTQ as the reference implementation runs it.
improved: what measured best here (docs/protocols.md).

Every knob below is also a flag of its own, whose default is None: a flag given wins over the
protocol, and `resolve` fills every flag left unset from the table, once, before the run
starts. The record of a run stores the protocol and the resolved values.
To add a knob: a row here, a flag (default None) of the same name in pipelines/flags.py.
"""
import copy

PROTOCOLS = ("improved", "paper")

# what each correction reproduces (docs/corrections.md): paper = the authors' (each block
# reproduces its own output)
CORRECTIONS = {
    "correction":     {"improved": "self",         "paper": "self"},
}

# prune_bert.py
ENCODER = {
    # knob               improved                     paper
    "allocation":     {"improved": "greedy",       "paper": "faithful"},
    "calibration":    {"improved": "sequential",   "paper": "ffn_then_attn"},
    "score_fraction": {"improved": 0.25,           "paper": 1.0},
    "mac_split":      {"improved": "exact",        "paper": "authors"},
    "sampler":        {"improved": "distinct",     "paper": "with_replacement"},
    "pricing":        {"improved": "insample",     "paper": "insample"},
    "sketch":         {"improved": None,           "paper": None},
    **CORRECTIONS,
}

# prune_opt.py and quantize_opt.py (the pruning); opt_eval.py takes the corpora only
DECODER = {
    "allocation":     {"improved": "ffn_greedy",   "paper": "faithful"},
    "calibration":    {"improved": "sequential",   "paper": "one_shot"},
    "score_fraction": {"improved": 1.0,            "paper": 1.0},  # held-out pricing scores every batch
    "mac_split":      {"improved": "exact",        "paper": "authors"},
    "pricing":        {"improved": "heldout",      "paper": "insample"},
    "sketch":         {"improved": None,           "paper": "gaussian"},  # theirs: 100 rows per 2048-token window
    **CORRECTIONS,
}
CORPORA = {  # the same in both: the authors' and GPTQ's (`--task X` stands for X and X)
    "calib_task":     {"improved": "c4",           "paper": "c4"},
    "eval_tasks":     {"improved": ["wikitext2", "ptb", "c4"], "paper": ["wikitext2", "ptb", "c4"]},
}

# quantize_opt.py: GPTQ after pruning (prune_opt.py's settings of the authors' quantize_opt.py)
QUANTIZE = {
    "wbits":          {"improved": None,           "paper": 4},
    "groupsize":      {"improved": -1,             "paper": 1024},
    "sym":            {"improved": False,          "paper": False},
    "gptq_reference": {"improved": False,          "paper": True},
    "true_sequential": {"improved": False,         "paper": False},
}
# opt_eval.py: the dense model quantized (the authors' opt_eval.py: symmetric)
DENSE_QUANTIZE = {**QUANTIZE, "sym": {"improved": False, "paper": True}}


def resolve(args, *tables):
    """Fill every knob of `tables` that args leaves None from args.protocol's column.
    Returns {knob: value} of those knobs as the run will use them."""
    if args.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {args.protocol!r}")
    settings = {}
    for table in tables:
        for knob, values in table.items():
            if getattr(args, knob, None) is None:
                setattr(args, knob, copy.copy(values[args.protocol]))
            settings[knob] = getattr(args, knob)
    return settings


def default(table, knob, protocol):
    return table[knob][protocol]
