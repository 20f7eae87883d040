"""Measurements of a trained drafter on held-out target sequences, for the notebooks (teacher-forced).

Everything here runs the drafter's training forward on sequences the target wrote and the drafter
was not trained on, so one forward measures every block position at once:

- `offline_acceptance`: per position, the expected acceptance at temperature 1 (1 - TV to the target)
  and at greedy (the drafter's top-1 equals the target's), and the tau they imply, optionally for a
  shorter block (the block-size slider);
- `rank_curve`: the same for a DSpark drafter whose Markov transition is cut to rank r by SVD
  (the rank slider; Eckart-Young makes the cut the best rank-r transition);
- `collisions`: where the parallel backbone's top-1 pair is incoherent and the Markov head repairs it
  (paper Sec. 3.1's multi-modal collision), with counts of repairs and of breaks;
- `drafting_costs`: wall time of the backbone forward vs the sequential head loop (paper Fig. 4, right);
- `block_showcase`: one block a parallel drafter drafts during greedy decoding, next to the target's own
  continuation, chosen by code among many contexts (and `pick_block`, the choice alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from labkit.drafters.base import DraftRequest
from labkit.core.errors import LabkitError
from labkit.core.trace import expected_acceptance, offline_tau
from labkit.model.timing import timed_runs
from labkit.pipeline.features import FeatureSequence, shard_features
from labkit.pipeline.train import forward_batch, make_batch, target_probs
from labkit.core.sampling import SamplingParams, logits_to_probs
from labkit.decode.loop import prefill, speculative_round
from labkit.drafters.dflash import DFlashDrafter
from labkit.drafters.dspark import with_transition_rank
from labkit.pipeline.data import heldout_sequences


def heldout_items(target, data_dir: str | Path, layers: tuple[int, ...], n: int, cache: str | Path,
                  trained_sequences: int = 0) -> list[FeatureSequence]:
    """The last n sequences of a data folder with their target features (computed once into `cache`)."""
    seqs = heldout_sequences(data_dir, n, trained_sequences)[1]
    cache = Path(cache)
    tokens = torch.tensor([t for s in seqs for t in s.ids], dtype=torch.int32)
    offsets = torch.tensor([0] + [len(s.ids) for s in seqs]).cumsum(0)
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file(shard_features(target, tokens, offsets, layers), str(tmp))
        tmp.replace(cache)
    return [FeatureSequence(s, cache, int(offsets[i])) for i, s in enumerate(seqs)]


def heldout_batch(items: list[FeatureSequence], gamma: int, anchors: int = 32, seed: int = 0) -> dict:
    """All items in one batch with `anchors` random blocks each (fixed by seed)."""
    return make_batch(items, list(range(len(items))), gamma, anchors, torch.Generator().manual_seed(seed), {})


@dataclass
class OfflineAcceptance:
    """Per-position acceptance estimates and the tau they imply (1 + sum of prefix survivals)."""

    accept_t1: list[float]  # E[1 - TV_k] given the true prefix
    accept_greedy: list[float]  # P(draft top-1 == target top-1) given the true prefix
    tau_t1: float
    tau_greedy: float


@torch.no_grad()
def _block_stats(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = forward_batch(model, batch)
    q = torch.softmax(out["logits"].float(), -1)
    p_t = target_probs(model, batch["final"], batch["lse"])
    accept = expected_acceptance(q, p_t)
    top1 = out["logits"].argmax(-1) == p_t.argmax(-1)
    return accept, top1, batch["valid"]


@torch.no_grad()
def offline_acceptance(model, batch: dict, gamma: int | None = None) -> OfflineAcceptance:
    """Acceptance by position and tau on a held-out batch, for the first `gamma` positions (default all)."""
    accept, top1, valid = _block_stats(model.eval(), batch)
    g = accept.shape[-1] if gamma is None else gamma
    if not 1 <= g <= accept.shape[-1]:
        raise LabkitError(f"gamma must lie in 1..{accept.shape[-1]} (the drafter's block size), got {gamma}.")
    accept, top1, v = accept[..., :g], top1[..., :g].float(), valid[..., :g].float()
    per = lambda x: [float((x[..., k] * v[..., k]).sum() / v[..., k].sum().clamp(min=1)) for k in range(g)]
    return OfflineAcceptance(accept_t1=per(accept), accept_greedy=per(top1),
                             tau_t1=float(offline_tau(accept, v)), tau_greedy=float(offline_tau(top1, v)))


def rank_curve(model, batch: dict, ranks: list[int]) -> list[dict]:
    """tau (greedy and T=1) of a DSpark drafter with its Markov transition cut to each rank by SVD."""
    rows = []
    for r in ranks:
        m = with_transition_rank(model, r)
        acc = offline_acceptance(m, batch)
        rows.append({"rank": r, "tau_t1": acc.tau_t1, "tau_greedy": acc.tau_greedy,
                     "accept_greedy": acc.accept_greedy})
    return rows


@dataclass
class Collision:
    """One block position where the prefix is right and the two drafters disagree on the next token."""

    context: list[int]  # the sequence up to and including x_{k-1}
    parallel: int  # the backbone's top-1 at position k (no head)
    sequential: int  # top-1 with the Markov head given x_{k-1}
    target: int  # the target's top-1
    position: int  # k (1-based)


@torch.no_grad()
def collisions(model, items: list[FeatureSequence], batch: dict, max_examples: int = 5) -> dict:
    """Positions k >= 2 whose previous token x_{k-1} is what the data, the target's top-1 and the
    backbone's top-1 all say (so the parallel drafter would propose it), and where the backbone's top-1
    at k differs from the Markov head's given x_{k-1}.

    Counts "repaired" (the head agrees with the target's top-1, the backbone does not), "broken" (the
    reverse) and returns repaired examples as Collision records. `batch` is `heldout_batch(items, ...)`
    (row b is items[b]); the drafter needs a sequential head."""
    model = model.eval()
    out = forward_batch(model, batch)
    if "base_logits" not in out:
        raise LabkitError("collisions compares a drafter's backbone with its sequential head: pass a DSpark model.")
    p_t = target_probs(model, batch["final"], batch["lse"])
    vocab = model.vocab_ids
    par, seq, tgt = (vocab[x.argmax(-1)] for x in (out["base_logits"], out["logits"], p_t))
    tokens = batch["targets"]
    ok_prev = (par[..., :-1] == tokens[..., :-1]) & (tgt[..., :-1] == tokens[..., :-1]) & batch["valid"][..., 1:]
    differ = ok_prev & (par[..., 1:] != seq[..., 1:])
    repaired = differ & (seq[..., 1:] == tgt[..., 1:])
    broken = differ & (par[..., 1:] == tgt[..., 1:])
    examples = []
    for b, a, j in repaired.nonzero().tolist()[:max_examples]:
        end = int(batch["anchor_pos"][b, a]) + j + 2  # the context ends with x_{k-1}, k = j + 2
        examples.append(Collision(context=items[b].seq.ids[:end], parallel=int(par[b, a, j + 1]),
                                  sequential=int(seq[b, a, j + 1]), target=int(tgt[b, a, j + 1]), position=j + 2))
    return {"positions": int(ok_prev.sum()), "differ": int(differ.sum()), "repaired": int(repaired.sum()),
            "broken": int(broken.sum()), "examples": examples}


@torch.no_grad()
def drafting_costs(drafter, request: DraftRequest, reps: int = 20) -> dict[str, float]:
    """Mean seconds of one block's backbone forward and of its sequential head loop (sampling included),
    drafting for `request` (a prefilled state's `.request`)."""
    def clock(fn) -> float:
        return sum(timed_runs(fn, reps, warmup=1)) / reps
    h = drafter.draft_hidden(request)
    backbone = clock(lambda: drafter.draft_hidden(request))
    loop = clock(lambda: drafter.sample_sequential(h, request.ids[-1], request.params, request.generator))
    parallel = clock(lambda: drafter.sample_block(drafter.backbone.logits(h).float(), request.params,
                                                  request.generator))
    return {"backbone_s": backbone, "sequential_head_s": loop, "parallel_sampling_s": parallel}


def head_round_share(costs: dict[str, float], verify_s: float) -> float:
    """The sequential head loop's share of a whole speculative round (the paper's Fig. 4, right, reports
    it in a serving round): loop / (backbone forward + loop + the target's verify forward), from
    `drafting_costs` and a verify forward's seconds."""
    if not verify_s > 0 or min(costs["backbone_s"], costs["sequential_head_s"]) < 0:
        raise LabkitError(f"head_round_share needs a positive verify time and non-negative drafting times, got "
                          f"verify {verify_s} and {costs}.")
    return costs["sequential_head_s"] / (costs["backbone_s"] + costs["sequential_head_s"] + verify_s)


# ---- one drafted block, shown next to the target's continuation (notebook 02, Part 3) -----------------

@dataclass
class DraftedBlock:
    """A block drafted at one context of a greedy decode, beside the target's greedy continuation.

    p_drafted[j] / p_target[j]: the drafter's own distribution at slot j (temperature 1, its softmax, not
    the one-hot a greedy proposal carries) at the drafted token / at the token the target writes.
    """

    prompt: int  # which prompt of the scan
    anchor: int  # index, among the generated tokens, of the anchor (the last token the target produced)
    context: list[int]  # prompt + generated tokens up to and including the anchor
    drafted: list[int]
    target: list[int]
    p_drafted: list[float]
    p_target: list[float]

    @property
    def kept(self) -> int:
        """Leading drafts equal to the target's tokens: what greedy verification keeps."""
        n = 0
        while n < len(self.drafted) and self.drafted[n] == self.target[n]:
            n += 1
        return n

    def rows(self, decode) -> list[tuple]:
        """Table rows (slot, drafted, p_d(drafted), target writes, p_d(target's), greedy verify)."""
        return [(j + 1, repr(decode([d])), f"{pd:.3f}", repr(decode([t])), f"{pt:.3f}",
                 "kept" if j < self.kept else ("rejected" if j == self.kept else "-"))
                for j, (d, t, pd, pt) in enumerate(zip(self.drafted, self.target, self.p_drafted, self.p_target))]


@dataclass
class Showcase:
    """The block `pick_block` chose, how many contexts it looked at, and how many kept at least one draft."""

    block: DraftedBlock | None
    examined: int
    with_match: int

    def summary(self) -> str:
        """What the scan found, in one or two sentences (said plainly when no context matched)."""
        if self.block is None:
            return "No context was long enough to compare a full block with the target's continuation."
        seen = f"Looked at {self.examined} contexts along the target's greedy answers"
        if self.block.kept == 0:
            return (f"{seen}: in none of them did the drafter's first draft match the target's next token, so "
                    "greedy verification would keep nothing there. The block below is the first one looked at.")
        return (f"{seen}; {self.with_match} of them ({self.with_match / self.examined:.0%}) had at least one kept "
                f"draft. Below, the one that kept most: {self.block.kept} of {len(self.block.drafted)} drafts.")


def pick_block(blocks: list[DraftedBlock]) -> Showcase:
    """The block with the most kept drafts (the first such one), with the count of blocks looked at and of
    those that kept at least one draft; with no match anywhere, the first block (kept = 0)."""
    if not blocks:
        return Showcase(None, 0, 0)
    best = max(range(len(blocks)), key=lambda i: (blocks[i].kept, -i))
    return Showcase(blocks[best], len(blocks), sum(b.kept > 0 for b in blocks))


@torch.no_grad()
def block_showcase(target, drafter, prompts: list[list[int]], max_new_tokens: int = 48) -> Showcase:
    """Scan the contexts of greedy speculative decoding of `prompts` with a parallel (DFlash) drafter and
    pick a block that partly matches the target (`pick_block`).

    At every round the drafter's greedy block is recorded with its temperature-1 probabilities (softmax
    of its logits); after the decode, each block is compared with the tokens that followed its anchor.
    Greedy speculative output equals the target's greedy output (fp32, tested), so those tokens are the
    target's own continuation. Rounds too near the end to have gamma tokens after them are skipped.
    """
    if not isinstance(drafter, DFlashDrafter) or type(drafter).block_from_states is not DFlashDrafter.block_from_states:
        raise LabkitError("block_showcase reads a parallel drafter's per-slot distributions: pass a DFlash drafter "
                          "(a DSpark head makes each slot depend on the token drafted before it).")
    greedy, t1 = SamplingParams(0.0), SamplingParams(1.0)
    blocks = []
    for i, ids in enumerate(prompts):
        state = prefill(target, ids, max_new_tokens, greedy, drafter=drafter)
        drafts = []  # (anchor index in new_ids, drafted tokens, p_d rows at T=1)
        while not state.finished:
            anchor = len(state.new_ids) - 1
            logits = drafter.draft_logits(state.request)  # (gamma, V_draft): the same forward propose() runs
            p_small = logits_to_probs(logits, t1)
            full = drafter.to_proposal(p_small.argmax(-1), p_small)  # greedy tokens, T=1 rows over V
            drafts.append((anchor, full.tokens.tolist(), full.probs))
            speculative_round(target, state, drafter)
        out = state.new_ids
        for anchor, tokens, probs in drafts:
            ref = out[anchor + 1: anchor + 1 + len(tokens)]
            if len(ref) < len(tokens):
                continue
            blocks.append(DraftedBlock(prompt=i, anchor=anchor, context=list(ids) + out[:anchor + 1], drafted=tokens,
                                       target=ref, p_drafted=[float(probs[j, t]) for j, t in enumerate(tokens)],
                                       p_target=[float(probs[j, t]) for j, t in enumerate(ref)]))
    return pick_block(blocks)
