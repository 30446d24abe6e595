"""Methods: how a model is trained on references and how it embeds references and queries.

Each method is one module with one ``@register_method`` class (as timm registers model families);
its nn.Module family lives in :mod:`histoindex.models` under the same name, and a model's config
(``ModelConfig.method`` and ``method_params``) records which method made it, so ``query`` takes the
method from the model it searches with. The interface every method implements:

* ``fit(model, sections, cfg, *, generator, device, progress)`` trains ``model`` in place on
  :class:`~histoindex.train.TrainSection` s and returns the loss per epoch;
* ``embed_references(model, section, *, device)`` → unit-length (image, expression) embeddings of
  one reference section, from its view-averaged backbone features and its expression;
* ``query_encoder(model, xy_um, *, device)`` → a function that turns a stream of backbone-feature
  chunks of the tiles (or spots) at ``xy_um``, in order, into a stream of unit-length query
  embeddings (a graph method sees each tile's neighbourhood; memory stays flat with slide size).

The search, imputation, store, evaluation and pictures are the same for every method.
"""

from __future__ import annotations

from . import bleep, frozen, stgchb  # noqa: F401,E402  (registers the methods)
from ._registry import Method, QueryEncoder, get_method, list_methods, register_method

__all__ = ["Method", "QueryEncoder", "get_method", "list_methods", "register_method"]
