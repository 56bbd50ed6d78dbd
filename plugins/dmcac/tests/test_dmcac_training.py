"""The training path: split, multi-view data, B*A collate, database refresher, training_setup in
PML's MetricLossOnly on digits; the miner; registration; the example script."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import runpy

import pytest
import torch
from pytorch_metric_learning import trainers
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss
from sklearn.datasets import load_digits

import pml_plugins
from pml_plugin_dmcac import (
    DatabaseKNNMiner,
    DatabaseRefresher,
    DMCACLoss,
    MultiViewDataset,
    TensorViewAugment,
    make_embed_fn,
    multi_view_collate,
    split_query_database,
    training_setup,
)
from pml_plugins import TrainingContext, TrainingSetup

REPO = pathlib.Path(__file__).resolve().parents[3]
logging.getLogger("PML").setLevel(logging.WARNING)


@contextlib.contextmanager
def one_thread():
    """One torch thread: far faster than 2 on a shared 2-core machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def recall_at_1(emb, labels):
    e = torch.nn.functional.normalize(emb, dim=1)
    s = e @ e.T
    s.fill_diagonal_(-2.0)
    return float((labels[s.argmax(1)] == labels).float().mean())


# ---------------------------------------------------------------- split / data


def test_split_query_database_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    q, d = split_query_database(labels, database_fraction=0.2, seed=0)
    assert set(q.tolist()).isdisjoint(d.tolist()) and sorted(q.tolist() + d.tolist()) == list(range(18))
    per_class = torch.bincount(labels[d], minlength=4).tolist()
    assert per_class == [2, 1, 1, 0]  # round(10*.2)=2, round(5*.2)=1, class of 2 keeps one each side, singleton a query
    q2, d2 = split_query_database(labels.numpy(), 0.2, 0)
    assert torch.equal(q, q2) and torch.equal(d, d2)
    assert not torch.equal(d, split_query_database(labels, 0.2, seed=1)[1])
    _, d50 = split_query_database(labels, database_fraction=0.5, seed=3)
    assert torch.bincount(labels[d50], minlength=4).tolist() == [5, 2, 1, 0]  # round(2.5) = 2 (banker's)
    with pytest.raises(ValueError):
        split_query_database(labels, database_fraction=1.0)


def test_multi_view_collate_layout():
    batch = [(torch.full((3, 4), float(i)), torch.tensor(i + 10)) for i in range(2)]
    x, y = multi_view_collate(batch)
    assert x.shape == (6, 4) and y.tolist() == [10, 10, 10, 11, 11, 11]
    assert torch.all(x[:3] == 0) and torch.all(x[3:] == 1)


def test_multi_view_dataset_on_tensors_keeps_the_original_first():
    x, y = digits()
    ds = MultiViewDataset(torch.utils.data.TensorDataset(x[:20], y[:20]), num_views=3, indices=[4, 7])
    views, label = ds[1]
    assert views.shape == (3, 64) and int(label) == int(y[7]) and len(ds) == 2
    assert torch.equal(views[0], x[7]) and not torch.equal(views[1], x[7])
    assert ds.labels.tolist() == [int(y[4]), int(y[7])]


def test_tensor_view_augment_shifts_8x8_images():
    img = torch.zeros(64)
    img[3 * 8 + 3] = 1.0  # one pixel at (3, 3)
    out = TensorViewAugment(max_shift=1, noise_std=0.0, generator=torch.Generator().manual_seed(0))(img)
    r, c = divmod(int(out.argmax()), 8)
    assert out.sum() == 1.0 and abs(r - 3) <= 1 and abs(c - 3) <= 1


