"""Generate the embedded default corpus (corpus/default/): license-clean text made by template grammars.

Run (deterministic; rewrites the three files byte for byte the same for the same seed)::

    python -m corpus.make_default            # writes corpus/default/{books.jsonl,web.txt,papers.jsonl}
    python -m corpus.make_default --out DIR --scale 0.1

What it makes (≈2 MB in all at scale 1):

- ``books.jsonl`` (field ``text``): simple stories — a character, a place, a want, a problem, a helper, an ending.
- ``web.txt`` (documents separated by a blank line): how-to steps, facts about made-up and real places, unit
  conversions — and, ON PURPOSE, work for the cleaner: exact duplicates, near duplicates (one word changed), boilerplate
  pages whose lines repeat, symbol garbage, and too-short fragments (see ``NOISE_*`` counts in the header comment).
- ``papers.jsonl`` (field ``abstract``): pseudo-abstracts ("We study … Our method improves … by 12%") and arithmetic
  fact sheets ("17 + 25 = 42.").

The text is repetitive by design so a 4M-parameter model learns it in a few hundred steps (loss far below the unigram
entropy). It is not natural language data and says nothing true about the world beyond the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "default"

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivo", "Jun", "Kemal", "Lea", "Mo", "Nia",
         "Omar", "Pia", "Quin", "Rosa", "Sam", "Tariq", "Uma", "Vik", "Wen", "Yara", "Zoe"]
ANIMALS = ["cat", "dog", "fox", "owl", "rabbit", "turtle", "horse", "goat", "duck", "bear", "mouse", "frog"]
PLACES = ["a small village", "a busy city", "a quiet forest", "a farm by the river", "an old castle", "a sunny beach",
          "a tall mountain", "a green valley", "a little island", "a snowy town"]
WANTS = ["find a lost key", "build a boat", "bake a big cake", "learn to sing", "see the sea", "plant a garden",
         "climb the hill", "win the race", "fix the old clock", "paint the fence", "catch a falling star",
         "write a letter to the king"]
PROBLEMS = ["it started to rain", "the road was closed", "a strong wind blew", "the bridge was broken",
            "night came too soon", "the map was wrong", "the door was locked", "the river was too wide"]
HELPERS = ["a kind old woman", "a clever crow", "a friendly baker", "a tall farmer", "a brave girl", "a wise turtle",
           "a young fisher", "a quiet boy"]
FEELINGS = ["happy", "proud", "tired but glad", "calm", "excited", "thankful"]
ADJS = ["little", "brave", "curious", "shy", "clever", "gentle", "lazy", "cheerful"]
OBJECTS = ["a red ball", "a blue hat", "a warm scarf", "a wooden box", "a silver bell", "a green kite", "a big basket"]

TASKS = [("make tea", ["Boil fresh water", "Put a tea bag in a cup", "Pour the hot water over the bag",
                       "Wait three minutes", "Take out the bag and enjoy"]),
         ("plant a tree", ["Choose a sunny spot", "Dig a hole twice as wide as the roots", "Place the tree in the hole",
                           "Fill the hole with soil", "Water the tree every week"]),
         ("clean a window", ["Mix warm water and a little soap", "Wipe the glass with a soft cloth",
                             "Rinse with clean water", "Dry the glass from top to bottom"]),
         ("write a short letter", ["Write the date at the top", "Greet the reader by name", "Say why you are writing",
                                   "Add one or two details", "Sign your name at the end"]),
         ("fix a flat tire", ["Remove the wheel", "Take out the inner tube", "Find the hole with water",
                              "Put a patch on the hole", "Pump the tire and put the wheel back"]),
         ("cook rice", ["Rinse one cup of rice", "Add two cups of water", "Bring the water to a boil",
                        "Cover the pot and lower the heat", "Wait fifteen minutes"]),
         ("start a compost pile", ["Pick a shady corner", "Add a layer of dry leaves", "Add kitchen scraps",
                                   "Turn the pile every week", "Keep it damp but not wet"]),
         ("learn new words", ["Read a little every day", "Write down words you do not know", "Look up each word",
                              "Use the word in a sentence", "Review the list on Sunday"])]
TOWNS = ["Alder", "Brook", "Cedar", "Dunmore", "Elmstead", "Fairhaven", "Glenrock", "Hollow", "Ivywood", "Juniper",
         "Kestrel", "Larkfield", "Millbrook", "Northgate", "Oakridge", "Pinecrest"]
THINGS = ["bridge", "library", "market", "tower", "museum", "harbor", "school", "park"]
UNITS = [("meter", "centimeters", 100), ("kilometer", "meters", 1000), ("hour", "minutes", 60),
         ("minute", "seconds", 60), ("day", "hours", 24), ("week", "days", 7), ("kilogram", "grams", 1000)]

FIELDS = ["graph learning", "speech recognition", "protein folding", "weather forecasting", "image compression",
          "robot control", "text summarization", "traffic prediction", "crop monitoring", "code search"]
METHODS = ["a sparse attention model", "a simple linear baseline", "a recurrent network", "a tree-based method",
           "a contrastive objective", "a small transformer", "a mixture of experts", "a diffusion model"]
DATASETS = ["three public benchmarks", "a new synthetic dataset", "two large corpora", "five small tasks",
            "a held-out test set"]
CLAIMS = ["improves accuracy", "reduces error", "cuts training time", "lowers memory use", "speeds up inference"]

MANNER = ["", "", " carefully", " slowly", " with care", " before you go on", " if you can", " and check it",
          " twice", " right away", " with a friend", " as {who} does"]
IDEAS = ["share weights across layers", "prune half of the features", "mix real and synthetic examples",
         "predict the next step twice", "group similar inputs first", "add noise during training",
         "reuse old predictions", "learn a small memory"]
LIMITS = ["the method needs labeled data", "it is slow on long inputs", "we tested only in English",
          "the gains shrink on large datasets", "it uses more memory at test time", "tuning takes time"]
PRIOR = ["relies on large models that are slow to train", "ignores the order of the inputs",
         "needs a lot of labeled data", "does not scale to long inputs", "treats every example the same"]
BOILER = ["Click here to subscribe to our newsletter!", "Accept all cookies to continue.", "Share this page:",
          "Log in | Sign up | Help", "Copyright all rights reserved."]


def story(rng: random.Random) -> str:
    n, animal, adj = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(ADJS)
    want, prob, helper = rng.choice(WANTS), rng.choice(PROBLEMS), rng.choice(HELPERS)
    place, obj, feel = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(FEELINGS)
    days = rng.randint(2, 9)
    parts = [f"Once upon a time, in {place}, there lived a {adj} {animal} named {n}.",
             f"{n} had {obj} and one big dream: {n} wanted to {want}.",
             f"One morning {n} set out early. But on the way, {prob}.",
             f"{n} sat down and felt sad. Then {helper} came by and asked, \"Why are you sad, little {animal}?\"",
             f"\"I want to {want}, but {prob},\" said {n}.",
             f"\"Do not give up,\" said {helper.split(' ', 1)[1]}. \"Try again tomorrow, and I will help you.\"",
             f"For {days} days they worked together. On the last day, {n} was able to {want}.",
             f"{n} felt {feel}. From that day on, {n} always shared {obj} with friends.",
             "The end."]
    if rng.random() < 0.5:  # a second episode makes stories longer and less uniform
        n2 = rng.choice(NAMES)
        parts.insert(-1, f"Later, {n2} the {rng.choice(ANIMALS)} came to visit, and {n} told {n2} the whole story.")
    return " ".join(parts)


def howto(rng: random.Random) -> str:
    task, steps = rng.choice(TASKS)
    who = rng.choice(NAMES)
    lines = [f"How to {task}", f"{who} shows a simple way to {task} in {len(steps)} steps."]
    lines += [f"Step {i}: {s}{rng.choice(MANNER).format(who=who)}." for i, s in enumerate(steps, 1)]
    minutes = rng.randint(5, 40)
    lines.append(rng.choice(["That is all. Good luck!", "Now you know how to do it.", f"It takes about {minutes} minutes."]))
    return "\n".join(lines)


def facts(rng: random.Random) -> str:
    town = rng.choice(TOWNS)
    pop = rng.randint(2, 90) * 1000
    thing = rng.choice(THINGS)
    year = rng.randint(1700, 1990)
    u, sub, k = rng.choice(UNITS)
    m = rng.randint(2, 9)
    return "\n".join([f"Facts about {town}", f"{town} is a town with about {pop} people.",
                      f"The old {thing} in {town} was built in {year}.",
                      f"The {thing} is {rng.randint(2, 30)} meters tall and open every day except Monday.",
                      f"Did you know? One {u} has {k} {sub}, so {m} {u}s have {m * k} {sub}."])


def abstract(rng: random.Random) -> str:
    field, method, data, claim = rng.choice(FIELDS), rng.choice(METHODS), rng.choice(DATASETS), rng.choice(CLAIMS)
    pct = rng.randint(2, 40)
    idea, limit = rng.choice(IDEAS), rng.choice(LIMITS)
    n, k = rng.randint(2, 95) * 100, rng.randint(2, 12)
    return (f"We study {field}. Prior work {rng.choice(PRIOR)}. We propose {method} for {field}; the key idea is to "
            f"{idea}. We train on {n} examples for {k} epochs and evaluate on {data}. Our method {claim} by {pct}% "
            f"compared with the strongest baseline. A limitation is that {limit}.")


def arithmetic_sheet(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 12)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        if op == "-":
            a, b = max(a, b), min(a, b)
        word = "plus" if op == "+" else "minus"
        lines.append(f"What is {a} {word} {b}? {a} {op} {b} = {a + b if op == '+' else a - b}.")
    return "Arithmetic practice. " + " ".join(lines)


def garbage(rng: random.Random) -> str:
    chars = "#$%^&*()[]{}<>|~=+_0123456789/\\@!?;:"
    return "\n".join("".join(rng.choice(chars) for _ in range(rng.randint(40, 90))) for _ in range(rng.randint(2, 5)))


def boilerplate(rng: random.Random) -> str:
    lines = [rng.choice(BOILER) for _ in range(rng.randint(6, 12))]
    return "\n".join([f"Welcome to {rng.choice(TOWNS)} news"] + lines)


def near_duplicate(rng: random.Random, doc: str) -> str:
    """The same document with one word swapped for another: MinHash similarity stays high."""
    words = doc.split(" ")
    i = rng.randrange(len(words))
    words[i] = rng.choice(["very", "also", "really", "quite", "just"])
    return " ".join(words)


def generate(out: Path, *, seed: int = 1234, scale: float = 1.0) -> dict[str, int]:
    """Write the three files into ``out``; returns how many documents of each kind were written."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_books, n_web, n_papers = int(1900 * scale), int(2400 * scale), int(1800 * scale)
    counts: dict[str, int] = {}

    books = [story(rng) for _ in range(n_books)]
    n_exact = max(1, n_books // 50)
    books += [rng.choice(books) for _ in range(n_exact)]  # exact duplicates
    rng.shuffle(books)
    with open(out / "books.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(books):
            f.write(json.dumps({"id": f"book-{i:05d}", "text": text}, ensure_ascii=False) + "\n")
    counts["books"], counts["books_exact_dups"] = len(books), n_exact

    web = [howto(rng) if rng.random() < 0.5 else facts(rng) for _ in range(n_web)]
    n_ex, n_near = max(1, n_web // 40), max(1, n_web // 40)
    n_garb, n_boiler, n_short = max(1, n_web // 50), max(1, n_web // 50), max(1, n_web // 50)
    extra = [rng.choice(web) for _ in range(n_ex)]
    extra += [near_duplicate(rng, rng.choice([d for d in web if len(d) > 300])) for _ in range(n_near)]
    extra += [garbage(rng) for _ in range(n_garb)]
    extra += [boilerplate(rng) for _ in range(n_boiler)]
    extra += [rng.choice(["Read more", "Home", "Next page >>", "Loading…", "ｆｕｌｌ－ｗｉｄｔｈ"]) for _ in range(n_short)]
    web += extra
    rng.shuffle(web)
    (out / "web.txt").write_text("\n\n".join(web) + "\n", encoding="utf-8")
    counts.update(web=len(web), web_exact_dups=n_ex, web_near_dups=n_near, web_garbage=n_garb,
                  web_boilerplate=n_boiler, web_short=n_short)

    papers = [abstract(rng) if rng.random() < 0.6 else arithmetic_sheet(rng) for _ in range(n_papers)]
    with open(out / "papers.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(papers):
            f.write(json.dumps({"id": f"paper-{i:05d}", "abstract": text}, ensure_ascii=False) + "\n")
    counts["papers"] = len(papers)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corpus.make_default", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every document count (1.0 ≈ 2 MB)")
    args = ap.parse_args(argv)
    counts = generate(args.out, seed=args.seed, scale=args.scale)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
