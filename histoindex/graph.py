"""Spatial graphs over spots or tiles, for graph encoders (ST-GCHB): k-nearest-neighbour graphs,
GCN edge weights computed once on the whole graph, and a streaming encoder that runs a GCN over a
slide's tiles as they arrive, with memory flat in the slide's size and outputs exactly those of
encoding the whole graph at once.

numpy/scipy and torch only: torch_geometric is not needed here (and is slow to import).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .errors import InputError

#: distances are compared after rounding to this (µm), so that ties on regular grids are ties
_DISTANCE_QUANTUM_UM = 1e-6

#: graph edges reach at most this many grid pitches (:func:`grid_pitch`): a square grid's diagonals
#: are in (√2; up to 1.68 on HER2ST, whose spot centres scatter ±8 % around the grid, so 1.5 would
#: cut a quarter of its edges), its next ring (2) and any other piece of tissue are out
MAX_EDGE_PITCHES = 1.75


def _check_xy(xy_um: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InputError(f"spot centres must be an (n, 2) array, not shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise InputError("spot centres contain NaN or infinite coordinates")
    return xy


def _quantise(values: np.ndarray) -> np.ndarray:
    return np.rint(values / _DISTANCE_QUANTUM_UM).astype(np.int64)


def _group_members(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    if groups is None:
        return [np.arange(n)]
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise InputError(f"groups must have one value per spot ({n}), not shape {groups.shape}")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def _nearest_in_group(xy: np.ndarray, members: np.ndarray, k: int) -> np.ndarray:
    """(len(members), k) global ids of each member's k nearest other members, ranked by (distance
    rounded to 1e-6 µm, the neighbour's y, then x, both rounded alike, then its global index).

    The key depends only on the two points, never on the order or presence of other points, so a
    spot's neighbours do not change when the input is permuted or other groups are added. The
    k-d tree only proposes candidates: the query is widened for rows whose k-th neighbour could tie
    with a point it did not return, and distances are recomputed from the coordinates so that
    (i, j) and (j, i) agree to the bit."""
    from scipy.spatial import cKDTree

    m = len(members)
    points = xy[members]
    tree = cKDTree(points)
    out = np.empty((m, k), dtype=np.int64)
    todo = np.arange(m)
    kq = min(m, k + 1 + 4)  # a little slack: regular grids tie at the k-th neighbour
    while todo.size:
        kd_dist, local = tree.query(points[todo], k=kq)
        delta = points[local] - points[todo][:, None, :]
        rounded = _quantise(np.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2))
        rounded[local == todo[:, None]] = np.iinfo(np.int64).max  # never one's own neighbour
        cand_y, cand_x = _quantise(points[local, 1]), _quantise(points[local, 0])
        order = np.lexsort((members[local], cand_x, cand_y, rounded), axis=-1)
        ranked = np.take_along_axis(local, order, axis=1)[:, :k]
        kth = np.take_along_axis(rounded, order, axis=1)[:, k - 1]
        # complete when everything was fetched or the farthest fetched point is beyond any tie
        done = np.full(len(todo), kq == m) | (_quantise(kd_dist[:, -1]) > kth + 1)
        out[todo[done]] = members[ranked[done]]
        todo = todo[~done]
        kq = min(m, kq * 2)
    return out


def grid_pitch(xy_um: np.ndarray) -> float:
    """The spacing of positions (µm) on their grid: the median over positions of the distance to
    the nearest other (distinct) position; 0.0 for fewer than two distinct positions. On a tile
    grid with any tissue of more than one tile this is the stride; for spots, the spot spacing."""
    from scipy.spatial import cKDTree

    points = np.unique(_check_xy(xy_um), axis=0)
    if len(points) < 2:
        return 0.0
    distances, _ = cKDTree(points).query(points, k=2)
    return float(np.median(distances[:, 1]))


def knn_indices(xy_um: np.ndarray, *, k: int = 6, groups: np.ndarray | None = None, pitch_um: float | None = None) -> np.ndarray:
    """(n, k) int64: the k nearest spots of every spot within its group, nearest first, before
    symmetrisation, but none farther than :data:`MAX_EDGE_PITCHES` grid pitches (``pitch_um``, by
    default each group's :func:`grid_pitch`; ``math.inf``: no bound): missing ones are −1 at the
    end (a group of m ≤ k spots lists at most its m − 1 others; a lone speck of tissue, none)."""
    xy = _check_xy(xy_um)
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    if pitch_um is not None and not pitch_um > 0:
        raise InputError(f"the grid pitch must be a positive number of µm, not {pitch_um}")
    out = np.full((len(xy), k), -1, dtype=np.int64)
    for members in _group_members(groups, len(xy)):
        k_eff = min(k, len(members) - 1)
        if k_eff > 0:
            nearest = _nearest_in_group(xy, members, k_eff)
            bound = MAX_EDGE_PITCHES * (grid_pitch(xy[members]) if pitch_um is None else pitch_um)
            if np.isfinite(bound):  # the same rounded distance as the ranking: (i, j) and (j, i) agree
                delta = xy[nearest] - xy[members][:, None, :]
                too_far = _quantise(np.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2)) > _quantise(bound)
                nearest[too_far] = -1  # nearest first: the dropped ones are at the end
            out[members, :k_eff] = nearest
    return out


def knn_graph(xy_um: np.ndarray, *, k: int = 6, groups: np.ndarray | None = None, pitch_um: float | None = None) -> np.ndarray:
    """(2, E) int64 edge_index of the k-nearest-neighbour graph of spot centres (µm): symmetric
    (an edge wherever either end is among the other's k nearest), with a self-loop on every spot,
    never between groups (sections) nor longer than :data:`MAX_EDGE_PITCHES` grid pitches (so
    never across to another piece of tissue; see :func:`knn_indices`), sorted, without duplicates.
    Ties on regular grids are broken as :func:`knn_indices` documents."""
    neighbours = knn_indices(xy_um, k=k, groups=groups, pitch_um=pitch_um)
    n = len(neighbours)
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    dst = neighbours.ravel()
    keep = dst >= 0
    src, dst = src[keep], dst[keep]
    loops = np.arange(n, dtype=np.int64)
    codes = np.sort(np.concatenate([src * n + dst, dst * n + src, loops * n + loops]))
    codes = codes[np.r_[True, codes[1:] != codes[:-1]]] if len(codes) else codes
    return np.stack([codes // n, codes % n]) if n else np.zeros((2, 0), dtype=np.int64)


def _check_edge_index(edge_index: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    if isinstance(edge_index, torch.Tensor):
        edge_index = edge_index.detach().cpu().numpy()
    edge_index = np.asarray(edge_index, dtype=np.int64)
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise InputError(f"edge_index must have shape (2, E), not {edge_index.shape}")
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise InputError(f"edge_index refers to nodes outside 0..{n - 1}")
    return edge_index


def gcn_edge_weights(edge_index: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    """float32 weight per edge of D^-1/2 A D^-1/2 (self-loops already in ``edge_index``), from the
    degrees in the WHOLE graph: a GCN with ``normalize=False`` run on any subgraph with these
    weights gives the whole graph's output on the subgraph's interior (a subgraph would otherwise
    see its border nodes with smaller degrees)."""
    edge_index = _check_edge_index(edge_index, n)
    degree = np.bincount(edge_index[1], minlength=n).astype(np.float64)
    inv_sqrt = np.zeros(n)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)
    return (inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]]).astype(np.float32)


def hop_neighbourhood(edge_index: np.ndarray | torch.Tensor, n: int, nodes: np.ndarray, hops: int) -> np.ndarray:
    """Sorted ids of the nodes within ``hops`` edges of ``nodes`` (themselves included), following
    edges source → target backwards: the nodes whose features reach ``nodes`` through ``hops``
    rounds of message passing."""
    import scipy.sparse as sp

    edge_index = _check_edge_index(edge_index, n)
    # adjacency[t, s] = 1 for an edge s → t: one hop backwards is a product with it
    adjacency = sp.csr_matrix((np.ones(edge_index.shape[1], dtype=np.int8), (edge_index[1], edge_index[0])), shape=(n, n))
    reached = np.zeros(n, dtype=bool)
    reached[np.asarray(nodes, dtype=np.int64)] = True
    for _ in range(hops):
        grown = reached | (adjacency.T @ reached.astype(np.int8) > 0)
        if (grown == reached).all():
            break
        reached = grown
    return np.flatnonzero(reached)


def neighbourhood_span(edge_index: np.ndarray | torch.Tensor, n: int, hops: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the smallest and largest node id within ``hops`` of each node (as
    :func:`hop_neighbourhood`), both int64 (n,)."""
    edge_index = _check_edge_index(edge_index, n)
    lo = np.arange(n, dtype=np.int64)
    hi = lo.copy()
    src, dst = edge_index
    for _ in range(hops):
        new_lo, new_hi = lo.copy(), hi.copy()
        np.minimum.at(new_lo, dst, lo[src])
        np.maximum.at(new_hi, dst, hi[src])
        if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
            break
        lo, hi = new_lo, new_hi
    return lo, hi


Encode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class StreamingGraphEncoder:
    """Run an ``layers``-deep message-passing encoder over a graph whose node features arrive as a
    stream of chunks of consecutive nodes (tiles in row-major order), yielding the outputs in node
    order as soon as each node's whole ``layers``-hop neighbourhood has arrived.

    ``encode(features (m, F), edge_index (2, E) local ids, edge_weight (E,))`` is called on the
    induced subgraph of a window of consecutive nodes, with the whole graph's edge weights (by
    default :func:`gcn_edge_weights`), so every output equals that of encoding the whole graph at
    once, whatever the chunking. Only the features some not-yet-output node still needs are kept:
    for a row-major grid that is a few rows, however large the slide (``peak_buffered`` records
    the most node features held at once by the last :meth:`stream`).
    """

    def __init__(
        self,
        edge_index: np.ndarray | torch.Tensor,
        n: int,
        layers: int,
        encode: Encode,
        *,
        edge_weight: np.ndarray | None = None,
    ):
        if layers < 0:
            raise InputError(f"layers must be non-negative, not {layers}")
        self.n, self.layers, self.encode = int(n), int(layers), encode
        edge_index = _check_edge_index(edge_index, self.n)
        weight = gcn_edge_weights(edge_index, self.n) if edge_weight is None else np.asarray(edge_weight, dtype=np.float32)
        if weight.shape != (edge_index.shape[1],):
            raise InputError(f"edge_weight must have one value per edge ({edge_index.shape[1]}), not shape {weight.shape}")
        order = np.lexsort((edge_index[1], edge_index[0]))  # by source: a window's edges are one slice
        self._src, self._dst, self._weight = edge_index[0, order], edge_index[1, order], weight[order]
        self._indptr = np.searchsorted(self._src, np.arange(self.n + 1))
        self._lo, hi = neighbourhood_span(edge_index, self.n, self.layers)
        self._ready_after = np.maximum.accumulate(hi)  # node i can be output once this node has arrived
        self._keep_from = np.minimum.accumulate(self._lo[::-1])[::-1]  # first node any of i.. still needs
        self.peak_buffered = 0

    def _induced(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._indptr[start], self._indptr[stop]
        src, dst, weight = self._src[lo:hi], self._dst[lo:hi], self._weight[lo:hi]
        inside = (dst >= start) & (dst < stop)
        edge_index = torch.from_numpy(np.stack([src[inside], dst[inside]]) - start)
        return edge_index.to(device), torch.from_numpy(weight[inside]).to(device)

    def stream(self, chunks: Iterable[np.ndarray | torch.Tensor]) -> Iterator[torch.Tensor]:
        """Feed (m, F) feature chunks of consecutive nodes from node 0; yield outputs in node order."""
        buffer: torch.Tensor | None = None
        start = received = done = 0  # buffer holds nodes start..received-1; nodes < done are output
        self.peak_buffered = 0
        for chunk in chunks:
            chunk = torch.as_tensor(chunk)
            if chunk.ndim != 2:
                raise InputError(f"feature chunks must be (nodes, features), not shape {tuple(chunk.shape)}")
            if received + len(chunk) > self.n:
                raise InputError(f"the feature stream has more than the graph's {self.n} nodes")
            if not len(chunk):
                continue
            buffer = chunk if buffer is None else torch.cat([buffer, chunk.to(buffer.device)])
            received += len(chunk)
            self.peak_buffered = max(self.peak_buffered, len(buffer))
            ready = int(np.searchsorted(self._ready_after, received, side="left"))  # nodes < ready
            if ready <= done:
                continue
            first, last = int(self._lo[done:ready].min()), int(self._ready_after[ready - 1]) + 1
            edge_index, edge_weight = self._induced(first, last, buffer.device)
            out = self.encode(buffer[first - start : last - start], edge_index, edge_weight)
            yield out[done - first : ready - first]
            done = ready
            keep_from = int(self._keep_from[done]) if done < self.n else received
            buffer, start = buffer[keep_from - start :], keep_from
        if received != self.n:
            raise InputError(f"the feature stream ended after {received} of the graph's {self.n} nodes")
