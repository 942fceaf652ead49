"""
Loading and saving a causal LM and its tokenizer, the six parallel-thinking tags (added as special
tokens, idempotently, each new embedding the mean of its sub-word pieces': docs/design.md, "The
format"), the LoRA switch, and the bf16 copy the sampler decodes with.
"""

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from nanopr1 import UsageError, offline_if_unreachable
from nanopr1.format import TAGS, tag_ids

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_model(name_or_path, dtype="float32", device="cpu", attn="sdpa"):
    """(model, tokenizer) from a hub id or a model dir (a run dir: checkpoint.model_dir), with the tags added."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    name_or_path = str(name_or_path)
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        hint = "; a run dir: load checkpoint.model_dir() of it" if any(local.glob("checkpoint-*")) else ""
        raise UsageError(f"model {name_or_path!r}: no such model directory "
                         f"(expected {local / 'config.json'}{hint})")
    if not looks_local:
        offline_if_unreachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else name_or_path)
        model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else name_or_path,
                                                     dtype=dtype, attn_implementation=attn)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"model {name_or_path!r} could not be loaded: not a local directory, and the hub "
                         f"copy is unreachable or missing ({first}); pass a local directory with --model") from None
    add_tags(model, tokenizer)
    return model.to(device), tokenizer


def save_model(model, tokenizer, path, args=None, state_dict=None, is_main=True):
    """A transformers dir load_model() reads. A peft model is saved merged, one tensor at a time on the CPU
    (no copy of the model on the GPU); under FSDP pass the gathered `state_dict` (only the main rank writes)."""
    if hasattr(model, "get_base_model"):  # peft
        state_dict = {key: w.detach().to("cpu", copy=True) for key, w in merged_weights(model)}
        model = model.get_base_model()
    if not is_main:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    if args is not None:
        (Path(path) / "args.json").write_text(json.dumps(args, indent=1, default=str))


def sampling_copy(model, dtype, device):
    """A plain model of `model`'s architecture the sampler decodes with (bf16 on a GPU; refresh_copy). A LoRA
    model's copy keeps its adapters unmerged, in `dtype` like the trainer's bf16 branch: merged into bf16
    weights, a small delta would round away and the sampler would draw from another policy."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the base architecture
    with torch.device(device):  # random init straight on the device: seconds, replaced by refresh_copy
        copy_ = AutoModelForCausalLM.from_config(base.config, dtype=dtype, attn_implementation="sdpa")
        # each adapted projection becomes a LoraLinear around the copy's own: r x (in + out) more weights,
        # 0.26 GB at 4B with r=64, beside the 8 GB of the base
        for name, m, a in lora_layers(model):
            parent, attr = name.removeprefix("base_model.model.").rsplit(".", 1)
            parent = copy_.get_submodule(parent)
            setattr(parent, attr, LoraLinear(getattr(parent, attr), m.r[a], m.scaling[a]))
    copy_.generation_config = copy.deepcopy(base.generation_config)
    return copy_.eval().requires_grad_(False)


class LoraLinear(torch.nn.Module):
    """A sampling copy's projection with its adapter unmerged: the same sum, in the same order, as peft's."""

    def __init__(self, base_layer, r, scaling):
        super().__init__()
        kw = dict(bias=False, dtype=base_layer.weight.dtype)
        self.base_layer, self.scaling = base_layer, scaling
        self.lora_A = torch.nn.Linear(base_layer.in_features, r, **kw)
        self.lora_B = torch.nn.Linear(r, base_layer.out_features, **kw)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def lora_layers(model):
    """(name, peft LoRA layer, its adapter) for each adapted projection of a peft model: one adapter each."""
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            active = [a for a in m.active_adapters if a in m.lora_A]
            if len(active) != 1 or getattr(m, "lora_variant", None) or m.fan_in_fan_out:
                raise NotImplementedError(f"{name}: only one plain LoRA adapter a layer (apply_lora's)")
            yield name, m, active[0]


def whole(q):
    """A parameter's whole value: an FSDP shard (DTensor) is gathered, a collective every rank must call."""
    return q.full_tensor() if hasattr(q, "full_tensor") else q


