"""Side-by-side speed benchmark: HF `generate`, HF prompt lookup, the lab's AR loop, speculative loops.

Every method runs on the same prompts in one process, interleaved prompt by prompt (the method order
rotates from one prompt to the next) after an untimed warm-up, so the ratios survive a noisy machine.
Each method's time includes its prefill, as a user would wait for it. The result is a JSON-ready
dict whose shape later issues extend and never break:
{"model", "device", "dtype", "temperature", "max_new_tokens", "prompt_set": {"sets", "files",
"domains"}, "rows": [{"method", "drafter", "tokens_per_s", "tau", "speedup_vs_hf", "n_prompts",
"new_tokens", "speedup_interval" ([low, high], paired bootstrap over prompts), "per_prompt"
([tokens, seconds] per prompt), "per_prompt_rounds" ([tokens emitted in rounds, rounds] per prompt, for a
tau interval: `labkit.core.trace.tau_ratio_interval`), ...}]}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from labkit.decode.loop import generate
from labkit.model.timing import timed_call
from labkit.drafters import check_spec, make_drafter, shipped_checkpoint
from labkit.core.errors import LabkitError
from labkit.core.evidence import Interval, pooled_rate_interval, verdict
from labkit.pipeline.prompt_sets import Prompt, describe_prompts
from labkit.core.sampling import SamplingParams
from labkit.model.target import Target
from labkit.core.trace import (format_acceptance, mean_tau, position_acceptance, position_counts, prefix_survival,
                          token_coverage)
from labkit.pipeline.calibrate import confidence_metrics, full_block_rounds

DEFAULT_METHODS = ("hf-generate", "hf-prompt-lookup", "ar", "spec:prompt-lookup")
#: the lab's main result, added to the default methods where the target has shipped drafters
SHIPPED_METHODS = ("spec:dspark", "spec:hybrid:dspark")


def default_methods(target_name: str | None) -> tuple[str, ...]:
    """The methods `bench` times when none are named: the training-free ones, then the shipped DSpark
    and the hybrid built on it where `target_name` (a packaged target, None = the default) has them."""
    try:
        shipped_checkpoint("dspark", target_name)
    except LabkitError:
        return DEFAULT_METHODS
    return DEFAULT_METHODS + SHIPPED_METHODS


@dataclass
class MethodStats:
    """Running totals of one method over the prompts."""

    new_tokens: int = 0
    seconds: float = 0.0
    rounds: list = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    by_domain: dict[str, list[float]] = field(default_factory=dict)  # domain -> [tokens, seconds]
    rounds_by_domain: dict[str, list] = field(default_factory=dict)
    per_prompt: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds), prompt order
    per_prompt_rounds: list[tuple[int, int]] = field(default_factory=list)  # (tokens emitted in rounds, rounds)

    def add(self, domain: str, tokens: list[int], seconds: float, rounds=None) -> None:
        self.new_tokens += len(tokens)
        self.seconds += seconds
        self.per_prompt.append((len(tokens), seconds))
        if rounds is not None:
            self.per_prompt_rounds.append((sum(r.emitted for r in rounds), len(rounds)))
        self.outputs.append(tokens)
        agg = self.by_domain.setdefault(domain, [0, 0.0])
        agg[0] += len(tokens)
        agg[1] += seconds
        if rounds is not None:
            self.rounds.extend(rounds)
            self.rounds_by_domain.setdefault(domain, []).extend(rounds)


def tau_by_domain(prompts: list[Prompt], results) -> dict[str, float]:
    """Mean tau per domain from one GenerationResult per prompt (rounds pooled within a domain)."""
    pooled: dict[str, list] = {}
    for prompt, result in zip(prompts, results):
        pooled.setdefault(prompt.domain, []).extend(result.rounds)
    return {d: mean_tau(rs) for d, rs in pooled.items() if rs}


def check_method(name: str) -> str | None:
    """Refuse an unknown method name; return its drafter spec (None for non-speculative methods)."""
    if name in ("hf-generate", "hf-prompt-lookup", "ar"):
        return None
    if not name.startswith("spec:"):
        raise LabkitError(f"Unknown bench method {name!r}: use hf-generate, hf-prompt-lookup, ar or "
                          "spec:<drafter> (e.g. spec:prompt-lookup).")
    spec = name.split(":", 1)[1]
    check_spec(spec)
    return spec


class Method:
    """One benchmarked way to decode: run(prompt_ids) -> (new token ids, rounds or None)."""

    def __init__(self, name: str, target: Target, params: SamplingParams, max_new_tokens: int,
                 hf_lookup_tokens: int, gamma: int | None):
        self.name, self.target, self.params, self.max_new_tokens = name, target, params, max_new_tokens
        self.hf_lookup_tokens = hf_lookup_tokens
        self.drafter_spec = check_method(name)
        self.drafter = make_drafter(self.drafter_spec, target, gamma) if self.drafter_spec else None

    def run(self, prompt_ids: list[int], seed: int, max_new_tokens: int | None = None):
        n = max_new_tokens or self.max_new_tokens
        if self.name.startswith("hf-"):
            return self._hf(prompt_ids, seed, n), None
        result = generate(self.target, prompt_ids, self.drafter, n, self.params, seed)
        return result.token_ids, result.rounds

    @torch.inference_mode()
    def _hf(self, prompt_ids: list[int], seed: int, n: int) -> list[int]:
        torch.manual_seed(seed)
        ids = torch.tensor([prompt_ids], device=self.target.device)
        kwargs = dict(max_new_tokens=n, attention_mask=torch.ones_like(ids),
                      pad_token_id=self.target.pad_token_id)
        if self.params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.params.temperature, top_p=self.params.top_p, top_k=None)
        if self.name == "hf-prompt-lookup":
            kwargs["prompt_lookup_num_tokens"] = self.hf_lookup_tokens
        out = self.target.model.generate(ids, **kwargs)
        return out[0, len(prompt_ids):].tolist()


def run_bench(target: Target, prompts: list[Prompt], methods: list[str] | tuple[str, ...] = DEFAULT_METHODS,
              max_new_tokens: int = 128, params: SamplingParams | None = None, seed: int = 0,
              hf_lookup_tokens: int = 3, gamma: int | None = None, progress: bool = True) -> dict:
    """Time every method on every prompt, interleaved; return the benchmark dict (see module doc)."""
    params = params or SamplingParams()
    if not prompts:
        raise LabkitError("No prompts to benchmark: pass at least one prompt (see load_prompts).")
    if max_new_tokens <= 0:
        raise LabkitError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    runners = [Method(m, target, params, max_new_tokens, hf_lookup_tokens, gamma) for m in methods]
    warm_ids = target.encode_prompt(prompts[0].text)
    for m in runners:  # untimed warm-up: first-call allocations and kernel selection
        m.run(warm_ids, seed, max_new_tokens=min(8, max_new_tokens))
    stats = {m.name: MethodStats() for m in runners}
    bar = tqdm(total=len(prompts) * len(runners), desc="bench", disable=not progress)
    for i, prompt in enumerate(prompts):
        ids = target.encode_prompt(prompt.text)
        for m in runners[i % len(runners):] + runners[:i % len(runners)]:
            seconds, (tokens, rounds) = timed_call(lambda: m.run(ids, seed + i), target.device)
            stats[m.name].add(prompt.domain, tokens, seconds, rounds)
            bar.update(1)
    bar.close()
    return {**_summarise(target, runners, stats, params, max_new_tokens, len(prompts)),
            "prompt_set": describe_prompts(prompts)}


def _summarise(target, runners, stats, params, max_new_tokens, n_prompts) -> dict:
    base = stats.get("hf-generate")
    base_tps = base.new_tokens / base.seconds if base and base.seconds else None
    base_dom = {d: t / s for d, (t, s) in base.by_domain.items()} if base else {}
    reference = stats.get("ar") or base
    rows = []
    for m in runners:
        st = stats[m.name]
        tps = st.new_tokens / st.seconds if st.seconds else 0.0
        row = {"method": m.name, "drafter": m.drafter_spec,
               "tokens_per_s": tps,
               "tau": mean_tau(st.rounds) if m.drafter_spec else None,
               "position_acceptance": position_acceptance(st.rounds) if m.drafter_spec else None,
               "position_rounds": position_counts(st.rounds) if m.drafter_spec else None,
               "speedup_vs_hf": tps / base_tps if base_tps else None,
               "speedup_interval": (_bounds(speedup_interval(st.per_prompt, base.per_prompt))
                                    if base_tps and st is not base else None),
               "per_prompt": [list(x) for x in st.per_prompt],
               "per_prompt_rounds": [list(x) for x in st.per_prompt_rounds] if m.drafter_spec else None,
               "n_prompts": n_prompts, "new_tokens": st.new_tokens, "seconds": st.seconds,
               "by_domain": {d: {"tokens_per_s": t / s, "speedup_vs_hf": (t / s) / base_dom[d] if d in base_dom else None,
                                 "tau": mean_tau(st.rounds_by_domain.get(d, [])) if m.drafter_spec else None,
                                 "position_acceptance": position_acceptance(st.rounds_by_domain.get(d, []))
                                 if m.drafter_spec else None,
                                 "position_rounds": position_counts(st.rounds_by_domain.get(d, []))
                                 if m.drafter_spec else None}
                             for d, (t, s) in st.by_domain.items()}}
        if m.drafter_spec:
            row["position_survival"] = prefix_survival(st.rounds)
            row["rounds"] = len(st.rounds)
            vocab = m.drafter.draft_vocab()
            if vocab is not None:  # the share of this method's output tokens its drafter could propose
                row["draft_vocab_coverage"] = token_coverage(st.outputs, vocab.tolist())
            if any(r.conf_logits is not None for r in st.rounds):
                row["confidence"] = _confidence(m.drafter, st, params)
        if params.greedy and reference is not None and reference is not st:
            same = sum(a == b for a, b in zip(st.outputs, reference.outputs))
            row["identical_to_" + ("ar" if "ar" in stats else "hf-generate")] = f"{same}/{n_prompts}"
        rows.append(row)
    return {"model": target.name, "device": str(target.device), "dtype": str(target.dtype).replace("torch.", ""),
            "temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": max_new_tokens,
            "torch_threads": torch.get_num_threads(), "rows": rows}


def speedup_interval(method: list[tuple[int, float]], base: list[tuple[int, float]], seed: int = 0) -> Interval:
    """A method's tokens/s over the baseline's on the same prompts, (sum tokens / sum seconds) each, with
    the paired bootstrap interval over prompts (`labkit.core.evidence`). One prompt: no spread, low = high."""
    m = torch.tensor(method, dtype=torch.float64)
    b = torch.tensor(base, dtype=torch.float64)
    if m.shape != b.shape or m.numel() == 0:
        raise LabkitError("a speed ratio needs both methods timed on the same prompts.")
    return pooled_rate_interval(m, b, seed=seed)


def _bounds(iv: Interval) -> list[float]:
    return [iv.low, iv.high]


def format_speedup(row: dict, tie: float = 0.02) -> str:
    """A bench row's speed over HF generate as a sentence may quote it: "1.28x [1.10-1.45] over 8 prompts,
    above" (`labkit.core.evidence.verdict` against 1; one prompt: "one prompt, no spread")."""
    x = row.get("speedup_vs_hf")
    if x is None:
        return "-"
    iv, n = row.get("speedup_interval"), row.get("n_prompts", 0)
    if iv is None:
        return f"{x:.2f}x" if row["method"] != "hf-generate" else "1.00x (the baseline)"
    if n < 2:
        return f"{x:.2f}x (one prompt, no spread)"
    return f"{x:.2f}x [{iv[0]:.2f}-{iv[1]:.2f}] over {n} prompts, {verdict(x, iv[0], iv[1], tie)}"


