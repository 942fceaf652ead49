"""Tests for nanopr1/plan.py: its parameter, KV and logits figures equal what the code really
allocates on a small model; the README's three setups of the paper's recipe fit; --plan runs offline
from a directory that holds only a config.json; the measured step counts what it should (AdamW's moments
once, the allocator's cache not at all); a CPU run measures no step; every rank sizes the cache alike."""


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
    assert sum(t.numel() * t.element_size() for t in kv.tensors) == plan.kv_bytes
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


def small_run(grad_ckpt=True):
    """A small Qwen3 in fp32 with its AdamW, prepared as train_rl.py does on a CPU; (model, opt, acc, tags, n)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM
    from nanopr1.format import TAGS
    config = tiny_qwen3_config(1024, hidden=256, layers=4, heads=4, kv_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True))
    model.train()
    return model, opt, acc, {t: 1018 + i for i, t in enumerate(TAGS)}, sum(q.numel() for q in model.parameters())


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_the_plans_training_transient_is_the_measured_one(variant):
    """The plan's training transient (one micro-batch's forward and backward above the model states, or
    AdamW's step) against plan.profile_training on a small Qwen3 in fp32 with gradient checkpointing, the
    CPU run of the step a GPU run measures before sizing its KV cache: 4,096 tokens in rows of 1,024, a
    vocabulary small enough that the layers dominate. Measured: every allocation and free the profiler
    recorded, replayed in order (plan.peak_bytes); the gradients (the plan counts them as states) taken off.
    Within 15%."""
    from nanopr1.plan import profile_training, training_transient
    model, opt, acc, tags, n = small_run()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = profile_training(model, opt, acc, tags, variant, 0, 4096, 1024) - 4 * n
    planned = training_transient(model.config, 4096, 1024, autocast=False, unseen=variant == "unseen", trained=n)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # lr 0: the weights did not move
    assert all(int(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())  # a fresh AdamW state


def test_adamws_moments_are_not_counted_in_the_measured_peak():
    """AdamW's moments stay for the whole run: once profile_training returns, the GPU's free memory already
    lacks them, so its peak must not count them again. A micro-batch small enough that AdamW's step is the
    peak: a fresh optimizer measures what one that has stepped measures, the gradients and AdamW's
    temporaries (4 + 4 bytes a parameter); it measured the moments too (16)."""
    from nanopr1.plan import ADAMW_BYTES, profile_training
    model, opt, acc, tags, n = small_run()
    fresh = profile_training(model, opt, acc, tags, "seen", 0, 256, 128)
    states = list(opt.state.values())
    assert len(states) == len(list(model.parameters())) and all(int(s["step"]) == 0 for s in states)
    again = profile_training(model, opt, acc, tags, "seen", 0, 256, 128)
    assert fresh == pytest.approx(again, rel=0.02) and fresh == pytest.approx((4 + ADAMW_BYTES) * n, rel=0.1)


def test_peak_bytes_on_a_gpu_sees_past_the_allocators_cache(monkeypatch):
    """plan.peak_bytes against the CUDA allocator's bookkeeping (tests/fake_cuda.py): with 1.5 GB of cached
    free blocks left by loading, a step that takes 1 GB was measured as 0 (served from the cache); the
    cache is emptied first, so it measures 1 GB."""
    from fake_cuda import FakeAllocator
    from nanopr1.plan import peak_bytes
    fake = FakeAllocator(cached=1.5e9).install(monkeypatch)
    assert peak_bytes(lambda: (fake.take(1e9), fake.give(1e9)), "cuda") == 1e9


def rl_flags(**kw):
    """What train_rl.py hands plan.kv_cache_for_run: its flags in the plan's words (train_rl.memory_flags)."""
    return {**dict(max_new_tokens=100, rollouts=4 * 4, num_paths=2, max_rows=None, kv_memory_gb=None,
                   micro_batch_tokens=16384, unseen=False, gpu_memory_gb=None, num_gpus=None, lora_r=0,
                   reference=False, grad_ckpt=True), **kw}


def test_a_cpu_run_sizes_its_cache_from_its_rollouts_without_a_measured_step(bpe_tokenizer, monkeypatch):
    """On a CPU the measured step sized for a GPU's worst case (16,384 tokens) got a real small model killed
    at 24 GB before its first step; a CPU has no free GPU memory to size the cache from. No step is measured:
    the cache holds the run's rollouts (4 prompts x 4 rollouts x 2 paths), or what half of the machine's
    free memory holds."""
    from accelerate import Accelerator
    from nanopr1 import plan
    monkeypatch.setattr(plan, "profile_training", lambda *a, **k: pytest.fail("a CPU run measured a step"))
    acc, model = Accelerator(cpu=True), tiny_model(bpe_tokenizer)
    kv = plan.kv_cache_for_run(acc, model, None, None, 0, 30, **rl_flags())
    assert (kv.R, kv.cols) == (32, 131) and kv.tensors == []  # allocated by the first forward
    kv_row = 132 * plan.kv_bytes_per_token(model.config, torch.float32)
    monkeypatch.setattr(plan, "available_bytes", lambda: 20 * kv_row)  # 10 rows in half of it, at most
    assert 2 <= plan.kv_cache_for_run(acc, model, None, None, 0, 30, **rl_flags()).R < 10  # rollouts are admitted


def test_every_rank_refuses_together(tmp_path):
    """A refusal decided on one rank alone leaves the others waiting in their first collective. Two real
    processes (torchrun, gloo): rank 1's machine has almost no free memory, rank 0's plenty; both refuse,
    with the same message (tests/dist_plan.py). A hang fails by the timeout."""
    import json
    import socket
    import subprocess
    import sys
    from conftest import ENV
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / "dist_plan.py"), str(tmp_path)]
    env = dict(ENV, ACCELERATE_USE_CPU="1", PYTHONPATH=f"{ROOT}/tests:{ROOT}")
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["outcome"] == ranks[1]["outcome"], ranks
    assert ranks[0]["outcome"].startswith("error: half of this machine's free memory holds 1 KV cache rows")
