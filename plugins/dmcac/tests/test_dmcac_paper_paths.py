"""The paper's training paths: the database embedded without augmentation, the refresh cadence in
epochs, and full retrieval with a gradient into the encoder through every database row."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import trainers

from pml_plugin_dmcac import DatabaseEncoder, DMCACLoss, training_setup
from pml_plugins import TrainingContext


class _Images(torch.utils.data.Dataset):
    """(x, label) items through an optional transform, like the main job's image splits."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None):
        self.x, self.labels, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.x[i]
        return (self.transform(x) if self.transform is not None else x), int(self.labels[i])


def _augment(x: torch.Tensor) -> torch.Tensor:  # random, as a training transform is
    return x + 0.5 * torch.randn_like(x)


def _context(train, train_eval=None, **options):
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
    return TrainingContext(
        trunk=trunk,
        embedder=torch.nn.Linear(8, 4),
        train_dataset=train,
        batch_size=4,
        epochs=1,
        device=torch.device("cpu"),
        options={"progress": False, **options},
        train_eval_dataset=train_eval,
    )


def _data(n: int = 30):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.arange(n) % 3


def test_two_refreshes_with_unchanged_weights_give_identical_database_rows():
    x, y = _data()
    loss = DMCACLoss(num_classes=3, embedding_size=4, num_views=2, k=2)
    setup = training_setup(loss, _context(_Images(x, y, _augment), _Images(x, y)))
    setup.before_training()
    first = loss.db_embeddings.clone()
    setup.before_training()
    assert torch.equal(loss.db_embeddings, first)
    # and they are the un-augmented rows: the model applied to the raw inputs of the database split
    refresher = setup.before_training.__self__
    idx = refresher.dataset.indices
    context = _context(None)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(context.embedder(context.trunk(x[idx])), dim=1)
    torch.testing.assert_close(first, expected)


def test_without_an_evaluation_view_the_rows_are_augmented_and_it_warns():
    x, y = _data()
    loss = DMCACLoss(num_classes=3, embedding_size=4, num_views=2, k=2)
    with pytest.warns(UserWarning, match="train_eval_dataset"):
        setup = training_setup(loss, _context(_Images(x, y, _augment)))
    setup.before_training()
    first = loss.db_embeddings.clone()
    setup.before_training()
    assert not torch.equal(loss.db_embeddings, first)  # the check above can fail


def test_evaluation_view_must_hold_the_same_items():
    x, y = _data()
    with pytest.raises(ValueError, match="same items in the same order"):
        training_setup(DMCACLoss(3, 4, num_views=2), _context(_Images(x, y), _Images(x[:10], y[:10])))


@pytest.mark.parametrize("every, expected", [(1, 1 + 4), (2, 1 + 2), (15, 1)])
def test_refresh_cadence_in_epochs(every, expected):
    x, y = _data(40)
    loss = DMCACLoss(num_classes=3, embedding_size=4, num_views=2, k=2)
    context = _context(_Images(x, y), refresh_every_epochs=every)
    setup = training_setup(loss, context)
    refresher = setup.before_training.__self__
    setup.before_training()
    for _ in range(4):  # what PML's trainer does at the end of each of 4 epochs
        setup.end_of_epoch_hook(None)
    assert refresher.num_refreshes == expected


def test_refresh_every_is_the_old_name_and_bad_values_are_refused():
    x, y = _data()
    loss = DMCACLoss(num_classes=3, embedding_size=4, num_views=2, k=2)
    setup = training_setup(loss, _context(_Images(x, y), refresh_every=3))
    assert setup.before_training.__self__.every_epochs == 3
    with pytest.raises(ValueError, match="refresh_every_epochs must be a positive integer"):
        training_setup(loss, _context(_Images(x, y), refresh_every_epochs=0))
    with pytest.raises(ValueError, match="not both"):
        training_setup(loss, _context(_Images(x, y), refresh_every=3, refresh_every_epochs=3))


