"""Drafter training (paper Sec. 3.3): random anchor blocks, position-weighted CE + TV, frozen target.

Three separate pieces, so DSpark's heads extend them without copies:

- `make_batch`: B training sequences, A random anchors each, the block tokens to predict and where the
  target's distribution for each lives in the feature cache;
- `loss_terms`: named loss terms and metrics from a batch's draft logits (DSpark adds a confidence
  term to the dictionary and a weight to `LossWeights`);
- `train`: one loop written with accelerate, so the same command runs on a CPU, one GPU or several
  (`accelerate launch -m labkit train ...`), with a progress bar, atomic safetensors checkpoints,
  resume, and a stop with a clear message on a non-finite loss.

`TrainJob` is one whole training run (every option of `python -m labkit train`, each default written
once, here), `train_preset` names a few (`tiny` for tests, the shipped `dspark` and `dflash`), and
`run_training(job)` runs one; the command line only maps its arguments to a job.

Batches are drawn with a generator seeded by (seed, step, process): a resumed run sees exactly the
batches it would have seen, with no data-loader state to save.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labkit.drafters.checkpoint import (check_compatible, load_backbone, model_classes, param_count, read_config,
                                       recover, save_drafter)
from labkit.drafters.dflash import DFlashBackbone, DFlashConfig
from labkit.core.errors import LabkitError
from labkit.pipeline.features import FeatureSequence
from labkit.core.trace import acceptance_from_l1, l1_to_target, offline_tau, token_coverage
from labkit.model.target import load_target
from labkit.pipeline.data import shard_sequence_count
from labkit.pipeline.features import training_items


@dataclass
class LossWeights:
    """Eq. 12 (terms Eq. 9-11): L = ce * L_ce + l1 * L_tv + conf * L_conf, each averaged with position
    weights exp(-k / decay).

    The confidence term counts only for drafters with a confidence head (DSpark)."""

    ce: float = 0.1
    l1: float = 0.9
    conf: float = 1.0
    decay: float = 4.0


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_seqs: int = 4
    anchors_per_seq: int = 64
    lr: float = 6e-4
    warmup: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 250
    eval_every: int = 250
    val_fraction: float = 0.03
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (accelerate's names)
    loss: LossWeights = field(default_factory=LossWeights)


# ----------------------------------------------------------------------------- batches


def split_items(items: list[FeatureSequence], val_fraction: float, seed: int = 0):
    """Deterministic train/validation split by sequence index (validation: every k-th sequence)."""
    if val_fraction <= 0 or len(items) < 2:
        return items, []
    k = max(2, round(1 / val_fraction))
    val = [it for i, it in enumerate(items) if (i + seed) % k == 0]
    train = [it for i, it in enumerate(items) if (i + seed) % k != 0]
    return train, val


def make_batch(items: list[FeatureSequence], indices: list[int], gamma: int, anchors: int,
               gen: torch.Generator, handles: dict) -> dict[str, torch.Tensor]:
    """Pack sequences (right-padded) with `anchors` random anchor positions each.

    An anchor a is a position in [prompt_len - 1, n - 2]: its block predicts tokens a+1 .. a+gamma of
    the response (positions past the end are masked out by `valid`). The target's distribution for
    token a+j+1 is the one it computed at position a+j: `final`/`lse` rows are taken there. `ids` holds
    the sequences' tokens (0 past the end), which Eagle3's cache of target-feature slots reads.
    """
    rows = [items[i] for i in indices]
    loaded = [it.load(handles) for it in rows]
    n_max = max(len(it.seq.ids) for it in rows)
    b = len(rows)
    m_h = loaded[0]["ctx"].shape[-1]
    h = loaded[0]["final"].shape[-1]
    feats = torch.zeros(b, n_max, m_h, dtype=loaded[0]["ctx"].dtype)
    anchor_pos = torch.zeros(b, anchors, dtype=torch.long)
    anchor_ids = torch.zeros(b, anchors, dtype=torch.long)
    targets = torch.zeros(b, anchors, gamma, dtype=torch.long)
    valid = torch.zeros(b, anchors, gamma, dtype=torch.bool)
    final = torch.zeros(b, anchors, gamma, h, dtype=loaded[0]["final"].dtype)
    lse = torch.zeros(b, anchors, gamma)
    tokens = torch.zeros(b, n_max, dtype=torch.long)
    for r, (it, f) in enumerate(zip(rows, loaded)):
        ids = torch.tensor(it.seq.ids)
        n = len(ids)
        feats[r, :n] = f["ctx"]
        tokens[r, :n] = ids
        lo, hi = max(it.seq.prompt_len - 1, 0), n - 2
        if hi < lo:
            continue
        cand = torch.arange(lo, hi + 1)
        pick = cand[torch.randperm(len(cand), generator=gen)[:anchors]] if len(cand) > anchors else \
            cand[torch.randint(len(cand), (anchors,), generator=gen)]
        anchor_pos[r] = pick
        anchor_ids[r] = ids[pick]
        tpos = pick[:, None] + 1 + torch.arange(gamma)  # (A, gamma) predicted positions
        ok = tpos < n
        tpos_c = tpos.clamp(max=n - 1)
        targets[r] = ids[tpos_c]
        valid[r] = ok
        final[r] = f["final"][tpos_c - 1]
        lse[r] = f["lse"][tpos_c - 1]
    return {"feats": feats, "anchor_pos": anchor_pos, "anchor_ids": anchor_ids, "targets": targets,
            "valid": valid, "final": final, "lse": lse, "ids": tokens}


# ----------------------------------------------------------------------------- losses


def forward_batch(model, batch: dict) -> dict[str, torch.Tensor]:
    """The drafter's training forward on a `make_batch` batch (DSpark's heads read the targets; Eagle3's
    training-time test also reads the sequences' tokens). `model` may be wrapped (DDP)."""
    if getattr(model, "module", model).cfg.kind == "eagle3":
        return model(batch["feats"], batch["anchor_pos"], batch["anchor_ids"], batch["targets"], batch["ids"])
    return model(batch["feats"], batch["anchor_pos"], batch["anchor_ids"], batch["targets"])


