"""
The KV cache's decode step, captured as a graph and replayed (`CapturedStep`), and a CPU stand-in for
CUDA graphs that keeps their rules, so that the tests run the GPU's capture code (`CpuGraph`).

A decode step pads the rows in use to a bucket (1, 8, 32, 64, ...) and attends to a multiple of 256
columns, so its shapes take a few values: each is captured once and replayed with its inputs copied into
persistent buffers. All graphs write one persistent logits buffer and share one memory pool.

A CUDA graph replays its kernels on the raw addresses they were captured with, so every tensor a
captured step reads must outlive the graph, and nothing in the step may wait for the host. The stand-in
records the aten ops the step runs and replays them on the tensors they read, holding the tensors made
before the capture only weakly (raw addresses hold nothing): a replay after one of them was freed raises
FreedInputError (a GPU would read reused memory); an op that waits for the host (a value read back, an
output shape that depends on the data) raises CaptureError at capture.
"""

import inspect
import os
import time
import warnings
import weakref
from contextlib import contextmanager

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

# a decode step's shape: its rows padded to a bucket, the columns it attends to rounded up to a multiple of VIEW
BUCKETS = (1, 8, 32, 64, 128, 256)  # beyond: multiples of 256
VIEW = 256


def bucket(n):
    """The rows of the captured step that decodes n rows."""
    return next((b for b in BUCKETS if b >= n), -(-n // 256) * 256)


class CapturedStep:
    """The decode step of a KVCache, one graph per (rows bucket, view), replayed by `step()`."""

    def __init__(self, cache, enabled=None):
        if enabled is None:  # on a GPU; on a CPU the stand-in only checks the rules, slower than eager
            enabled = cache.device.type == "cuda" or os.environ.get("NANOPR1_CPU_GRAPHS") == "1"
        self.cache, self.enabled, self.error = cache, enabled, None  # error: why a capture failed
        self.note = ""  # the run's memory plan, for an out-of-memory error
        self.graphs, self.model = {}, None  # (rows, view) -> its graph, captured for this model object
        self.pool, self.pool_bytes, self.capture_s = None, 0, 0.0
        # what the graphs read and write: persistent, so that a replay never reads a freed tensor
        self.row_ids = torch.arange(cache.R, device=cache.device)
        self.inputs = torch.zeros(4, cache.R, dtype=torch.long, device=cache.device)  # ids, positions, cols, real
        self.logits = None  # (R, V) fp32, written by every replay

    def reset(self, model):
        """A new sampling call: the graphs are kept for the same model object."""
        if model is not self.model:
            self.graphs, self.model = {}, model

    def stats(self):
        """For a run's metrics: graphs captured, their memory pool, capture time, a failure."""
        return {"graphs": len(self.graphs), "graph_pool_gb": self.pool_bytes / 1e9, "capture_s": self.capture_s,
                **({"graph_error": self.error} if self.error else {})}

    def step(self, model, ids, pos, real):
        """One token (n, 1) for each of the cache's n rows in use; logits (n, V), overwritten by the next step."""
        cache, n = self.cache, self.cache.n
        # the rows padded to a bucket: rows n.. are dead, their token is not real and writes the scratch column
        rows = min(bucket(n), cache.R)
        cols, view = cache.columns(range(n), real.cpu())
        inputs = torch.tensor([0, 0, cache.cols, 0])[:, None].repeat(1, rows)  # ids, positions, columns, real
        inputs[:, :n] = torch.cat([ids.cpu(), pos.cpu(), cols, real.cpu()], 1).T
        # one host-to-device copy of the inputs, then the graph of this shape (captured at its first use) replays
        self.inputs[:, :rows].copy_(inputs)
        try:
            graph = self.graphs.get((rows, view)) or self.capture(model, rows, view)
        except torch.OutOfMemoryError as e:
            # say which step ran out of memory, with the run's memory plan
            raise torch.OutOfMemoryError(f"out of GPU memory capturing the decode step of {rows} rows x {view} "
                                         f"columns ({cache.R} rows of {cache.cols + 1} columns in the cache)\n"
                                         f"{self.note}\nlower --kv-memory-gb or --max-rows") from e
        except RuntimeError as e:
            # another failure (e.g. an op inside the model that waits for the host): eager from now on, and say so
            warnings.warn(f"graph capture failed, the KV cache decodes eagerly from now on: {e}")
            self.enabled, self.error = False, str(e).splitlines()[0][:200]
            return self.run(model, rows, view)[:n]
        graph.replay()
        return self.logits[:n]  # a view of the persistent output: read it before the next step

    def run(self, model, rows, view):
        """The decode step of `rows` rows from the input buffers: eager, or being captured."""
        ids, pos, cols, real = self.inputs[:, :rows, None]  # each (rows, 1)
        return self.cache.run(model, ids, pos, self.row_ids[:rows], cols, real.bool(), view, read=slice(0, rows))

    def capture(self, model, rows, view):
        """Capture the decode step of `rows` rows attending to `view` columns; return its graph. The capture runs
        the step on this step's inputs (the replay that follows writes the same entries again)."""
        t0, device = time.perf_counter(), self.cache.device
        if self.logits is None:  # (R, V): an eager run of the step gives V
            self.logits = torch.zeros(self.cache.R, self.run(model, rows, view).shape[1], device=device)

        # the step reads only persistent tensors: the cache, these buffers, the model's weights
        def step():
            self.logits[:rows].copy_(self.run(model, rows, view))

        if device.type == "cuda":
            # one memory pool shared by every graph: it holds one step's temporaries
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph, grown = capture_cuda(step, self.pool, device)
            self.pool_bytes += grown
        else:
            graph = CpuGraph()
            with capturing(graph):
                step()
            # the pool is shared by the graphs: its size is the peak of one capture
            self.pool_bytes = max(self.pool_bytes, graph.pool_bytes)
        self.graphs[(rows, view)] = graph
        self.capture_s += time.perf_counter() - t0
        return graph


# torch.cuda.graph's own check that a replay's inputs are alive (recent torch): the GPU's FreedInputError
LIVENESS = {k: True for k in ["check_input_liveness"] if k in inspect.signature(torch.cuda.graph).parameters}


def capture_cuda(step, pool, device):
    """`step()` captured as a torch.cuda.CUDAGraph in the memory pool `pool`: (graph, bytes the pool grew)."""
    # warm up outside the graph (lazy initialisations, cuBLAS workspaces), on a side stream
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    # torch.cuda.graph empties the allocator's cache on entry: empty it before reading the reserved memory,
    # or the cached blocks it drops count against the pool (which could even come out negative)
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, **LIVENESS):
        step()
    return graph, torch.cuda.memory_reserved(device) - reserved


# -----------------------------------------------------------------------------
# the CPU stand-in: a CUDA graph's rules, checked on a CPU

aten = torch.ops.aten
HOST_SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
             aten.equal.default, aten.masked_select.default, aten.item.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
TO_HOST = {"tolist", "numpy", "cpu", "__array__", "__repr__"}  # Tensor methods that hand data to Python


class FreedInputError(RuntimeError):
    """A replay found a tensor the graph reads freed (a GPU would read whatever reuses its memory)."""


class CaptureError(RuntimeError):
    """The step waits for the host, so a CUDA graph cannot capture it."""


def why_not_capturable(func, args, kwargs):
    """Why a CUDA graph cannot capture the aten op `func` on these arguments, or None."""
    if func in HOST_SYNC or torch.Tag.data_dependent_output in func.tags:
        return "reads a value back to the host"
    if func in INDEXING:  # an index by a boolean mask is a nonzero() inside: its length is the data's
        dynamic = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    elif func is aten.repeat_interleave.Tensor:  # a tensor of counts: fine only with output_size given
        dynamic = kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
    else:  # nonzero, masked_select, unique, bincount, ... (torch tags the ops whose output shape is data)
        dynamic = torch.Tag.dynamic_output_shape in func.tags
    return "has an output shape that depends on the data" if dynamic else None


class CpuGraph:
    """torch.cuda.CUDAGraph's interface on a CPU: capture with `capturing(graph)`, then `replay()`.
    `pool_bytes`: the peak of what the capture allocated (a CUDA graph's memory pool)."""

    def __init__(self):
        self.ops = []       # (op, args, kwargs, where its outputs go); an argument is an index into env
        self.env = []       # constants, and a slot for each tensor: an input's, or one the capture made
        self.inputs = []    # (env index, weak reference, storage weak reference, the op that first read it)
        self.pool_bytes = 0

    def replay(self):
        # the inputs first: each must still be alive, as on a GPU its raw address is read
        env = list(self.env)
        for i, ref, storage, op in self.inputs:
            env[i] = ref()
            if env[i] is None or storage.expired():
                raise FreedInputError(f"a tensor read by a captured step (first by {op}) was freed: "
                                      f"on a GPU the replay would read whatever reuses its memory")
        # then every recorded op again, its outputs into their slots for the ops that read them
        for op, args, kwargs, outs in self.ops:
            out = op(*[_build(a, env) for a in args], **{k: _build(a, env) for k, a in kwargs.items()})
            for i, t in zip(outs, out if isinstance(out, (tuple, list)) else (out,)):
                if i is not None:
                    env[i] = t


def _build(spec, env):
    """An argument from its slot (or a list of them) in env."""
    return env[spec] if isinstance(spec, int) else [_build(s, env) for s in spec]


class _Recorder(TorchDispatchMode):
    """Records each aten op into a CpuGraph, refusing the ones a CUDA graph could not capture."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph
        self.index = WeakIdKeyDictionary()  # tensor -> its env index
        self.own = {}                       # storages the capture allocated: key -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # refuse what a CUDA graph could not capture, as a GPU's capture would
        why = why_not_capturable(func, args, kwargs)
        if why:
            raise CaptureError(f"{func} {why}, so it waits for the host: it cannot be captured in a CUDA graph")
        # run the op, and record it on its arguments' slots and its new outputs' slots
        spec = ([self._spec(a, func) for a in args], {k: self._spec(a, func) for k, a in kwargs.items()})
        out = func(*args, **kwargs)
        outs = [self._output(t) for t in (out if isinstance(out, (tuple, list)) else (out,))]
        self.graph.ops.append((func, *spec, outs))
        # the pool's size: the peak of the capture's own storages alive at once
        live = sum(n for s, n in self.own.values() if not s.expired())
        self.graph.pool_bytes = max(self.graph.pool_bytes, live)
        return out

    def _output(self, t):
        """A new tensor's slot (its storage counts towards the pool while it lives); None for anything else."""
        if not isinstance(t, torch.Tensor) or t in self.index:  # (an in-place op returns its argument)
            return None
        s = StorageWeakRef(t.untyped_storage())
        self.own.setdefault(s.cdata, (s, t.untyped_storage().nbytes()))
        self.index[t] = self._new(None)
        return self.index[t]

    def _new(self, value):
        self.graph.env.append(value)
        return len(self.graph.env) - 1

    def _spec(self, a, func):
        """An argument's slot (a list's: a list of slots); a tensor made before the capture becomes an input."""
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return [self._spec(x, func) for x in a]
        if not isinstance(a, torch.Tensor):
            return self._new(a)
        # made before the capture: an input, held weakly, as a GPU's graph holds only its raw address
        if a not in self.index:
            self.index[a] = self._new(None)
            self.graph.inputs.append((self.index[a], weakref.ref(a), StorageWeakRef(a.untyped_storage()), func))
        return self.index[a]


class _HostReads(TorchFunctionMode):
    """.tolist(), .cpu(), ... read the data without an aten op for the recorder to see."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in TO_HOST:
            raise CaptureError(f"Tensor.{func.__name__} copies to the host, so it waits for the host: "
                               "it cannot be captured in a CUDA graph")
        return func(*args, **(kwargs or {}))


@contextmanager
def capturing(graph):
    """`with capturing(graph):` records into a CpuGraph (torch.cuda.graph on a GPU)."""
    with _HostReads(), _Recorder(graph):
        yield
