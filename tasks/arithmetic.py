"""Generated arithmetic word problems: the verifiable synthetic task for SFT, rejection sampling and DPO.

Deterministic for a seed; every problem carries an id, the task type ("math"), the prompt, the numeric reference answer
and a worked solution ("17 + 25 = 42. The answer is 42."), so the same generator feeds SFT rows, RS prompts and
chosen/rejected pairs. Nothing here is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivo", "Jun", "Kemal", "Lea", "Mo", "Nia"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells", "stickers", "eggs"]
ADD = ["{n} has {a} {item}. {n} gets {b} more. How many {item} does {n} have now?",
       "{n} had {a} {item} and found {b} more. How many {item} does {n} have?",
       "A box holds {a} {item}. Another box holds {b} {item}. How many {item} are there in total?"]
SUB = ["{n} has {a} {item} and gives away {b}. How many {item} are left?",
       "There were {a} {item} on the table. {n} took {b}. How many {item} remain?"]


@dataclass(frozen=True)
class Problem:
    id: str
    task: str
    prompt: str
    reference: str
    solution: str

    def to_dict(self) -> dict:
        return asdict(self)


def make_problem(rng: random.Random, idx: int, *, digits: int = 2, ops: str = "+-", prefix: str = "math") -> Problem:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice(ops)
    if op == "-":
        a, b = max(a, b), min(a, b)
        template, result = rng.choice(SUB), a - b
    else:
        template, result = rng.choice(ADD), a + b
    prompt = template.format(n=rng.choice(NAMES), a=a, b=b, item=rng.choice(ITEMS))
    return Problem(id=f"{prefix}-{idx:06d}", task="math", prompt=prompt, reference=str(result),
                   solution=f"{a} {op} {b} = {result}. The answer is {result}.")


def problems(n: int, *, seed: int = 0, digits: int = 2, ops: str = "+-", prefix: str = "math") -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, i, digits=digits, ops=ops, prefix=prefix) for i in range(n)]


def wrong_solution(p: Problem, rng: random.Random) -> str:
    """A plausible but wrong worked answer (for synthetic DPO pairs)."""
    result = int(p.reference)
    wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
    return p.solution.replace(f"= {result}.", f"= {wrong}.").replace(f"is {result}.", f"is {wrong}.")


def sft_row(p: Problem) -> dict:
    return {"id": p.id, "messages": [{"role": "user", "content": p.prompt},
                                     {"role": "assistant", "content": p.solution}]}


def dpo_row(p: Problem, rng: random.Random) -> dict:
    return {"id": p.id, "prompt": p.prompt, "chosen": p.solution, "rejected": wrong_solution(p, rng)}
