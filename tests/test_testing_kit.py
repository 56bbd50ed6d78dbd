"""The conformance kit itself: a well-behaved loss passes, each deliberately broken loss fails."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import common_functions as c_f

import pml_plugins
from pml_plugins.testing import check_loss, check_miner, loss_checks, parametrize_with_checks


class ValidatedProxyAnchor(losses.ProxyAnchorLoss):
    """PML's ProxyAnchorLoss plus the input validation the kit asks of plugins."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        pml_plugins.check_embeddings_and_labels(
            embeddings, labels, num_classes=self.num_classes, embedding_size=self.proxies.shape[1]
        )
        return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)


class ValidatedContrastive(losses.ContrastiveLoss):
    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        pml_plugins.check_embeddings_and_labels(embeddings, labels, labels_required=indices_tuple is None)
        return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)


@parametrize_with_checks(
    [lambda: ValidatedProxyAnchor(num_classes=10, embedding_size=8)], embedding_size=8, num_classes=10
)
def test_validated_proxy_anchor_passes(check):
    check()


@parametrize_with_checks([lambda: ValidatedContrastive()], embedding_size=8)
def test_validated_contrastive_passes(check):
    check()


@parametrize_with_checks(
    [lambda: miners.MultiSimilarityMiner(), lambda: miners.TripletMarginMiner(margin=0.2)], embedding_size=8
)
def test_pml_miners_pass(check):
    check()


# --- deliberately broken losses: each must fail the kit, at the check that names its defect ---


class NotAPMLLoss(torch.nn.Module):
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return embeddings.pow(2).mean()


class NaNForOneClass(ValidatedContrastive):
    """Divides by the number of negative pairs: NaN when a batch has a single class."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        out = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        negatives = (labels[:, None] != labels[None, :]).sum()
        out["neg_loss"]["losses"] = (
            out["neg_loss"]["losses"] / negatives
            if torch.is_tensor(out["neg_loss"]["losses"])
            else torch.tensor(0.0) / negatives
        )
        return out


class ProxiesNotInStateDict(ValidatedProxyAnchor):
    """Keeps its proxies as a plain tensor attribute, so they are lost by state_dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        proxies = self.proxies.detach().clone()
        del self.proxies
        self.proxies = proxies.requires_grad_(True)


class NoValidation(losses.ProxyAnchorLoss):
    """PML's own ProxyAnchorLoss: NaN embeddings give a NaN loss instead of an error."""


class IgnoresReducer(ValidatedProxyAnchor):
    """Overrides forward and returns its own mean, so PML reducers never see a loss dict."""

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return self.get_logits(embeddings).logsumexp(1).mean()


class HalfPrecisionOverflow(ValidatedProxyAnchor):
    """exp() without log-sum-exp: overflows in float16."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        pml_plugins.check_embeddings_and_labels(embeddings, labels, num_classes=self.num_classes)
        sims = (
            torch.nn.functional.normalize(embeddings)
            @ torch.nn.functional.normalize(c_f.to_dtype(self.proxies, embeddings)).T
        )
        value = torch.log(torch.exp(sims * 1000).sum(1)).mean()
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}

    def _sub_loss_names(self):
        return ["loss"]


@pytest.mark.parametrize(
    "factory, options, failing_check",
    [
        (lambda: NotAPMLLoss(), {}, "check_is_pml_loss"),
        (lambda: NaNForOneClass(), {}, "check_forward_backward"),
        (lambda: ProxiesNotInStateDict(num_classes=10, embedding_size=8), {"num_classes": 10}, "check_state_dict"),
        (lambda: NoValidation(num_classes=10, embedding_size=8), {"num_classes": 10}, "check_bad_input"),
        (lambda: IgnoresReducer(num_classes=10, embedding_size=8), {"num_classes": 10}, "check_reducers"),
        (lambda: HalfPrecisionOverflow(num_classes=10, embedding_size=8), {"num_classes": 10}, "check_dtypes"),
    ],
    ids=["not-pml", "nan", "state-dict", "no-validation", "ignores-reducer", "fp16-overflow"],
)
def test_broken_loss_fails_the_named_check(factory, options, failing_check):
    checks = {c.name: c for c in loss_checks(factory, embedding_size=8, max_examples=5, **options)}
    with pytest.raises(AssertionError, match=failing_check):
        checks[failing_check]()
    with pytest.raises(AssertionError, match=failing_check):
        check_loss(
            factory,
            embedding_size=8,
            max_examples=5,
            skip={
                name: "ran above; only the named check matters here" for name in checks if name not in {failing_check}
            },
            **options,
        )


class MislabelledMiner(miners.BatchHardMiner):
    """Returns negatives that share the anchor's label."""

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        a, p, n = super().mine(embeddings, labels, ref_emb, ref_labels)
        return a, p, p


def test_broken_miner_fails():
    with pytest.raises(AssertionError, match="check_output.*share a label"):
        check_miner(lambda: MislabelledMiner(), embedding_size=8, max_examples=5)


def test_skip_needs_a_reason_and_a_known_check():
    with pytest.raises(ValueError, match="reason"):
        loss_checks(lambda: ValidatedContrastive(), embedding_size=8, skip={"check_dtypes": ""})
    with pytest.raises(ValueError, match="unknown checks"):
        loss_checks(lambda: ValidatedContrastive(), embedding_size=8, skip={"check_nothing": "x"})
