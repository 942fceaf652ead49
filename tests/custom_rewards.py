"""Examples of your own reward and graders (the signatures: nanopr1.rewards), used by
tests/test_rewards.py. Pass them as module:function (this folder on sys.path) or as a file:

    python train_rl.py --stage hard --reward tests/custom_rewards.py:length_penalty \\
        --grader tests/custom_rewards.py:math_verify_grader
"""

from nanopr1.rewards import is_equiv, last_boxed

PENALTY_PER_1000 = 0.1  # reward lost per 1,000 response tokens


def length_penalty(rollout, gold, step, info):
    """R_acc (by the grader in use) minus 0.1 per 1,000 response tokens: shorter wins."""
    return (1.0 if info["correct"] else -1.0) - PENALTY_PER_1000 * len(rollout.ids) / 1000


def exact_match(answer, gold):
    """Strict: the answer is the gold string itself (`42 apples` and `$42$` are not `42`)."""
    return answer is not None and answer.strip() == gold.strip()


def math_verify_grader(answer, gold):
    """math-verify's symbolic check (optional: pip install math-verify), else is_equiv."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return is_equiv(answer, gold)
    return answer is not None and verify(parse(f"${gold}$"), parse(f"${answer}$"))  # gold first


def last_boxed_anywhere(response, gold):
    """A response grader: the last \\boxed{} of the whole response (paths and summaries too), by is_equiv."""
    return is_equiv(last_boxed(response), gold)


last_boxed_anywhere.reads = "response"  # it gets Rollout.plain_text, not the main line's answer
last_boxed_anywhere.extract = last_boxed  # what it compared, for the logs
