"""ST-GCHB (Chi et al., "Spatially Resolved Gene Expression Prediction from Histology via
Multi-view Graph Contrastive Learning with HSIC-bottleneck Regularization", arXiv 2023).

Two views of the same spatial spot graph, image features and expression, each encoded by a GCN
and projected into a shared space, aligned with BLEEP's contrastive loss; each view also learns
with Deep Graph Infomax and an HSIC bottleneck (forget the input, keep what the projection
needs). Prediction then retrieves reference spots by image embedding, as BLEEP does.

Unlike the public code, everything trains on cached frozen-backbone features (patches are never
re-encoded inside the loop) and both views use the same normalised HSIC.

The graph layers are the two pieces of torch_geometric that ST-GCHB uses — ``GCNConv`` with
precomputed edge weights and ``DeepGraphInfomax`` — written out here with the same parameters and
the same arithmetic (tests/test_stgchb.py checks both against torch_geometric itself): importing
torch_geometric costs 10–30 s on a 2-core machine (it pulls in torch._dynamo, its datasets and
LLM modules), which every `query` of an ST-GCHB model would pay before reading a tile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..graph import StreamingGraphEncoder, gcn_edge_weights, knn_graph
from ._config import ModelConfig
from ._registry import register_model
from .backbones import create_backbone
from .bleep import Bleep, bleep_loss
from .layers import ImageNormalize, ProjectionHead


@dataclass(frozen=True)
class StgchbParams:
    """ST-GCHB's hyper-parameters, kept in ``ModelConfig.method_params``.

    ``sigma``: the Gaussian kernel width of HSIC, a number or "median" (the median pairwise
    distance of each matrix, per step). ``hsic_nodes``: HSIC is O(n²), so it is computed on a
    random subset of at most this many nodes per step. ``pretrain_epochs`` train DGI alone, then
    ``epochs`` train everything; an epoch is one step per section (its whole graph)."""

    graph_k: int = 6
    hidden: int = 256
    layers: int = 1
    beta: float = 25.0
    #: the median heuristic and a root weight (skip) won on an inner split of training sections
    #: (C2, C3 → C4 of HER2ST: HEG-50 0.363 vs 0.330 for the public code's sigma = 10, no skip)
    sigma: float | str = "median"
    hsic_weight: float = 1.0
    dgi_weight: float = 1.0
    hsic_nodes: int = 1024
    skip: bool = True
    pretrain_epochs: int = 20
    epochs: int = 100

    def __post_init__(self):
        if isinstance(self.skip, str):  # from --method-param skip=true
            object.__setattr__(self, "skip", self.skip.strip().lower() in ("1", "true", "yes"))
        object.__setattr__(self, "skip", bool(self.skip))
        sigma = self.sigma
        if not (isinstance(sigma, str) and sigma == "median"):
            try:
                sigma = float(sigma)
            except (TypeError, ValueError):
                raise InputError(f"stgchb sigma must be a number or 'median', not {self.sigma!r}") from None
            if not sigma > 0:
                raise InputError(f"stgchb sigma must be positive, not {sigma}")
            object.__setattr__(self, "sigma", sigma)
        for name in ("graph_k", "hidden", "layers"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"stgchb {name} must be at least 1, not {getattr(self, name)}")
        for name in ("pretrain_epochs", "epochs"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"stgchb {name} must be non-negative, not {getattr(self, name)}")
        if int(self.hsic_nodes) < 2:
            raise InputError(f"stgchb hsic_nodes must be at least 2, not {self.hsic_nodes}")

    @classmethod
    def from_cfg(cls, cfg: ModelConfig) -> StgchbParams:
        raw = dict(cfg.method_params or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"unknown stgchb parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        # a config written before a parameter existed was trained as the code then did: the
        # public code's choices, not today's defaults
        raw.setdefault("skip", False)
        return cls(**raw)

    def to_dict(self) -> dict:
        """JSON-ready, for ``ModelConfig(method_params=...)``."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- HSIC


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).float()