def test_multi_view_dataset_on_image_folder_uses_randaugment(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    datasets = pytest.importorskip("torchvision.datasets")
    transforms = pytest.importorskip("torchvision.transforms")
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            pil.fromarray(arr).save(tmp_path / c / f"{i}.png")
    folder = datasets.ImageFolder(
        str(tmp_path), transform=transforms.Compose([transforms.Resize(16), transforms.ToTensor()])
    )
    ds = MultiViewDataset(folder, num_views=3)
    torch.manual_seed(0)
    views, label = ds[2]
    assert views.shape == (3, 3, 16, 16) and int(label) == 1
    assert torch.equal(views[0], folder[2][0])  # view 0 = the dataset's own transform of the original
    x, y = multi_view_collate([ds[0], ds[3]])
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]

    class PathImages(torch.utils.data.Dataset):  # the main job's image splits: paths, labels, transform
        def __init__(self):
            self.paths = [p for p, _ in folder.samples]
            self.labels = [7 + c for _, c in folder.samples]
            self.transform = folder.transform

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            raise AssertionError("MultiViewDataset should load the raw image itself")

    views, label = MultiViewDataset(PathImages(), num_views=2)[3]
    assert views.shape == (2, 3, 16, 16) and int(label) == 8 and torch.equal(views[0], folder[3][0])


# ---------------------------------------------------------------- refresher


def test_refresher_embeds_in_eval_mode_without_grad_and_restores_train_mode():
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    model.train()

    def embed(x):
        seen.append((model.training, torch.is_grad_enabled(), x.shape[0]))
        return make_embed_fn(model)(x)

    loss = DMCACLoss(3, 4, num_views=2)
    data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10) % 3)
    refresher = DatabaseRefresher(loss, data, embed, every_epochs=2, batch_size=4, modules=[model], progress=False)
    refresher.refresh()
    assert loss.db_embeddings.shape == (10, 4) and loss.db_labels.tolist() == (torch.arange(10) % 3).tolist()
    assert [s[2] for s in seen] == [4, 4, 2] and not any(s[1] for s in seen) and model.training
    with torch.no_grad():  # eval mode: dropout off, so the database is the deterministic embedding
        model.eval()
        expected = torch.nn.functional.normalize(model(data.tensors[0]), dim=1)
        model.train()
    assert torch.allclose(loss.db_embeddings, expected, atol=1e-6)
    for _ in range(3):
        refresher.end_of_epoch_hook(None)
    assert refresher.num_refreshes == 2  # once by hand, once after epoch 2
    it = DatabaseRefresher(loss, data, embed, every_epochs=None, every_iterations=3, progress=False)
    for _ in range(7):
        it.end_of_iteration_hook(None)
    assert it.num_refreshes == 2


# ---------------------------------------------------------------- miner


