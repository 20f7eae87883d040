"""Self-generated prompts (Magpie, Xu et al. 2024, arXiv 2406.08464): the target writes the user turn.

An aligned chat model given only its chat template's text up to the user's message (the "user
header": for SmolLM2 the default system turn and `<|im_start|>user\n`) continues with something a
user might ask, and stops at the end-of-turn token. `user_header` derives that text from any
tokenizer's chat template by rendering a conversation whose user message is a sentinel and cutting
at the sentinel, so nothing is hard-coded per model. The turns are sampled in big batches with the
lab's batched loop (`labkit.decode.batch_generate`) and filtered (`PromptFilter`): empty, too short or too
long, unfinished, non-printable, duplicate and near-duplicate texts go, and so does anything that is
(nearly) a benchmark turn. `classify_domain` labels what is left math, code or chat by keywords.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from labkit.decode.batch_generate import generate_batch
from labkit.core.errors import LabkitError
from labkit.pipeline.prompts import NearDuplicateIndex, _norm
from labkit.core.sampling import SamplingParams
from labkit.model.target import Target

SENTINEL = "\u2063LABKIT-USER-MESSAGE\u2063"  # invisible separators: no real message contains this


@dataclass(frozen=True)
class MagpieConfig:
    """How user turns are sampled and which survive. Magpie samples at temperature 1; a 135M model
    writes more coherent requests a little cooler, with a loose nucleus."""

    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 0
    max_prompt_tokens: int = 96  # a turn not ended by then is dropped as unfinished
    min_words: int = 4
    max_words: int = 150
    near_duplicate: float = 0.5  # Jaccard of word 3-grams at or above which two prompts count as one


def user_header(tokenizer) -> tuple[str, str]:
    """(text before the user's message, text right after it) in the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise LabkitError("Self-generated (Magpie) prompts need a chat model: this tokenizer has no chat template. "
                          "Use --prompts templates, or a target with a chat template.")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    if text.count(SENTINEL) != 1:
        raise LabkitError("The chat template does not render the user's message verbatim, so its user header "
                          "cannot be found: use --prompts templates with this target.")
    before, after = text.split(SENTINEL)
    return before, after


def end_of_turn_ids(target: Target) -> set[int]:
    """Tokens that end the user's turn: the first token the template puts after the message, plus EOS."""
    after = user_header(target.tokenizer)[1]
    ids = target.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return set(target.eos_token_ids) | ({ids[0]} if ids else set())


_CODE = re.compile(r"\b(python|javascript|java|typescript|c\+\+|c#|rust|golang|sql|html|css|bash|regex|code|coding|"
                   r"function|program|programming|script|algorithm|compile|debug|bug|api|class|method|variable|"
                   r"array|string|loop|recursion|database|query|json|library|framework|git|linux)\b|def |\(\)|```")
_MATH = re.compile(r"\b(math|maths|mathematics|equation|equations|solve|calculate|compute|sum|product|integral|"
                   r"derivative|probability|percent|percentage|average|fraction|fractions|algebra|geometry|"
                   r"triangle|circle|area|perimeter|volume|prime|divisible|remainder|how many|how much|ratio|"
                   r"multiply|divide|square root|polynomial|theorem|statistics)\b|\d+\s*[-+*/^=x]\s*\d+|\$\d|\d+%")


def classify_domain(text: str) -> str:
    """math, code or chat by keyword counts: code wins ties with math (a program about numbers is code)."""
    low = text.lower()
    code, math = len(_CODE.findall(low)), len(_MATH.findall(low))
    if code and code >= math:
        return "code"
    if math:
        return "math"
    return "chat"


def _printable(text: str) -> bool:
    # Control, private-use, unassigned and surrogate characters, and U+FFFD (a broken byte sequence)
    # mark text that is not a real request; tabs and newlines are ordinary.
    return all(c in "\n\t" or (unicodedata.category(c) not in ("Cc", "Co", "Cn", "Cs") and c != "\ufffd")
               for c in text)


