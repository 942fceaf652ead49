"""Will it fit? A run's GPU memory per rank, planned from its model config alone (`--plan`), then
measured at the start of a GPU run. The figures' sources: docs/design.md, "Memory at 4B"."""

import os
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nanopr1 import UsageError, offline_if_unreachable
from nanopr1.checkpoint import model_dir
from nanopr1.graphs import bucket
from nanopr1.kvcache import KVCache, kv_bytes_per_token, rows_for_budget
from nanopr1.model import LORA_TARGETS
from nanopr1.rollout import ALL_TAGS, Rollout
from nanopr1.scoring import LOGITS_CHUNK_TOKENS, rollout_logprobs

GB = 1e9
HEADROOM = 0.05      # of the GPU, never planned for: fragmentation, what the estimates miss
CONTEXT = 2 * GB     # the CUDA context, cuBLAS workspaces, NCCL buffers
# bytes per entry, measured (in brackets) and rounded up
LOGITS_BYTES = 17    # a chunk of logits in training: bf16, fp32, masked and softmax copies (16.5)
ADAMW_BYTES = 4      # per trained parameter: the temporaries of AdamW's foreach step (4.0)
SAMPLING_BYTES = 32  # per (row x vocab): the sampler's masking, log-softmax and noise (32.0)
POOL_BYTES = 8       # per (row x vocab): what a captured decode step leaves in the graph pool (8.3)


@dataclass
class Plan:
    gpu_bytes: float
    items: list = field(default_factory=list)  # (what, bytes)
    rows: int = 0          # KV cache rows in flight
    cols: int = 0          # columns per row
    kv_bytes: float = 0.0
    training: float = 0.0  # the training transient: a micro-batch's forward and backward, or AdamW
    fits: bool = False
    verdict: str = ""

    @property
    def total(self):
        return sum(b for _, b in self.items)

    def __str__(self):
        rows = self.items + [("total", self.total)]
        width = max(len(what) for what, _ in rows)
        lines = "\n".join(f"  {what:<{width}s} {b / GB:6.1f} GB" for what, b in rows)
        return f"{lines} of {self.gpu_bytes / GB:.0f} GB\n{self.verdict}"


def load_config(name):
    """The model config of a hub id, a model dir or a run dir (its checkpoint): only config.json."""
    local = Path(name).expanduser()
    if not local.exists():
        offline_if_unreachable()
    try:
        return AutoConfig.from_pretrained(str(model_dir(local)) if local.exists() else name)
    except (OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:120]
        raise UsageError(f"--plan: no model config at {name!r} ({why})") from None


def count_parameters(config, lora_r=0):
    """(parameters, LoRA adapter parameters, one layer's, the embedding's), on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(q.numel() for q in model.parameters())  # tied embeddings count once
    targets = [m for name, m in model.named_modules() if name.split(".")[-1] in LORA_TARGETS]
    adapters = lora_r * sum(m.in_features + m.out_features for m in targets)
    layer = sum(q.numel() for q in model.get_decoder().layers[0].parameters())
    return n, adapters, layer, model.get_input_embeddings().weight.numel()


def training_transient(config, tokens, row_tokens, *, grad_ckpt=True, autocast=True, unseen=False,
                       trained=0):
    """Peak bytes above the model states of a micro-batch: forward and backward, or AdamW's step."""
    # what a decoder layer saves for backward per token: fp32, or bf16 autocast (norms in fp32)
    H, I = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    if autocast:
        act = (4 * (4 * H + q + kv + 2 * hd) + 2 * (6 * H + 4 * q + kv + 4 * I)) * tokens
    else:
        act = 4 * (6 * H + 4 * q + 2 * kv + 4 * I) * tokens
    if grad_ckpt:  # each layer keeps its input (fp32 residual stream), one is recomputed at a time
        act += config.num_hidden_layers * tokens * config.hidden_size * 4
    else:
        act *= config.num_hidden_layers
    if unseen:  # the dense (rows, T, T) bool mask and sdpa's copy of it in the compute dtype
        act += tokens * row_tokens * (1 + (2 if autocast else 4))
    logits = min(tokens, LOGITS_CHUNK_TOKENS) * config.vocab_size * LOGITS_BYTES
    return max(act + logits, ADAMW_BYTES * trained)


