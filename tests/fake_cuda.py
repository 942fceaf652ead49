"""A stand-in for the CUDA caching allocator's bookkeeping, for tests of code that reads it on a GPU
(plan.peak_bytes, graphs.capture_cuda) on a CPU: reserved memory is what is in use plus the cached free
blocks, an allocation is served from the cache first, torch.cuda.empty_cache() drops the cache, and
torch.cuda.graph empties it on entry as the real one does; streams are one queue. `install(monkeypatch)` puts it
in torch.cuda."""

import contextlib

import torch


class FakeAllocator:
    def __init__(self, cached):
        self.used, self.cached, self.peak, self.graph_kwargs = 0, cached, 0, None

    def reserved(self, device=None):
        return self.used + self.cached

    def take(self, n):  # from the cached blocks first, then new memory
        self.cached -= min(n, self.cached)
        self.used += n
        self.peak = max(self.peak, self.reserved())

    def give(self, n):  # freed blocks stay cached
        self.used -= n
        self.cached += n

    def empty_cache(self):
        self.cached = 0

    def reset_peak(self, device=None):
        self.peak = self.reserved()

    def install(self, monkeypatch):
        fake = self

        class Graph:  # torch.cuda.graph(graph, pool=..., **kwargs)
            def __init__(self, graph, pool=None, **kwargs):
                fake.graph_kwargs = kwargs

            def __enter__(self):
                fake.empty_cache()

            def __exit__(self, *exc):
                return False

        class Stream:  # torch.cuda.Stream(device): one queue, so a side stream waits for nothing
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        for name, fn in dict(empty_cache=self.empty_cache, memory_reserved=self.reserved,
                             max_memory_reserved=lambda device=None: self.peak,
                             reset_peak_memory_stats=self.reset_peak, synchronize=lambda device=None: None,
                             CUDAGraph=object, graph=Graph, Stream=Stream, current_stream=Stream,
                             stream=lambda stream: contextlib.nullcontext()).items():
            monkeypatch.setattr(torch.cuda, name, fn)
        return self
