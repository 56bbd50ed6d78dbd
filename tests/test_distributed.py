"""DDP training: every plugin loss under 2 gloo processes (spawned), and torchrun end to end.

The spawned checks (pml_plugins.testing.distributed_checks) compare, on each rank, the loss
value and the gradients of the model and of the loss's own parameters with one process on
the gathered batch (float64), train a few steps both ways, and compare parameters across
ranks. The losses come from the registry, so any installed third-party plugin is covered.
"""

from __future__ import annotations

import json
import socket
import types

import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss

import pml_plugins
from pml_plugins import distributed_losses as pd
from pml_plugins.cli import main as cli_main
from pml_plugins.pipeline import ddp as ddp_mod
from pml_plugins.pipeline.config import TrainConfig, build_config
from pml_plugins.pipeline.train import run_training
from pml_plugins.testing.distributed_checks import distributed_report

TOL = 1e-9  # float64; measured differences are ~1e-15


def _plugin_losses() -> list:
    entries = [pml_plugins.get_entry("loss", n) for n in pml_plugins.list_losses()]
    return sorted(e.qualified_name for e in entries if e.plugin != "builtin")


PLUGIN_LOSSES = _plugin_losses()
MINER_CASE = ("contrastive", "multi_similarity")
#: losses that hold a database (DMCAC trains with one): checked with a fixed database as well
DATABASE_CASES = [n for n in PLUGIN_LOSSES if n.endswith(":dmcac")]


@pytest.fixture(scope="module")
def report() -> dict:
    return distributed_report(
        PLUGIN_LOSSES, miner_cases=[MINER_CASE], database_cases=DATABASE_CASES, world_size=2, steps=3
    )


def test_plugins_are_installed_and_declare_their_semantics():
    assert len(PLUGIN_LOSSES) >= 7, PLUGIN_LOSSES  # cam, mpa x3, adaptive_margin, group_loss, dmcac
    for name in PLUGIN_LOSSES:
        entry = pml_plugins.get_entry("loss", name)
        value = entry.spec.distributed
        assert value in pd.DISTRIBUTED_SEMANTICS, f"{name} declares distributed={value!r}"
        if value != "gradient_equivalent":
            assert entry.spec.distributed_note, f"{name}: {value} needs a distributed_note"


def test_info_shows_the_distributed_semantics(capsys):
    assert cli_main(["info", "group_loss"]) == 0
    out = capsys.readouterr().out
    assert "distributed gradient_equivalent" in out and "replicator dynamics over the gathered" in out
    assert "efficient mode (--distributed-efficient): not supported" in out


@pytest.mark.parametrize("name", PLUGIN_LOSSES)
def test_loss_under_ddp_matches_one_process(report, name):
    r = report[name]
    assert "error" not in r, r["error"]
    if r["semantics"] == "unsupported":
        assert r["refused"] and name.split(":")[-1] in r["message"]
        return
    assert r["rank_param_diff"] == 0.0, f"ranks diverged after training: {r['rank_param_diff']}"
    if r["semantics"] == "gradient_equivalent":
        scale = max(1.0, r["loss_grad_scale"])
        assert r["value_err"] < TOL, r
        assert r["model_grad_err"] < TOL, r
        assert r["loss_grad_err"] < TOL * scale, r
        assert r["train_vs_single"] < TOL, r


def test_pml_wrapper_multiplies_loss_parameter_gradients_by_world_size(report):
    """The measured fact behind average_loss_gradients: PML's wrapper leaves W x the gradient."""
    factors = {k: r["raw_loss_grad_factor"] for k, r in report.items() if "raw_loss_grad_factor" in r}
    assert factors, report
    for name, factor in factors.items():
        assert abs(factor - 2.0) < 1e-9, (name, factor)


def test_group_loss_needs_the_rank_ordered_gather(report):
    """PML's [this rank, others] order changes the Group Loss's anchors per rank; ours does not."""
    name = next((n for n in PLUGIN_LOSSES if n.endswith(":group_loss")), None)
    if name is None:
        pytest.skip("pml-plugin-group-loss is not installed")
    assert report[name]["pml_order_value_err"] > 1e-4
    assert report[name]["value_err"] < TOL


@pytest.mark.parametrize("name", DATABASE_CASES)
def test_loss_with_a_database_under_ddp(report, name):
    r = report[f"{name}+database"]
    assert "error" not in r, r.get("error")
    assert (
        r["value_err"] < TOL and r["model_grad_err"] < TOL and r["loss_grad_err"] < TOL * max(1.0, r["loss_grad_scale"])
    )
    assert r["train_vs_single"] < TOL and r["rank_param_diff"] == 0.0


def test_miner_wrapper_mines_the_same_batch_as_the_loss(report):
    r = report["+".join(MINER_CASE)]
    assert "error" not in r, r.get("error")
    assert r["model_grad_err"] < TOL and r["train_vs_single"] < TOL and r["rank_param_diff"] == 0.0


@pytest.mark.parametrize("name", PLUGIN_LOSSES)
def test_efficient_mode_is_refused_by_name(name):
    entry = pml_plugins.get_entry("loss", name)
    if entry.spec.distributed_efficient:
        assert pd.check_distributed_support(entry, efficient=True) == entry.spec.distributed
        return
    with pytest.raises(ValueError, match=f"loss '{entry.name}'.*efficient"):
        pd.check_distributed_support(entry, efficient=True)


class _NoDdpLoss(ContrastiveLoss):
    pass


