from .hinge_pair_loss import HingePairLoss

__all__ = ["HingePairLoss"]
