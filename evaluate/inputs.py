"""Which of a batch's tensors go into a model's forward call."""
import inspect


def accepted_inputs(model, batch):
    """The batch without the inputs the model's forward does not take (DistilBERT has no
    token_type_ids) and without labels (we want logits, not a loss)."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in params and k != "labels"}


def labelled_inputs(model, batch):
    """The batch's model inputs and the targets of the task loss (labels, or a QA model's
    start_positions and end_positions) that the model's forward takes."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in params}
