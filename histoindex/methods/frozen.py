"""Frozen-feature retrieval (no training): each query tile's backbone features are compared, by
cosine similarity, with the reference spots' own backbone features, and the nearest spots'
expression profiles are averaged with the model's retrieval settings — the "frozen retrieval"
baseline of ``evaluate``, as a model the store and ``query`` use like any other. ``fit`` only fits
the linear map into the 256-d search space (:mod:`histoindex.models.frozen`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..train import TrainSection
from ._registry import Method, QueryEncoder, register_method
from .bleep import _project


@register_method
class FrozenRetrieval(Method):
    name = "frozen"
    frozen_backbone_only = True

    def fit(self, model, sections: Sequence[TrainSection], cfg, *, generator, device, progress=None) -> list[float]:
        views = max(cfg.views, 1)
        features = np.concatenate([s.features[:, :views].mean(axis=1) for s in sections]).astype(np.float64)
        # uncentred SVD: the top right-singular vectors span the features' directions best, and an
        # orthonormal basis keeps dot products (hence cosines) of vectors inside its span
        _, _, vt = np.linalg.svd(features, full_matrices=False)
        dim = model.image_projection.out_features
        basis = np.zeros((dim, features.shape[1]), np.float32)
        basis[: min(dim, len(vt))] = vt[:dim]
        with torch.no_grad():
            model.image_projection.weight.copy_(torch.from_numpy(basis))
        return []

    def embed_references(self, model, section: TrainSection, *, device) -> tuple[np.ndarray, np.ndarray]:
        image = _project(model.image_projection, section.features, device)
        return image, image  # the search keys are the references' image embeddings

    def query_encoder(self, model, xy_um: np.ndarray, *, device) -> QueryEncoder:
        def encode(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            for features in chunks:
                with torch.inference_mode():
                    yield _project(model.image_projection, features, device)

        return encode
