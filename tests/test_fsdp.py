"""The FSDP2 pieces, run for real on two CPU processes (torchrun, gloo): the sampling copy gathers
every sharded weight, and the chunked log-prob head inside FSDP2's gathered head group gives the
unsharded model's gradients over two micro-batches (reduce-scattered each time, never accumulated
unsharded); a LoRA model's refresh and save gather its adapters too. accelerate does not run FSDP on
CPUs, so tests/dist_fsdp.py shards the model the way its FSDP2 preparation does; and a checkpoint under an
Accelerator marked FSDP (its FSDP2 prepare) holds the weights once and resumes exactly."""

import json

from conftest import ROOT, run


def test_fsdp2_copy_and_gradients_equal_the_unsharded_model(tmp_path):
    run(ROOT / "tests" / "dist_fsdp.py", str(tmp_path), procs=2, env={"PYTHONPATH": f"{ROOT}/tests:{ROOT}"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks) == 2 and all(r["world"] == 2 and r["sharded"] == "DTensor" for r in ranks)
    for r in ranks:
        assert r["copy_diff"] <= 1e-6
        assert r["grad_scale"] > 0.1 and r["grad_diff"] <= 1e-6 * r["grad_scale"]
        # LoRA: the copy (adapters unmerged) and the saved model dir (merged) are the unsharded peft model's
        assert r["lora_sharded"] == "DTensor" and r["lora_scale"] > 0.1
        assert r["lora_copy_diff"] <= 1e-5 * r["lora_scale"] and r["lora_save_diff"] <= 1e-5 * r["lora_scale"]
        # a checkpoint under FSDP: the optimizer's shards and the schedule/RNG in state/, no model shards (the model
        # dir holds the weights; LoRA: the trained ones, gathered, in state/); a fresh sharded model + AdamW loads
        # the weights, both moments and the step exactly, and its next step is the original's
        for kind in ("full", "lora"):
            c = r[kind]
            assert c["world"] == 2 and c["fsdp"] == "DistributedType.FSDP" and c["sharded"] == "DTensor"
            assert c["files"] == (["model.safetensors"] if kind == "lora" else []) + [
                "optimizer_0/.metadata", "optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp",
                "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"]
            assert c["adapters"] == (kind == "lora")
            assert c["fresh_diff"] > 0.1 and c["weight_diff"] == 0 and c["next_diff"] == 0
            assert c["moments"] == ["exp_avg", "exp_avg_sq", "step"] and c["moment_diff"] == 0
            assert c["moment_count"] > 0 and c["lr"][0] == c["lr"][1]
