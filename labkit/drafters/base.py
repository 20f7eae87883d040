"""The one interface every drafter offers, so the loop never asks which drafter it holds.

A drafter proposes a block of tokens together with the exact probabilities it sampled them from
(`Proposal`), then observes how verification went. Deterministic drafters (prompt lookup) put a
one-hot row there: verification is still exact, since min(1, p_t/p_d) and norm(max(0, p_t - p_d))
are defined for any p_d that gives its own token positive mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from labkit.decoding import DecodeState


@dataclass
class Proposal:
    """A drafted block: tokens (k,) and the probabilities (k, V) they were drawn from.

    Drafters with a confidence head (DSpark) also give, per token, the head's raw logit and the
    calibrated confidence c_k (the probability that the token survives given that those before it did).
    """

    tokens: torch.Tensor
    probs: torch.Tensor
    conf_logits: torch.Tensor | None = None
    confidences: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def empty(vocab_size: int, device: torch.device | str = "cpu") -> "Proposal":
        return Proposal(torch.empty(0, dtype=torch.long, device=device),
                        torch.empty(0, vocab_size, device=device))

    def truncate(self, k: int) -> "Proposal":
        cut = (lambda t: None if t is None else t[:k])
        return Proposal(self.tokens[:k], self.probs[:k], cut(self.conf_logits), cut(self.confidences))


class Drafter(Protocol):
    """propose a block with its probabilities; observe the verdict; keep per-request state on it."""

    name: str
    #: size of the vocabulary its tokens and probability rows index; must equal the target's
    vocab_size: int
    #: target layers whose hidden states this drafter reads (empty: none, so none are computed)
    hidden_layers: tuple[int, ...]

    def start(self, state: "DecodeState", hidden: tuple[torch.Tensor, ...] | None) -> None:
        """Called once after prefill; `hidden` holds the prompt's hidden states when asked for."""

    def propose(self, state: "DecodeState", max_tokens: int) -> Proposal:
        """Draft at most `max_tokens` tokens after state.ids (whose last token is not yet cached)."""

    def observe(self, state: "DecodeState", n_accepted: int,
                hidden: tuple[torch.Tensor, ...] | None) -> None:
        """Called after verification: n_accepted drafts survived; state.ids already extended."""


def one_hot_proposal(tokens: list[int], vocab_size: int, device: torch.device | str = "cpu") -> Proposal:
    """A deterministic drafter's block: probability 1 on each proposed token."""
    t = torch.tensor(tokens, dtype=torch.long, device=device)
    return Proposal(t, torch.nn.functional.one_hot(t, vocab_size).float())
