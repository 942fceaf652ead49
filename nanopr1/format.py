"""
The parallel-thinking format, defined once.

A response is main text with zero or more parallel blocks in it:

    main<Parallel><Path>path 1</Path><Path>path 2</Path></Parallel><Summary>summary</Summary>main

The canonical layout has nothing between structural tags (no newline between
`</Path>` and `<Path>`, none between `</Parallel>` and `<Summary>`): the sampler
produces it, the trainer scores it, `normalize` brings teacher data to it. The
main text (`main_text`: outside blocks and summaries) is where the final answer
counts. Everything here reads the structure of a *text* (teacher traces); a
sampled rollout's structure is read from its tag tokens instead (sampler.py).
The rest of nanopr1 imports the tag strings from here.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path as FilePath

from nanopr1 import UsageError

# The six tags, in the order they are added to the tokenizer (official order:
# on Qwen3 they become ids 151669..151674).
PATH, PATH_END = "<Path>", "</Path>"
PARALLEL, PARALLEL_END = "<Parallel>", "</Parallel>"
SUMMARY, SUMMARY_END = "<Summary>", "</Summary>"
TAGS = (PATH, PATH_END, PARALLEL, PARALLEL_END, SUMMARY, SUMMARY_END)
ANSWER_PREFIX = "Final Answer:"

# -----------------------------------------------------------------------------
# prompts

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
    # str.replace, not str.format: templates may contain other braces (LaTeX)
    return template.replace("{problem}", problem)


def chat_prompt_ids(tokenizer, template, problem):
    """The token ids of one user turn through the chat template, generation prompt on."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise UsageError(f"tokenizer {name!r} has no chat template: set tokenizer.chat_template "
                         f"or load a tokenizer that ships one")
    messages = [{"role": "user", "content": render_prompt(template, problem)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer):
    """The special token the chat template closes an assistant turn with, or None. Qwen3-4B-Base's EOS is
    <|endoftext|> while its template ends turns with <|im_end|>: a sampler that stops at EOS alone runs on
    past a finished answer."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "nanopr1"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    after = tokenizer(text[text.rindex("nanopr1") + len("nanopr1"):], add_special_tokens=False)["input_ids"]
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None

# -----------------------------------------------------------------------------
# structure: parse, render, validate

@dataclass
class Block:
    paths: list   # the text of each path, without its tags
    summary: str  # the text of the summary, without its tags


@dataclass
class Trace:
    main: list                                  # len(blocks) + 1 main-text segments
    blocks: list = field(default_factory=list)  # Block, one between each pair of main segments


class FormatError(ValueError):
    pass


_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


def render(trace):
    """A Trace back to its canonical text."""
    out = [trace.main[0]]
    for block, main in zip(trace.blocks, trace.main[1:]):
        paths = "".join(f"{PATH}{p}{PATH_END}" for p in block.paths)
        out.append(f"{PARALLEL}{paths}{PARALLEL_END}{SUMMARY}{block.summary}{SUMMARY_END}{main}")
    return "".join(out)


def _read_until(pieces, i, closer, what):
    """Text from pieces[i] up to the tag `closer`; returns (text, index after closer)."""
    text = ""
    while i < len(pieces) and pieces[i] not in TAGS:
        text += pieces[i]
        i += 1
    if i < len(pieces) and pieces[i] == closer:
        return text, i + 1
    if i < len(pieces) and pieces[i] == PARALLEL:
        raise FormatError(f"nested block: {PARALLEL} inside a {what}")
    raise FormatError(f"unclosed {what}: no {closer}")


def parse(text):
    """Canonical text -> Trace. Raises FormatError(reason) on anything out of place.

    The rules (the paper's Algorithm 1, strengthened): blocks are closed and not
    nested; a block holds at least two paths and nothing else; every path is
    closed; `</Parallel>` is immediately followed by a complete summary.
    """
    pieces = [p for p in _TAG_RE.split(text) if p != ""]
    main, blocks, i = [""], [], 0
    while i < len(pieces):
        piece = pieces[i]
        i += 1
        if piece not in TAGS:
            main[-1] += piece
            continue
        if piece != PARALLEL:
            raise FormatError(f"{piece} outside a parallel block")
        paths = []
        while i < len(pieces) and pieces[i] == PATH:  # inside the block: only paths
            path, i = _read_until(pieces, i + 1, PATH_END, "path")
            paths.append(path)
        if i >= len(pieces):
            raise FormatError(f"unclosed block: {PARALLEL} without {PARALLEL_END}")
        if pieces[i] == PARALLEL:
            raise FormatError(f"nested block: {PARALLEL} inside a block")
        if pieces[i] != PARALLEL_END:
            what = pieces[i] if pieces[i] in TAGS else "text"
            raise FormatError(f"{what} between paths: a block holds only {PATH}...{PATH_END}")
        if len(paths) < 2:
            raise FormatError(f"a block with {len(paths)} path(s): at least two are needed")
        if i + 1 >= len(pieces) or pieces[i + 1] != SUMMARY:
            raise FormatError(f"missing summary: {PARALLEL_END} must be followed right away by {SUMMARY}")
        summary, i = _read_until(pieces, i + 2, SUMMARY_END, "summary")
        blocks.append(Block(paths, summary))
        main.append("")
    return Trace(main, blocks)


def check_format(text):
    """None if `text` is well formed, else the reason it is not."""
    try:
        parse(text)
    except FormatError as e:
        return str(e)


# whitespace only where two structural tags of one block meet
_JOINS = [(PARALLEL, PATH), (PATH_END, PATH), (PATH_END, PARALLEL_END), (PARALLEL_END, SUMMARY)]
_JOIN_RE = re.compile("|".join(f"(?<={re.escape(a)})\\s+(?={re.escape(b)})" for a, b in _JOINS))


def normalize(text):
    """Teacher text -> canonical layout: drop whitespace between the structural
    tags of a block; all other text (main text, path and summary contents) is kept."""
    return _JOIN_RE.sub("", text)

# -----------------------------------------------------------------------------
# the main text

_INSIDE_RE = re.compile(
    f"{re.escape(PARALLEL)}.*?(?:{re.escape(PARALLEL_END)}|$)|{re.escape(SUMMARY)}.*?(?:{re.escape(SUMMARY_END)}|$)",
    re.DOTALL)


def main_text(text):
    """The text outside blocks and summaries (an unclosed one runs to the end): where the answer counts."""
    return _INSIDE_RE.sub("", text)
