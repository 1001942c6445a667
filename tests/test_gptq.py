import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantize.gptq import GPTQ, Quantizer, default_group_index, rtn_quantize
from quantize.pack import QuantizedWeight, pack_codes, quantized_prefixes, unpack_codes


def correlated_inputs(n, d, seed):
    # Mixing makes H far from diagonal (where GPTQ's error feedback matters); per-input scales
    # make diag(H) uneven (where act_order matters).
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    return (z @ mix) * torch.exp(0.5 * torch.randn(d, generator=g))


def make_layer(rows, columns, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, columns, generator=g))
    return layer


def gptq(layer, x, **kwargs):
    q = GPTQ(layer)
    q.add_batch(x)
    return q.quantize(**kwargs)


def output_error(x, w_ref, layer):
    return (x @ w_ref.T - x.to(layer.weight.dtype) @ layer.weight.detach().T).norm().item()


def assert_on_grid(result, weight):
    maxq = 2**result.bits - 1
    assert int(result.codes.max()) <= maxq and int(result.zeros.max()) <= maxq
    if result.sym:
        assert torch.all(result.zeros == 2 ** (result.bits - 1))
    assert torch.all(result.scales > 0)
    g = result.g_idx
    grid = result.scales[:, g] * (result.codes.to(result.scales.dtype) - result.zeros.to(result.scales.dtype)[:, g])
    assert torch.equal(grid.to(weight.dtype), weight.detach())


# --- reference: OBQ written directly from the formulas, one column at a time, no blocking ---


def reference_minmax(w, bits, sym):
    maxq = 2**bits - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale)
    return scale, zero


