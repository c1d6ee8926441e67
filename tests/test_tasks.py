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


def test_heldout_evaluation_scores_whatever_answers_it_is_given(tmp_path):
    """tasks/evaluation.py: one scoring path whoever answers (here the worked solutions, then wrong numbers)."""
    import json

    import pytest

    from core.config import ConfigError
    from tasks.evaluation import HeldOut, greedy_accuracy

    held = problems(10, seed=5, digits=1)
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in held) + "\n")
    ho = HeldOut.read(path, size=8)
    assert len(ho.references) == 8 and ho.messages[0] == [{"role": "user", "content": held[0].prompt}]
    solutions = {p.prompt: p.solution for p in held}
    right = greedy_accuracy(lambda prompts: [solutions[m[-1]["content"]] for m in prompts], ho)
    assert right.accuracy == 1.0 and right.answers[0] == held[0].solution
    half = greedy_accuracy(lambda prompts: [("The answer is 1000." if i % 2 else solutions[m[-1]["content"]])
                                            for i, m in enumerate(prompts)], ho)
    assert half.accuracy == 0.5
    with pytest.raises(RuntimeError, match="3 answers for 8 prompts"):
        greedy_accuracy(lambda prompts: ["1", "2", "3"], ho)
    with pytest.raises(ValueError, match="unknown task metric 'bleu'"):
        greedy_accuracy(lambda prompts: [], ho, metric="bleu")
    path.write_text(json.dumps(held[0].to_dict()) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"held.jsonl:2: not valid JSON"):
        HeldOut.read(path)
    path.write_text(json.dumps({"prompt": "2 + 2?"}) + "\n")
    with pytest.raises(ConfigError, match=r"held.jsonl:1: a held-out row needs `reference`"):
        HeldOut.read(path)


def test_json_files_are_read_with_the_callers_error_naming_the_file(tmp_path):
    import pytest

    from core.files import read_json, read_jsonl

    class Bad(Exception):
        pass

    with pytest.raises(Bad, match=r"nope.json: missing here"):
        read_json(tmp_path / "nope.json", Bad, missing="missing here")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(Bad, match=r"list.json: the top level must be an object, got list"):
        read_json(tmp_path / "list.json", Bad)
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n\n[2]\n')
    assert read_jsonl(tmp_path / "rows.jsonl") == [(1, {"a": 1}), (3, [2])]
