"""Run by test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU): the FSDP2 pieces of the
training scripts against the same model unsharded. Shards like accelerate's FSDP2 preparation (each
decoder layer, then the embedding/norm/head group kept gathered from forward to backward, then the
root). Prints one JSON line per rank. Not a test itself."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from conftest import build_bpe_tokenizer, tiny_model
from nanopr1 import scoring
from nanopr1.model import refresh_copy, sampling_copy

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
full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g
grads = dict(plain.named_parameters())
grad_diff = max((full(q.grad) - grads[n].grad).abs().max().item() for n, q in model.named_parameters())
result = {"world": dist.get_world_size(), "sharded": sharded, "copy_diff": copy_diff, "grad_diff": grad_diff,
          "grad_scale": max(q.grad.abs().max().item() for q in plain.parameters())}
(Path(sys.argv[1]) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))  # one file each: no interleaving
dist.barrier()  # both ranks done with the group before it goes down
dist.destroy_process_group()
