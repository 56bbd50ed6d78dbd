"""Train DMCAC with PML's MetricLossOnly on the digits data (CPU, well under a minute).

Classes 0-4 train (split 80/20 into training queries and a training database), classes 5-9
are retrieved at the end. ``training_setup`` supplies what the trainer needs: the A-view query
dataset, the B*A collate function, and the database refresher hooks.
"""

import logging

import torch
from pytorch_metric_learning import trainers
from sklearn.datasets import load_digits

from pml_plugin_dmcac import DMCACLoss, training_setup
from pml_plugins import TrainingContext

logging.getLogger("PML").setLevel(logging.WARNING)


def recall_at_1(emb, labels):
    e = torch.nn.functional.normalize(emb, dim=1)
    sims = e @ e.T
    sims.fill_diagonal_(-2.0)  # a query never retrieves itself
    return float((labels[sims.argmax(1)] == labels).float().mean())


torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
train = y < 5
dataset = torch.utils.data.TensorDataset(x[train], y[train])

trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
embedder = torch.nn.Linear(64, 4)
with torch.no_grad():
    recall_before = recall_at_1(embedder(trunk(x[~train])), y[~train])

# A = 2 views (original + shifted/noisy copy), k = 4 neighbours per view
loss = DMCACLoss(num_classes=5, embedding_size=4, num_views=2, k=4)
context = TrainingContext(
    trunk=trunk,
    embedder=embedder,
    train_dataset=dataset,
    batch_size=32,
    epochs=4,
    device=torch.device("cpu"),
    seed=0,
    options={"refresh_every_epochs": 1, "progress": False},
)
setup = training_setup(loss, context)

trainer = trainers.MetricLossOnly(
    models={"trunk": trunk, "embedder": embedder},
    optimizers={
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=3e-3),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=3e-3),
        # the loss owns the CE classifier, the attention projections and the CAC classifier
        "metric_loss_optimizer": torch.optim.Adam(loss.parameters(), lr=1e-2),
    },
    batch_size=context.batch_size,  # queries per batch; the loss sees batch_size * A rows
    loss_funcs={"metric_loss": loss},
    dataset=setup.train_dataset,
    collate_fn=setup.collate_fn,
    end_of_epoch_hook=setup.end_of_epoch_hook,
    dataloader_num_workers=0,
    data_device=torch.device("cpu"),
)
setup.before_training()  # embed the database split once before the first step
trainer.train(num_epochs=context.epochs)

with torch.no_grad():
    recall_after = recall_at_1(embedder(trunk(x[~train])), y[~train])
print(f"database rows: {loss.db_embeddings.shape[0]}, mean |S| per query: {loss.avg_union_size:.1f}")
print(f"Recall@1 on unseen classes 5-9: {recall_before:.3f} (untrained) -> {recall_after:.3f} (DMCAC)")
