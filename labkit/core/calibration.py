"""Calibration of DSpark's confidence heads, and Sequential Temperature Scaling (paper Sec. 3.2.1).

A drafter proposes a block of gamma tokens; its confidence head outputs c_k in (0, 1) for each draft
position k = 1..gamma: the probability that draft k is accepted given that drafts 1..k-1 were. The
scheduler never uses c_k alone but the prefix survival a_k = prod_{i<=k} c_i, the predicted probability
that drafts 1..k are all accepted. A verification round that accepted n drafts gives the prefix labels
y_k = 1 for k <= n and 0 after, so a_k can be checked against y_k position by position:

- `ece`: expected calibration error over equal-width bins (is a_k = 0.7 right 70% of the time?);
- `reliability_bins`: the same bins, as data for a reliability diagram;
- `roc_auc`: does a_k rank rounds that survive above rounds that do not? (Mann-Whitney U, ties 1/2);
- `brier`: mean squared error, calibration and sharpness in one number;
- `per_position_metrics`: all of the above for every position k, from raw confidences and accept counts.

Sequential Temperature Scaling (`fit_sts`) recalibrates the heads after training: left to right, with
the temperatures of positions < k fixed, it grid-searches the T_k whose c_k = sigmoid(logit_k / T_k)
makes the product a_k best calibrated (lowest ECE) against y_k. A positive temperature is a monotone map
of the logit, so it never changes the order of confidences within a position; it changes how large they
are, which is what the scheduler's thresholds on a_k care about. Everything here is pure torch in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labkit.core.errors import LabkitError
from labkit.core.evidence import RESAMPLES, Interval, bootstrap, bootstrap_many, judge


# ---- scalar metrics over one set of (probability, label) pairs --------------------------------------

def _pair(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten probs and labels to float64 vectors and check them: same length, non-empty, p in [0, 1], y in {0, 1}."""
    p = torch.as_tensor(probs, dtype=torch.float64).detach().flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).detach().flatten()
    if p.numel() == 0:
        raise LabkitError("There are no predictions to score: pass at least one probability and its label.")
    if p.numel() != y.numel():
        raise LabkitError(f"probs has {p.numel()} values but labels has {y.numel()}: give one label per probability.")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise LabkitError("probs must be finite probabilities in [0, 1]: pass sigmoid outputs, not logits.")
    if not ((y == 0) | (y == 1)).all():
        raise LabkitError("labels must be 0 or 1 (1 = the draft prefix was accepted).")
    return p, y


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise LabkitError(f"n_bins must be a positive integer, got {n_bins!r}.")


