#!/usr/bin/env bash
# The paper's findings in miniature, on the toy world (docs/results.md, "What the toy shows of the paper's
# findings"): run after toy.sh.
# (b) where the first block opens during hard RL: seeds 0 (toy.sh's run), 1, 2 from the same out/toy-easy;
# (c) Unseen: S2 alternating reward (the recipe) vs accuracy only, seeds 0 and 1, from an Unseen SFT;
# (d) the scaffold: S2 for the first 20 of 40 steps, then accuracy.
# About 35 minutes on 2 cores. Figures: python plot.py ... (the last lines).
set -euo pipefail
cd "$(dirname "$0")/.."
for s in 1 2; do python train_rl.py --preset toy --stage hard --seed $s --out out/toy-hard-s$s "$@"; done
python train_sft.py --preset toy --variant unseen "$@"
for s in 0 1; do
  python train_rl.py --preset toy --stage hard --variant unseen --seed $s --out out/toy-unseen-s$s "$@"
  python train_rl.py --preset toy --stage hard --variant unseen --seed $s --reward accuracy --out out/toy-unseen-acc-s$s "$@"
  python train_rl.py --preset toy --stage hard --variant unseen --seed $s --reward scaffold --scaffold-switch 20 \
    --out out/toy-unseen-scaffold-s$s "$@"
done
python eval.py --preset toy --datasets toy-hard --model out/toy-easy,out/toy-hard,out/toy-hard-s1,out/toy-hard-s2
python eval.py --preset toy --datasets toy-hard --variant unseen --model out/toy-sft-unseen,out/toy-unseen-s0,out/toy-unseen-s1,out/toy-unseen-acc-s0,out/toy-unseen-acc-s1,out/toy-unseen-scaffold-s0,out/toy-unseen-scaffold-s1
python plot.py out/toy-hard out/toy-hard-s1 out/toy-hard-s2 --labels seed0,seed1,seed2 --out figures/hard-rl
python plot.py out/toy-unseen-s0 out/toy-unseen-acc-s0 out/toy-unseen-scaffold-s0 out/toy-unseen-s1 out/toy-unseen-acc-s1 \
  out/toy-unseen-scaffold-s1 --labels S2-seed0,acc-seed0,scaffold-seed0,S2-seed1,acc-seed1,scaffold-seed1 --smooth 5 \
  --out figures/unseen
