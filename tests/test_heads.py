"""DSpark's heads: a zero-initialised head leaves the backbone's logits unchanged, the Markov bias is a
W1 row times W2, and the RNN head's step is Eq. 6 written out by hand."""

from __future__ import annotations

import pytest
import torch

from labkit.core.errors import LabkitError
from labkit.drafters.heads import ConfidenceHead, MarkovHead, RNNHead, TokenIndex, make_head


def test_token_index_maps_outside_tokens_to_the_shared_row():
    idx = TokenIndex(torch.tensor([3, 5, 9]), target_vocab_size=12)
    assert idx(torch.tensor([3, 5, 9, 0, 11])).tolist() == [0, 1, 2, 3, 3]
    assert idx.n_rows == 4


@pytest.mark.parametrize("cls", [MarkovHead, RNNHead])
def test_fresh_head_adds_zero_bias(cls):
    head = cls(n_rows=7, n_out=11, rank=4, hidden=6)
    h = torch.randn(2, 3, 6)
    prev = torch.randint(7, (2, 3))
    bias, feats = head.teacher_forced(h, prev)
    assert bias.shape == (2, 3, 11) and feats.shape == (2, 3, 4)
    assert torch.count_nonzero(bias) == 0


def test_rank_zero_means_no_head():
    assert make_head("markov", 7, 11, 0, 6) is None
    with pytest.raises(LabkitError, match="markov or rnn"):
        make_head("lstm", 7, 11, 4, 6)


def test_markov_bias_is_w1_row_times_w2():
    torch.manual_seed(0)
    head = MarkovHead(n_rows=7, n_out=11, rank=4, hidden=6)
    torch.nn.init.normal_(head.w2.weight)
    bias, feat, _ = head.step(torch.randn(6), torch.tensor(5), None)
    assert torch.allclose(bias, head.w1.weight[5] @ head.w2.weight.T)
    assert torch.equal(feat, head.w1.weight[5])
    many, _ = head.teacher_forced(torch.randn(3, 6), torch.tensor([5, 1, 5]))
    assert torch.allclose(many[0], bias, atol=1e-6) and torch.allclose(many[2], bias, atol=1e-6)


def test_rnn_step_is_eq6():
    """With s_0 = 0: z = [s; W1[x]; h], (g, c, o) = split(W z + b), s' = sig(g) s + (1 - sig(g)) tanh(c),
    B = W2^T tanh(o); and a second step carries s' forward."""
    torch.manual_seed(0)
    r, d = 4, 6
    head = RNNHead(n_rows=7, n_out=11, rank=r, hidden=d)
    torch.nn.init.normal_(head.w2.weight)
    h1, h2 = torch.randn(d), torch.randn(d)
    s = head.init_state((), dtype=torch.float32)
    assert torch.equal(s, torch.zeros(r))
    W, b = head.joint.weight, head.joint.bias

    def by_hand(s, x, h):
        z = torch.cat([s, head.w1.weight[x], h])
        pre = W @ z + b
        g, c, o = pre[:r], pre[r:2 * r], pre[2 * r:]
        s_new = torch.sigmoid(g) * s + (1 - torch.sigmoid(g)) * torch.tanh(c)
        return head.w2.weight @ torch.tanh(o), s_new

    b1, _, s1 = head.step(h1, torch.tensor(2), s)
    e1, es1 = by_hand(s, 2, h1)
    assert torch.allclose(b1, e1, atol=1e-6) and torch.allclose(s1, es1, atol=1e-6)
    b2, _, s2 = head.step(h2, torch.tensor(6), s1)
    e2, es2 = by_hand(es1, 6, h2)
    assert torch.allclose(b2, e2, atol=1e-6) and torch.allclose(s2, es2, atol=1e-6)
    tf, _ = head.teacher_forced(torch.stack([h1, h2]), torch.tensor([2, 6]))
    assert torch.allclose(tf, torch.stack([e1, e2]), atol=1e-6)


def test_confidence_head_reads_hidden_and_markov_feature():
    head = ConfidenceHead(hidden=6, rank=4)
    h, f = torch.randn(5, 6), torch.randn(5, 4)
    logit = head(h, f)
    assert logit.shape == (5,)
    expected = torch.cat([h, f], -1) @ head.proj.weight[0] + head.proj.bias
    assert torch.allclose(logit, expected, atol=1e-6)
