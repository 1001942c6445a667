"""Running a GGUF file in llama.cpp (through llama-cpp-python, built by `make gguf`): logits,
perplexity on the windows this repository evaluates, llama.cpp's own quantizer.

The key/value cache is kept in float32 (llama.cpp's default is f16), so that an f32 export
computes what transformers computes, to float32 rounding.
"""
import contextlib
import ctypes
import math

import numpy as np

from utils.atomic import atomic_path
from utils.errors import UserError

GGML_TYPE_F32 = 0

# llama.cpp's file types for its quantizer (llama.h: enum llama_ftype)
FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def llama_cpp():
    """The llama_cpp module, or a one-line error that says how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama-cpp-python is not installed: run `make gguf` (it builds llama.cpp once)")
    return llama_cpp


@contextlib.contextmanager
def load(path, n_ctx, threads=None, logits_all=True):
    """A llama.cpp model and context for windows of up to n_ctx tokens, freed when the block ends."""
    lib = llama_cpp()
    kwargs = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    try:
        llm = lib.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False, **kwargs)
    except ValueError as err:  # llama-cpp-python's word for a file llama.cpp would not load
        raise UserError(f"llama.cpp cannot load {path}: {err}")
    try:
        yield llm
    finally:
        llm.close()


def logits(llm, ids):
    """Logits (len(ids), vocab) of one sequence, from an empty cache."""
    llm.reset()  # the next eval drops the cache from position 0 on
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def window_nlls(llm, windows):
    """Mean next-token NLL of each window (rows of token ids), as evaluate/perplexity.py computes it."""
    nlls = []
    for ids in windows:
        scores = logits(llm, ids)[:-1].astype(np.float64)
        top = scores.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
        targets = np.asarray(ids[1:], dtype=np.int64)
        nlls.append(float(np.mean(log_z - scores[np.arange(len(targets)), targets])))
    return nlls


def perplexity(llm, windows):
    nlls = window_nlls(llm, windows)
    return math.exp(sum(nlls) / len(nlls))


def quantize(src, dst, ftype):
    """llama.cpp's quantizer on a GGUF file (ftype: a key of FTYPES), whole or not at all."""
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    with atomic_path(dst) as temporary:
        status = lib.llama_model_quantize(str(src).encode(), temporary.encode(), ctypes.byref(params))
        if status != 0:
            raise UserError(f"llama.cpp could not quantize {src} to {ftype} (status {status})")
