"""Layer-skip self-drafting: the target's first n layers, its final norm and LM head, as a drafter.

No training (Elhoushi et al. 2024, "LayerSkip", without the fine-tuning). The shallow model is a view
that shares the target's modules, so it costs no memory. Because its layers are the target's first n
layers run on the same tokens, its KV cache for the context is exactly the first n layers of the
target's cache: drafting appends to those layers and crops them back before verification, so the
drafter never re-reads the context and never has to catch up on accepted tokens. That sharing is
also why it runs single-request only: it declares `needs_target_cache`, single-request decoding hands
it the cache as `request.target_cache`, and a batched engine refuses it (`base.check_batchable`).

Drafting stops early when the drafter's own top probability (at temperature 1) falls below
`stop_below`: a stopping rule that looks only at the drafter, so it leaves verification exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from labkit.drafters.base import Drafter, DraftRequest, Proposal
from labkit.core.errors import LabkitError
from labkit.core.sampling import logits_to_probs, sample
from labkit.model.target import Target


@dataclass
class LayerSkipConfig:
    n_layers: int | None = None  # target layers the drafter runs (None: a quarter of the target's)
    gamma: int = 4  # most tokens drafted a round
    stop_below: float = 0.5  # stop drafting when the drafter's top probability is lower


def shallow_view(model: nn.Module, n_layers: int) -> nn.Module:
    """A causal LM of the same class whose decoder stack is the first n layers of `model` (shared)."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    with torch.device("meta"):
        view = type(model)(cfg)
    base, view_base = model.get_decoder(), view.get_decoder()
    for name, child in base.named_children():
        setattr(view_base, name, nn.ModuleList(list(child)[:n_layers]) if name == "layers" else child)
    view.set_output_embeddings(model.get_output_embeddings())
    leftovers = [n for n, t in list(view.named_parameters()) + list(view.named_buffers()) if t.is_meta]
    if leftovers:
        raise LabkitError(f"Layer-skip does not know this architecture ({type(model).__name__}): "
                          f"unshared tensors {leftovers[:3]}. Use --drafter prompt-lookup instead.")
    return view.eval()


class LayerSkipDrafter(Drafter):
    #: it drafts over the target's own KV cache (request.target_cache): single-request decoding only
    needs_target_cache = True

    def __init__(self, target: Target, config: LayerSkipConfig | None = None):
        self.cfg = copy.copy(config or LayerSkipConfig())
        if self.cfg.n_layers is None:
            self.cfg.n_layers = max(1, target.num_layers // 4)
        if not 1 <= self.cfg.n_layers < target.num_layers:
            raise LabkitError(f"Layer-skip needs 1 <= n_layers < {target.num_layers} (the target's depth), "
                              f"got {self.cfg.n_layers}.")
        if self.cfg.gamma < 1:
            raise LabkitError(f"gamma must be >= 1, got {self.cfg.gamma}.")
        self.target = target
        self.vocab_size = target.vocab_size
        self.model = shallow_view(target.model, self.cfg.n_layers)
        self.name = f"layer-skip-{self.cfg.n_layers}"
        self.gamma = self.cfg.gamma

    @torch.inference_mode()
    def propose(self, request: DraftRequest, max_tokens: int) -> Proposal:
        gamma = min(self.cfg.gamma, max_tokens)
        cache, params = request.target_cache, request.params
        if cache is None:
            raise LabkitError("Layer-skip drafts over the target's own KV cache and this request carries none "
                              "(request.target_cache): it runs in single-request decoding only (generate).")
        shallow = cache.layers[:self.cfg.n_layers]
        token = torch.tensor([[request.ids[-1]]], device=self.target.device)
        tokens, probs, forwards = [], [], 0
        for _ in range(gamma):
            forwards += 1
            logits = self.model(input_ids=token, past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[0, -1].float()
            p_d = logits_to_probs(logits, params)
            top = torch.softmax(logits, -1).max() if params.greedy else p_d.max()
            if top < self.cfg.stop_below:
                break
            token = sample(p_d, request.generator).view(1, 1)
            tokens.append(token.view(()))
            probs.append(p_d)
        for layer in shallow:  # drafted entries are recomputed by the verify forward
            layer.crop(-forwards)
        if not tokens:
            return Proposal.empty(self.target.vocab_size, self.target.device)
        return Proposal(torch.stack(tokens), torch.stack(probs))
