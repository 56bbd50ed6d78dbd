"""Crash-safe training, end to end: real processes, real signals (kill -9, SIGINT, SIGTERM).

A run killed at a chosen point (``PML_PLUGINS_TEST_SIGNAL=EPOCH:ITERATION:SIGNAL`` makes the
process send itself a real signal just before that step) and resumed must end with the
metrics, final loss and epoch count of the same run left uninterrupted (same seed, CPU): for
the plain path (random sampler; m-per-class sampler), a plugin with state (DMCAC's database),
``compare``, and a 2-process gloo DDP run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pml_plugins
from pml_plugins import distributed_losses as pd
from pml_plugins.cli import main as cli_main
from pml_plugins.pipeline.resume import TEST_SIGNAL_ENV

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

TINY = ["--epochs", "3", "--iterations-per-epoch", "4", "--embedding-size", "16", "--device", "cpu", "--no-progress"]


def _env(signal_at: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in pd.TORCHRUN_ENV and k != TEST_SIGNAL_ENV}
    if signal_at:
        env[TEST_SIGNAL_ENV] = signal_at
    return env


def _cli(args: list[str], signal_at: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pml_plugins", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(signal_at),
    )


def _record(out: Path) -> dict:
    record = json.loads((out / "metrics.json").read_text())
    return {k: record[k] for k in ("metrics", "final_epoch_loss", "epochs_run", "iterations_per_epoch")}


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)  # plain types and tensors only


@pytest.mark.parametrize("loss", ["proxy_anchor", "contrastive"])  # random sampler + loss parameters; m-per-class
def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, loss):
    args = ["train", "--loss", loss, *TINY]
    assert cli_main([*args, "--out", str(tmp_path / "whole")]) == 0
    killed = _cli([*args, "--out", str(tmp_path / "run")], signal_at="2:2:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    state = _checkpoint(tmp_path / "run")
    assert state["epoch"] == 1 and state["iteration"] == 0  # the partial epoch 2 is lost, epoch 1 is not
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert _record(tmp_path / "run") == _record(tmp_path / "whole")
    history = json.loads((tmp_path / "run" / "resumed.json").read_text())
    assert [h["from_epoch"] for h in history] == [1] and history[0]["forced_differences"] == []


def test_sigint_finishes_the_step_saves_and_exits_130(tmp_path):
    args = ["train", "--loss", "contrastive", *TINY]
    assert cli_main([*args, "--out", str(tmp_path / "whole")]) == 0
    proc = _cli([*args, "--out", str(tmp_path / "run")], signal_at="2:1:SIGINT")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert f"resume with: pml-plugins train --resume {tmp_path / 'run'}" in proc.stderr
    assert "saved epoch 1 + 2 steps of epoch 2" in proc.stderr and "Traceback" not in proc.stderr
    state = _checkpoint(tmp_path / "run")
    assert (state["epoch"], state["iteration"]) == (1, 2)  # the step under way when SIGINT came was finished
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert _record(tmp_path / "run") == _record(tmp_path / "whole")


def test_sigterm_and_kill_9_from_outside(tmp_path):
    """Signals sent by another process at whatever moment the run is in, after its first checkpoint."""
    args = [
        "train",
        "--loss",
        "proxy_anchor",
        "--epochs",
        "5",
        "--iterations-per-epoch",
        "4",
        "--embedding-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert cli_main([*args, "--out", str(tmp_path / "whole")]) == 0
    for sig, code in ((signal.SIGTERM, 130), (signal.SIGKILL, -signal.SIGKILL)):
        out = tmp_path / sig.name
        proc = subprocess.Popen(
            [sys.executable, "-m", "pml_plugins", *args, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal landed: nothing to resume, still a valid run
            assert _record(out) == _record(tmp_path / "whole")
            continue
        assert proc.returncode == code, err[-2000:]
        if sig == signal.SIGTERM:
            assert "resume with" in err
        assert cli_main(["train", "--resume", str(out), "--no-progress"]) == 0
        assert _record(out) == _record(tmp_path / "whole")


def test_dmcac_resumes_with_its_database(tmp_path):
    """A plugin with state: DMCAC's refresher keeps the database and its counters in the checkpoint."""
    args = ["train", "--loss", "dmcac", "--batch-size", "16", *TINY]
    assert cli_main([*args, "--out", str(tmp_path / "whole")]) == 0
    killed = _cli([*args, "--out", str(tmp_path / "run")], signal_at="3:1:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    plugin = _checkpoint(tmp_path / "run")["plugin"]
    assert plugin["num_refreshes"] == 3 and plugin["epochs"] == 2  # before training, after epochs 1 and 2
    assert plugin["db_embeddings"].shape[1] == 16 and len(plugin["db_labels"]) == len(plugin["db_embeddings"])
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert _record(tmp_path / "run") == _record(tmp_path / "whole")
    assert _checkpoint(tmp_path / "run")["plugin"]["num_refreshes"] == 4


def test_resume_refuses_changed_settings_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    killed = _cli(["train", "--loss", "proxy_anchor", *TINY, "--out", str(out)], signal_at="2:0:SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(out), "--lr", "0.01", "--batch-size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "batch_size: 64 (checkpoint) != 32 (now)" in err and "lr: 0.001 (checkpoint) != 0.01 (now)" in err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["train", "--resume", str(out), "--lr", "0.01", "--force", "--no-progress"]) == 0
    history = json.loads((out / "resumed.json").read_text())
    assert history[-1]["forced_differences"] == ["lr: 0.001 (checkpoint) != 0.01 (now)"]
    assert json.loads((out / "config.json").read_text())["resolved"]["resumed_from"]["epoch"] == 1
    # nothing to resume: a clear error each
    assert cli_main(["train", "--resume", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["train", "--force", "--no-progress"]) == 2
    assert "--force goes with --resume" in capsys.readouterr().err


def test_keep_last_and_what_a_checkpoint_holds(tmp_path):
    out = tmp_path / "run"
    assert (
        cli_main(["train", "--loss", "proxy_anchor", *TINY, "--lr-step", "1", "--keep-last", "2", "--out", str(out)])
        == 0
    )
    names = sorted(p.name for p in out.glob("checkpoint*"))
    assert names == ["checkpoint-epoch0002.pt", "checkpoint-epoch0003.pt", "checkpoint.pt"]
    state = _checkpoint(out)
    assert state["epoch"] == 3 and state["iteration"] == 0
    assert set(state["optimizers"]) == {"trunk_optimizer", "embedder_optimizer", "metric_loss_optimizer"}
    assert state["schedulers"]["trunk_scheduler_by_epoch"]["last_epoch"] == 3
    assert "proxies" in state["loss"] and state["config"]["keep_last"] == 2
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and len(state["trainer"]["epoch_seconds"]) == 3
    older = torch.load(out / "checkpoint-epoch0002.pt", weights_only=True)
    assert older["epoch"] == 2 and not torch.equal(older["embedder"]["fc.weight"], state["embedder"]["fc.weight"])


def test_compare_resumes_and_produces_the_same_table(tmp_path, capsys):
    args = [
        "compare",
        "--losses",
        "contrastive,proxy_anchor",
        "--epochs",
        "2",
        "--iterations-per-epoch",
        "3",
        "--embedding-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--seeds",  # one run per loss, no per-epoch validation: every run resumes from its checkpoint
        "1",
        "--val-classes",
        "0",
    ]
    assert cli_main([*args, "--out", str(tmp_path / "whole")]) == 0
    killed = _cli([*args, "--out", str(tmp_path / "run")], signal_at="2:1:SIGKILL")  # in contrastive's epoch 2
    assert killed.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "untrained (floor): done before (same settings), kept" in capsys.readouterr().out
    whole, run = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("whole", "run"))
    assert [r["name"] for r in run] == [r["name"] for r in whole]
    for a, b in zip(whole, run):
        assert a["metrics"] == b["metrics"] and a.get("final_epoch_loss") == b.get("final_epoch_loss"), a["name"]
    resumed = tmp_path / "run" / "runs" / "contrastive" / "seed0" / "resumed.json"
    assert json.loads(resumed.read_text())[0]["from_epoch"] == 1
    # a third time: every run is kept
    assert cli_main([*args, "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.count("done before (same settings), kept") == 3


def test_compare_with_validation_resumes_its_epoch_selection(tmp_path, capsys):
    # compare's default protocol validates on held-out training classes every epoch and tests the best
    # epoch: a run killed mid-way continues from its checkpoint, which holds the selection so far
    args = [
        "compare",
        "--losses",
        "proxy_anchor",
        "--seeds",
        "1",
        "--epochs",
        "3",
        "--iterations-per-epoch",
        "3",
        "--embedding-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--no-report",
    ]
    assert cli_main([*args, "--out", str(tmp_path / "whole")]) == 0
    killed = _cli([*args, "--out", str(tmp_path / "run")], signal_at="3:1:SIGKILL")  # epochs 1-2 saved
    assert killed.returncode == -signal.SIGKILL
    folder = tmp_path / "run" / "runs" / "proxy_anchor" / "seed0"
    best = _checkpoint(folder)["best"]
    assert [e for e, _ in best["history"]] == [1, 2] and best["best_epoch"] in (1, 2)
    assert set(best["best_state"]) >= {"trunk", "embedder"}
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "run")]) == 0
    assert json.loads((folder / "resumed.json").read_text())[0]["from_epoch"] == 2
    whole = json.loads((tmp_path / "whole" / "runs" / "proxy_anchor" / "seed0" / "metrics.json").read_text())
    run = json.loads((folder / "metrics.json").read_text())
    for key in ("metrics", "best_epoch", "val_metrics", "val_history", "val_classes", "final_epoch_loss"):
        assert run[key] == whole[key], key
    # a run without per-epoch validation keeps no selection in its checkpoint
    plain = tmp_path / "plain"
    assert cli_main(["train", "--loss", "proxy_anchor", *args[5:], "--out", str(plain)]) == 0
    assert _checkpoint(plain)["best"] is None


