"""ModelConfig: everything needed to rebuild a model and feed it, saved with its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .data import NORMALISATION


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

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        if not values["method_params"]:
            del values["method_params"]
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("mean", "std", "genes"):
            if key in values:
                values[key] = tuple(values[key])
        if values.get("method_params") is None:
            values.pop("method_params", None)
        return cls(**values)
