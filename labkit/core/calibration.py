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
    idx = _bin_index(p, n_bins)
    sum_p = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, p)
    sum_y = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, y)
    # sum_b (n_b / N) |mean_y - mean_p| = sum_b |sum_y - sum_p| / N; empty bins add 0.
    return float((sum_y - sum_p).abs().sum() / p.numel())


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


def _mean(xs) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def describe_ece_change(ece_before, ece_after, tolerance: float = 0.002, where: str = "") -> str:
    """A sentence that reads the measured mean ECE before and after STS aloud, lowered / raised / unchanged.

    Changes smaller than `tolerance` (absolute ECE) are called unchanged: at a few hundred rounds the ECE
    of ten bins moves by more than that between two samples of the same head. `where` names the rounds
    (e.g. "on the benchmark rounds").
    """
    b, a = _mean(ece_before), _mean(ece_after)
    if b is None or a is None:
        return "There is no ECE to compare (no position had rounds to score)."
    on = f" {where}" if where else ""
    if abs(a - b) < tolerance:
        return (f"STS left the mean ECE{on} about where it was ({b:.3f} -> {a:.3f}, a change below {tolerance}): "
                "on these rounds the raw head was about as well calibrated as the fit could make it.")
    if a < b:
        return f"STS lowered the mean ECE{on} from {b:.3f} to {a:.3f} ({100 * (b - a) / b:.0f}% lower)."
    return (f"STS raised the mean ECE{on} from {b:.3f} to {a:.3f}: temperatures fitted on other rounds did not "
            "carry over to these (a fit on few rounds chases noise, and prompts unlike the fitting ones are "
            "calibrated differently).")


def describe_cut_values(rows: list[dict], tolerance: float = 0.005) -> str:
    """A sentence from `cut_value` results at several costs: did cutting at the calibrated survival beat
    cutting at the raw one, and verifying everything?

    `rows` are dicts {"cost", "raw": cut_value(raw...), "calibrated": cut_value(calibrated...)}; a
    difference below `tolerance` tokens a step counts as a tie.
    """
    if not rows:
        return "No cost was tried."
    better = sum(r["calibrated"]["cut"] > r["raw"]["cut"] + tolerance for r in rows)
    worse = sum(r["calibrated"]["cut"] < r["raw"]["cut"] - tolerance for r in rows)
    tied = len(rows) - better - worse
    over_all = sum(r["calibrated"]["cut"] > r["calibrated"]["verify_all"] + tolerance for r in rows)
    gain = _mean([r["calibrated"]["cut"] - r["raw"]["cut"] for r in rows])
    verdict = (f"Cutting where the calibrated a_k falls below λ beat the raw cut at {better} of {len(rows)} costs, "
               f"lost at {worse} and tied at {tied} (mean difference {gain:+.3f} accepted tokens a step), and beat "
               f"verifying everything at {over_all}.")
    if better > worse:
        return verdict + " Calibrated absolute values put the cut nearer its break-even point."
    if worse > better:
        return verdict + (" Here calibration did not pay: the temperatures fitted on held-out rounds moved the "
                          "survival the wrong way for these rounds.")
    return verdict + (" On these rounds the raw survival was already about as well placed as the calibrated one, "
                      "so the cut cannot improve; the gap appears when a head is clearly over- or under-confident.")


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


# ---- online correction while serving -----------------------------------------------------------------

#: pseudo-observations at ratio 1 that each position's online ratio starts from (`AcceptanceRatio`)
ONLINE_PRIOR = 32.0


@dataclass
class AcceptanceRatio:
    """Per position k, how often a verified draft k that was reached (drafts 1..k-1 accepted) was
    accepted, over what its confidence c_k predicted: rho_k = (accepted_k + m) / (predicted_k + m),
    m = `prior` pseudo-observations at rho = 1. `scale` multiplies c_k by rho_k (clipped to [0, 1]).

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
        return [(a + self.prior) / (p + self.prior) for a, p in zip(self.accepted, self.predicted)]

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
