"""The generated arithmetic task is deterministic and its worked solutions pass the numeric verifier."""

import random

from actors.verifiers import NumericVerifier
from tasks.arithmetic import dpo_row, problems, sft_row


def test_problems_are_deterministic_unique_and_verifiable():
    a, b = problems(200, seed=3), problems(200, seed=3)
    assert a == b and len({p.id for p in a}) == 200
    assert problems(5, seed=4) != problems(5, seed=3)
    verify = NumericVerifier()
    assert all(verify(p.solution, p.reference).passed for p in a)


def test_rows_have_the_shapes_sft_and_dpo_read():
    p = problems(1)[0]
    row = sft_row(p)
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    pair = dpo_row(p, random.Random(0))
    assert pair["chosen"] != pair["rejected"]
    assert not NumericVerifier()(pair["rejected"], p.reference).passed
