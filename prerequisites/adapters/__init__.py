"""One adapter per model family, one file each; `adapter_for` picks the one a model needs."""
from prerequisites.adapters.bert import BertAdapter
from prerequisites.adapters.distilbert import DistilBertAdapter
from prerequisites.adapters.llama import LlamaAdapter
from prerequisites.adapters.opt import OPTAdapter
from utils.errors import UserError

ADAPTERS = {"bert": BertAdapter, "distilbert": DistilBertAdapter, "opt": OPTAdapter, "llama": LlamaAdapter}


def adapter_for(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if config.model_type not in ADAPTERS:
        raise UserError(f"no STAT adapter for model type {config.model_type!r} (have: {', '.join(ADAPTERS)})")
    return ADAPTERS[config.model_type](config)
