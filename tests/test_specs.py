"""The typed plugin contract: LossSpec / MinerSpec / MetricSpec, keyword metadata converted, one build path."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
import warnings

import pytest
from pytorch_metric_learning import losses, miners

import pml_plugins
from pml_plugins import registry as reg
from pml_plugins.specs import LossSpec, MetricSpec, MinerSpec, spec_from_metadata


class _SpecLoss(losses.ContrastiveLoss):
    pass


class _ProxyLoss(losses.ProxyAnchorLoss):
    pass


def _plugin(name: str, register_losses=None, register_miners=None, register_metrics=None, api_version="1.1"):
    module = types.ModuleType(name)
    module.pml_plugins_api_version = api_version
    for hook_name, body in (
        ("register_losses", register_losses),
        ("register_miners", register_miners),
        ("register_metrics", register_metrics),
    ):
        if body is not None:
            setattr(module, hook_name, pml_plugins.hookimpl(specname=hook_name)(body))
    return module


def test_register_with_a_spec(fresh_registry):
    spec = LossSpec(
        summary="s",
        tags="pair",
        sampler="m_per_class",
        samples_per_class=6,
        loss_lr=0.5,
        retrieval_distance="euclidean",
    )
    pml_plugins.register_plugin(_plugin("typed", lambda register: register(_SpecLoss, name="typed_loss", spec=spec)))
    entry = pml_plugins.get_entry("loss", "typed_loss")
    assert entry.spec.samples_per_class == 6 and entry.spec.tags == ("pair",) and entry.spec.loss_lr == 0.5
    assert entry.spec.loss_optimizer is False  # inferred: ContrastiveLoss takes no num_classes
    assert entry.needs() == {
        "sampler": "m_per_class",
        "multi_view": False,
        "database_refresh": False,
        "loss_optimizer": False,
        "loss_lr": 0.5,
        "retrieval_distance": "euclidean",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.spec.loss_lr = 1.0


def test_loss_optimizer_is_inferred_from_the_constructor_when_not_declared(fresh_registry):
    pml_plugins.register_plugin(_plugin("infer", lambda register: register(_ProxyLoss, name="proxy_like")))
    assert pml_plugins.get_entry("loss", "proxy_like").spec.loss_optimizer is True


def test_keyword_metadata_becomes_the_spec(fresh_registry):
    def hook(register):
        register(_SpecLoss, name="kw_loss", summary="old style", multi_view=True, loss_lr=0.1, sampler="m_per_class")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 1.0 keyword form itself warns about nothing
        pml_plugins.register_plugin(_plugin("kw", hook, api_version=1))
    spec = pml_plugins.get_entry("loss", "kw_loss").spec
    assert isinstance(spec, LossSpec)
    assert (spec.summary, spec.multi_view, spec.loss_lr, spec.sampler) == ("old style", True, 0.1, "m_per_class")


def test_a_misspelt_key_warns_with_the_plugin_the_key_and_a_suggestion_and_is_dropped(fresh_registry):
    def hook(register):
        register(_SpecLoss, name="typo_loss", summary="s", los_lr=0.3)

    with pytest.warns(UserWarning, match=r"plugin 'typo'.*'typo_loss'.*'los_lr'.*did you mean 'loss_lr'\?") as rec:
        pml_plugins.register_plugin(_plugin("typo", hook))
    assert rec[0].filename == __file__  # points at the plugin's register(...) call
    spec = pml_plugins.get_entry("loss", "typo_loss").spec
    assert spec.loss_lr is None and "los_lr" not in spec.as_dict() and spec.summary == "s"


def test_a_key_with_no_close_field_lists_the_known_keys():
    with pytest.warns(UserWarning, match=r"'zzz' \(known keys: summary, paper, tags\)"):
        assert spec_from_metadata("miner", {"zzz": 1}, plugin="p", name="m") == MinerSpec()


@pytest.mark.parametrize("old", ["m_per_class", "m"])
def test_old_spellings_of_samples_per_class_are_deprecated_aliases(old):
    with pytest.warns(DeprecationWarning, match=f"{old}=.*samples_per_class"):
        spec = spec_from_metadata("loss", {old: 8}, plugin="p", name="x")
    assert spec.samples_per_class == 8
    with pytest.raises(TypeError, match="samples_per_class twice"):
        spec_from_metadata("loss", {"samples_per_class": 4, old: 8}, plugin="p", name="x")


def test_entry_metadata_is_a_deprecated_read_only_view(fresh_registry):
    pml_plugins.register_plugin(
        _plugin(
            "view",
            lambda register: register(
                _SpecLoss, name="view_loss", spec=LossSpec(summary="v", distributed="batch_dependent")
            ),
        )
    )
    entry = pml_plugins.get_entry("loss", "view_loss")
    with pytest.warns(DeprecationWarning, match="entry.spec"):
        meta = entry.metadata
    assert meta["summary"] == "v" and meta["distributed"] == "batch_dependent" and "loss_lr" not in meta
    with pytest.raises(TypeError):
        meta["summary"] = "changed"


def test_spec_and_keywords_together_or_the_wrong_spec_kind_are_registration_errors(fresh_registry):
    def both(register):
        register(_SpecLoss, name="both", spec=LossSpec(), summary="s")

    def wrong_kind(register):
        register(miners.BatchHardMiner, name="wrong", spec=LossSpec())

    with pytest.warns(RuntimeWarning, match="spec= and metadata keywords"):
        pml_plugins.register_plugin(_plugin("both_ways", both))
    with pytest.warns(RuntimeWarning, match="a miner takes a pml_plugins.MinerSpec"):
        pml_plugins.register_plugin(_plugin("wrong_kind", register_miners=wrong_kind))
    assert "both" not in pml_plugins.list_losses() and "wrong" not in pml_plugins.list_miners()


def test_a_keyword_of_the_wrong_type_is_a_registration_error_naming_plugin_and_entry(fresh_registry):
    with pytest.warns(RuntimeWarning, match=r"plugin 'badtype' registered the loss 'bad': multi_view must be a bool"):
        pml_plugins.register_plugin(
            _plugin("badtype", lambda register: register(_SpecLoss, name="bad", multi_view="yes"))
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sampler": "random"}, ValueError, "sampler must be 'm_per_class' or None"),
        ({"samples_per_class": 0}, ValueError, "samples_per_class must be a positive integer"),
        ({"samples_per_class": True}, ValueError, "samples_per_class must be a positive integer"),
        ({"loss_lr": 0}, ValueError, "loss_lr must be a finite number > 0"),
        ({"loss_lr": float("nan")}, ValueError, "loss_lr must be a finite number > 0"),
        ({"retrieval_distance": "manhattan"}, ValueError, "retrieval_distance must be 'cosine' or 'euclidean'"),
        ({"loss_optimizer": 1}, TypeError, "loss_optimizer must be a bool or None"),
        ({"training_setup": "setup"}, TypeError, "training_setup must be callable"),
        ({"demo_loss_args": [("a", 1)]}, TypeError, "demo_loss_args must be a dict"),
        ({"tags": ("ok", 3)}, TypeError, "tags must be a tuple of str"),
        ({"summary": None}, TypeError, "summary must be a str"),
        ({"distributed_note": 3}, TypeError, "distributed_note must be a str or None"),
    ],
)
def test_loss_spec_checks_its_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossSpec(**kwargs)


def test_spec_mappings_are_frozen_copies():
    args = {"ce_weight": 0.0}
    spec = LossSpec(demo_loss_args=args, conformance={"num_views": 2})
    args["ce_weight"] = 1.0
    assert spec.demo_loss_args == {"ce_weight": 0.0}
    with pytest.raises(TypeError):
        spec.conformance["num_views"] = 3


def test_metric_spec_is_what_the_calculator_reads(fresh_registry):
    def precision_at_2(relevance, **kwargs):
        return relevance[:, :2].sum(1).double() / 2

    pml_plugins.register_plugin(
        _plugin(
            "metric_spec",
            register_metrics=lambda register: register(
                precision_at_2, name="p_at_2", spec=MetricSpec(k=2, summary="P@2")
            ),
        )
    )
    spec = pml_plugins.get_entry("metric", "p_at_2").spec
    assert (spec.k, spec.requires_knn, spec.requires_clustering) == (2, True, False)
    with pytest.raises(TypeError, match="requires_knn must be a bool"):
        MetricSpec(requires_knn=None)


def test_every_field_is_documented():
    # the contract is the docstrings: a field without one would be an undocumented key again
    import ast
    import inspect

    import pml_plugins.specs as specs_module

    tree = ast.parse(inspect.getsource(specs_module))
    for cls in (pml_plugins.LossSpec, pml_plugins.MinerSpec, pml_plugins.MetricSpec):
        documented = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                body = node.body
                for a, b in zip(body, body[1:]):
                    if (
                        isinstance(a, ast.AnnAssign)
                        and isinstance(b, ast.Expr)
                        and isinstance(getattr(b, "value", None), ast.Constant)
                    ):
                        documented.add(a.target.id)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in documented]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize(
    "declared, loads",
    [
        (1, True),
        ("1", True),
        ("1.0", True),
        ("1.1", True),
        ((1, 1), True),
        ("1.2", False),
        (2, False),
        ("one", False),
        (True, False),
    ],
)
def test_plugin_api_version_compatibility(fresh_registry, declared, loads):
    assert pml_plugins.PLUGIN_API_VERSION == "1.1"
    assert reg.api_version_supported(declared) is loads
    name = f"api_{abs(hash(repr(declared)))}"
    if loads:
        pml_plugins.register_plugin(
            _plugin(name, lambda register: register(_SpecLoss, name=name), api_version=declared)
        )
        assert name in pml_plugins.list_losses()
    else:
        with pytest.warns(RuntimeWarning, match="is not supported"):
            with pytest.raises(pml_plugins.PluginError):
                pml_plugins.register_plugin(_plugin(name, lambda register: None, api_version=declared))


# -- one build path ---------------------------------------------------------------------------
def test_build_offers_what_the_constructor_takes_and_keeps_options_for_a_training_setup(fresh_registry):
    built = reg.registry.build("loss", "proxy_anchor", {"margin": 0.2}, offered={"num_classes": 3, "embedding_size": 4})
    assert built.arguments == {"margin": 0.2, "num_classes": 3, "embedding_size": 4} and built.options == {}
    assert tuple(built.obj.proxies.shape) == (3, 4)
    contrastive = reg.registry.build("loss", "contrastive", offered={"num_classes": 3, "embedding_size": 4})
    assert contrastive.arguments == {}  # ContrastiveLoss takes neither

    def setup(loss, context):
        return pml_plugins.TrainingSetup()

    pml_plugins.register_plugin(
        _plugin(
            "with_setup", lambda register: register(_SpecLoss, name="setup_loss", spec=LossSpec(training_setup=setup))
        )
    )
    built = reg.registry.build("loss", "setup_loss", {"pos_margin": 0.1, "views": 3}, with_options=True)
    assert built.arguments == {"pos_margin": 0.1} and built.options == {"views": 3}
    with pytest.raises(TypeError, match=r"takes no argument 'views'"):  # create() has no options to give them to
        pml_plugins.create_loss("setup_loss", views=3)


def test_one_rule_set_for_unknown_and_missing_arguments(fresh_registry):
    # the same message whichever door: create_loss, the main job's build_loss
    from pml_plugins.pipeline.builders import build_loss

    for call in (
        lambda: pml_plugins.create_loss("proxy_anchor", num_classes=3, embedding_size=4, margn=0.1),
        lambda: build_loss("proxy_anchor", num_classes=3, embedding_size=4, loss_args={"margn": 0.1}),
    ):
        with pytest.raises(
            TypeError,
            match=r"loss 'proxy_anchor' \(ProxyAnchorLoss\) takes no argument 'margn' "
            r"\(did you mean 'margin'\?\).*signature: ProxyAnchorLoss\(num_classes",
        ):
            call()
    with pytest.raises(TypeError, match=r"miner 'multi_similarity' .*'epsilom' \(did you mean 'epsilon'\?\)"):
        pml_plugins.create_miner("multi_similarity", epsilom=0.1)


def test_the_conformance_kit_builds_losses_without_the_main_job():
    code = (
        "import sys, pml_plugins\n"
        "from pml_plugins.testing.distributed_checks import make_check_loss\n"
        "loss = make_check_loss(pml_plugins.get_entry('loss', 'proxy_anchor'), 3, 4)\n"
        "assert tuple(loss.proxies.shape) == (3, 4)\n"
        "print(sorted(m for m in sys.modules if m.startswith('pml_plugins.pipeline')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_info_shows_the_spec(run_cli):
    out = run_cli("info", "cam", "--kind", "loss").stdout
    assert "loss lr    no separate anchor lr in the paper" in out and "retrieval  euclidean" in out
    assert "distributed gradient_equivalent" in out
    out = run_cli("info", "group_loss", "--kind", "loss").stdout
    assert "an m-per-class sampler, m=8" in out and "ref_emb    not supported" in out
