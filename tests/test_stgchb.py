"""ST-GCHB: spatial graphs, HSIC, DGI, streaming graph encoding and training, on random features
(the backbone is only built, never run: training works on cached features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoindex.errors import InputError
from histoindex.graph import StreamingGraphEncoder, gcn_edge_weights, hop_neighbourhood, knn_graph, knn_indices
from histoindex.models import ModelConfig, create_model, load_model, weights_bytes
from histoindex.models.stgchb import (
    GraphSection,
    StGchb,
    StgchbParams,
    embed_graph_queries,
    embed_graph_references,
    hsic,
    median_sigma,
    nhsic,
    train_stgchb,
)

GENES = tuple(f"g{i}" for i in range(10))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with two intra-op threads on two busy cores, each scatter waits
    tens of milliseconds on the other thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grid(rows: int, cols: int, spacing: float = 100.0) -> np.ndarray:
    """Row-major (x, y) centres in µm."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.c_[xx.ravel(), yy.ravel()].astype(np.float64) * spacing


def edge_set(edge_index: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, edge_index.T.tolist()))


def tiny_cfg(**params) -> ModelConfig:
    defaults = {"hidden": 16, "layers": 1, "pretrain_epochs": 3, "epochs": 12, "sigma": "median"}
    return ModelConfig(method="stgchb", backbone="test_resnet", genes=GENES, embed_dim=16, method_params={**defaults, **params})


def build(cfg: ModelConfig, seed: int = 0) -> StGchb:
    torch.manual_seed(seed)
    return create_model(cfg)


def synthetic_section(name: str, seed: int, n_features: int, rows: int = 10, cols: int = 12) -> GraphSection:
    """Features and expression both driven by a spatially smooth latent, plus noise."""
    rng = np.random.default_rng(seed)
    xy = grid(rows, cols)
    phase = rng.uniform(0, 2 * np.pi, 3)
    latent = np.stack([np.sin(xy[:, 0] / 250 + phase[0]), np.cos(xy[:, 1] / 200 + phase[1]), np.sin((xy[:, 0] + xy[:, 1]) / 300 + phase[2])], 1)
    features = (latent @ rng.normal(size=(3, n_features)))[:, None, :] + 0.3 * rng.normal(size=(len(xy), 8, n_features))
    expression = latent @ rng.normal(size=(3, len(GENES))) + 0.3 * rng.normal(size=(len(xy), len(GENES)))
    return GraphSection(name, features.astype(np.float32), expression.astype(np.float32), xy)


# ------------------------------------------------------------------------------------ HSIC


def test_hsic_measures_dependence():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g)
    sx, sy = median_sigma(x), median_sigma(y)
    independent, identical = float(hsic(x, y, sx, sy)), float(hsic(x, x, sx, sx))
    assert abs(independent) < 0.01
    assert identical > 0.01 and identical > 20 * abs(independent)

    # nHSIC is in [0, 1] and at most √(b_X b_Y), b = H/(1+H) (Cauchy–Schwarz): reached for X with itself
    def ceiling(t: torch.Tensor, sigma: float) -> float:
        h = float(hsic(t, t, sigma, sigma))
        return h / (1 + h)

    assert float(nhsic(x, x, sx, sx)) == pytest.approx(ceiling(x, sx), rel=1e-5)
    for other in (y, x + 0.5 * y, x**2, torch.tanh(x)):
        so = median_sigma(other)
        value = float(nhsic(x, other, sx, so))
        assert 0 <= value < (ceiling(x, sx) * ceiling(other, so)) ** 0.5 <= 1
    assert float(nhsic(x, x + 0.1 * y, sx, sx)) > 10 * float(nhsic(x, y, sx, sy))


def test_median_sigma_is_the_median_distance():
    from scipy.spatial.distance import pdist

    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    assert median_sigma(x) == pytest.approx(float(np.median(pdist(x.numpy()))), rel=1e-5)
    assert median_sigma(torch.ones(5, 2)) == 1.0  # degenerate: all rows equal


# ---------------------------------------------------------------------------------- graphs


def test_knn_graph_is_symmetric_with_self_loops_and_sorted():
    xy = grid(15, 20)
    edges = knn_graph(xy, k=6)
    n = len(xy)
    assert edges.dtype == np.int64 and edges.shape[0] == 2
    pairs = edge_set(edges)
    assert len(pairs) == edges.shape[1]  # no duplicates
    assert pairs == {(b, a) for a, b in pairs}
    assert all((i, i) in pairs for i in range(n))
    codes = edges[0] * n + edges[1]
    assert (np.diff(codes) > 0).all()
    # on a regular grid every interior spot ends up joined to its 8 neighbours
    interior = 7 * 20 + 9
    assert {b for a, b in pairs if a == interior} == {interior + d for d in (-21, -20, -19, -1, 0, 1, 19, 20, 21)}


