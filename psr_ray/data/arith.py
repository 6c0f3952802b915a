"""The built-in task: seeded multi-step arithmetic word problems, one equation per reference step. Pure.

Why it exists: SmolLM2-135M scores about 2% on GSM8K, so no gain is measurable there on a CPU. These problems
are a chain an initialized 135M model can learn: a start step `a x b` (packs of items, pages a day, ...),
then middle steps (`+ c`, `- c`, or `x c` "her friend has c times as many"), then a final step that ends in
`\\boxed{}`: `/ d` into jars, `x p` dollars, or the count itself. A level-L problem has exactly L steps and
every value is an integer in [0, 999]. Each step has exactly one sensible next operation, so a step can be
checked exactly (`psr_ray.oracle.exact`): right arithmetic, the next value of the chain, operands taken from
the question or from earlier values.

Splits: problem i of split s and level L is drawn from `random.Random(f"{s}:{L}:{i}")`, and the train split
also drops any question text of the test split, so no test problem is ever a training prompt. Sources are
named `embedded:arith` (levels 2-4 in turn) or `embedded:arith-3` (one level) / `embedded:arith-2,3`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

SOURCE_PREFIX = "embedded:arith"
NAME = "arith"
DEFAULT_LEVELS = (2, 3, 4)
# Rows a split holds: enough prompts for the paper's 400/800/1200 schedule and for held-out evaluation.
SPLIT_SIZES = {"train": 4000, "test": 1000}
MAX_VALUE = 999

_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Nora", "Ali", "Eva",
          "Omar", "Ruby", "Ivan", "Lucy", "Noah", "Sara")  # fmt: skip
_HE = {"Tom", "Ben", "Sam", "Jack", "Leo", "Max", "Ali", "Omar", "Ivan", "Noah"}
_THEMES = (
    ("buy", ("pencils", "stickers", "marbles", "cards", "apples", "erasers", "balloons", "candies"),
     ("boxes", "packs", "bags")),
    ("bake", ("cookies", "muffins", "cupcakes", "rolls"), ("trays", "batches")),
    ("save", ("dollars",), ("weeks",)),
    ("read", ("pages",), ("days",)),
)  # fmt: skip
_SINGULAR = {"boxes": "box", "packs": "pack", "bags": "bag", "trays": "tray", "batches": "batch"}
_RELATIVE = {"buy": "friend", "bake": "friend", "save": "brother", "read": "sister"}


@dataclass(frozen=True)
class _Ranges:
    start_a: tuple[int, int]
    start_b: tuple[int, int]
    add: tuple[int, int]
    mul: tuple[int, int]
    div: tuple[int, int]


def _ranges(level: int) -> _Ranges:
    if level <= 2:
        return _Ranges((2, 9), (2, 12), (2, 30), (2, 4), (2, 6))
    if level == 3:
        return _Ranges((3, 12), (3, 15), (3, 60), (2, 5), (2, 8))
    return _Ranges((3, 15), (4, 20), (5, 90), (2, 5), (2, 9))


def parse_source(source: str) -> tuple[int, ...]:
    """`embedded:arith` -> DEFAULT_LEVELS; `embedded:arith-3` -> (3,); `embedded:arith-2,4` -> (2, 4)."""
    if source == SOURCE_PREFIX:
        return DEFAULT_LEVELS
    spec = source.removeprefix(SOURCE_PREFIX + "-")
    try:
        levels = tuple(int(x) for x in spec.split(","))
    except ValueError:
        levels = ()
    if spec == source or not levels or any(not 2 <= x <= 6 for x in levels):
        raise ValueError(f"unknown arithmetic source {source!r}; use {SOURCE_PREFIX} or {SOURCE_PREFIX}-L "
                         "with levels L in 2-6, e.g. embedded:arith-3 or embedded:arith-2,3")  # fmt: skip
    return levels


def is_source(source: str) -> bool:
    return source == SOURCE_PREFIX or source.startswith(SOURCE_PREFIX + "-")


def source_name(levels: tuple[int, ...]) -> str:
    """The name in problem ids and `Problem.source`: `arith` for the default levels, else `arith-3` etc."""
    return NAME if levels == DEFAULT_LEVELS else f"{NAME}-{','.join(map(str, levels))}"


def is_arith_name(source_name: str) -> bool:
    """Whether a `Problem.source` names this generator (its steps can then be checked exactly)."""
    return source_name == NAME or source_name.startswith(NAME + "-")


def split_rows(source: str, split: str) -> list[dict]:
    """Every problem of a split (`train` or `test`) in a fixed order, levels taking turns, as rows
    `{"question", "answer", "steps", "level"}` (the row shape a `.jsonl` source with worked steps has)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"no split {split!r} in {source}; available splits: {', '.join(SPLIT_SIZES)}")
    return [dict(row, steps=list(row["steps"])) for row in _split(parse_source(source), split)]


