"""Run by test_eval.py under `torchrun --nproc_per_node N` (ACCELERATE_USE_CPU=1: gloo): eval.py's
main on this rank's share, then train_rl's --eval-every hook; each rank writes what the hook
returned to OUT/run_eval.rank<r>.json. Not a test itself."""
import json
import sys
from argparse import Namespace
from pathlib import Path

from accelerate import Accelerator

import eval as eval_script
import train_rl
from nanopr1 import toy
from nanopr1.model import load

out, argv = Path(sys.argv[1]), sys.argv[2:]
eval_script.main(argv)  # the same code as `torchrun eval.py ARGV`
acc = Accelerator()
model, tokenizer = load(argv[argv.index("--model") + 1])
hook_args = Namespace(eval_data="toy-easy", data_dir=None, eval_limit=5, eval_n=2, max_new_tokens=24, num_paths=2,
                      max_blocks=4, variant="seen", seed=0)
summary = train_rl.run_eval(model, tokenizer, toy.TEMPLATE, hook_args, acc)
(out / f"run_eval.rank{acc.process_index}.json").write_text(json.dumps({"world": acc.num_processes, **summary}))
