"""The comparison protocol end to end on tiny budgets: seeds, intervals, folds, tuning, resuming a
killed tuning run, the zero-loss warning, pairing by seed, train --seeds, the glyphs dataset."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

import pml_plugins
from pml_plugins.cli import main
from pml_plugins.pipeline import TrainConfig, run_training
from pml_plugins.pipeline import data as data_mod

TINY = ["--epochs", "1", "--iterations-per-epoch", "3", "--batch-size", "32", "--embedding-size", "16", "--no-progress"]


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _t975_df1() -> float:
    return math.tan(0.475 * math.pi)  # Student's t with 1 df is Cauchy


def _p_df1(t: float) -> float:
    return 1 - 2 / math.pi * math.atan(abs(t))  # two-sided p-value, 1 df


def test_seeds_folds_and_tuning_end_to_end(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--losses",
                "proxy_anchor,contrastive",
                "--seeds",
                "2",
                "--folds",
                "2",
                "--tune",
                "2",
                "--out",
                str(out),
                *TINY,
                "--epochs",
                "2",
                "--iterations-per-epoch",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "2 class-disjoint folds of the training classes" in printed
        and "2 Optuna TPE trials per loss" in printed
        and "the mean of its 2 fold models per seed" in printed
        and "scipy.stats.ttest_rel" in printed
    )
    runs = _csv(out / "runs.csv")
    assert [(r["loss"], r["seed"], r["fold"]) for r in runs] == [
        ("untrained (floor)", "0", ""),
        ("untrained (floor)", "1", ""),
    ] + [(loss, str(s), str(f)) for loss in ("proxy_anchor", "contrastive") for s in (0, 1) for f in (0, 1)]
    rows = {r["loss"]: r for r in _csv(out / "results.csv")}
    assert rows["proxy_anchor"]["seeds"] == "2" and rows["proxy_anchor"]["folds"] == "2"

    # mean and interval by hand: a seed's value is the mean of its fold models, the interval is over seeds
    per_seed = {}
    for loss in ("proxy_anchor", "contrastive"):
        folds = [
            [
                json.loads((out / "runs" / loss / f"seed{s}" / f"fold{f}" / "metrics.json").read_text())["metrics"][
                    "map_at_r"
                ]
                for f in (0, 1)
            ]
            for s in (0, 1)
        ]  # full precision (runs.csv rounds)
        assert [float(r["map_at_r"]) for r in runs if r["loss"] == loss] == pytest.approx(
            [v for seed in folds for v in seed], abs=1e-6
        )
        a, b = (sum(f) / 2 for f in folds)
        per_seed[loss] = (a, b)
        assert float(rows[loss]["map_at_r"]) == pytest.approx((a + b) / 2, abs=2e-6)
        half = _t975_df1() * (abs(a - b) / math.sqrt(2)) / math.sqrt(2)
        assert float(rows[loss]["map_at_r_ci95"]) == pytest.approx(half, abs=2e-6)  # results.csv: 6 decimals
    # the tie: paired t-test over the two seeds against the best mean, by hand
    best, other = sorted(per_seed, key=lambda k: -sum(per_seed[k]))
    d = [x - y for x, y in zip(per_seed[other], per_seed[best])]
    if abs(d[0] - d[1]) > 1e-9:
        t = (sum(d) / 2) / (abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2))
        p = _p_df1(t)
        # recomputed from runs.csv's 6-decimal values: at 1 df, p moves by up to ~1e-4 with that rounding
        assert float(rows[other]["p_value_vs_best"]) == pytest.approx(p, abs=1e-3)
        if abs(p - 0.05) > 1e-3:
            assert rows[other]["tied_with_best"] == str(p >= 0.05)
    assert rows[best]["tied_with_best"] == "True"

    # folds: class-disjoint, covering the 5 training classes, the seeded split of each seed
    for seed in (0, 1):
        held = [
            json.loads((out / "runs" / "proxy_anchor" / f"seed{seed}" / f"fold{f}" / "metrics.json").read_text())[
                "val_classes"
            ]
            for f in (0, 1)
        ]
        assert not set(held[0]) & set(held[1]) and sorted(held[0] + held[1]) == list(range(5))
        assert [sorted(h) for h in held] == [f.tolist() for f in data_mod.class_folds(range(5), 2, seed)]
    # the reported epoch is the best validation epoch
    record = json.loads((out / "runs" / "contrastive" / "seed1" / "fold0" / "metrics.json").read_text())
    history = [h["val_map_at_r"] for h in record["val_history"]]
    assert len(history) == 2 and record["best_epoch"] == 1 + int(np.argmax(history))
    assert record["val_metrics"]["val_map_at_r"] == pytest.approx(max(history))

    # tuning: one study per loss in OUT/optuna.db, 2 trials each; the best setting is what was retrained
    storage = f"sqlite:///{out / 'optuna.db'}"
    studies = {s.study_name.rsplit("-", 1)[0]: s for s in optuna.get_all_study_summaries(storage)}
    assert set(studies) == {"proxy_anchor", "contrastive"} and all(s.n_trials == 2 for s in studies.values())
    study = optuna.load_study(study_name=studies["proxy_anchor"].study_name, storage=storage)
    params = json.loads(rows["proxy_anchor"]["params"])
    assert params == study.best_params and set(params) == {"margin", "alpha", "loss_lr"}
    assert 0 <= params["margin"] <= 0.5 and 4 <= params["alpha"] <= 128 and 1e-4 <= params["loss_lr"] <= 0.1
    config = json.loads((out / "runs" / "proxy_anchor" / "seed1" / "fold1" / "config.json").read_text())
    assert config["loss_args"] == {"margin": params["margin"], "alpha": params["alpha"]}
    assert config["loss_lr"] == params["loss_lr"]
    assert "Tuned settings" in (out / "results.md").read_text()


# -- a killed tuning run continues from OUT/optuna.db -------------------------------------------------------
STOP = {"at": None, "built": 0}


class InterruptibleContrastive(pml_losses.ContrastiveLoss):
    """Contrastive, but its n-th construction raises KeyboardInterrupt (as Ctrl-C / a kill would)."""

    def __init__(self, *args, **kwargs):
        STOP["built"] += 1
        if STOP["at"] is not None and STOP["built"] == STOP["at"]:
            raise KeyboardInterrupt
        super().__init__(*args, **kwargs)


class _TunePlugin:
    @pml_plugins.hookimpl
    def register_losses(self, register):
        register(
            InterruptibleContrastive,
            name="interruptible_test_loss",
            sampler="m_per_class",
            search_space={"neg_margin": (0.5, 1.5), "pos_margin": (0.0, 0.3)},
        )


@pytest.fixture
def tune_plugin():
    name = pml_plugins.register_plugin(_TunePlugin(), name="tune_test_plugin")
    STOP.update(at=None, built=0)
    yield
    pml_plugins.unregister_plugin(name)


def test_a_killed_tuning_run_continues_and_ends_with_the_same_table(tune_plugin, tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    args = ["compare", "--losses", "interruptible_test_loss", "--seeds", "1", "--tune", "3", *TINY]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    STOP.update(at=2, built=0)  # the second trial is interrupted
    assert main([*args, "--out", str(tmp_path / "killed")]) == 130
    storage = f"sqlite:///{tmp_path / 'killed' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 2  # one finished, one interrupted
    STOP.update(at=None)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    assert "1/3 trials done" in capsys.readouterr().out  # continued, not restarted

    def finished(out):
        study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{out / 'optuna.db'}")
        return [t.params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    assert finished(tmp_path / "killed") == finished(tmp_path / "whole") and len(finished(tmp_path / "whole")) == 3
    whole, killed = (_csv(tmp_path / d / "results.csv") for d in ("whole", "killed"))
    for a, b in zip(whole, killed):
        assert a["params"] == b["params"] and a["map_at_r"] == b["map_at_r"] and a["recall_at_1"] == b["recall_at_1"]


def test_a_killed_comparison_with_validation_ends_with_the_same_table(tune_plugin, tmp_path, capsys):
    args = ["compare", "--losses", "proxy_anchor,interruptible_test_loss", "--seeds", "2", *TINY]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    STOP.update(at=2, built=0)  # the loss's seed-1 run is interrupted
    assert main([*args, "--out", str(tmp_path / "killed")]) == 130
    STOP.update(at=None)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before (same settings), kept") == 5  # 2 floors, 2 proxy_anchor, 1 of the loss
    assert "interruptible_test_loss seed 1: R@1" in printed  # trained again (its epoch selection restarts)
    whole, killed = (_csv(tmp_path / d / "runs.csv") for d in ("whole", "killed"))
    assert [(r["loss"], r["seed"], r["map_at_r"], r["val_map_at_r"], r["best_epoch"]) for r in whole] == [
        (r["loss"], r["seed"], r["map_at_r"], r["val_map_at_r"], r["best_epoch"]) for r in killed
    ]
    a, b = (_csv(tmp_path / d / "results.csv") for d in ("whole", "killed"))
    assert [(r["map_at_r"], r["map_at_r_ci95"], r["tied_with_best"]) for r in a] == [
        (r["map_at_r"], r["map_at_r_ci95"], r["tied_with_best"]) for r in b
    ]
    # another validation split is another run: nothing is reused
    assert main([*args, "--out", str(tmp_path / "killed"), "--val-classes", "0.6"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before") == 2 and printed.count("untrained (floor): done before") == 2  # floors only


# -- honest outputs ------------------------------------------------------------------------------------------
def test_a_loss_that_is_zero_for_whole_epochs_is_warned_and_marked(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(["compare", "--losses", "contrastive", "--seeds", "1", "--out", str(out), *TINY, "--batch-size", "1"]) == 0
    )  # one sample per batch: no pair, loss 0.0 at every iteration
    printed = capsys.readouterr().out
    assert "warning: contrastive seed 0: the loss was 0 for every iteration of epoch(s) 1" in printed
    assert "WARNING loss 0 for a whole epoch" in printed and "± n/a" in printed  # one seed: no interval
    (row,) = [r for r in _csv(out / "results.csv") if r["loss"] == "contrastive"]
    assert "loss 0 for a whole epoch in 1/1 run(s)" in row["warning"]
    assert row["map_at_r_ci95"] == "" and row["tied_with_best"] == "n/a"
    (run,) = [r for r in _csv(out / "runs.csv") if r["loss"] == "contrastive"]
    assert run["zero_loss_epochs"] == "1"


# -- pairing: the same seed gives every loss the same initial weights and the same batches -------------------
BATCHES: dict = {}


class RecordingLoss(pml_losses.ContrastiveLoss):
    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        BATCHES.setdefault(type(self).__name__, []).append(labels.tolist())
        return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)


class RecordingParamLoss(RecordingLoss):
    """Draws random numbers when built (as proxies do), which must not change the batches."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.unused = torch.nn.Parameter(torch.randn(50, 4), requires_grad=False)