@dataclass
class PromptFilter:
    """Keeps the prompts worth answering, in order, and counts why the others were dropped.

    Reasons: empty, unfinished (no end-of-turn within the token budget), short, long, unprintable,
    template (chat-template markers in the text), duplicate, near-duplicate (of a kept prompt),
    benchmark (exactly or nearly a benchmark turn).
    """

    cfg: MagpieConfig = field(default_factory=MagpieConfig)
    benchmark_exact: set[str] = field(default_factory=set)
    benchmark_near: NearDuplicateIndex | None = None
    markers: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    counts: Counter = field(default_factory=Counter)
    kept: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._seen: set[str] = set()
        self._index = NearDuplicateIndex(self.cfg.near_duplicate)

    def reason(self, text: str, finished: bool = True) -> str | None:
        """Why `text` would be dropped (None: it would be kept). Does not change the filter."""
        words = len(text.split())
        if not text.strip():
            return "empty"
        if not finished:
            return "unfinished"
        if words < self.cfg.min_words:
            return "short"
        if words > self.cfg.max_words:
            return "long"
        if not _printable(text):
            return "unprintable"
        if any(m in text for m in self.markers):
            return "template"
        norm = _norm(text)
        if norm in self.benchmark_exact or (self.benchmark_near is not None and self.benchmark_near.nearest(text)):
            return "benchmark"
        if norm in self._seen:
            return "duplicate"
        if self._index.nearest(text) is not None:
            return "near-duplicate"
        return None

    def offer(self, text: str, finished: bool = True) -> bool:
        """Keep `text` if it passes (stripped), else count why not; True if kept."""
        text = text.strip()
        why = self.reason(text, finished)
        self.counts["offered"] += 1
        if why is not None:
            self.counts[why] += 1
            return False
        self._seen.add(_norm(text))
        self._index.add(text)
        self.kept.append(text)
        self.counts["kept"] += 1
        return True


def sample_user_turns(target: Target, n: int, cfg: MagpieConfig, seed: int) -> list[tuple[str, bool]]:
    """n raw user turns (text, finished) sampled from the user header alone, as one batch."""
    before, _ = user_header(target.tokenizer)
    header = target.tokenizer(before, add_special_tokens=False)["input_ids"]
    stops = end_of_turn_ids(target)
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k)
    turns = generate_batch(target, [header] * n, params, cfg.max_prompt_tokens, seed=seed, stop_ids=stops)
    out = []
    for ids in turns:
        finished = bool(ids) and ids[-1] in stops
        out.append((target.tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False), finished))
    return out


def self_generated_prompts(target: Target, n: int, cfg: MagpieConfig, seed: int, batch_size: int,
                           prompt_filter: PromptFilter, raw_path: str | Path | None = None,
                           max_rounds: int | None = None, progress=None) -> list[str]:
    """Sample user turns in rounds of `batch_size` until the filter has kept n; return the first n kept.

    Round r samples with seed (seed, r), so the result depends only on the settings and the batch
    size. With `raw_path`, every round's raw turns are appended there (JSON lines) and replayed
    first on a rerun, so an interrupted run loses at most one round.
    """
    max_rounds = max_rounds or max(20, 20 * (n // max(1, batch_size) + 1))
    rounds_done = 0
    if raw_path is not None and Path(raw_path).exists():
        for line in Path(raw_path).read_text().split("\n"):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the last round was cut off mid-write: sample it again
                    break
                for text, finished in rec["turns"]:
                    prompt_filter.offer(text, finished)
                rounds_done = rec["round"] + 1
    while len(prompt_filter.kept) < n:
        if rounds_done >= max_rounds:
            raise LabkitError(f"After {rounds_done} rounds of {batch_size} self-generated prompts only "
                              f"{len(prompt_filter.kept)} of {n} passed the filter ({dict(prompt_filter.counts)}): ask "
                              "for fewer prompts, use --prompts mixed, or loosen the filter in MagpieConfig.")
        turns = sample_user_turns(target, batch_size, cfg, seed=seed * 1_000_003 + rounds_done)
        if raw_path is not None:
            with open(raw_path, "a") as f:
                f.write(json.dumps({"round": rounds_done, "turns": turns}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        for text, finished in turns:
            prompt_filter.offer(text, finished)
        rounds_done += 1
        if progress is not None:
            progress(len(prompt_filter.kept), rounds_done)
    return prompt_filter.kept[:n]