@pytest.fixture
def no_ddp_plugin():
    module = types.ModuleType("no_ddp_plugin")
    module.pml_plugins_api_version = 1

    @pml_plugins.hookimpl
    def register_losses(register):
        register(
            _NoDdpLoss,
            name="no_ddp",
            distributed="unsupported",
            distributed_note="it keeps per-process state that cannot be synchronised",
        )
        register(_NoDdpLoss, name="bad_ddp", distributed="sometimes")

    module.register_losses = register_losses
    pml_plugins.register_plugin(module, name="scratch_ddp")
    yield "scratch_ddp"
    pml_plugins.unregister_plugin("scratch_ddp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(monkeypatch, world_size: int = 1) -> None:
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", str(world_size)),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(_free_port())),
    ):
        monkeypatch.setenv(key, value)


def test_unsupported_loss_is_refused_by_name(no_ddp_plugin, monkeypatch):
    entry = pml_plugins.get_entry("loss", "scratch_ddp:no_ddp")
    with pytest.raises(ValueError, match="'no_ddp'.*cannot be trained distributed: it keeps"):
        pd.wrap_loss(_NoDdpLoss(), entry)
    with pytest.raises(ValueError, match="distributed='sometimes'"):
        pd.check_distributed_support(pml_plugins.get_entry("loss", "scratch_ddp:bad_ddp"))
    # the trainer itself, in a real one-process gloo group started from torchrun's variables
    _torchrun_env(monkeypatch)
    cfg = TrainConfig(
        loss="scratch_ddp:no_ddp",
        distributed=True,
        device="cpu",
        epochs=1,
        batch_size=16,
        iterations_per_epoch=1,
        backbone="mlp",
    )
    with pytest.raises(ValueError, match="'no_ddp'.*cannot be trained distributed"):
        run_training(cfg, progress=False)
    assert not torch.distributed.is_initialized()  # torn down after the error


def test_distributed_without_torchrun_is_a_clean_error(monkeypatch, capsys):
    for key in pd.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert cli_main(["train", "--distributed", "--loss", "cam", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "RANK" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="needs distributed"):
        build_config({}, {"distributed_efficient": True})
    with pytest.raises(ValueError, match="inconsistent"):
        pd.env_from_torchrun(
            {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
        )


def test_rank_slices_partition_each_global_batch():
    base = list(range(20))  # 2 full global batches of 8, 4 left over (dropped)
    slices = [list(ddp_mod.RankSliceSampler(base, 8, r, 2)) for r in range(2)]
    assert slices == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    assert len(ddp_mod.RankSliceSampler(base, 8, 1, 2)) == 8
    with pytest.raises(ValueError, match="divisible"):
        ddp_mod.RankSliceSampler(base, 9, 0, 2)
    s = ddp_mod.GlobalRandomSampler(10, seed=3)
    first, second = list(s), list(s)
    assert sorted(first) == list(range(10)) and first != second
    assert list(ddp_mod.GlobalRandomSampler(10, seed=3)) == first  # the same on every rank


def test_torchrun_trains_like_one_process(tmp_path, digits_features, torchrun_two):
    """`torchrun --nproc-per-node 2 -m pml_plugins train --distributed` == one process, same global batch."""
    data = digits_features
    args = [
        "--loss",
        "group_loss",
        "--dataset",
        f"embeddings:{data}",
        "--epochs",
        "1",
        "--iterations-per-epoch",
        "4",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--no-report",
    ]
    proc = torchrun_two("train", [*args, "--out", str(tmp_path / "ddp")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 evaluates and writes
    assert cli_main(["train", *args, "--out", str(tmp_path / "one")]) == 0

    ddp, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    resolved = json.loads((tmp_path / "ddp" / "config.json").read_text())["resolved"]
    assert resolved["distributed"]["world_size"] == 2 and resolved["distributed"]["local_batch_size"] == 16
    assert resolved["distributed"]["loss_semantics"] == "gradient_equivalent"
    assert ddp["iterations_per_epoch"] == one["iterations_per_epoch"] == 4
    assert ddp["final_epoch_loss"] == pytest.approx(one["final_epoch_loss"], abs=1e-5)
    # only rank 0 logs the epoch (one line per epoch, not one per process)
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1
    for key in ("recall_at_1", "map_at_r"):
        assert ddp["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-4)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("ddp", "one"))
    for part in ("embedder", "loss"):
        for key in b[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-5), (part, key)


def test_torchrun_compare_holds_one_group_and_rank_0_reports(tmp_path, digits_features, torchrun_two):
    """`torchrun ... compare --distributed`: every run is DDP in one process group; one table, written once,
    equal to a single-process comparison with the same global batch (identity backbone: no BatchNorm)."""
    data = digits_features
    args = [
        "--losses",
        "contrastive,group_loss",
        "--dataset",
        f"embeddings:{data}",
        "--epochs",
        "1",
        "--iterations-per-epoch",
        "3",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--no-report",
        "--seeds",
        "1",
        "--val-classes",
        "0",
    ]  # DDP reports the last epoch (no per-epoch validation)
    proc = torchrun_two("compare", [*args, "--out", str(tmp_path / "ddp")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("comparing 2 losses") == 1 and proc.stdout.count("2 trained, 0 failed") == 1
    assert cli_main(["compare", *args, "--out", str(tmp_path / "one")]) == 0
    ddp, one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ddp", "one"))
    ddp_rows, one_rows = ({r["name"]: r for r in d["runs"]} for d in (ddp, one))
    assert set(ddp_rows) == set(one_rows) and len(ddp_rows) == 3  # floor + 2 losses
    for name, row in one_rows.items():
        for key in ("recall_at_1", "map_at_r"):
            assert ddp_rows[name]["metrics"][key] == pytest.approx(row["metrics"][key], abs=1e-4), (name, key)
    resolved = json.loads((tmp_path / "ddp" / "runs" / "group_loss" / "seed0" / "config.json").read_text())["resolved"]
    assert resolved["distributed"]["world_size"] == 2