def _confidence(drafter, st: "MethodStats", params: SamplingParams) -> dict | None:
    """Calibration metrics of a confidence-head drafter on this run's full-block rounds (None if none)."""
    try:
        rounds = full_block_rounds([(d, rs) for d, rs in st.rounds_by_domain.items()], drafter.gamma)
    except LabkitError:
        return None
    return confidence_metrics(rounds, drafter.temperatures(params))


def prompt_line(result: dict) -> str:
    """The prompts a bench or eval result measured, in one line (older results name none)."""
    ps = result.get("prompt_set")
    if not ps:
        return "prompts: not recorded"
    files = ", ".join(f"{f} {n}" for f, n in ps["files"].items())
    return f"prompts: {'; '.join(ps['sets'])} ({files})"


def format_table(result: dict) -> str:
    """A plain-text table of a benchmark result, one row per method, per-domain speedups at the end."""
    domains = sorted({d for r in result["rows"] for d in r["by_domain"]})
    head = (f"{'method':<22}{'tokens/s':>10}{'vs HF':>8}{'95% interval':>14}{'tau':>7}"
            + "".join(f"{d:>9}" for d in domains))
    lines = [f"{result['model']} on {result['device']} ({result['dtype']}), temperature "
             f"{result['temperature']}, {result['max_new_tokens']} new tokens; speedup vs hf-generate by domain",
             prompt_line(result), head, "-" * len(head)]
    for r in result["rows"]:
        tau = f"{r['tau']:.2f}" if r["tau"] is not None else "-"
        vs = f"{r['speedup_vs_hf']:.2f}x" if r["speedup_vs_hf"] is not None else "-"
        doms = "".join(f"{r['by_domain'][d]['speedup_vs_hf']:>8.2f}x" if d in r["by_domain"] and
                       r["by_domain"][d]["speedup_vs_hf"] is not None else f"{'-':>9}" for d in domains)
        iv = r.get("speedup_interval")
        spread = f"{iv[0]:.2f}-{iv[1]:.2f}" if iv and r.get("n_prompts", 0) > 1 else "-"
        lines.append(f"{r['method']:<22}{r['tokens_per_s']:>10.2f}{vs:>8}{spread:>14}{tau:>7}{doms}")
    lines.append("95% interval: paired bootstrap over prompts of the speed against hf-generate")
    return "\n".join(lines)


