"""The demo's own corpus: arithmetic word problems with correct worked solutions (the "high-quality"
text), and a training corpus that mixes more of them with noise, every character labelled with its kind.

Kinds (what the demo's "which tokens were kept" table counts):

* ``text``        words of a clean problem or solution ("Mia has 34 marbles. She gives ...");
* ``result``      the result of a correct calculation in a solution ("34 - 12 = 22");
* ``answer``      the final answer, which repeats the last result ("The answer is 22");
* ``wrong``       a wrong result ("34 - 12 = 27") or a final answer that contradicts the solution;
* ``boilerplate`` web-page furniture around a problem ("Posted by admin | Share | 3 comments");
* ``random``      random character strings ("qz7 KX2p vb9");
* ``offtopic``    fluent text about something else (weather, football, trains): learnable, but not
                  what the held-out problems need (the role WikiText plays in docs/experiment.md).

Clean, reference and held-out sets are drawn from disjoint random streams (different seeds), so the
held-out problems are never seen in training. Generation is pure Python and deterministic in the seed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from pathlib import Path
from typing import Iterator

KINDS = ("text", "result", "answer", "wrong", "boilerplate", "random", "offtopic")

_NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Ivy", "Max", "Lily", "Omar", "Nina", "Theo", "Ruby", "Eli",
          "Maya", "Jack", "Aria", "Noah", "Emma", "Luca")
_ITEMS = ("apples", "marbles", "pencils", "stickers", "books", "cookies", "shells", "coins", "cards", "balloons",
          "stamps", "eggs", "toys", "cupcakes", "flowers", "buttons")
_BOXES = ("boxes", "bags", "packs", "jars", "baskets", "crates", "trays", "bundles")
_PRONOUN = {"Mia": "She", "Ava": "She", "Zoe": "She", "Ivy": "She", "Lily": "She", "Nina": "She", "Ruby": "She",
            "Maya": "She", "Aria": "She", "Emma": "She"}

_BOILERPLATE = (
    "Posted by admin | 3 comments | Share on Facebook | Tweet this",
    "Click here to subscribe to our newsletter and never miss a post!",
    "Copyright 2023 MathFun Inc. All rights reserved. Privacy Policy | Terms of Use",
    "Home > Worksheets > Grade 3 > Word Problems",
    "Advertisement. Continue reading below. Sponsored links: best deals on school supplies",
    "Login | Register | Forgot password? | Contact us",
    "Related posts: 10 fun math games for kids | Printable worksheets | Top 5 tips",
    "Rate this problem: 1 2 3 4 5 stars. 1,234 views. Report abuse",
)


@dataclasses.dataclass
class Document:
    """A document as consecutive (text, kind) spans; ``text`` is their concatenation."""

    spans: list[tuple[str, str]]

    @property
    def text(self) -> str:
        return "".join(s for s, _ in self.spans)

    def char_kinds(self) -> list[str]:
        """The kind of every character of ``text``."""
        out: list[str] = []
        for s, kind in self.spans:
            out.extend([kind] * len(s))
        return out


class _Builder:
    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []

    def add(self, text: str, kind: str = "text") -> "_Builder":
        if self.spans and self.spans[-1][1] == kind:
            self.spans[-1] = (self.spans[-1][0] + text, kind)
        else:
            self.spans.append((text, kind))
        return self

    def result(self, value: int, wrong: bool, rng: random.Random) -> int:
        """Write a calculation's result: the true ``value``, or (``wrong``) a plausible wrong one."""
        if wrong:
            shown = value + rng.choice([-1, 1]) * rng.randint(1, max(3, abs(value) // 3 + 2))
            self.add(str(shown), "wrong")
            return shown
        self.add(str(value), "result")
        return value

    def answer(self, value: int, wrong: bool, rng: random.Random) -> None:
        """The final answer: the last result, or (``wrong``) a different number."""
        if wrong:
            self.add(str(value + rng.choice([-1, 1]) * rng.randint(1, max(3, abs(value) // 2 + 2))), "wrong")
        else:
            self.add(str(value), "answer")

    def build(self) -> Document:
        return Document(self.spans)


def _problem(rng: random.Random, wrong: bool) -> Document:
    """One word problem with a worked solution; ``wrong``: either its calculations give wrong results
    (and the answer repeats the wrong result), or the calculations are right and the answer is not."""
    wrong_final = wrong and rng.random() < 0.5
    wrong = wrong and not wrong_final
    name, other = rng.sample(_NAMES, 2)
    he = _PRONOUN.get(name, "He")
    item = rng.choice(_ITEMS)
    b = _Builder()
    kind = rng.randrange(4)
    if kind == 0:  # a + b
        x, y = rng.randint(5, 60), rng.randint(5, 60)
        b.add(f"Question: {name} has {x} {item}. {other} gives {name} {y} more {item}. "
              f"How many {item} does {name} have now?\nAnswer: {name} has {x} + {y} = ")
        r = b.result(x + y, wrong, rng)
        b.add(f" {item} now. The answer is ")
        b.answer(r, wrong_final, rng) if not wrong else b.add(str(r), "wrong")
    elif kind == 1:  # a - b
        x = rng.randint(20, 90)
        y = rng.randint(2, x - 5)
        b.add(f"Question: {name} has {x} {item}. {he} gives {y} {item} to {other}. "
              f"How many {item} does {name} have left?\nAnswer: {name} has {x} - {y} = ")
        r = b.result(x - y, wrong, rng)
        b.add(f" {item} left. The answer is ")
        b.answer(r, wrong_final, rng) if not wrong else b.add(str(r), "wrong")
    elif kind == 2:  # a * b
        box = rng.choice(_BOXES)
        x, y = rng.randint(2, 9), rng.randint(2, 12)
        b.add(f"Question: {name} buys {x} {box} of {item}. Each of the {box} holds {y} {item}. "
              f"How many {item} does {name} buy?\nAnswer: {name} buys {x} * {y} = ")
        r = b.result(x * y, wrong, rng)
        b.add(f" {item}. The answer is ")
        b.answer(r, wrong_final, rng) if not wrong else b.add(str(r), "wrong")
    else:  # a * b - c, two steps
        box = rng.choice(_BOXES)
        x, y = rng.randint(2, 9), rng.randint(3, 12)
        z = rng.randint(1, x * y - 1)
        b.add(f"Question: {name} has {x} {box} with {y} {item} in each. {he} gives {z} {item} to {other}. "
              f"How many {item} does {name} have left?\nAnswer: {name} had {x} * {y} = ")
        r1 = b.result(x * y, wrong, rng)
        b.add(f" {item}. After giving {z} away, {name} has {r1} - {z} = ")
        r2 = b.result(r1 - z, wrong, rng)
        b.add(f" {item}. The answer is ")
        b.answer(r2, wrong_final, rng) if not wrong else b.add(str(r2), "wrong")
    b.add(".")
    return b.build()


_CITIES = ("Paris", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Perth", "Seoul", "Dakar", "Porto", "Hanoi")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TEAMS = ("the Lions", "the Rovers", "United", "the Falcons", "City", "the Rangers", "the Sharks", "Athletic")
_WEATHER = ("sunny", "cloudy", "rainy", "windy", "foggy", "stormy")


def _offtopic_sentence(rng: random.Random) -> str:
    c1, c2 = rng.sample(_CITIES, 2)
    t1, t2 = rng.sample(_TEAMS, 2)
    day = rng.choice(_DAYS)
    return rng.choice((
        f"The weather in {c1} on {day} will be {rng.choice(_WEATHER)} with a high of {rng.randint(5, 35)} degrees.",
        f"On {day}, {t1} beat {t2} {rng.randint(1, 5)} to {rng.randint(0, 1)} in front of {rng.randint(2, 60)} thousand fans.",
        f"The train from {c1} to {c2} leaves at {rng.randint(5, 22)}:{rng.choice(('00', '15', '30', '45'))} and takes {rng.randint(2, 11)} hours.",
        f"Tourists in {c1} visit the old market, the river and the {rng.choice(('museum', 'cathedral', 'harbour', 'castle'))}.",
        f"Next {day} the festival in {c2} opens with music, food and a parade through the {rng.choice(('park', 'old town', 'port'))}.",
    ))


def _offtopic(rng: random.Random) -> str:
    return " ".join(_offtopic_sentence(rng) for _ in range(rng.randint(2, 5)))


def _random_string(rng: random.Random, words: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))) for _ in range(words))


def clean_documents(n: int, seed: int) -> Iterator[Document]:
    """``n`` clean problems (one or two per document), correct solutions only."""
    rng = random.Random(seed)
    for _ in range(n):
        doc = _problem(rng, wrong=False)
        if rng.random() < 0.5:
            doc = Document(doc.spans + [("\n", "text")] + _problem(rng, wrong=False).spans)
        yield doc


@dataclasses.dataclass(frozen=True)
class NoiseMix:
    """How the training corpus is corrupted (probabilities per document)."""

    wrong: float = 0.5
    """a problem's solution is wrong (its calculations, or its final answer)"""
    boilerplate: float = 0.6
    """web-page furniture before and/or after the problem"""
    random: float = 0.8
    """lines of random characters inserted"""
    junk_only: float = 0.4
    """a document without a problem: off-topic text (mostly), boilerplate and random strings"""


def noisy_documents(n: int, seed: int, mix: NoiseMix = NoiseMix()) -> Iterator[Document]:
    """``n`` training documents: clean problems mixed with wrong ones, boilerplate and random strings."""
    rng = random.Random(seed)
    for _ in range(n):
        spans: list[tuple[str, str]] = []
        if rng.random() < mix.junk_only:
            for _ in range(rng.randint(2, 4)):
                roll = rng.random()
                if roll < 0.6:
                    spans += [(_offtopic(rng), "offtopic"), ("\n", "text")]
                elif roll < 0.8:
                    spans += [(rng.choice(_BOILERPLATE), "boilerplate"), ("\n", "text")]
                else:
                    spans += [(_random_string(rng, rng.randint(6, 14)), "random"), ("\n", "text")]
            yield Document(spans[:-1])
            continue
        if rng.random() < mix.boilerplate:
            spans += [(rng.choice(_BOILERPLATE), "boilerplate"), ("\n", "text")]
        spans += _problem(rng, wrong=rng.random() < mix.wrong).spans
        if rng.random() < mix.random:
            spans += [("\n", "text"), (_random_string(rng, rng.randint(4, 12)), "random")]
        if rng.random() < mix.boilerplate / 2:
            spans += [("\n", "text"), (rng.choice(_BOILERPLATE), "boilerplate")]
        yield Document(spans)


def write_jsonl(path: Path, documents: list[Document]) -> None:
    """One ``{"text": ...}`` line per document (what ``rho tokenize`` reads)."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc.text}) + "\n")


def write_kinds(path: Path, documents: list[Document]) -> None:
    """The documents' spans (text, kind), so a report can label tokens without re-generating."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc.spans) + "\n")


def read_kinds(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document([tuple(span) for span in json.loads(line)]) for line in f]


def problems_of(documents: list[Document]) -> list[dict]:
    """The clean problems of ``documents`` in GSM8K's format (``question``; ``answer``: the worked
    solution, then ``#### N``), for ``rho eval``: the generator knows every right result."""
    out = []
    for doc in documents:
        for chunk in doc.text.split("Question: ")[1:]:
            question, _, solution = chunk.partition("\nAnswer: ")
            final = solution.rsplit("The answer is ", 1)[-1].rstrip().rstrip(".")
            out.append({"question": question.strip(), "answer": f"{solution.strip()}\n#### {final}"})
    return out

