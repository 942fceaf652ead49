"""
Block structure from tag tokens, and attention for the Unseen variant: a path-isolating mask and
Multiverse position ids, so that one ordinary forward over prompt + response (the policy loss, SFT)
sees what each token saw when the sampler decoded the paths in separate rows:

    prompt  main <Parallel> <Path>path 1</Path> <Path>path 2</Path> </Parallel> nl <Summary>...
    pos:    0..  p          p+1 ...             p+1 ...             q           q+1 q+2 ...
    sees:   causal          prefix + own path   prefix + own path   everything before it

where q = p + max_k(len_k) + 1. A path's tokens (its <Path> through its </Path>) never attend to a
sibling path; everything after the block attends to all paths; len_k counts a path's two tags. The
newline (nl) the runtime writes between </Parallel> and <Summary>, as the official loop does, is numbered
on from </Parallel> (any text found there is read as this gap). The prompt is numbered 0..P-1 and never
parsed for tags. The mask is a dense (B, 1, T, T) bool tensor (sdpa takes it, FlashAttention cannot); no
query row is fully masked. Seen needs none of this: its forward is plainly causal. A response cut by the
budget mid-block (official rules) is malformed for the format check, but the trainer still reads the
paths of its last block (find_blocks(cut=True)) and masks them as the sampler decoded them.
"""

from dataclasses import dataclass

import torch

from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, TAGS


@dataclass
class BlockSpan:
    """One parallel block, as indices into the *response* token ids (prompt excluded)."""
    parallel: int  # index of the <Parallel> token
    paths: list    # [(start, end)] half-open: a path's <Path> through its </Path> (</Parallel>: paths[-1][1])
    summary: tuple  # (start, end) half-open: <Summary> through </Summary> (None: a cut block that has none)
    cut: bool = False  # the response ends inside this block (cut by the budget): it is the last one


def _close(ids, i, opener_tag, closer, tag_of, cut=False):
    """Index one past the `closer` that ends the span opened at ids[i]; no other tag may come between.
    cut: a span that runs to the end of `ids` ends there (len(ids))."""
    # the next tag after the opener must be its closer; running off the end is an error unless `cut`
    j = next((k for k in range(i + 1, len(ids)) if ids[k] in tag_of), len(ids))
    if j == len(ids):
        if cut:
            return j
        raise ValueError(f"{opener_tag} at {i} is never closed by {closer}")
    if tag_of[ids[j]] != closer:
        raise ValueError(f"{tag_of[ids[j]]} at {j} inside the {opener_tag} opened at {i}")
    return j + 1


def find_blocks(ids, tags, cut=False):
    """Response ids -> [BlockSpan]; ValueError if a tag is out of place (a block of one path passes).
    cut=True: a last block that the end of `ids` cuts short is returned as BlockSpan(cut=True)."""
    ids, tag_of = list(ids), {tags[t]: t for t in TAGS}
    blocks, i, n = [], 0, len(ids)
    while True:
        # main text runs to the next tag, which must open a block
        i = next((x for x in range(i, n) if ids[x] in tag_of), n)
        if i == n:
            return blocks
        if tag_of[ids[i]] != PARALLEL:
            raise ValueError(f"{tag_of[ids[i]]} at {i} outside a parallel block")
        # the paths follow <Parallel> back to back, each closed by its </Path>
        start, paths, j = i, [], i + 1
        while j < n and ids[j] == tags[PATH]:
            end = _close(ids, j, PATH, PATH_END, tag_of, cut)
            paths.append((j, end))
            j = end
        # the gap: the text between </Parallel> and <Summary> (the runtime writes a newline there)
        k = next((x for x in range(j + 1, n) if ids[x] in tag_of), n)
        # a response cut before this block's summary opens ends with it
        if cut and (j == n or (ids[j] == tags[PARALLEL_END] and k == n)):
            return blocks + [BlockSpan(start, paths, None, True)]
        # then </Parallel>, the gap and the <Summary>...</Summary>; a summary cut short is the last block
        if not paths:
            raise ValueError(f"{PARALLEL} at {start} is not followed by a {PATH}")
        if j >= n or ids[j] != tags[PARALLEL_END]:
            raise ValueError(f"block at {start}: expected {PARALLEL_END} at {j} after its last path")
        if k >= n or ids[k] != tags[SUMMARY]:
            raise ValueError(f"block at {start}: {PARALLEL_END} at {j} is not followed by {SUMMARY}")
        end = _close(ids, k, SUMMARY, SUMMARY_END, tag_of, cut)
        blocks.append(BlockSpan(start, paths, (k, end), ids[end - 1] != tags[SUMMARY_END]))
        i = end


