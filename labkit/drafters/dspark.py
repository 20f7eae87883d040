"""DSpark: the DFlash backbone plus a sequential head and a confidence head (paper Sec. 3.1-3.2, Eq. 4-8).

The backbone drafts the whole block's states h_1..h_gamma in one forward, as DFlash does. The block is
then *sampled left to right*: p_k = softmax(U_k + B_k(x_{k-1}, ...)) (Eq. 4), where U_k are the
backbone's logits and B_k the Markov (Eq. 5) or RNN (Eq. 6) head's bias given the tokens just drawn.
Each p_k is an exact softmax and is what verification receives, so decoding stays lossless at any
temperature. The confidence head gives c_k = sigmoid(w . [h_k ; W1[x_{k-1}]]) (Eq. 7), the chance that
draft k survives given that drafts before it did; Sequential Temperature Scaling (`labkit.core.calibration`)
fits one temperature per position, stored in the checkpoint's config and applied at decode time.

In training the heads are teacher-forced: x_{k-1} is the data's token, so all positions run at once.
With rank 0 (no sequential head) DSpark's draft distribution is exactly DFlash's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from labkit.drafters.base import DraftRequest, Proposal
from labkit.drafters.dflash import DFlashBackbone, DFlashConfig, DFlashDrafter
from labkit.core.errors import LabkitError
from labkit.drafters.heads import HEADS, ConfidenceHead, MarkovHead, TokenIndex, TruncatedMarkovHead, make_head
from labkit.core.sampling import SamplingParams, logits_to_probs, sample


@dataclass
class DSparkConfig(DFlashConfig):
    """DFlash's shape plus the heads: `head` markov|rnn at `rank` (0 = none), and a confidence head."""

    kind: str = "dspark"
    head: str = "markov"
    rank: int = 64
    confidence: bool = True
    #: Sequential Temperature Scaling fits, by sampling temperature (`calibration_key`): STSResult.to_dict()
    calibration: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.head not in HEADS:
            raise LabkitError(f"Unknown head {self.head!r}: use one of {', '.join(HEADS)}.")
        if self.rank < 0:
            raise LabkitError(f"rank must be 0 (no sequential head) or more, got {self.rank}.")


def calibration_key(temperature: float) -> str:
    """The calibration record a sampling temperature uses: 'greedy' or 'T=1', 'T=0.7', ..."""
    return "greedy" if temperature == 0 else f"T={temperature:g}"


