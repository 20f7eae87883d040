"""The project's own training prompts: math, code and chat, written from templates with a seeded RNG.

Training prompts are never taken from the external benchmarks (those are for evaluation only);
`assert_disjoint` enforces it against any benchmark folder it is given (exact match after
normalising case and spaces), and `NearDuplicateIndex` finds near-duplicates (Jaccard similarity of
word 3-gram shingles, candidates found by MinHash with LSH banding and then checked exactly), which
`assert_not_near` enforces for prompts not written from these templates. The templates aim at the
kinds of text the evaluation covers (grade-school word problems, short Python functions, open chat)
without copying any of it. Responses are the target's own (see `labkit.pipeline.data`), so only the prompts'
variety matters here, not their answers.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import numpy as np

from labkit.core.errors import LabkitError

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards",
         "tomatoes", "bottles", "coins", "ribbons", "candles", "boxes", "tickets"]
PLACES = ["market", "library", "bakery", "farm", "school fair", "garage sale", "bookstore", "garden"]
UNITS = [("hour", "km"), ("day", "pages"), ("week", "dollars"), ("minute", "meters")]

MATH_TEMPLATES = [
    "{a} has {x} {item}. {b} gives {a} {y} more, and then {a} gives away {z}. How many {item} does {a} have now?",
    "A {place} sells {item} at ${p} each. {a} buys {x} of them and pays with a ${bill} bill. How much change does {a} get?",
    "{a} earns {x} {u2} every {u1}. How many {u2} does {a} earn in {y} {u1}s? Explain your steps.",
    "There are {x} {item} shared equally among {k} friends, with {r} left over set aside. How many does each friend get?",
    "{a} reads {x} pages on Monday and twice as many on Tuesday. On Wednesday {a} reads {y} pages fewer than on "
    "Tuesday. How many pages did {a} read in total?",
    "A rectangle has a length of {x} cm and a width of {y} cm. What are its area and its perimeter?",
    "{a} saves ${x} a week for {y} weeks, then spends {pct}% of the savings on {item}. How much money is left?",
    "Solve for n: {k}n + {x} = {total}. Show each step.",
    "What is {pct}% of {big}? Then add {y} to the result.",
    "A train travels at {x} km per hour for {k} hours and then at {y} km per hour for {k2} hours. How far does it go?",
    "{a} and {b} collect {item}. {a} has {x} and {b} has {k} times as many. How many do they have together?",
    "Compute the sum of all even numbers from 1 to {big2}.",
    "A recipe needs {k} cups of flour for {x} cookies. How many cups are needed for {y2} cookies?",
    "Find the greatest common divisor and the least common multiple of {x} and {y}.",
    "What is the probability of rolling a sum of {dice} with two fair six-sided dice? Explain.",
]

CODE_TASKS = [
    "returns the {nth} largest number in a list", "checks whether a string is a palindrome, ignoring case and spaces",
    "counts how often each word appears in a text", "merges two sorted lists into one sorted list",
    "returns the running average of a list of numbers", "flattens a nested list of any depth",
    "converts a Roman numeral to an integer", "removes duplicate items from a list while keeping order",
    "returns all prime numbers below n", "computes the n-th Fibonacci number iteratively",
    "groups a list of words by their first letter", "rotates a list by k positions",
    "finds the longest common prefix of a list of strings", "checks whether brackets in a string are balanced",
    "transposes a matrix given as a list of lists", "returns the indices of two numbers that add up to a target",
    "parses a date string in the form YYYY-MM-DD and returns the weekday", "computes the median of a list",
    "reverses the words in a sentence", "counts the vowels in a string", "returns the binary representation of n",
    "chunks a list into pieces of size k", "finds the most common character in a string",
    "validates an email address with simple rules", "computes the dot product of two vectors",
]
CODE_TEMPLATES = [
    "Write a Python function that {task}. Include a docstring and a short example.",
    "Implement a Python function `{fname}` that {task}. Explain how it works.",
    "Write a Python function that {task}, then write two unit tests for it with pytest.",
    "How would you write a function in Python that {task}? Give the code and its time complexity.",
    "Fix and complete this Python stub so that it {task}:\n\ndef {fname}(data):\n    pass",
    "Write a {lang} function that {task}.",
]
CODE_MODIFIERS = ["", " Use type hints.", " Handle empty input gracefully.", " Keep it under fifteen lines.",
                  " Do not use any imports.", " Add comments for each step.", " Make it efficient for large inputs.",
                  " Raise a ValueError on invalid input.", " Also show how to call it."]
LANGS = ["Python", "Python", "Python", "JavaScript", "Java", "C++", "Go", "Rust"]

CHAT_TOPICS = ["photosynthesis", "the water cycle", "how vaccines work", "black holes", "the stock market",
               "climate change", "the French Revolution", "machine learning", "healthy sleep habits",
               "time management", "learning a new language", "the history of the internet", "volcanoes",
               "renewable energy", "the human immune system", "public speaking", "saving money",
               "the Roman Empire", "coral reefs", "electric cars", "meditation", "the printing press",
               "urban gardening", "remote work", "the solar system", "honeybees", "recycling"]
CHAT_TEMPLATES = [
    "Explain {topic} to a ten-year-old.", "Write a short blog post about {topic}.",
    "What are three common misconceptions about {topic}?", "Give me five tips about {topic}.",
    "Write a short poem about {topic}.", "Summarize the key ideas of {topic} in a paragraph.",
    "I am {a}, a student. Can you help me prepare a five-minute talk on {topic}?",
    "Compare {topic} and {topic2}: how are they related?", "Write a friendly email inviting {a} to a talk on {topic}.",
    "What questions should I ask an expert on {topic}?", "Tell a short story in which {a} learns about {topic}.",
    "List the pros and cons of {topic}.", "Write a product description for a book about {topic}.",
]

DOMAIN_SHARES = {"math": 0.35, "code": 0.35, "chat": 0.30}


def _math(rng: random.Random) -> str:
    x, y = rng.randint(3, 90), rng.randint(2, 60)
    k = rng.randint(2, 9)
    a, b = rng.sample(NAMES, 2)
    u1, u2 = rng.choice(UNITS)
    return rng.choice(MATH_TEMPLATES).format(
        a=a, b=b, x=x, y=y, z=rng.randint(1, x), k=k, k2=rng.randint(1, 5), r=rng.randint(0, k - 1),
        item=rng.choice(ITEMS), place=rng.choice(PLACES), p=rng.randint(1, 9), bill=rng.choice([20, 50, 100]),
        u1=u1, u2=u2, pct=rng.choice([10, 15, 20, 25, 30, 40, 50, 75]), total=k * rng.randint(2, 20) + x,
        big=rng.randint(40, 900), big2=rng.randint(10, 200), y2=y * rng.randint(2, 5), dice=rng.randint(2, 12))


def _code(rng: random.Random) -> str:
    task = rng.choice(CODE_TASKS).format(nth=rng.choice(["second", "third", "k-th"]))
    fname = "_".join(task.split()[:2]).replace(",", "").lower()
    text = rng.choice(CODE_TEMPLATES).format(task=task, fname=fname, lang=rng.choice(LANGS))
    return text + rng.choice(CODE_MODIFIERS)


def _chat(rng: random.Random) -> str:
    topic, topic2 = rng.sample(CHAT_TOPICS, 2)
    return rng.choice(CHAT_TEMPLATES).format(topic=topic, topic2=topic2, a=rng.choice(NAMES))


MAKERS = {"math": _math, "code": _code, "chat": _chat}


def training_prompts(n: int, seed: int = 0) -> list[dict]:
    """n distinct prompts {"id", "domain", "text"} in DOMAIN_SHARES proportions, reproducible by seed."""
    if n <= 0:
        raise LabkitError(f"The number of prompts must be positive, got {n}.")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    domains = list(DOMAIN_SHARES)
    plan = rng.choices(domains, [DOMAIN_SHARES[d] for d in domains], k=n)  # the domain of each slot
    for domain in plan:
        for _ in range(1000):  # redraw duplicates within the slot's domain, so the shares hold
            text = MAKERS[domain](rng)
            if text not in seen:
                break
        else:
            raise LabkitError(f"The {domain} templates cannot make {n} distinct prompts; ask for fewer.")
        seen.add(text)
        out.append({"id": len(out), "domain": domain, "text": text})
    return out


def _jsonl_files(folders: tuple[str | Path, ...]) -> list[Path]:
    return [path for folder in folders for path in sorted(Path(folder).glob("*.jsonl"))]


def benchmark_texts(*folders: str | Path) -> set[str]:
    """Every turn of every JSONL file in the given evaluation folders, normalised for comparison."""
    texts: set[str] = set()
    for path in _jsonl_files(folders):
        for line in path.read_text().split("\n"):  # not splitlines: JSON strings may hold U+2028
            if line.strip():
                texts.update(_norm(t) for t in json.loads(line).get("turns", []))
    return texts


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def assert_disjoint(prompts: list[str], others: set[str], what: str = "evaluation") -> None:
    """Refuse training prompts that appear among (or contain) the given evaluation prompts."""
    clash = [p for p in prompts if _norm(p) in others]
    if clash:
        raise LabkitError(f"{len(clash)} training prompts also appear in the {what} set "
                          f"(first: {clash[0][:80]!r}): training and {what} prompts must be disjoint.")



def assert_not_near(prompts: list[str], index: "NearDuplicateIndex", what: str = "evaluation") -> None:
    """Refuse training prompts that are near-duplicates of any text in `index` (see NearDuplicateIndex)."""
    for p in prompts:
        hit = index.nearest(p)
        if hit is not None:
            raise LabkitError(f"A training prompt is a near-duplicate (Jaccard {hit[1]:.2f} >= {index.threshold}) of a "
                              f"{what} prompt: {p[:80]!r} ~ {str(hit[0])[:80]!r}. Training and {what} prompts must "
                              "be disjoint: drop it (self-generated prompts are filtered by labkit.pipeline.magpie).")


def benchmark_index(*folders: str | Path, threshold: float = 0.5) -> "NearDuplicateIndex":
    """A near-duplicate index of every turn of every JSONL file in the given evaluation folders (keys:
    the turns)."""
    index = NearDuplicateIndex(threshold)
    for path in _jsonl_files(folders):
        for line in path.read_text().split("\n"):  # not splitlines: JSON strings may hold U+2028
            if line.strip():
                for turn in json.loads(line).get("turns", []):
                    index.add(turn, turn)
    return index


_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, in any script


def shingles(text: str, n: int = 3) -> set[str]:
    """The word n-grams of a text after lower-casing and dropping punctuation (the whole text if shorter)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_PRIME = (1 << 31) - 1  # a Mersenne prime: (a * h + b) mod p stays below 2^63 for 32-bit h


