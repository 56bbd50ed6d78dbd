from pytorch_metric_learning.losses import ContrastiveLoss

import pml_plugins

pml_plugins_api_version = 1


class OtherHingePairLoss(ContrastiveLoss):
    """A different loss published under a name the example_good plugin also uses."""


@pml_plugins.hookimpl
def register_losses(register):
    register(OtherHingePairLoss, name="hinge_pair", summary="Colliding name (example)")