def reference_gptq(W, H, bits, groupsize, sym, act_order, percdamp):
    """Returns codes, dequantized weight, summed loss and the dampened H (all in original order)."""
    W, H = W.clone(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(columns, dtype=H.dtype)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(columns)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    loss = 0.0
    size = columns if groupsize == -1 else groupsize
    for pos, c in enumerate(order.tolist()):
        if pos % size == 0:
            scale, zero = reference_minmax(W[:, order[pos : pos + size]], bits, sym)
        q = torch.clamp(torch.round(W[:, c] / scale) + zero, 0, 2**bits - 1)
        delta = W[:, c] - scale * (q - zero)
        loss += (delta**2 / Hinv[c, c]).sum().item() / 2
        # Optimal update of all weights not yet fixed (rows/columns of fixed ones are 0 in Hinv),
        # then remove column c from the inverse by Gaussian elimination.
        W -= torch.outer(delta / Hinv[c, c], Hinv[c])
        Hinv -= torch.outer(Hinv[:, c], Hinv[c]) / Hinv[c, c]
        W[:, c] = scale * (q - zero)
        codes[:, c] = q
    return codes, W, loss, H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("groupsize,sym", [(-1, False), (-1, True), (8, False), (10, False)])
def test_blocked_gptq_matches_unblocked_reference(groupsize, sym, act_order):
    # No symmetric groups here: the symmetric grid puts a group's largest weight exactly on a
    # rounding tie (|w| / scale = maxq / 2), so when it is the group's first column one ulp of
    # summation order decides its code and the two implementations may legitimately diverge.
    x = correlated_inputs(200, 24, seed=1).double()
    x[:, 5] = 0  # a dead input
    layer = make_layer(6, 24, seed=2, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    q = GPTQ(layer)
    q.add_batch(x)
    codes, W_ref, loss, H_damped = reference_gptq(w0, q.H, 3, groupsize, sym, act_order, 0.01)
    result = q.quantize(3, groupsize=groupsize, sym=sym, act_order=act_order, blocksize=7)

    assert torch.equal(result.codes, codes.to(torch.uint8))
    torch.testing.assert_close(layer.weight.detach(), W_ref, rtol=0, atol=1e-12)
    assert result.error == pytest.approx(loss, rel=1e-9)
    # The summed loss is the dampened quadratic form of the total weight change.
    w0[:, 5] = 0
    dw = w0 - layer.weight.detach()
    assert result.error == pytest.approx(0.5 * torch.einsum("ri,ij,rj->", dw, H_damped, dw).item(), rel=1e-9)


@pytest.mark.parametrize("groupsize,act_order", [(-1, False), (16, False), (16, True), (12, True)])
def test_lazy_block_updates_are_exact(groupsize, act_order):
    x = correlated_inputs(200, 40, seed=3).double()
    results, weights = [], []
    for blocksize in (5, 16, 128):
        layer = make_layer(8, 40, seed=4, dtype=torch.float64)
        results.append(gptq(layer, x, wbits=3, groupsize=groupsize, act_order=act_order, blocksize=blocksize))
        weights.append(layer.weight.detach())
    for result, weight in zip(results[1:], weights[1:]):
        assert torch.equal(result.codes, results[0].codes)
        torch.testing.assert_close(weight, weights[0], rtol=0, atol=1e-12)
        assert result.error == pytest.approx(results[0].error, rel=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groupsize", [-1, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_weights_lie_on_their_group_grid(bits, groupsize, sym):
    x = correlated_inputs(128, 48, seed=5)
    layer = make_layer(12, 48, seed=6)
    assert_on_grid(gptq(layer, x, wbits=bits, groupsize=groupsize, sym=sym, act_order=True), layer.weight)
    layer = make_layer(12, 48, seed=6)
    result = rtn_quantize(layer, bits, groupsize=groupsize, sym=sym)
    assert_on_grid(result, layer.weight)
    assert torch.equal(result.g_idx, default_group_index(48, groupsize))


def test_rtn_rounds_to_nearest_within_range():
    layer = make_layer(5, 20, seed=7)
    w = layer.weight.detach().clone()
    result = rtn_quantize(layer, 4, groupsize=5)
    step = result.scales[:, result.g_idx]
    assert torch.all((layer.weight.detach() - w).abs() <= step / 2 + 1e-6)
    assert result.error == pytest.approx(((layer.weight.detach() - w) ** 2).sum().item(), rel=1e-5)


def test_all_zero_rows_get_a_positive_scale():
    quantizer = Quantizer(4)
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    quantizer.find_params(w)
    assert torch.all(quantizer.scale > 0)
    assert torch.equal(quantizer.quantize(w)[0], torch.zeros(8))
    assert torch.equal(quantizer.quantize(w)[2], torch.zeros(8))

    layer = make_layer(4, 16, seed=8)
    with torch.no_grad():
        layer.weight[2] = 0
    for sym in (False, True):
        result = gptq(copy.deepcopy(layer), correlated_inputs(64, 16, seed=9), wbits=3, groupsize=8, sym=sym)
        assert torch.all(result.scales > 0)
        assert torch.all(result.codes[2] == result.zeros[2, 0])


def test_eight_bits_barely_changes_the_output():
    x = correlated_inputs(256, 64, seed=10)
    layer = make_layer(32, 64, seed=11)
    w0 = layer.weight.detach().clone()
    gptq(layer, x, wbits=8)
    assert output_error(x, w0, layer) / (x @ w0.T).norm().item() < 1e-2


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    x = correlated_inputs(512, 64, seed=12)
    held_out = correlated_inputs(512, 64, seed=12)[256:]  # same mixing: same distribution
    layer = make_layer(32, 64, seed=13)
    w0 = layer.weight.detach().clone()
    gptq(layer, x[:256], wbits=bits)
    rtn_layer = make_layer(32, 64, seed=13)
    rtn_quantize(rtn_layer, bits)
    for data in (x[:256], held_out):
        assert output_error(data, w0, layer) < 0.85 * output_error(data, w0, rtn_layer)


def test_act_order_changes_result_and_keeps_original_column_order():
    x = correlated_inputs(256, 48, seed=14)
    plain_layer, ordered_layer = make_layer(16, 48, seed=15), make_layer(16, 48, seed=15)
    w0 = plain_layer.weight.detach().clone()
    plain = gptq(plain_layer, x, wbits=3, groupsize=16)
    ordered = gptq(ordered_layer, x, wbits=3, groupsize=16, act_order=True)
    assert not torch.equal(plain.codes, ordered.codes)
    assert output_error(x, w0, ordered_layer) < output_error(x, w0, plain_layer)

    # Groups follow the permuted order, so g_idx is not col // groupsize and must be stored.
    perm = torch.argsort(torch.diag(x.T @ x), descending=True)
    assert torch.equal(ordered.g_idx[perm], torch.arange(48) // 16)
    stored = QuantizedWeight.from_result(ordered)
    assert stored.g_idx is not None
    assert torch.equal(stored.dequantize(torch.float32), ordered_layer.weight.detach())
    assert torch.equal(stored.codes(), ordered.codes)
    # Each code decodes to its own column: codes are in the original column order.
    assert_on_grid(ordered, ordered_layer.weight)


def test_groups_lower_the_error():
    x = correlated_inputs(256, 64, seed=16)
    errors = {}
    for groupsize in (-1, 32, 8):
        layer = make_layer(16, 64, seed=17)
        w0 = layer.weight.detach().clone()
        result = gptq(layer, x, wbits=3, groupsize=groupsize)
        errors[groupsize] = output_error(x, w0, layer)
        assert result.scales.shape == (16, 1 if groupsize == -1 else 64 // groupsize)
    assert errors[8] < errors[32] < errors[-1]


def test_dead_inputs_get_zero_weights():
    x = correlated_inputs(128, 24, seed=18)
    x[:, [0, 7, 23]] = 0
    for act_order in (False, True):
        layer = make_layer(8, 24, seed=19)
        w0 = layer.weight.detach().clone()
        result = gptq(layer, x, wbits=4, groupsize=8, act_order=act_order)
        w = layer.weight.detach()
        assert torch.isfinite(w).all() and math.isfinite(result.error)
        assert torch.all(w[:, [0, 7, 23]] == 0)
        assert output_error(x, w0, layer) < 0.2 * (x @ w0.T).norm().item()


def test_add_batch_running_mean_and_padding_mask():
    x = torch.randn(3, 10, 6)  # (batch, seq, features)
    mask = torch.rand(3, 10) > 0.3
    rows = x[mask]
    once, streamed, masked = (GPTQ(nn.Linear(6, 4)) for _ in range(3))
    once.add_batch(rows)
    streamed.add_batch(rows[:5])
    streamed.add_batch(rows[5:])
    masked.add_batch(x, mask=mask)
    expected = 2 * rows.T @ rows / rows.shape[0]
    for q in (once, streamed, masked):
        assert q.nsamples == rows.shape[0]
        torch.testing.assert_close(q.H, expected)
    q.free()
    assert q.H is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_is_bit_exact_in_the_model_dtype(dtype):
    x = correlated_inputs(128, 40, seed=20)
    layer = make_layer(10, 40, seed=21, dtype=dtype)
    result = gptq(layer, x.to(dtype), wbits=4, groupsize=16, act_order=True)
    assert layer.weight.dtype == dtype and result.scales.dtype == torch.float32
    stored = QuantizedWeight.from_result(result)
    assert torch.equal(stored.dequantize(dtype), layer.weight.detach())


def test_float16_scales_would_not_be_exact():
    # Why scales are stored in float32: GPTQ's grid uses float32 scales, and rounding them to
    # float16 moves some weights off the values written into the layer.
    x = correlated_inputs(128, 64, seed=22)
    layer = make_layer(32, 64, seed=23)
    stored = QuantizedWeight.from_result(gptq(layer, x, wbits=4, groupsize=16))
    stored.scales = stored.scales.half().float()
    assert not torch.equal(stored.dequantize(torch.float32), layer.weight.detach())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (4, 32)])
def test_pack_unpack_is_exact_and_dense(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(shape[0] * shape[1] * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, shape).long(), codes)


def test_pack_layout_is_a_little_endian_bit_stream():
    # 3-bit codes 5, 3, 6, least significant bit first: stream 101 110 011 -> bytes 10011101, 00000001
    assert pack_codes(torch.tensor([[5, 3, 6]]), 3).tolist() == [0b10011101, 0b00000001]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [0b00111001]
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, (7, 13))


def test_state_round_trip_through_safetensors(tmp_path):
    x = correlated_inputs(128, 40, seed=24)
    configs = {
        "model.layers.0.q_proj.": dict(wbits=4, groupsize=-1),
        "model.layers.0.k_proj.": dict(wbits=3, groupsize=16, act_order=True, sym=True),
        "model.layers.1.up_proj.": dict(wbits=2, groupsize=8),
    }
    state, weights = {}, {}
    for i, (prefix, kwargs) in enumerate(configs.items()):
        layer = make_layer(6 + i, 40, seed=25 + i, dtype=torch.float16)
        state.update(QuantizedWeight.from_result(gptq(layer, x.half(), **kwargs)).to_state(prefix))
        weights[prefix] = layer.weight.detach()
    assert "model.layers.0.k_proj.g_idx" in state and "model.layers.0.q_proj.g_idx" not in state

    save_file(state, str(tmp_path / "quantized.safetensors"))
    loaded = load_file(str(tmp_path / "quantized.safetensors"))
    assert quantized_prefixes(loaded) == sorted(configs)
    for prefix, weight in weights.items():
        stored = QuantizedWeight.from_state(loaded, prefix)
        assert stored.shape == tuple(weight.shape)
        assert torch.equal(stored.dequantize(torch.float16), weight)


# --- --gptq_reference: the reference implementation (IST-DASLab/gptq, gptq.py and quant.py), ---
# --- transcribed step by step: its quantizer, its Hessian, its blocked loop                    ---


def transcribed_grid(x, bits, sym):
    """The reference quantizer's per-row grid of a weight slice: (scale, zero), each (rows, 1)."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0])
    low = torch.minimum(x.min(1)[0], zeros)
    high = torch.maximum(x.max(1)[0], zeros)
    if sym:
        high = torch.maximum(torch.abs(low), high)
        negative = low < 0
        if torch.any(negative):
            low[negative] = -high[negative]  # rows with no negative weight keep low = 0
    empty = (low == 0) & (high == 0)
    low[empty] = -1
    high[empty] = 1
    scale = (high - low) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-low / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def transcribed_reference(weight, batches, bits, sym, groupsize, act_order, blocksize=128, percdamp=0.01):
    """The reference GPTQ on one linear's weight (rows, columns), fed 3-D input batches."""
    columns = weight.shape[1]
    H = torch.zeros(columns, columns)
    seen = 0
    for batch in batches:  # add_batch: a running mean that counts sequences
        count = batch.shape[0]
        cols_by_rows = batch.reshape(-1, columns).t()
        H *= seen / (seen + count)
        seen += count
        cols_by_rows = math.sqrt(2 / seen) * cols_by_rows.float()
        H += cols_by_rows.matmul(cols_by_rows.t())
    maxq = 2**bits - 1
    W = weight.clone().float()
    scale, zero = transcribed_grid(W, bits, sym)  # fitted before the dead columns are zeroed
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    diagonal = torch.arange(columns)
    H[diagonal, diagonal] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        block, errors, block_inv = W[:, start:stop].clone(), torch.zeros(W.shape[0], stop - start), Hinv[start:stop,
                                                                                                           start:stop]
        for i in range(stop - start):
            if groupsize != -1 and (start + i) % groupsize == 0:
                scale, zero = transcribed_grid(W[:, start + i:start + i + groupsize], bits, sym)  # W as it stands
            w, d = block[:, i], block_inv[i, i]
            q = scale * (torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq) - zero)
            Q[:, start + i] = q.flatten()
            error = (w - q.flatten()) / d
            block[:, i:] -= error.unsqueeze(1).matmul(block_inv[i, i:].unsqueeze(0))
            errors[:, i] = error
        W[:, stop:] -= errors.matmul(Hinv[start:stop, stop:])
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q


def reference_case():
    """A layer of 2+ blocks of columns with what the two implementations treat differently: rows
    with no negative weight, an all-zero row, a dead input holding a row's largest weight."""
    layer = make_layer(12, 300, seed=21)
    with torch.no_grad():
        layer.weight[0] = layer.weight[0].abs()
        layer.weight[1] = layer.weight[1].abs() * 0.1
        layer.weight[2] = 0
        layer.weight[3, 7] = 25.0
    x = correlated_inputs(3 * 2 * 20, 300, seed=22).reshape(3, 2, 20, 300)
    x[..., 7] = 0  # a dead input
    return layer, list(x)


@pytest.mark.parametrize("bits,sym,groupsize,act_order", [
    (4, True, -1, False), (4, False, -1, False), (3, True, 48, False), (4, False, 48, False),
    (4, False, 48, True), (4, False, 1024, False),
])
def test_gptq_reference_mode_equals_the_reference_algorithm(bits, sym, groupsize, act_order):
    layer, batches = reference_case()
    expected = transcribed_reference(layer.weight.detach(), batches, bits, sym, groupsize, act_order)
    q = GPTQ(layer, reference=True)
    for batch in batches:
        q.add_batch(batch)
    q.quantize(bits, groupsize=groupsize, sym=sym, act_order=act_order)
    assert torch.equal(layer.weight.detach(), expected)


@pytest.mark.parametrize("bits,sym,groupsize", [(4, True, -1), (4, False, -1), (4, False, 48)])
def test_the_reference_differs_where_the_module_says(bits, sym, groupsize):
    """Without reference=True the same layer comes out otherwise: the equality above is not
    trivially true (symmetric rows with no negative weight; a grid fitted before dead columns
    are zeroed; stale weights for groups starting inside a block)."""
    layer, batches = reference_case()
    expected = transcribed_reference(layer.weight.detach(), batches, bits, sym, groupsize, False)
    q = GPTQ(layer)
    for batch in batches:
        q.add_batch(batch)
    q.quantize(bits, groupsize=groupsize, sym=sym)
    assert not torch.equal(layer.weight.detach(), expected)


def test_reference_symmetric_grid_of_a_row_with_no_negative_weight():
    """The reference keeps xmin = 0 for such a row: step max/maxq, zero point in the middle, so
    the grid's top is (maxq - 1)/2 = 7 steps, about half the row's largest weight: clipped."""
    w = torch.tensor([[0.0, 1.0, 3.0, 7.5], [-2.0, 0.5, 1.0, 1.5]], dtype=torch.float64)
    reference, ours = Quantizer(4, sym=True, reference=True), Quantizer(4, sym=True)
    reference.find_params(w)
    ours.find_params(w)
    assert reference.scale.flatten().tolist() == [0.5, 4.0 / 15]
    assert ours.scale.flatten().tolist() == [1.0, 4.0 / 15]
    assert reference.quantize(w)[0].tolist() == [0.0, 1.0, 3.0, 3.5]  # 7.5 clipped to 7 steps of 0.5
