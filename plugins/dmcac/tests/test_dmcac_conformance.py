"""The project's conformance kit on DMCACLoss (batch as database, a held database, full
retrieval) and DatabaseKNNMiner."""

import torch

from pml_plugin_dmcac import DatabaseKNNMiner, DMCACLoss
from pml_plugins.testing import parametrize_with_checks

EMB, CLASSES, VIEWS = 8, 10, 2


def in_batch_loss():
    return DMCACLoss(num_classes=CLASSES, embedding_size=EMB, num_views=VIEWS, k=4)


def full_in_batch_loss():
    return DMCACLoss(num_classes=CLASSES, embedding_size=EMB, num_views=3, k=4, retrieval="full")


def database_loss():
    loss = DMCACLoss(num_classes=CLASSES, embedding_size=EMB, num_views=VIEWS, k=4)
    g = torch.Generator().manual_seed(123)  # the same database for every fresh instance
    loss.set_database(torch.randn(40, EMB, generator=g), torch.randint(CLASSES, (40,), generator=g))
    return loss


@parametrize_with_checks([in_batch_loss], embedding_size=EMB, num_classes=CLASSES, num_views=VIEWS)
def test_conformance_in_batch(check):
    check()


@parametrize_with_checks([full_in_batch_loss], embedding_size=EMB, num_classes=CLASSES, num_views=3, max_examples=10)
def test_conformance_full_retrieval(check):
    check()


@parametrize_with_checks(
    [database_loss],
    embedding_size=EMB,
    num_classes=CLASSES,
    num_views=VIEWS,
    max_examples=10,
    skip={
        "check_indices_tuple": "the kit's tuples index the batch; DMCACLoss reads tuples as links to ref_emb "
        "rows and rejects them without ref_emb (covered by test_conformance_in_batch)"
    },
)
def test_conformance_with_database(check):
    check()


@parametrize_with_checks([lambda: DatabaseKNNMiner(k=3)], embedding_size=EMB)
def test_conformance_miner(check):
    check()
