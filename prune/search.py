"""Per-layer widths searched against the whole model (`--allocation search`).

The allocators of prune/allocation.py share the budget by a sum of per-layer prices; the model's
error is not that sum. Here the widths are judged end to end, in the manner of EvoPress
(Sieberling et al. 2024): the KL divergence of the pruned model's next-token distribution to
the dense model's, on calibration windows held out of the IDs' fit (an encoder's: of its class
or answer-span distribution, on training examples the calibration sample does not draw).

- `LevelDatabase`: pass 1's solved pruners (the IDs on the dense model's inputs) give each
  block, with its correction, at *any* width (the first k units of the ID order), so a
  candidate costs a forward pass, not a factorisation.
- `Fitness`: the KL of a candidate, from the first layer where it differs from the parent (the
  parent's hidden states at every layer are kept), on the first few windows or all of them.
- `search`: a parent (the knapsack's widths), offspring that move width between layers of the
  same kind (so their MACs stay those of the parent: the budget is met exactly as the allocator
  met it) or trade an attention unit for the neurons of its MACs (never above the start's MACs),
  selection in two stages (all offspring on a quarter of the windows, the best few on
  all of them), the parent kept unless a child beats it on all the windows; until a budget of
  forward tokens is spent.
The final model is built afterwards by pass 2 at the searched widths (prune/stat.py).
"""
import copy
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prerequisites.layerwise import capture_inputs, move_to, restore
from utils.atomic import atomic_file
from utils.errors import UserError

OFFSPRING = 16  # children per generation, all scored on a quarter of the fitness windows
SURVIVORS = 2  # of them, scored on every fitness window against the parent
LEVELS = 48  # a neuron move is a 48th of the layer's width (32 of SmolLM2's 1,536), or --width_multiple


@dataclass
class SearchSettings:
    """What `--allocation search` needs besides pass 1: the batches of the fitness windows (held
    out of the IDs' fit), its budget of forward work in layer-tokens, its seed, and the
    allocator whose widths it starts from."""
    batches: list
    budget_tokens: float
    seed: int = 0
    start: str = "ffn_greedy"


@dataclass
class SearchResult:
    attn_units: list
    neurons: list
    start_fitness: float  # KL to the dense model, per token, on every fitness window
    fitness: float
    generations: int = 0
    improvements: int = 0  # generations whose best child replaced the parent
    layer_tokens: float = 0.0  # forward work spent: tokens × the share of the layers they went through
    seconds: float = 0.0
    history: list = field(default_factory=list)  # the parent's fitness after each generation

    def record(self, settings, calibration_tokens):
        """What a run's record keeps of the search: its settings, its spending (also in dense
        passes of the calibration tokens), the KL of its start and of its result."""
        held_out = sum(len(batch["input_ids"]) for batch in settings.batches)  # windows, or examples
        return {"start": settings.start, "seed": settings.seed, "windows": held_out,
                "budget_tokens": settings.budget_tokens, "layer_tokens": self.layer_tokens,
                "dense_passes": self.layer_tokens / calibration_tokens, "kl_start": self.start_fitness,
                "kl": self.fitness, "generations": self.generations, "improvements": self.improvements,
                "seconds": self.seconds, "history": self.history}


class LevelDatabase:
    """Layer l at any widths: a copy of the dense layer pruned by pass 1's pruners (kept for the
    most recent `capacity` widths asked for; the dense layer itself when nothing is removed)."""

    def __init__(self, model, adapter, pruners, capacity=None):
        self.adapter = adapter
        self.layers = list(adapter.layers(model))
        self.pruners = pruners
        self.full = adapter.shape(model)
        self.cache = OrderedDict()
        self.capacity = capacity or 4 * len(self.layers)

    def layer(self, l, attn_units, neurons):
        if attn_units == self.full[0][l] and neurons == self.full[1][l]:
            return self.layers[l]
        key = (l, attn_units, neurons)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        layer = copy.deepcopy(self.layers[l])
        attn, ffn = self.pruners[l]
        if attn_units < self.full[0][l]:
            self.adapter.prune_attn_units(layer, *attn.prune(attn_units))
        if neurons < self.full[1][l]:
            self.adapter.prune_neurons(layer, *ffn.prune(neurons))
        self.cache[key] = layer
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return layer