def position_weights(gamma: int, decay: float, device=None) -> torch.Tensor:
    """w_k = exp(-k / decay) for k = 0..gamma-1 (the reference's form of the paper's exp(-(k-1)/gamma))."""
    return torch.exp(-torch.arange(gamma, device=device, dtype=torch.float32) / decay)


def target_probs(model: DFlashBackbone, final: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The target's probabilities over the draft vocabulary: exp(h . W_v - lse) (rows sum to <= 1)."""
    return torch.exp(final.float() @ model.head.float().T - lse[..., None])


def loss_terms(model: DFlashBackbone, out: dict[str, torch.Tensor], batch: dict,
               weights: LossWeights) -> dict[str, torch.Tensor]:
    """Eq. 12 (Eq. 9-11) from a forward's outputs: position-weighted CE to the data token, L1 to the target, and
    (when the drafter has a confidence head) BCE of c_k against c*_k = 1 - 0.5 ||p_d - p_t||_1 (Eq. 8).

    L1 is the full distance sum_v |p_d - p_t| (2 x TV, as the reference code weights it); target mass
    outside a reduced draft vocabulary counts in full. c* is detached: the confidence head learns to
    predict the acceptance, it does not pull the draft distribution. Also returns metrics (no
    gradient): a tau estimate 1 + sum_k prod_{i<=k}(1 - TV_i), its greedy (top-1) form, position-1
    acceptance, and for a confidence head the mean absolute error |c - c*|.
    """
    logits = out["logits"].float()  # (B, A, gamma, Vd)
    logq = torch.log_softmax(logits, -1)
    q = logq.exp()
    with torch.no_grad():
        p_t = target_probs(model, batch["final"], batch["lse"])
    valid_mask = batch["valid"] & out["valid"] if "valid" in out else batch["valid"]  # Eagle3 narrows it
    valid = valid_mask.float()
    w = position_weights(logits.shape[2], weights.decay, logits.device) * valid
    norm = w.sum().clamp(min=1e-6)
    local, in_vocab = _local_targets(model, batch["targets"])
    ce = -(logq.gather(-1, local[..., None]).squeeze(-1))
    ce_w = w * in_vocab.float()
    l1 = l1_to_target(q, p_t)
    terms = {"ce": (ce * ce_w).sum() / ce_w.sum().clamp(min=1e-6), "l1": (l1 * w).sum() / norm}
    terms["loss"] = weights.ce * terms["ce"] + weights.l1 * terms["l1"]
    if "conf_logits" in out:
        z = out["conf_logits"].float()
        c_star = acceptance_from_l1(l1.detach()).clamp(0, 1)
        bce = F.binary_cross_entropy_with_logits(z, c_star, reduction="none")
        terms["conf"] = (bce * w).sum() / norm
        terms["loss"] = terms["loss"] + weights.conf * terms["conf"]
        with torch.no_grad():
            terms["conf_mae"] = ((torch.sigmoid(z) - c_star).abs() * valid).sum() / valid.sum().clamp(min=1)
    with torch.no_grad():
        terms.update(block_metrics(acceptance_from_l1(l1.detach()), q.argmax(-1) == p_t.argmax(-1), valid_mask))
    return terms


def _local_targets(model: DFlashBackbone, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map full-vocabulary token ids to draft-vocabulary columns (0 where outside, flagged False)."""
    if model.full_vocab:
        return targets, torch.ones_like(targets, dtype=torch.bool)
    lookup = torch.full((model.cfg.target_vocab_size,), -1, dtype=torch.long, device=targets.device)
    lookup[model.vocab_ids] = torch.arange(len(model.vocab_ids), device=targets.device)
    local = lookup[targets]
    return local.clamp(min=0), local >= 0


def block_metrics(accept: torch.Tensor, top1: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """tau estimates from per-position acceptance (B, A, gamma); invalid positions end the block."""
    v = valid.float()
    return {"tau_est": offline_tau(accept, v), "tau_greedy_est": offline_tau(top1, v),
            "accept_1": (accept[..., 0] * v[..., 0]).sum() / v[..., 0].sum().clamp(min=1)}


# ----------------------------------------------------------------------------- draft vocabulary


def frequent_tokens(items: list[FeatureSequence], k: int, always: set[int]) -> torch.Tensor:
    """The k most frequent response tokens of the training data (plus `always`), sorted by id."""
    counts = Counter()
    for it in items:
        counts.update(it.seq.ids[it.seq.prompt_len:])
    keep = set(always)
    for tok, _ in counts.most_common():
        if len(keep) >= k:
            break
        keep.add(tok)
    return torch.tensor(sorted(keep)[:k], dtype=torch.long)


def vocab_coverage(items: list[FeatureSequence], vocab_ids: torch.Tensor) -> float:
    """The share of training response tokens the draft vocabulary holds."""
    return token_coverage([it.seq.ids[it.seq.prompt_len:] for it in items], vocab_ids.tolist())


# ----------------------------------------------------------------------------- checkpoints


def _lr_lambda(cfg: TrainConfig):
    warm = max(1, int(cfg.warmup * cfg.steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, cfg.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def save_training_state(out: Path, model: DFlashBackbone, optimizer, scheduler, step: int, extra: dict) -> Path:
    """A resumable checkpoint: out/last = drafter (safetensors + config) + optimizer/scheduler + step."""
    def trainer_state(folder: Path) -> None:  # inside the same atomic folder: weights and state land together
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                   folder / "trainer.pt")
    return save_drafter(model, out / "last", extra={"step": step, **extra}, also=trainer_state)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def evaluate(model: DFlashBackbone, items: list[FeatureSequence], cfg: TrainConfig, gamma: int,
             device, max_seqs: int = 64) -> dict[str, float]:
    """Validation loss and tau estimates on fixed anchors of held-out sequences."""
    if not items:
        return {}
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    handles: dict = {}
    sums: Counter = Counter()
    n = 0
    for start in range(0, min(len(items), max_seqs), cfg.batch_seqs):
        idx = list(range(start, min(start + cfg.batch_seqs, len(items), max_seqs)))
        batch = {k: v.to(device) for k, v in make_batch(items, idx, gamma, cfg.anchors_per_seq, gen, handles).items()}
        terms = loss_terms(model, forward_batch(model, batch), batch, cfg.loss)
        for k, v in terms.items():
            sums[k] += float(v)
        n += 1
    model.train()
    return {f"val_{k}": v / n for k, v in sums.items()}


def train(model: DFlashBackbone, items: list[FeatureSequence], out_dir: str | Path, cfg: TrainConfig,
          resume: bool = True, progress: bool = True, log=print, stop_at: int | None = None,
          max_minutes: float | None = None, info: dict | None = None) -> Path:
    """Train `model` on cached-feature sequences; checkpoints and metrics.jsonl go to out_dir.

    `info` (e.g. how many data sequences and which command) is recorded in every checkpoint's config.

    `stop_at` (a step) or `max_minutes` end this run early with a checkpoint; running the same
    command again resumes there and finishes the schedule of `cfg.steps`.
    """
    from accelerate import Accelerator
    out = Path(out_dir)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=None)
    train_items, val_items = split_items(items, cfg.val_fraction, cfg.seed)
    if not train_items:
        raise LabkitError("No training sequences: prepare more data with `python -m labkit prepare-data`.")
    start_step = 0
    last = recover(out / "last")
    trainer_state = None
    if resume and (last / "trainer.pt").exists():
        from safetensors.torch import load_file
        state = load_file(str(last / "model.safetensors"))
        model.load_state_dict(state)
        trainer_state = torch.load(last / "trainer.pt", map_location="cpu", weights_only=True)
        start_step = int(trainer_state["step"])
        log(f"resuming from {last} at step {start_step}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    if trainer_state is not None:
        opt.load_state_dict(trainer_state["optimizer"])
        sched.load_state_dict(trainer_state["scheduler"])
    model, opt, sched = acc.prepare(model, opt, sched)
    core: DFlashBackbone = acc.unwrap_model(model)
    gamma = core.cfg.gamma
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    handles: dict = {}
    metrics_path = out / "metrics.jsonl"
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step",
               disable=not progress or not acc.is_main_process)
    t0 = time.perf_counter()
    seen_anchors = start_step * cfg.batch_seqs * cfg.anchors_per_seq * acc.num_processes
    model.train()
    for step in range(start_step, cfg.steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + acc.process_index)
        idx = torch.randint(len(train_items), (cfg.batch_seqs,), generator=gen).tolist()
        batch = {k: v.to(acc.device) for k, v in
                 make_batch(train_items, idx, gamma, cfg.anchors_per_seq, gen, handles).items()}
        with acc.autocast():
            outputs = forward_batch(model, batch)
        terms = loss_terms(core, outputs, batch, cfg.loss)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            bar.close()
            raise LabkitError(
                f"The training loss became {float(loss.detach())} at step {step}; nothing was saved from this step. "
                f"The last good checkpoint is {last if last.exists() else 'none yet'}: resume from it with a "
                f"lower --lr (now {cfg.lr}) or --mixed-precision no.")
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.grad_clip:
            acc.clip_grad_norm_(params if acc.num_processes == 1 else model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        seen_anchors += cfg.batch_seqs * cfg.anchors_per_seq * acc.num_processes
        row = {k: float(acc.reduce(v.detach(), "mean")) for k, v in terms.items()}
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tau=f"{row['tau_est']:.2f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        done = step + 1
        timed_out = max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes
        halt = done == stop_at or bool(acc.gather(torch.tensor([timed_out], device=acc.device)).any())
        if acc.is_main_process and (done % cfg.eval_every == 0 or done == cfg.steps or halt):
            row.update(evaluate(core, val_items, cfg, gamma, acc.device))
            row.update(step=done, anchors=seen_anchors, seconds=time.perf_counter() - t0,
                       lr=sched.get_last_lr()[0])
            _append_jsonl(metrics_path, row)
            model.train()
        if acc.is_main_process and (done % cfg.save_every == 0 or done == cfg.steps or halt):
            save_training_state(out, core, opt, sched, done, {**(info or {}), "anchors": seen_anchors})
        acc.wait_for_everyone()
        if halt:
            log(f"stopped at step {done} of {cfg.steps}; run the same command again to resume")
            break
    bar.close()
    return out / "last"


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def new_backbone(target, cfg: DFlashConfig, vocab_ids: torch.Tensor | None = None,
                 init_from_target: bool = True) -> DFlashBackbone:
    """A fresh drafter for `target` (DFlash or DSpark by `cfg.kind`), its draft layers copied from the
    target's last layers if asked."""
    emb = target.embedding_rows()
    head = target.model.get_output_embeddings().weight
    model = model_classes(cfg.kind)[0](cfg, emb, head, vocab_ids)
    if init_from_target:
        model.init_from_target(target.model)
    return model.to(target.device)


def warm_start(path: str | Path, kind: str, target) -> DFlashBackbone:
    """A trained drafter to go on training from (`train --init-from`): same kind and target only; its STS
    calibration and run record are dropped, since training moves them."""
    kind_there = read_config(path).get("kind", "dflash")
    if kind_there != kind:
        raise LabkitError(f"--init-from {path} is a {kind_there} drafter, not {kind}: "
                          f"pass a {kind} checkpoint or --drafter {kind_there}.")
    model = load_backbone(path, target, packed=False).train()
    model.cfg.extra = {}
    if hasattr(model.cfg, "calibration"):
        model.cfg.calibration = {}
    return model


def export(checkpoint: str | Path, dest: str | Path, target, dtype: torch.dtype = torch.bfloat16,
           extra: dict | None = None) -> Path:
    """Copy a trained checkpoint to a small shippable one (weights cast to dtype)."""
    model = load_backbone(checkpoint, target)
    info = read_config(checkpoint).get("extra", {})
    path = save_drafter(model, dest, dtype=dtype, extra={**info, **(extra or {})})
    metrics = Path(checkpoint).parent / "metrics.jsonl"
    if metrics.exists():
        shutil.copy(metrics, path / "metrics.jsonl")
    return path


# ----------------------------------------------------------------------------- one training run

DRAFTERS = ("dflash", "dspark", "eagle3")
HEADS = ("markov", "rnn")
ANCHOR_MODES = ("anchor-first", "anchor-masks")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # accelerate's names
FEATURE_DTYPES = ("float32", "bfloat16")

#: the command that runs a job (`accelerate launch -m labkit` runs the same module)
LAUNCHER = ("python", "-m", "labkit")


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """One run of `python -m labkit train`: every option of the command, by the same name, with its
    default (the command line reads its defaults from here). `run_training(job)` runs it; `job.argv()`
    is the command line that runs it.

    Paths are kept as text (`data` a tuple of folders, a single folder allowed); `target_layers` takes
    a tuple of layer numbers or the command line's "2,5". Bad values raise LabkitError at once, in the
    command line's words."""

    target: str | None = None  # HF causal LM id or local path (None: the default target)
    drafter: str = "dflash"  # dflash (parallel block drafter), dspark (+ sequential and confidence heads) or eagle3
    # (autoregressive on fused target features, trained over gamma steps: the training-time test)
    head: str = "markov"  # DSpark's sequential head: markov or rnn
    rank: int = 64  # DSpark's head rank r (0 = no sequential head)
    layers: int = 1  # draft decoder layers
    gamma: int = 8  # block size: tokens drafted per round (eagle3: also the training-time test's horizon)
    draft_vocab: int = 0  # score only the K most frequent response tokens (0 = the whole vocabulary)
    target_layers: tuple[int, ...] | None = None  # target layers read (None: 5 spread; eagle3: low, middle, high)
    anchor_mode: str = "anchor-first"  # anchor + gamma-1 masks (DSpark) or anchor + gamma masks ("anchor-masks")
    init_from_target: bool = True  # draft layers start as the target's last (False: random)
    qk_norm: bool = False  # per-head q/k RMSNorm (Qwen3-shaped layers; needed by `export`)
    frozen_mask: bool = False  # the mask slots keep the target's embedding row (needed by `export`)
    init_from: str | None = None  # go on training a trained drafter of the same kind (a checkpoint folder)
    data: tuple[str, ...] = ("data/train",)  # prepare-data folders
    max_shards: int | None = None  # the first N shards of each data folder (None: all)
    feature_dtype: str = "float32"  # precision of the target when it caches its features
    batch_seqs: int = TrainConfig.batch_seqs  # sequences per step (per process)
    anchors: int = TrainConfig.anchors_per_seq  # random anchor blocks per sequence
    lr: float = TrainConfig.lr  # peak learning rate (warm-up then cosine)
    ce_weight: float = LossWeights.ce  # cross-entropy to the data token (hard labels)
    l1_weight: float = LossWeights.l1  # L1 distance to the target's distribution (soft targets)
    mixed_precision: str = TrainConfig.mixed_precision
    steps: int = TrainConfig.steps  # optimizer steps in the schedule
    save_every: int = TrainConfig.save_every  # steps between checkpoints (and held-out metrics)
    max_minutes: float | None = None  # stop (with a checkpoint) after this long
    seed: int = TrainConfig.seed
    device: str | None = None  # cuda, mps or cpu (None: the best available; accelerate launch sets it)
    out: str  # run folder: checkpoints (last/), metrics.jsonl; resumed if present
    export: str | None = None  # also write a small bf16 copy of the result here

    def __post_init__(self):
        text = lambda v: None if v is None else str(v)  # noqa: E731
        data = [self.data] if isinstance(self.data, (str, Path)) else list(self.data)
        for name, value in (("out", str(self.out)), ("export", text(self.export)), ("init_from", text(self.init_from)),
                            ("target", text(self.target)), ("data", tuple(str(d) for d in data)),
                            ("target_layers", _layer_tuple(self.target_layers))):
            object.__setattr__(self, name, value)
        for name, allowed in (("drafter", DRAFTERS), ("head", HEADS), ("anchor_mode", ANCHOR_MODES),
                              ("mixed_precision", MIXED_PRECISIONS), ("feature_dtype", FEATURE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise LabkitError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")
        if self.rank < 0:
            raise LabkitError(f"--rank must be 0 (no sequential head) or more, got {self.rank}.")
        for name in ("layers", "gamma", "batch_seqs", "anchors", "save_every", "steps", "max_shards"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise LabkitError(f"{_flag(name)} must be a positive integer, got {value}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise LabkitError(f"--lr must be a positive number, got {self.lr}.")
        ce, l1 = self.ce_weight, self.l1_weight
        if not (ce >= 0 and l1 >= 0 and ce + l1 > 0):
            raise LabkitError(f"--ce-weight and --l1-weight must be non-negative and not both 0, got {ce} and {l1} "
                              "(hard labels only: --ce-weight 1 --l1-weight 0).")
        if not self.data:
            raise LabkitError("No training data folder given: pass --data FOLDER [FOLDER ...].")
        if self.drafter == "eagle3" and (self.anchor_mode != "anchor-first" or self.frozen_mask):
            raise LabkitError("--anchor-mode and --frozen-mask shape a block drafter's mask slots, and an eagle3 "
                              "drafter has none: drop them (or train --drafter dflash|dspark).")

    def argv(self) -> list[str]:
        """The arguments of `python -m labkit train` that make this job: `train`, then every option that
        differs from its default (`--out` always)."""
        return ["train", *train_options({f.name: getattr(self, f.name) for f in fields(self)
                                         if f.name == "out" or getattr(self, f.name) != f.default})]

    def command_line(self) -> str:
        """The shell line that runs this job (what its checkpoints record as `extra.train_command`)."""
        return shlex.join([*LAUNCHER, *self.argv()])

    def train_config(self) -> TrainConfig:
        """The training loop's settings (`train`)."""
        return TrainConfig(steps=self.steps, batch_seqs=self.batch_seqs, anchors_per_seq=self.anchors, lr=self.lr,
                           save_every=self.save_every, eval_every=self.save_every, seed=self.seed,
                           mixed_precision=self.mixed_precision,
                           loss=LossWeights(ce=self.ce_weight, l1=self.l1_weight))


def _flag(name: str) -> str:
    """A TrainJob field's option on the command line."""
    return "--" + name.replace("_", "-")


def train_options(values: dict) -> list[str]:
    """TrainJob fields as `train` options, e.g. {"layers": 2, "init_from_target": False} ->
    ["--layers", "2", "--no-init-from-target"] (None, and False for a flag, give no option)."""
    words: list[str] = []
    for name, value in values.items():
        if name == "init_from_target":
            words += [] if value else ["--no-init-from-target"]
        elif value is None or value is False:
            continue
        elif value is True:
            words.append(_flag(name))
        elif name == "data":
            words += [_flag(name), *([value] if isinstance(value, (str, Path)) else value)]
        elif name == "target_layers":
            words += [_flag(name), value if isinstance(value, str) else ",".join(map(str, value))]
        else:
            words += [_flag(name), str(value)]
    return [str(w) for w in words]


def _layer_tuple(layers) -> tuple[int, ...] | None:
    """Target layers as a tuple of ints, from a sequence or the command line's comma-separated text."""
    if layers is None or layers == "":
        return None
    if isinstance(layers, str):
        try:
            return tuple(int(x) for x in layers.split(","))
        except ValueError:
            raise LabkitError(f"--target-layers takes comma-separated integers, got {layers!r}.") from None
    return tuple(int(x) for x in layers)


#: the shipped drafters' recipe (shape, loss and optimizer); scripts/recipe_ab.py's base arm, and what
#: the presets "dspark" and "dflash" train on the data, for the steps, they were shipped with
SHIPPED_RECIPE = dict(drafter="dspark", head="markov", rank=256, layers=2, gamma=8, draft_vocab=8192, batch_seqs=4,
                      anchors=64, lr=1e-3, mixed_precision="bf16", save_every=150)
_SHIPPED_RUN = dict(SHIPPED_RECIPE, data=("data/train-v2", "data/train"), max_shards=156, feature_dtype="bfloat16",
                    steps=4032)

#: named jobs, as TrainJob fields: "tiny" (the tests' settings, for a model of 6 or more layers: give
#: target, data and out), and the train commands the shipped drafters record in their config.json
#: (`extra.train_command`, run from the repository root; they write data/drafters/<name>)
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(steps=6, save_every=3, batch_seqs=2, anchors=4, gamma=3, target_layers=(2, 5), draft_vocab=64),
    "dspark": dict(_SHIPPED_RUN, out="build/ab-fullset/base", export="data/drafters/dspark"),
    "dflash": dict(_SHIPPED_RUN, drafter="dflash", out="build/ab-fullset/dflash", export="data/drafters/dflash"),
    # the serving baseline (Sec. 5.3): a block-1 DFlash reading the target's features is an MTP module
    # drafting one token; the shipped recipe, data and steps otherwise
    "mtp1": dict(_SHIPPED_RUN, drafter="dflash", gamma=1, out="build/ab-fullset/mtp1", export="data/drafters/mtp1"),
}


def train_preset(name: str, **overrides) -> TrainJob:
    """The TrainJob a preset names (TRAIN_PRESETS), with `overrides` (TrainJob fields) on top."""
    if name not in TRAIN_PRESETS:
        raise LabkitError(f"No training preset {name!r}: use one of {', '.join(TRAIN_PRESETS)}.")
    names = {f.name for f in fields(TrainJob)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise LabkitError(f"TrainJob has no field {', '.join(unknown)}: use {', '.join(sorted(names))}.")
    chosen = {**TRAIN_PRESETS[name], **overrides}
    if "out" not in chosen:
        raise LabkitError(f"The {name} preset names no run folder: pass out=FOLDER.")
    return TrainJob(**chosen)


def several_cpu_processes() -> bool:
    """Whether this process is one of several launched (`accelerate launch --multi_gpu --num_processes N`,
    torchrun) on a machine with no GPU: accelerate then needs cpu=True to join them with gloo, or every
    process trains alone on the whole job (and all of them write the same checkpoints)."""
    import os
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "1", "true", "yes")
    return launched and not torch.cuda.is_available()


def run_training(job: TrainJob, *, log=print, command: str | None = None) -> Path:
    """Run a training job (`python -m labkit train`): features -> backbone (new, warm-started, or the run's
    last checkpoint) -> train -> export; returns the last checkpoint's folder.

    `command` is the line recorded in the checkpoint (`extra.train_command`): the command line passes the
    user's own; by default the job's (`job.command_line()`)."""
    if not isinstance(job, TrainJob):
        raise LabkitError(f"run_training takes a TrainJob (labkit.pipeline.train), got {type(job).__name__}.")
    from accelerate import PartialState
    # under `accelerate launch`: this process's rank and device (shared with train's Accelerator)
    state = PartialState(cpu=several_cpu_processes())
    device = job.device or (state.device if state.num_processes > 1 else None)
    target = load_target(job.target, device)
    for p in target.model.parameters():
        p.requires_grad_(False)
    out = Path(job.out)
    last = recover(out / "last")  # a crash mid-save leaves last.old: resume from it
    warm = None
    if (last / "trainer.pt").exists():
        raw = read_config(last)
        if raw.get("kind", "dflash") != job.drafter:
            raise LabkitError(f"{out} holds a {raw.get('kind')} run, not {job.drafter}: pick another --out.")
        cfg = model_classes(job.drafter)[1].from_dict(raw)
        check_compatible(cfg, target, str(last))
        from safetensors.torch import load_file
        vocab_ids = load_file(str(last / "model.safetensors"))["vocab_ids"]
    elif job.init_from:
        warm = warm_start(job.init_from, job.drafter, target)
        cfg, vocab_ids = warm.cfg, warm.vocab_ids
        log(f"warm start from {job.init_from}: its shape ({cfg.n_layers} layer(s), gamma {cfg.gamma}, "
            f"draft vocabulary {cfg.draft_vocab}) replaces --layers, --gamma and --draft-vocab")
    else:
        overrides = dict(gamma=job.gamma, n_layers=job.layers, draft_vocab=job.draft_vocab, qk_norm=job.qk_norm)
        if job.drafter != "eagle3":  # the block drafters' mask slots
            overrides.update(anchor_predicts=job.anchor_mode == "anchor-first", train_mask=not job.frozen_mask)
        if job.drafter == "dspark":
            overrides.update(head=job.head, rank=job.rank)
        if job.target_layers:
            overrides["target_layers"] = job.target_layers
        cfg = model_classes(job.drafter)[1].for_target(target, **overrides)
        vocab_ids = None
    feature_target = target if job.feature_dtype == "float32" else load_target(job.target, device, job.feature_dtype)
    with state.main_process_first():  # one process computes the feature cache, the others then read it
        items = training_items(feature_target, list(job.data), cfg.target_layers, max_shards=job.max_shards)
    del feature_target
    if cfg.draft_vocab and vocab_ids is None:
        vocab_ids = frequent_tokens(items, cfg.draft_vocab, set(target.eos_token_ids))
        if len(vocab_ids) < cfg.draft_vocab:
            log(f"the training responses use only {len(vocab_ids)} distinct tokens: draft vocabulary cut to that")
            cfg.draft_vocab = len(vocab_ids)
    n_tokens = sum(len(it.seq.ids) - it.seq.prompt_len for it in items)
    if warm is not None:
        model = warm
    else:
        torch.manual_seed(job.seed)  # the random initialisation too: the same command gives the same weights
        model = new_backbone(target, cfg, vocab_ids, init_from_target=job.init_from_target)
    if cfg.draft_vocab:
        log(f"draft vocabulary: {cfg.draft_vocab} tokens cover {vocab_coverage(items, model.vocab_ids):.2%} "
            "of the training responses")
    log(f"{len(items)} sequences, {n_tokens} response tokens; drafter {param_count(model) / 1e6:.1f} M "
        f"trainable parameters, {cfg.n_layers} layer(s), gamma {cfg.gamma}, target layers {cfg.target_layers}"
        + (f", {cfg.head} head at rank {cfg.rank} + confidence head" if cfg.kind == "dspark" else ""))
    info = {"data_sequences": len(items), "data_response_tokens": n_tokens, "feature_dtype": job.feature_dtype,
            # per folder, so that held-out prompts can be taken from the tail of any of them
            "data_folders": {d: shard_sequence_count(d, job.max_shards) for d in job.data},
            "init_from": job.init_from or ("target" if job.init_from_target else "random"),
            "train_command": command or job.command_line()}
    path = train(model, items, out, job.train_config(), log=log, max_minutes=job.max_minutes, info=info)
    if job.export:
        dest = export(path, job.export, target, extra=info)
        log(f"exported {dest}")
    return path
