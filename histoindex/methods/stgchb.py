"""ST-GCHB (Chi et al., arXiv 2023): the spatial graph of spots. A GCN per view (image features,
expression) over each section's kNN graph, pre-trained with Deep Graph Infomax, regularised by an
HSIC bottleneck, and aligned across views with BLEEP's contrastive loss. Trains on cached
frozen-backbone features only (never re-encoding patches inside a step); queries build the same
kind of graph over their tiles and are embedded block by block (exactly as the whole graph).
The model family and the training loop are in :mod:`histoindex.models.stgchb`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..graph import knn_graph
from ..models.stgchb import StgchbParams, embed_graph_queries, embed_graph_references, train_stgchb
from ..train import TrainSection
from ._registry import Method, QueryEncoder, register_method


@register_method
class Stgchb(Method):
    name = "stgchb"
    frozen_backbone_only = True

    def default_params(self) -> dict:
        return StgchbParams().to_dict()

    def fit(self, model, sections: Sequence[TrainSection], cfg, *, generator, device, progress=None) -> list[float]:
        if any(s.features is None for s in sections):
            raise InputError("ST-GCHB trains on cached frozen-backbone features (--freeze-backbone)")
        return train_stgchb(model, sections, cfg, generator=generator, device=device, progress=progress)

    def embed_references(self, model, section: TrainSection, *, device) -> tuple[np.ndarray, np.ndarray]:
        return embed_graph_references(model, section, device=device)

    def query_encoder(self, model, xy_um: np.ndarray, *, device) -> QueryEncoder:
        edge_index = knn_graph(np.asarray(xy_um, np.float64), k=model.params.graph_k)

        def encode(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            yield from embed_graph_queries(model, chunks, edge_index, device=device, n=len(xy_um))

        return encode