class _PairPlugin:
    @pml_plugins.hookimpl
    def register_losses(self, register):
        register(RecordingLoss, name="recording_test_loss")
        register(RecordingParamLoss, name="recording_param_test_loss")


@pytest.fixture
def pair_plugin():
    name = pml_plugins.register_plugin(_PairPlugin(), name="pair_test_plugin")
    BATCHES.clear()
    yield
    pml_plugins.unregister_plugin(name)


def test_the_same_seed_gives_every_loss_the_same_init_and_batches(pair_plugin, tmp_path):
    torch.set_num_threads(1)
    weights = {}
    for loss in ("recording_test_loss", "recording_param_test_loss"):
        for seed in (0, 1):
            cfg = TrainConfig(
                loss=loss,
                epochs=1,
                iterations_per_epoch=3,
                batch_size=16,
                lr=0.0,
                seed=seed,
                embedding_size=8,
                out=str(tmp_path / f"{loss}{seed}"),
            )
            run_training(cfg, progress=False)
            weights[loss, seed] = torch.load(tmp_path / f"{loss}{seed}" / "checkpoint.pt", weights_only=True)["trunk"]
    a, b = BATCHES["RecordingLoss"], BATCHES["RecordingParamLoss"]
    assert a[:3] == b[:3] and a[3:] == b[3:] and a[:3] != a[3:]  # same per seed, different across seeds
    for key in weights["recording_test_loss", 0]:
        assert torch.equal(weights["recording_test_loss", 0][key], weights["recording_param_test_loss", 0][key])
    assert any(
        not torch.equal(weights["recording_test_loss", 0][k], weights["recording_test_loss", 1][k])
        for k in weights["recording_test_loss", 0]
        if weights["recording_test_loss", 0][k].is_floating_point()
    )


