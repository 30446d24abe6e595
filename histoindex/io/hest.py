"""HEST-1k folders (Jaume et al. 2024, mahmoodlab/HEST) -> SpotSet.

A HEST folder holds each sample ``ID`` as three files (HEST's own reader, ``hest.iter_hest``, reads
the same paths)::

    st/ID.h5ad         AnnData: X counts, obsm['spatial'] spot centres in pixels of the full-resolution WSI,
                       uns['spatial']['ST'] (a downscaled image and its scale factors)
    wsis/ID.tif        the full-resolution H&E as a pyramidal (Big)TIFF
    metadata/ID.json   pixel_size_um_estimated, spot_diameter, inter_spot_dist, organ, species,
                       st_technology, oncotree_code, patient, ... (the columns of HEST_v1_1_0.csv)

Samples are chosen by id or by a selection on their metadata: ``KEY=VALUE`` terms, a value list
``KEY=V1,V2`` matching any of them, several terms all at once; values match case-insensitively (and
numbers as numbers). Only the metadata's own keys are accepted, plus ``technology`` for
``st_technology`` and ``platform`` for the technology in histoindex's names (``visium``, ``st``, ...).

The pixel size is the metadata's ``pixel_size_um_estimated`` (HEST's own estimate, which its code
uses for every operation on the slide) unless ``mpp=`` is given, cross-checked with the spot layout
(:mod:`histoindex.io.pixelsize`: more than 1.5× apart is refused); the store labels come from the
metadata: tissue = ``organ`` in lower case, platform from ``st_technology``, species ``human`` /
``mouse`` from ``Homo sapiens`` / ``Mus musculus``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data import SpotSet
from ..errors import InputError
from ._guard import reader
from .h5ad import read_h5ad
from .pixelsize import PixelSize

#: HEST's ``st_technology`` -> the platform names histoindex uses (and its pixel-size code knows)
PLATFORMS = {"visium": "visium", "spatial transcriptomics": "st", "st": "st", "visium hd": "visium-hd", "xenium": "xenium"}
#: HEST's ``species`` -> histoindex's species labels
SPECIES = {"homo sapiens": "human", "mus musculus": "mouse"}
#: selection keys that are not metadata keys themselves
ALIASES = {"technology": "st_technology"}
PIXEL_SIZE_KEY = "pixel_size_um_estimated"
MPP_SOURCE = f"HEST metadata {PIXEL_SIZE_KEY}"


def is_hest_dir(path: str | Path) -> bool:
    """A folder in HEST's layout: ``st/`` and ``metadata/`` subfolders (``wsis/`` beside them)."""
    path = Path(path)
    return path.is_dir() and (path / "st").is_dir() and (path / "metadata").is_dir()


def platform_name(technology: str) -> str:
    """histoindex's platform name for HEST's ``st_technology`` (an unknown one in lower case, spaces as -)."""
    text = str(technology).strip().lower()
    return PLATFORMS.get(text, text.replace(" ", "-"))


def species_name(species: str) -> str:
    text = str(species).strip()
    return SPECIES.get(text.lower(), text.lower())


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value).strip() != ""


