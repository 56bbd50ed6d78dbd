"""Drop-in CrossBatchMemory / SelfSupervisedLoss that accept plugin losses."""

from __future__ import annotations

import types

import pytest
import torch
from pytorch_metric_learning import losses

import pml_plugins
from pml_plugins.wrappers import CrossBatchMemory, SelfSupervisedLoss


class PluginPairLoss(losses.GenericPairLoss):
    """A plugin loss PML's wrappers would refuse by name: a squared-distance pair loss."""

    def __init__(self, **kwargs):
        super().__init__(mat_based_loss=False, **kwargs)

    def _compute_loss(self, pos_pair_dist, neg_pair_dist, indices_tuple):
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        pos = pos_pair_dist**2 if len(pos_pair_dist) else 0  # GenericPairLoss gives [] for no pairs
        neg = torch.relu(1 - neg_pair_dist) ** 2 if len(neg_pair_dist) else 0
        return {
            "pos_loss": {
                "losses": pos,
                "indices": lmu.pos_pairs_from_tuple(indices_tuple),
                "reduction_type": "pos_pair",
            },
            "neg_loss": {
                "losses": neg,
                "indices": lmu.neg_pairs_from_tuple(indices_tuple),
                "reduction_type": "neg_pair",
            },
        }

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]


class RefusingLoss(PluginPairLoss):
    pass


@pytest.fixture
def plugin_registered(fresh_registry):
    module = types.ModuleType("wrapper_test_plugin")

    @pml_plugins.hookimpl
    def register_losses(register):
        register(PluginPairLoss, name="plugin_pair")
        register(RefusingLoss, name="refusing", supports_ref_emb=False)

    module.register_losses = register_losses
    pml_plugins.register_plugin(module)
    yield


def test_pml_wrappers_refuse_plugin_losses():
    with pytest.raises(Exception, match="not supported for PluginPairLoss"):
        losses.CrossBatchMemory(PluginPairLoss(), embedding_size=4)


def test_cross_batch_memory_equals_loss_with_memory_as_ref_emb(plugin_registered):
    torch.manual_seed(0)
    loss = PluginPairLoss()
    wrapper = CrossBatchMemory(loss, embedding_size=4, memory_size=16)
    first, first_labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    wrapper(first, first_labels, enqueue_mask=torch.ones(8, dtype=torch.bool))  # fill the memory
    emb, labels = torch.randn(6, 4, requires_grad=True), torch.randint(0, 3, (6,))
    mask = torch.tensor([True, True, False, False, False, False])
    value = wrapper(emb, labels, enqueue_mask=mask)
    memory = torch.cat([first, emb[mask].detach()])
    memory_labels = torch.cat([first_labels, labels[mask]])
    expected = loss(emb[~mask], labels[~mask], ref_emb=memory, ref_labels=memory_labels)
    assert torch.allclose(value, expected)
    value.backward()
    assert torch.isfinite(emb.grad).all()


def test_self_supervised_loss_equals_loss_with_views_as_ref_emb(plugin_registered):
    torch.manual_seed(1)
    loss = PluginPairLoss()
    emb, views = torch.randn(6, 4), torch.randn(6, 4)
    value = SelfSupervisedLoss(loss, symmetric=False)(emb, views)
    ids = torch.arange(6)
    assert torch.allclose(
        value, loss(emb, ids, ref_emb=views, ref_labels=ids.clone())
    )  # a distinct tensor: keep i<->i pairs
    symmetric = SelfSupervisedLoss(loss)(emb, views)
    # symmetric: PML concatenates both views into one batch with repeated ids
    assert torch.allclose(symmetric, loss(torch.cat([emb, views]), torch.cat([ids, ids])))


def test_pml_losses_still_accepted(fresh_registry):
    assert isinstance(CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=4).loss, losses.ContrastiveLoss)
    assert isinstance(SelfSupervisedLoss(losses.NTXentLoss()).loss, losses.NTXentLoss)


def test_wrappers_refuse_clearly(plugin_registered):
    with pytest.raises(TypeError, match="ProxyAnchorLoss .*does not"):
        CrossBatchMemory(losses.ProxyAnchorLoss(3, 4), embedding_size=4)
    with pytest.raises(TypeError, match="refusing.*does not"):
        SelfSupervisedLoss(RefusingLoss())

    class Unregistered(PluginPairLoss):
        pass

    with pytest.raises(TypeError, match="register it with pml_plugins.register_plugin"):
        CrossBatchMemory(Unregistered(), embedding_size=4)
