"""Run by test_plan.py under `torchrun --nproc_per_node 2` (gloo, CPU): plan.kv_cache_for_run where rank 1's
machine has room for one KV cache row (one rollout needs two) and rank 0's for thousands. Writes what each
rank did to DIR/rank{r}.json. Not a test itself."""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import Accelerator

from conftest import build_bpe_tokenizer, tiny_model
from test_plan import rl_flags
from nanopr1 import UsageError, plan

acc = Accelerator(cpu=True)
model = tiny_model(build_bpe_tokenizer())
per_row = 132 * plan.kv_bytes_per_token(model.config, plan.torch.float32) + 12 * model.config.vocab_size
# each of the 2 processes takes half of its half: 1 row or 1,500
plan.available_bytes = lambda: (6 if acc.process_index == 1 else 6000) * per_row
try:
    kv = plan.kv_cache_for_run(acc, model, None, None, 0, 30, **rl_flags())
    outcome = f"went on with {kv.R} rows"
except UsageError as e:
    outcome = f"error: {e}"
result = {"world": dist.get_world_size(), "outcome": outcome}
(Path(sys.argv[1]) / f"rank{acc.process_index}.json").write_text(json.dumps(result))
dist.barrier()  # both ranks done before the group goes down
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # no interpreter teardown: a gloo thread's destructor there has aborted a finished rank