class NearDuplicateIndex:
    """Texts indexed for near-duplicate look-up: Jaccard similarity of word 3-gram shingles >= threshold.

    MinHash (Broder 1997) with `bands` LSH bands of `num_perm / bands` rows picks candidates: two texts
    of similarity J share a band with probability 1 - (1 - J^r)^b, which at the defaults (64 bands of
    2 rows) is above 1 - 1e-7 at J = 0.5, so a true near-duplicate is practically never missed; every
    candidate is then checked with the exact Jaccard, so none is reported falsely. Deterministic:
    shingles are hashed with CRC-32, and the permutations come from a fixed seed.
    """

    def __init__(self, threshold: float = 0.5, n: int = 3, num_perm: int = 128, bands: int = 64, seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise LabkitError(f"A near-duplicate threshold is a Jaccard similarity in (0, 1], got {threshold}.")
        if num_perm % bands:
            raise LabkitError(f"num_perm ({num_perm}) must be a multiple of bands ({bands}).")
        self.threshold, self.n, self.bands, self.rows = threshold, n, bands, num_perm // bands
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self._keys: list = []
        self._shingles: list[set[str]] = []

    def __len__(self) -> int:
        return len(self._keys)

    def _bands(self, sh: set[str]) -> list[tuple[int, bytes]]:
        h = np.fromiter((zlib.crc32(s.encode()) for s in sh), dtype=np.uint64, count=len(sh)) % np.uint64(_PRIME)
        sig = ((self._a[:, None] * h[None, :] + self._b[:, None]) % np.uint64(_PRIME)).min(axis=1)
        return [(b, sig[b * self.rows:(b + 1) * self.rows].tobytes()) for b in range(self.bands)]

    def add(self, text: str, key=None) -> None:
        """Index a text under `key` (default: its position in the index). Texts without words are skipped."""
        sh = shingles(text, self.n)
        if not sh:
            return
        idx = len(self._keys)
        self._keys.append(idx if key is None else key)
        self._shingles.append(sh)
        for band in self._bands(sh):
            self._buckets.setdefault(band, []).append(idx)

    def query(self, text: str) -> list[tuple[object, float]]:
        """(key, Jaccard) of every indexed text at least `threshold` similar to `text`, most similar first."""
        sh = shingles(text, self.n)
        if not sh or not self._keys:
            return []
        candidates = {i for band in self._bands(sh) for i in self._buckets.get(band, ())}
        hits = [(self._keys[i], j) for i in candidates if (j := jaccard(sh, self._shingles[i])) >= self.threshold]
        return sorted(hits, key=lambda kv: -kv[1])

    def nearest(self, text: str) -> tuple[object, float] | None:
        hits = self.query(text)
        return hits[0] if hits else None
