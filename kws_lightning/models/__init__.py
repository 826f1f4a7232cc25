"""Keyword-spotting networks, one file each, found by name through the registry.

A new architecture: write `kws_lightning/models/<name>.py` with a class decorated
`@register_model("<name>")`, add one import line for it below, and add `conf/model/<name>.yaml`.
"""

# Architecture modules are imported for their @register_model side effect (one line each).
from kws_lightning.models import (
    bc_resnet,  # noqa: F401
    cnn_trad_pool2,  # noqa: F401
    ds_cnn,  # noqa: F401
    embedding_heads,  # noqa: F401
    light_cnn,  # noqa: F401
    matchboxnet,  # noqa: F401
    res,  # noqa: F401
    tc_resnet,  # noqa: F401
)
from kws_lightning.models.registry import (
    MODELS,
    available_models,
    build_model,
    hyperparameters,
    register_model,
)

__all__ = ["MODELS", "available_models", "build_model", "hyperparameters", "register_model"]
