"""A DSpark drafter's confidences against real verification rounds: measure, and fit STS (Sec. 3.2.1).

`labkit.core.calibration` holds the metrics (ECE, AUC, Brier, reliability bins) and the STS fit on plain
tensors; this module produces those tensors from decoding. A round's labels come from how many of its
drafts survived verification; only rounds that proposed a full block count, so deep positions have
labels. STS is fitted on prompts disjoint from training and evaluation: the last sequences of a data
folder that the drafter was not trained on (the checkpoint records how many it was trained on).
Temperatures are stored per sampling temperature in the checkpoint's config.json (`calibration`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit.core.calibration import STSResult, apply_temperatures, ece_change, fit_sts, per_position_metrics
from labkit.decode.loop import generate
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.trace import Round
from labkit.drafters.checkpoint import load_backbone, read_config
from labkit.drafters.dspark import DSparkDrafter, DSparkModel, calibration_key
from labkit.pipeline.data import heldout_sequences, sequences_trained_on


@dataclass
class ConfidenceRounds:
    """Full-block rounds: the head's raw logits (R, gamma), drafts accepted (R,), and each round's domain."""

    conf_logits: torch.Tensor
    accepted: torch.Tensor
    domains: list[str]

    def __len__(self) -> int:
        return int(self.accepted.shape[0])


def full_block_rounds(rounds_by_prompt: list[tuple[str, list[Round]]], gamma: int) -> ConfidenceRounds:
    """Keep rounds that proposed `gamma` drafts and carry confidence logits."""
    z, acc, dom = [], [], []
    for domain, rounds in rounds_by_prompt:
        for r in rounds:
            if r.proposed == gamma and r.conf_logits is not None:
                z.append(r.conf_logits)
                acc.append(r.accepted)
                dom.append(domain)
    if not z:
        raise LabkitError(f"No round proposed a full block of {gamma} drafts with confidences: decode longer "
                          "responses (--max-new-tokens) or more prompts, with a DSpark drafter.")
    return ConfidenceRounds(torch.tensor(z, dtype=torch.float64), torch.tensor(acc), dom)


def decode_rounds(target, drafter, prompts: list[tuple[list[int], str]], params: SamplingParams,
                  max_new_tokens: int, seed: int = 0, progress: bool = True) -> ConfidenceRounds:
    """Speculatively decode each (prompt ids, domain) and return its full-block rounds."""
    out = []
    for i, (ids, domain) in enumerate(tqdm(prompts, desc=f"rounds at T={params.temperature:g}", unit="prompt",
                                           disable=not progress)):
        out.append((domain, generate(target, ids, drafter, max_new_tokens, params, seed + i).rounds))
    return full_block_rounds(out, drafter.gamma)


def heldout_prompts(data_dir: str | Path, n: int, trained_sequences: int) -> list[tuple[list[int], str]]:
    """The prompts (token ids, domain) of the last n sequences of a data folder, refused if any of them
    is among the first `trained_sequences` (those the drafter was trained on)."""
    return [(s.ids[: s.prompt_len], s.domain) for s in heldout_sequences(data_dir, n, trained_sequences)[1]]


def confidence_metrics(rounds: ConfidenceRounds, temperatures: list[float] | None, n_bins: int = 10) -> dict:
    """ECE / AUC / Brier / reliability per position of the prefix survival, calibrated (when temperatures
    are given) and raw (`*_raw`). Keys are `eval`'s JSON keys."""
    raw = per_position_metrics(torch.sigmoid(rounds.conf_logits), rounds.accepted, n_bins)
    cal = raw if temperatures is None else per_position_metrics(
        apply_temperatures(rounds.conf_logits, temperatures[: rounds.conf_logits.shape[1]]), rounds.accepted, n_bins)
    out = dict(cal)
    out.update({f"{k}_raw": v for k, v in raw.items()})
    out["calibration_rounds"] = len(rounds)
    out["calibrated"] = temperatures is not None
    return out


def write_calibration(path: str | Path, calibration: dict) -> None:
    """Replace the `calibration` record of a checkpoint's config.json atomically."""
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["calibration"] = calibration
    tmp = cfg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, cfg_path)