def run_eval(target: Target, prompts: list[Prompt], drafter: str, max_new_tokens: int = 128,
             params: SamplingParams | None = None, seed: int = 0, gamma: int | None = None,
             vs_hf: bool = False, progress: bool = True) -> dict:
    """`python -m labkit eval`: a drafter's tau (overall and by domain), position-wise conditional
    acceptance (paper Fig. 2) and prefix survival, and tokens/s (with HF generate beside it if asked).

    JSON keys (later issues add, never rename): drafter, target, temperature, tau, tau_by_domain,
    position_acceptance, position_rounds (rounds behind each position), position_acceptance_by_domain,
    position_rounds_by_domain, position_survival, per_prompt_rounds ([tokens emitted in rounds, rounds] per
    prompt), tokens_per_s, n_prompts,
    rounds, new_tokens, speedup_vs_hf, speedup_vs_hf_by_domain; for drafters with a confidence head
    also ece_by_position, auc_by_position, brier_by_position (after STS where fitted) and their *_raw.
    """
    params = params or SamplingParams()
    methods = (["hf-generate"] if vs_hf else []) + [f"spec:{drafter}"]
    bench = run_bench(target, prompts, methods, max_new_tokens, params, seed, gamma=gamma, progress=progress)
    row = bench["rows"][-1]
    doms = row["by_domain"]
    return {"drafter": drafter, "target": target.name, "temperature": params.temperature, "top_p": params.top_p,
            "max_new_tokens": max_new_tokens, "tau": row["tau"],
            "tau_by_domain": {d: v["tau"] for d, v in doms.items()},
            "position_acceptance": row["position_acceptance"],
            "position_rounds": row["position_rounds"],
            "position_acceptance_by_domain": {d: v["position_acceptance"] for d, v in doms.items()},
            "position_rounds_by_domain": {d: v["position_rounds"] for d, v in doms.items()},
            "position_survival": row["position_survival"], "per_prompt_rounds": row["per_prompt_rounds"],
            "tokens_per_s": row["tokens_per_s"], "n_prompts": row["n_prompts"], "rounds": row["rounds"],
            "new_tokens": row["new_tokens"], "speedup_vs_hf": row["speedup_vs_hf"],
            "speedup_vs_hf_by_domain": {d: v["speedup_vs_hf"] for d, v in doms.items()},
            "hf_tokens_per_s": bench["rows"][0]["tokens_per_s"] if vs_hf else None,
            "device": bench["device"], "dtype": bench["dtype"], "prompt_set": bench["prompt_set"],
            **_confidence_keys(row.get("confidence"))}


