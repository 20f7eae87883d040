"""DSpark's heads on top of the parallel backbone (paper Sec. 3.1 and 3.2.1).

The backbone gives hidden states h_1..h_gamma and base logits U_k in one forward. A *sequential head*
adds a prefix-dependent transition bias B_k, so the block is sampled left to right from
p_k(v) = softmax(U_k(v) + B_k(x_0, x_<k, v)) (Eq. 4):

- `MarkovHead`: B(x_{k-1}, .) = W1[x_{k-1}] W2, a rank-r factorisation of a V x V transition (Eq. 5);
- `RNNHead`: a gated state s_k = g * s_{k-1} + (1 - g) * tanh(W_c z_k), z_k = [s_{k-1}; W1[x_{k-1}]; h_k],
  g = sigmoid(W_g z_k), B_k = W2^T tanh(W_o z_k), with W_g, W_c, W_o one joint projection (Eq. 6).

`ConfidenceHead` predicts c_k = sigmoid(w . [h_k ; W1[x_{k-1}]]), the probability that draft k survives
given that drafts before it did (Eq. 7), trained against c*_k = 1 - 0.5 ||p_d - p_t||_1 (Eq. 8).

Tokens index W1 through the drafter's draft vocabulary (`vocab_ids`), plus one shared row for any token
outside it (an anchor can be any token). W2 starts at zero, so a fresh head leaves the backbone's
distribution unchanged, and rank 0 means no head at all: DSpark with r = 0 is DFlash.
"""

from __future__ import annotations

import torch
from torch import nn
from labkit.core.errors import LabkitError


class TokenIndex(nn.Module):
    """Maps target token ids to rows of W1: the draft-vocabulary column, or the last row if outside."""

    def __init__(self, vocab_ids: torch.Tensor, target_vocab_size: int):
        super().__init__()
        lookup = torch.full((target_vocab_size,), len(vocab_ids), dtype=torch.long)
        lookup[vocab_ids.long()] = torch.arange(len(vocab_ids))
        self.register_buffer("lookup", lookup, persistent=False)
        self.n_rows = len(vocab_ids) + 1

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lookup[token_ids]


class MarkovHead(nn.Module):
    """Eq. 5: a first-order, rank-r transition bias. Stateless: step k needs only x_{k-1}."""

    def __init__(self, n_rows: int, n_out: int, rank: int, hidden: int):
        super().__init__()
        self.rank = rank
        self.w1 = nn.Embedding(n_rows, rank)
        self.w2 = nn.Linear(rank, n_out, bias=False)
        nn.init.normal_(self.w1.weight, std=1.0 / max(rank, 1) ** 0.5)
        nn.init.zeros_(self.w2.weight)

    def init_state(self, batch_shape: tuple[int, ...], device=None, dtype=None) -> None:
        return None

    def step(self, h: torch.Tensor, prev_rows: torch.Tensor, state=None):
        """(bias (..., V_draft), Markov feature W1[x_{k-1}] (..., r), unchanged state)."""
        feat = self.w1(prev_rows)
        return self.w2(feat), feat, state

    def teacher_forced(self, h: torch.Tensor, prev_rows: torch.Tensor):
        """All positions at once given the true previous tokens: (bias (..., gamma, V), feats)."""
        feat = self.w1(prev_rows)
        return self.w2(feat), feat


class RNNHead(nn.Module):
    """Eq. 6: a gated recurrent state carried through the block; one joint projection to (g, c, o)."""

    def __init__(self, n_rows: int, n_out: int, rank: int, hidden: int):
        super().__init__()
        self.rank = rank
        self.w1 = nn.Embedding(n_rows, rank)
        self.joint = nn.Linear(2 * rank + hidden, 3 * rank)
        self.w2 = nn.Linear(rank, n_out, bias=False)
        nn.init.normal_(self.w1.weight, std=1.0 / max(rank, 1) ** 0.5)
        nn.init.zeros_(self.w2.weight)

    def init_state(self, batch_shape: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(*batch_shape, self.rank, device=device, dtype=dtype)  # s_0 = 0

    def step(self, h: torch.Tensor, prev_rows: torch.Tensor, state: torch.Tensor):
        feat = self.w1(prev_rows)
        z = torch.cat([state, feat, h.to(feat.dtype)], -1)
        g, c, o = self.joint(z).chunk(3, -1)
        gate = torch.sigmoid(g)
        new_state = gate * state + (1 - gate) * torch.tanh(c)
        return self.w2(torch.tanh(o)), feat, new_state

    def teacher_forced(self, h: torch.Tensor, prev_rows: torch.Tensor):
        state = self.init_state(h.shape[:-2], h.device, self.w1.weight.dtype)
        biases, feats = [], []
        for k in range(h.shape[-2]):
            b, f, state = self.step(h[..., k, :], prev_rows[..., k], state)
            biases.append(b)
            feats.append(f)
        return torch.stack(biases, -2), torch.stack(feats, -2)


class ConfidenceHead(nn.Module):
    """Eq. 7: c_k = sigmoid(w . [h_k ; W1[x_{k-1}]]); returns the logit (temperature scaling acts on it)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(hidden + rank, 1)

    def forward(self, h: torch.Tensor, feat: torch.Tensor | None) -> torch.Tensor:
        x = h if feat is None else torch.cat([h, feat.to(h.dtype)], -1)
        return self.proj(x).squeeze(-1)


HEADS = {"markov": MarkovHead, "rnn": RNNHead}


def make_head(kind: str, n_rows: int, n_out: int, rank: int, hidden: int) -> nn.Module | None:
    """The sequential head `kind` ("markov" or "rnn") at rank r; None at rank 0 (plain DFlash)."""
    if kind not in HEADS:
        raise LabkitError(f"Unknown head {kind!r}: use markov or rnn.")
    return None if rank == 0 else HEADS[kind](n_rows, n_out, rank, hidden)


class TruncatedMarkovHead(nn.Module):
    """A Markov head whose transition bias is cut to rank r by SVD (Eckart-Young: the best rank-r
    approximation of W1 W2 in Frobenius norm). The confidence feature stays the original W1 row, so
    the confidence head reads what it was trained on; only the bias B changes."""

    def __init__(self, head: MarkovHead, r: int):
        super().__init__()
        self.w1 = head.w1
        self.rank = head.rank
        a, b = low_rank_factors(head.w1.weight.detach(), head.w2.weight.detach(), r)
        self.register_buffer("bias_a", a, persistent=False)  # (n_rows, r)
        self.register_buffer("bias_b", b, persistent=False)  # (V_draft, r)

    def init_state(self, batch_shape: tuple[int, ...], device=None, dtype=None) -> None:
        return None

    def step(self, h: torch.Tensor, prev_rows: torch.Tensor, state=None):
        return self.bias_a[prev_rows] @ self.bias_b.T, self.w1(prev_rows), state

    def teacher_forced(self, h: torch.Tensor, prev_rows: torch.Tensor):
        return self.bias_a[prev_rows] @ self.bias_b.T, self.w1(prev_rows)


def low_rank_factors(w1: torch.Tensor, w2: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) with A B^T the best rank-r approximation of M = w1 w2^T (w1 (n, R), w2 (V, R)).

    Computed without forming the n x V matrix: QR of both factors, then the SVD of the R x R core.
    """
    q1, r1 = torch.linalg.qr(w1.double())
    q2, r2 = torch.linalg.qr(w2.double())
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    r = max(0, min(r, s.numel()))
    a = (q1 @ u[:, :r]) * s[:r]
    b = q2 @ vh[:r].T
    return a.to(w1.dtype), b.to(w1.dtype)
