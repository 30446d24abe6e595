"""ModelConfig: everything needed to rebuild a model and feed it, saved with its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .data import NORMALISATION
from .errors import InputError

#: how a query is answered: BLEEP's (the top-50 reference profiles' plain mean) unless a model's
#: config says otherwise (models trained before these settings existed keep it)
IMPUTE_SPACES = ("log", "z")


@dataclass(frozen=True)
class RetrievalSettings:
    """How retrieved reference profiles become a prediction.

    ``k`` neighbours (cosine, top-k); weighted by ``softmax(similarity / tau)`` (``tau`` = 0: a
    plain mean, as BLEEP); averaged as ``impute`` = "log" (log1p CP10k profiles) or "z" (each
    reference dataset's per-gene z-scores, mapped back with the pooled mean and sd of the
    references searched: a dataset's depth or batch offset then does not move the average); then
    each position's prediction blended with the mean over its ``smooth_k``-nearest-neighbour
    graph neighbourhood on the query slide: ``(1 - smooth) * own + smooth * neighbourhood``.
    """

    k: int = 50
    tau: float = 0.0
    impute: str = "log"
    smooth: float = 0.0
    smooth_k: int = 6

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"retrieval k must be a positive integer, got {self.k!r}")
        if not self.tau >= 0:
            raise InputError(f"retrieval tau must be 0 (plain mean) or positive, got {self.tau!r}")
        if self.impute not in IMPUTE_SPACES:
            raise InputError(f"retrieval impute must be one of {', '.join(IMPUTE_SPACES)}, got {self.impute!r}")
        if not 0 <= self.smooth <= 1:
            raise InputError(f"smooth must be between 0 (off) and 1 (the neighbourhood mean), got {self.smooth!r}")
        if not isinstance(self.smooth_k, int) or self.smooth_k < 1:
            raise InputError(f"smooth_k must be a positive integer, got {self.smooth_k!r}")

    @classmethod
    def parse(cls, items: dict) -> RetrievalSettings:
        """From ``{"k": "100", "tau": "0.03", ...}`` (strings, as a command line gives them, or values)."""
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(items) - set(known)
        if unknown:
            raise InputError(f"unknown retrieval setting(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
        kinds = {"k": int, "smooth_k": int, "tau": float, "smooth": float, "impute": str}
        try:
            return cls(**{key: kinds[key](value) for key, value in items.items()})
        except ValueError as exc:
            raise InputError(f"retrieval settings {items}: {exc}") from exc

    def replace(self, **changes) -> RetrievalSettings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, preprocessing and training settings of one model.

    ``patch_um`` is the physical side of the square patch around each spot; it is cut from the slide
    at whatever resolution the slide has and resized to ``patch_px``. ``mean``/``std`` are the
    backbone's input normalisation (from timm's pretrained config). ``genes`` and ``normalisation``
    define the expression vector.
    """

    method: str = "bleep"
    backbone: str = "resnet18"
    # an encoder described by its own config (--backbone hf-hub:/local-dir:): the timm model args of
    # ``backbone`` (its architecture), recorded so the model rebuilds without the hub or the folder.
    # None for a plain timm name; omitted from to_json then, so existing model ids hash as before.
    backbone_args: dict | None = field(default=None, hash=False)
    weights: str = ""  # "" (random init), "timm" (timm's hub weights) or the local file it came from
    patch_px: int = 224
    patch_um: float = 110.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    embed_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    genes: tuple[str, ...] = field(default=(), repr=False)
    normalisation: str = NORMALISATION
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4  # backbone learning rate (BLEEP: 1e-4)
    head_lr: float = 1e-3  # projection heads (BLEEP: 1e-3)
    weight_decay: float = 1e-3
    freeze_backbone: bool = False  # train the projection heads only, on cached backbone features
    views: int = 1  # dihedral views averaged when embedding an image (1 = none, up to 8)
    stain: str = "none"  # stain normalisation of every section and slide: none or macenko (histoindex.stain)
    # hyper-parameters of the method's own (e.g. stgchb's StgchbParams); JSON values only.
    # Not hashed (a dict cannot be); omitted from to_json when empty, so configs of methods
    # without any serialise, and their model ids hash, as they did before the field existed.
    method_params: dict = field(default_factory=dict, hash=False)
    # RetrievalSettings as a dict; empty (models from before it existed): BLEEP's plain top-50 mean.
    # Omitted from to_json when empty, like method_params.
    retrieval: dict = field(default_factory=dict, hash=False)

    @property
    def retrieval_settings(self) -> RetrievalSettings:
        return RetrievalSettings(**self.retrieval)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        for optional in ("method_params", "retrieval"):
            if not values[optional]:
                del values[optional]
        if values["backbone_args"] is None:
            del values["backbone_args"]
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("mean", "std", "genes"):
            if key in values:
                values[key] = tuple(values[key])
        for optional in ("method_params", "retrieval"):
            if values.get(optional) is None:
                values.pop(optional, None)
        return cls(**values)


def rate_text(rate: float, unit: str) -> str:
    """A rate as logs and progress lines write it: ``12 tiles/s``, ``3.4 tiles/s``, ``0.25 tiles/s``,
    ``0.0042 tiles/s`` (decimals where the integer part says little: a slow CPU is not "0 tiles/s")."""
    return (f"{rate:,.{0 if rate >= 10 else 1}f}" if rate >= 1 else f"{rate:.2g}") + f" {unit}/s"