def parse_blocks(ids, tags):
    """(blocks, None) if the tag tokens of `ids` form blocks of >= 2 paths each, else ([], why)."""
    try:
        blocks = find_blocks(ids, tags)
    except ValueError as e:
        return [], str(e)
    # find_blocks passes a block of one path (the trainer reads it); the format needs two
    few = next((b for b in blocks if len(b.paths) < 2), None)
    if few is not None:
        return [], f"the block at {few.parallel} has {len(few.paths)} path(s): at least two are needed"
    return blocks, None


def main_line(ids, tags):
    """Per response token: is it main-line text (no tag, outside blocks and summaries)?"""
    # outside a span opened by <Parallel> or <Summary> and not yet closed, a token that is no tag is main text
    opener = {tags[PARALLEL]: tags[PARALLEL_END], tags[SUMMARY]: tags[SUMMARY_END]}
    tag_set, out, closer = set(tags.values()), [], None
    for t in ids:
        if closer is None and t in opener:
            closer = opener[t]
        out.append(closer is None and t not in tag_set)
        if t == closer:
            closer = None
    # the gap between </Parallel> and its <Summary> belongs to the block
    at = [k for k, t in enumerate(ids) if t in tag_set]
    for a, b in zip(at, at[1:]):
        if ids[a] == tags[PARALLEL_END] and ids[b] == tags[SUMMARY]:
            out[a + 1:b] = [False] * (b - a - 1)
    return out


def unseen_positions(n_prompt, n_response, blocks):
    """Multiverse position id of every response token (the prompt is 0..n_prompt-1)."""
    # nxt: the position of the next main-line token; i: the response index it sits at
    pos, nxt, i = [], n_prompt, 0
    for b in blocks:
        # main text up to and including <Parallel> (at position p) counts on
        pos.extend(range(nxt, nxt + b.parallel + 1 - i))
        p = nxt + b.parallel - i
        # every path restarts at p+1, as if it were the only one
        for s, e in b.paths:
            pos.extend(range(p + 1, p + 1 + e - s))
        i = b.paths[-1][1] if b.paths else b.parallel + 1  # (a block cut right after its <Parallel>)
        # </Parallel> and what follows count on from one past the longest path
        nxt = p + max((e - s for s, e in b.paths), default=0) + 1
    pos.extend(range(nxt, nxt + n_response - i))
    return pos


def unseen_mask(n_prompt, n_response, blocks, total):
    """(total, total) bool mask: causal, minus sibling paths; padding columns hidden, pads see themselves."""
    mask = torch.ones(total, total, dtype=torch.bool).tril_()
    mask[:, n_prompt + n_response:] = False
    # a later path must not see an earlier sibling (causality already hides the later from the earlier)
    for b in blocks:
        for k, (s, e) in enumerate(b.paths):
            for s2, e2 in b.paths[:k]:
                mask[n_prompt + s:n_prompt + e, n_prompt + s2:n_prompt + e2] = False
    # a padding row sees itself, so that no query row is fully masked
    mask.diagonal().fill_(True)
    return mask


def build_inputs(prompts, responses, tags, variant, pad_id):
    """A right-padded batch of prompt + response for model(**batch), with the variant's positions and mask."""
    if variant not in ("seen", "unseen"):
        raise ValueError(f"variant must be 'seen' or 'unseen', not {variant!r}")
    B, T = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.arange(T).repeat(B, 1)  # (B, T) pads keep counting (never attended to)
    pad_mask, masks = torch.zeros(B, T, dtype=torch.long), []  # Seen's mask; Unseen's, one per row
    # each row: prompt + response, then padding; Unseen adds its positions and its own (T, T) mask
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        n = len(prompt) + len(response)
        input_ids[b, :n] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        pad_mask[b, :n] = 1
        if variant == "unseen":
            blocks = find_blocks(response, tags, cut=True)  # a response cut mid-block: its paths still masked
            pos = list(range(len(prompt))) + unseen_positions(len(prompt), len(response), blocks)
            position_ids[b, :n] = torch.tensor(pos, dtype=torch.long)
            # the padding counts on from the last real position
            position_ids[b, n:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + T - n) if n else position_ids[b, n:]
            masks.append(unseen_mask(len(prompt), len(response), blocks, T))
    # Seen gives the model only its padding mask (a plain causal forward); Unseen its own 4-D mask
    mask = pad_mask if variant == "seen" else torch.stack(masks)[:, None]  # (B, T) or (B, 1, T, T)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
