"""The target's hidden states over the training data, computed once and cached on disk (not shipped).

A drafter trains on what the target computed for each training sequence: the outputs of its chosen
layers (DFlash's context features, Eq. 2) and, for the distillation target, the final normalised
hidden state plus the log-sum-exp of the logits at every position, so that the target's probability
of any token v is exp(h_final . W_v - lse) without storing V numbers per position.

One cache file per data shard (`features/<layers>/shard-XXXXX.safetensors`): ctx (N, m*H) bf16,
final (N, H) fp16, lse (N,) fp32, rows aligned with the shard's flat token array. Files are written
atomically, so an interrupted run resumes with the shards it finished.

Features may come from the target run in bf16 (`train --feature-dtype bfloat16`, about 2x faster on a
CPU with bf16 units): they are training data, not the reference, and live in a folder of their own
(`layers-...-bfloat16`) so the two precisions never mix. The log-sum-exp is always taken in fp32
over the stored (fp16) final state, so exp(h . W_v - lse) sums to 1 over the vocabulary as training
computes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from labkit.pipeline.data import Sequence
from labkit.core.errors import LabkitError
from labkit.model.target import Target


def cache_dir(data_dir: str | Path, layers: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Path:
    """The folder of one feature cache: by target layers, and by the target's precision when not fp32."""
    name = "layers-" + "-".join(map(str, layers))
    if dtype != torch.float32:
        name += "-" + str(dtype).removeprefix("torch.")
    return Path(data_dir) / "features" / name


@torch.no_grad()
def shard_features(target: Target, tokens: torch.Tensor, offsets: torch.Tensor, layers: tuple[int, ...],
                   batch_tokens: int = 2048) -> dict[str, torch.Tensor]:
    """Teacher-forced target forwards over each sequence of one shard (batched, right-padded)."""
    model = target.model
    head = model.get_output_embeddings().weight.float()
    n = int(offsets[-1])
    ctx = torch.empty(n, len(layers) * target.hidden_size, dtype=torch.bfloat16)
    final = torch.empty(n, target.hidden_size, dtype=torch.float16)
    lse = torch.empty(n, dtype=torch.float32)
    spans = [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(offsets) - 1)]
    order = sorted(range(len(spans)), key=lambda i: spans[i][1] - spans[i][0])
    batch: list[int] = []

    def flush(batch: list[int]) -> None:
        width = max(spans[i][1] - spans[i][0] for i in batch)
        ids = torch.full((len(batch), width), target.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            a, b = spans[i]
            ids[r, : b - a] = tokens[a:b].long()
            mask[r, : b - a] = 1
        out = model(input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
        hs = out.hidden_states
        for r, i in enumerate(batch):
            a, b = spans[i]
            t = b - a
            ctx[a:b] = torch.cat([hs[j][r, :t] for j in layers], -1).to("cpu", torch.bfloat16)
            h = hs[-1][r, :t].to(torch.float16)
            final[a:b] = h.cpu()
            lse[a:b] = torch.logsumexp(h.float() @ head.T, -1).cpu()

    for i in order:
        if batch and (len(batch) + 1) * (spans[i][1] - spans[i][0]) > batch_tokens:
            flush(batch)
            batch = []
        batch.append(i)
    if batch:
        flush(batch)
    return {"ctx": ctx, "final": final, "lse": lse}


def cache_features(target: Target, data_dir: str | Path, layers: tuple[int, ...], progress: bool = True,
                   max_shards: int | None = None) -> Path:
    """Compute (or resume computing) the feature cache for every finished data shard (or the first few)."""
    data_dir = Path(data_dir)
    shards = sorted(data_dir.glob("shard-*.safetensors"))[:max_shards]
    if not shards:
        raise LabkitError(f"No training data in {data_dir}: make it with `python -m labkit prepare-data "
                          f"--out {data_dir}`.")
    out = cache_dir(data_dir, layers, target.model.dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").write_text(json.dumps({"target": target.name, "layers": list(layers),
                                               "dtype": str(target.model.dtype).removeprefix("torch.")}))
    todo = [s for s in shards if not (out / s.name).exists()]
    for shard in tqdm(todo, desc="target features", unit="shard", disable=not progress or not todo):
        t = load_file(str(shard))
        feats = shard_features(target, t["tokens"], t["offsets"], layers)
        tmp = out / (shard.name + ".tmp")
        save_file(feats, str(tmp))
        os.replace(tmp, out / shard.name)
    return out


@dataclass
class FeatureSequence:
    """A training sequence and where its target features live (loaded lazily, memory-mapped)."""

    seq: Sequence
    path: Path
    start: int

    def load(self, handles: dict) -> dict[str, torch.Tensor]:
        f = handles.get(self.path)
        if f is None:
            f = handles[self.path] = safe_open(str(self.path), "pt")
        a, b = self.start, self.start + len(self.seq.ids)
        return {k: f.get_slice(k)[a:b] for k in ("ctx", "final", "lse")}


def feature_sequences(data_dir: str | Path, layers: tuple[int, ...], max_shards: int | None = None,
                      dtype: torch.dtype = torch.float32) -> list[FeatureSequence]:
    """Every cached sequence with its feature location; sequences of uncached shards are skipped."""
    data_dir = Path(data_dir)
    out = cache_dir(data_dir, layers, dtype)
    items: list[FeatureSequence] = []
    for shard in sorted(data_dir.glob("shard-*.safetensors"))[:max_shards]:
        fpath = out / shard.name
        if not fpath.exists():
            continue
        with safe_open(str(shard), "pt") as f:
            domains = json.loads(f.metadata()["domains"])
        t = load_file(str(shard))
        tokens, offsets, plens = t["tokens"].tolist(), t["offsets"].tolist(), t["prompt_lens"].tolist()
        for i, dom in enumerate(domains):
            items.append(FeatureSequence(Sequence(tokens[offsets[i]:offsets[i + 1]], plens[i], dom),
                                         fpath, offsets[i]))
    if not items:
        raise LabkitError(f"No cached target features in {out}: run `python -m labkit train` (it caches them) "
                          "or labkit.pipeline.features.cache_features first.")
    return items


def check_data_target(data_dir: str | Path, target: Target) -> None:
    """Refuse training data that another model generated (prepare-data records its target)."""
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.exists():
        return
    made_by = json.loads(manifest.read_text()).get("settings", {}).get("target")
    if made_by and made_by != target.name:
        raise LabkitError(f"{data_dir} holds responses of {made_by}, not of the target {target.name}: a drafter "
                          f"learns its own target's outputs, so make data with `python -m labkit prepare-data "
                          f"--target {target.name} --out FOLDER` and pass --data FOLDER.")


def training_items(target: Target, data_dirs, layers: tuple[int, ...], max_shards: int | None = None,
                   progress: bool = True) -> list[FeatureSequence]:
    """The sequences of one or more prepare-data folders (the first `max_shards` of each), their target
    features cached per folder first (at the precision `target` runs in); folders made for another
    target are refused."""
    dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    if not dirs:
        raise LabkitError("No training data folder given: pass --data FOLDER [FOLDER ...].")
    items: list[FeatureSequence] = []
    for d in dirs:
        check_data_target(d, target)
        cache_features(target, d, layers, progress=progress, max_shards=max_shards)
        items.extend(feature_sequences(d, layers, max_shards=max_shards, dtype=target.model.dtype))
    return items