def test_knn_out_list_of_an_interior_grid_point():
    xy = grid(9, 9)
    centre = 4 * 9 + 4
    out = knn_indices(xy, k=6)[centre]
    assert len(set(out.tolist())) == 6 and centre not in out
    # the 4 at one spacing, then 2 of the 4 diagonal ties, broken by (y, x): the row above
    assert set(out[:4].tolist()) == {centre - 9, centre - 1, centre + 1, centre + 9}
    assert out[4:].tolist() == [centre - 10, centre - 8]


def test_knn_graph_never_crosses_groups_and_ignores_other_groups():
    xy = grid(8, 8)
    both = np.concatenate([xy, xy + 30.0])  # two interleaved sections
    groups = np.repeat(["a", "b"], len(xy))
    edges = knn_graph(both, k=6, groups=groups)
    assert (groups[edges[0]] == groups[edges[1]]).all()
    alone = knn_graph(xy, k=6)
    assert edge_set(edges[:, edges[0] < len(xy)]) == edge_set(alone)
    assert edge_set(edges[:, edges[0] >= len(xy)] - len(xy)) == edge_set(alone)


def test_knn_graph_small_groups_are_complete():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [100.0, 100.0]])
    edges = knn_graph(xy, k=6, groups=np.array([0, 0, 0, 1]), pitch_um=np.inf)  # no distance bound
    assert edge_set(edges) == {(a, b) for a in range(3) for b in range(3)} | {(3, 3)}
    assert (knn_indices(xy, k=6, groups=np.array([0, 0, 0, 1]))[3] == -1).all()
    # bounded (the default: 1.75 × the group's 1 µm spacing), the spot 6 µm away stands alone
    bounded = knn_graph(xy, k=6, groups=np.array([0, 0, 0, 1]))
    assert edge_set(bounded) == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (3, 3)}


@pytest.mark.parametrize("layout", ["random", "grid"])
def test_knn_graph_does_not_depend_on_input_order(layout):
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 2000, (300, 2)) if layout == "random" else grid(12, 25)
    groups = rng.integers(0, 3, len(xy))
    perm = rng.permutation(len(xy))
    edges = knn_graph(xy, k=6, groups=groups)
    permuted = knn_graph(xy[perm], k=6, groups=groups[perm])
    assert edge_set(perm[permuted]) == edge_set(edges)
    assert np.array_equal(knn_graph(xy, k=6, groups=groups), edges)


def test_gcn_edge_weights_and_hop_neighbourhood():
    xy = np.random.default_rng(4).uniform(0, 500, (40, 2))
    edges = knn_graph(xy, k=4)
    n = len(xy)
    adjacency = np.zeros((n, n))
    adjacency[edges[1], edges[0]] = 1
    d = adjacency.sum(1) ** -0.5
    normalised = d[:, None] * adjacency * d[None, :]
    assert np.allclose(gcn_edge_weights(edges, n), normalised[edges[1], edges[0]])
    reach = np.linalg.matrix_power(adjacency + np.eye(n), 2)[[3, 17]].sum(0) > 0
    assert np.array_equal(hop_neighbourhood(edges, n, np.array([3, 17]), 2), np.flatnonzero(reach))
    with pytest.raises(InputError):
        gcn_edge_weights(edges, n - 1)


# ------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def model() -> StGchb:
    return build(tiny_cfg())


def test_params_from_config():
    params = StgchbParams.from_cfg(tiny_cfg(sigma="10", beta=5))
    assert params.sigma == 10.0 and params.beta == 5 and params.hidden == 16
    # a new model's config records every parameter; one written before `skip` existed was trained without it
    assert StgchbParams.from_cfg(ModelConfig(method="stgchb", method_params=StgchbParams().to_dict())) == StgchbParams()
    assert StgchbParams.from_cfg(ModelConfig(method="stgchb")) == StgchbParams(skip=False)
    with pytest.raises(InputError, match="unknown stgchb parameter"):
        StgchbParams.from_cfg(tiny_cfg(hiden=3))
    with pytest.raises(InputError, match="sigma"):
        StgchbParams(sigma="mean")
    cfg = tiny_cfg(layers=2)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert "method_params" not in ModelConfig().to_json()  # other methods' configs (and ids) unchanged