def _full_retrieval_grads(use_encoder: bool, chunk: int = 4):
    """Trunk gradients of one DMCAC step over a 10-row database, float64."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3)).double()
    g = torch.Generator().manual_seed(1)
    db_x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    q_x = torch.randn(8, 6, generator=g, dtype=torch.float64)  # 4 queries x 2 views
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    loss = DMCACLoss(num_classes=3, embedding_size=8, num_views=2, retrieval="full").double()
    trunk.train()
    emb = trunk(q_x) if not use_encoder else None
    if use_encoder:
        database = torch.utils.data.TensorDataset(db_x, torch.arange(10) % 3)
        encoder = DatabaseEncoder(database, trunk, modules=[trunk], batch_size=chunk)
        loss.set_database_encoder(encoder)
        torch.manual_seed(5)
        emb = trunk(q_x)
        value = loss(emb, labels)
        assert trunk.training  # the encoder restored the train flag
    else:
        torch.manual_seed(5)
        emb = trunk(q_x)
        trunk.eval()  # the database rows are embedded in eval mode (no dropout)
        ref = trunk(db_x)
        trunk.train()
        value = loss(emb, labels, ref_emb=ref, ref_labels=torch.arange(10) % 3)
    value.backward()
    return float(value.detach()), [p.grad.clone() for p in trunk.parameters()]


@pytest.mark.parametrize("chunk", [3, 10])
def test_full_retrieval_gradient_through_the_database_equals_one_big_graph(chunk):
    value_ref, grads_ref = _full_retrieval_grads(use_encoder=False)
    value, grads = _full_retrieval_grads(use_encoder=True, chunk=chunk)
    assert value == pytest.approx(value_ref, rel=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_full_retrieval_database_gradient_is_not_zero_and_constant_rows_give_another_gradient():
    _, with_db_grad = _full_retrieval_grads(use_encoder=True)
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3)).double()
    g = torch.Generator().manual_seed(1)
    db_x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    q_x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    loss = DMCACLoss(num_classes=3, embedding_size=8, num_views=2, retrieval="full").double()
    trunk.eval()
    with torch.no_grad():
        loss.set_database(trunk(db_x), torch.arange(10) % 3)
    trunk.train()
    torch.manual_seed(5)
    loss(trunk(q_x), torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])).backward()
    differs = [not torch.allclose(p.grad, w) for p, w in zip(trunk.parameters(), with_db_grad)]
    assert any(differs)


def test_database_encoder_needs_full_retrieval():
    loss = DMCACLoss(num_classes=3, embedding_size=4)
    with pytest.raises(ValueError, match='retrieval="full"'):
        loss.set_database_encoder(DatabaseEncoder(torch.utils.data.TensorDataset(torch.randn(3, 4)), lambda x: x))


def test_training_setup_full_retrieval_trains_end_to_end_in_pml_trainer():
    x, y = _data(48)
    loss = DMCACLoss(num_classes=3, embedding_size=4, num_views=2, k=2, retrieval="full")
    context = _context(_Images(x, y, _augment), _Images(x, y), database_fraction=0.25)
    setup = training_setup(loss, context)
    assert setup.before_training is None and setup.end_of_epoch_hook is None  # no refreshes needed
    encoder = loss.db_encoder
    assert isinstance(encoder, DatabaseEncoder) and len(encoder) == 12
    before = [p.detach().clone() for p in context.trunk.parameters()]
    models = {"trunk": context.trunk, "embedder": context.embedder}
    optimizers = {f"{k}_optimizer": torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    optimizers["metric_loss_optimizer"] = torch.optim.SGD(loss.parameters(), lr=0.1)
    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=4,
        loss_funcs={"metric_loss": loss},
        dataset=setup.train_dataset,
        collate_fn=setup.collate_fn,
        iterations_per_epoch=3,
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=1)
    assert encoder.num_passes == 3  # one database pass per step
    assert any(not torch.equal(a, b) for a, b in zip(before, context.trunk.parameters()))


def test_full_retrieval_gradient_refuses_ddp_and_can_be_turned_off():
    x, y = _data()
    loss = DMCACLoss(num_classes=3, embedding_size=4, num_views=2, retrieval="full")
    context = _context(_Images(x, y), _Images(x, y))
    context.world_size = 2
    with pytest.raises(ValueError, match="database_gradient=False"):
        training_setup(loss, context)
    context = _context(_Images(x, y), _Images(x, y), database_gradient=False)
    setup = training_setup(loss, context)
    assert loss.db_encoder is None and setup.before_training is not None
