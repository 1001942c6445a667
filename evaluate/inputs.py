"""Which of a batch's tensors go into a model's forward call."""
import inspect


def accepted_inputs(model, batch):
    """The batch without the inputs the model's forward does not take (DistilBERT has no
    token_type_ids) and without labels (we want logits, not a loss)."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in params and k != "labels"}
