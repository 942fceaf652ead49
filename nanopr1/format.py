"""The parallel-thinking format, defined once: the six tags and their token ids, the prompt templates,
the chat prompt's token ids, `normalize` (teacher text -> canonical layout). A response's structure is
read from its tag tokens (attention.parse_blocks), never from its text: docs/design.md, "The format"."""

import re
from pathlib import Path as FilePath

from nanopr1 import UsageError

# the six tags, in the order they are added to the tokenizer (official: ids 151669..151674 on Qwen3)
PATH, PATH_END = "<Path>", "</Path>"
PARALLEL, PARALLEL_END = "<Parallel>", "</Parallel>"
SUMMARY, SUMMARY_END = "<Summary>", "</Summary>"
TAGS = (PATH, PATH_END, PARALLEL, PARALLEL_END, SUMMARY, SUMMARY_END)
# a response ends with this line: the answer the graders read
ANSWER_PREFIX = "Final Answer:"


def tag_ids(tokenizer):
    """{tag: id} for the six tags; a clear error if the tokenizer lacks one."""
    # each tag is one special token (model.add_tags adds them): everything downstream reads these ids
    vocab = tokenizer.get_vocab()
    missing = [t for t in TAGS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the tags {missing}: call nanopr1.model.add_tags first")
    return {t: vocab[t] for t in TAGS}


# prompts: the parallel one states the format's rules in our own words; the sequential one is the baseline's
PARALLEL_PROMPT = f"""Solve the problem below. Reason step by step.
When you reach a step where several independent lines of reasoning would help (different methods, different cases, or a check of the result), open a parallel block:
- start the block with {PARALLEL};
- write at least two paths, each inside {PATH}...{PATH_END};
- the paths are written independently of each other, so never number them, order them or refer from one path to another;
- close the block with {PARALLEL_END};
- right after it, write a short {SUMMARY}...{SUMMARY_END} saying what the paths found and what follows from it.
Then continue your reasoning; you may open more blocks where they help.
End with a line of the form "{ANSWER_PREFIX} <answer>".

Problem: {{problem}}"""

SEQUENTIAL_PROMPT = f"""{{problem}}
Think step by step and give the final answer after "{ANSWER_PREFIX}"."""


def load_template(path):
    """Read a user prompt template; it must contain a {problem} slot."""
    if not FilePath(path).is_file():
        raise UsageError(f"prompt template {path!r} does not exist")
    text = FilePath(path).read_text(encoding="utf-8")
    if "{problem}" not in text:
        raise UsageError(f"prompt template {path!r} has no {{problem}} slot: add one where the problem goes")
    return text


def render_prompt(template, problem):
    """The user message: `template` with its {problem} slot filled."""
    # not str.format: a template may hold other braces (LaTeX, JSON)
    return template.replace("{problem}", problem)


def chat_prompt_ids(tokenizer, template, problem):
    """The token ids of one user turn, `template` around `problem`, through the chat template."""
    return chat_ids(tokenizer, [{"role": "user", "content": render_prompt(template, problem)}])


def chat_ids(tokenizer, messages):
    """The token ids of a chat (a list of {role, content}) through the chat template, generation prompt on."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise UsageError(f"tokenizer {name!r} has no chat template: set tokenizer.chat_template "
                         f"or load a tokenizer that ships one")
    # the template writes the special tokens itself: tokenizing must not add them a second time
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer):
    """The special token closing a chat template's assistant turn (Qwen3: <|im_end|>), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    # render a short chat and read what the template writes right after the assistant's reply
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "nanopr1"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    after = tokenizer(text[text.rindex("nanopr1") + len("nanopr1"):], add_special_tokens=False)["input_ids"]
    # a plain-text ending (a newline, say) ends no turn: only a special token counts
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


# canonical layout (what the sampler writes, as the official loop appends it): nothing between two
# structural tags of a block, except one newline between </Parallel> and <Summary>
BLOCK_GAP = "\n"
# the whitespace a teacher writes between these pairs of tags goes; the gap before <Summary> becomes BLOCK_GAP
_JOINS = [(PARALLEL, PATH), (PATH_END, PATH), (PATH_END, PARALLEL_END)]
_JOIN_RE = re.compile("|".join(f"(?<={re.escape(a)})\\s+(?={re.escape(b)})" for a, b in _JOINS))
_GAP_RE = re.compile(f"(?<={re.escape(PARALLEL_END)})\\s*(?={re.escape(SUMMARY)})")


def normalize(text):
    """Teacher text -> canonical layout: the whitespace between a block's structural tags cut, and
    exactly BLOCK_GAP between </Parallel> and <Summary>."""
    return _GAP_RE.sub(BLOCK_GAP, _JOIN_RE.sub("", text))


def gap_ids(tokenizer):
    """The token ids of BLOCK_GAP alone, as the official loop encodes the newline it appends."""
    return tokenizer(BLOCK_GAP, add_special_tokens=False)["input_ids"]
