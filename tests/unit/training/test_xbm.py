"""Cross-batch memory: the FIFO ring, the memory loss against a brute-force loop over pairs and
against pytorch-metric-learning's CrossBatchMemory (where the definitions coincide)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.xbm import CrossBatchMemory, memory_contrastive_loss


def test_ring_keeps_the_newest_in_order():
    mem = CrossBatchMemory(5, 2)
    assert len(mem) == 0 and mem.contents()[0].shape == (0, 2)
    for start in (0, 3, 6):
        x = torch.arange(start, start + 3, dtype=torch.float32)[:, None].repeat(1, 2)
        mem.enqueue(x, torch.arange(start, start + 3))
    emb, labels = mem.contents()
    assert len(mem) == 5 and labels.tolist() == [4, 5, 6, 7, 8] and emb[:, 0].tolist() == [4, 5, 6, 7, 8]
    big = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 2)
    mem.enqueue(big, torch.arange(10))
    assert mem.contents()[1].tolist() == [5, 6, 7, 8, 9]
    x = torch.ones(2, 2, requires_grad=True)
    mem.enqueue(x * 2, torch.tensor([0, 1]))
    assert not mem.contents()[0].requires_grad


def _brute(emb, labels, mem_emb, mem_labels, *, margin, pos_margin, squared, balance, reduction, distance, miner):
    b = emb.shape[0]
    e = F.normalize(emb, dim=1) if distance == "cosine" else emb
    ref = torch.cat([e, mem_emb])
    ref_l = torch.cat([labels, mem_labels])

    def d(x, y):
        return 1 - F.cosine_similarity(x, y, dim=0) if distance == "cosine" else (x - y).norm()

    def sh(h):
        return 0.5 * h * h if squared else h

    pos, neg = [], []
    for i in range(b):
        cand_p = [j for j in range(len(ref)) if j != i and ref_l[j] == labels[i]]
        cand_n = [j for j in range(len(ref)) if ref_l[j] != labels[i]]
        if miner == "batch_hard":
            cand_p = [max(cand_p, key=lambda j: float(d(e[i], ref[j])))] if cand_p else []
            cand_n = [min(cand_n, key=lambda j: float(d(e[i], ref[j])))] if cand_n else []
        pos += [sh(torch.relu(d(e[i], ref[j]) - pos_margin)) for j in cand_p]
        neg += [sh(torch.relu(margin - d(e[i], ref[j]))) for j in cand_n]

    def red(xs):
        if not xs:
            return torch.tensor(0.0)
        t = torch.stack(xs)
        if reduction == "sum":
            return t.sum()
        if reduction == "mean":
            return t.mean()
        nz = (t > 0).sum()
        return t.sum() / nz.clamp_min(1)

    return red(pos) + red(neg) if balance else red(pos + neg)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("reduction", ["mean", "nonzero_mean", "sum"])
@pytest.mark.parametrize("miner", ["none", "batch_hard"])
@pytest.mark.parametrize("balance,squared", [(True, True), (False, True), (True, False)])
def test_memory_loss_equals_a_loop_over_pairs(distance, reduction, miner, balance, squared):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mem_emb = F.normalize(torch.randn(11, 4, generator=g), dim=1)
    mem_labels = torch.randint(0, 5, (11,), generator=g)
    kw = dict(margin=0.6, pos_margin=0.1, squared=squared, balance=balance, reduction=reduction,
              distance=distance, miner=miner)
    got, stats = memory_contrastive_loss(emb, labels, mem_emb, mem_labels, **kw)
    want = _brute(emb, labels, mem_emb, mem_labels, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if miner == "none":
        n_pos = sum(int((torch.cat([labels, mem_labels]) == labels[i]).sum()) - 1 for i in range(8))
        assert stats["num_pos_pairs"] == n_pos and stats["num_neg_pairs"] == 8 * 19 - n_pos - 8


def test_gradient_flows_only_into_the_batch_and_is_finite():
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    mem = torch.randn(5, 4, requires_grad=True)
    loss, _ = memory_contrastive_loss(emb, labels, mem, torch.tensor([0, 1, 2, 3, 4]))
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert mem.grad is None


def test_empty_memory_and_bad_arguments():
    emb = torch.randn(4, 3, requires_grad=True)
    loss, _ = memory_contrastive_loss(emb, torch.tensor([0, 0, 1, 1]), torch.zeros(0, 3), torch.zeros(0).long())
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="memory miner"):
        memory_contrastive_loss(emb, torch.tensor([0, 0, 1, 1]), torch.zeros(0, 3), torch.zeros(0).long(),
                                miner="semi_hard")
    with pytest.raises(ValueError, match="margin > pos_margin"):
        memory_contrastive_loss(emb, torch.tensor([0, 0, 1, 1]), torch.zeros(0, 3), torch.zeros(0).long(),
                                margin=0.1, pos_margin=0.1)
    with pytest.raises(ValueError, match=">= 1"):
        CrossBatchMemory(0, 3)


def test_equals_pml_cross_batch_memory_over_a_sequence_of_batches():
    """PML ContrastiveLoss(pos 0, neg m) in CrossBatchMemory == ours with euclidean distance on unit
    vectors, hinge (not squared), balanced, nonzero_mean; the ring wraps during the sequence.
    PML's memory also holds the current batch, so its memory_size M + B equals our M."""
    from pytorch_metric_learning import losses

    pml = losses.CrossBatchMemory(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.7), embedding_size=6,
                                  memory_size=20 + 8)
    ours = CrossBatchMemory(20, 6)
    g = torch.Generator().manual_seed(0)
    for step in range(7):
        emb = F.normalize(torch.randn(8, 6, generator=g), dim=1)
        labels = torch.randint(0, 4, (8,), generator=g)
        want = pml(emb, labels)
        mem_emb, mem_labels = ours.contents()
        got, _ = memory_contrastive_loss(emb, labels, mem_emb, mem_labels, margin=0.7, pos_margin=0.0,
                                         squared=False, balance=True, reduction="nonzero_mean",
                                         distance="euclidean")
        ours.enqueue(emb, labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {step}")


def test_memory_loss_wrapper_warms_up_then_uses_the_memory():
    from training.losses import ContrastiveLoss
    from training.xbm import MemoryLoss

    base = ContrastiveLoss(0.5, distance="cosine", reduction="nonzero_mean", balance=True)
    mem = CrossBatchMemory(16, 4)
    wrapped = MemoryLoss(base, mem, warmup_steps=1, margin=0.5, distance="cosine", balance=True,
                         reduction="nonzero_mean")
    g = torch.Generator().manual_seed(0)
    e1, l1 = torch.randn(6, 4, generator=g), torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(wrapped(e1, l1), base(e1, l1))  # warm-up: the in-batch loss
    assert len(mem) == 6  # but the memory fills
    e2, l2 = torch.randn(6, 4, generator=g), torch.tensor([0, 0, 3, 3, 1, 1])
    want, _ = memory_contrastive_loss(e2, l2, *mem.contents(), margin=0.5, distance="cosine", balance=True,
                                      reduction="nonzero_mean")
    torch.testing.assert_close(wrapped(e2, l2), want)
    assert len(mem) == 12 and wrapped.stats["num_pos_pairs"] > 0
