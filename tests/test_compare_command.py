"""`pml-plugins compare` end to end: table, CSV, Markdown, plot, failing losses, Ctrl-C."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

import pml_plugins
from pml_plugins.cli import main
from pml_plugins.pipeline import compare as cmp

TINY = ["--epochs", "1", "--iterations-per-epoch", "3", "--batch-size", "32", "--no-progress", "--no-report"]


class BrokenLoss(pml_losses.BaseMetricLossFunction):
    """Fails inside training, as a buggy plugin would."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        raise RuntimeError("deliberately broken for the test")


class InterruptingLoss(pml_losses.BaseMetricLossFunction):
    """Simulates Ctrl-C in the middle of a run."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        raise KeyboardInterrupt


class _Plugin:
    @pml_plugins.hookimpl
    def register_losses(self, register):
        register(BrokenLoss, name="broken_test_loss", summary="raises")
        register(InterruptingLoss, name="interrupting_test_loss", summary="Ctrl-C")


@pytest.fixture
def test_plugin():
    name = pml_plugins.register_plugin(_Plugin(), name="compare_test_plugin")
    yield
    pml_plugins.unregister_plugin(name)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_compare_table_files_and_a_failing_loss(test_plugin, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--losses",
                "proxy_anchor,broken_test_loss,contrastive",
                "--out",
                str(out),
                "--loss-arg",
                "proxy_anchor.margin=0.2",
                "--seeds",
                "2",
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    table = printed[printed.index("loss ") :]
    assert "untrained (floor)" in table and "error: seed 0: RuntimeError: deliberately broken" in table
    assert "2 trained, 1 failed" in printed
    assert "Protocol: digits, 2 seeds (0-1), mean ± 95% t-interval" in printed  # the one-line caption
    rows = _csv(out / "results.csv")
    assert [r["loss"] for r in rows] == ["untrained (floor)", "proxy_anchor", "broken_test_loss", "contrastive"]
    assert [r["status"] for r in rows] == ["floor", "ok", "error", "ok"]
    assert "deliberately broken" in rows[2]["error"] and rows[2]["recall_at_1"] == ""
    for r in (rows[1], rows[3]):
        assert 0 <= float(r["recall_at_1"]) <= 1 and float(r["seconds_per_epoch"]) > 0 and r["peak_memory_mb"] != ""
        assert float(r["recall_at_1_ci95"]) >= 0 and r["seeds"] == "2" and r["tied_with_best"] in ("True", "False")
        assert 0 <= float(r["val_map_at_r"]) <= 1  # the selected epoch's validation value, named as such
    assert "True" in (rows[1]["tied_with_best"], rows[3]["tied_with_best"])  # the best is tied with itself
    runs = _csv(out / "runs.csv")
    assert [(r["loss"], r["seed"]) for r in runs] == [
        (name, str(seed))
        for name in ("untrained (floor)", "proxy_anchor", "broken_test_loss", "contrastive")
        for seed in (0, 1)
    ]
    md = (out / "results.md").read_text()
    assert "| untrained (floor) |" in md and "| proxy_anchor |" in md and "R@1" in md and "nDCG@8" in md
    assert " ± " in md and "scipy.stats.ttest_rel" in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("untrained", "proxy_anchor", "contrastive"):
        for seed in (0, 1):
            assert (out / "runs" / name / f"seed{seed}" / "metrics.json").exists()
    assert "Traceback" in (out / "runs" / "broken_test_loss" / "seed0" / "error.txt").read_text()
    config = json.loads((out / "runs" / "proxy_anchor" / "seed0" / "config.json").read_text())
    assert config["loss_args"] == {"margin": 0.2}  # per-loss argument reached only its loss
    assert json.loads((out / "runs" / "contrastive" / "seed1" / "config.json").read_text())["loss_args"] == {}
    # the same model and budget for every loss, seeds 0..N-1: the floor is that model untrained
    assert config["seed"] == 0 and config["epochs"] == 1
    assert json.loads((out / "runs" / "proxy_anchor" / "seed1" / "config.json").read_text())["seed"] == 1


def test_ctrl_c_keeps_completed_runs(test_plugin, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--losses",
                "normalized_softmax,interrupting_test_loss,contrastive",
                "--out",
                str(out),
                "--seeds",
                "1",
                *TINY,
            ]
        )
        == 130
    )
    assert "interrupted" in capsys.readouterr().err
    rows = _csv(out / "results.csv")
    assert [r["loss"] for r in rows] == ["untrained (floor)", "normalized_softmax"]
    done = json.loads((out / "runs" / "normalized_softmax" / "seed0" / "metrics.json").read_text())
    assert done["metrics"]["recall_at_1"] > 0
    assert not (out / "runs" / "contrastive").exists()
    assert not list(out.rglob("*.tmp"))


def test_default_losses_are_plugins_plus_pml_references(test_plugin):
    names = cmp.default_losses()
    assert names[-4:] == ["proxy_anchor", "soft_triple", "normalized_softmax", "contrastive"]
    assert "broken_test_loss" in names and "interrupting_test_loss" in names
    assert "triplet_margin" not in names  # other PML built-ins are not compared by default


def test_compare_errors(tmp_path, capsys):
    assert main(["compare", "--losses", "proxy_anchor,nope_loss", "--out", str(tmp_path), *TINY]) == 2
    assert "unknown loss 'nope_loss'" in capsys.readouterr().err
    assert main(["compare", "--losses", "proxy_anchor", "--loss-arg", "margin=0.1", "--out", str(tmp_path), *TINY]) == 2
    assert "LOSS.margin" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_compare_config_file_as_a_subprocess(tmp_path):
    """The installed command line with a TOML config (per-loss arguments in a table)."""
    (tmp_path / "c.toml").write_text(
        'losses = ["proxy_anchor", "soft_triple"]\nepochs = 1\niterations_per_epoch = 2\nbatch_size = 32\n'
        "embedding_size = 16\nseeds = 1\nval_classes = 0\n[loss_args.soft_triple]\ncenters_per_class = 3\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pml_plugins",
            "compare",
            "--config",
            str(tmp_path / "c.toml"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--no-report",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "untrained (floor)" in result.stdout and "soft_triple" in result.stdout
    assert "1 seed (0): no interval (n/a)" in result.stdout and "no validation: last epoch reported" in result.stdout
    st = json.loads((tmp_path / "o" / "runs" / "soft_triple" / "seed0" / "config.json").read_text())
    assert st["loss_args"] == {"centers_per_class": 3} and st["embedding_size"] == 16
    weights = torch.load(tmp_path / "o" / "runs" / "soft_triple" / "seed0" / "checkpoint.pt", weights_only=True)["loss"]
    # embedding 16 x (5 training classes x 3 centers): val_classes = 0 kept every training class
    assert weights["fc"].shape == (16, 5 * 3)
    assert not (tmp_path / "o" / "runs" / "soft_triple" / "seed1").exists()


class ArgRecordingLoss(pml_losses.ContrastiveLoss):
    """A PML loss with one extra argument, so a test can see which arguments compare passed."""

    def __init__(self, demo_flag: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.demo_flag = demo_flag


class _DemoPlugin:
    @pml_plugins.hookimpl
    def register_losses(self, register):
        register(
            ArgRecordingLoss, name="demo_args_test_loss", summary="records demo_flag", demo_loss_args={"demo_flag": 0.0}
        )


@pytest.fixture
def demo_plugin():
    name = pml_plugins.register_plugin(_DemoPlugin(), name="demo_args_test_plugin")
    yield
    pml_plugins.unregister_plugin(name)


def test_demo_loss_args_apply_on_digits_only_and_user_args_replace_them(demo_plugin):
    losses = ["demo_args_test_loss", "contrastive"]
    assert cmp.demo_loss_args("digits", losses, {}) == {"demo_args_test_loss": {"demo_flag": 0.0}}
    assert cmp.demo_loss_args("digits:raw", losses, {}) == {"demo_args_test_loss": {"demo_flag": 0.0}}
    assert cmp.demo_loss_args("imagefolder:/data", losses, {}) == {}
    assert cmp.demo_loss_args("digits", losses, {"demo_args_test_loss": {"pos_margin": 0.1}}) == {}


def test_compare_runs_demo_args_and_names_the_row(demo_plugin, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--losses", "demo_args_test_loss", "--out", str(out), "--seeds", "1", *TINY]) == 0
    assert "demo_args_test_loss (demo_flag=0.0)" in capsys.readouterr().out
    config = json.loads((out / "runs" / "demo_args_test_loss" / "seed0" / "config.json").read_text())
    assert config["loss_args"] == {"demo_flag": 0.0}
    rows = _csv(out / "results.csv")
    assert [r for r in rows if r["loss"] == "demo_args_test_loss (demo_flag=0.0)"]
