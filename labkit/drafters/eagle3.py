"""Eagle3: an autoregressive drafter on fused target features (the paper's autoregressive baseline, Sec. 3.1,
Fig. 2 and Table 1; docs/method.md, "Eagle3: the autoregressive baseline").

Slot t of the drafter's own sequence reads the target at position t and the token after it:

    g_t  = fc([H(l_1); ...; H(l_m)]_t)                       m target layers fused into one width H
    u_t  = [input_layernorm(E[x_{t+1}]) ; hidden_norm(g_t)]  2H wide
    o_t  = g_t + o_proj(attn(q, k, v from u_t, causal over earlier slots)), then + MLP (a decoder layer)
    p_d(x_{t+2}) = softmax(head(norm(o_t)))

Drafting is autoregressive: the first draft comes from the last slot whose token the target has
produced; every later step j feeds the drafter's own previous output o in place of the target feature
g (the target has not seen the draft yet), at the next position, attending to the slots with target
features and to the chain's own earlier steps. Training unrolls the same chain over `gamma` steps
("training-time test", TTT), each step fed its own previous states, with a loss at every step, so what
it learns is what inference runs. The layers read default to an early, a middle and a late one (the
layers EAGLE-3 reads); any list works.

Each step's distribution is an exact softmax (after the request's temperature / top-p), drawn from and
handed to verification as it is, so decoding stays lossless. The LM head scores the draft vocabulary:
the target's own rows, frozen (all of them, or the most frequent K as DFlash's `draft_vocab`), so the
training loss reads the target's distribution through the same rows (`labkit.pipeline.train.loss_terms`).

At decode time the request's `memo` (`Eagle3Cache`) holds every draft layer's keys and values of the
committed slots (target features only) and the output at the last one. The drafts' own keys live in
the proposal's loop and never enter the cache, so `observe` only appends the verified slots (nothing
rejected is ever stored, nothing needs cropping) and `propose` has no side effect on the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labkit.core.errors import LabkitError
from labkit.core.sampling import logits_to_probs, sample
from labkit.drafters.base import Drafter, DraftRequest, Proposal, vocab_proposal
from labkit.drafters.dflash import DraftShape, RMSNorm, rope
from labkit.model.packed import PackedLinear, pack_linears


def eagle3_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's three target layers, low / middle / high: Hugging Face hidden_states[2], [L // 2] and
    [L - 3] (the inputs of 0-based decoder layers 2, L // 2 and L - 3), kept inside 1..L and distinct."""
    picks = (min(2, num_layers), max(1, num_layers // 2), max(1, num_layers - 3))
    return tuple(sorted(set(picks)))


@dataclass
class Eagle3Config(DraftShape):
    """Shape of an Eagle3 drafter (`DraftShape`): `target_layers` are the Hugging Face hidden_states
    indices fc fuses (3 by default, low / middle / high); each of the `n_layers` draft decoder layers reads
    [embedding ; state] (2H), as DeepSpec's Eagle3 layers do; `gamma` is the drafting horizon, tokens per
    proposal and the steps training unrolls (TTT); `qk_norm` is needed by the export."""

    kind: str = "eagle3"

    @classmethod
    def _target_defaults(cls, target) -> dict:
        return {"target_layers": eagle3_layers(target.num_layers)}

    def validate(self) -> None:
        super().validate()
        if self.hidden_size != self.target_hidden_size:
            raise LabkitError(f"An Eagle3 drafter has the target's width ({self.target_hidden_size}): its input "
                              f"concatenates the target's token embedding, got hidden_size {self.hidden_size}.")


# ----------------------------------------------------------------------------- the network


def attention(q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, ctx_mask: torch.Tensor | None,
              chain_k: torch.Tensor | None = None, chain_v: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of queries q (B, h, Q, d) over shared context keys/values (B, h_kv, C, d), where
    ctx_mask (B, Q, C) says which each query may read (None: all), plus, per query, its own chain of
    keys/values chain_k / chain_v (B, h_kv, Q, J, d) (the drafter's earlier steps from the same root),
    which only that query reads. Returns (B, h, Q, d)."""
    rep = q.shape[1] // ctx_k.shape[1]
    if rep > 1:
        ctx_k, ctx_v = ctx_k.repeat_interleave(rep, 1), ctx_v.repeat_interleave(rep, 1)
        if chain_k is not None:
            chain_k, chain_v = chain_k.repeat_interleave(rep, 1), chain_v.repeat_interleave(rep, 1)
    if chain_k is None:
        return F.scaled_dot_product_attention(q, ctx_k, ctx_v,
                                              attn_mask=None if ctx_mask is None else ctx_mask[:, None])
    scale = q.shape[-1] ** -0.5
    s_ctx = (q @ ctx_k.transpose(-1, -2)) * scale  # (B, h, Q, C)
    if ctx_mask is not None:
        s_ctx = s_ctx.masked_fill(~ctx_mask[:, None], float("-inf"))
    s_chain = torch.einsum("bhqd,bhqjd->bhqj", q, chain_k) * scale  # (B, h, Q, J)
    w = torch.softmax(torch.cat([s_ctx, s_chain], -1).float(), -1).to(q.dtype)
    c = ctx_k.shape[2]
    return w[..., :c] @ ctx_v + torch.einsum("bhqj,bhqjd->bhqd", w[..., c:], chain_v)


class Eagle3Layer(nn.Module):
    """One Eagle3 decoder layer: attention over [input_layernorm(embedding) ; hidden_norm(state)] (2H in,
    H out) added to the state, then a SwiGLU MLP, as DeepSpec's (and SpecForge's) Eagle3 layer."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.hidden_norm = RMSNorm(h, cfg.rms_eps)
        self.input_layernorm = RMSNorm(h, cfg.rms_eps)
        self.q_proj = nn.Linear(2 * h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_eps)
            self.k_norm = RMSNorm(d, cfg.rms_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.cfg.head_dim).transpose(1, 2)  # (B, T, n*d) -> (B, n, T, d)

    def qkv(self, emb: torch.Tensor, state: torch.Tensor, pos: torch.Tensor):
        """Queries, keys and values (B, heads, T, d) of slots with token embeddings emb and states state
        (B, T, H) at positions pos (B, T)."""
        cfg = self.cfg
        u = torch.cat([self.input_layernorm(emb), self.hidden_norm(state)], -1)
        q = self._heads(self.q_proj(u), cfg.num_heads)
        k = self._heads(self.k_proj(u), cfg.num_kv_heads)
        v = self._heads(self.v_proj(u), cfg.num_kv_heads)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta), v

    def finish(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input state (B, T, H) and the attention result (B, heads, T, d)."""
        x = state + self.o_proj(attn.transpose(1, 2).reshape(*state.shape[:-1], -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Eagle3Model(nn.Module):
    """The trainable Eagle3 drafter; the target's embedding and LM head rows are frozen buffers, never saved."""

    def __init__(self, cfg: Eagle3Config, embed: torch.Tensor, lm_head: torch.Tensor,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.target_layers) * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList(Eagle3Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.register_buffer("embed", embed.detach(), persistent=False)
        if vocab_ids is None:
            vocab_ids = torch.arange(cfg.draft_vocab or cfg.target_vocab_size)
        if cfg.draft_vocab and len(vocab_ids) != cfg.draft_vocab:
            raise LabkitError(f"vocab_ids has {len(vocab_ids)} rows but the config says draft_vocab={cfg.draft_vocab}.")
        self.register_buffer("vocab_ids", vocab_ids.long().clone())  # saved: which LM-head rows are used
        self.register_buffer("head", lm_head.detach()[self.vocab_ids].clone(), persistent=False)
        self.packed_head: PackedLinear | None = None  # set by pack_for_inference

    @property
    def full_vocab(self) -> bool:
        return self.cfg.draft_vocab in (0, self.cfg.target_vocab_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., m * H_target) concatenated target layer outputs -> the fused feature g (..., H)."""
        return self.fc(hidden.to(self.dtype))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed[ids].to(self.dtype)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary (columns index `vocab_ids`) of raw layer outputs."""
        h = self.norm(state)
        if self.packed_head is not None and h.dtype == self.head.dtype:
            return self.packed_head(h)
        return h @ self.head.to(h.dtype).T

    def pack_for_inference(self) -> int:
        """Pre-packed oneDNN weights for the CPU's small matmuls (as DFlash's); inference only."""
        n = pack_linears(self)
        if n:
            self.packed_head = PackedLinear(self.head)
        return n + bool(n)

    def init_from_target(self, target_model) -> int:
        """Nothing to copy: an Eagle3 layer's attention reads 2H inputs, which no target layer computes
        (DFlash copies a target layer only where it computes the same function). Returns 0."""
        return 0

    # --------------------------------------------------------------- the two passes, shared by training and decoding

    def extend(self, kv: list[tuple[torch.Tensor, torch.Tensor]], emb: torch.Tensor, g: torch.Tensor,
               pos: torch.Tensor, mask: torch.Tensor | None):
        """Slots with target features: emb, g (B, T, H) at positions pos (B, T), attending causally over the
        cached slots kv (one (k, v) per layer, (B, h_kv, C, d)) and each other; mask (B, T, C + T).
        Returns the layers' new (k, v) of these slots and the last layer's outputs (B, T, H)."""
        new, state = [], g
        for layer, (ck, cv) in zip(self.layers, kv):
            q, k, v = layer.qkv(emb, state, pos)
            new.append((k, v))
            if ck.shape[2]:  # (an empty cache is not concatenated: its dtype may differ under autocast)
                k, v = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
            state = layer.finish(state, attention(q, k, v, mask))
        return new, state

    def chain_step(self, kv: list[tuple[torch.Tensor, torch.Tensor]], ctx_mask: torch.Tensor | None,
                   chain: list[tuple[list, list]], emb: torch.Tensor, state: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
        """One drafting step for Q roots at once: token embeddings emb and the previous step's outputs
        state (B, Q, H) at positions pos (B, Q); each query reads the context slots kv where ctx_mask
        (B, Q, C) allows and its own chain's earlier steps; `chain` (one ([k], [v]) per layer, each
        entry (B, h_kv, Q, d)) is extended with this step. Returns the outputs (B, Q, H)."""
        for layer, (ck, cv), (keys, values) in zip(self.layers, kv, chain):
            q, k, v = layer.qkv(emb, state, pos)
            keys.append(k)
            values.append(v)
            a = attention(q, ck, cv, ctx_mask, torch.stack(keys, 3), torch.stack(values, 3))
            state = layer.finish(state, a)
        return state

    def forward(self, feats: torch.Tensor, anchor_pos: torch.Tensor, anchor_ids: torch.Tensor,
                targets: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training forward with the training-time test: gamma steps unrolled from every anchor.

        feats (B, N, m*H) the target's layer outputs at every position; ids (B, N) the sequences' tokens;
        anchor_pos / anchor_ids (B, A) where each block starts; targets (B, A, gamma) the block's tokens.
        Step 0 runs every slot t (token ids[t + 1], feature at t) causally, as the decode cache holds them;
        the block of anchor a grows from slot a - 1 (whose token is the anchor): step j >= 1 reads the
        token targets[j - 1] (teacher-forced) and step j - 1's own output in place of a target feature, at
        position a - 1 + j. Returns {"h": the normed states (B, A, gamma, H), "logits" (B, A, gamma, V_draft)
        (step j predicts the token at anchor_pos + j + 1), "valid" (B, A, gamma): False for an anchor at
        position 0, which has no slot before it}."""
        if ids is None or targets is None:
            raise LabkitError("Eagle3's training forward needs the sequences' tokens (ids) and the blocks' "
                              "tokens (targets).")
        b, n, _ = feats.shape
        dev = feats.device
        g = self.features(feats)
        nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)  # slot t carries token t + 1
        pos = torch.arange(n, device=dev).expand(b, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril().expand(b, n, n)
        empty = [(g.new_zeros(b, self.cfg.num_kv_heads, 0, self.cfg.head_dim),) * 2 for _ in self.layers]
        kv, out0 = self.extend(empty, self.embedding(nxt), g, pos, causal)
        root = (anchor_pos - 1).clamp(min=0)  # (B, A)
        state = out0.gather(1, root[..., None].expand(-1, -1, out0.shape[-1]))  # (B, A, H)
        ctx_mask = torch.arange(n, device=dev)[None, None, :] <= root[:, :, None]  # (B, A, N)
        chain: list[tuple[list, list]] = [([], []) for _ in self.layers]
        steps = [state]
        for j in range(1, self.cfg.gamma):
            state = self.chain_step(kv, ctx_mask, chain, self.embedding(targets[..., j - 1]), state, root + j)
            steps.append(state)
        hs = torch.stack(steps, 2)  # (B, A, gamma, H)
        valid = (anchor_pos > 0)[..., None].expand(-1, -1, self.cfg.gamma)
        return {"h": self.norm(hs), "logits": self.logits(hs), "valid": valid}


# ----------------------------------------------------------------------------- decode-time adapter


@dataclass
class Eagle3Cache:
    """Per-request draft cache: every layer's (k, v) of the committed slots (length = slots), and the last
    layer's output at the last of them (1, 1, H), from which the next proposal's first draft is scored."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    last: torch.Tensor | None = None


class Eagle3Drafter(Drafter):
    """Eagle3 behind the Drafter protocol: start/observe extend the request's draft cache (its `memo`) with
    the target's features of the committed tokens; propose drafts autoregressively, one step per token."""

    name = "eagle3"

    def __init__(self, model: Eagle3Model, gamma: int | None = None, device=None, dtype=None):
        self.model = model.eval()
        if device is not None or dtype is not None:
            self.model.to(device=device, dtype=dtype)
        self.cfg = model.cfg
        self.gamma = min(gamma or self.cfg.gamma, self.cfg.gamma)
        self.vocab_size = self.cfg.target_vocab_size
        self.hidden_layers = tuple(self.cfg.target_layers)

    @property
    def device(self) -> torch.device:
        return self.model.fc.weight.device

    def draft_vocab(self) -> torch.Tensor:
        """The target ids its LM head scores (all of them unless the vocabulary was cut)."""
        return self.model.vocab_ids

    @torch.no_grad()
    def _append(self, request: DraftRequest, hidden: tuple[torch.Tensor, ...], tokens: list[int]) -> None:
        """Commit slots for target features hidden (T, H per layer) whose next tokens are `tokens` (T)."""
        cache: Eagle3Cache = request.memo
        m = self.model
        feats = torch.cat(hidden, -1).to(self.device)[None]  # (1, T, m * H)
        t, c = feats.shape[1], cache.length
        pos = torch.arange(c, c + t, device=self.device)[None]
        mask = torch.ones(t, c + t, dtype=torch.bool, device=self.device).tril(c)[None]
        emb = m.embedding(torch.tensor(tokens, device=self.device)[None])
        new, out = m.extend(cache.kv, emb, m.features(feats), pos, mask)
        cache.kv = [(torch.cat([k, nk], 2), torch.cat([v, nv], 2)) for (k, v), (nk, nv) in zip(cache.kv, new)]
        cache.length += t
        cache.last = out[:, -1:]

    @torch.no_grad()
    def start(self, request: DraftRequest, hidden) -> None:
        if hidden is None:
            raise LabkitError("Eagle3 needs the target's hidden states; the decoding loop did not pass them.")
        p = hidden[0].shape[0]
        if len(request.ids) != p + 1:
            raise LabkitError(f"Eagle3 starts after prefill: {p} prompt positions and the first token, got "
                              f"{len(request.ids)} ids.")
        empty = [(torch.empty(1, self.cfg.num_kv_heads, 0, self.cfg.head_dim, device=self.device,
                              dtype=self.model.dtype),) * 2 for _ in self.model.layers]
        request.memo = Eagle3Cache(kv=empty, length=0)
        self._append(request, hidden, request.ids[1:])

    @torch.no_grad()
    def draft_states(self, request: DraftRequest, tokens: list[int]) -> torch.Tensor:
        """The chain's raw outputs (k, H) for the drafts `tokens` (target ids): row 0 scores the first draft,
        row j the draft after tokens[j - 1]; k = len(tokens) + 1. Reads the cache, never writes it."""
        cache: Eagle3Cache = request.memo
        chain: list[tuple[list, list]] = [([], []) for _ in self.model.layers]
        state, rows = cache.last, [cache.last]
        for j, tok in enumerate(tokens, start=1):
            emb = self.model.embedding(torch.tensor([[tok]], device=self.device))
            pos = torch.tensor([[cache.length - 1 + j]], device=self.device)
            state = self.model.chain_step(cache.kv, None, chain, emb, state, pos)
            rows.append(state)
        return torch.cat(rows, 1)[0]

    @torch.no_grad()
    def propose(self, request: DraftRequest, max_tokens: int) -> Proposal:
        k = min(self.gamma, max_tokens)
        if k <= 0:
            return Proposal.empty(self.vocab_size, self.device)
        cache: Eagle3Cache = request.memo
        m = self.model
        chain: list[tuple[list, list]] = [([], []) for _ in m.layers]
        state = cache.last
        cols, rows = [], []
        for j in range(k):
            if j:  # step j: the last draft and the previous step's own output, at the next position
                emb = m.embedding(m.vocab_ids[cols[-1]].view(1, 1))
                pos = torch.tensor([[cache.length - 1 + j]], device=self.device)
                state = m.chain_step(cache.kv, None, chain, emb, state, pos)
            p = logits_to_probs(m.logits(state[0]).float(), request.params)[0]  # what the draft is drawn from
            greedy = request.generator is None or request.params.greedy
            cols.append(p.argmax() if greedy else sample(p, request.generator))
            rows.append(p)
        return self.to_proposal(torch.stack(cols), torch.stack(rows))

    @torch.no_grad()
    def propose_many(self, requests: list[DraftRequest], max_tokens: list[int]) -> list[Proposal]:
        """`propose` for all requests, their chains stepped together: at each draft position one chain step
        for R queries, each reading only its own request's cache (padded to the longest and masked) and its
        own earlier steps, then one LM-head matmul; each request draws from its own row with its own
        generator, as `propose` does, so tokens and probability rows equal `propose`'s (tested)."""
        ks = [min(self.gamma, k) for k in max_tokens]
        live = [i for i, k in enumerate(ks) if k > 0]
        out = [Proposal.empty(self.vocab_size, self.device) for _ in requests]
        if len(live) == 1:  # nothing to batch
            out[live[0]] = self.propose(requests[live[0]], ks[live[0]])
        if len(live) <= 1:
            return out
        caches: list[Eagle3Cache] = [requests[i].memo for i in live]
        kv, mask, lengths = self._padded(caches)
        m, rows_of = self.model, [ks[i] for i in live]
        chain: list[tuple[list, list]] = [([], []) for _ in m.layers]
        state = torch.cat([c.last for c in caches], 0)  # (R, 1, H)
        cols: list[list[torch.Tensor]] = [[] for _ in live]
        probs: list[list[torch.Tensor]] = [[] for _ in live]
        for j in range(max(rows_of)):
            if j:  # a request past its own k steps along with the rest; its rows are never read
                emb = m.embedding(torch.stack([m.vocab_ids[c[-1]] for c in cols]).view(-1, 1))
                state = m.chain_step(kv, mask, chain, emb, state, (lengths - 1 + j).view(-1, 1))
            logits = m.logits(state[:, 0]).float()  # (R, V_draft)
            for r, i in enumerate(live):
                if j < rows_of[r]:
                    req = requests[i]
                    p = logits_to_probs(logits[r:r + 1], req.params)[0]
                    greedy = req.generator is None or req.params.greedy
                    cols[r].append(p.argmax() if greedy else sample(p, req.generator))
                    probs[r].append(p)
        for r, i in enumerate(live):
            out[i] = self.to_proposal(torch.stack(cols[r]), torch.stack(probs[r]))
        return out

    def _padded(self, caches: list[Eagle3Cache]):
        """The requests' draft caches as one batch: every layer's (k, v) right-padded to the longest
        (R, h_kv, C, d), the mask (R, 1, C) of each row's real slots, and the rows' lengths (R,)."""
        lengths = torch.tensor([c.length for c in caches], device=self.device)
        c_max = int(lengths.max())
        kv = []
        for layer in range(len(self.model.layers)):
            k0, v0 = caches[0].kv[layer]
            k = k0.new_zeros(len(caches), k0.shape[1], c_max, k0.shape[3])
            v = v0.new_zeros(len(caches), v0.shape[1], c_max, v0.shape[3])
            for r, c in enumerate(caches):
                k[r, :, :c.length], v[r, :, :c.length] = c.kv[layer][0][0], c.kv[layer][1][0]
            kv.append((k, v))
        mask = (torch.arange(c_max, device=self.device)[None, :] < lengths[:, None])[:, None]
        return kv, mask, lengths

    def to_proposal(self, local: torch.Tensor, p_small: torch.Tensor) -> Proposal:
        """Draft-vocabulary columns and probabilities -> target token ids and (k, V) probability rows."""
        return vocab_proposal(self.model.vocab_ids, self.vocab_size, local, p_small, self.model.full_vocab)

    @torch.no_grad()
    def observe(self, request: DraftRequest, n_accepted: int, hidden) -> None:
        # the verify forward saw [anchor, d_1..d_k]; the target keeps anchor + d_1..d_n, and the token after
        # each of them is now known (d_1..d_n, then the target's own): n + 1 slots with target features
        if hidden is None:
            raise LabkitError("Eagle3 needs the target's hidden states; the decoding loop did not pass them.")
        n = n_accepted + 1
        self._append(request, tuple(h[:n] for h in hidden), request.ids[-n:])


__all__ = ["Eagle3Config", "Eagle3Model", "Eagle3Drafter", "Eagle3Cache", "Eagle3Layer", "attention",
           "eagle3_layers"]
