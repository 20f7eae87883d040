"""Prompt lookup: draft by copying what followed the last earlier occurrence of the context's suffix.

No model and no training (Saxena 2023; HF's `prompt_lookup_num_tokens`). The draft is deterministic,
so its probabilities are one-hot and verification is still exact. Two choices differ from HF's own
version and matter on a CPU, where a verify of 2-16 tokens costs about 1.5 forwards of one: the
suffix must match at least `min_ngram` tokens (a 1-gram match is a coin toss that costs half a
forward), and the match is the most recent one, which tracks the text being written now.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labkit.drafters.base import Drafter, DraftRequest, Proposal, one_hot_proposal
from labkit.core.errors import LabkitError


@dataclass
class PromptLookupConfig:
    gamma: int = 8  # most tokens proposed a round
    max_ngram: int = 4  # longest suffix tried first
    min_ngram: int = 2  # shortest suffix accepted as a match


def find_continuation(ids: np.ndarray, cfg: PromptLookupConfig) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the longest matching suffix."""
    n_ids = len(ids)
    for n in range(min(cfg.max_ngram, n_ids - 1), cfg.min_ngram - 1, -1):
        suffix = ids[n_ids - n:]
        windows = np.lib.stride_tricks.sliding_window_view(ids[:n_ids - 1], n)  # starts 0..n_ids-1-n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        hits = hits[hits + n < n_ids]  # the match must have a continuation before the suffix ends
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start:start + cfg.gamma].tolist()
    return []


class PromptLookupDrafter(Drafter):
    """Drafter interface over `find_continuation`; keeps no state between rounds."""

    name = "prompt-lookup"

    def __init__(self, vocab_size: int, config: PromptLookupConfig | None = None):
        self.cfg = config or PromptLookupConfig()
        if not (1 <= self.cfg.min_ngram <= self.cfg.max_ngram) or self.cfg.gamma < 1:
            raise LabkitError(f"Prompt lookup needs 1 <= min_ngram <= max_ngram and gamma >= 1, got {self.cfg}.")
        self.vocab_size = vocab_size
        self.gamma = self.cfg.gamma

    def propose(self, request: DraftRequest, max_tokens: int) -> Proposal:
        tokens = find_continuation(np.asarray(request.ids, dtype=np.int64), self.cfg)[:max_tokens]
        if not tokens:
            return Proposal.empty(self.vocab_size)
        return one_hot_proposal(tokens, self.vocab_size)