def test_miner_matches_brute_force_and_feeds_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(6, 5, generator=g, requires_grad=True), torch.randint(3, (6,), generator=g)
    ref, ref_labels = torch.randn(20, 5, generator=g), torch.randint(3, (20,), generator=g)
    a1, p, a2, n = DatabaseKNNMiner(k=4)(emb, labels, ref, ref_labels)
    cos = torch.nn.functional.normalize(emb.detach(), dim=1) @ torch.nn.functional.normalize(ref, dim=1).T
    expected = {(i, int(j)) for i in range(6) for j in cos[i].topk(4).indices}
    got = set(zip(a1.tolist(), p.tolist())) | set(zip(a2.tolist(), n.tolist()))
    assert got == expected and len(a1) + len(a2) == 24
    assert bool((labels[a1] == ref_labels[p]).all()) and bool((labels[a2] != ref_labels[n]).all())
    value = ContrastiveLoss()(emb, labels, (a1, p, a2, n), ref, ref_labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all()


def test_miner_excludes_self_and_honours_distance():
    emb, labels = torch.randn(8, 3), torch.arange(8) % 2
    a1, p, a2, n = DatabaseKNNMiner(k=2)(emb, labels)
    assert not bool((a1 == p).any()) and not bool((a2 == n).any()) and len(a1) + len(a2) == 16
    a1, p, a2, n = DatabaseKNNMiner(k=1, distance=LpDistance(normalize_embeddings=False))(emb, labels)
    d = torch.cdist(emb, emb) + torch.eye(8) * 1e9
    nearest = {(i, int(d[i].argmin())) for i in range(8)}
    assert set(zip(a1.tolist(), p.tolist())) | set(zip(a2.tolist(), n.tolist())) == nearest


# ---------------------------------------------------------------- registration and training


def test_registration_metadata():
    meta = pml_plugins.get_entry("loss", "dmcac").spec
    assert meta.multi_view is True and meta.database_refresh is True and meta.loss_optimizer is True
    assert meta.retrieval_distance == "cosine" and meta.training_setup is training_setup
    assert isinstance(meta.loss_lr, float) and meta.summary and meta.paper and meta.tags
    assert pml_plugins.get_miner("database_knn") is DatabaseKNNMiner
    assert isinstance(pml_plugins.create_loss("dmcac", num_classes=3, embedding_size=4), DMCACLoss)


@pytest.mark.slow
def test_training_setup_trains_in_metric_loss_only_on_digits():
    x, y = digits()
    train = y < 5  # class-disjoint: train 0-4, retrieve 5-9
    dataset = torch.utils.data.TensorDataset(x[train], y[train])
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    embedder = torch.nn.Linear(64, 4)
    model = torch.nn.Sequential(trunk, embedder)
    with torch.no_grad():
        before = recall_at_1(model(x[~train]), y[~train])
    loss = DMCACLoss(num_classes=5, embedding_size=4, num_views=2, k=4)
    context = TrainingContext(
        trunk=trunk,
        embedder=embedder,
        train_dataset=dataset,
        batch_size=32,
        epochs=4,
        device=torch.device("cpu"),
        seed=0,
        options={"progress": False},
    )
    setup = training_setup(loss, context)
    assert isinstance(setup, TrainingSetup) and setup.views_per_sample == 2
    queries = setup.train_dataset
    db_rows = len(dataset) - len(queries)
    assert 0.18 < db_rows / len(dataset) < 0.22  # the 80/20 split
    xb, yb = setup.collate_fn([queries[0], queries[1]])
    assert xb.shape == (4, 64) and yb[0] == yb[1] and yb[2] == yb[3]

    batches = []
    forward = loss.forward

    def spy(emb, labels, *args, **kwargs):  # the trainer hands the loss B*A rows
        batches.append((emb.shape[0], bool((labels.view(-1, 2)[:, 0] == labels.view(-1, 2)[:, 1]).all())))
        return forward(emb, labels, *args, **kwargs)

    loss.forward = spy
    adam = torch.optim.Adam
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": adam(trunk.parameters(), lr=3e-3),
            "embedder_optimizer": adam(embedder.parameters(), lr=3e-3),
            "metric_loss_optimizer": adam(loss.parameters(), lr=1e-2),
        },
        batch_size=32,
        loss_funcs={"metric_loss": loss},
        mining_funcs={},
        dataset=queries,
        collate_fn=setup.collate_fn,
        end_of_epoch_hook=setup.end_of_epoch_hook,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    with one_thread():
        setup.before_training()
        assert loss.db_embeddings.shape == (db_rows, 4)
        first_db = loss.db_embeddings.clone()
        trainer.train(num_epochs=4)
    refresher = setup.before_training.__self__
    assert refresher.num_refreshes == 5  # before training + after each of 4 epochs
    assert not torch.allclose(first_db, loss.db_embeddings)  # re-embedded with the trained model
    assert batches and all(rows == 64 or rows % 2 == 0 for rows, _ in batches) and all(ok for _, ok in batches)
    assert trunk.training and embedder.training  # the refresh restored train mode
    with torch.no_grad():
        after = recall_at_1(model(x[~train]), y[~train])
    # measured with these seeds: R@1 on the unseen classes 0.50 -> 0.70
    assert after > before + 0.1 and after > 0.6, (before, after)


