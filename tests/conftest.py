"""Shared test fixtures: a small byte-level BPE tokenizer built offline (a real
subword tokenizer with a chat template, EOS and the six tags) and tiny models."""

import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub (set before transformers loads)
os.environ.setdefault("NANOPR1_CPU_GRAPHS", "1")  # the tests capture decode steps on a CPU too (the GPU's rules)

from pathlib import Path  # noqa: E402

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from nanopr1.format import PARALLEL_PROMPT, TAGS
from transformers import LlamaConfig

from nanopr1.model import add_tags, tiny_qwen3_config

torch.set_num_threads(1)  # tiny models: one thread is as fast, and immune to a busy machine

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = [
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell altogether?",
    "First, compute the number of apples: 3 + 4 = 7. Then multiply by 2 to get 14.",
    "Both paths agree that the total is 19, so the answer follows.",
    "Final Answer: 42", "Let x be the number of cats. Then 2 + x = 6, so x = 4.",
    "Consider the leg count of all pets. Dogs and cats have four legs.",
    PARALLEL_PROMPT,
]


def shared_file(name):
    """Path of a file in ../shared/data, or skip the test when it is absent."""
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def build_bpe_tokenizer(texts=_CORPUS, vocab_size=400):
    """A byte-level BPE trained on `texts`, with chat tokens and the six tags."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": list(TAGS)}, replace_extra_special_tokens=False)
    return tokenizer


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_bpe_tokenizer()


def tiny_llama_config(vocab_size, hidden=64, layers=2, heads=4, kv_heads=2, **kw):
    """A small Llama-architecture model: checks that nothing depends on Qwen3 internals."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, **kw)


def init_toy_dir(path, seed=0):
    """Write an untrained toy model and its tokenizer to `path` (for model.load_model); the path."""
    from nanopr1 import toy
    tokenizer = toy.build_tokenizer()
    toy.new_model(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_model(tokenizer, arch="qwen3", seed=0, **kw):
    """A random tiny model in fp32 with the tokenizer's vocabulary (tags included)."""
    torch.manual_seed(seed)
    make = tiny_qwen3_config if arch == "qwen3" else tiny_llama_config
    model = AutoModelForCausalLM.from_config(make(len(tokenizer), **kw), attn_implementation="sdpa")
    add_tags(model, tokenizer)
    return model.eval()


@pytest.fixture
def tiny_qwen3(bpe_tokenizer):
    return tiny_model(bpe_tokenizer)


ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def run(script, *args, procs=1, check=True, env=None):
    """Run a script as a user would: one process, or `procs` real processes (torchrun, gloo on the CPU)."""
    if procs == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(port), str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, ACCELERATE_USE_CPU="1", **(env or {})), capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
