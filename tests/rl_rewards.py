"""Rewards for tests/test_rl.py, given to `rl` as `rl_rewards:NAME` (the tests directory is importable)."""

import math

calls = {"n": 0}


def says_list(prompt, completion, **fields):
    """A trivially rewarded behaviour: the tiny model writes the word "list" in ~15 % of its replies."""
    return float("list" in completion)


def raises(prompt, completion, **fields):
    return 1 / 0


def returns_nan(prompt, completion, **fields):
    return math.nan


def returns_text(prompt, completion, **fields):
    return "1.0"


def fails_later(prompt, completion, **fields):
    """Fine for the first 150 calls (the first evaluation and a few steps), then raises."""
    calls["n"] += 1
    if calls["n"] > 150:
        raise ValueError("the grader went away")
    return float("list" in completion)


def needs_answer(prompt, completion, answer):
    return float(completion.strip() == answer)
