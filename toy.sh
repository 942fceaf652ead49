#!/usr/bin/env bash
# The whole curriculum on the toy world, on a CPU: SFT -> easy RL -> hard RL, then the before/after table.
# About 15 minutes on 2 cores; each stage writes a model dir that sample.py and eval.py load (out/toy-*).
set -euo pipefail
cd "$(dirname "$0")"
python train_sft.py --preset toy "$@"
python train_rl.py --preset toy --stage easy "$@"
python train_rl.py --preset toy --stage hard "$@"
python eval.py --preset toy --model out/toy-sft,out/toy-easy,out/toy-hard
