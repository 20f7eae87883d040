"""What decoding costs on this device, measured, and what Eq. 1 of the paper predicts from it.

Notebook 00 is built on these and on `labkit.model.timing` (the forward cost over k new tokens, memory
bandwidth). `roofline_floor_s` gives the floor a memory-bound forward cannot beat (every weight read
once); `per_token_latency_s` and `speculative_speedup` are the latency model of Eq. 1,
L = (T_draft + T_verify) / tau; `time_ar_loops` puts HF `generate` beside the lab's own loop. Every
timing warms up first, syncs the device before reading the clock, and reports medians (or the best
run, for a bandwidth that noise can only lower).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from labkit.decode.loop import GenerationResult, generate
from labkit.model.timing import forward_cost, timed_call
from labkit.drafters import make_drafter
from labkit.core.errors import LabkitError
from labkit.core.evidence import verdict
from labkit.core.sampling import SamplingParams
from labkit.model.target import Target
from labkit.decode.loop import prefill
from labkit.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel


def roofline_floor_s(weight_bytes: float, bandwidth_gbs: float) -> float:
    """Fastest possible memory-bound forward: every weight read once, T >= bytes / bandwidth.

    A one-token decode step does about 2 flops per parameter, i.e. 0.5 flop per fp32 byte read: far
    below what a CPU or GPU computes per byte it can load, so reading the weights sets the floor
    (the roofline model). KV-cache reads add to it; at a few hundred tokens of context they are small.
    """
    if weight_bytes <= 0 or bandwidth_gbs <= 0:
        raise LabkitError(f"weight_bytes and bandwidth_gbs must be positive, got {weight_bytes} and {bandwidth_gbs}.")
    return weight_bytes / (bandwidth_gbs * 1e9)


def _check_latency_inputs(tau: float, draft_s: float, verify_s: float) -> None:
    if not tau >= 1.0:
        raise LabkitError(f"tau counts tokens per round including the target's own token, so tau >= 1; got {tau}.")
    if not (draft_s >= 0.0 and verify_s > 0.0):
        raise LabkitError(f"draft_s must be >= 0 and verify_s > 0 seconds, got {draft_s} and {verify_s}.")


def per_token_latency_s(tau: float, draft_s: float, verify_s: float) -> float:
    """Paper Eq. 1: per-token latency L = (T_draft + T_verify) / tau, tau = tokens emitted per round."""
    _check_latency_inputs(tau, draft_s, verify_s)
    return (draft_s + verify_s) / tau


def speculative_speedup(tau: float, draft_s: float, verify_s: float, ar_step_s: float) -> float:
    """Speedup over autoregressive decoding from Eq. 1: ar_step_s / L, one AR step = one token.

    Example: tau 3, a free drafter and a verify that costs 1.5 AR steps give 3 / 1.5 = 2x.
    """
    if not ar_step_s > 0.0:
        raise LabkitError(f"ar_step_s must be a positive number of seconds, got {ar_step_s}.")
    return ar_step_s / per_token_latency_s(tau, draft_s, verify_s)


def break_even_tau(draft_s: float, verify_s: float, ar_step_s: float) -> float:
    """The tau at which Eq. 1 gives speedup 1: (T_draft + T_verify) / T_ar. Below it, speculation loses."""
    _check_latency_inputs(1.0, draft_s, verify_s)
    if not ar_step_s > 0.0:
        raise LabkitError(f"ar_step_s must be a positive number of seconds, got {ar_step_s}.")
    return (draft_s + verify_s) / ar_step_s


@dataclass
class LoopTiming:
    """One decoding loop on one prompt: new tokens and the wall-clock seconds they took (prefill included)."""

    name: str
    new_tokens: int
    seconds: float
    token_ids: list[int]
    samples_s: list[float] = field(default_factory=list)  # every timed repeat, in order (seconds is their median)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-12)

    @property
    def s_per_token(self) -> float:
        return self.seconds / max(self.new_tokens, 1)


@torch.inference_mode()
def _hf_greedy(target: Target, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids], device=target.device)
    pad = target.tokenizer.pad_token_id
    out = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=pad if pad is not None else min(target.eos_token_ids))
    return out[0, len(prompt_ids):].tolist()


def time_ar_loops(target: Target, prompt_ids: list[int], max_new_tokens: int = 64,
                  repeats: int = 1, progress: bool = True) -> dict[str, LoopTiming]:
    """Greedy HF `generate` and the lab's AR loop (`generate` with no drafter) on one prompt, side by side.

    Both use their KV cache and stop at the same end-of-sequence token; each takes the median of
    `repeats` runs after one short untimed warm-up, alternating the two so drift hits both alike. Their
    seconds per token, beside `roofline_floor_s`, say how far a real decode step is from the floor.
    """
    if repeats < 1:
        raise LabkitError(f"repeats must be >= 1, got {repeats}.")
    loops = {
        "HF generate": lambda n: _hf_greedy(target, prompt_ids, n),
        "lab AR loop": lambda n: generate(target, prompt_ids, None, n, SamplingParams()).token_ids,
    }
    for run in loops.values():
        run(min(4, max_new_tokens))
    runs: dict[str, list[tuple[float, list[int]]]] = {name: [] for name in loops}
    for _ in tqdm(range(repeats), desc="AR loops", disable=not progress):
        for name, run in loops.items():
            runs[name].append(timed_call(lambda: run(max_new_tokens), target.device))
    out = {}
    for name, timed in runs.items():
        seconds = statistics.median(s for s, _ in timed)
        tokens = timed[0][1]
        out[name] = LoopTiming(name, len(tokens), seconds, tokens, [s for s, _ in timed])
    return out


def compare_loops(a: LoopTiming, b: LoopTiming, tie: float = 0.02) -> str:
    """A sentence on two loops timed side by side (`time_ar_loops`): a's tokens/s over b's, the median of
    the per-repeat ratios (repeats alternate the two, so each pair shares the machine's state) with their
    range, and the verdict it supports; one repeat: "one run each, no spread", and no verdict."""
    pairs = sorted((b_s * a.new_tokens) / (a_s * b.new_tokens) for a_s, b_s in zip(a.samples_s, b.samples_s))
    if len(pairs) < 2:
        ratio = a.tokens_per_s / b.tokens_per_s
        return f"{a.name} ran at {ratio:.2f}x {b.name}'s speed (one run each, no spread: no conclusion)."
    ratio = statistics.median(pairs)
    call = verdict(ratio, pairs[0], pairs[-1], tie)
    return (f"{a.name} ran at {ratio:.2f}x {b.name}'s speed [{pairs[0]:.2f}-{pairs[-1]:.2f} over {len(pairs)} "
            f"alternating repeats]: " + {"above": "faster", "below": "slower"}.get(call, call) + ".")


def decode_traces(target: Target, prompts_ids: list[list[int]], drafter_spec: str, max_new_tokens: int = 64,
                  params: SamplingParams | None = None, gamma: int | None = None, seed: int = 0,
                  progress: bool = True) -> list[GenerationResult]:
    """Speculative decoding of each prompt with one drafter; the per-round traces give tau and Fig. 2.

    Pool the rounds (`[r for g in traces for r in g.rounds]`) for per-position acceptance: a prompt's
    own acceptance is too few rounds to read.
    """
    if not prompts_ids:
        raise LabkitError("decode_traces needs at least one prompt.")
    drafter = make_drafter(drafter_spec, target, gamma)
    if drafter is None:
        raise LabkitError(f"decode_traces traces a drafter: name one (e.g. 'prompt-lookup'), not {drafter_spec!r}.")
    return [generate(target, ids, drafter, max_new_tokens, params or SamplingParams(), seed + i)
            for i, ids in enumerate(tqdm(prompts_ids, desc=drafter_spec, disable=not progress))]


@dataclass
class RoundCost:
    """One target variant's round costs in ms: T_step (k = 1), T_verify(k) and each drafter's T_draft."""

    label: str
    step_ms: float
    verify_ms: dict[int, float]
    draft_ms: dict[str, float]

    def break_even_tau(self, drafter: str, k: int) -> float:
        """Eq. 1's break-even tau for a round of `drafter` drafting k - 1 tokens (a k-token verify)."""
        return break_even_tau(self.draft_ms[drafter] / 1e3, self.verify_ms[k] / 1e3, self.step_ms / 1e3)

    def to_dict(self) -> dict:
        return {"label": self.label, "step_ms": self.step_ms, "verify_ms": self.verify_ms,
                "verify_over_step": {k: v / self.step_ms for k, v in self.verify_ms.items()},
                "draft_ms": self.draft_ms}


@torch.inference_mode()
def _draft_seconds(target: Target, drafter_spec: str, prompt_ids: list[int]) -> float:
    """Seconds of one greedy `propose` of a full block after prefilling `prompt_ids` (after a warm-up)."""
    drafter = make_drafter(drafter_spec, target)
    state = prefill(target, prompt_ids, 64, SamplingParams(), drafter=drafter)
    gamma = drafter.gamma
    drafter.propose(state.request, gamma)  # untimed warm-up
    return timed_call(lambda: drafter.propose(state.request, gamma), target.device)[0]


def round_costs(variants: dict[str, Target], ks: Iterable[int] = range(1, 17), drafters: Iterable[str] = (),
                prompt_ids: list[int] | None = None, context_len: int = 200, repeats: int = 9,
                progress: bool = True) -> list[RoundCost]:
    """The round-cost table of issue 11: T_step, T_verify(k) and T_draft for several target variants
    (dtypes, stock or packed kernels), measured interleaved in one run so that drift hits all alike.

    Each repeat times every variant once at every k (medians kept); T_draft is the median of `repeats`
    proposals of a full block by each drafter after a prefill of `prompt_ids`.
    """
    ks = sorted(set(int(k) for k in ks) | {1})
    drafters = list(drafters)
    if drafters and not prompt_ids:
        raise LabkitError("round_costs needs prompt_ids to time the drafters' proposals.")
    samples: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ks} for name in variants}
    drafts: dict[str, dict[str, list[float]]] = {name: {d: [] for d in drafters} for name in variants}
    for _ in tqdm(range(repeats), desc="round costs", disable=not progress):
        for name, target in variants.items():
            cost = forward_cost(target, context_len, ks, repeats=1, progress=False)
            for k, s in zip(cost.ks, cost.samples_s):
                samples[name][k].extend(s)
            for d in drafters:
                drafts[name][d].append(_draft_seconds(target, d, prompt_ids))
    return [RoundCost(name, 1e3 * statistics.median(samples[name][1]),
                      {k: 1e3 * statistics.median(samples[name][k]) for k in ks if k > 1},
                      {d: 1e3 * statistics.median(drafts[name][d]) for d in drafters})
            for name in variants]


