"""
The toy world: the whole Parallel-R1 curriculum on a 2-core CPU in minutes,
through exactly the same code paths as the 4B run (a transformers tokenizer
with a chat template, a Qwen3 model, `Final Answer:` grading).

The task is a small search. A problem lists candidate digits and an equation;
exactly one candidate solves it:

    Find x in 3 5 8 9 with x*7=56.

A step checks one candidate by writing the product out: `3*7=21 vs 56 no`. The
facts a step needs are tiny (one entry of the single-digit multiplication
table and a comparison), so a ~1M-parameter model learns them from scratch in
a few hundred steps; the difficulty is in the search. A teacher trace checks
candidates in random order, some as plain steps and some in parallel blocks
whose two paths each check a different candidate, with a summary saying which
one checked out:

    <Parallel><Path>3*7=21 vs 56 no</Path><Path>9*7=63 vs 56 no</Path></Parallel><Summary>none</Summary>8*7=56 vs 56 yes
    Final Answer: 8

Paths are independent: each picks its own candidate from the ones not yet
checked (at temperature 1 two sampled paths usually pick different ones).

Levels (chance = 1 / number of candidates):
- easy: 4 candidates (chance 25%); the teacher searches until it finds x.
- hard: 7 candidates (chance 14%); the teacher checks only 1-6 of them and
  then writes `guess` and answers a random unchecked one, so it is right only
  ~64% of the time. A policy that learns to keep checking (more blocks,
  better candidates) beats its teacher: that is the room left for RL.
Only about 60% of teacher traces use blocks at all, like real teacher data,
so the easy RL stage (reward: correct AND a block) has parallel rate to gain.

What the curriculum reaches on it is measured in the README (Results).

Held-out split: a question is for evaluation iff a stable hash of it falls in
one bucket of five; training problems never use those questions. (Holding out
whole equations instead looks stricter but breaks the task: the model then
only ever sees e.g. `3*5=15 no` in training and learns yes/no per product
instead of comparing with the target.)
"""

import random
import re
import zlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from nanopr1.checkpoint import latest
from nanopr1.format import ANSWER_PREFIX, PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, TAGS
from nanopr1.model import add_tags, tiny_qwen3_config

TEMPLATE = "{problem}"   # the question alone: the format is learned in SFT, not asked for
MAX_NEW_TOKENS = 160     # checking all 7 hard candidates takes ~125 tokens; the rest is slack for repeats
LEVELS = {"easy": 4, "hard": 7}   # number of candidates
HARD_BUDGET = (1, 2, 3, 4, 5, 6)  # distinct candidates the hard-level teacher checks before it guesses
MAX_BLOCKS = 4                    # as the sampler's default limit
P_BLOCKS = 0.65                   # share of teacher traces that try to use blocks
P_BLOCK_STEP = 0.7                # in those, the chance that a step is a block (not a plain step)

# -----------------------------------------------------------------------------
# tokenizer and model