class Fitness:
    """KL(dense ‖ candidate) on batches held out of the IDs' fit: for a decoder per token, of the
    next-token distributions; for an encoder per example, of the class distributions (a
    regression head, one output: the squared difference of the scores), or of a span head's
    (start, end) distribution over the example's real tokens (QA).

    Keeps the parent's hidden states at the input of every layer (and after the last), so a
    candidate that first differs from the parent at layer i runs layers i.. only. Memory: (L + 1)
    × the batches' hidden states for the parent, as much for the candidate scored on all the
    batches, and the dense model's next-token probabilities (tokens × vocabulary, float32)."""

    def __init__(self, model, adapter, database, batches, device):
        self.model, self.adapter, self.db, self.device = model, adapter, database, device
        inputs = capture_inputs(model, adapter, batches, device)
        if adapter.is_decoder and any(m is not None for m in inputs.masks):
            raise ValueError("the fitness windows must be whole windows (no padding): every token is counted")
        self.extras, self.masks = inputs.extras, inputs.masks
        # real tokens (an encoder's batches are padded): what the budget counts
        self.tokens = [int(x.shape[:-1].numel() if m is None else m.sum()) for x, m in zip(inputs.hidden, inputs.masks)]
        self.L = len(database.layers)
        self.layer_tokens = 0.0
        self.first_inputs = [inputs.hidden]  # the parent's states, as far as every candidate shares them
        self.parent_states = self.first_inputs
        dense_final = self._run(*database.full, 0, self.first_inputs, len(self.tokens), keep=False)[-1]
        self.dense_tokens, self.layer_tokens = self.layer_tokens, 0.0  # the dense run is not the search's
        self.dense_probs, self.dense_neg_entropy = self._dense_distribution(dense_final)

    def set_parent(self, states):
        self.parent_states = states

    def score(self, attn_units, neurons, start, windows, keep=False):
        """(KL per token on the first `windows` batches, the states at every layer when `keep`)."""
        states = self._run(attn_units, neurons, start, self.parent_states, windows, keep)
        return self._kl(states[-1], windows), (states if keep else None)

    @torch.no_grad()
    def _run(self, attn_units, neurons, start, parent, windows, keep):
        """Hidden states from layer `start` on (the parent's below it): every layer's input when
        `keep` (states[l] for l = 0..L), else the last only."""
        hidden = list(parent[start][:windows])
        states = list(parent[:start]) + [hidden] if keep else None
        for l in range(start, self.L):
            layer = self.db.layer(l, attn_units[l], neurons[l])
            moved = move_to([layer], self.device)
            out = [layer(x, **extras) for x, extras in zip(hidden, self.extras)]
            hidden = [o[0] if isinstance(o, tuple) else o for o in out]
            if moved:  # restore also trims the heap: not worth it 30 times a candidate on the CPU
                restore(moved)
            if keep:
                states.append(hidden)
        self.layer_tokens += sum(self.tokens[:windows]) * (self.L - start) / self.L
        return states if keep else [hidden]

    @torch.no_grad()
    def _dense_distribution(self, final):
        """The dense model's next-token probabilities p of every window (float32, tokens × vocabulary:
        100 MB a window of 512 tokens of SmolLM2), and Σ p log p of each: computed once, so that a
        candidate's KL costs one product with the output layer, not two. (An encoder's: its head's
        outputs, _encoder_head, per batch.)"""
        moved = move_to(self.adapter.post_layer_modules(self.model), self.device)
        if not self.adapter.is_decoder:
            heads = [self._encoder_head(x, mask) for x, mask in zip(final, self.masks)]
            restore(moved)
            return heads, None
        probs, neg_entropy = [], []
        for x in final:
            window_probs, total = [], 0.0
            for h in x:
                log_p = F.log_softmax(self.adapter.logits(self.model, h[None])[0].float(), dim=-1)
                window_probs.append(log_p.exp())
                total += float((window_probs[-1] * log_p).sum(-1).double().sum())
            probs.append(window_probs)
            neg_entropy.append(total)
        restore(moved)
        return probs, neg_entropy

    @torch.no_grad()
    def _kl(self, final, windows):
        """Σ p (log p − log q) = Σ p log p − Σ_t (Σ_v p z − logsumexp z), with z the candidate's
        logits (Σ_v p = 1 at each token)."""
        moved = move_to(self.adapter.post_layer_modules(self.model), self.device)
        if not self.adapter.is_decoder:
            kl = self._encoder_divergence(final, windows)
            if moved:
                restore(moved)
            return kl
        total, count = 0.0, 0
        for x, window_probs, neg_entropy in zip(final[:windows], self.dense_probs, self.dense_neg_entropy):
            total += neg_entropy
            for h, p in zip(x, window_probs):  # a sequence at a time: its logits are the largest tensor
                z = self.adapter.logits(self.model, h[None])[0].float()
                total -= float(((p * z).sum(-1) - torch.logsumexp(z, dim=-1)).double().sum())
                count += h.shape[0]
        if moved:
            restore(moved)
        return total / count

    def _encoder_head(self, x, mask):
        """An encoder's head on its last layer's output: the classes' log-probabilities (float64),
        the score of a regression head (one output), or a span head's start and end
        log-probabilities over the real tokens (batch × positions × 2; -inf at the padding, so
        that an example's distribution does not depend on the batch it is padded in)."""
        z = self.adapter.logits(self.model, x).double()
        if z.dim() == 3:
            if mask is not None:
                z = z.masked_fill(~mask[..., None], float("-inf"))
            return F.log_softmax(z, dim=1)
        return z if z.shape[-1] == 1 else F.log_softmax(z, dim=-1)

    def _encoder_divergence(self, final, batches):
        """Per example: KL(dense ‖ candidate) of the class distributions, the squared difference
        of a regression head's scores, or the KL of the span distribution: start and end are
        independent softmaxes, so the KL of their joint distribution is the sum of theirs."""
        total, count = 0.0, 0
        for x, mask, dense in zip(final[:batches], self.masks, self.dense_probs):
            mine = self._encoder_head(x, mask)
            if dense.shape[-1] == 1:
                gap = (dense - mine) ** 2
            else:  # 0 · (-inf) at the padding: left out
                gap = torch.where(dense > float("-inf"), dense.exp() * (dense - mine), 0.0)
            total += float(gap.sum())
            count += x.shape[0]
        return total / count