@dataclass(frozen=True)
class HestSample:
    """One HEST sample: its id, its metadata and where its files are (``wsi`` None when absent)."""

    id: str
    metadata: dict = field(repr=False)
    st: Path
    wsi: Path | None

    def _label(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return str(value).strip() if _present(value) else None

    @property
    def tissue(self) -> str | None:
        """``organ`` in lower case (``Breast`` -> ``breast``)."""
        organ = self._label("organ")
        return organ.lower() if organ else None

    @property
    def platform(self) -> str | None:
        technology = self._label("st_technology")
        return platform_name(technology) if technology else None

    @property
    def species(self) -> str | None:
        species = self._label("species")
        return species_name(species) if species else None

    @property
    def mpp(self) -> float | None:
        """``pixel_size_um_estimated``, when it is a positive number."""
        value = self.metadata.get(PIXEL_SIZE_KEY)
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return number if math.isfinite(number) and number > 0 else None


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise InputError(f"HEST folder not found: {root}")
    if not is_hest_dir(root):
        raise InputError(f"{root} is not a HEST folder: it needs st/ and metadata/ subfolders (and wsis/), as HEST-1k is downloaded")


def _read_metadata(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"cannot read HEST metadata {path}: {type(exc).__name__}: {detail}") from exc
    if not isinstance(data, dict):
        raise InputError(f"HEST metadata {path} holds a JSON {type(data).__name__}, expected an object of metadata keys")
    return data


def _wsi(root: Path, sample_id: str, metadata: dict) -> Path | None:
    names = [f"{sample_id}.tif", f"{sample_id}.tiff"]
    filename = metadata.get("image_filename")
    if _present(filename) and Path(str(filename)).name == str(filename):  # a bare file name, never a path elsewhere
        names.append(str(filename))
    return next((root / "wsis" / name for name in names if (root / "wsis" / name).is_file()), None)


def _sample(root: Path, sample_id: str) -> HestSample:
    metadata = _read_metadata(root / "metadata" / f"{sample_id}.json")
    return HestSample(id=sample_id, metadata=metadata, st=root / "st" / f"{sample_id}.h5ad", wsi=_wsi(root, sample_id, metadata))


def _ids(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "metadata").glob("*.json") if p.is_file())


def parse_selection(where: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None) -> dict[str, list[str]]:
    """``KEY=VALUE[,VALUE...]`` terms (a string or several) or a mapping, as ``{key: [values]}``."""
    if where is None:
        return {}
    if isinstance(where, Mapping):
        items = [(str(k), [v] if isinstance(v, (str, int, float)) else list(v)) for k, v in where.items()]
    else:
        terms = [where] if isinstance(where, str) else list(where)
        items = []
        for term in terms:
            key, sep, value = str(term).partition("=")
            if not sep or not key.strip() or not value.strip():
                raise InputError(f"HEST selection {term!r}: expected KEY=VALUE (e.g. organ=Breast, technology=Visium, species='Homo sapiens')")
            items.append((key, value.split(",")))
    selection: dict[str, list[str]] = {}
    for key, values in items:
        key = key.strip().lower()
        cleaned = [str(v).strip().strip("'\"").strip() for v in values]
        if not all(cleaned):
            raise InputError(f"HEST selection {key}={','.join(map(str, values))}: an empty value")
        if key in selection:
            raise InputError(f"HEST selection repeats {key}: list its values once, {key}=A,B (a term matches any of its values)")
        selection[key] = cleaned
    return selection


def _matches(value, wanted: Iterable[str]) -> bool:
    if not _present(value):
        return False
    text = str(value).strip().casefold()
    for item in wanted:
        if text == item.casefold():
            return True
        try:
            if float(value) == float(item):
                return True
        except (TypeError, ValueError):
            pass
    return False


def _selection_value(sample: HestSample, key: str):
    if key == "platform":
        return sample.platform
    return sample.metadata.get(ALIASES.get(key, key))