SPECIAL = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|unk|>"]
WORDS = [ANSWER_PREFIX, "Find", "with", "none", "guess", "yes", "vs", "no", "in", "x"]  # longest first: "none" before "no"
CHARS = list("0123456789") + list("*+-=.,:? \n")
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer():
    """A word-level tokenizer: each digit, symbol and word is one token, the six tags are special tokens."""
    vocab = {t: i for i, t in enumerate(SPECIAL + list(TAGS) + WORDS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    # every word, digit and character becomes its own piece; decoding concatenates them back
    pattern = "|".join(re.escape(w) for w in WORDS) + r"|."
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        unk_token="<|unk|>", clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"] + list(TAGS)},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def new_model(tokenizer, seed=0):
    """A tiny random Qwen3 (4 layers, hidden 128, ~1M parameters) for the toy vocabulary."""
    torch.manual_seed(seed)
    config = tiny_qwen3_config(len(tokenizer), hidden=128, layers=4, heads=4, kv_heads=2,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    add_tags(model, tokenizer)  # a no-op: the tags are already in the vocabulary
    return model


STAGE_DIRS = ("out/toy-hard", "out/toy-easy", "out/toy-sft")  # where the toy curriculum writes, newest first


def latest_model():
    """The newest toy run the curriculum has written (a run dir with a checkpoint, or a model dir), or None."""
    return next((d for d in STAGE_DIRS if latest(d) or (Path(d) / "config.json").is_file()), None)


def init_dir(path, seed=0):
    """Write an untrained toy model and its tokenizer where nanopr1.model.load(path) finds them."""
    tokenizer = build_tokenizer()
    model = new_model(tokenizer, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)

# -----------------------------------------------------------------------------
# problems

QUESTION_RE = re.compile(r"Find x in ([\d ]+) with x\*(\d)=(\d+)\.")


def _is_eval(question):
    # a stable hash (not Python's salted hash()) so the split is the same in every process
    return zlib.crc32(question.encode()) % 5 == 0


def _problem(level, rng, held_out):
    k = LEVELS[level]
    while True:
        a, x = rng.randint(2, 9), rng.randint(1, 9)
        cands = sorted(rng.sample([c for c in range(1, 10) if c != x], k - 1) + [x])
        question = f"Find x in {' '.join(map(str, cands))} with x*{a}={a * x}."
        if _is_eval(question) == held_out:
            return {"question": question, "answer": str(x)}


def problems(level, n, seed):
    """n training problems of a level ("easy" | "hard"), deterministic for a seed, never from the eval split."""
    rng = random.Random(f"{level}-{seed}")
    return [_problem(level, rng, held_out=False) for _ in range(n)]


def eval_set(level, n=200):
    """A fixed set of n distinct held-out problems (questions that training problems never use)."""
    rng, seen, out = random.Random(f"eval-{level}"), set(), []
    while len(out) < n:
        p = _problem(level, rng, held_out=True)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def parse_question(question):
    """(candidates, a, t) from a toy question."""
    m = QUESTION_RE.fullmatch(question.strip())
    if m is None:
        raise ValueError(f"not a toy question: {question!r}")
    return [int(c) for c in m.group(1).split()], int(m.group(2)), int(m.group(3))

# -----------------------------------------------------------------------------
# teacher traces

def _check(c, a, t):
    # the target is copied next to the product so the yes/no is a local comparison
    return f"{c}*{a}={c * a} vs {t} {'yes' if c * a == t else 'no'}"


def teacher_trace(problem, rng):
    """A canonical-layout response: checks in random order, some as blocks of two paths, then the answer.

    Each path of a block picks its candidate on its own, as two sampled paths do:
    now and then both check the same one, and the trace simply goes on searching.
    """
    cands, a, t = parse_question(problem["question"])
    todo = rng.sample(cands, len(cands))
    budget = len(cands) if len(cands) <= LEVELS["easy"] else rng.choice(HARD_BUDGET)
    use_blocks = rng.random() < P_BLOCKS
    out, checked, blocks, found = [], 0, 0, None
    while todo and checked < budget and found is None:
        if use_blocks and blocks < MAX_BLOCKS and len(todo) >= 2 and rng.random() < P_BLOCK_STEP:
            pair = [rng.choice(todo), rng.choice(todo)]  # independent picks, like independent paths
            hit = [c for c in pair if c * a == t]
            summary = f"x={hit[0]}" if hit else "none"
            paths = "".join(f"{PATH}{_check(c, a, t)}{PATH_END}" for c in pair)
            out.append(f"{PARALLEL}{paths}{PARALLEL_END}{SUMMARY}{summary}{SUMMARY_END}")
            todo = [c for c in todo if c not in pair]
            checked, blocks = checked + len(set(pair)), blocks + 1
        else:
            c = todo.pop(0)
            hit = [c] if c * a == t else []
            out.append(_check(c, a, t) + "\n")
            checked += 1
        found = hit[0] if hit else None
    if found is None:  # the hard-level teacher gives up and guesses among the unchecked
        found = rng.choice(todo)
        out.append("guess\n")
    return "".join(out) + f"{ANSWER_PREFIX} {found}"


def sft_corpus(n, seed):
    """n SFT examples {"question", "answer", "response"}: two thirds easy, one third hard.

    Hard problems are in the corpus (unlike the paper's easy-only SFT) because a
    1M-parameter model does not generalise from 4-candidate lists to 7 on its
    own; their traces carry the teacher's budget-limited search, guesses and all.
    """
    rng = random.Random(f"sft-{seed}")
    n_hard = n // 3
    items = problems("easy", n - n_hard, seed) + problems("hard", n_hard, seed)
    rng.shuffle(items)
    return [dict(p, response=teacher_trace(p, rng)) for p in items]
