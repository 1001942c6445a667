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


@torch.no_grad()
def forward_seconds(model, batches, repeats=3, **forward_kwargs):
    """Seconds of one forward pass over all `batches` on the CPU (the fastest of `repeats`:
    warm caches), the unit benchmarks measure pruning time in."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            model(**batch, **forward_kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_memory_mb(device):
    """Peak memory of this process so far: CUDA allocator peak on a GPU, max RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


class RssPeak:
    """Peak resident memory of this process while the block runs, above what it was at the
    start (sampled every few milliseconds): the memory one piece of work really takes."""

    def __init__(self, interval=0.005):
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self):
        import threading

        import psutil

        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_mb = (self._peak - self._start) / 2**20
        return False
