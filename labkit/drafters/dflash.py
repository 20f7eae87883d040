"""DFlash: a parallel block drafter conditioned on the target's hidden states (paper Sec. 2.2, Eq. 2-3).

Context features H_ctx = RMSNorm(W_c [H(l_1); ...; H(l_m)]) come from m chosen target layers (Eq. 2).
Every draft layer projects them with its own k/v weights and puts them in front of the block's keys
and values, so block positions attend to all context before the anchor and bidirectionally to each
other, never to anything later (Eq. 3). The block is the anchor (the last token the target produced)
followed by mask tokens; one forward yields gamma logits. The target's embedding and LM head are
shared and frozen (the LM head may be restricted to the most frequent rows, `draft_vocab`: tokens
outside get draft probability 0, which verification handles exactly).

At decode time the projected context keys/values live in a per-request `ContextCache` (the request's
`memo`): a round costs one drafter forward over the block plus the projection of the tokens just accepted.

`DFlashBackbone` is the network; `DFlashDrafter` adapts it to the decoding loop's Drafter protocol.
DSpark (`labkit.drafters.dspark`) subclasses both, adding its heads to the states `forward` returns;
checkpoints of either kind are read and written by `labkit.drafters.checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from labkit.drafters.base import Drafter, DraftRequest, Proposal, vocab_proposal
from labkit.core.errors import LabkitError
from labkit.model.packed import PackedLinear, pack_linears
from labkit.core.sampling import SamplingParams, logits_to_probs, sample


def default_layers(num_layers: int, m: int = 5) -> tuple[int, ...]:
    """m target layers spread over the depth, from layer 1 to two before the last (as in the reference)."""
    m = max(1, min(m, num_layers))
    hi = max(1, num_layers - 2)
    if m == 1:
        return (hi,)
    return tuple(sorted({round(1 + i * (hi - 1) / (m - 1)) for i in range(m)}))


@dataclass
class DraftShape:
    """What every feature-reading drafter's config shares: the target it reads, its own layers' shape,
    and the draft vocabulary. `for_target` fills the target-dependent fields (plus the subclass's
    `_target_defaults`), `validate` checks what every drafter needs."""

    target_name: str = ""
    target_vocab_size: int = 0
    target_hidden_size: int = 0
    target_num_layers: int = 0
    target_layers: tuple[int, ...] = ()
    n_layers: int = 1
    gamma: int = 8
    hidden_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    #: rows of the target's LM head the drafter scores (the most frequent tokens); 0 = all
    draft_vocab: int = 0
    #: per-head RMSNorm of queries and keys (context and block keys) before RoPE, as Qwen3 and DeepSpec's
    #: drafters do; False (checkpoints written before the field) = plain Llama-shaped attention
    qk_norm: bool = False
    kind: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def _target_defaults(cls, target) -> dict:
        """The subclass's own target-dependent defaults (e.g. which target layers it reads)."""
        return {}

    @classmethod
    def for_target(cls, target, **overrides):
        c = target.config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
        cfg = cls(target_name=target.name, target_vocab_size=target.vocab_size,
                  target_hidden_size=target.hidden_size, target_num_layers=target.num_layers,
                  hidden_size=target.hidden_size,
                  num_heads=heads, num_kv_heads=getattr(c, "num_key_value_heads", heads) or heads,
                  head_dim=getattr(c, "head_dim", None) or target.hidden_size // heads,
                  intermediate_size=getattr(c, "intermediate_size", 4 * target.hidden_size),
                  rope_theta=float(theta), rms_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
                  **cls._target_defaults(target))
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise LabkitError(f"{cls.__name__} has no field {key!r}.")
            setattr(cfg, key, tuple(value) if key == "target_layers" else value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.gamma < 1 or self.n_layers < 1:
            raise LabkitError(f"gamma and n_layers must be at least 1, got gamma={self.gamma}, "
                              f"n_layers={self.n_layers}.")
        if not self.target_layers or not all(1 <= i <= self.target_num_layers for i in self.target_layers):
            raise LabkitError(f"target_layers {self.target_layers} must lie in 1..{self.target_num_layers} "
                              "(the target's decoder layers).")
        if self.num_heads % self.num_kv_heads:
            raise LabkitError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}.")
        if not 0 <= self.draft_vocab <= self.target_vocab_size:
            raise LabkitError(f"draft_vocab must lie in 0..{self.target_vocab_size}, got {self.draft_vocab}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        d["target_layers"] = tuple(d["target_layers"])
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class DFlashConfig(DraftShape):
    """Shape of a DFlash drafter: `DraftShape` plus its block's convention and mask slots."""

    #: True: anchor + gamma-1 masks, slot j predicts anchor + j + 1 (DSpark). False: anchor + gamma
    #: masks, the anchor slot's output unused (original DFlash). Checkpoints record which.
    anchor_predicts: bool = True
    mask_init_token: int = 0
    #: True: the mask slots' embedding is trained (from row `mask_init_token`); False: it stays that
    #: frozen target row, as DeepSpec's mask token does (what `labkit export --format deepspec` needs)
    train_mask: bool = True
    kind: str = "dflash"

    @property
    def n_slots(self) -> int:
        return self.gamma if self.anchor_predicts else self.gamma + 1

    @classmethod
    def _target_defaults(cls, target) -> dict:
        return {"target_layers": default_layers(target.num_layers), "mask_init_token": target.pad_token_id}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half convention, as Llama) of x (B, h, T, d) at pos (B, T)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[:, None, :, None] * inv  # (B, 1, T, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class DraftLayer(nn.Module):
    """A Llama-shaped decoder layer whose keys/values are [context ; block] (Eq. 3).

    With `cfg.qk_norm` it is Qwen3-shaped: each query head and each key head (of the context and of the
    block alike) goes through its own RMSNorm over head_dim before RoPE.
    """

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(h, cfg.rms_eps)
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_eps)
            self.k_norm = RMSNorm(d, cfg.rms_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.cfg.head_dim).transpose(1, 2)

    def _queries(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(h), self.cfg.num_heads)
        return rope(self.q_norm(q) if self.cfg.qk_norm else q, pos, self.cfg.rope_theta)

    def _keys(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        k = self._heads(self.k_proj(h), self.cfg.num_kv_heads)
        return rope(self.k_norm(k) if self.cfg.qk_norm else k, pos, self.cfg.rope_theta)

    def context_kv(self, ctx: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of normalised context features ctx (B, C, H) at positions pos (B, C)."""
        return self._keys(ctx, pos), self._heads(self.v_proj(ctx), self.cfg.num_kv_heads)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, Q, H) block states; mask (B, Q, C + Q) True = may attend, None = attend everything."""
        cfg = self.cfg
        h = self.input_layernorm(x)
        q, k = self._queries(h, pos), self._keys(h, pos)
        v = self._heads(self.v_proj(h), cfg.num_kv_heads)
        k, v = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
        # grouped-query attention without copying each key/value head num_heads // num_kv_heads times
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                              enable_gqa=cfg.num_heads != cfg.num_kv_heads)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def block_attention_mask(anchor_pos: torch.Tensor, n_ctx: int, n_slots: int) -> torch.Tensor:
    """Eq. 3 for A blocks packed after one context: (B, A*S, N + A*S), True where attention is allowed.

    A block's slots see context positions strictly before their anchor (the anchor itself enters as
    the block's first slot) and every slot of their own block, nothing of other blocks.
    """
    b, a = anchor_pos.shape
    dev = anchor_pos.device
    ctx = torch.arange(n_ctx, device=dev)[None, None, :] < anchor_pos[:, :, None]  # (B, A, N)
    ctx = ctx.repeat_interleave(n_slots, 1)  # (B, A*S, N)
    blk = torch.block_diag(*[torch.ones(n_slots, n_slots, dtype=torch.bool, device=dev)] * a)
    return torch.cat([ctx, blk.expand(b, -1, -1)], -1)


class DFlashBackbone(nn.Module):
    """The trainable drafter; the target's embedding and LM head are frozen buffers, never saved."""

    def __init__(self, cfg: DFlashConfig, embed: torch.Tensor, lm_head: torch.Tensor,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        m = len(cfg.target_layers)
        self.fc = nn.Linear(m * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.ctx_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mask_embedding = nn.Parameter(embed[cfg.mask_init_token].detach().clone().float(),
                                           requires_grad=cfg.train_mask)
        self.register_buffer("embed", embed.detach(), persistent=False)
        if vocab_ids is None:
            n = cfg.draft_vocab or cfg.target_vocab_size
            vocab_ids = torch.arange(n)
        if cfg.draft_vocab and len(vocab_ids) != cfg.draft_vocab:
            raise LabkitError(f"vocab_ids has {len(vocab_ids)} rows but the config says draft_vocab={cfg.draft_vocab}.")
        self.register_buffer("vocab_ids", vocab_ids.long().clone())  # saved: which LM-head rows are used
        self.register_buffer("head", lm_head.detach()[self.vocab_ids].clone(), persistent=False)
        self.packed_head: PackedLinear | None = None  # set by pack_for_inference

    @property
    def full_vocab(self) -> bool:
        return self.cfg.draft_vocab in (0, self.cfg.target_vocab_size)

    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        """Eq. 2: (..., m * H_target) concatenated layer outputs -> normalised context features."""
        return self.ctx_norm(self.fc(hidden.to(self.fc.weight.dtype)))

    def block_inputs(self, anchors: torch.Tensor) -> torch.Tensor:
        """(B,) anchor ids -> (B, n_slots, H): the anchor's embedding then mask embeddings."""
        dtype = self.fc.weight.dtype
        first = self.embed[anchors].to(dtype)[:, None]
        masks = self.mask_embedding.to(dtype).expand(anchors.shape[0], self.cfg.n_slots - 1, -1)
        return torch.cat([first, masks], 1)

    def block_hidden(self, x: torch.Tensor, pos: torch.Tensor, ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],
                     mask: torch.Tensor | None) -> torch.Tensor:
        """Run the draft layers over block slots x (B, Q, H); return their final-normed states."""
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, pos, k, v, mask)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary (its columns index `vocab_ids`)."""
        if self.packed_head is not None and h.dtype == self.head.dtype:
            return self.packed_head(h)
        return h @ self.head.to(h.dtype).T

    def pack_for_inference(self) -> int:
        """Run the linear layers and the draft LM head with oneDNN pre-packed weights on the CPU
        (labkit.model.packed; a block of 8 rows then costs about one row's product). Inference only: the
        packed copies do not follow later weight updates. Returns how many products were packed."""
        n = pack_linears(self)
        if n:
            self.packed_head = PackedLinear(self.head)
        return n + bool(n)

    def context_kv(self, ctx: torch.Tensor, pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.context_kv(ctx, pos) for layer in self.layers]

    def forward(self, feats: torch.Tensor, anchor_pos: torch.Tensor, anchor_ids: torch.Tensor,
                targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training forward: many blocks per sequence at once.

        feats (B, N, m*H) the target's layer outputs for every position; anchor_pos / anchor_ids (B, A)
        where each block starts; targets (B, A, gamma) the block's true tokens (unused here: DSpark's
        heads read them as the previous tokens, teacher-forced). Returns {"h": the normed states of each
        block's gamma predicting slots (B, A, gamma, H), "logits": their draft logits (B, A, gamma, V_draft)}:
        slot j of block a predicts the token at anchor_pos[a] + j + 1. Everything trainable runs inside
        forward, so a DDP-wrapped model sees every parameter used.
        """
        h = self.block_states(feats, anchor_pos, anchor_ids)
        return {"h": h, "logits": self.logits(h)}

    def block_states(self, feats: torch.Tensor, anchor_pos: torch.Tensor, anchor_ids: torch.Tensor) -> torch.Tensor:
        """The (B, A, gamma, H) normed states of every block's predicting slots (see `forward`)."""
        b, n, _ = feats.shape
        a, s = anchor_pos.shape[1], self.cfg.n_slots
        ctx = self.context(feats)
        ctx_kv = self.context_kv(ctx, torch.arange(n, device=feats.device).expand(b, n))
        x = self.block_inputs(anchor_ids.reshape(-1)).view(b, a * s, -1)
        pos = (anchor_pos[:, :, None] + torch.arange(s, device=feats.device)).view(b, a * s)
        h = self.block_hidden(x, pos, ctx_kv, block_attention_mask(anchor_pos, n, s))
        return h.view(b, a, s, -1)[:, :, s - self.cfg.gamma:]

    def init_from_target(self, target_model) -> int:
        """Copy the target's last decoder layers into the draft layers; return how many were copied.

        A target layer is copied only where it computes what a draft layer computes: its parameters,
        named as a draft layer names them, are exactly the draft layer's (Llama into a plain layer, Qwen3
        with its q/k norms into a `qk_norm` one), with equal shapes, and its MLP activation is silu. A
        layer with anything more or else (Gemma's pre/post-feedforward norms and (1 + w) scaling, biases,
        a gelu MLP) is left as initialised: copying it would give a different function, not a head start.
        """
        layers = getattr(getattr(target_model, "model", target_model), "layers", None)
        config = getattr(target_model, "config", None)
        if layers is None or _activation(config) != "silu":
            return 0
        copied = 0
        for mine, theirs in zip(self.layers, list(layers)[-len(self.layers):]):
            src = _as_draft_layer_params(theirs)
            dst = dict(mine.named_parameters())
            if set(src) == set(dst) and all(src[k].shape == p.shape for k, p in dst.items()):
                with torch.no_grad():
                    for k, p in dst.items():
                        p.copy_(src[k])
                copied += 1
        return copied


def _activation(config) -> str:
    """The MLP activation a Hugging Face config names ("silu" where it names none)."""
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    return str(getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None) or "silu")


def _as_draft_layer_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A target decoder layer's parameters under a DraftLayer's names (the self_attn. / mlp. prefixes dropped)."""
    out = {}
    for name, p in layer.named_parameters():
        for prefix in ("self_attn.", "mlp."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = p
    return out


# ----------------------------------------------------------------------------- decode-time adapter


@dataclass
class ContextCache:
    """Per-request projected context keys/values, one (k, v) per draft layer; length = positions seen."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int

    def extend(self, new: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        self.kv = [(torch.cat([k, nk], 2), torch.cat([v, nv], 2)) for (k, v), (nk, nv) in zip(self.kv, new)]
        self.length += n

    def crop(self, length: int) -> None:
        self.kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]
        self.length = length


class DFlashDrafter(Drafter):
    """DFlash behind the Drafter protocol: start/observe feed the request's context cache (its `memo`),
    propose drafts a block."""

    name = "dflash"

    def __init__(self, backbone: DFlashBackbone, gamma: int | None = None, device=None, dtype=None,
                 fit_block: bool = True):
        self.backbone = backbone.eval()
        self.fit_block = fit_block
        if device is not None or dtype is not None:
            self.backbone.to(device=device, dtype=dtype)
        self.cfg = backbone.cfg
        self.gamma = min(gamma or self.cfg.gamma, self.cfg.gamma)
        self.vocab_size = self.cfg.target_vocab_size
        self.hidden_layers = tuple(self.cfg.target_layers)

    @property
    def device(self) -> torch.device:
        return self.backbone.fc.weight.device

    def draft_vocab(self) -> torch.Tensor:
        """The target ids its LM head scores (all of them unless the vocabulary was cut)."""
        return self.backbone.vocab_ids

    def _features(self, hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat(hidden, -1).to(self.device)  # m layers of (T, H) -> (T, m * H)

    @torch.no_grad()
    def _append(self, request: DraftRequest, feats: torch.Tensor) -> None:
        cache: ContextCache = request.memo
        start = cache.length
        pos = torch.arange(start, start + feats.shape[0], device=self.device)[None]
        cache.extend(self.backbone.context_kv(self.backbone.context(feats[None]), pos), feats.shape[0])

    @torch.no_grad()
    def start(self, request: DraftRequest, hidden) -> None:
        if hidden is None:
            raise LabkitError("DFlash needs the target's hidden states; the decoding loop did not pass them.")
        empty = [(torch.empty(1, self.cfg.num_kv_heads, 0, self.cfg.head_dim, device=self.device,
                              dtype=self.backbone.fc.weight.dtype),) * 2 for _ in self.backbone.layers]
        request.memo = ContextCache(kv=empty, length=0)
        self._append(request, self._features(hidden))

    def slots(self, k: int | None = None) -> int:
        """Block slots a forward runs to draft k tokens: all of them, or with `fit_block` only those up to
        the k-th draft's. The block attends both ways, so a cut block drafts (slightly) other tokens than
        the whole one; its proposals still carry the probabilities they were drawn from, so verification
        stays lossless. What it buys: a request the policy caps at one token costs one slot, not gamma."""
        first = self.cfg.n_slots - self.cfg.gamma  # the slot that predicts anchor + 1
        if not self.fit_block or k is None:
            return self.cfg.n_slots  # the block it was trained on, even where its gamma is set lower
        return first + max(1, min(k, self.gamma))

    @torch.no_grad()
    def draft_hidden(self, request: DraftRequest, k: int | None = None) -> torch.Tensor:
        """Normed states (gamma, H) of the block after the anchor request.ids[-1], from the cached context
        (with `fit_block` and a cap k: the first k states of a block cut after them)."""
        cache: ContextCache = request.memo
        anchor = torch.tensor([request.ids[-1]], device=self.device)
        s = self.slots(k)
        x = self.backbone.block_inputs(anchor)[:, :s]
        pos = torch.arange(cache.length, cache.length + s, device=self.device)[None]
        h = self.backbone.block_hidden(x, pos, cache.kv, None)
        first = self.cfg.n_slots - self.cfg.gamma
        return h[0, first: first + self.gamma]

    @torch.no_grad()
    def draft_hidden_many(self, requests: list[DraftRequest], k: int | None = None) -> torch.Tensor:
        """`draft_hidden` for R requests in one forward: (R, gamma, H), or (R, k, H) for a block cut after
        cap k (`slots`). Each request's context keys and
        values are padded to the longest and masked, so a row reads only its own context (its keys
        carry their own positions already) and its own block."""
        caches: list[ContextCache] = [r.memo for r in requests]
        longest = max(c.length for c in caches)
        kv = [tuple(torch.cat([F.pad(c.kv[i][j], (0, 0, 0, longest - c.length)) for c in caches]) for j in (0, 1))
              for i in range(len(self.backbone.layers))]
        s = self.slots(k)
        lengths = torch.tensor([c.length for c in caches], device=self.device)
        mask = None  # contexts of one length need no padding, hence no mask
        if any(c.length != longest for c in caches):
            mask = torch.cat([torch.arange(longest, device=self.device)[None] < lengths[:, None],
                              torch.ones(len(caches), s, dtype=torch.bool, device=self.device)], 1)  # (R, C + S)
            mask = mask[:, None].expand(-1, s, -1)
        anchors = torch.tensor([r.ids[-1] for r in requests], device=self.device)
        x = self.backbone.block_inputs(anchors)[:, :s]
        pos = lengths[:, None] + torch.arange(s, device=self.device)[None]
        h = self.backbone.block_hidden(x, pos, kv, mask)
        first = self.cfg.n_slots - self.cfg.gamma  # the slot that predicts anchor + 1
        return h[:, first: first + self.gamma]

    @torch.no_grad()
    def propose_many(self, requests: list[DraftRequest], max_tokens: list[int]) -> list[Proposal]:
        """One backbone forward for all requests (`draft_hidden_many`), one LM-head matmul, then each
        request's block drawn with its own settings and generator (`blocks_from_states`)."""
        if len(requests) == 1:  # the batch's bookkeeping (padding, stacking) cost 5-7% at R = 1: measured
            return [self.propose(requests[0], max_tokens[0])]
        ks = [min(self.gamma, k) for k in max_tokens]
        out = [Proposal.empty(self.vocab_size, self.device) for _ in requests]
        # one forward for the whole batch, or with `fit_block` one per block length, each cut to its cap
        groups = sorted({self.slots(k) for k in ks if k > 0})
        for s in groups:
            live = [i for i, k in enumerate(ks) if k > 0 and self.slots(k) == s]
            if len(live) == 1:
                out[live[0]] = self.propose(requests[live[0]], ks[live[0]])
                continue
            h = self.draft_hidden_many([requests[i] for i in live], max(ks[i] for i in live))
            for i, prop in zip(live, self.blocks_from_states(h, [requests[i] for i in live], [ks[i] for i in live])):
                out[i] = prop
        return out

    def block_after(self, h: torch.Tensor, request: DraftRequest, forced: list[int]) -> Proposal:
        """The drafts for the slots after a prefix `forced` that another drafter fixed (the hybrid's
        copied tokens): DFlash's slots ignore earlier drafts, so they are drawn as usual."""
        return self.block_from_states(h[len(forced):], request)

    def blocks_from_states(self, h: torch.Tensor, requests: list[DraftRequest], ks: list[int]) -> list[Proposal]:
        """Draw each request's block from its slots' states h (R, gamma, H), request r's first ks[r]
        positions: all positions at once (DFlash); DSpark overrides it."""
        logits = self.backbone.logits(h[:, :max(ks)]).float()  # (R, k_max, V_draft): one matmul, drafted slots only
        return [self.sample_block(logits[r, :k], req.params, req.generator)
                for r, (req, k) in enumerate(zip(requests, ks))]

    @torch.no_grad()
    def draft_logits(self, request: DraftRequest) -> torch.Tensor:
        """Logits (gamma, V_draft) of the whole block in one forward (Eq. 3)."""
        return self.backbone.logits(self.draft_hidden(request)).float()

    @torch.no_grad()
    def propose(self, request: DraftRequest, max_tokens: int) -> Proposal:
        k = min(self.gamma, max_tokens)
        if k <= 0:
            return Proposal.empty(self.vocab_size, self.device)
        return self.block_from_states(self.draft_hidden(request, k)[:k], request)

    def block_from_states(self, h: torch.Tensor, request: DraftRequest) -> Proposal:
        """Draw the block from the slots' states: all positions at once (DFlash); DSpark overrides it."""
        return self.sample_block(self.backbone.logits(h).float(), request.params, request.generator)

    def sample_block(self, logits: torch.Tensor, params: SamplingParams, generator) -> Proposal:
        """Sample each position from its own draft distribution; return the exact probabilities used."""
        p_small = logits_to_probs(logits, params)  # (k, V_draft)
        # one draw per row in one call; greedy rows are one-hot, so their argmax is the draw
        local = p_small.argmax(-1) if generator is None or params.greedy else sample(p_small, generator)
        return self.to_proposal(local, p_small)

    def to_proposal(self, local: torch.Tensor, p_small: torch.Tensor, **extra) -> Proposal:
        """Draft-vocabulary columns and probabilities -> target token ids and (k, V) probability rows."""
        return vocab_proposal(self.backbone.vocab_ids, self.vocab_size, local, p_small, self.backbone.full_vocab,
                              **extra)

    @torch.no_grad()
    def observe(self, request: DraftRequest, n_accepted: int, hidden) -> None:
        # the verify forward saw [anchor, d_1..d_k]; the target keeps anchor + d_1..d_n in its cache
        self._append(request, self._features(hidden)[: n_accepted + 1])

    @torch.no_grad()
    def observe_many(self, requests: list[DraftRequest], n_accepted: list[int], hidden) -> None:
        """`observe` for R requests: their kept positions concatenated into one sequence through the
        context projection and the draft layers' key/value projections (both position-wise, each token at
        its own request's position), then split back into each request's cache."""
        if len(requests) < 2:
            return super().observe_many(requests, n_accepted, hidden)
        feats = [self._features(h)[: n + 1] for h, n in zip(hidden, n_accepted)]
        pos = torch.cat([torch.arange(r.memo.length, r.memo.length + f.shape[0], device=self.device)
                         for r, f in zip(requests, feats)])[None]
        kv = self.backbone.context_kv(self.backbone.context(torch.cat(feats)[None]), pos)
        sizes = [f.shape[0] for f in feats]
        per_layer = [list(zip(k.split(sizes, 2), v.split(sizes, 2))) for k, v in kv]  # [layer][request]
        for i, (request, n) in enumerate(zip(requests, sizes)):
            request.memo.extend([layer[i] for layer in per_layer], n)


__all__ = ["DraftShape", "DFlashConfig", "DFlashBackbone", "DFlashDrafter", "ContextCache", "default_layers"]
