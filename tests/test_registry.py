"""The registry: built-in PML entries, lookups, errors, in-process plugins, isolation, collisions."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from pytorch_metric_learning import losses, miners

import pml_plugins
from pml_plugins import registry as reg


def make_plugin(name: str, losses_to_register=(), miners_to_register=(), api_version=1, fail_in=None):
    """A plugin module object built in memory, as a notebook user would."""
    module = types.ModuleType(name)
    module.pml_plugins_api_version = api_version

    @pml_plugins.hookimpl
    def register_losses(register):
        if fail_in == "losses":
            raise RuntimeError("hook exploded")
        for cls, loss_name, kw in losses_to_register:
            register(cls, name=loss_name, **kw)

    @pml_plugins.hookimpl
    def register_miners(register):
        for cls, miner_name in miners_to_register:
            register(cls, name=miner_name)

    module.register_losses = register_losses
    module.register_miners = register_miners
    return module


class MyContrastive(losses.ContrastiveLoss):
    pass


def test_builtin_plugin_registers_pml_losses_and_miners(fresh_registry):
    names = pml_plugins.list_losses()
    for expected in ("proxy_anchor", "soft_triple", "normalized_softmax", "contrastive", "triplet_margin", "cosface"):
        assert expected in names
    assert "multi_similarity" in pml_plugins.list_miners()
    loss = pml_plugins.create_loss("proxy_anchor", num_classes=5, embedding_size=8, margin=0.2)
    assert type(loss) is losses.ProxyAnchorLoss and loss.margin == 0.2
    assert pml_plugins.get_loss("ProxyAnchorLoss") is losses.ProxyAnchorLoss  # class-name alias
    assert pml_plugins.get_loss("builtin:proxy_anchor") is losses.ProxyAnchorLoss
    assert pml_plugins.get_loss("Proxy-Anchor") is losses.ProxyAnchorLoss  # case and dashes
    assert type(pml_plugins.create_miner("multi_similarity", epsilon=0.2)) is miners.MultiSimilarityMiner
    assert pml_plugins.list_losses("proxy*") == ["proxy_anchor", "proxy_nca"]


def test_needs_are_declared_for_builtins(fresh_registry):
    assert pml_plugins.get_entry("loss", "proxy_anchor").needs()["loss_optimizer"] is True
    assert pml_plugins.get_entry("loss", "cosface").needs()["loss_optimizer"] is True  # *args signature
    assert pml_plugins.get_entry("loss", "contrastive").needs()["sampler"] == "m_per_class"


def test_unknown_name_suggests_close_names(fresh_registry):
    with pytest.raises(pml_plugins.UnknownNameError) as info:
        pml_plugins.get_loss("proxy_anchr")
    assert "proxy_anchor" in str(info.value) and "Did you mean" in str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="kind must be one of"):
        reg.registry.get("optimizer", "sgd")


def test_bad_kwargs_show_the_signature(fresh_registry):
    with pytest.raises(TypeError, match=r"signature: ProxyAnchorLoss\(num_classes, embedding_size, margin=0.1"):
        pml_plugins.create_loss("proxy_anchor", num_classes=5, embedding_size=8, bogus=1)
    with pytest.raises(TypeError, match=r"needs argument\(s\) \['num_classes', 'embedding_size'\]"):
        pml_plugins.create_loss("proxy_anchor")


def test_in_process_plugin_registers_and_unregisters(fresh_registry):
    plugin = make_plugin(
        "notebook", losses_to_register=[(MyContrastive, "my_contrastive", {"summary": "s", "paper": "p"})]
    )
    name = pml_plugins.register_plugin(plugin)
    assert name == "notebook"
    entry = pml_plugins.get_entry("loss", "my_contrastive")
    assert (
        entry.plugin == "notebook"
        and entry.metadata["summary"] == "s"
        and entry.qualified_name == "notebook:my_contrastive"
    )
    assert isinstance(pml_plugins.create_loss("my_contrastive", pos_margin=0.1), MyContrastive)
    info = {p["name"]: p for p in pml_plugins.plugin_info()}
    assert info["notebook"]["losses"] == ["my_contrastive"] and info["notebook"]["errors"] == []
    with pytest.raises(pml_plugins.PluginError, match="already registered"):
        pml_plugins.register_plugin(plugin)
    pml_plugins.unregister_plugin("notebook")
    with pytest.raises(pml_plugins.UnknownNameError):
        pml_plugins.get_loss("my_contrastive")


def test_non_pml_class_is_skipped_and_recorded(fresh_registry):
    plugin = make_plugin("sloppy", losses_to_register=[(torch.nn.MSELoss, "mse", {}), (MyContrastive, "fine", {})])
    with pytest.warns(RuntimeWarning, match="must be a subclass of pytorch_metric_learning's BaseMetricLossFunction"):
        pml_plugins.register_plugin(plugin)
    info = {p["name"]: p for p in pml_plugins.plugin_info()}
    assert info["sloppy"]["losses"] == [] and len(info["sloppy"]["errors"]) == 1
    assert "proxy_anchor" in pml_plugins.list_losses()  # the host is unaffected


def test_hook_that_raises_is_isolated_and_warned_once(fresh_registry):
    plugin = make_plugin(
        "exploding",
        losses_to_register=[(MyContrastive, "x", {})],
        miners_to_register=[(miners.BatchHardMiner, "still_here")],
        fail_in="losses",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pml_plugins.register_plugin(plugin)
        pml_plugins.plugin_info()
        pml_plugins.list_losses()
    assert sum("hook exploded" in str(w.message) for w in caught) == 1
    assert "still_here" in pml_plugins.list_miners()  # its other hook still counted
    assert "x" not in pml_plugins.list_losses()


def test_incompatible_api_version_is_reported(fresh_registry):
    with pytest.raises(pml_plugins.PluginError, match="plugin API version 99 is not supported"):
        with pytest.warns(RuntimeWarning):
            pml_plugins.register_plugin(make_plugin("future", api_version=99))


def test_duplicate_name_within_one_plugin_is_an_error(fresh_registry):
    plugin = make_plugin("twice", losses_to_register=[(MyContrastive, "dup", {}), (MyContrastive, "dup", {})])
    with pytest.warns(RuntimeWarning, match="twice"):
        pml_plugins.register_plugin(plugin)
    assert "dup" not in pml_plugins.list_losses()


def test_collision_makes_short_name_ambiguous(fresh_registry):
    class OtherContrastive(losses.ContrastiveLoss):
        pass

    pml_plugins.register_plugin(make_plugin("alpha", losses_to_register=[(MyContrastive, "same", {})]))
    pml_plugins.register_plugin(make_plugin("beta", losses_to_register=[(OtherContrastive, "same", {})]))
    with pytest.raises(pml_plugins.AmbiguousNameError, match=r"alpha:same.*beta:same"):
        pml_plugins.get_loss("same")
    assert pml_plugins.get_loss("alpha:same") is MyContrastive
    assert pml_plugins.get_loss("beta:same") is OtherContrastive
    assert {"alpha:same", "beta:same"} <= set(pml_plugins.list_losses())
    assert "same" not in pml_plugins.list_losses()


def test_block_list_and_builtin(fresh_registry):
    pml_plugins.load_plugins(block=["builtin"], reload=True)
    assert "proxy_anchor" not in pml_plugins.list_losses()
    pml_plugins.load_plugins(reload=True)
    assert "proxy_anchor" in pml_plugins.list_losses()


def test_registration_rejects_bad_names(fresh_registry):
    with pytest.warns(RuntimeWarning, match="must not contain ':'"):
        pml_plugins.register_plugin(make_plugin("colon", losses_to_register=[(MyContrastive, "a:b", {})]))