@dataclass
class Exchange:
    """What lets a move trade an attention unit for neurons between blocks of different kinds:
    the MACs of each (efficiency/macs.py), the most a child may spend (the start's MACs), and
    the multiple of neurons a layer keeps (--width_multiple)."""
    attn_cost: float
    neuron_cost: float
    budget: float
    multiple: int = 1

    def slack(self, attn_units, neurons):
        return self.budget - sum(attn_units) * self.attn_cost - sum(neurons) * self.neuron_cost

    def neurons_bought(self, slack):
        """The neurons one attention unit given up pays for (with what the budget has left)."""
        n = int((self.attn_cost + slack) // self.neuron_cost)
        return n - n % self.multiple

    def neurons_paid(self, slack):
        """The neurons to give up for one more attention unit (what the budget has left counted)."""
        n = max(0, -int(-(self.attn_cost - slack) // self.neuron_cost))
        return -(-n // self.multiple) * self.multiple


def mutate(attn_units, neurons, full, steps, rng, moves, exchange=None):
    """A child: `moves` times, `steps[kind]` units (fewer where a layer has fewer to give or room
    for) move from one layer to another of the same kind, so the MACs stay the parent's; with an
    `exchange`, a move may also trade one attention unit for neurons, either way, within its
    budget. Returns (attn_units, neurons, the first layer changed), or None when no move is
    possible."""
    widths = {"attn": list(attn_units), "ffn": list(neurons)}
    first = None
    for _ in range(moves):
        kinds = [kind for kind in widths if _movable(widths[kind], full[kind])]
        trades = _trades(widths, full, exchange) if exchange else {}
        if trades:
            kinds.append("trade")
        if not kinds:
            break
        kind = kinds[rng.integers(len(kinds))]
        if kind == "trade":
            direction = list(trades)[rng.integers(len(trades))]
            donor, receiver = _trade(widths, full, direction, trades[direction], rng)
        else:
            w, top = widths[kind], full[kind]
            donor = rng.choice([l for l, n in enumerate(w) if n > 0 and any(
                m < top[r] for r, m in enumerate(w) if r != l)])
            receiver = rng.choice([r for r, m in enumerate(w) if m < top[r] and r != donor])
            amount = min(steps[kind], w[donor], top[receiver] - w[receiver])
            w[donor] -= amount
            w[receiver] += amount
        first = min(donor, receiver) if first is None else min(first, donor, receiver)
    if first is None:
        return None
    return widths["attn"], widths["ffn"], int(first)


def _trades(widths, full, exchange):
    """{direction: neurons} of the trades of one attention unit possible now: the neurons it
    buys, or those it costs."""
    a, n = widths["attn"], widths["ffn"]
    slack = exchange.slack(a, n)
    trades = {}
    bought, paid = exchange.neurons_bought(slack), exchange.neurons_paid(slack)
    if bought > 0 and any(a) and any(m < f for m, f in zip(n, full["ffn"])):
        trades["attn_for_neurons"] = bought
    if any(u < f for u, f in zip(a, full["attn"])) and any(m >= paid for m in n):
        trades["neurons_for_attn"] = paid
    return trades


def _trade(widths, full, direction, amount, rng):
    """One trade of an attention unit for `amount` neurons in `direction`, between random layers;
    returns (donor, receiver)."""
    a, n = widths["attn"], widths["ffn"]
    if direction == "attn_for_neurons":
        donor = rng.choice([l for l, u in enumerate(a) if u > 0])
        receiver = rng.choice([l for l, m in enumerate(n) if m < full["ffn"][l]])
        a[donor] -= 1
        n[receiver] += min(amount, full["ffn"][receiver] - n[receiver])
    else:
        paid = amount
        donor = rng.choice([l for l, m in enumerate(n) if m >= paid])
        receiver = rng.choice([l for l, u in enumerate(a) if u < full["attn"][l]])
        n[donor] -= paid
        a[receiver] += 1
    return int(donor), int(receiver)


def _movable(widths, full):
    """Whether some unit can move from one layer to another."""
    return any(n > 0 and any(m < full[r] for r, m in enumerate(widths) if r != l) for l, n in enumerate(widths))


def neuron_step(full_neurons, width_multiple=1):
    """How many neurons one move shifts: a LEVELS-th of the widest layer, in multiples of --width_multiple."""
    step = max(1, -(-max(full_neurons) // LEVELS))
    return max(width_multiple, step - step % width_multiple)


def search(fitness, attn_units, neurons, budget_tokens, seed=0, width_multiple=1, offspring=OFFSPRING,
           survivors=SURVIVORS, progress=True, costs=None):
    """The widths (attention units, neurons per layer) of least KL found from a start, at most at
    the start's MACs, within `budget_tokens` layer-tokens of forward work. With `costs` (the MACs
    of an attention unit and of a neuron), moves also trade attention units for neurons. Returns
    a SearchResult."""
    start_time = time.perf_counter()
    rng = np.random.default_rng(seed)
    full = {"attn": fitness.db.full[0], "ffn": fitness.db.full[1]}
    steps = {"attn": 1, "ffn": neuron_step(full["ffn"], width_multiple)}
    windows = len(fitness.tokens)
    first_stage = max(1, windows // 4)
    parent = (list(attn_units), list(neurons))
    exchange = None
    if costs is not None:
        start_macs = sum(attn_units) * costs[0] + sum(neurons) * costs[1]
        exchange = Exchange(costs[0], costs[1], start_macs, width_multiple)
    fitness.set_parent(fitness.first_inputs)
    parent_fitness, states = fitness.score(*parent, 0, windows, keep=True)
    fitness.set_parent(states)
    result = SearchResult(list(attn_units), list(neurons), parent_fitness, parent_fitness)
    bar = tqdm(total=budget_tokens, desc="search", disable=not progress, unit="tok", unit_scale=True)
    bar.set_postfix(kl=f"{parent_fitness:.4f}")
    while fitness.layer_tokens < budget_tokens:
        children = []
        for _ in range(offspring):
            child = mutate(*parent, full, steps, rng, moves=int(rng.integers(1, 4)), exchange=exchange)
            if child is None:
                break
            children.append(child)
        if not children:  # every layer full or empty: nothing to search
            break
        scored = sorted((fitness.score(a, n, first, first_stage)[0], i) for i, (a, n, first) in enumerate(children))
        best = None
        for _, i in scored[:survivors]:
            a, n, first = children[i]
            kl, child_states = fitness.score(a, n, first, windows, keep=True)
            if kl < parent_fitness and (best is None or kl < best[0]):
                best = (kl, (a, n), child_states)
            del child_states
        if best is not None:
            parent_fitness, parent, states = best[0], best[1], best[2]
            fitness.set_parent(states)
            result.improvements += 1
        result.generations += 1
        result.history.append(parent_fitness)
        bar.update(min(fitness.layer_tokens, budget_tokens) - bar.n)
        bar.set_postfix(kl=f"{parent_fitness:.4f}")
    bar.close()
    result.attn_units, result.neurons = [int(a) for a in parent[0]], [int(n) for n in parent[1]]
    result.fitness, result.layer_tokens = parent_fitness, fitness.layer_tokens
    result.seconds = time.perf_counter() - start_time
    return result


def measured_weights(fitness, scores, attn_units, neurons, mu, kinds=("attn", "neuron"), progress=True):
    """`--allocation measured`: per layer, the weights (for attention units, for neurons) under
    which a block's price at the start's width k is its measured cost to the whole model:
    w² e(k)² = KL(dense ‖ the dense model with that block alone pruned to k), with e the ID's error
    curve of pass 1 (`scores`). The knapsack then reads each block's curve, shaped by its ID,
    at the scale of the model's error, in place of a depth weighting. The width k is probe_width's:
    the start's, or the share of its kind the start keeps overall, or the budget μ, where that is
    smaller. Returns
    (w_attn, w_neuron, a record: the KL of every block measured, at which width, and the forward
    work spent in layer-tokens)."""
    start_time = time.perf_counter()
    full = {"attn": list(fitness.db.full[0]), "neuron": list(fitness.db.full[1])}
    start = {"attn": list(attn_units), "neuron": list(neurons)}
    windows = len(fitness.tokens)
    _, states = fitness.score(full["attn"], full["neuron"], 0, windows, keep=True)
    fitness.set_parent(states)  # the dense model's states: a block's candidate runs from its layer on
    weights = {kind: np.zeros(len(scores)) for kind in full}
    record = {"kl": {}, "width": {}}
    blocks = [(kind, l) for kind in kinds for l in range(len(scores)) if full[kind][l] > 0]
    for kind, l in tqdm(blocks, desc="measured prices", disable=not progress):
        k = probe_width(start[kind][l], full[kind][l], min(mu, sum(start[kind]) / sum(full[kind])))
        widths = {name: list(full[name]) for name in full}
        widths[kind][l] = k
        kl = max(0.0, fitness.score(widths["attn"], widths["neuron"], l, windows)[0])
        errors = scores[l].attn_errors if kind == "attn" else scores[l].neuron_errors
        weights[kind][l] = np.sqrt(kl) / errors[k] if errors[k] > 0 else 0.0
        record["kl"].setdefault(kind, [None] * len(scores))[l] = kl
        record["width"].setdefault(kind, [None] * len(scores))[l] = k
    fitness.set_parent(fitness.first_inputs)
    record.update(layer_tokens=fitness.layer_tokens, seconds=time.perf_counter() - start_time)
    return weights["attn"], weights["neuron"], record


def probe_width(width, full, share):
    """Where a block's cost is measured: the smaller of its start width and `share` of its units,
    at least one removed. (At the start's width alone, a block it keeps nearly whole measures a
    KL of ~0 for its last few units, and the weight read from that empties it: SmolLM2's layer 1
    lost all its 1,536 neurons that way, +26 % perplexity. measured_weights caps the share at μ
    for the same reason: `greedy` on SmolLM2 keeps every neuron, and FFNs probed at 1,535 of
    1,536 were emptied, perplexity 46,811.)"""
    return int(min(full - 1, width, round(share * full)))


# ---------------------------------------------------------------------------------------------
# Widths saved and read back (--save_widths, --widths)


def save_widths(path, attn_units, neurons, **about):
    """A JSON object with the per-layer widths (the keys of a run's record) and what produced them."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump({**about, "heads_per_layer": list(attn_units), "neurons_per_layer": list(neurons)}, f, indent=1)


def load_widths(path, shape, costs, mu):
    """(attention units, neurons per layer) from a JSON object with heads_per_layer and
    neurons_per_layer (a --save_widths file, or a run's record), checked against the dense
    model's shape (its attention units and neurons per layer) and the budget μ under `costs`
    (the MACs of one attention unit and of one neuron); a UserError says what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--widths {path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict) or not {"heads_per_layer", "neurons_per_layer"} <= data.keys():
        raise UserError(f"--widths {path}: needs a JSON object with heads_per_layer and neurons_per_layer")
    widths = (data["heads_per_layer"], data["neurons_per_layer"])
    problem = widths_problem(widths, shape, costs, mu)
    if problem:
        raise UserError(f"--widths {path}: {problem}")
    return tuple(list(w) for w in widths)


def widths_problem(widths, shape, costs, mu):
    """What keeps (attention units, neurons) per layer from being a pruning of a model of `shape`
    within μ of its MACs, in words; None when nothing does."""
    for given, full, key in zip(widths, shape, ("heads_per_layer", "neurons_per_layer")):
        if not isinstance(given, (list, tuple)) or len(given) != len(full) or not all(
                isinstance(g, int) and not isinstance(g, bool) and 0 <= g <= f for g, f in zip(given, full)):
            return f"{key} must be {len(full)} integers, each between 0 and the dense model's {list(full)}"
    macs = sum(a * costs[0] + n * costs[1] for a, n in zip(*widths))
    dense = sum(a * costs[0] + n * costs[1] for a, n in zip(*shape))
    if macs > mu * dense * (1 + 1e-9):
        return f"they keep {macs / dense:.4f} of the MACs, more than mu {mu}"
    return None