def hest_samples(root: str | Path, ids: Sequence[str] | None = None, where=None, *, log=None) -> list[HestSample]:
    """The samples of the HEST folder ``root`` chosen by ``ids`` and/or the metadata selection
    ``where`` (see the module docstring): explicit ids in their order, else sorted by id. At least
    one of the two is needed (a HEST folder may hold a thousand samples). Each returned sample has
    its ``st/ID.h5ad`` and ``wsis/ID.tif``; an unknown id, a sample without its files, an unknown
    selection key or an empty selection is an :class:`InputError`. A selection skips the samples
    whose ``st/ID.h5ad`` is not downloaded (``log`` says how many)."""
    root = Path(root)
    _check_folder(root)
    known = _ids(root)
    if not known:
        raise InputError(f"HEST folder {root} has no metadata/ID.json files: no samples to read")
    ids = list(dict.fromkeys(str(i).strip() for i in (ids or ())))
    selection = parse_selection(where)
    if not ids and not selection:
        raise InputError(
            f"{root} is a HEST folder of {len(known)} samples ({_some(known)}): choose samples with --id ID, "
            "or by metadata with --hest-where KEY=VALUE (e.g. organ=Breast)"
        )
    missing = [i for i in ids if i not in known]
    if missing:
        raise InputError(f"HEST folder {root} has no sample {', '.join(missing)} (no metadata/ID.json); its samples: {_some(known)}")
    if ids:
        candidates = [_sample(root, i) for i in ids]
    else:
        candidates = [_sample(root, i) for i in known]
    if selection:
        keys = set().union(*(s.metadata.keys() for s in candidates)) | set(ALIASES) | {"platform"}
        unknown = sorted(set(selection) - keys)
        if unknown:
            raise InputError(
                f"HEST selection: unknown key {', '.join(unknown)}; the metadata in {root} has: "
                f"{', '.join(sorted(keys - {'platform'} - set(ALIASES)))} (and technology, platform)"
            )
        chosen = [s for s in candidates if all(_matches(_selection_value(s, k), v) for k, v in selection.items())]
        if not chosen:
            present = "; ".join(
                f"{k}: {_some(sorted({str(_selection_value(s, k)) for s in candidates if _present(_selection_value(s, k))}))}" for k in selection
            )
            raise InputError(
                f"no HEST sample in {root} {'among ' + ', '.join(ids) + ' ' if ids else ''}matches {_described(selection)} (values there: {present or 'none'})"
            )
        if not ids:  # a selection over the folder takes the samples that are downloaded
            absent = [s for s in chosen if not s.st.is_file()]
            chosen = [s for s in chosen if s.st.is_file()]
            if absent and log is not None:
                log(f"{len(absent)} matching HEST sample(s) have no st/ID.h5ad and are skipped: {_some([s.id for s in absent])}")
            if not chosen:
                raise InputError(
                    f"the {len(absent)} HEST sample(s) in {root} matching {_described(selection)} have no st/ID.h5ad (not downloaded?): {_some([s.id for s in absent])}"
                )
    else:
        chosen = candidates
    for sample in chosen:
        if not sample.st.is_file():
            raise InputError(f"HEST sample {sample.id}: {sample.st} not found (its expression and spot positions)")
        if sample.wsi is None:
            raise InputError(f"HEST sample {sample.id}: no whole-slide image {root / 'wsis' / (sample.id + '.tif')} (the H&E the spots lie on)")
    return chosen


def _described(selection: dict[str, list[str]]) -> str:
    return " and ".join(f"{k}={','.join(v)}" for k, v in selection.items())


def _some(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")


@reader("a HEST sample")
def read_hest(
    root: str | Path,
    sample: str | HestSample,
    *,
    mpp: float | None = None,
    name: str | None = None,
    platform: str | None = None,
    log_normalised: bool = False,
) -> SpotSet:
    """Read one sample of the HEST folder ``root`` (an id, or a :class:`HestSample` from
    :func:`hest_samples`) through :func:`~histoindex.io.read_h5ad`: ``st/ID.h5ad`` on the image
    ``wsis/ID.tif``, at ``mpp`` or else the metadata's ``pixel_size_um_estimated``, cross-checked
    with the spot layout like every other source (:mod:`histoindex.io.pixelsize`), named ``name``
    or the id. The sample's technology is the platform given, which its spot lattice must confirm."""
    if not isinstance(sample, HestSample):
        (sample,) = hest_samples(root, ids=[str(sample)])
    metadata = PixelSize(sample.mpp, MPP_SOURCE) if sample.mpp is not None else None
    return read_h5ad(
        sample.st, image=sample.wsi, platform=platform or sample.platform, name=name or sample.id, mpp=mpp, log_normalised=log_normalised,
        metadata=metadata,
    )  # fmt: skip


def hest_slide_mpp(slide: str | Path) -> float | None:
    """The pixel size HEST gives a slide of its own (``<root>/wsis/ID.tif`` → ``<root>/metadata/ID.json``'s
    ``pixel_size_um_estimated``): HEST's pyramidal TIFFs carry no calibration of their own. None for
    any other slide, or when the metadata has none."""
    slide = Path(slide)
    if slide.parent.name != "wsis" or not is_hest_dir(slide.parent.parent):
        return None
    metadata = slide.parent.parent / "metadata" / f"{slide.stem}.json"
    if not metadata.is_file():
        return None
    return HestSample(id=slide.stem, metadata=_read_metadata(metadata), st=Path(), wsi=slide).mpp