class DSparkModel(DFlashBackbone):
    """The DFlash backbone with a sequential head and a confidence head, trained together (Eq. 12)."""

    def __init__(self, cfg: DSparkConfig, embed: torch.Tensor, lm_head: torch.Tensor,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__(cfg, embed, lm_head, vocab_ids)
        self.token_index = TokenIndex(self.vocab_ids, cfg.target_vocab_size)
        self.seq_head = make_head(cfg.head, self.token_index.n_rows, len(self.vocab_ids), cfg.rank, cfg.hidden_size)
        self.confidence = ConfidenceHead(cfg.hidden_size, cfg.rank if self.seq_head is not None else 0) \
            if cfg.confidence else None

    def forward(self, feats: torch.Tensor, anchor_pos: torch.Tensor, anchor_ids: torch.Tensor,
                targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DFlash's outputs with the teacher-forced head bias added to "logits" ("base_logits" keeps U_k)
        and the confidence logits ("conf_logits", (B, A, gamma)). targets (B, A, gamma) are the block's
        true tokens: position k's previous token is the anchor for k = 1, else targets[k - 2]."""
        out = super().forward(feats, anchor_pos, anchor_ids)
        if self.seq_head is None and self.confidence is None:
            return out
        h = out["h"]
        feat = None
        if self.seq_head is not None:
            if targets is None:
                raise LabkitError("DSpark's training forward needs the block's tokens (targets) for its head.")
            prev = torch.cat([anchor_ids[..., None], targets[..., :-1]], -1)
            bias, feat = self.seq_head.teacher_forced(h, self.token_index(prev))
            out["base_logits"] = out["logits"]
            out["logits"] = out["logits"] + bias.to(out["logits"].dtype)
        if self.confidence is not None:
            out["conf_logits"] = self.confidence(h, feat)
        return out


def with_transition_rank(model: DSparkModel, r: int) -> DSparkModel:
    """A copy of `model` whose Markov transition bias is truncated to rank r by SVD (r = 0: no bias).

    What the notebook's rank slider moves: a real trained transition cut to rank r, not a fake curve.
    """
    if not isinstance(model.seq_head, MarkovHead):
        raise LabkitError("Rank truncation applies to a trained Markov head; this drafter has "
                          f"{type(model.seq_head).__name__ if model.seq_head is not None else 'no head'}.")
    if not 0 <= r <= model.cfg.rank:
        raise LabkitError(f"rank must lie in 0..{model.cfg.rank} (the trained rank), got {r}.")
    out = copy.copy(model)  # shares every weight and buffer; only the head module is swapped
    out._modules = {**model._modules, "seq_head": TruncatedMarkovHead(model.seq_head, r)}
    return out


class DSparkDrafter(DFlashDrafter):
    """DSpark behind the Drafter protocol: one backbone forward, then the block sampled left to right.

    Proposals carry the confidence head's raw logits and the calibrated confidences (STS temperatures of
    the checkpoint for the request's sampling temperature; raw sigmoid where none were fitted).
    """

    name = "dspark"

    def __init__(self, model: DSparkModel, gamma: int | None = None, device=None, dtype=None,
                 calibrated: bool = True, fit_block: bool = True):
        super().__init__(model, gamma, device, dtype, fit_block)
        self.calibrated = calibrated
        self.has_confidences = model.confidence is not None

    def temperatures(self, params: SamplingParams) -> list[float] | None:
        """The STS temperatures for this sampling temperature, or None (uncalibrated)."""
        rec = self.cfg.calibration.get(calibration_key(params.temperature)) if self.calibrated else None
        return None if rec is None else rec["temperatures"]

    def block_from_states(self, h: torch.Tensor, request: DraftRequest) -> Proposal:
        return self.sample_sequential(h, request.ids[-1], request.params, request.generator)

    def block_after(self, h: torch.Tensor, request: DraftRequest, forced: list[int]) -> Proposal:
        """The head reads the forced prefix as x_{k-1} and carries its state through it."""
        return self.sample_sequential(h, request.ids[-1], request.params, request.generator, forced=forced)

    def blocks_from_states(self, h: torch.Tensor, requests: list[DraftRequest], ks: list[int]) -> list[Proposal]:
        """Eq. 4 for R requests at once: at each position the head steps over the rows that draft it
        together (one W1 lookup, one W2 matmul, one confidence projection, one LM-head product, and one
        softmax where rows share sampling settings), so a step costs by the sum of the caps, not R x the
        deepest; each row's token is drawn with its own generator, in the order `sample_sequential`
        draws it, and only up to its ks[r]."""
        m: DSparkModel = self.backbone
        head = m.seq_head
        n = h.shape[0]
        live = [r for r in range(n) if ks[r] > 0]  # rows still drafting; shrinks as positions pass
        hstate = head.init_state((len(live),), h.device, h.dtype) if head is not None else None
        prev = torch.tensor([requests[r].ids[-1] for r in live], device=h.device)
        greedy = [req.generator is None or req.params.greedy for req in requests]
        cols: list[list] = [[] for _ in range(n)]
        rows: list[list] = [[] for _ in range(n)]
        conf: list[list] = [[] for _ in range(n)]
        for j in range(max(ks)):
            keep = [i for i, r in enumerate(live) if j < ks[r]]
            if len(keep) < len(live):  # rows whose cap is reached leave for good (caps are prefixes)
                live, prev = [live[i] for i in keep], prev[keep]
                hstate = hstate[keep] if hstate is not None else None
            hj = h[live, j]
            logits, feat = m.logits(hj).float(), None
            if head is not None:
                bias, feat, hstate = head.step(hj, m.token_index(prev), hstate)
                logits = logits + bias.float()
            z = m.confidence(hj, feat).float() if m.confidence is not None else None
            p = _probs_by_row(logits, requests, live)  # (len(live), V_draft)
            drawn = p.argmax(-1)  # greedy rows are one-hot: the argmax is the draw
            picked = []
            for i, r in enumerate(live):
                col = drawn[i] if greedy[r] else sample(p[i], requests[r].generator)
                cols[r].append(col)
                rows[r].append(p[i])
                picked.append(col)
                if z is not None:
                    conf[r].append(z[i])
            prev = m.vocab_ids[torch.stack(picked)]
        out = []
        for r, req in enumerate(requests):
            if not cols[r]:
                out.append(Proposal.empty(self.vocab_size, h.device))
                continue
            extra = {}
            if conf[r]:
                zr = torch.stack(conf[r])
                temps = self.temperatures(req.params)
                t = torch.ones_like(zr) if temps is None else torch.tensor(temps[:len(zr)], device=zr.device)
                extra = {"conf_logits": zr, "confidences": torch.sigmoid(zr / t)}
            out.append(self.to_proposal(torch.stack(cols[r]), torch.stack(rows[r]), **extra))
        return out

    def sample_sequential(self, h: torch.Tensor, anchor: int, params: SamplingParams, generator,
                          forced: Sequence[int] = ()) -> Proposal:
        """Eq. 4: x_k ~ softmax(U_k + B_k(x_{k-1}, ...)), k = 1..len(h); the exact p_k go to verification.

        `forced` (target ids) fixes x_1..x_F instead of drawing them (the hybrid drafter's n-gram part):
        the head reads them as x_{k-1} and carries its state through them, and the returned Proposal
        covers positions F+1..len(h) only (F < len(h)), each row the exact p_k given that prefix.
        """
        m: DSparkModel = self.backbone
        base = m.logits(h).float()  # (k, V_draft): the backbone's part, one matmul for the block
        head = m.seq_head
        hstate = head.init_state((), h.device, h.dtype) if head is not None else None
        prev = torch.tensor(anchor, device=h.device)
        cols, rows, conf = [], [], []
        for j in range(h.shape[0]):
            logits, feat = base[j], None
            if head is not None:
                bias, feat, hstate = head.step(h[j], m.token_index(prev), hstate)
                logits = logits + bias.float()
            if j < len(forced):  # nothing drawn: the next step conditions on the caller's token
                prev = torch.tensor(forced[j], device=h.device)
                continue
            p = logits_to_probs(logits[None], params)[0]
            # greedy p is one-hot: its argmax is the draw, without a multinomial over V_draft
            col = p.argmax() if generator is None or params.greedy else sample(p, generator)
            if m.confidence is not None:
                conf.append(m.confidence(h[j], feat).float())
            cols.append(col)
            rows.append(p)
            prev = m.vocab_ids[col]
        extra = {}
        if conf:
            z = torch.stack(conf)
            temps = self.temperatures(params)
            t = torch.ones_like(z) if temps is None else \
                torch.tensor(temps[len(forced): len(forced) + len(z)], device=z.device)  # by absolute position
            extra = {"conf_logits": z, "confidences": torch.sigmoid(z / t)}
        return self.to_proposal(torch.stack(cols), torch.stack(rows), **extra)


def _probs_by_row(logits: torch.Tensor, requests: list[DraftRequest], rows: list[int]) -> torch.Tensor:
    """`logits_to_probs` of logits (len(rows), V), row i with request rows[i]'s settings: one call when
    they all share them (the usual case), row by row otherwise."""
    first = requests[rows[0]].params
    if all(requests[r].params == first for r in rows):
        return logits_to_probs(logits, first)
    return torch.stack([logits_to_probs(logits[i][None], requests[r].params)[0] for i, r in enumerate(rows)])


__all__ = ["DSparkConfig", "DSparkModel", "DSparkDrafter", "with_transition_rank", "calibration_key"]
