"""
Will it fit? GPU memory per rank of a training run, worked out from the model
config alone (`python train_rl.py --plan ...`, `python train_sft.py --plan ...`),
so a user can plan before downloading anything; a directory holding only a
config.json is enough.

What is counted, per rank, for the CUDA recipe the scripts run:

- model states. Full fine-tune: fp32 weights, fp32 gradients and AdamW's two
  fp32 moments, 16 bytes a parameter, split over the ranks under FSDP; FSDP
  also holds the gathered (bf16) layers in flight and the embedding/head group,
  which stays gathered from forward to backward. LoRA: the frozen base in bf16
  and 16 bytes per adapter parameter.
- the sampling copy (RL): a plain bf16 model the sampler decodes with,
  refreshed from the trained weights once per rollout phase (never sharded:
  decoding must not gather weights at every token).
- the KV cache (RL): rows x (longest prompt + max_new_tokens + 2) columns x KV
  bytes per token, allocated once (staticcache.py); by default whatever the rest
  leaves, which sets the rows in flight.
- training transients, per micro-batch of T tokens: with gradient checkpointing
  each layer's input (fp32 residual stream under autocast, bf16 for LoRA) plus
  one layer's activations twice over (its recompute and its backward); without,
  every layer's activations. A layer's activations per token are estimated from
  the tensors a Qwen3/Llama layer saves under bf16 autocast (18 H + 12 q + 4 kv
  + 8 I bytes, q/kv = query/key-value width, I the MLP width); Unseen adds its
  (T x T) bool mask. Plus one chunk of logits (scoring.py): bf16 and fp32 copies
  and the fp32 gradient.
- sampling transients: the decode step's (rows x vocab) fp32 logits, masks and
  sampling noise, about 40 bytes per entry.
- a reserve for the CUDA context and allocator fragmentation (2 GB + 5%).

Training and sampling never run at once, so the larger of their transients
counts. Estimates, not measurements: the activation figure is the one to check
on a GPU first (bench/bench_4b.py measures a GRPO step's peak memory).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nanopr1 import UsageError

from nanopr1.model import LORA_TARGETS
from nanopr1.scoring import LOGITS_CHUNK_TOKENS
from nanopr1.staticcache import bucket, kv_bytes_per_token, rows_for_budget

GB = 1e9


@dataclass
class Plan:
    items: list = field(default_factory=list)  # (what, bytes)
    rows: int = 0         # KV cache rows in flight
    cols: int = 0         # columns per row
    kv_bytes: float = 0.0
    gpu_bytes: float = 0.0
    fits: bool = False
    verdict: str = ""

    @property
    def total(self):
        return sum(b for _, b in self.items)

    def __str__(self):
        width = max(len(what) for what, _ in self.items)
        lines = [f"  {what:<{width}s} {b / GB:6.1f} GB" for what, b in self.items]
        lines.append(f"  {'total':<{width}s} {self.total / GB:6.1f} GB of {self.gpu_bytes / GB:.0f} GB")
        return "\n".join(lines + [self.verdict])


def load_config(name):
    """The model config of a hub id, a model dir or a run dir (its checkpoint): config.json alone is read."""
    from nanopr1.checkpoint import model_dir
    from nanopr1.data import offline_if_unreachable
    local = Path(name).expanduser()
    if local.exists():
        local = model_dir(local)
    else:
        offline_if_unreachable()
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else name)
    except (OSError, ValueError) as e:
        raise UsageError(f"--plan: no model config at {name!r} ({str(e).strip().splitlines()[0][:120]})") from None


def run_setup(gpu_memory_gb, num_gpus, lora):
    """(GPU bytes, ranks, FSDP?) of the run being planned: the flags, else this machine and this launch
    (accelerate's FSDP config sets ACCELERATE_USE_FSDP; without a launch, a full fine-tune over several
    GPUs is assumed to use FSDP, as configs/fsdp_8gpu.yaml does)."""
    gpu = gpu_memory_gb * GB if gpu_memory_gb else (
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None)
    if gpu is None:
        raise UsageError("no GPU here: pass --gpu-memory-gb (e.g. 80) to plan for one")
    world = num_gpus or int(os.environ.get("WORLD_SIZE", 1))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", str(world > 1 and not lora)).lower() == "true"
    return gpu, world, fsdp


def count_parameters(config, lora_r=0):
    """(parameters, adapter parameters, parameters of one layer, of the embedding) from a model built on the
    meta device: exact, instant, nothing allocated. Tied embeddings count once."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(q.numel() for q in model.parameters())
    adapters = sum(lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if name.split(".")[-1] in LORA_TARGETS) if lora_r else 0
    layer = sum(q.numel() for q in model.get_decoder().layers[0].parameters())
    return n, adapters, layer, model.get_input_embeddings().weight.numel()