@dataclass
class VocabCost:
    """What drafting a block costs for one draft vocabulary size and Markov rank (fresh weights: the
    cost does not depend on their values). `head_mb`: the draft LM head rows plus the Markov factors."""

    v_draft: int
    rank: int
    draft_ms: float
    head_mb: float

    def to_dict(self) -> dict:
        return {"v_draft": self.v_draft, "rank": self.rank, "draft_ms": self.draft_ms, "head_mb": self.head_mb}


def _fresh_dspark(target: Target, v_draft: int, rank: int, gamma: int, n_layers: int):
    v_draft = min(v_draft, target.vocab_size)
    cfg = DSparkConfig.for_target(target, gamma=gamma, n_layers=n_layers, rank=rank,
                                  draft_vocab=0 if v_draft == target.vocab_size else v_draft)
    head = target.model.get_output_embeddings().weight
    model = DSparkModel(cfg, target.embedding_rows(), head, torch.arange(v_draft)).to(target.device).eval()
    if getattr(target, "packed", 0):
        model.pack_for_inference()
    mb = (model.head.numel() * model.head.element_size()
          + sum(p.numel() * p.element_size() for p in (model.seq_head.parameters() if model.seq_head else ()))) / 2**20
    return DSparkDrafter(model), mb


@torch.inference_mode()
def vocab_costs(target: Target, vocab_sizes: Iterable[int], ranks: Iterable[int], prompt_ids: list[int],
                gamma: int = 8, n_layers: int = 1, repeats: int = 7, progress: bool = True) -> list[VocabCost]:
    """T_draft of a DSpark block against the draft vocabulary's size and the Markov rank (rank 0 is
    DFlash), measured interleaved (each repeat times every configuration once; medians kept).

    Verification always runs over the target's full vocabulary, so any cut stays lossless: tokens
    outside the draft vocabulary get draft probability 0, which rejection sampling handles exactly;
    the cut only caps which tokens can be drafted (its coverage of real text bounds tau).
    """
    configs = [(min(v, target.vocab_size), r) for v in vocab_sizes for r in ranks]
    built = {c: _fresh_dspark(target, c[0], c[1], gamma, n_layers) for c in dict.fromkeys(configs)}
    states = {c: prefill(target, prompt_ids, 64, SamplingParams(), drafter=d) for c, (d, _) in built.items()}
    times: dict[tuple[int, int], list[float]] = {c: [] for c in built}
    for c, (d, _) in built.items():
        d.propose(states[c].request, gamma)  # untimed warm-up
    for _ in tqdm(range(repeats), desc="draft cost by vocabulary", disable=not progress):
        for c, (d, _) in built.items():
            times[c].append(timed_call(lambda: d.propose(states[c].request, gamma), target.device)[0])
    return [VocabCost(v, r, 1e3 * statistics.median(times[(v, r)]), built[(v, r)][1]) for v, r in built]
