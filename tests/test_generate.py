"""Cold-start corpus generation: which teacher traces are kept."""

import pytest

from nanopr1 import data

GOOD = "Think.\n<Parallel>\n<Path>a = 3</Path>\n<Path>b = 3</Path>\n</Parallel>\n<Summary>3</Summary>\nFinal Answer: 3"
CANON = "Think.\n<Parallel><Path>a = 3</Path><Path>b = 3</Path></Parallel><Summary>3</Summary>\nFinal Answer: 3"
ONE_PATH = "<Parallel><Path>a</Path></Parallel><Summary>s</Summary>Final Answer: 3"


@pytest.mark.parametrize("text, response, reason", [
    ("<think>let me see</think>" + GOOD, CANON, None),  # thinking dropped, layout normalised
    (GOOD, CANON, None),
    ("<think>a</think>b</think>\n" + GOOD, CANON, None),  # the text after the LAST </think>
    ("<think>" + GOOD + "</think>No block.\nFinal Answer: 3", None, "no parallel block"),  # a block in the thinking
    (GOOD.replace("Final Answer: 3", "Final Answer: 4"), None, "wrong final answer"),
    (GOOD.replace("Final Answer: 3", ""), None, "wrong final answer"),  # no answer at all
    (GOOD.replace("\nFinal Answer: 3", "").replace("b = 3", "Final Answer: 3"), None, "wrong final answer"),  # in a path
    (ONE_PATH, None, "a block with 1 path(s)"),  # format reasons are cut at ':'
    (GOOD.replace("<Summary>3</Summary>", ""), None, "missing summary"),
    ("x <Parallel><Path>a</Path><Path>b</Path>\nFinal Answer: 3", None, "text between paths"),
    ("x <Parallel><Path>a</Path><Path>b</Path>", None, "unclosed block"),  # cut off by the budget
    ("No block at all.\nFinal Answer: 3", None, "no parallel block"),
])
def test_judge_trace(text, response, reason):
    assert data.judge_trace(text, "3") == (response, reason)