def test_train_seeds_writes_every_seed_and_the_interval(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--loss", "proxy_anchor", "--seeds", "2", "--out", str(out), *TINY]) == 0
    assert "proxy_anchor over 2 seed(s), mean ± 95% t-interval: R@1" in capsys.readouterr().out
    values = [json.loads((out / f"seed{s}" / "metrics.json").read_text())["metrics"]["map_at_r"] for s in (0, 1)]
    (row,) = _csv(out / "results.csv")
    assert row["seeds"] == "2" and float(row["map_at_r"]) == pytest.approx(sum(values) / 2, abs=2e-6)
    assert float(row["map_at_r_ci95"]) == pytest.approx(_t975_df1() * abs(values[0] - values[1]) / 2, abs=2e-6)
    assert [r["seed"] for r in _csv(out / "runs.csv")] == ["0", "1"]


def test_compare_on_glyphs_and_bad_protocol_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PML_PLUGINS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "g"
    assert (
        main(
            [
                "compare",
                "--dataset",
                "glyphs:classes=12,size=12,per_font=1",
                "--losses",
                "proxy_anchor",
                "--seeds",
                "2",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test: 6 unseen classes (96 images)" in printed  # 12 characters, half of them unseen, 16 fonts each
    rows = {r["loss"]: r for r in _csv(out / "results.csv")}
    assert rows["proxy_anchor"]["status"] == "ok" and rows["proxy_anchor"]["seeds"] == "2"
    for bad, message in (
        (["--seeds", "0"], "seeds must be an integer >= 1"),
        (["--folds", "3"], "cannot make 3 folds"),
        (["--val-classes", "0", "--tune", "2"], "--tune selects settings on validation classes"),
        (["--primary", "accuracy"], "--primary must be one of"),
        (["--seed", "3"], "use --seeds N"),
    ):
        assert main(["compare", "--losses", "proxy_anchor", "--out", str(tmp_path / "bad"), *TINY, *bad]) == 2
        assert message in capsys.readouterr().err
