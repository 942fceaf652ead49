"""
CUDA graphs replay a decode step's kernels on the raw addresses they were captured with, so every tensor a
captured step reads must outlive the graph, and nothing in the step may wait for the host. `CpuGraph` is
a stand-in that keeps both rules on a CPU, so that the tests run the GPU's capture code (kvcache.py):
capture records the aten ops the step runs; replay runs them again on the tensors they read, holding
the tensors made before the capture only weakly, as raw addresses hold nothing. A replay after one of
them was freed raises FreedInputError (a GPU would read reused memory); an op that waits for the host
(a value read back, an output shape that depends on the data) raises CaptureError at capture.
`pool_bytes`: the peak of what the capture allocated (a CUDA graph's memory pool). `capture_cuda`: the
same capture on a GPU, with the pool's growth measured.
"""

import inspect
import weakref
from contextlib import contextmanager

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
HOST_SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
             aten.equal.default, aten.masked_select.default, aten.item.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
TO_HOST = {"tolist", "numpy", "cpu", "__array__", "__repr__"}  # Tensor methods that hand data to Python
# torch.cuda.graph's own check that a replay's inputs are alive (recent torch): the GPU's FreedInputError
LIVENESS = {k: True for k in ["check_input_liveness"] if k in inspect.signature(torch.cuda.graph).parameters}


class FreedInputError(RuntimeError):
    pass


class CaptureError(RuntimeError):
    pass


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
    """torch.cuda.CUDAGraph's interface on a CPU: capture with `capturing(graph)`, then `replay()`."""

    def __init__(self):
        self.ops = []       # (op, args, kwargs, where its outputs go); an argument is an index into env
        self.env = []       # constants, and a slot for each tensor: an input's, or one the capture made
        self.inputs = []    # (env index, weak reference, storage weak reference, the op that first read it)
        self.pool_bytes = 0

    def replay(self):
        env = list(self.env)
        for i, ref, storage, op in self.inputs:
            env[i] = ref()
            if env[i] is None or storage.expired():
                raise FreedInputError(f"a tensor read by a captured step (first by {op}) was freed: "
                                      f"on a GPU the replay would read whatever reuses its memory")
        for op, args, kwargs, outs in self.ops:
            out = op(*[_build(a, env) for a in args], **{k: _build(a, env) for k, a in kwargs.items()})
            for i, t in zip(outs, out if isinstance(out, (tuple, list)) else (out,)):
                if i is not None:
                    env[i] = t


def _build(spec, env):
    return env[spec] if isinstance(spec, int) else [_build(s, env) for s in spec]


class _Recorder(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph
        self.index = WeakIdKeyDictionary()  # tensor -> its env index
        self.own = {}                       # storages the capture allocated: key -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = why_not_capturable(func, args, kwargs)
        if why:
            raise CaptureError(f"{func} {why}, so it waits for the host: it cannot be captured in a CUDA graph")
        spec = ([self._spec(a, func) for a in args], {k: self._spec(a, func) for k, a in kwargs.items()})
        out = func(*args, **kwargs)
        outs = []
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t not in self.index:  # (an in-place op returns its argument)
                self.index[t] = self._new(None)
                s = StorageWeakRef(t.untyped_storage())
                self.own.setdefault(s.cdata, (s, t.untyped_storage().nbytes()))
                outs.append(self.index[t])
            else:
                outs.append(None)
        self.graph.ops.append((func, *spec, outs))
        live = sum(n for s, n in self.own.values() if not s.expired())
        self.graph.pool_bytes = max(self.graph.pool_bytes, live)
        return out

    def _new(self, value):
        self.graph.env.append(value)
        return len(self.graph.env) - 1

    def _spec(self, a, func):
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return [self._spec(x, func) for x in a]
        if not isinstance(a, torch.Tensor):
            return self._new(a)
        if a not in self.index:  # made before the capture: held weakly
            self.index[a] = self._new(None)
            self.graph.inputs.append((self.index[a], weakref.ref(a), StorageWeakRef(a.untyped_storage()), func))
        return self.index[a]


class _HostReads(TorchFunctionMode):  # .tolist(), .cpu(), ... read the data without an aten op to see
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


def capture_cuda(step, pool, device):
    """`step()` captured as a torch.cuda.CUDAGraph in the memory pool `pool`: (graph, bytes the pool grew)."""
    # torch.cuda.graph empties the allocator's cache on entry: empty it before reading the reserved memory,
    # or the cached blocks it drops count against the pool (which could even come out negative)
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, **LIVENESS):
        step()
    return graph, torch.cuda.memory_reserved(device) - reserved