CONFIDENCE_KEYS = ("ece_by_position", "auc_by_position", "brier_by_position", "ece_by_position_raw",
                   "auc_by_position_raw", "brier_by_position_raw", "calibration_rounds", "calibrated")


def _confidence_keys(conf: dict | None) -> dict:
    """eval's calibration keys (drafters with a confidence head): after STS where the checkpoint has
    temperatures for this sampling temperature, and raw (`*_raw`) beside them."""
    return {} if not conf else {k: conf[k] for k in CONFIDENCE_KEYS}


def format_eval(result: dict) -> str:
    """Plain-text summary of an eval result: tau by domain and the acceptance curve."""
    lines = [f"{result['drafter']} on {result['target']}, temperature {result['temperature']}, "
             f"{result['n_prompts']} prompts, {result['rounds']} rounds", prompt_line(result),
             f"tau {result['tau']:.2f}  " + "  ".join(f"{d} {t:.2f}" for d, t in sorted(result["tau_by_domain"].items())
                                                   if t is not None),
             "acceptance at position k given 1..k-1 accepted: " +
             format_acceptance(result["position_acceptance"], result["position_rounds"]),
             f"{result['tokens_per_s']:.2f} tokens/s" + (f", {result['speedup_vs_hf']:.2f}x HF generate "
                                                         f"({result['hf_tokens_per_s']:.2f} tokens/s)"
                                                         if result.get("speedup_vs_hf") else "")]
    if "ece_by_position" in result:
        lines.append(f"confidence on {result['calibration_rounds']} full-block rounds "
                     f"({'after STS' if result['calibrated'] else 'uncalibrated'}):")
        lines.append("  ECE   " + " ".join(f"{e:.3f}" for e in result["ece_by_position"]) +
                     "   raw " + " ".join(f"{e:.3f}" for e in result["ece_by_position_raw"]))
        lines.append("  AUC   " + " ".join("  -  " if a is None else f"{a:.3f}" for a in result["auc_by_position"]))
    return "\n".join(lines)