def calibrate_checkpoint(target, path: str | Path, data_dir: str | Path, n_prompts: int = 48,
                         temperatures: tuple[float, ...] = (0.0, 1.0), max_new_tokens: int = 128, seed: int = 0,
                         write: bool = True, progress: bool = True) -> dict:
    """`python -m labkit calibrate`: fit STS for each sampling temperature on held-out rounds; report
    ECE before and after per position; store the temperatures in the checkpoint (unless write=False)."""
    model = load_backbone(path, target)
    if not isinstance(model, DSparkModel) or model.confidence is None:
        raise LabkitError(f"{path} has no confidence head to calibrate: train one with "
                          "`python -m labkit train --drafter dspark ...`.")
    trained = sequences_trained_on(read_config(path).get("extra", {}), data_dir)
    start, seqs = heldout_sequences(data_dir, n_prompts, trained)
    prompts = [(s.ids[: s.prompt_len], s.domain) for s in seqs]
    drafter = DSparkDrafter(model, calibrated=False)
    record = dict(model.cfg.calibration)
    report = {}
    for t in temperatures:
        params = SamplingParams(t)
        rounds = decode_rounds(target, drafter, prompts, params, max_new_tokens, seed, progress)
        sts = fit_sts(rounds.conf_logits, rounds.accepted)
        record[calibration_key(t)] = {**sts.to_dict(), "rounds": len(rounds), "prompts": len(prompts),
                                      "max_new_tokens": max_new_tokens, "data": str(data_dir),
                                      "sequences": [start, start + len(prompts)]}  # [start, end) in data order
        if len(rounds):  # in-sample (the rounds it was fitted on), with its interval over those rounds
            change = ece_change(rounds.conf_logits, rounds.accepted, sts.temperatures, sts.fitted, seed=seed)
            record[calibration_key(t)]["ece_change"] = {"rounds": change.rounds, "mean": change.to_dict()["mean"],
                                                        "change": change.to_dict()["change"]}
        report[calibration_key(t)] = record[calibration_key(t)]
    if write:
        write_calibration(path, record)
    return report


def format_calibration(report: dict) -> str:
    lines = []
    for key, r in report.items():
        lines.append(f"{key}: {r['rounds']} full-block rounds from {r['prompts']} held-out prompts")
        lines.append("  position    " + " ".join(f"{k + 1:>6}" for k in range(len(r["temperatures"]))))
        lines.append("  T_k         " + " ".join(f"{t:>6.2f}" for t in r["temperatures"]))
        lines.append("  fitted      " + " ".join(f"{'yes' if f else 'no':>6}" for f in r["fitted"]))
        lines.append("  ECE before  " + " ".join(f"{e:>6.3f}" for e in r["ece_before"]))
        lines.append("  ECE after   " + " ".join(f"{e:>6.3f}" for e in r["ece_after"]))
        if "at_edge" in r:
            lines.append("  " + STSResult.from_dict(r).edge_report())
    return "\n".join(lines)


def confidence_vs_acceptance(rounds: ConfidenceRounds, temperatures: list[float] | None = None) -> dict[str, list]:
    """Per position k: the head's mean conditional confidence c_k over rounds that reached k (drafts
    1..k-1 accepted) and the acceptance observed there, P(draft k accepted | 1..k-1 accepted)."""
    z = rounds.conf_logits
    c = torch.sigmoid(z) if temperatures is None else apply_temperatures(z, temperatures[: z.shape[1]])
    predicted, observed, reached = [], [], []
    for k in range(z.shape[1]):
        at = rounds.accepted >= k  # reached position k + 1
        n = int(at.sum())
        reached.append(n)
        predicted.append(float(c[at, k].mean()) if n else None)
        observed.append(float((rounds.accepted[at] >= k + 1).double().mean()) if n else None)
    return {"predicted": predicted, "observed": observed, "reached": reached}


def by_domain(rounds: ConfidenceRounds) -> dict[str, ConfidenceRounds]:
    """Split rounds by their prompt's domain."""
    out = {}
    for d in sorted(set(rounds.domains)):
        idx = torch.tensor([i for i, x in enumerate(rounds.domains) if x == d])
        out[d] = ConfidenceRounds(rounds.conf_logits[idx], rounds.accepted[idx], [d] * len(idx))
    return out