def _gaussian_kernel(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    x = _flat(x)
    x = x - x.mean(0, keepdim=True)  # translation-invariant; keeps the squared norms small
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    return torch.exp(-d2 / (2 * sigma**2))


def _hsic_of_kernels(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    n = len(kx)
    # tr(Kx H Ky H) = Σ (H Kx H) ∘ Ky: centring one kernel is enough
    centred = kx - kx.mean(0, keepdim=True) - kx.mean(1, keepdim=True) + kx.mean()
    return (centred * ky).sum() / (n - 1) ** 2


def hsic(x: torch.Tensor, y: torch.Tensor, sigma_x: float, sigma_y: float) -> torch.Tensor:
    """Biased HSIC estimate tr(K_X H K_Y H)/(n−1)² with Gaussian kernels of widths ``sigma_x``,
    ``sigma_y`` (rows are samples; trailing dimensions are flattened)."""
    if len(x) != len(y) or len(x) < 2:
        raise InputError(f"HSIC needs paired samples, at least 2: got {len(x)} and {len(y)}")
    return _hsic_of_kernels(_gaussian_kernel(x, sigma_x), _gaussian_kernel(y, sigma_y))


def nhsic(x: torch.Tensor, y: torch.Tensor, sigma_x: float, sigma_y: float) -> torch.Tensor:
    """Normalised HSIC, HSIC(X,Y)/√((1+HSIC(X,X))(1+HSIC(Y,Y))), in [0, 1): a scale-free
    dependence measure, used on both views alike."""
    if len(x) != len(y) or len(x) < 2:
        raise InputError(f"HSIC needs paired samples, at least 2: got {len(x)} and {len(y)}")
    kx, ky = _gaussian_kernel(x, sigma_x), _gaussian_kernel(y, sigma_y)
    return _hsic_of_kernels(kx, ky) / torch.sqrt((1 + _hsic_of_kernels(kx, kx)) * (1 + _hsic_of_kernels(ky, ky)))


def median_sigma(x: torch.Tensor) -> float:
    """The median pairwise distance between rows (the usual kernel-width heuristic); 1 when all
    rows coincide."""
    x = _flat(x.detach())
    distances = torch.pdist(x)
    value = float(distances.median()) if len(distances) else 0.0
    return value if value > 0 else 1.0


def hsic_bottleneck(inputs: torch.Tensor, hidden: torch.Tensor, projection: torch.Tensor, *, beta: float, sigma: float | str) -> torch.Tensor:
    """One view's HSIC-bottleneck loss: nHSIC(input, hidden) − β·nHSIC(hidden, projection)."""

    def width(t: torch.Tensor) -> float:
        return median_sigma(t) if sigma == "median" else float(sigma)

    s_in, s_hidden, s_proj = width(inputs), width(hidden), width(projection)
    return nhsic(inputs, hidden, s_in, s_hidden) - beta * nhsic(hidden, projection, s_hidden, s_proj)


# --------------------------------------------------------------------------------------- model


class GraphConv(nn.Module):
    """A graph convolution with given edge weights: ``out_i = b + Σ_j w_ji · W x_j`` over the edges
    j → i (``edge_index[0]`` → ``edge_index[1]``) — torch_geometric's ``GCNConv(normalize=False,
    add_self_loops=False)``, with its parameter names (``lin.weight``, ``bias``) and initialisation
    (Glorot weight, zero bias)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.lin.weight)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        source, target = edge_index[0], edge_index[1]
        out = torch.zeros(len(x), h.shape[1], dtype=h.dtype, device=h.device)
        out.index_add_(0, target, h[source] * edge_weight.to(h.dtype).unsqueeze(1))
        return out + self.bias


class DeepGraphInfomax(nn.Module):
    """Deep Graph Infomax (Veličković et al., 2019), as torch_geometric's ``DeepGraphInfomax``:
    the encoder's node embeddings of the graph and of a corrupted copy, a summary of the real
    ones, and a bilinear discriminator ``σ(z · W s)`` trained with binary cross-entropy to tell
    them apart. Same parameter (``weight``), initialisation and loss."""

    EPS = 1e-15

    def __init__(self, hidden: int, encoder: nn.Module, summary: Callable, corruption: Callable):
        super().__init__()
        self.encoder, self.summary, self.corruption = encoder, summary, corruption
        self.weight = nn.Parameter(torch.empty(hidden, hidden))
        bound = 1.0 / np.sqrt(hidden)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positive = self.encoder(*args)
        negative = self.encoder(*self.corruption(*args))
        return positive, negative, self.summary(positive, *args)

    def discriminate(self, z: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z @ (self.weight @ summary))

    def loss(self, positive: torch.Tensor, negative: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        real = -torch.log(self.discriminate(positive, summary) + self.EPS).mean()
        fake = -torch.log(1 - self.discriminate(negative, summary) + self.EPS).mean()
        return real + fake


class GcnEncoder(nn.Module):
    """Graph convolutions, each followed by a PReLU (DGI's encoder). The edge weights come from
    :func:`histoindex.graph.gcn_edge_weights` on the whole graph, so a subgraph (a window of a
    streamed slide) encodes its interior exactly as the whole graph would."""

    def __init__(self, in_dim: int, hidden: int, layers: int, *, skip: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        self.convs = nn.ModuleList(GraphConv(a, b) for a, b in zip(dims, dims[1:]))
        self.activations = nn.ModuleList(nn.PReLU(hidden) for _ in range(layers))
        # a spot's own features through their own weights, beside its neighbourhood's (GraphSAGE's
        # root weight): a GCN alone gives a spot 1/(degree) of its own signal
        self.roots = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:])) if skip else None

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        for i, (conv, activation) in enumerate(zip(self.convs, self.activations)):
            h = conv(x, edge_index, edge_weight)
            if self.roots is not None:
                h = h + self.roots[i](x)
            x = activation(h)
        return x


class _Borrowed(nn.Module):
    """DGI's handle on an encoder the model owns: it calls the encoder without registering it a
    second time (which would list its tensors twice in the state dict; safetensors refuses
    tensors that share memory)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self._encoder = (encoder,)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._encoder[0](*args, **kwargs)


def _mean_summary(z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """DGI's readout: the sigmoid of the mean node embedding."""
    return torch.sigmoid(z.mean(dim=0))


class _ShuffleRows:
    """DGI's corruption: node features with their rows permuted, the graph kept. Draws from
    ``generator`` when one is set (training sets it, for determinism)."""

    generator: torch.Generator | None = None

    def __call__(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor):
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        return x[perm], edge_index, edge_weight


class StGchb(nn.Module):
    """ST-GCHB: BLEEP's frozen image backbone; an image GCN and an expression GCN over the spot
    graph, each with a projection head into the shared space and a Deep Graph Infomax head."""

    # the backbone side is BLEEP's, shared rather than copied
    image_features = Bleep.image_features

    def __init__(self, cfg: ModelConfig, *, pretrained: bool | str = False):
        super().__init__()
        if not cfg.genes:
            raise InputError("a model needs at least one gene")
        self.cfg = cfg
        self.params = params = StgchbParams.from_cfg(cfg)
        self.normalize = ImageNormalize(cfg.mean, cfg.std)
        self.image_encoder = create_backbone(cfg.backbone, pretrained=pretrained, args=cfg.backbone_args)
        self.image_gcn = GcnEncoder(self.image_encoder.num_features, params.hidden, params.layers, skip=params.skip)
        self.expression_gcn = GcnEncoder(len(cfg.genes), params.hidden, params.layers, skip=params.skip)
        self.image_projection = ProjectionHead(params.hidden, cfg.embed_dim, cfg.dropout)
        self.expression_projection = ProjectionHead(params.hidden, cfg.embed_dim, cfg.dropout)
        self.image_dgi = DeepGraphInfomax(params.hidden, _Borrowed(self.image_gcn), _mean_summary, _ShuffleRows())
        self.expression_dgi = DeepGraphInfomax(params.hidden, _Borrowed(self.expression_gcn), _mean_summary, _ShuffleRows())

    def encode_image_graph(self, features: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, F) backbone features of a spot graph → (hidden (n, hidden), projection (n, embed_dim))."""
        hidden = self.image_gcn(features, edge_index, edge_weight)
        return hidden, self.image_projection(hidden)

    def encode_expression_graph(self, expression: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, G) expression of a spot graph → (hidden (n, hidden), projection (n, embed_dim))."""
        hidden = self.expression_gcn(expression, edge_index, edge_weight)
        return hidden, self.expression_projection(hidden)


@register_model
def stgchb(cfg: ModelConfig, *, pretrained: bool | str = False) -> StGchb:
    return StGchb(cfg, pretrained=pretrained)


# ------------------------------------------------------------------------------------ training


@dataclass
class GraphSection:
    """One section as ST-GCHB trains on it: ``features`` (n, V, F) float32 frozen-backbone
    features of V dihedral views per spot, ``expression`` (n, G) float32, ``xy_um`` (n, 2) spot
    centres in µm (the graph is built from them)."""

    name: str
    features: np.ndarray
    expression: np.ndarray
    xy_um: np.ndarray


@dataclass
class _Graph:
    """The training sections as one graph (no edge crosses sections), on the CPU: each step moves
    only its batch's neighbourhood to the device."""

    features: torch.Tensor  # (N, V, F)
    expression: torch.Tensor  # (N, G)
    edge_index: np.ndarray  # (2, E), node ids of the union
    edge_weight: torch.Tensor  # (E,), GCN weights of each section's own graph
    adjacency: object  # scipy CSR, [target, source]: one hop backwards is a product with it


def _section_arrays(section: GraphSection, model: StGchb) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features = np.asarray(section.features, dtype=np.float32)
    expression = np.asarray(section.expression, dtype=np.float32)
    if features.ndim == 2:
        features = features[:, None, :]
    n = len(features)
    n_features, n_genes = model.image_encoder.num_features, len(model.cfg.genes)
    if features.ndim != 3 or features.shape[2] != n_features:
        raise InputError(f"section {section.name}: features must be (spots, views, {n_features}), not {features.shape}")
    if expression.shape != (n, n_genes):
        raise InputError(f"section {section.name}: expression must be ({n}, {n_genes}), not {expression.shape}")
    if n < 2:
        raise InputError(f"section {section.name}: a graph needs at least 2 spots")
    if len(section.xy_um) != n:
        raise InputError(f"section {section.name}: {len(section.xy_um)} spot centres for {n} spots")
    edge_index = knn_graph(section.xy_um, k=model.params.graph_k)
    return features, expression, edge_index


def _union_graph(sections: Sequence[GraphSection], model: StGchb) -> _Graph:
    import scipy.sparse as sp

    features, expression, edges, weights, offset = [], [], [], [], 0
    for section in sections:
        f, e, edge_index = _section_arrays(section, model)
        features.append(f)
        expression.append(e)
        edges.append(edge_index + offset)
        weights.append(gcn_edge_weights(edge_index, len(f)))
        offset += len(f)
    if len({f.shape[1] for f in features}) != 1:
        raise InputError("every section needs the same number of views")
    edge_index = np.concatenate(edges, axis=1)
    adjacency = sp.csr_matrix((np.ones(edge_index.shape[1], np.int8), (edge_index[1], edge_index[0])), shape=(offset, offset))
    return _Graph(
        features=torch.from_numpy(np.concatenate(features)),
        expression=torch.from_numpy(np.concatenate(expression)),
        edge_index=edge_index,
        edge_weight=torch.from_numpy(np.concatenate(weights)),
        adjacency=adjacency,
    )


def _neighbourhood(graph: _Graph, batch: np.ndarray, hops: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]:
    """The nodes whose features reach ``batch`` within ``hops`` layers, their induced edges (with
    the whole graph's weights, so the batch nodes' outputs are exact), and where the batch nodes
    sit among them."""
    reached = np.zeros(graph.adjacency.shape[0], dtype=bool)
    reached[batch] = True
    for _ in range(hops):
        reached |= np.asarray(graph.adjacency @ reached.astype(np.int8)).ravel() > 0
    nodes = np.flatnonzero(reached)
    keep = reached[graph.edge_index[0]] & reached[graph.edge_index[1]]
    local = np.full(len(reached), -1, np.int64)
    local[nodes] = np.arange(len(nodes))
    sub = torch.from_numpy(local[graph.edge_index[:, keep]])
    return nodes, sub, graph.edge_weight[torch.from_numpy(keep)], local[batch]


def _step_loss(
    model: StGchb, graph: _Graph, batch: np.ndarray, cfg: ModelConfig, params: StgchbParams, generator: torch.Generator, pretraining: bool
) -> torch.Tensor:
    nodes, edge_index, edge_weight, rows = _neighbourhood(graph, batch, params.layers)
    device = next(model.image_projection.parameters()).device
    views = graph.features.shape[1]
    view = torch.randint(0, views, (len(nodes),), generator=generator)
    index = torch.from_numpy(nodes)
    features = graph.features[index, view].to(device)
    expression = graph.expression[index].to(device)
    edge_index, edge_weight = edge_index.to(device), edge_weight.to(device)
    image_z, image_neg, image_summary = model.image_dgi(features, edge_index, edge_weight)
    expr_z, expr_neg, expr_summary = model.expression_dgi(expression, edge_index, edge_weight)
    dgi = model.image_dgi.loss(image_z, image_neg, image_summary) + model.expression_dgi.loss(expr_z, expr_neg, expr_summary)
    if pretraining:
        return dgi
    rows = torch.from_numpy(rows).to(device)
    image_h, expr_h = image_z[rows], expr_z[rows]
    image_p, expr_p = model.image_projection(image_h), model.expression_projection(expr_h)
    loss = bleep_loss(image_p, expr_p, cfg.temperature) + params.dgi_weight * dgi
    if params.hsic_weight:
        sub = torch.randperm(len(rows), generator=generator)[: params.hsic_nodes].to(device) if len(rows) > params.hsic_nodes else slice(None)
        terms = hsic_bottleneck(features[rows][sub], image_h[sub], image_p[sub], beta=params.beta, sigma=params.sigma)
        terms = terms + hsic_bottleneck(expression[rows][sub], expr_h[sub], expr_p[sub], beta=params.beta, sigma=params.sigma)
        loss = loss + params.hsic_weight * terms
    return loss


def train_stgchb(
    model: StGchb,
    sections: Sequence[GraphSection],
    cfg: ModelConfig,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train ``model``'s graph encoders, DGI and projection heads in place on cached backbone
    features (the backbone is not trained): ``pretrain_epochs`` of DGI alone, then ``epochs`` of
    BLEEP's contrastive loss + hsic_weight·HSIC bottleneck + dgi_weight·DGI, both views.

    The sections form one graph (each its own kNN graph; no edge between sections). An epoch is a
    shuffled pass over all spots in batches of ``cfg.batch_size`` (as BLEEP's): each step runs the
    GCNs on the batch's L-hop neighbourhood only (exact for the batch, with the whole graph's edge
    weights) and the contrastive loss on the batch, so every batch mixes sections — the loss then
    learns to match spots across sections, as queries must — and a step costs the batch, not the
    reference. A random dihedral view per spot per step. AdamW with ``cfg.head_lr``.

    Deterministic for a given ``generator`` state on one device: every draw (batches, views, DGI's
    row shuffles, HSIC subsets, and dropout, seeded from it in a forked RNG) comes from it. Returns
    the mean loss of every epoch, pretraining first; ``progress(epoch, total_epochs, loss)`` is
    called after each.
    """
    if not sections:
        raise InputError("no sections to train on")
    device = torch.device(device)
    params = StgchbParams.from_cfg(cfg)
    model.to(device)
    graph = _union_graph(sections, model)
    n = len(graph.features)
    batch_size = max(2, min(cfg.batch_size, n))
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    trainable = [p for name, p in model.named_parameters() if not name.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    corruptions = [model.image_dgi.corruption, model.expression_dgi.corruption]
    total = params.pretrain_epochs + params.epochs
    history: list[float] = []
    dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    threads = torch.get_num_threads()
    if device.type == "cpu":  # a step is hundreds of tiny ops: on 2 cores, 1 thread trains 3.5× faster than 2
        torch.set_num_threads(1)
    try:
        for corruption in corruptions:
            corruption.generator = generator
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(dropout_seed)
            for epoch in range(total):
                pretraining = epoch < params.pretrain_epochs
                model.train()
                model.image_encoder.eval()
                losses = []
                order = torch.randperm(n, generator=generator).numpy()
                for start in range(0, n - batch_size + 1, batch_size):  # the ragged last batch is dropped
                    loss = _step_loss(model, graph, np.sort(order[start : start + batch_size]), cfg, params, generator, pretraining)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                history.append(float(np.mean(losses)))
                if progress:
                    progress(epoch + 1, total, history[-1])
    finally:
        torch.set_num_threads(threads)
        for corruption in corruptions:
            corruption.generator = None
        for p in model.image_encoder.parameters():
            p.requires_grad_(True)
        model.eval()
    return history


# ----------------------------------------------------------------------------------- embedding


def _view_mean(features: np.ndarray | torch.Tensor, views_mean: bool = True) -> torch.Tensor:
    features = torch.as_tensor(features).float()
    if features.ndim == 3:
        features = features.mean(1) if views_mean else features[:, 0]
    if features.ndim != 2:
        raise InputError(f"features must be (spots, features) or (spots, views, features), not {tuple(features.shape)}")
    return features


@torch.no_grad()
def embed_graph_references(
    model: StGchb, section: GraphSection, *, device: torch.device | str = "cpu", views_mean: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb, expression_emb), both (n, embed_dim) float32 and L2-normalised, of one
    reference section's whole graph; the image side from its view-averaged features (or view 0
    with ``views_mean=False``)."""
    device = torch.device(device)
    model.to(device).eval()
    features = _view_mean(section.features, views_mean).to(device)
    expression = torch.as_tensor(np.asarray(section.expression, dtype=np.float32)).to(device)
    n = len(features)
    if len(expression) != n or len(section.xy_um) != n:
        raise InputError(f"section {section.name}: {n} feature rows, {len(expression)} expression rows, {len(section.xy_um)} centres")
    edge_index = knn_graph(section.xy_um, k=model.params.graph_k)
    edge_weight = torch.from_numpy(gcn_edge_weights(edge_index, n)).to(device)
    edge_index = torch.from_numpy(edge_index).to(device)
    _, image = model.encode_image_graph(features, edge_index, edge_weight)
    _, expr = model.encode_expression_graph(expression, edge_index, edge_weight)
    return F.normalize(image, dim=1).cpu().numpy(), F.normalize(expr, dim=1).cpu().numpy()


def embed_graph_queries(
    model: StGchb,
    features_stream: Iterable[np.ndarray | torch.Tensor],
    edge_index: np.ndarray | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    n: int | None = None,
) -> Iterator[np.ndarray]:
    """L2-normalised (m, embed_dim) float32 image embeddings of a query slide's tiles, in node
    order, as their graph neighbourhoods arrive: ``features_stream`` yields (m, F) backbone
    features (or (m, V, F), averaged over views) of consecutive nodes of the whole slide's graph
    ``edge_index`` (:func:`histoindex.graph.knn_graph` of the tile centres; ``n`` nodes, by
    default its largest id + 1). Equal to embedding the whole graph at once; memory stays flat
    with slide size for a row-major stream (:class:`histoindex.graph.StreamingGraphEncoder`)."""
    device = torch.device(device)
    model.to(device).eval()
    if n is None:
        n = int(torch.as_tensor(edge_index).max()) + 1

    def encode(features: torch.Tensor, sub_edge_index: torch.Tensor, sub_edge_weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.image_gcn(features.to(device), sub_edge_index.to(device), sub_edge_weight.to(device))

    encoder = StreamingGraphEncoder(edge_index, n, model.params.layers, encode)
    for hidden in encoder.stream(_view_mean(chunk) for chunk in features_stream):
        with torch.no_grad():
            yield F.normalize(model.image_projection(hidden), dim=1).cpu().numpy()
