"""The toy world: the whole Parallel-R1 curriculum on a 2-core CPU in minutes, through the code of
the 4B run. A problem is a small search, `Find x in 3 5 8 9 with x*7=56.`; a step checks one
candidate (`3*7=21 vs 56 no`), a block two at once. The rest: docs/design.md, "The toy world"."""

import random
import re
import zlib

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from nanopr1.format import (ANSWER_PREFIX, BLOCK_GAP, PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY,
                            SUMMARY_END, TAGS)
from nanopr1.model import tiny_qwen3_config

TEMPLATE = "{problem}"  # the question alone: the format is learned in SFT, not asked for
MAX_NEW_TOKENS = 160    # checking all 7 hard candidates takes ~125 tokens; the rest is slack
LEVELS = {"easy": 4, "hard": 7}   # number of candidates
HARD_BUDGET = (1, 2, 3, 4, 5, 6)  # distinct candidates the hard-level teacher checks, then guesses
MAX_BLOCKS = 4                    # as the sampler's default limit
P_BLOCKS = 0.65                   # share of teacher traces that try to use blocks
P_BLOCK_STEP = 0.7                # in those, the chance that a step is a block (not a plain step)

SPECIAL = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|unk|>"]
# longest first: "none" before "no"
WORDS = [ANSWER_PREFIX, "Find", "with", "none", "guess", "yes", "vs", "no", "in", "x"]
CHARS = list("0123456789") + list("*+-=.,:? \n")
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer():
    """A word-level tokenizer: each digit, symbol and word is one token, the tags special tokens."""
    vocab = {t: i for i, t in enumerate(SPECIAL + list(TAGS) + WORDS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    # every word, digit and character becomes its own piece; decoding concatenates them back
    pattern = "|".join(re.escape(w) for w in WORDS) + r"|."
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                        pad_token="<|pad|>", unk_token="<|unk|>",
                                        clean_up_tokenization_spaces=False)
    special = {"additional_special_tokens": ["<|user|>", "<|assistant|>", *TAGS]}
    tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def new_model(tokenizer, seed=0):
    """A tiny random Qwen3 (4 layers, hidden 128, ~1M parameters) for the toy vocabulary."""
    torch.manual_seed(seed)
    config = tiny_qwen3_config(len(tokenizer), hidden=128, layers=4, heads=4, kv_heads=2,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model  # the tags are in its vocabulary already: no model.add_tags


QUESTION_RE = re.compile(r"Find x in ([\d ]+) with x\*(\d)=(\d+)\.")


def _problem(level, rng, held_out):
    k = LEVELS[level]
    while True:
        a, x = rng.randint(2, 9), rng.randint(1, 9)
        cands = sorted(rng.sample([c for c in range(1, 10) if c != x], k - 1) + [x])
        question = f"Find x in {' '.join(map(str, cands))} with x*{a}={a * x}."
        # held out: a stable hash (not Python's salted hash()), the same in every process
        if (zlib.crc32(question.encode()) % 5 == 0) == held_out:
            return {"question": question, "answer": str(x)}


def problems(level, n, seed):
    """n training problems of a level ("easy" | "hard"), fixed by the seed, never held out."""
    rng = random.Random(f"{level}-{seed}")
    return [_problem(level, rng, held_out=False) for _ in range(n)]


def eval_set(level, n=200):
    """A fixed set of n distinct held-out problems (questions training problems never use)."""
    rng, out = random.Random(f"eval-{level}"), {}
    while len(out) < n:  # by question, in the order drawn
        p = _problem(level, rng, held_out=True)
        out.setdefault(p["question"], p)
    return list(out.values())


def parse_question(question):
    """(candidates, a, t) from a toy question."""
    m = QUESTION_RE.fullmatch(question.strip())
    if m is None:
        raise ValueError(f"not a toy question: {question!r}")
    return [int(c) for c in m.group(1).split()], int(m.group(2)), int(m.group(3))


def _check(c, a, t):
    # the target is copied next to the product so the yes/no is a local comparison
    return f"{c}*{a}={c * a} vs {t} {'yes' if c * a == t else 'no'}"


def teacher_trace(problem, rng):
    """A canonical-layout response: checks in random order, some as two-path blocks, the answer."""
    cands, a, t = parse_question(problem["question"])
    todo = rng.sample(cands, len(cands))
    budget = len(cands) if len(cands) <= LEVELS["easy"] else rng.choice(HARD_BUDGET)
    use_blocks = rng.random() < P_BLOCKS
    out, checked, blocks, found = [], 0, 0, None
    while todo and checked < budget and found is None:
        if use_blocks and blocks < MAX_BLOCKS and len(todo) >= 2 and rng.random() < P_BLOCK_STEP:
            pair = [rng.choice(todo), rng.choice(todo)]  # independent picks: now and then the same
            hit = [c for c in pair if c * a == t]
            summary = f"x={hit[0]}" if hit else "none"
            paths = "".join(f"{PATH}{_check(c, a, t)}{PATH_END}" for c in pair)
            out.append(f"{PARALLEL}{paths}{PARALLEL_END}{BLOCK_GAP}{SUMMARY}{summary}{SUMMARY_END}")
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
    """n SFT examples {"question", "answer", "response"}: two thirds easy, one third hard."""
    rng = random.Random(f"sft-{seed}")
    items = problems("easy", n - n // 3, seed) + problems("hard", n // 3, seed)
    rng.shuffle(items)
    return [dict(p, response=teacher_trace(p, rng)) for p in items]
