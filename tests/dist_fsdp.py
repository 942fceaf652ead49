"""Run by test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU): the FSDP2 pieces of the
training scripts against the same model unsharded. Shards like accelerate's FSDP2 preparation (each
decoder layer, then the embedding/norm/head group kept gathered from forward to backward, then the
root). Then checkpoint.save and load_state under an Accelerator marked FSDP (accelerate does not choose FSDP
on a CPU; its FSDP2 prepare runs there), a full fine-tune and LoRA. Writes one JSON file per rank. Not a test."""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from conftest import build_bpe_tokenizer, tiny_model
from nanopr1 import checkpoint, scoring
from nanopr1.format import tag_ids
from nanopr1.model import apply_lora, load_model, refresh_copy, sampling_copy, save_model

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
tok = build_bpe_tokenizer()
plain, model = tiny_model(tok), tiny_model(tok)  # the same weights (same seed) on every rank
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard([model.model.norm, model.model.embed_tokens, model.lm_head], mesh=mesh, reshard_after_forward=False)
fully_shard(model, mesh=mesh)
sharded = type(next(model.parameters())).__name__
with torch.no_grad():  # every rank sees the same change, so the sharded and plain models stay equal
    for q, p in zip(model.parameters(), plain.parameters()):
        noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01
        p.add_(noise)
        q.copy_(q + (noise if not hasattr(q, "full_tensor") else torch.distributed.tensor.distribute_tensor(
            noise, q.device_mesh, q.placements)))

copy = sampling_copy(model, torch.float32, "cpu")
refresh_copy(copy, model)  # gathers each full weight from the shards
ids = torch.randint(10, 300, (4, 12), generator=torch.Generator().manual_seed(1))
copy_diff = (copy(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()

for half in (ids[:2], ids[2:]):  # two micro-batches, gradients reduce-scattered into the shards each time
    scoring.token_logprobs(model, {"input_ids": half}, first=0).sum().backward()
scoring.token_logprobs(plain, {"input_ids": ids}, first=0).sum().backward()
full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # (a collective)
grads = dict(plain.named_parameters())
grad_diff = max((full(q.grad) - grads[n].grad).abs().max().item() for n, q in model.named_parameters())
result = {"world": dist.get_world_size(), "sharded": sharded, "copy_diff": copy_diff, "grad_diff": grad_diff,
          "grad_scale": max(q.grad.abs().max().item() for q in plain.parameters())}

# LoRA under FSDP: the refresh and the save gather the adapters (and the tag rows) with their base weights
lora_plain, lora = (apply_lora(tiny_model(tok), r=4, alpha=8, train_tokens=list(tag_ids(tok).values()))
                    for _ in range(2))  # the same adapters: tiny_model reseeds before apply_lora draws lora_A
with torch.no_grad():  # a trained state: lora_B and the tag rows moved from their initial values
    for name, q in lora_plain.named_parameters():
        if "lora_B" in name or "trainable_tokens" in name:
            q.normal_(0, 0.1, generator=torch.Generator().manual_seed(q.numel()))
    lora.load_state_dict(lora_plain.state_dict())
base = lora.get_base_model()
for layer in base.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard([base.model.norm, base.model.embed_tokens, base.lm_head], mesh=mesh, reshard_after_forward=False)
fully_shard(lora, mesh=mesh)
lora_copy = sampling_copy(lora, torch.float32, "cpu")
refresh_copy(lora_copy, lora)
save_model(lora, tok, Path(sys.argv[1]) / "lora", is_main=dist.get_rank() == 0)  # merged, written by rank 0
dist.barrier()
ids = torch.cat([ids, torch.tensor(list(tag_ids(tok).values())).expand(4, -1)], 1)  # the tag rows too
with torch.no_grad():
    want = lora_plain(input_ids=ids).logits
    saved = load_model(str(Path(sys.argv[1]) / "lora"))[0](input_ids=ids).logits
    result.update(lora_sharded=type(base.model.layers[0].self_attn.q_proj.lora_A.default.weight).__name__,
                  lora_copy_diff=(lora_copy(input_ids=ids).logits - want).abs().max().item(),
                  lora_save_diff=(saved - want).abs().max().item(), lora_scale=want.abs().max().item())


def resume(lora):
    """A step, checkpoint.save, a step more; a fresh sharded model + AdamW loads the checkpoint: what differs."""
    acc = Accelerator(cpu=True)
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, state_dict_type="SHARDED_STATE_DICT", auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen3DecoderLayer"])
    # marked FSDP (AcceleratorState() copies PartialState's type: both, or an optimizer's wrapper undoes it)
    acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    out, ids = Path(sys.argv[1]) / f"lora{lora}", torch.randint(10, 300, (4, 12), generator=torch.manual_seed(2))

    def make(seed):  # the same base every time (LoRA: the frozen base is not in the checkpoint), moved for seed 1
        model = tiny_model(tok).train()
        if lora:  # other adapters for another seed (the trainable token rows: accelerate's FSDP2 prepare fails)
            torch.manual_seed(seed)
            model = apply_lora(model, r=4, alpha=8)
        with torch.no_grad():
            for q in model.parameters() if not lora else []:
                q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)) * 0.1 * seed)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
        return acc.prepare(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)))

    def step(model, opt, sched):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        return weights(model)

    weights = lambda m: {n: full(q).detach().clone() for n, q in m.named_parameters()}  # gathered: collectives
    moments = lambda m, o: {f"{n}/{k}": full(v).clone().float() for n, q in m.named_parameters() if q in o.state
                            for k, v in o.state[q].items()}
    diff = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in b) if a.keys() == b.keys() else float("inf")
    model, opt, sched = make(0)
    step(model, opt, sched)
    checkpoint.save_checkpoint(out, 1, acc, model, tok, argparse.Namespace(lr=1e-2, _typed=set()))
    saved_w, saved_m, saved_lr = weights(model), moments(model, opt), sched.get_last_lr()
    after = step(model, opt, sched)
    for held in (acc._models, acc._optimizers, acc._schedulers):
        held.clear()
    model, opt, sched = make(1)
    fresh = weights(model)
    assert checkpoint.load_state(out, acc) == 1
    state = out / "checkpoint-000001" / "state"
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    sharded = type(opt.param_groups[0]["params"][0]).__name__  # what AdamW steps: the shards
    return {"world": acc.num_processes, "fsdp": str(acc.distributed_type), "sharded": sharded,
            "files": sorted(str(f.relative_to(state)) for f in state.rglob("*") if f.is_file()),
            "fresh_diff": diff(fresh, saved_w), "weight_diff": diff(weights(model), saved_w),
            "moments": sorted({k.rsplit("/", 1)[1] for k in moments(model, opt)}), "moment_count": len(saved_m),
            "moment_diff": diff(moments(model, opt), saved_m), "lr": [saved_lr, sched.get_last_lr()],
            "next_diff": diff(step(model, opt, sched), after),
            # LoRA: state/ holds the trained weights, gathered whole (the model dir: merged)
            "adapters": lora and set(load_file(state / "model.safetensors")) == trained}


result.update(full=resume(False), lora=resume(True))
(Path(sys.argv[1]) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))  # one file each: no interleaving
dist.barrier()  # both ranks done with the group before it goes down
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # no interpreter teardown: a gloo thread's destructor there has aborted a finished rank