def _bin_index(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each probability: [0, 1/n), [1/n, 2/n), ..., and 1.0 joins the last bin."""
    return torch.clamp((p * n_bins).floor().long(), 0, n_bins - 1)


def _ece(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> float:
    """ECE of already checked float64 vectors (the fast path `fit_sts` calls many times)."""
    return float(_column_ece(p.view(-1, 1), y.view(-1, 1), n_bins)[0])


def _column_ece(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> torch.Tensor:
    """ECE of every column of (N, K) probabilities against (N, K) labels at once."""
    idx = _bin_index(p, n_bins)
    sum_p = torch.zeros(n_bins, p.shape[1], dtype=torch.float64).scatter_add_(0, idx, p)
    sum_y = torch.zeros(n_bins, p.shape[1], dtype=torch.float64).scatter_add_(0, idx, y)
    # sum_b (n_b / N) |mean_y - mean_p| = sum_b |sum_y - sum_p| / N; empty bins add 0.
    return (sum_y - sum_p).abs().sum(0) / p.shape[0]


def ece(probs, labels, n_bins: int = 10) -> float:
    """Expected calibration error (Sec. 3.2.1): sum_b (n_b / N) |mean(labels in b) - mean(probs in b)|.

    Bins are equal-width over [0, 1]; bin b holds b/n <= p < (b+1)/n, and p = 1.0 joins the last bin.
    """
    _check_bins(n_bins)
    p, y = _pair(probs, labels)
    return _ece(p, y, n_bins)


def reliability_bins(probs, labels, n_bins: int = 10) -> list[dict]:
    """The non-empty bins of `ece` as dicts {lo, hi, count, mean_conf, frac_pos}: a reliability diagram (Sec. 3.2.1).

    A calibrated predictor has frac_pos close to mean_conf in every bin.
    """
    _check_bins(n_bins)
    p, y = _pair(probs, labels)
    idx = _bin_index(p, n_bins)
    out = []
    for b in range(n_bins):
        mask = idx == b
        n = int(mask.sum())
        if n:
            out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n,
                        "mean_conf": float(p[mask].mean()), "frac_pos": float(y[mask].mean())})
    return out


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of x, tied values sharing the mean of the ranks they span."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).to(torch.float64)  # last rank of each distinct value
    mean_rank = end - (counts.to(torch.float64) - 1) / 2
    return mean_rank[inverse]


def roc_auc(probs, labels) -> float | None:
    """ROC AUC (Sec. 3.2.1): P(score of a positive > score of a negative), ties counted 1/2.

    Computed from the Mann-Whitney U statistic with average ranks, in O(N log N). None when the labels
    hold only one class, where the AUC is undefined.
    """
    p, y = _pair(probs, labels)
    n_pos = int(y.sum())
    n_neg = p.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    u = float(_average_ranks(p)[y == 1].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def brier(probs, labels) -> float:
    """Brier score (Sec. 3.2.1): mean of (p - y)^2; 0 is perfect, 0.25 is a constant guess of 1/2 on balanced labels."""
    p, y = _pair(probs, labels)
    return float(((p - y) ** 2).mean())


# ---- per-position view: survival products against prefix labels ---------------------------------

def _matrix(x, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise LabkitError(f"{name} must be a non-empty (rounds, gamma) matrix, got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not torch.isfinite(t.detach()).all():
        raise LabkitError(f"{name} holds NaN or infinite values: check the confidence head's outputs.")
    return t


def survival(conf, max_lengths: list[int] | None = None) -> torch.Tensor:
    """Prefix survival a_k = prod_{i<=k} c_i along the positions of a (R, gamma) confidence matrix
    (Sec. 3.2.1; Algorithm 1, line 3): the one definition, for calibration and the scheduler alike.

    With `max_lengths` (the scheduler's input, already checked there: each request's real drafts),
    slots past a request's drafts survive with 0. Keeps the input's dtype and gradient, so it can also
    be used inside a loss.
    """
    if max_lengths is not None:
        real = torch.arange(conf.shape[1]) < torch.tensor(max_lengths, dtype=torch.long).view(-1, 1)
        conf = torch.where(real, conf, torch.zeros((), dtype=conf.dtype))
        # cumprod of values in [0, 1] never increases (rounding is monotone): prefixes stay prefixes.
        return conf.cumprod(1)
    c = _matrix(conf, "conf")
    if (c.detach() < 0).any() or (c.detach() > 1).any():
        raise LabkitError("conf must hold probabilities in [0, 1]: apply a sigmoid to the head's logits first.")
    return torch.cumprod(c, dim=1)


def prefix_labels(accepted, gamma: int) -> torch.Tensor:
    """Observed prefix acceptance (Sec. 3.2.1): y[r, k-1] = 1.0 if round r accepted >= k drafts; shape (R, gamma)."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise LabkitError(f"gamma must be a positive integer (drafts per block), got {gamma!r}.")
    a = torch.as_tensor(accepted).flatten()
    if a.numel() == 0:
        raise LabkitError("accepted is empty: pass the number of accepted drafts of at least one round.")
    if a.is_floating_point():
        if not torch.isfinite(a).all() or (a != a.round()).any():
            raise LabkitError("accepted must hold whole numbers: how many drafts each round accepted.")
    a = a.to(torch.long)
    if (a < 0).any() or (a > gamma).any():
        raise LabkitError(f"accepted counts must lie in 0..{gamma} (gamma), "
                          f"got values from {int(a.min())} to {int(a.max())}.")
    k = torch.arange(1, gamma + 1)
    return (a[:, None] >= k[None, :]).to(torch.float64)


def _conf_and_labels(conf, accepted) -> tuple[torch.Tensor, torch.Tensor]:
    c = _matrix(conf, "conf").detach().to(torch.float64)
    y = prefix_labels(accepted, c.shape[1])
    if y.shape[0] != c.shape[0]:
        raise LabkitError(f"conf has {c.shape[0]} rounds but accepted has {y.shape[0]}: give one count per round.")
    return c, y


def per_position_metrics(conf, accepted, n_bins: int = 10) -> dict:
    """ECE, AUC, Brier and reliability bins of survival(conf)[:, k] vs prefix labels, per position (Sec. 3.2.1).

    Returns lists of length gamma under "ece_by_position", "auc_by_position" (None where a position saw
    one class only), "brier_by_position" and "reliability_by_position" (a list of bins per position).
    """
    _check_bins(n_bins)
    c, y = _conf_and_labels(conf, accepted)
    a = survival(c)
    cols = range(c.shape[1])
    return {
        "ece_by_position": [ece(a[:, k], y[:, k], n_bins) for k in cols],
        "auc_by_position": [roc_auc(a[:, k], y[:, k]) for k in cols],
        "brier_by_position": [brier(a[:, k], y[:, k]) for k in cols],
        "reliability_by_position": [reliability_bins(a[:, k], y[:, k], n_bins) for k in cols],
    }


# ---- Sequential Temperature Scaling ----------------------------------------------------------------

@dataclass
class STSResult:
    """Per-position temperatures from `fit_sts`, which positions were fitted, and ECE of a_k before and after.

    `at_edge[k]` is True where a fitted T_k is the smallest or largest temperature of the search grid:
    the best temperature may lie beyond it (widen the grid, or read the fit as "at least / at most");
    None in records written before the field existed.
    """

    temperatures: list[float]
    fitted: list[bool]
    ece_before: list[float]
    ece_after: list[float]
    at_edge: list[bool] | None = None

    def to_dict(self) -> dict:
        """Plain lists of floats and bools, for a checkpoint's JSON config."""
        d = {"temperatures": [float(t) for t in self.temperatures], "fitted": [bool(f) for f in self.fitted],
             "ece_before": [float(e) for e in self.ece_before], "ece_after": [float(e) for e in self.ece_after]}
        if self.at_edge is not None:
            d["at_edge"] = [bool(e) for e in self.at_edge]
        return d

    def edge_report(self) -> str:
        """One sentence naming the positions whose fitted temperature sits on the grid's edge (or none)."""
        if self.at_edge is None:
            return "This STS record does not say whether a temperature hit the edge of its search grid."
        hit = [k + 1 for k, e in enumerate(self.at_edge) if e]
        if not hit:
            return "No fitted temperature sits on the edge of the search grid."
        where = ", ".join(f"position {k} (T = {self.temperatures[k - 1]:.2f})" for k in hit)
        return (f"At the edge of the search grid: {where}; the ECE-best temperature may lie beyond it, "
                "so read it as a bound, and widen the grid (fit_sts(grid=...)) to find it.")

    @classmethod
    def from_dict(cls, d: dict) -> STSResult:
        """Inverse of `to_dict`; raises LabkitError when a key is missing or the lists disagree in length."""
        keys = ("temperatures", "fitted", "ece_before", "ece_after")
        missing = [k for k in keys if k not in d]
        if missing:
            raise LabkitError(f"The STS calibration record lacks {', '.join(missing)}: "
                              "re-run fit_sts and save its to_dict().")
        lengths = {len(d[k]) for k in keys}
        if len(lengths) != 1:
            raise LabkitError("The STS calibration record's lists differ in length: "
                              "it should have one entry per position.")
        temps = [float(t) for t in d["temperatures"]]
        if not all(math.isfinite(t) and t > 0 for t in temps):
            raise LabkitError("STS temperatures must be positive finite numbers.")
        at_edge = d.get("at_edge")
        if at_edge is not None and len(at_edge) != len(temps):
            raise LabkitError("The STS calibration record's at_edge list differs in length from its temperatures.")
        return cls(temps, [bool(f) for f in d["fitted"]], [float(e) for e in d["ece_before"]],
                   [float(e) for e in d["ece_after"]], None if at_edge is None else [bool(e) for e in at_edge])


def _temperature_tensor(temperatures, gamma: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(temperatures, dtype=dtype).flatten()
    if t.numel() != gamma:
        raise LabkitError(f"Got {t.numel()} temperatures for {gamma} draft positions: give one per position.")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise LabkitError("Temperatures must be positive finite numbers.")
    return t


def apply_temperatures(conf_logits, temperatures) -> torch.Tensor:
    """Calibrated confidences c_k = sigmoid(logit_k / T_k) for a (R, gamma) logit matrix (Sec. 3.2.1).

    T_k > 0, so within a position the order of the confidences is unchanged (sigmoid(x / T) increases
    with x); only their spread moves: T > 1 pulls them towards 1/2, T < 1 pushes them towards 0 and 1.
    The survival products a_k of different rounds can still swap order, since each mixes several positions.
    """
    z = _matrix(conf_logits, "conf_logits")
    return torch.sigmoid(z / _temperature_tensor(temperatures, z.shape[1], z.dtype))


def _grid(grid) -> torch.Tensor:
    if grid is None:
        g = torch.logspace(-1, 1, 81, dtype=torch.float64)
    else:
        g = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if g.numel() == 0 or not torch.isfinite(g).all() or (g <= 0).any():
        raise LabkitError("The temperature grid must be a non-empty list of positive finite numbers.")
    # 1.0 exactly, so "leave the position as it is" is always a candidate.
    return torch.unique(torch.cat([g, torch.ones(1, dtype=torch.float64)]))


def fit_sts(conf_logits, accepted, grid=None, min_each: int = 32, n_bins: int = 10) -> STSResult:
    """Sequential Temperature Scaling (Sec. 3.2.1): fit T_1, ..., T_gamma left to right.

    At position k, with T_1..T_{k-1} already fixed, pick the T_k in `grid` (default 0.1..10 log-spaced,
    81 points, plus 1.0) that minimises the ECE of a_k = prod_{i<=k} sigmoid(logit_i / T_i) against the
    prefix labels y_k. Ties within 1e-12 go to the temperature closest to 1 in log scale. A position with
    fewer than `min_each` positive or fewer than `min_each` negative labels keeps T = 1.0 (fitted False):
    too little evidence to move it. A fitted T_k equal to the grid's smallest or largest value is flagged
    in `at_edge` (the optimum may lie outside the grid). ECE is measured on the same rounds it is fitted
    on, so hold out data to judge the result.
    """
    _check_bins(n_bins)
    if isinstance(min_each, bool) or not isinstance(min_each, int) or min_each < 0:
        raise LabkitError(f"min_each must be a non-negative integer, got {min_each!r}.")
    z, y = _conf_and_labels(conf_logits, accepted)
    g = _grid(grid)
    closeness = g.log().abs()
    gamma = z.shape[1]
    temps = [1.0] * gamma
    fitted = [False] * gamma
    prefix = torch.ones(z.shape[0], dtype=torch.float64)  # a_{k-1} under the temperatures fixed so far
    for k in range(gamma):
        n_pos = int(y[:, k].sum())
        if n_pos >= min_each and z.shape[0] - n_pos >= min_each:
            errs = torch.tensor([_ece(prefix * torch.sigmoid(z[:, k] / t), y[:, k], n_bins) for t in g.tolist()],
                                dtype=torch.float64)
            near_best = errs <= errs.min() + 1e-12
            j = int(torch.where(near_best, closeness, torch.full_like(closeness, math.inf)).argmin())
            temps[k], fitted[k] = float(g[j]), True
        prefix = prefix * torch.sigmoid(z[:, k] / temps[k])
    before = survival(torch.sigmoid(z))
    after = survival(apply_temperatures(z, temps))
    lo, hi = float(g.min()), float(g.max())
    return STSResult(temperatures=temps, fitted=fitted,
                     ece_before=[_ece(before[:, k], y[:, k], n_bins) for k in range(gamma)],
                     ece_after=[_ece(after[:, k], y[:, k], n_bins) for k in range(gamma)],
                     at_edge=[f and t in (lo, hi) for t, f in zip(temps, fitted)])


@dataclass
class ECEChange:
    """ECE of the prefix survival a_k before and after a set of temperatures, on the same rounds, per
    position; `change[k]` is after minus before with its bootstrap interval over rounds (None where a
    position was never fitted, so nothing changed), `mean` the same for the mean over positions."""

    before: list[float]
    after: list[float]
    change: list[Interval | None]
    mean: Interval | None
    rounds: int
    fitted: list[bool]

    def to_dict(self) -> dict:
        """Plain lists, for a calibration record: each interval as [value, low, high] (None where absent)."""
        as_list = lambda c: None if c is None else [c.value, c.low, c.high]  # noqa: E731
        return {"before": self.before, "after": self.after, "fitted": self.fitted, "rounds": self.rounds,
                "mean": as_list(self.mean), "change": [as_list(c) for c in self.change]}

    @classmethod
    def from_record(cls, r: dict) -> ECEChange:
        """From a calibration record (`STSResult.to_dict` plus, where recorded, `to_dict`'s "ece_change");
        a record without intervals gives mean None: its numbers can be shown, not judged."""
        ch = r.get("ece_change") or {}
        rounds = int(ch.get("rounds", r.get("rounds", 0)))
        as_iv = lambda c: None if c is None else Interval(c[0], c[1], c[2], rounds)  # noqa: E731
        gamma = len(r["ece_before"])
        return cls(list(r["ece_before"]), list(r["ece_after"]), [as_iv(c) for c in ch.get("change", [None] * gamma)],
                   as_iv(ch.get("mean")), rounds, [bool(f) for f in r["fitted"]])


def ece_change(conf_logits, accepted, temperatures, fitted: list[bool] | None = None, n_bins: int = 10,
               resamples: int = RESAMPLES, seed: int = 0) -> ECEChange:
    """How much the temperatures moved ECE of a_k on these rounds, and how sure that is: the rounds are
    resampled with replacement and ECE before and after recomputed on each resample (a paired bootstrap,
    `labkit.core.evidence`). `fitted` (from `fit_sts`; default: positions whose T differs from 1) marks the
    positions whose temperature was moved: only they (and, through a_k, the positions after them) can change.
    """
    _check_bins(n_bins)
    z, y = _conf_and_labels(conf_logits, accepted)
    gamma = z.shape[1]
    temps = _temperature_tensor(temperatures, gamma, torch.float64)
    fitted = [bool(t != 1.0) for t in temps.tolist()] if fitted is None else [bool(f) for f in fitted]
    before_a, after_a = survival(torch.sigmoid(z)), survival(torch.sigmoid(z / temps))

    def diff(i):
        return _column_ece(after_a[i], y[i], n_bins) - _column_ece(before_a[i], y[i], n_bins)

    first = next((k for k, f in enumerate(fitted) if f), gamma)  # a_k is unchanged before the first moved T
    *per, mean = bootstrap_many(lambda i: torch.cat([(d := diff(i)), d.mean().view(1)]), z.shape[0], resamples,
                                seed=seed)
    per = [c if k >= first else None for k, c in enumerate(per)]
    return ECEChange(before=_column_ece(before_a, y, n_bins).tolist(), after=_column_ece(after_a, y, n_bins).tolist(),
                     change=per, mean=mean, rounds=z.shape[0], fitted=fitted)


def ece_interval(conf_logits, accepted, temperatures=None, positions: list[int] | None = None, n_bins: int = 10,
                 resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean ECE of a_k over `positions` (0-based; default all), raw or under `temperatures`, with its
    bootstrap interval over rounds (`labkit.core.evidence`)."""
    _check_bins(n_bins)
    z, y = _conf_and_labels(conf_logits, accepted)
    c = torch.sigmoid(z if temperatures is None else z / _temperature_tensor(temperatures, z.shape[1], torch.float64))
    a = survival(c)
    cols = list(range(z.shape[1])) if positions is None else [int(k) for k in positions]
    if not cols or min(cols) < 0 or max(cols) >= z.shape[1]:
        raise LabkitError(f"positions must lie in 0..{z.shape[1] - 1}, got {positions}.")
    return bootstrap(lambda i: _column_ece(a[i][:, cols], y[i][:, cols], n_bins).mean(), z.shape[0], resamples, seed=seed)


def _mean(xs) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def describe_ece_change(result: ECEChange, where: str = "", tie: float = 0.002) -> str:
    """The sentence a measured ECE change supports (`ece_change`): lowered or raised where the interval of
    the mean change excludes 0, "within noise" where it holds 0, and, beside a mean verdict, any position
    that moved the other way beyond its own interval. No position fitted: nothing moved, nothing to say.

    `tie`: a change whose whole interval lies within this absolute ECE of 0 is called unchanged, and a
    position that moved by less than it is not named.
    `where` names the rounds (e.g. "on the 40 benchmark rounds").
    """
    on = f" {where}" if where else ""
    if not any(result.fitted):
        return (f"STS fitted none of the {len(result.fitted)} positions (each needs enough accepted and enough "
                f"rejected rounds), so every temperature stayed 1 and the ECE{on} cannot have changed: this run "
                "says nothing about what calibration does.")
    b, a, m = _mean(result.before), _mean(result.after), result.mean
    if b is None or a is None:
        return "There is no ECE to compare (no position had rounds to score)."
    if m is None:
        return (f"Mean ECE{on} {b:.3f} -> {a:.3f}; no interval over rounds was recorded, so this run draws no "
                "conclusion from the difference.")
    numbers = f"mean ECE{on} {b:.3f} -> {a:.3f}, a change of {m.text(signed=True)} over {result.rounds} rounds"
    call = judge(m, tie=tie, null=0.0)
    opposite = "above" if call == "below" else "below" if call == "above" else None
    # a position is named only when its own interval excludes 0 and it moved by at least `tie`
    named = [(k, c) for k, c in enumerate(result.change) if c is not None and abs(c.value) >= tie]
    against = [(k, c) for k, c in named if opposite and judge(c, tie, 0.0) == opposite]
    but = "".join(f"; but it {'raised' if opposite == 'above' else 'lowered'} position {k + 1}'s "
                  f"({result.before[k]:.3f} -> {result.after[k]:.3f}, {c.text(signed=True)})" for k, c in against)
    if call == "below":
        return f"STS lowered the {numbers}{but}."
    if call == "above":
        return (f"STS raised the {numbers}{but}: temperatures fitted on other rounds did not carry over to these "
                "(a fit on few rounds chases noise, and prompts unlike the fitting ones are calibrated differently).")
    if call.startswith("tied"):
        return f"STS left the {numbers}: unchanged within {tie} either way."
    moved = [(k, c) for k, c in named if judge(c, tie, 0.0) in ("above", "below")]
    detail = "".join(f"; position {k + 1} {'rose' if judge(c, tie, 0.0) == 'above' else 'fell'} beyond its interval "
                     f"({result.before[k]:.3f} -> {result.after[k]:.3f}, {c.text(signed=True)})" for k, c in moved)
    return (f"STS changed the {numbers}: within noise, so this run cannot tell whether it helped{detail}. "
            "Only more rounds than this run's would narrow the interval.")


def describe_cut_values(rows: list[dict], tie: float = 0.002) -> str:
    """A sentence from `cut_value_change` results at several costs: did cutting at the calibrated survival
    beat cutting at the raw one, beyond the interval over rounds, and verifying everything?

    `rows` are dicts {"cost", "change": Interval of calibrated minus raw cut value (tokens a step),
    "calibrated": {"cut", "verify_all"}}; an interval within `tie` tokens of 0 is a tie.
    """
    if not rows:
        return "No cost was tried."
    calls = [judge(r["change"], tie, 0.0) for r in rows]
    better, worse = calls.count("above"), calls.count("below")
    unsure = len(rows) - better - worse
    over_all = sum(r["calibrated"]["cut"] > r["calibrated"]["verify_all"] + tie for r in rows)
    n = min(r["change"].n for r in rows)
    verdict = (f"Over {n} rounds, cutting where the calibrated a_k falls below λ beat the raw cut beyond its "
               f"interval at {better} of {len(rows)} costs, lost at {worse}, and was tied or within noise at "
               f"{unsure}; it beat verifying everything at {over_all}.")
    if better and not worse:
        return verdict + " Where it mattered, calibrated absolute values put the cut nearer its break-even point."
    if worse and not better:
        return verdict + (" Here calibration did not pay: the temperatures fitted on held-out rounds moved the "
                          "survival the wrong way for these rounds.")
    if better and worse:
        return verdict + " Calibration helped at some costs and hurt at others: no single conclusion."
    return verdict + (" This run cannot tell the two cuts apart: the raw survival was already about as well "
                      "placed as the calibrated one, or there are too few rounds to see the difference.")


# ---- static threshold sweep (paper Fig. 5) ---------------------------------------------------------

def threshold_sweep(conf, accepted, thresholds) -> list[dict]:
    """Offline static-threshold verification (paper Fig. 5) on full-block rounds.

    At threshold t a round verifies only its leading drafts whose prefix survival a_k = prod_{i<=k} c_i
    is at least t (t = 0: the whole block). Verification of a prefix accepts exactly what it accepted
    of the full block, capped at the prefix: accepted = min(n, cut), rejected = cut - accepted. Returns,
    per threshold, mean accepted and rejected drafts per step, drafts verified per step, and the
    acceptance rate accepted / verified (None when nothing is verified).
    """
    c, y = _conf_and_labels(conf, accepted)
    a = survival(c)
    n = y.sum(1)  # drafts accepted of the full block
    rows = []
    for t in torch.as_tensor(thresholds, dtype=torch.float64).flatten().tolist():
        if not 0 <= t <= 1:
            raise LabkitError(f"Thresholds are probabilities in [0, 1], got {t}.")
        cut = torch.cumprod((a >= t).to(torch.float64), 1).sum(1)  # leading positions that pass
        acc = torch.minimum(n, cut)
        verified = float(cut.sum())
        rows.append({"threshold": t, "accepted_per_step": float(acc.mean()),
                     "rejected_per_step": float((cut - acc).mean()), "verified_per_step": float(cut.mean()),
                     "acceptance_rate": float(acc.sum()) / verified if verified else None})
    return rows


def cut_value(conf, accepted, cost: float) -> dict[str, float]:
    """Value per step of verifying only the drafts with survival a_k >= cost, when one verified draft
    costs `cost` tokens' worth of compute: E[accepted] - cost * E[verified] (and of verifying all).

    With a_k falling along the block, cutting where a_k < cost is the best cut if a_k is calibrated;
    the gap between the two values shows what miscalibration costs a scheduler (Sec. 3.2.2)."""
    cut, full = threshold_sweep(conf, accepted, [cost, 0.0])
    return {"cut": cut["accepted_per_step"] - cost * cut["verified_per_step"],
            "verify_all": full["accepted_per_step"] - cost * full["verified_per_step"]}


def _round_cut_values(conf, accepted, cost: float) -> torch.Tensor:
    """Per round, accepted - cost * verified when verifying the leading drafts with a_k >= cost."""
    c, y = _conf_and_labels(conf, accepted)
    cut = torch.cumprod((survival(c) >= cost).to(torch.float64), 1).sum(1)
    return torch.minimum(y.sum(1), cut) - cost * cut


def cut_value_change(raw_conf, calibrated_conf, accepted, cost: float, resamples: int = RESAMPLES,
                     seed: int = 0) -> Interval:
    """How much cutting at the calibrated survival gains over cutting at the raw one (`cut_value`), in
    tokens a step, on the same rounds, with its paired bootstrap interval over rounds."""
    d = _round_cut_values(calibrated_conf, accepted, cost) - _round_cut_values(raw_conf, accepted, cost)
    return bootstrap(lambda i: d[i].mean(), d.numel(), resamples, seed=seed)


# ---- online correction while serving -----------------------------------------------------------------

#: pseudo-observations at ratio 1 that each position's online ratio starts from (`AcceptanceRatio`)
ONLINE_PRIOR = 32.0


@dataclass
class AcceptanceRatio:
    """Per position k, how often a verified draft k that was reached (drafts 1..k-1 accepted) was
    accepted, over what its confidence c_k predicted: rho_k = (accepted_k + m rho_{k-1}) / (predicted_k + m),
    m = `prior` pseudo-observations at the ratio of the position before (rho_0 = 1). `scale` multiplies
    c_k by rho_k (clipped to [0, 1]).

    Why the position before and not 1: under load a policy rarely verifies deep drafts, so a deep
    position's own verdicts are few, and with a prior at 1 its confidences stayed uncorrected while
    position 1 had learnt 0.7; the deep columns the policy then admitted at T = 1 emitted 10-25% fewer
    tokens than it expected (data/serving/, session 12). A position with its own evidence still goes its
    own way (its verdicts outweigh the m pseudo-observations).

    Why: STS fits c_k offline on the drafter's own data; served prompts can differ (on the public
    benchmark prompts at T = 1 the shipped DSpark's verified drafts were accepted about 0.7 times as
    often as predicted), and a policy that prices drafts by their expected acceptance then verifies too
    deep. The ratio reads past verdicts only, and multiplies position k by a constant, so a policy that
    admits draft k from c_1..c_k still decides before x_k exists: verification stays lossless."""

    gamma: int
    prior: float = ONLINE_PRIOR
    predicted: list[float] | None = None
    accepted: list[float] | None = None

    def __post_init__(self) -> None:
        if self.gamma < 1 or self.prior <= 0:
            raise LabkitError(f"AcceptanceRatio needs gamma >= 1 and prior > 0, got {self.gamma} and {self.prior}.")
        self.predicted = list(self.predicted or [0.0] * self.gamma)
        self.accepted = list(self.accepted or [0.0] * self.gamma)

    @property
    def ratios(self) -> list[float]:
        out, before = [], 1.0
        for a, p in zip(self.accepted, self.predicted):
            before = (a + self.prior * before) / (p + self.prior)
            out.append(before)
        return out

    def scale(self, conf: torch.Tensor) -> torch.Tensor:
        """(R, K) confidences times rho_k by column, clipped to [0, 1] (columns past gamma unchanged)."""
        k = min(conf.shape[-1], self.gamma)
        out = conf.clone()
        out[..., :k] = (conf[..., :k] * torch.tensor(self.ratios[:k], dtype=conf.dtype)).clamp(0.0, 1.0)
        return out

    def update(self, conf: torch.Tensor, verified: list[int], accepted: list[int]) -> None:
        """One step's verdicts: row r verified `verified[r]` drafts (confidences conf[r], uncorrected) and
        accepted the first `accepted[r]` of them. Draft k counts where it was verified and reached."""
        for row, v, a in zip(conf.tolist(), verified, accepted):
            for k in range(min(v, a + 1, self.gamma)):
                self.predicted[k] += row[k]
                self.accepted[k] += 1.0 if k < a else 0.0
