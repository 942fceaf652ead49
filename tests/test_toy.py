"""The toy world: tokenizer, tiny model save/load, problem generator and teacher traces."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import init_toy_dir
from nanopr1 import toy
from nanopr1.format import ANSWER_PREFIX, PARALLEL_END, SUMMARY, TAGS, chat_prompt_ids, normalize, tag_ids
from nanopr1.model import add_tags, load_model
from nanopr1.rewards import extract_answer
from nanopr1.rollout import make_rollout, texts

TOKENIZER = toy.build_tokenizer()


def read(text):
    """The rollout of a teacher trace: its structure from its tag tokens."""
    return make_rollout(TOKENIZER, [], TOKENIZER(text, add_special_tokens=False)["input_ids"], "budget")


def answer_of(text):
    """The answer of a teacher trace, as the grader reads it: from its main-line tokens."""
    return extract_answer(read(text).main_text)


def parse(text):
    """A teacher trace's main segments and blocks ({"paths", "summary"}), read from its tokens."""
    return texts(read(text), TOKENIZER)


@pytest.fixture(scope="module")
def tokenizer():
    return TOKENIZER


@pytest.fixture(scope="module")
def corpus():
    return toy.sft_corpus(600, seed=0)


@pytest.mark.parametrize("tag", TAGS)
def test_every_tag_is_one_token(tokenizer, tag):
    ids = tokenizer(f"3*4=12{tag}no", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(tag) in ids
    assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1


def test_tags_in_official_order_and_add_tags_is_noop(tokenizer):
    ids = tag_ids(tokenizer)
    assert [ids[t] for t in TAGS] == list(range(ids[TAGS[0]], ids[TAGS[0]] + 6))
    assert add_tags(toy.new_model(tokenizer), tokenizer) == []


def test_text_round_trips_and_chat_prompt(tokenizer, corpus):
    for ex in corpus[:50]:
        ids = tokenizer(ex["response"], add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == ex["response"]
    prompt = chat_prompt_ids(tokenizer, toy.TEMPLATE, corpus[0]["question"])
    text = tokenizer.decode(prompt)
    assert text.startswith("<|user|>") and text.endswith("<|assistant|>") and corpus[0]["question"] in text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_saved_dir_round_trip_gives_identical_logits(tmp_path, tokenizer, corpus):
    path = init_toy_dir(tmp_path / "toy", seed=3)
    fresh = toy.new_model(tokenizer, seed=3).eval()
    ids = torch.tensor([chat_prompt_ids(tokenizer, toy.TEMPLATE, corpus[0]["question"])
                        + tokenizer(corpus[0]["response"], add_special_tokens=False)["input_ids"]])
    model, tok = load_model(path)
    auto_tok = AutoTokenizer.from_pretrained(path)
    auto_model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.get_vocab() == auto_tok.get_vocab() == tokenizer.get_vocab()
    assert auto_tok.chat_template == tokenizer.chat_template and auto_tok.eos_token_id == tokenizer.eos_token_id
    assert auto_tok(corpus[0]["response"])["input_ids"] == tokenizer(corpus[0]["response"])["input_ids"]
    with torch.no_grad():
        ref = fresh(ids).logits
        assert torch.equal(model.eval()(ids).logits, ref)
        assert torch.equal(auto_model.eval()(ids).logits, ref)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_every_teacher_trace_is_valid_and_answers(corpus):
    for ex in corpus:
        r = ex["response"]
        assert read(r).format_error is None, r
        cands = toy.parse_question(ex["question"])[0]
        if "guess" in r:  # only the hard-level teacher guesses, and only among the candidates
            assert len(cands) == toy.LEVELS["hard"] and int(answer_of(r)) in cands
        else:
            assert answer_of(r) == ex["answer"], r
        assert r.endswith(f"{ANSWER_PREFIX} {answer_of(r)}")


def test_teacher_traces_use_the_canonical_layout(corpus):
    """The official layout: `</Parallel>`, a newline, `<Summary>` (what the sampler writes); normalize keeps it."""
    blocks = [ex["response"] for ex in corpus if PARALLEL_END in ex["response"]]
    assert blocks and all(normalize(r) == r for r in blocks)
    assert all(r.count(PARALLEL_END) == r.count(f"{PARALLEL_END}\n{SUMMARY}") for r in blocks)


def test_corpus_mixes_blocks_and_plain_steps(corpus):
    traces = [parse(ex["response"]) for ex in corpus]
    assert 0.5 < sum(bool(t["blocks"]) for t in traces) / len(corpus) < 0.7  # blocks in only some traces
    assert any(t["blocks"] and "\n" in t["main"][0] for t in traces)


def test_paths_pick_candidates_independently_and_never_recheck(corpus):
    same = blocks = 0
    for ex in corpus:
        checked = []
        trace = parse(ex["response"])
        for main, block in zip(trace["main"], trace["blocks"] + [None]):
            checked += [line.split("*")[0] for line in main.split("\n") if "*" in line]
            if block is not None:
                firsts = [p.split("*")[0] for p in block["paths"]]
                assert len(firsts) == 2 and not set(firsts) & set(checked)  # only unchecked candidates
                same, blocks = same + (firsts[0] == firsts[1]), blocks + 1
                checked += firsts
        assert len(trace["blocks"]) <= toy.MAX_BLOCKS
    assert 0.1 < same / blocks < 0.5  # like two independently sampled paths, they sometimes coincide


@pytest.mark.parametrize("level", ["easy", "hard"])
def test_problems_are_deterministic_and_have_one_solution(level):
    a, b = toy.problems(level, 100, seed=7), toy.problems(level, 100, seed=7)
    assert a == b and a != toy.problems(level, 100, seed=8)
    for p in a:
        cands, a, t = toy.parse_question(p["question"])
        assert len(cands) == toy.LEVELS[level] == len(set(cands))
        assert [x for x in cands if x * a == t] == [int(p["answer"])]


def test_easy_and_hard_differ_as_designed():
    rng = random.Random(0)
    acc, checks = {}, {}
    for level in ["easy", "hard"]:
        traces = [(p, toy.teacher_trace(p, rng)) for p in toy.problems(level, 400, seed=1)]
        acc[level] = sum(answer_of(r) == p["answer"] for p, r in traces) / len(traces)
        checks[level] = max(r.count("*") for _, r in traces)
    assert acc["easy"] == 1.0 and 0.5 < acc["hard"] < 0.75  # room for RL on the hard level
    # easy: each block checks 1 or 2 new candidates, so up to 2 per candidate; hard: budget 6, +1 overshoot
    assert checks["easy"] <= 8 and checks["hard"] <= 7 * 2


@pytest.mark.parametrize("level", ["easy", "hard"])
def test_eval_set_is_fixed_and_held_out(level):
    held = toy.eval_set(level)
    assert held == toy.eval_set(level) and len({p["question"] for p in held}) == len(held) == 200
    train = toy.problems(level, 3000, seed=0) + [{"question": ex["question"]} for ex in toy.sft_corpus(600, seed=1)]
    assert not {q["question"] for q in train} & {p["question"] for p in held}


def test_sequences_fit_the_toy_budget(tokenizer, corpus):
    for ex in corpus:
        n = len(tokenizer(ex["response"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert n <= toy.MAX_NEW_TOKENS
        assert n + len(chat_prompt_ids(tokenizer, toy.TEMPLATE, ex["question"])) <= 200
