"""Tests for nanopr1/plan.py: its parameter, KV and logits figures equal what the code really
allocates on a small model; the README's three setups of the paper's recipe fit; --plan runs offline
from a directory that holds only a config.json."""


import pytest
import torch
from transformers import Qwen3Config

from conftest import ROOT, run, tiny_model
from nanopr1 import scoring
from nanopr1.model import apply_lora, tiny_qwen3_config
from nanopr1.plan import GB, count_parameters, memory_plan
from nanopr1.kvcache import KVCache

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000, tie_word_embeddings=True, rms_norm_eps=1e-6)


def test_parameter_figures_equal_the_model(bpe_tokenizer):
    config = tiny_qwen3_config(len(bpe_tokenizer), hidden=64, layers=3)
    model = tiny_model(bpe_tokenizer, hidden=64, layers=3)
    n, adapters, layer, embed = count_parameters(config, lora_r=4)
    numel = sum(q.numel() for q in model.parameters())
    assert n == numel
    lora = apply_lora(model, r=4, alpha=8)
    assert adapters == sum(q.numel() for name, q in lora.named_parameters() if "lora_" in name)
    plan = memory_plan(config, gpu_bytes=GB, sampling=False)
    assert dict(plan.items)["weights (fp32, whole)"] == 4 * numel


@torch.no_grad()
def test_kv_figure_equals_the_cache(bpe_tokenizer):
    """The plan's KV bytes for its rows and columns = the bytes KVCache allocates (bf16)."""
    config = tiny_qwen3_config(len(bpe_tokenizer), hidden=64, layers=3)
    plan = memory_plan(config, gpu_bytes=GB, max_prompt_tokens=20, max_new_tokens=30, kv_bytes=3e5)
    assert plan.rows >= 2
    model = tiny_model(bpe_tokenizer, hidden=64, layers=3).to(torch.bfloat16)
    kv = KVCache(plan.rows, plan.cols, "cpu")
    kv.reset(model)
    kv.add_rows(1)
    kv.prefill(model, torch.tensor([[5, 6, 7]]), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), [0])
    assert sum(t.numel() * t.element_size() for t in kv.kv) == plan.kv_bytes
    assert plan.kv_bytes <= 3e5 < plan.kv_bytes + plan.kv_bytes / plan.rows  # as many rows as the budget holds


def test_logits_figure_bounds_the_chunks_scoring_computes(bpe_tokenizer, monkeypatch):
    """Every chunk of fp32 logits scoring.py computes is at most the plan's LOGITS_CHUNK_TOKENS x V x 4 bytes."""
    model = tiny_model(bpe_tokenizer)
    V, seen = model.config.vocab_size, []
    chunk = scoring._chunk_logprobs
    monkeypatch.setattr(scoring, "_chunk_logprobs", lambda head, h, *a: seen.append(h.shape[0] * h.shape[1]) or chunk(head, h, *a))
    monkeypatch.setattr(scoring, "LOGITS_CHUNK_TOKENS", 50)
    ids = torch.randint(10, 300, (6, 40))
    scoring.token_logprobs(model, {"input_ids": ids}, first=0).sum().backward()
    # 39 positions in chunks of 50 // 6 = 8: 5 chunks in the forward, the same 5 recomputed by backward
    assert seen[:5] == [48, 48, 48, 48, 42] and sorted(seen[5:]) == [42, 48, 48, 48, 48]
    assert max(seen) * V * 4 <= 50 * V * 4


@pytest.mark.parametrize("gpus, gb, lora, tokens, fits", [
    (8, 40, False, 8192, True),    # the full fine-tune on 8 x 40 GB (a smaller micro-batch)
    (8, 80, False, 16384, True),   # the full fine-tune on 8 x 80 GB
    (1, 80, True, 16384, True),    # --lora on one 80 GB GPU
    (1, 80, False, 16384, False),  # the full fine-tune on one 80 GB GPU: 16 bytes a parameter alone is 64 GB
])
def test_the_readme_setups(gpus, gb, lora, tokens, fits):
    plan = memory_plan(Qwen3Config(**QWEN3_4B), gpu_bytes=gb * GB, world=gpus, fsdp=gpus > 1, lora_r=64 if lora else 0,
                       micro_batch_tokens=tokens, max_rows=512 * 8 // gpus * 2)
    assert plan.fits == fits and plan.verdict.startswith("fits" if fits else "does not fit")
    if fits:
        assert plan.total <= gb * GB and plan.rows >= 2


def test_plan_runs_offline_from_a_config_json(tmp_path):
    Qwen3Config(**QWEN3_4B).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    out = run(ROOT / "train_rl.py", "--plan", "--init", str(tmp_path), "--num-gpus", "8", "--gpu-memory-gb", "80").stdout
    assert "sampling copy" in out and "KV cache" in out and out.strip().splitlines()[-1].startswith("fits: ")
    out = run(ROOT / "train_sft.py", "--plan", "--model", str(tmp_path), "--num-gpus", "1", "--gpu-memory-gb", "24").stdout
    assert out.strip().splitlines()[-1].startswith("does not fit: ")
    if not torch.cuda.is_available():
        proc = run(ROOT / "train_rl.py", "--plan", "--init", str(tmp_path), check=False)
        assert proc.returncode == 1 and proc.stderr.strip() == "error: no GPU here: pass --gpu-memory-gb (e.g. 80) to plan for one"


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_the_plans_training_transient_is_the_measured_one(variant):
    """The plan's training transient (one micro-batch's forward and backward above the model states, or
    AdamW's step) against plan.profile_training on a small Qwen3 in fp32 with gradient checkpointing, the
    CPU run of the step a GPU run measures before sizing its KV cache: 4,096 tokens in rows of 1,024, a
    vocabulary small enough that the layers dominate. Measured: every allocation and free the profiler
    recorded, replayed in order (plan.peak_bytes); the gradients (the plan counts them as states) taken off.
    Within 15%."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM
    from nanopr1.format import TAGS
    from nanopr1.plan import profile_training, training_transient
    config = tiny_qwen3_config(1024, hidden=256, layers=4, heads=4, kv_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True))
    model.train()
    tags = {t: 1018 + i for i, t in enumerate(TAGS)}
    profile_training(model, opt, acc, tags, variant, 0, 4096, 1024)  # AdamW's moments exist now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(q.numel() for q in model.parameters())
    measured = profile_training(model, opt, acc, tags, variant, 0, 4096, 1024) - 4 * n
    planned = training_transient(config, 4096, 1024, autocast=False, unseen=variant == "unseen", trained=n)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # lr 0: the weights did not move
    assert all(int(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())  # a fresh AdamW state
