"""Batched autoregressive generation for making data: many prompts, one cached forward per step.

The lab's own loop, not HF `generate`: prompts are left-padded into one batch and run over a
transformers `DynamicCache` with an explicit 2D attention mask (0 over the padding) and explicit
position ids (each row counts from its own first real token, so a padded row sees the same positions
as it would alone). Each step samples one token per row with `labkit.core.sampling.sample_logits`, under
that row's own `SamplingParams`, so greedy rows and sampled rows share a batch. A row stops after a
stop token (included in its response, as the data format has always kept EOS) or at
`max_new_tokens`; finished rows are dropped from the batch and its cache
(`DynamicCache.batch_select_indices`) once enough of them have finished for the smaller forward to
pay for the copy.

Device and dtype follow the model (CPU or CUDA, fp32 or bf16). In fp32 a greedy row equals that
prompt's solo greedy continuation; in bf16 batched and solo forwards round differently, so bf16 is a
fast mode for data, not a reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams, sample_logits
from labkit.model.target import Target

GENERATOR_NAME = "labkit.decode.batch_generate"  # recorded in data shards: which loop made the responses


@dataclass
class BatchStats:
    """What one batched call cost: forwards run, tokens made, wall time, rows dropped on the way."""

    steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    compactions: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids), each (B, W): prompts right-aligned, padding masked out.

    Position ids count from each row's first real token; padding gets position 0 (it is never
    attended to, so its position does not matter, but it must be a valid index).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LabkitError("Every prompt of a batch needs at least one token: drop empty prompts before generating.")
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def _as_row_params(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise LabkitError(f"Got {len(params)} sampling settings for {n} prompts: pass one per prompt, or one for all.")
    return list(params)


@torch.inference_mode()
def generate_batch(target: Target, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   max_new_tokens: int, seed: int = 0, stop_ids: set[int] | None = None,
                   drop_fraction: float = 0.25, stats: BatchStats | None = None) -> list[list[int]]:
    """Each prompt's response (ids, ending with its stop token if one came), generated as one batch.

    `params` is one SamplingParams for every row or one per row. Sampled rows draw from one
    torch.Generator seeded with `seed` on the model's device, so a call is reproducible given the same
    prompts, settings and batch. Finished rows leave the batch once at least `drop_fraction` of the
    rows still in it have finished (1.0: only when all have; 0: at once). `stats`, if given, is
    filled in with the call's cost.
    """
    if max_new_tokens <= 0:
        raise LabkitError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    row_params = _as_row_params(params, len(prompts))
    stops = target.eos_token_ids if stop_ids is None else set(stop_ids)
    device = target.device
    start = time.perf_counter()
    ids, mask, positions = left_pad(prompts, target.pad_token_id, device)
    n, width = ids.shape
    # The mask is allocated once at full width and sliced, rather than concatenated every step.
    full_mask = torch.ones((n, width + max_new_tokens), dtype=torch.long, device=device)
    full_mask[:, :width] = mask
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    stop_tensor = torch.tensor(sorted(stops), dtype=torch.long, device=device)

    cache = DynamicCache(config=target.model.config)
    out = target.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    next_pos = positions[:, -1] + 1
    rows = torch.arange(n, device=device)  # original index of each row still in the batch
    responses: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    steps = compactions = 0
    for t in range(max_new_tokens):
        tokens = _sample_rows(logits, [row_params[r] for r in rows.tolist()], gen)
        finished_now = torch.isin(tokens, stop_tensor) if stop_tensor.numel() else torch.zeros_like(tokens, dtype=torch.bool)
        # One host sync per step: the tokens and the stop flags come over together.
        for r, tok, fin in zip(rows.tolist(), tokens.tolist(), finished_now.tolist()):
            if done[r]:
                continue
            responses[r].append(tok)
            if fin or len(responses[r]) >= max_new_tokens:
                done[r] = True
        live = torch.tensor([not done[r] for r in rows.tolist()], device=device)
        n_live = int(live.sum())
        if n_live == 0 or t == max_new_tokens - 1:
            break
        if n_live < len(rows) and (len(rows) - n_live) >= drop_fraction * len(rows):
            keep = live.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tokens, next_pos, full_mask = rows[keep], tokens[keep], next_pos[keep], full_mask[keep]
            compactions += 1
        step_mask = full_mask[:, :width + t + 1]
        out = target.model(input_ids=tokens.view(-1, 1), attention_mask=step_mask, position_ids=next_pos.view(-1, 1),
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
        steps += 1
    if stats is not None:
        stats.steps += steps + 1
        stats.new_tokens += sum(map(len, responses))
        stats.seconds += time.perf_counter() - start
        stats.compactions += compactions
    return responses


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], gen: torch.Generator) -> torch.Tensor:
    """One token per batch row, each under its own settings: one sampling call per distinct setting."""
    distinct = list(dict.fromkeys(params))  # in order of first appearance, so draws are reproducible
    if len(distinct) == 1:
        return sample_logits(logits, distinct[0], gen)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for p in distinct:
        where = torch.tensor([i for i, q in enumerate(params) if q == p], device=logits.device)
        tokens[where] = sample_logits(logits[where], p, gen)
    return tokens