def memory_plan(config, *, gpu_bytes, world=1, fsdp=False, lora_r=0, grad_ckpt=True,
                micro_batch_tokens=16384, unseen=False, sampling=True, max_prompt_tokens=2000,
                max_new_tokens=3000, num_paths=2, max_rows=None, kv_bytes=None, reference=False):
    """The per-rank memory of a run, a Plan; kv_bytes None: the KV cache gets what is left."""
    n, adapters, layer, embed = count_parameters(config, lora_r)
    shard, V = world if fsdp else 1, config.vocab_size
    p = Plan(gpu_bytes)
    # 1) what stays: the model states, the sampling copy, the KL reference, context, headroom
    if lora_r:
        p.items += [("base weights (bf16, frozen)", 2 * n),
                    (f"LoRA adapters r={lora_r}: weights, gradients, AdamW (fp32)", 16 * adapters)]
    else:
        part = f"1/{shard} each" if shard > 1 else "whole"
        p.items += [(f"{what} (fp32, {part})", size * n / shard)
                    for what, size in (("weights", 4), ("gradients", 4), ("AdamW moments", 8))]
        if shard > 1:
            p.items.append(("FSDP: gathered layers in flight, embedding/head group",
                            2 * 2 * layer + 2 * embed + 4 * layer))
    if sampling:
        unmerged = ", LoRA's adapters unmerged" if lora_r else ""
        p.items.append((f"sampling copy (bf16, whole model{unmerged})", 2 * (n + adapters)))
    if reference:
        p.items.append(("KL reference (fp32 as the policy, whole model)", 4 * n))
    p.items.append(("CUDA context, cuBLAS and NCCL buffers", CONTEXT))
    p.items.append((f"headroom ({HEADROOM:.0%} of the GPU)", HEADROOM * gpu_bytes))

    # 2) the training transient, and KV cache rows in what is left beside the larger transient
    T, trained = micro_batch_tokens, (adapters if lora_r else n) / shard
    p.training = training_transient(config, T, min(T, max_prompt_tokens + max_new_tokens),
                                    grad_ckpt=grad_ckpt, unseen=unseen, trained=trained)
    p.cols = max_prompt_tokens + max_new_tokens + 1  # what sampler.sample asks of the cache
    kv_token = kv_bytes_per_token(config, torch.bfloat16)
    row = (p.cols + 1) * kv_token  # KVCache adds a scratch column
    what = f"training ({T:,}-token micro-batch, {'' if grad_ckpt else 'not '}checkpointed)"
    if not sampling:
        p.items.append((what, p.training))
    else:  # per KV row: its columns, its share of the logits buffer and of the graph pool
        per_row = row + 4 * V + POOL_BYTES * V
        cap = max_rows or 1 << 30
        fit = lambda budget: max(0, min(int(budget // per_row), cap))  # rows in `budget` bytes
        if kv_bytes is None:
            p.rows = fit(gpu_bytes - p.total - p.training)
        else:
            p.rows = min(rows_for_budget(config, torch.bfloat16, p.cols, kv_bytes), cap)
        sample = bucket(max(p.rows, 1)) * V * SAMPLING_BYTES
        if kv_bytes is None and sample > p.training:  # the sampler's transient is larger: fewer
            p.rows = fit(gpu_bytes - p.total - sample)
            sample = bucket(max(p.rows, 1)) * V * SAMPLING_BYTES
        p.kv_bytes = p.rows * row
        p.items += [(f"{what}, or sampling {sample / GB:.1f} GB if larger", max(p.training, sample)),
                    ("CUDA graphs: their logits buffer and memory pool", p.rows * V * (4 + POOL_BYTES)),
                    (f"KV cache: {p.rows:,} rows x {p.cols + 1:,} columns x "
                     f"{kv_token / 1024:.0f} KiB per token (bf16)", p.kv_bytes)]

    # 3) the verdict
    need = num_paths if sampling else 0  # KV rows of one rollout
    p.fits = p.total <= gpu_bytes and p.rows >= need
    if not p.fits:
        short = p.total - gpu_bytes if p.total > gpu_bytes else (need - p.rows) * row
        few = f" (one rollout needs {need} KV rows, {p.rows} fit)" if p.rows < need else ""
        p.verdict = (f"does not fit: {short / GB:.1f} GB short{few}; try --lora, more GPUs, "
                     "a smaller --micro-batch-tokens or --max-new-tokens")
    elif sampling:
        p.verdict = (f"fits: {p.rows:,} KV rows in flight ({p.rows // num_paths:,} rollouts of "
                     f"{num_paths} paths at once), {p.kv_bytes / GB:.1f} GB of KV cache")
    else:
        p.verdict = f"fits: {(gpu_bytes - p.total) / GB:.1f} GB to spare"
    return p


def plan_for(config, *, gpu_memory_gb=None, num_gpus=None, lora_r=0, sampling=True, rollouts=0, kv_memory_gb=None,
             **shape):
    """memory_plan of a script's run on `gpu_memory_gb` and `num_gpus`, by default this GPU and launch (FSDP:
    full fine-tunes on more than one GPU). `rollouts`: a step's, over every rank; `shape`: memory_plan's."""
    if gpu_memory_gb:
        gpu = gpu_memory_gb * GB
    elif torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory
    else:
        raise UsageError("no GPU here: pass --gpu-memory-gb (e.g. 80) to plan for one")
    world = num_gpus or int(os.environ.get("WORLD_SIZE", 1))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", str(world > 1 and not lora_r)).lower() == "true"
    if sampling:  # this rank's rollouts, one KV row per path each
        shape.update(max_rows=rollouts // world * shape.get("num_paths", 2),
                     kv_bytes=kv_memory_gb * GB if kv_memory_gb else None)
    return memory_plan(config, gpu_bytes=gpu, world=world, fsdp=fsdp, lora_r=lora_r, sampling=sampling, **shape)


def peak_bytes(fn, device):
    """The peak bytes `fn()` allocates: CUDA's peak reserved memory, or the CPU profiler's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        # the allocator's cached free blocks (loading leaves GBs of them) would serve `fn` unseen
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_reserved(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(accumulate((nbytes for _, nbytes in events), initial=0))  # the running total's peak


def _still_step(opt):
    """An optimizer step at lr 0 (AdamW's temporaries and moments are made, no weight moves), grads freed."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def profile_training(model, opt, acc, tags, variant, pad, tokens, row_tokens):
    """peak_bytes of a worst-case micro-batch: forward, backward, AdamW at lr 0 (no change)."""
    L = max(2, min(tokens, row_tokens))
    vocab = acc.unwrap_model(model).get_input_embeddings().num_embeddings
    words = [i for i in range(min(64, vocab)) if i not in set(tags.values())]  # any ids but tags
    ids = [words[i % len(words)] for i in range(L - 1)]
    rollouts = [Rollout([words[0]], ids, forced=[False] * len(ids), logprobs=[0.0] * len(ids),
                        positions=list(range(1, L)), allowed=[ALL_TAGS] * len(ids), blocks=[],
                        text="", stop_reason="budget") for _ in range(max(1, tokens // L))]

    def step():
        logp, mask = rollout_logprobs(model, rollouts, tags, variant, 1.0, pad, acc.device)
        acc.backward((logp * mask).sum() * 0.0)
        _still_step(opt)

    # AdamW's moments first, from zero gradients: they stay for the run, so free memory counts them after
    # this; made inside the measured step they would be counted twice
    for q in (q for g in opt.param_groups for q in g["params"]):
        q.grad = torch.zeros_like(q)
    _still_step(opt)
    peak = peak_bytes(step, acc.device)
    for state in opt.state.values():  # zero gradients left the moments at 0: only the step moved
        state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
    return peak


def available_bytes():
    """What this machine's memory can still give (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def least(acc, value):
    """The smallest `value` (an int) over the ranks: a decision every rank takes the same."""
    return -int(acc.reduce(torch.tensor(-int(value), device=acc.device), "max").item())


def kv_cache_for_run(acc, model, opt, tags, pad, longest, *, max_new_tokens, num_paths, rollouts, max_rows=None,
                     kv_memory_gb=None, unseen=False, micro_batch_tokens=16384, **plan_flags):
    """train_rl.py's KV cache: rows for this rank's rollouts (`rollouts`: a step's, over every rank), as many
    as fit beside the training step (measured on a GPU), the same number on every rank, so that all of them
    go on or all refuse. The prompts are `longest` tokens at most; `plan_flags`: plan_for's other keywords."""
    cuda, config = acc.device.type == "cuda", acc.unwrap_model(model).config
    cols = longest + max_new_tokens + 1
    rows = max_rows or rollouts // acc.num_processes * num_paths
    dtype = torch.bfloat16 if cuda else torch.float32  # the sampling copy's
    kv_row = (cols + 1) * kv_bytes_per_token(config, dtype)
    per_row = kv_row + (4 + POOL_BYTES) * config.vocab_size  # with its share of the graphs' buffers
    plan = None
    if cuda:  # the plan, and the worst-case micro-batch measured beside the plan's figure
        plan = plan_for(config, max_prompt_tokens=longest, max_new_tokens=max_new_tokens, num_paths=num_paths,
                        rollouts=rollouts, kv_memory_gb=kv_memory_gb, unseen=unseen,
                        micro_batch_tokens=micro_batch_tokens, **plan_flags)
        acc.print(f"memory plan per GPU:\n{plan}")
        if not least(acc, plan.fits):
            raise UsageError(plan.verdict)
        peak = profile_training(model, opt, acc, tags, "unseen" if unseen else "seen", pad, micro_batch_tokens,
                                cols - 1)
        acc.print(f"measured: the worst-case training micro-batch peaks {peak / GB:.2f} GB above the model "
                  f"states (plan: {plan.training / GB:.2f} GB + gradients)")
    if cuda and kv_memory_gb:
        rows = min(rows, rows_for_budget(config, dtype, cols, kv_memory_gb * GB))
    elif cuda:  # what is really free, minus the headroom and the measured peak beside the cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(acc.device)
        rows = max(0, min(rows, int((free - HEADROOM * total - peak) // per_row)))
    elif (free := available_bytes()) is not None:  # a CPU: the run's rows, in half its share of free memory
        # (no measured step: its worst case, sized for a GPU's 16,384 tokens, could exhaust the machine)
        rows = min(rows, int(free / 2 / int(os.environ.get("LOCAL_WORLD_SIZE", 1)) // per_row))
    # a rank that refused alone would leave the others waiting in their first collective
    rows = least(acc, rows)
    if rows < num_paths:
        where = "the GPU holds" if cuda else "half of this machine's free memory holds"
        raise UsageError(f"{where} {rows} KV cache rows of {cols} columns beside the training step, one "
                         f"rollout needs {num_paths}: lower --max-new-tokens{' or --micro-batch-tokens' * cuda}")
    acc.print(f"KV cache: {rows} rows of {cols + 1} columns, {rows * kv_row / GB:.2f} GB "
              f"({rollouts // acc.num_processes} rollouts of {num_paths} paths a step)")
    cache = KVCache(rows, cols, acc.device)
    cache.captured.note = str(plan or "")  # for an out-of-memory error during a graph capture
    return cache
