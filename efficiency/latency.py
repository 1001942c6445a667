"""Wall-clock latency of a model's forward pass on the current device."""
import statistics
import time

import torch


@torch.inference_mode()
def measure_latency(model, batch, device, warmup=3, repeats=15):
    """Median milliseconds of one forward pass over `batch` (a dict of input tensors)."""
    model.eval()
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(**inputs)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        sync()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def peak_memory_mb(device):
    """Peak memory of this process so far: CUDA allocator peak on a GPU, max RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
