"""Run by test_eval.py under `torchrun --nproc_per_node 2` (ACCELERATE_USE_CPU=1: gloo): train_rl.py's
--eval-every hook, evaluation.evaluate_everywhere, on each rank's share; each rank writes the summary
it got to OUT/run_eval.rank<r>.json. Not a test itself."""
import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from nanopr1 import data, toy
from nanopr1.evaluation import evaluate_everywhere
from nanopr1.model import load_model

out, model_dir = Path(sys.argv[1]), sys.argv[2]
acc = Accelerator()
model, tokenizer = load_model(model_dir)
problems = data.load_problems("toy-easy")[:5]
_, summary = evaluate_everywhere(model, tokenizer, problems, 2, gather_object, acc.process_index, acc.num_processes,
                                 template=toy.TEMPLATE, max_new_tokens=24, seed=0)
(out / f"run_eval.rank{acc.process_index}.json").write_text(json.dumps({"world": acc.num_processes, **summary}))
acc.wait_for_everyone()  # both ranks done with the group before it goes down
acc.end_training()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # no interpreter teardown: a gloo thread's destructor there has aborted a finished rank