def test_ddp_resume_two_gloo_processes(tmp_path, digits_features, torchrun_two):
    """Rank 0 writes, every rank loads: killed and resumed under torchrun == uninterrupted under torchrun."""
    data = digits_features
    args = [
        "--loss",
        "group_loss",
        "--dataset",
        f"embeddings:{data}",
        "--epochs",
        "2",
        "--iterations-per-epoch",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
    ]

    def launch(extra: list[str], signal_at: str | None = None) -> subprocess.CompletedProcess:
        return torchrun_two("train", extra, env=_env(signal_at))

    whole = launch([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch([*args, "--out", str(tmp_path / "run")], signal_at="2:1:SIGKILL")
    assert killed.returncode != 0 and not (tmp_path / "run" / "metrics.json").exists()
    state = _checkpoint(tmp_path / "run")
    assert state["epoch"] == 1 and len(state["rng"]["ranks"]) == 2  # every rank's random states
    resumed = launch(["--resume", str(tmp_path / "run"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming group_loss after epoch 1") == 1  # rank 0 logs
    assert _record(tmp_path / "run") == _record(tmp_path / "whole")


# -- the training-setup state hook, in process (a real SIGINT sent to this process) ----------------
CALLS: dict = {}


def _counting_setup(loss, context):
    """A setup that keeps state across epochs: steps seen (as DMCAC keeps its refresh counters)."""
    state = {"seen": 0}
    bad = bool(context.options.get("bad", False))

    def count(trainer):
        state["seen"] += 1

    def state_dict():
        return {"seen": object()} if bad else {"seen": torch.tensor(state["seen"])}

    def load_state_dict(saved):
        state["seen"] = int(saved["seen"])
        CALLS["loaded"] = state["seen"]

    def end_of_epoch(trainer):
        CALLS.setdefault("seen_at_epoch_end", []).append(state["seen"])

    return pml_plugins.TrainingSetup(
        end_of_iteration_hook=count,
        end_of_epoch_hook=end_of_epoch,
        before_training=lambda: CALLS.update(before=CALLS.get("before", 0) + 1),
        state_dict=state_dict,
        load_state_dict=load_state_dict,
    )


class _CountingPlugin:
    @pml_plugins.hookimpl
    def register_losses(self, register):
        from pytorch_metric_learning.losses import ContrastiveLoss

        register(ContrastiveLoss, name="counting_test", training_setup=_counting_setup)


@pytest.fixture
def counting_plugin():
    name = pml_plugins.register_plugin(_CountingPlugin(), name="resume_test_plugin")
    CALLS.clear()
    yield
    pml_plugins.unregister_plugin(name)


def test_training_setup_state_is_saved_and_restored_instead_of_before_training(
    tmp_path, monkeypatch, capsys, counting_plugin
):
    out = tmp_path / "run"
    monkeypatch.setenv(TEST_SIGNAL_ENV, "2:1:SIGINT")
    assert cli_main(["train", "--loss", "counting_test", *TINY, "--out", str(out)]) == 130
    assert "resume with: pml-plugins train --resume" in capsys.readouterr().err
    assert CALLS == {"before": 1, "seen_at_epoch_end": [4]}
    plugin = _checkpoint(out)["plugin"]
    assert int(plugin["seen"]) == 6  # 4 steps of epoch 1, 2 of epoch 2 (the one under way finished)
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    CALLS.clear()
    assert cli_main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert CALLS == {"loaded": 6, "seen_at_epoch_end": [8, 12]}  # restored, not before_training


def test_training_setup_state_that_needs_pickle_is_refused(tmp_path, capsys, counting_plugin):
    assert (
        cli_main(
            ["train", "--loss", "counting_test", "--loss-option", "bad=True", *TINY, "--out", str(tmp_path / "run")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "the training setup's state_dict()['seen'] is a builtins.object" in err and "plain types" in err


def test_a_checkpoint_of_another_loss_or_size_does_not_fit(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--loss", "proxy_anchor", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(out), "--loss", "contrastive", "--force", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this loss (ContrastiveLoss): unexpected proxies" in err, err
    assert cli_main(["train", "--resume", str(out), "--embedding-size", "8", "--force", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this embedding head" in err and "(16, 64) in the checkpoint, (8, 64) here" in err, err