def test_dgi_loss_falls_on_two_clusters(model):
    rng = np.random.default_rng(5)
    xy = np.concatenate([rng.uniform(0, 300, (40, 2)), rng.uniform(5000, 5300, (40, 2))])
    n_features = model.image_encoder.num_features
    centres = rng.normal(size=(2, n_features)) * 2
    x = torch.from_numpy((centres[np.repeat([0, 1], 40)] + rng.normal(size=(80, n_features))).astype(np.float32))
    edges = knn_graph(xy, k=6)
    edge_index, edge_weight = torch.from_numpy(edges), torch.from_numpy(gcn_edge_weights(edges, len(xy)))
    dgi = build(tiny_cfg()).image_dgi  # a fresh copy: the shared model stays untrained
    dgi.corruption.generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(list(dgi.parameters()) + list(dgi.encoder._encoder[0].parameters()), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = dgi.loss(*dgi(x, edge_index, edge_weight))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_the_model_owns_its_gcns_once(model):
    keys = model.state_dict().keys()
    assert not any(".encoder." in k for k in keys)  # DGI borrows the GCNs: no duplicate tensors
    assert {"image_dgi.weight", "expression_dgi.weight"} <= set(keys)
    assert model.image_dgi.encoder._encoder[0] is model.image_gcn


# ------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("layers", [1, 2])
def test_streamed_queries_equal_whole_graph_embeddings(layers):
    cfg = tiny_cfg(layers=layers)
    model = build(cfg, seed=layers)
    n_features = model.image_encoder.num_features
    for xy in (grid(9, 11), np.random.default_rng(6).uniform(0, 1000, (90, 2))):  # row-major, and any order
        features = np.random.default_rng(7).normal(size=(len(xy), 2, n_features)).astype(np.float32)
        section = GraphSection("q", features, np.zeros((len(xy), len(GENES)), np.float32), xy)
        whole, _ = embed_graph_references(model, section)
        edges = knn_graph(xy, k=6)
        for size in (1, 4, 13, len(xy)):
            chunks = (features[i : i + size] for i in range(0, len(xy), size))
            streamed = np.concatenate(list(embed_graph_queries(model, chunks, edges)))
            assert streamed.shape == whole.shape
            np.testing.assert_allclose(streamed, whole, atol=1e-5)


def _torch_gcn(layers: int):
    """A parameter-free stand-in GCN (weighted sums and a nonlinearity): fast, and as sensitive
    to a missing neighbour as the real one."""

    def encode(x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        for _ in range(layers):
            out = torch.zeros_like(x).index_add_(0, edge_index[1], x[edge_index[0]] * edge_weight[:, None])
            x = torch.tanh(out + 0.1 * x)
        return x

    return encode


@pytest.mark.parametrize("size", [1, 5, 64])
def test_streaming_memory_is_flat_on_a_long_row_major_grid(size):
    rows, cols, layers = 2000, 5, 2
    xy = grid(rows, cols)
    edges = knn_graph(xy, k=6)
    n = len(xy)
    features = torch.from_numpy(np.random.default_rng(8).normal(size=(n, 3)).astype(np.float32))
    encode = _torch_gcn(layers)
    whole = encode(features, torch.from_numpy(edges), torch.from_numpy(gcn_edge_weights(edges, n)))
    encoder = StreamingGraphEncoder(edges, n, layers, encode)
    streamed = torch.cat(list(encoder.stream(features[i : i + size] for i in range(0, n, size))))
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)
    # a node waits for its neighbourhood's rows below it, and those above stay for it: on this
    # narrow grid, border spots reach 2 rows (k=6), so 2 hops span 9 rows, however long the slide
    assert encoder.peak_buffered <= 9 * cols + size
    assert encoder.peak_buffered < n / 50


def test_stream_of_the_wrong_length_is_an_error():
    edges = knn_graph(grid(4, 4), k=4)
    encoder = StreamingGraphEncoder(edges, 16, 1, _torch_gcn(1))
    with pytest.raises(InputError, match="ended after 10 of"):
        list(encoder.stream([torch.zeros(10, 2)]))
    with pytest.raises(InputError, match="more than"):
        list(encoder.stream([torch.zeros(10, 2), torch.zeros(10, 2)]))


# ------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_is_deterministic_and_round_trips():
    cfg = tiny_cfg(hsic_nodes=64)  # < 120 spots per section: HSIC on random subsets
    n_features = build(cfg).image_encoder.num_features
    sections = [synthetic_section("a", 1, n_features), synthetic_section("b", 2, n_features, rows=8)]
    runs = []
    for seed in (0, 0, 1):
        model = build(cfg)
        calls = []
        history = train_stgchb(model, sections, cfg, generator=torch.Generator().manual_seed(seed), progress=lambda *a, calls=calls: calls.append(a))
        runs.append((model, history))
    (model, history), (twin, twin_history), (_, other_history) = runs
    params = StgchbParams.from_cfg(cfg)
    assert len(history) == params.pretrain_epochs + params.epochs
    assert [c[:2] for c in calls] == [(e, len(history)) for e in range(1, len(history) + 1)]
    joint = history[params.pretrain_epochs :]
    assert np.mean(joint[-3:]) < joint[0] - 0.2
    assert history == twin_history and history != other_history
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    assert not model.training

    image, expression = embed_graph_references(model, sections[0])
    assert image.shape == expression.shape == (120, cfg.embed_dim) and image.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)
    # trained: a spot's image embedding retrieves its own expression embedding better than chance
    assert (np.argsort(-(image @ expression.T), axis=1)[:, :10] == np.arange(120)[:, None]).any(1).mean() > 0.25

    stored = ModelConfig.from_json(cfg.to_json())
    loaded = load_model(stored, weights_bytes(model, cfg))
    assert isinstance(loaded, StGchb) and loaded.params == params
    loaded_image, loaded_expression = embed_graph_references(loaded, sections[0])
    assert np.array_equal(loaded_image, image) and np.array_equal(loaded_expression, expression)


