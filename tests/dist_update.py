"""Run by test_rl.py under `accelerate launch --num_processes N`: one GRPO update on this
rank's share of fixed rollouts; rank 0 saves the updated weights. Not a test itself."""
import sys

import torch
from accelerate import Accelerator

import train_rl
from nanopr1.model import load, tag_ids

model_dir, rollouts_file, out_file = sys.argv[1:4]
acc = Accelerator(cpu=True)
model, tokenizer = load(model_dir)
ros, adv = torch.load(rollouts_file, weights_only=False)
mine = list(range(acc.process_index, len(ros), acc.num_processes))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = acc.prepare(model, opt)
model.train()
stats = {"clipped_tokens": 0.0, "ratio_sum": 0.0, "tokens": 0.0, "gap_sum": 0.0, "gap_tokens": 0.0, "loss": 0.0}
args = train_rl.parse_args(["--preset", "toy", "--variant", "unseen", "--micro-batch", "2"])
train_rl.update(model, opt, [ros[i] for i in mine], list(range(len(mine))), adv[mine], None, None,
                tag_ids(tokenizer), args, tokenizer.pad_token_id, acc, stats)
loss = acc.reduce(torch.tensor(stats["loss"]), "sum")
if acc.is_main_process:
    torch.save((torch.cat([q.detach().flatten() for q in acc.unwrap_model(model).parameters()]), loss), out_file)