@cache
def _split(levels: tuple[int, ...], split: str) -> tuple[dict, ...]:
    per_level = -(-SPLIT_SIZES[split] // len(levels))
    exclude = {row["question"] for row in _split(levels, "test")} if split == "train" else set()
    chains = {level: _chains(split, level, per_level, exclude) for level in levels}
    rows = [
        {"question": question, "answer": str(answer), "steps": tuple(steps), "level": level}
        for i in range(per_level)
        for level in levels
        for question, steps, answer in [chains[level][i]]
    ]
    return tuple(rows[: SPLIT_SIZES[split]])


def _chains(split: str, level: int, count: int, exclude: set[str]) -> list[tuple[str, list[str], int]]:
    out: list[tuple[str, list[str], int]] = []
    seen, i = set(exclude), 0
    while len(out) < count:
        rng = random.Random(f"{split}:{level}:{i}")
        i += 1
        for _ in range(50):
            chain = _chain(rng, level)
            if chain is not None:
                break
        if chain is None or chain[0] in seen:
            continue
        seen.add(chain[0])
        out.append(chain)
    return out


def _chain(rng: random.Random, level: int) -> tuple[str, list[str], int] | None:
    """(question, reference steps, answer) of one level-`level` problem, or None to draw again."""
    kind, items, containers = rng.choice(_THEMES)
    name = rng.choice(_NAMES)
    pronoun = "he" if name in _HE else "she"
    poss = "his" if pronoun == "he" else "her"
    item, cont = rng.choice(items), rng.choice(containers)
    r = _ranges(level)
    questions, steps = [], []

    a, b = rng.randint(*r.start_a), rng.randint(*r.start_b)
    v = a * b
    if kind == "buy":
        questions.append(f"{name} buys {a} {cont} of {item}. Each {_SINGULAR[cont]} has {b} {item}.")
        steps.append(f"{name} buys {a} x {b} = {v} {item}.")
    elif kind == "bake":
        questions.append(f"{name} bakes {a} {cont} of {item} with {b} {item} in each {_SINGULAR[cont]}.")
        steps.append(f"{name} bakes {a} x {b} = {v} {item}.")
    elif kind == "save":
        questions.append(f"{name} saves {b} dollars every week for {a} weeks.")
        steps.append(f"{name} saves {b} x {a} = {v} dollars.")
    else:
        questions.append(f"{name} reads {b} pages every day for {a} days.")
        steps.append(f"{name} reads {b} x {a} = {v} pages.")

    final = rng.choice(["div", "money", "count"])
    if kind == "save" and final == "money":
        final = "div"
    if kind == "read":
        final = "count"
    # Who holds the count: the named person, until "her friend has c times as many" hands it over.
    subject_q, pronoun_q, subject_s, object_q = name, pronoun, name, "him" if pronoun == "he" else "her"
    used_mul = False
    for _ in range(level - 2 + (final == "count")):
        ops = ["add", "sub", "add", "sub"] + ([] if used_mul or v * 2 > MAX_VALUE else ["mul", "mul"])
        op = rng.choice(ops)
        if op == "sub" and v <= 3:
            op = "add"
        cap = pronoun_q[0].upper() + pronoun_q[1:]
        if op == "add":
            c = rng.randint(*r.add)
            if v + c > MAX_VALUE:
                return None
            result = v + c
            if kind in ("buy", "bake"):
                questions.append(rng.choice([f"Then {pronoun_q} gets {c} more {item} from a neighbor.",
                                             f"Later {pronoun_q} {'buys' if kind == 'buy' else 'bakes'} {c} more {item}.",
                                             f"{cap} also finds {c} more {item}."]))  # fmt: skip
                steps.append(f"After getting {c} more, {subject_s} has {v} + {c} = {result} {item}.")
            elif kind == "save":
                questions.append(rng.choice([f"{cap} then earns {c} more dollars.",
                                             f"An aunt gives {object_q} {c} more dollars."]))  # fmt: skip
                steps.append(f"With the extra money, {subject_s} has {v} + {c} = {result} dollars.")
            else:
                questions.append(f"On the weekend {pronoun_q} reads {c} more pages.")
                steps.append(f"With the weekend, {subject_s} reads {v} + {c} = {result} pages.")
        elif op == "sub":
            c = rng.randint(max(2, r.add[0] // 2), min(r.add[1], v - 1))
            result = v - c
            if kind in ("buy", "bake"):
                verb = rng.choice(["gives away", "loses"] if kind == "buy" else ["eats", "gives away"])
                questions.append(f"{cap} {verb} {c} of the {item}.")
                steps.append(f"After that, {subject_s} has {v} - {c} = {result} {item} left.")
            elif kind == "save":
                thing = rng.choice(["a book", "a toy", "lunch", "a ticket"])
                questions.append(f"{cap} spends {c} dollars on {thing}.")
                steps.append(f"After paying for {thing}, {subject_s} has {v} - {c} = {result} dollars.")
            else:
                questions.append(f"{cap} skips {c} of those pages because they are pictures.")
                steps.append(f"Without the pictures, {subject_s} reads {v} - {c} = {result} pages.")
        else:
            used_mul = True
            c = rng.randint(*r.mul)
            result = v * c
            if result > MAX_VALUE:
                return None
            relative = _RELATIVE[kind]
            if kind == "read":
                questions.append(f"{poss.capitalize()} {relative} reads {c} times as many pages as {subject_q}.")
            else:
                questions.append(f"{poss.capitalize()} {relative} has {c} times as many {item} as {subject_q} has now.")
            steps.append(f"The {relative} {'reads' if kind == 'read' else 'has'} {v} x {c} = {result} {item}.")
            subject_q = pronoun_q = object_q = f"{poss} {relative}"
            subject_s = f"the {relative}"
        v = result

    subject_cap = subject_q[0].upper() + subject_q[1:]
    if final == "count":
        what = (
            f"How many pages does {subject_q} read in total?"
            if kind == "read"
            else (f"How many {item} does {subject_q} have now?")
        )
        questions.append(what)
        steps[-1] = steps[-1][:-1] + f". The answer is \\boxed{{{v}}}."
    elif final == "div":
        divisors = [d for d in range(r.div[0], r.div[1] + 1) if v % d == 0]
        if not divisors:
            return None
        d = rng.choice(divisors)
        if kind == "save":
            questions.append(
                f"{subject_cap} splits the money equally among {d} gifts. How many dollars go to each gift?"
            )
            steps.append(f"Each gift gets {v} / {d} = {v // d} dollars. The answer is \\boxed{{{v // d}}}.")
        else:
            questions.append(f"{subject_cap} puts the {item} equally into {d} jars. How many {item} are in each jar?")
            steps.append(f"Each jar has {v} / {d} = {v // d} {item}. The answer is \\boxed{{{v // d}}}.")
        v //= d
    else:
        p = rng.randint(2, 9)
        if v * p > MAX_VALUE:
            return None
        questions.append(
            f"{subject_cap} sells each of the {item} for {p} dollars. How many dollars does {subject_q} get?"
        )
        steps.append(f"Selling them gives {v} x {p} = {v * p} dollars. The answer is \\boxed{{{v * p}}}.")
        v *= p
    if len(steps) != level:
        return None
    question = " ".join(questions)
    return question[0].upper() + question[1:], steps, v
