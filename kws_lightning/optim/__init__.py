"""Optimisers torch does not ship (built by Hydra from conf/optimizer/)."""

from kws_lightning.optim.novograd import NovoGrad

__all__ = ["NovoGrad"]
