"""Dense low-bit storage for quantized linear weights.

Layout of `pack_codes`: the codes, flattened row-major, form one bit stream in which code k takes
bits k*bits .. k*bits + bits - 1, least significant bit first, and stream bit t is bit t % 8 of
byte t // 8. The whole tensor is one stream (rows are not padded to a byte), so the packed size is
ceil(rows * cols * bits / 8) bytes and 3-bit codes really take 3 bits.

`QuantizedWeight` stores, for a (rows, cols) weight with `groups` groups per row:
    qweight  uint8, packed codes of shape (rows, cols)
    qzeros   uint8, packed zero points of shape (rows, groups), same bit width as the codes
    scales   (rows, groups) in the dtype GPTQ computed in: float32 for float16/bfloat16/float32
             layers. Float16 scales would not reproduce the weight GPTQ wrote (its grid used the
             float32 scale), so they are kept in float32 at a cost of 32 bits per group per row.
    g_idx    int32 (cols,), only when a column's group is not col // groupsize (act_order + groupsize)
    qmeta    int32 [bits, rows, cols, groupsize] (in to_state only), as safetensors holds only tensors
"""
import math
from dataclasses import dataclass

import torch

from quantize.gptq import check_bits, default_group_index

_META = "qmeta"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a flat uint8 tensor of ceil(numel * bits / 8) bytes."""
    check_bits(bits)
    flat = codes.reshape(-1)
    # Compared as Python ints: 2**8 does not fit a uint8 tensor's dtype.
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits} bits")
    flat = flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    nbytes = math.ceil(stream.numel() / 8)
    padding = torch.zeros(nbytes * 8 - stream.numel(), dtype=torch.uint8, device=flat.device)
    stream = torch.cat([stream, padding]).reshape(nbytes, 8)
    packed = torch.zeros(nbytes, dtype=torch.uint8, device=flat.device)
    for k in range(8):
        packed |= stream[:, k] << k
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes of the given shape (convert before subtracting)."""
    check_bits(bits)
    shape = tuple(shape)
    n = math.prod(shape)
    if packed.numel() != math.ceil(n * bits / 8):
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} codes of {bits} bits")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[: n * bits].reshape(n, bits)
    codes = torch.zeros(n, dtype=torch.uint8, device=packed.device)
    for k in range(bits):
        codes |= stream[:, k] << k
    return codes.reshape(shape)


@dataclass
class QuantizedWeight:
    """One quantized linear weight in packed form; see the module docstring for the layout."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    shape: tuple
    groupsize: int  # -1: one group per row
    g_idx: torch.Tensor = None

    @classmethod
    def from_result(cls, result) -> "QuantizedWeight":
        """From a gptq.QuantResult (GPTQ or RTN)."""
        rows, columns = result.codes.shape
        trivial = default_group_index(columns, result.groupsize, result.g_idx.device)
        g_idx = None if torch.equal(result.g_idx, trivial) else result.g_idx.to(torch.int32)
        return cls(
            qweight=pack_codes(result.codes, result.bits),
            qzeros=pack_codes(result.zeros, result.bits),
            scales=result.scales.contiguous(),
            bits=result.bits,
            shape=(rows, columns),
            groupsize=result.groupsize,
            g_idx=g_idx,
        )

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return default_group_index(self.shape[1], self.groupsize, self.scales.device)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.bits, self.shape)

    def zeros(self) -> torch.Tensor:
        return unpack_codes(self.qzeros, self.bits, self.scales.shape)

    def dequantize(self, dtype: torch.dtype = None) -> torch.Tensor:
        """scales * (codes - zeros) per column's group, in the scales' dtype or cast to `dtype`.

        The same float operations as the quantizer's decode, so the result matches the layer
        weight bit for bit once cast to the layer's dtype.
        """
        g = self.group_index()
        q = self.codes().to(self.scales.dtype)
        z = self.zeros().to(self.scales.dtype)[:, g]
        w = self.scales[:, g] * (q - z)
        return w if dtype is None else w.to(dtype)

    def to_state(self, prefix: str) -> dict:
        """Tensors named prefix + name; prefix follows state_dict style, e.g. 'model.layers.0.mlp.up_proj.'."""
        meta = torch.tensor([self.bits, self.shape[0], self.shape[1], self.groupsize], dtype=torch.int32)
        state = {
            prefix + "qweight": self.qweight.contiguous(),
            prefix + "qzeros": self.qzeros.contiguous(),
            prefix + "scales": self.scales.contiguous(),
            prefix + _META: meta,
        }
        if self.g_idx is not None:
            state[prefix + "g_idx"] = self.g_idx.to(torch.int32).contiguous()
        return state

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "QuantizedWeight":
        bits, rows, columns, groupsize = (int(v) for v in state[prefix + _META].tolist())
        return cls(
            qweight=state[prefix + "qweight"],
            qzeros=state[prefix + "qzeros"],
            scales=state[prefix + "scales"],
            bits=bits,
            shape=(rows, columns),
            groupsize=groupsize,
            g_idx=state.get(prefix + "g_idx"),
        )


def quantized_prefixes(state: dict) -> list:
    """The prefixes of every QuantizedWeight stored in a state dict (e.g. one safetensors file)."""
    return sorted(key[: -len(_META)] for key in state if key.endswith(_META))