def test_graph_layers_match_torch_geometric():
    """GraphConv and DeepGraphInfomax are torch_geometric's GCNConv(normalize=False,
    add_self_loops=False) and DeepGraphInfomax, written out so that a query does not pay
    torch_geometric's import: same parameter names, same outputs, same loss."""
    pyg = pytest.importorskip("torch_geometric.nn")
    from histoindex.models.stgchb import DeepGraphInfomax, GraphConv

    torch.manual_seed(0)
    n, d_in, d_out = 40, 12, 8
    x = torch.randn(n, d_in)
    edge_index = torch.from_numpy(knn_graph(np.random.default_rng(0).uniform(0, 100, (n, 2)), k=4))
    edge_weight = torch.from_numpy(gcn_edge_weights(edge_index.numpy(), n))
    ours, theirs = GraphConv(d_in, d_out), pyg.GCNConv(d_in, d_out, normalize=False, add_self_loops=False)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"lin.weight", "bias"}
    with torch.no_grad():
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x, edge_index, edge_weight), theirs(x, edge_index, edge_weight), rtol=1e-5, atol=1e-6)

    encoder = torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.PReLU(d_out))
    perm = torch.randperm(n)

    def run(dgi_class):
        dgi = dgi_class(d_out, lambda x, *_: encoder(x), lambda z, *_: torch.sigmoid(z.mean(0)), lambda x, *a: (x[perm], *a))
        with torch.no_grad():
            dgi.weight.copy_(torch.linspace(-0.3, 0.3, d_out * d_out).reshape(d_out, d_out))
        positive, negative, summary = dgi(x, edge_index, edge_weight)
        return positive, negative, dgi.loss(positive, negative, summary)

    for a, b in zip(run(DeepGraphInfomax), run(pyg.DeepGraphInfomax)):
        torch.testing.assert_close(a, b)


def test_an_stgchb_model_loads_and_embeds_without_torch_geometric(tmp_path):
    """torch_geometric takes 10-30 s to import: building, loading and running an ST-GCHB model
    never imports it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from histoindex.models import ModelConfig, create_model, load_model, weights_bytes\n"
        "from histoindex.models.stgchb import GraphSection, embed_graph_references\n"
        "cfg = ModelConfig(method='stgchb', backbone='resnet10t', genes=('a', 'b', 'c'), method_params={'hidden': 8})\n"
        "model = load_model(cfg, weights_bytes(create_model(cfg), cfg))\n"
        "n = 10; rng = np.random.default_rng(0)\n"
        "section = GraphSection('s', rng.normal(size=(n, model.image_encoder.num_features)).astype('float32'), rng.normal(size=(n, 3)).astype('float32'), rng.uniform(0, 500, (n, 2)))\n"
        "embed_graph_references(model, section)\n"
        "print(any(m.startswith('torch_geometric') for m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
