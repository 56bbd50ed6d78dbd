"""`pml-plugins train` end to end (tiny budgets) and the pipeline pieces it honours."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

import pml_plugins
from pml_plugins import TrainingSetup
from pml_plugins.cli import main
from pml_plugins.pipeline import TrainConfig, build_loss, run_training
from pml_plugins.pipeline import data as data_mod
from pml_plugins.pipeline.train import choose_m, constructor_parameters

TINY = ["--epochs", "1", "--iterations-per-epoch", "3", "--batch-size", "32", "--no-progress", "--no-report"]
METRIC_KEYS = {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "ndcg_at_8", "precision_at_1"}


# -- an in-process plugin: a loss that declares a training_setup (as DMCAC does) ------------------
class TwoViewLoss(pml_losses.BaseMetricLossFunction):
    """Contrastive-style loss on B*2 rows; records what the main job handed it."""

    def __init__(self, margin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        self.scale = torch.nn.Parameter(torch.ones(1))  # owns a parameter -> needs a loss optimizer
        self.batch_rows: list[int] = []

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.batch_rows.append(len(embeddings))
        e = torch.nn.functional.normalize(embeddings, dim=1) * self.scale
        sim = e @ e.T
        same = (labels[:, None] == labels[None]).float()
        loss = ((1 - sim) * same + torch.relu(sim - self.margin) * (1 - same)).mean(dim=1)
        return {"loss": {"losses": loss, "indices": torch.arange(len(e)), "reduction_type": "element"}}


CALLS: dict = {}


def two_view_setup(loss, context):
    CALLS.update(
        options=dict(context.options),
        batch_size=context.batch_size,
        epochs=context.epochs,
        embed_shape=tuple(context.embed(context.train_dataset[0][0].unsqueeze(0)).shape),
        epochs_ended=0,
    )
    views = int(context.options.get("views", 2))

    def collate(batch):  # B samples -> B*views consecutive rows with equal labels
        x = torch.stack([b[0] for b in batch]).repeat_interleave(views, 0)
        x = x + 0.05 * torch.randn_like(x)
        y = torch.as_tensor([int(b[1]) for b in batch]).repeat_interleave(views, 0)
        return x, y

    def end_of_epoch(trainer):
        CALLS["epochs_ended"] += 1

    return TrainingSetup(
        collate_fn=collate,
        end_of_epoch_hook=end_of_epoch,
        before_training=lambda: CALLS.update(before=True),
        views_per_sample=views,
    )


class _Plugin:
    @pml_plugins.hookimpl
    def register_losses(self, register):
        register(
            TwoViewLoss,
            name="two_view_test",
            multi_view=True,
            training_setup=two_view_setup,
            sampler="m_per_class",
            m_per_class=8,
            loss_optimizer=True,
            loss_lr=0.05,
        )


@pytest.fixture
def two_view_plugin():
    name = pml_plugins.register_plugin(_Plugin(), name="train_test_plugin")
    CALLS.clear()
    yield
    pml_plugins.unregister_plugin(name)


# -- end to end ---------------------------------------------------------------------------------------
def test_train_cli_writes_files_and_config_reruns_identically(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--loss", "proxy_anchor", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "R@1" in printed and "MAP@R" in printed and "wrote" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics["metrics"]) and metrics["epochs_run"] == 1
    assert all(0.0 <= v <= 1.0 for v in metrics["metrics"].values())
    assert metrics["iterations_per_epoch"] == 3 and metrics["seconds_per_epoch"] > 0
    config = json.loads((out / "config.json").read_text())
    resolved = config["resolved"]
    assert resolved["loss"] == "builtin:proxy_anchor" and resolved["loss_lr"] == 0.01  # registry's loss_lr
    assert resolved["sampler"] == "random" and resolved["loss_args"] == {"num_classes": 5, "embedding_size": 64}
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"trunk", "embedder", "loss", "optimizers", "rng", "config"} <= set(state) and state["epoch"] == 1
    assert state["loss"]["proxies"].shape == (5, 64)
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # config.json is enough to rerun: same seed on CPU -> the same metrics
    assert (
        main(
            [
                "train",
                "--config",
                str(out / "config.json"),
                "--out",
                str(tmp_path / "again"),
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["metrics"]
    for key, value in metrics["metrics"].items():
        assert again[key] == pytest.approx(value, abs=1e-6)


def test_same_seed_same_metrics_other_seed_differs():
    cfg = dict(loss="contrastive", epochs=1, iterations_per_epoch=4, batch_size=32)
    a = run_training(TrainConfig(**cfg, seed=3), progress=False).metrics
    b = run_training(TrainConfig(**cfg, seed=3), progress=False).metrics
    c = run_training(TrainConfig(**cfg, seed=4), progress=False).metrics
    assert all(abs(a[k] - b[k]) <= 1e-6 for k in a)
    assert any(abs(a[k] - c[k]) > 1e-6 for k in a)


def test_pair_loss_gets_m_per_class_sampler_and_normalized_softmax_a_loss_optimizer(tmp_path):
    r = run_training(
        TrainConfig(loss="contrastive", epochs=1, iterations_per_epoch=2, batch_size=32, out=str(tmp_path / "c")),
        progress=False,
    )
    resolved = r.config["resolved"]
    assert resolved["sampler"] == "MPerClassSampler" and resolved["m"] == 8  # 32 from 5 classes: m=8 fits
    assert resolved["loss_lr"] is None  # no parameters, no loss optimizer
    r = run_training(
        TrainConfig(loss="normalized_softmax", epochs=1, iterations_per_epoch=2, batch_size=32, loss_lr=0.2),
        progress=False,
    )
    assert r.config["resolved"]["loss_lr"] == 0.2 and r.config["resolved"]["sampler"] == "random"


def test_training_setup_is_called_and_merged(two_view_plugin, tmp_path):
    r = run_training(
        TrainConfig(
            loss="two_view_test", loss_args={"margin": 0.3, "views": 3}, epochs=2, iterations_per_epoch=2, batch_size=16
        ),
        progress=False,
    )
    assert CALLS["options"] == {"views": 3}  # not a constructor argument -> a training option
    assert CALLS["before"] is True and CALLS["epochs_ended"] == 2 and CALLS["batch_size"] == 16
    assert CALLS["embed_shape"] == (1, 64)
    resolved = r.config["resolved"]
    assert resolved["training_setup"]["views_per_sample"] == 3
    assert resolved["m"] == 8 and resolved["loss_lr"] == 0.05  # m_per_class and loss_lr from metadata
    assert resolved["loss_args"] == {"margin": 0.3}


def test_loss_signature_handling():
    # CosFaceLoss(*args, margin, scale, **kwargs) forwards num_classes/embedding_size to its base
    names, open_ended = constructor_parameters(pml_losses.CosFaceLoss)
    assert {"num_classes", "embedding_size", "margin", "reducer"} <= set(names) and not open_ended
    loss, entry, args, _ = build_loss("cosface", num_classes=7, embedding_size=12, loss_args={"margin": 0.2})
    assert isinstance(loss, pml_losses.CosFaceLoss) and loss.W.shape == (12, 7) and loss.margin == 0.2
    loss, *_ = build_loss("contrastive", num_classes=7, embedding_size=12, loss_args={"distance": "CosineSimilarity()"})
    assert type(loss.distance).__name__ == "CosineSimilarity"  # no num_classes passed to ContrastiveLoss
    with pytest.raises(TypeError, match="did you mean 'margin'"):
        build_loss("proxy_anchor", num_classes=3, embedding_size=4, loss_args={"margn": 0.1})


def test_choose_m():
    assert choose_m(64, 5, None) == 16 and choose_m(32, 100, None) == 4
    with pytest.raises(ValueError, match="must divide"):
        choose_m(30, 10, 4)
    with pytest.raises(ValueError, match="at most 20 samples"):
        choose_m(64, 5, 4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss", "proxy_anchr"], "Did you mean 'proxy_anchor'"),
        (["--loss", "proxy_anchor", "--miner", "multi_similarty"], "Did you mean 'multi_similarity'"),
        (["--dataset", "digitz"], "Did you mean 'digits'"),
        (["--dataset", "imagefolder:/no/such/folder"], "does not exist"),
        (["--backbone", "cnm"], "Did you mean 'cnn'"),
        (["--backbone", "timm:resnet5O"], "unknown timm model"),
        (["--loss", "proxy_anchor", "--loss-arg", "alpah=3"], "did you mean 'alpha'"),
        (["--loss", "contrastive", "--m", "4", "--batch-size", "64"], "incompatible with the m-per-class sampler"),
        (["--loss", "contrastive", "--m", "5", "--batch-size", "32"], "must divide"),
        (["--config", "/no/such/file.toml"], "does not exist"),
    ],
)
def test_clear_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["train", *argv, "--out", str(tmp_path / "x"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("pml-plugins train: error:")


def _image_folder(root: Path, classes: int, per_class: int = 4, size: int = 20) -> Path:
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_fewer_than_two_classes_per_split(tmp_path, capsys):
    folder = _image_folder(tmp_path / "imgs", classes=3)  # first half: 1 class
    assert main(["train", "--dataset", f"imagefolder:{folder}", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "at least 2 classes per split" in capsys.readouterr().err


def test_timm_backbone_on_an_image_folder_with_gem(tmp_path):
    folder = _image_folder(tmp_path / "imgs", classes=4, per_class=6)
    out = tmp_path / "timm"
    assert (
        main(
            [
                "train",
                "--loss",
                "normalized_softmax",
                "--dataset",
                f"imagefolder:{folder}",
                "--backbone",
                "timm:test_resnet",
                "--pooling",
                "gem",
                "--image-size",
                "32",
                "--embedding-size",
                "16",
                "--epochs",
                "1",
                "--batch-size",
                "6",
                "--head-norm",
                "layernorm",
                "--out",
                str(out),
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())["resolved"]
    assert "timm:test_resnet [random init]" in config["model"] and "pool=gem" in config["model"]
    assert "train 12 samples / 2 classes" in config["data"]
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["metrics"]["recall_at_1"])


def test_pretrained_weights_missing_is_clear(capsys, tmp_path):
    assert (
        main(
            [
                "train",
                "--backbone",
                "timm:test_resnet",
                "--pretrained",
                str(tmp_path / "w.pth"),
                "--dataset",
                "digits",
                "--out",
                str(tmp_path / "o"),
                *TINY,
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_embeddings_npz_and_yaml_config_with_flag_override(tmp_path):
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(6), 20)
    features = rng.randn(6, 10)[labels] + 0.3 * rng.randn(len(labels), 10)
    np.savez(tmp_path / "feats.npz", features=features.astype(np.float32), labels=labels)
    (tmp_path / "c.yaml").write_text(
        f"loss: soft_triple\ndataset: embeddings:{tmp_path / 'feats.npz'}\n"
        f"epochs: 5\nbatch_size: 20\nembedding_size: 8\nloss_args:\n  centers_per_class: 2\n"
    )
    out = tmp_path / "o"
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "c.yaml"),
                "--epochs",
                "1",
                "--out",
                str(out),
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 1 and config["batch_size"] == 20  # flag over file over default
    assert config["resolved"]["backbone"] == "identity" and config["resolved"]["loss_args"]["centers_per_class"] == 2
    assert "train 60 samples / 3 classes" in config["resolved"]["data"]


def test_toml_config_unknown_key_is_reported(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('loss = "proxy_anchor"\nepoch = 3\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown option 'epoch'. Did you mean 'epochs'" in capsys.readouterr().err


def test_digits_splits_are_class_disjoint():
    shifted, raw = data_mod.load_data("digits"), data_mod.load_data("digits:raw")
    assert shifted.train_classes == [0, 1, 2, 3, 4] and shifted.test_classes == [5, 6, 7, 8, 9]
    assert shifted.input_shape == (1, 12, 12) and raw.input_shape == (1, 8, 8)
    assert sorted(np.unique(shifted.test_labels)) == [0, 1, 2, 3, 4]  # remapped to 0..C-1
    x, _ = shifted.train[0]
    assert float(x.sum()) == pytest.approx(float(raw.train[0][0].sum()))  # same digit, moved


def test_paper_recipes_parse_and_fit_the_installed_losses():
    """examples/configs/*.toml: valid options, real timm models, loss arguments the loss takes."""
    import timm

    from pml_plugins.pipeline.config import build_config, check_keys, config_fields, load_config_file

    recipes = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.toml"))
    assert {p.stem for p in recipes} >= {"cam", "mpa", "adaptive_margin", "group_loss", "dmcac"}
    for path in recipes:
        values = load_config_file(str(path))
        check_keys(values, config_fields(), str(path))
        cfg = build_config(values, {})
        assert timm.is_model(cfg.backbone.split(":", 1)[1]), path
        if cfg.loss in pml_plugins.list_losses():  # plugins written concurrently may be absent
            loss_args = {k: v for k, v in cfg.loss_args.items()}
            build_loss(cfg.loss, num_classes=10, embedding_size=16, loss_args=loss_args)


class _SignCodes(torch.nn.Module):
    """An independent route to the 'bits' codes: +1 above the row mean, -1 elsewhere."""

    def __init__(self, embedder: torch.nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, x):
        e = self.embedder(x)
        return torch.where(e > e.mean(dim=1, keepdim=True), 1.0, -1.0)


def test_binarized_evaluation_equals_evaluating_sign_codes():
    from pml_plugins.pipeline.evaluate import evaluate
    from pml_plugins.pipeline.models import build_model

    torch.manual_seed(0)
    splits = data_mod.load_data("digits")
    model = build_model("mlp", embedding_size=32, input_shape=data_mod.feature_shape("digits"))
    trunk, embedder = model.trunk, model.embedder
    kw = dict(device=torch.device("cpu"), ks=[1, 2, 4], progress=False)
    bits = evaluate(trunk, embedder, splits.test, binarize=True, **kw)
    reference = evaluate(trunk, _SignCodes(embedder), splits.test, **kw)
    plain = evaluate(trunk, embedder, splits.test, **kw)
    assert set(bits) == set(reference)
    for key in reference:
        assert bits[key] == pytest.approx(reference[key], abs=1e-9), key
    assert any(abs(bits[k] - plain[k]) > 1e-3 for k in plain)  # codes are not the float embeddings
    with pytest.raises(ValueError, match="retrieval_distance must be 'cosine'"):
        evaluate(trunk, embedder, splits.test, binarize=True, retrieval_distance="euclidean", **kw)


def test_train_and_compare_with_eval_binarize(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--loss", "normalized_softmax", "--eval-binarize", "--out", str(out), *TINY]) == 0
    assert "bits: R@1" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {f"bits_{k}" for k in METRIC_KEYS} <= set(metrics)
    assert json.loads((out / "config.json").read_text())["eval_binarize"] is True
    assert (
        main(["compare", "--losses", "normalized_softmax", "--eval-binarize", "--out", str(tmp_path / "cmp"), *TINY])
        == 0
    )
    assert "bits R@1" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["digits", "digits:raw"])
def test_identity_backbone_on_image_shaped_digits(dataset, tmp_path):
    result = run_training(
        TrainConfig(
            loss="contrastive",
            dataset=dataset,
            backbone="identity",
            epochs=1,
            iterations_per_epoch=2,
            batch_size=32,
            out=str(tmp_path / "run"),
        ),
        progress=False,
    )
    assert 0.0 < result.metrics["recall_at_1"] <= 1.0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    side = 12 if dataset == "digits" else 8
    assert state["embedder"]["fc.weight"].shape[1] == side * side  # the head sees every pixel