@pytest.mark.slow
def test_example_script_runs():
    with one_thread():
        result = runpy.run_path(str(REPO / "examples" / "dmcac_trainer.py"), run_name="__main__")
    assert result["recall_after"] > result["recall_before"]


def test_training_setup_options():
    x, y = digits()
    dataset = torch.utils.data.TensorDataset(x[:200], y[:200])
    model = torch.nn.Linear(64, 8)
    loss = DMCACLoss(10, 8, num_views=3, k=4)

    def context(**options):
        return TrainingContext(
            trunk=model,
            embedder=torch.nn.Identity(),
            train_dataset=dataset,
            batch_size=8,
            epochs=1,
            device=torch.device("cpu"),
            seed=1,
            options={"progress": False, **options},
        )

    with pytest.raises(ValueError, match="unknown DMCAC training options"):
        training_setup(loss, context(refresh=2))
    with pytest.raises(ValueError, match="num_views=3"):
        training_setup(loss, context(views=6))
    setup = training_setup(loss, context(views=3, database_fraction=0.5, refresh_every_iterations=2))
    assert setup.end_of_epoch_hook is None and setup.end_of_iteration_hook is not None
    assert 90 <= 200 - len(setup.train_dataset) <= 110  # half of each class in the database
    pytest.importorskip("faiss")
    setup = training_setup(loss, context(index="ivf"))
    setup.before_training()  # no context.embed: the trunk + embedder are used in eval mode
    assert loss.db_index is not None and loss.db_index.ntotal == loss.db_embeddings.shape[0]
    assert torch.isfinite(loss(torch.randn(6, 8), torch.tensor([1, 1, 1, 2, 2, 2])))


@pytest.mark.parametrize(
    "context_progress, option, expected",
    [(False, None, False), (True, None, True), (True, False, False), (False, True, True)],
)
def test_refresh_progress_follows_the_main_job_unless_set(context_progress, option, expected):
    g = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 8, generator=g), torch.arange(40) % 5)
    model = torch.nn.Linear(8, 4)
    context = TrainingContext(
        trunk=model,
        embedder=torch.nn.Identity(),
        train_dataset=dataset,
        batch_size=8,
        epochs=1,
        device=torch.device("cpu"),
        options={} if option is None else {"progress": option},
        progress=context_progress,
    )
    setup = training_setup(DMCACLoss(num_classes=5, embedding_size=4, num_views=2, k=2), context)
    refresher = setup.before_training.__self__
    assert isinstance(refresher, DatabaseRefresher) and refresher.progress is expected


def _sharded_refresh_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same model on every rank, as DDP guarantees
        model = torch.nn.Linear(8, 4)
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(23, 8, generator=g), torch.arange(23) % 5)
        loss = DMCACLoss(num_classes=5, embedding_size=4, num_views=2, k=2)
        calls = []
        refresher = DatabaseRefresher(
            loss,
            data,
            lambda x: calls.append(len(x)) or model(x),
            batch_size=4,
            progress=False,
            rank=rank,
            world_size=world,
        )
        refresher.refresh()
        torch.save({"db": loss.db_embeddings, "labels": loss.db_labels, "rows": sum(calls)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_database_refresh_is_sharded_across_ranks_and_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_refresh_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(23, 8, generator=g), torch.arange(23) % 5)
    single = DMCACLoss(num_classes=5, embedding_size=4, num_views=2, k=2)
    DatabaseRefresher(single, data, lambda x: model(x), batch_size=4, progress=False).refresh()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rows"] for r in results] == [12, 11]  # each rank embedded its own slice only
    for r in results:
        assert torch.equal(r["labels"], single.db_labels)
        torch.testing.assert_close(r["db"], single.db_embeddings, rtol=1e-6, atol=1e-6)


def test_refresher_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        DatabaseRefresher(DMCACLoss(num_classes=5, embedding_size=4), [], lambda x: x, rank=2, world_size=2)