@torch.no_grad()
def merged_weights(model, merge=True):
    """(name in the plain model, whole weight) one at a time, FSDP shards gathered (every rank calls this),
    trainable token rows folded in. LoRA adapters: merged in fp32, then rounded to the base's dtype
    (merge=True: a model dir), or unmerged as `<proj>.lora_A.weight` / `.lora_B.weight` (LoraLinear's)."""
    # the modules that change a base weight: LoRA layers, and peft's trainable token rows
    lora = {name: (m, a) for name, m, a in lora_layers(model)}
    tokens = {name: m for name, m in model.named_modules() if hasattr(m, "trainable_tokens_delta")}
    for name, q in model.named_parameters():
        # under FSDP each parameter is a shard: the adapters too are gathered whole, in the same order on
        # every rank, before anything combines them with a whole base weight
        if ".lora_" in name or ".trainable_tokens_" in name:
            continue  # read with their base weight below
        # the module that wraps this weight (peft's base_layer), and its name in the plain model
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        key = name.removeprefix("base_model.model.").replace(".token_adapter", "")
        full, unmerged = whole(q), owner in lora and not merge
        if owner in lora and name.endswith(".weight"):
            m, a = lora[owner]
            A, B = whole(m.lora_A[a].weight), whole(m.lora_B[a].weight)
            if unmerged:  # the copy's LoraLinear: the adapter beside its base weight
                yield key.replace(".base_layer.weight", ".lora_A.weight"), A
                yield key.replace(".base_layer.weight", ".lora_B.weight"), B
            else:  # W + B A * scaling in fp32, rounded once to W's dtype
                full = (full.float() + B.float() @ A.float() * m.scaling[a]).to(full.dtype)
        elif owner in tokens:  # the trained embedding rows replace the base's
            m = tokens[owner]
            for a in [a for a in m.active_adapters if a in m.trainable_tokens_delta]:
                rows = whole(m.trainable_tokens_delta[a]).to(full)
                full = full.index_copy(0, torch.tensor(m.token_indices[a], device=full.device), rows)
        yield key if unmerged else key.replace(".base_layer.", "."), full


@torch.no_grad()
def refresh_copy(copy_, model):
    """copy_ := the trained weights, copied in place (a captured decode step reads them at fixed addresses),
    LoRA adapters unmerged if the copy has LoraLinear layers (merged_weights: every rank calls this)."""
    target, done = dict(copy_.named_parameters()), set()  # tied weights appear once
    unmerged = any(isinstance(m, LoraLinear) for m in copy_.modules())
    for key, full in merged_weights(model, merge=not unmerged):
        if key not in target:
            raise RuntimeError(f"sampling copy: no weight {key!r} in {type(copy_).__name__}")
        target[key].copy_(full)
        done.add(key)
    if done != set(target):
        raise RuntimeError(f"sampling copy: weights not refreshed: {sorted(set(target) - done)[:5]}")


@torch.no_grad()
def add_tags(model, tokenizer):
    """Add the six tags as special tokens (idempotent) and initialise new embeddings."""
    vocab = tokenizer.get_vocab()
    new = [t for t in TAGS if t not in vocab]
    if not new:
        return []
    # each new tag's embedding starts as the mean of the sub-word pieces it was spelled with before
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in new}
    tokenizer.add_special_tokens({"additional_special_tokens": list(TAGS)}, replace_extra_special_tokens=False)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tag_ids(tokenizer)
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)  # untied output head: initialise its rows too
    for t in new:
        for w in tables:
            w[ids[t]] = w[pieces[t]].float().mean(0).to(w.dtype)
    return new


def tiny_qwen3_config(vocab_size, hidden=64, layers=2, heads=4, kv_heads=2, **kw):
    """A small Qwen3 for tests and the toy world (same code paths as the 4B model)."""
    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=4096, tie_word_embeddings=True, **kw)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def apply_lora(model, r=64, alpha=128, dropout=0.0, train_tokens=()):
    """LoRA adapters on every projection; only they train, and the embedding rows of `train_tokens`."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                        trainable_token_indices={"embed_tokens": list(train_tokens)} if train_tokens else None,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)