def activation_bytes_per_token(config):
    """Bytes one layer saves for backward per token under bf16 autocast (an estimate, see the docstring)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return 18 * config.hidden_size + 12 * q + 4 * kv + 8 * config.intermediate_size


def memory_plan(config, *, gpu_bytes, world=1, fsdp=False, lora_r=0, grad_ckpt=True, micro_batch_tokens=16384,
                unseen=False, sampling=True, max_prompt_tokens=2000, max_new_tokens=3000, num_paths=2,
                max_rows=None, kv_bytes=None, reference=False):
    """The per-rank memory of a run (see the module docstring). kv_bytes None: the KV cache gets what is
    left; max_rows: no more rows than the run can use (rollouts per rank x num_paths)."""
    n, adapters, layer, embed = count_parameters(config, lora_r)
    shard = world if fsdp else 1
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    p = Plan(gpu_bytes=gpu_bytes)
    if lora_r:
        p.items += [("base weights (bf16, frozen)", 2 * n),
                    (f"LoRA adapters r={lora_r}: weights, gradients, AdamW (fp32)", 16 * adapters)]
    else:
        part = f"1/{shard} each" if shard > 1 else "whole"
        p.items += [(f"weights (fp32, {part})", 4 * n / shard), (f"gradients (fp32, {part})", 4 * n / shard),
                    (f"AdamW moments (fp32, {part})", 8 * n / shard)]
        if shard > 1:
            p.items.append(("FSDP: gathered layers in flight, embedding/head group", 2 * 2 * layer + 2 * embed + 4 * layer))
    if sampling:
        p.items.append(("sampling copy (bf16, whole model)", 2 * n))
    if reference:
        p.items.append(("KL reference (bf16, whole model)", 2 * n))
    p.items.append(("CUDA context and fragmentation reserve", 2 * GB + 0.05 * gpu_bytes))

    T = micro_batch_tokens
    resid = 2 if lora_r else 4  # bytes of the residual stream a checkpointed layer keeps as its input
    act = (L * T * H * resid + 2 * T * activation_bytes_per_token(config) if grad_ckpt
           else L * T * activation_bytes_per_token(config)) + (T * T if unseen else 0)
    logits = LOGITS_CHUNK_TOKENS * V * (2 + 4 + 4)  # bf16 matmul output, fp32 copy, fp32 gradient
    train = act + logits
    dtype = torch.bfloat16
    p.cols = max_prompt_tokens + max_new_tokens + 1  # what sampler.sample asks of the cache
    row = (p.cols + 1) * kv_bytes_per_token(config, dtype)  # staticcache.StaticRows adds a scratch column
    sample = 0
    if sampling:  # the cache gets what the rest leaves (or kv_bytes); rows beyond max_rows would sit idle
        rows = lambda budget: max(0, min(rows_for_budget(config, dtype, p.cols, budget), max_rows or 1 << 30))
        step = lambda r: bucket(max(r, 1)) * (V * 40 + 2 * (8 * H + 3 * config.intermediate_size))
        sample = step(rows(gpu_bytes - p.total - train if kv_bytes is None else kv_bytes))
        p.rows = rows(gpu_bytes - p.total - max(train, sample) if kv_bytes is None else kv_bytes)
        p.kv_bytes = p.rows * row
    how = "checkpointed" if grad_ckpt else "not checkpointed"
    p.items.append((f"training {train / GB:.1f} ({T:,}-token micro-batch {act / GB:.1f}, {how}, + logits "
                    f"{logits / GB:.1f})" + (f" or sampling {sample / GB:.1f}, the larger" if sampling else ""),
                    max(train, sample)))
    if sampling:
        p.items.append((f"KV cache: {p.rows:,} rows x {p.cols + 1:,} columns x "
                        f"{kv_bytes_per_token(config, dtype) / 1024:.0f} KiB per token (bf16)", p.kv_bytes))
    need = num_paths if sampling else 0
    p.fits = p.total <= gpu_bytes and p.rows >= need
    if not p.fits:
        short = p.total - gpu_bytes if p.total > gpu_bytes else (need - p.rows) * row
        p.verdict = (f"does not fit: {short / GB:.1f} GB short" + (f" (one rollout needs {need} KV rows, "
                     f"{p.rows} fit)" if p.rows < need else "") +
                     "; try --lora, more GPUs, a smaller --micro-batch-tokens or --max-new-tokens")
    elif sampling:
        p.verdict = (f"fits: {p.rows:,} KV rows in flight ({p.rows // num_paths:,} rollouts of {num_paths} paths "
                     f"at once), {p.kv_bytes / GB:.1f} GB of KV cache")
    else:
        p.verdict = f"fits: {(gpu_bytes - p.total) / GB:.1f} GB to spare"
    return p


def plan_for(args, config, sampling=True, longest_prompt=None):
    """The plan of a training script's run from its flags (train_rl.py or train_sft.py): GPU memory and GPU
    count from --gpu-memory-gb / --num-gpus or this machine and launch."""
    gpu, world, fsdp = run_setup(args.gpu_memory_gb, args.num_gpus, args.lora)
    rl = dict(max_prompt_tokens=longest_prompt or args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
              num_paths=args.num_paths, max_rows=args.prompts_per_step * args.group_size // world * args.num_paths,
              reference=args.kl_coef > 0 and not args.lora,
              kv_bytes=args.kv_memory_gb * GB if args.kv_memory_gb else None) if sampling else {}
    return memory_plan(config, gpu_bytes=gpu, world=world, fsdp=fsdp, lora_r=args.lora_r if args.lora else 0,
                       grad_ckpt=args.grad_ckpt is not False, micro_batch_tokens=args.micro_batch_tokens,
                       unseen=args.variant == "unseen", sampling=sampling, **rl)
