"""From images to users: reading image files, extracting bits, attribution and colluder tracing.

Attribution (one image at a time), ``decoding="soft"`` (the default): every registered code is
scored by the sum of the extractor's logits over the bits it sets, and the best user's p-value is
the exact probability that a random code scores as high *given this image*
(:mod:`fingerprint_lm.registry.soft`), times the registry size ``N`` (Bonferroni); the user is
accused only when that is ``<= fpr``. ``decoding="hard"`` keeps only the logits' signs: the code
nearest in Hamming distance (bit-packed search, :class:`~fingerprint_lm.registry.index.CodeIndex`)
matches ``m`` bits, p-value ``P[Binomial(k, 1/2) >= m]`` times ``N``: an image is attributed when
``m >= match_threshold(k, fpr, N)``. Both bounds rest on the same fact, that an innocent's code is
drawn independently of the image; the soft score uses what the hard one throws away, how sure the
extractor is of each bit (``experiments/results/soft_attribution.md``).

Tracing (a suspect set of images: one merged model's, or images colluders pooled or blended):
every user named by an image on its own is accused, and every registered code is scored against
the mean soft evidence of all images, users above the Hoeffding + Bonferroni threshold accused too;
the false-accusation budget is split between the two (:mod:`fingerprint_lm.registry.tracing`).

Screened codes (``task=issue`` keeps a code only when its copy reads well on a probe,
:mod:`fingerprint_lm.distributor.screening`) are not uniform: they are uniform codes *given that
they pass*, so an innocent's screened code is at most ``1 / r`` times as likely as a uniform one to
score as high, for the screen's pass rate ``r``. Attribution and tracing of a registry holding
screened codes therefore test at ``fpr x r`` (``uniform_code_fpr``) and report p-values divided by
``r``, which keeps the stated ``fpr`` (Bonferroni over the registry); ``r`` is the registry's own
count of codes kept over codes drawn (:meth:`~fingerprint_lm.registry.store.Registry.screen_pass_rate`),
an estimate, unless the caller passes one (the tasks pass the smaller of that count and the
checkpoint's measured rate: ``screening.bound_pass_rate``). Callers that pass a bare
:class:`CodeIndex` pass ``screen_pass_rate`` themselves
(``Registry.identify`` and ``registry/tracing.py`` work on codes alone and apply no rate).
Without the correction a screened registry's pair p-values ran 1.4-2.6x above nominal on other
users' marked images (``experiments/results/screened_marked_null.md``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.data.coco import load_rgb, to_tensor
from fingerprint_lm.errors import ConfigError, DataError, check_float, check_probability
from fingerprint_lm.metrics.bits import match_threshold
from fingerprint_lm.models.batched import in_batches
from fingerprint_lm.models.extractor import soft_null, soft_weights
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import CodeNull, identify_logits
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.registry.tardos import tardos_trace
from fingerprint_lm.registry.tracing import trace_evidence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def list_images(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files named by ``paths``: files as given, folders expanded to their image files
    (by suffix, sorted, not recursive). Raises DataError for a missing path or no image at all."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"no such image file or folder: {path}")
    if not files:
        raise DataError("no images given")
    return files


def read_images(paths: str | Path | Sequence[str | Path], min_size: int = 1) -> list[tuple[str, torch.Tensor]]:
    """Read images as ``(path, FloatTensor[3, H, W] in [-1, 1])``, in :func:`list_images` order.

    RGBA is composited over white, greyscale, 16-bit, CMYK and palette images become 8-bit RGB, an
    animated image gives its first frame; any size works (odd sizes too) as long as both sides are
    at least ``min_size`` (the smallest image the extractor reads). A corrupt or unreadable file, or
    one past Pillow's decompression-bomb limit, raises DataError.
    """
    return [(str(file), _read_one(file, min_size)) for file in list_images(paths)]


def read_suspect_images(paths: str | Path | Sequence[str | Path], min_size: int = 1
                        ) -> tuple[list[tuple[str, torch.Tensor]], list[dict[str, str]]]:
    """:func:`read_images` for attribution and tracing: files inside a named folder that cannot be
    read are skipped, each listed as ``{"image", "reason"}``, and the rest are read; a file named
    on its own must be readable. DataError when nothing at all could be read."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    images, skipped = [], []
    for entry in paths:
        in_folder = Path(entry).is_dir()
        for file in list_images(entry):
            try:
                images.append((str(file), _read_one(file, min_size)))
            except DataError as exc:
                if not in_folder:
                    raise
                skipped.append({"image": str(file), "reason": str(exc)})
    if not images:
        first = f" (first: {skipped[0]['reason']})" if skipped else ""
        raise DataError(f"no readable image: {len(skipped)} skipped{first}")
    return images, skipped


def _read_one(file: Path, min_size: int) -> torch.Tensor:
    image = load_rgb(file)
    width, height = image.size
    if width < min_size or height < min_size:
        raise DataError(f"image {file} is {width}x{height}: smaller than the extractor reads ({min_size}x{min_size})")
    return to_tensor(image)


@torch.no_grad()
def extract_logits(extractor: torch.nn.Module, images: Sequence[torch.Tensor], batch_size: int = 64) -> np.ndarray:
    """Extractor logits ``float64 [n, k]``; images may differ in size: runs of same-sized images are
    read ``batch_size`` at a time (the content reader re-encodes each image with a VAE: one at a
    time, 8192 images took 5x as long), and a reader's logits do not depend on the batch (eval mode)."""
    if len(images) == 0:
        raise DataError("no images to read a fingerprint from")
    extractor.eval()
    read = [in_batches(extractor, lambda m, x: m(x), torch.stack(list(run)).float(), batch_size=batch_size)
            for _, run in itertools.groupby(images, key=lambda image: tuple(image.shape))]
    return torch.cat(read).double().numpy()


def whitened_weights(extractor: torch.nn.Module, logits: np.ndarray, decoding: str) -> np.ndarray | None:
    """The extractor's soft weights of ``logits`` when ``decoding`` reads them (``soft_whitened``);
    None otherwise, so the other decodings do no extra work."""
    return soft_weights(extractor, logits) if decoding == "soft_whitened" else None


def code_null(extractor: torch.nn.Module, decoding: str) -> CodeNull | None:
    """The law of a code's score over unmarked images that ``soft_code_null`` decoding tests each
    accused code against (:func:`~fingerprint_lm.models.extractor.soft_null`); None for the other
    decodings. ConfigError when the reader's law is unknown."""
    if decoding != "soft_code_null":
        return None
    fitted = soft_null(extractor)
    if fitted is None:
        raise ConfigError("decoding=soft_code_null needs the reader's logits fitted on unmarked images, and this "
                          "checkpoint has none: run python experiments/fit_soft_whitening.py <checkpoint dir>")
    return CodeNull(*fitted)


def _decided(logits, weights, decoding: str):
    """What per-image attribution reads: the soft weights with ``soft_whitened`` decoding, where given."""
    return weights if weights is not None and decoding == "soft_whitened" else logits


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # overflow-free


def _index(registry: Registry | CodeIndex) -> CodeIndex:
    return registry.index() if isinstance(registry, Registry) else registry


def _pass_rate(registry: Registry | CodeIndex, given: float | None) -> float:
    """The screen's pass rate the bound divides by: ``given``, else a Registry's own count, else 1
    (uniform codes)."""
    if given is None:
        given = registry.screen_pass_rate() if isinstance(registry, Registry) else None
    return 1.0 if given is None else check_float("screen_pass_rate", given, above=0.0, maximum=1.0)


def _stated(result: dict, fpr: float, rate: float, p_key: str, rows_key: str) -> dict:
    """A result computed at ``fpr x rate`` restated at ``fpr``: each row's ``p_key`` divided by
    ``rate`` (capped at 1), ``screen_pass_rate`` and ``uniform_code_fpr`` added."""
    if rate < 1.0:
        result[rows_key] = [{**row, p_key: min(1.0, row[p_key] / rate)} for row in result[rows_key]]
    return {**result, "fpr": float(fpr), "screen_pass_rate": rate, "uniform_code_fpr": float(fpr) * rate}


def _check(extractor: torch.nn.Module | None, index: CodeIndex, fpr: float) -> None:
    check_probability("fpr", fpr)
    if extractor is not None and getattr(extractor, "fingerprint_bits", index.k) != index.k:
        raise ConfigError(
            f"the extractor reads {extractor.fingerprint_bits} bits but the registry holds {index.k}-bit codes"
        )


def attribute_images(
    extractor: torch.nn.Module,
    registry: Registry | CodeIndex,
    images: Sequence[tuple[str, torch.Tensor]],
    fpr: float = 1e-6,
    decoding: str = "soft",
    read_mirrored: bool = False,
    screen_pass_rate: float | None = None,
) -> dict:
    """Name the user behind each image (independently): :func:`attribute_logits` of the
    extractor's logits, read one image at a time (images may differ in size).

    ``screen_pass_rate``: the pass rate of the screen the registered codes were kept by (None: a
    :class:`Registry`'s own count, 1 for a :class:`CodeIndex`); the test runs at ``fpr`` times it
    and every ``p_value`` is divided by it (module docstring), stated as ``screen_pass_rate`` and
    ``uniform_code_fpr``.

    ``read_mirrored``: read each image as found and mirrored left-right, each read at ``fpr / 2``,
    and keep per image the read with the smaller p-value, reported doubled (a union bound: each
    image's false-accusation bound stays ``fpr``); each row then says its ``orientation``. A left-right
    mirror erases what pnm's reader reads (0 of 2048 mirrored images attributed), and this rule
    attributes mirrored images as well as unmirrored ones, at a little power on the unmirrored
    (0.992 of either against 0.995 read once: ``experiments/results/view_averaging.md``)."""
    index, rate = _index(registry), _pass_rate(registry, screen_pass_rate)
    _check(extractor, index, fpr)
    budget = fpr * rate  # what a uniform code may reach (module docstring)
    names, tensors = [name for name, _ in images], [image for _, image in images]
    views = (tensors, [image.flip(-1) for image in tensors]) if read_mirrored else (tensors,)
    null = code_null(extractor, decoding)
    reads = []
    for view in views:
        logits = extract_logits(extractor, view)
        reads.append(attribute_logits(logits, index, names, budget / len(views), decoding,
                                      whitened_weights(extractor, logits, decoding), null))
    return _stated(either_orientation(*reads, budget) if read_mirrored else reads[0], fpr, rate, "p_value", "images")


ORIENTATIONS = ("as found", "mirrored")


def either_orientation(found: dict, mirrored: dict, fpr: float) -> dict:
    """One attribution from two :func:`attribute_logits` results of the same images, read as found
    and mirrored, each at ``fpr / 2``: per image, the read that accuses (the smaller p-value among
    accusing reads, else overall), its p-value doubled for the two reads."""
    rows = []
    for pair in zip(found["images"], mirrored["images"], strict=True):
        best = min((0, 1), key=lambda i: (not pair[i]["accused"], pair[i]["p_value"]))
        rows.append({**pair[best], "p_value": min(1.0, 2 * pair[best]["p_value"]), "orientation": ORIENTATIONS[best]})
    return {**found, "fpr": float(fpr), "read_mirrored": True, "images": rows}


def attribute_logits(logits: np.ndarray, registry: Registry | CodeIndex, names: Sequence[str],
                     fpr: float = 1e-6, decoding: str = "soft", weights: np.ndarray | None = None,
                     null: CodeNull | None = None) -> dict:
    """Attribution of images whose extractor logits ``[n, k]`` are given (``names``: one per row).

    Returns ``{"fpr", "decoding", "n_users", "code_length", "match_threshold", "images": [...]}``
    where each image has ``image``, ``bits`` (string of 0/1), ``user_id`` (None when nobody is
    accused), ``nearest_user_id``, ``matching_bits``, ``n_nearest``, ``p_value``
    (Bonferroni-corrected) and ``accused``, and with soft decoding the ``score`` the p-value is of
    (:func:`~fingerprint_lm.registry.soft.soft_identify`). ``decoding="soft_whitened"``: the same
    test on ``weights``, the extractor's :func:`~fingerprint_lm.models.extractor.soft_weights` of
    the logits (None: the logits; the carrier reader whitens them on unmarked images, pnm's reader
    is whitened already), ``matching_bits`` then counting the weights' signs. ``bits`` are always
    the logits' signs. ``decoding="soft_code_null"``: the soft test on the logits, each accused
    code also tested against ``null``, its score's law over unmarked images (:func:`code_null`;
    required: ConfigError without it). ``match_threshold`` is the number of
    matching bits hard decoding needs for an accusation (soft decoding has one threshold per image),
    None when even ``k`` matches cannot reach ``fpr`` among this many users.
    """
    index = _index(registry)
    _check(None, index, fpr)
    k = index.k
    bits = (np.asarray(logits) > 0).astype(np.uint8)
    results = identify_logits(_decided(logits, weights, decoding), index, fpr=fpr, decoding=decoding, code_null=null)
    try:
        threshold = match_threshold(k, fpr, max(len(index), 1))
    except ConfigError:
        threshold = None
    rows = []
    for name, row_bits, result in zip(names, bits, results, strict=True):
        rows.append(
            {
                "image": name,
                "bits": "".join(str(int(b)) for b in row_bits),
                "user_id": result["user_id"],
                "nearest_user_id": result["nearest_user_id"],
                "matching_bits": int(result["matching_bits"]),
                "n_nearest": int(result["n_nearest"]),
                "p_value": float(result["p_value"]),
                "accused": bool(result["accused"]),
                **({"score": int(result["score"])} if "score" in result else {}),
            }
        )
    return {
        "fpr": float(fpr),
        "decoding": decoding,
        "n_users": len(index),
        "code_length": k,
        "match_threshold": threshold,
        "images": rows,
    }


def trace_images(
    extractor: torch.nn.Module,
    registry: Registry | CodeIndex,
    images: Sequence[tuple[str, torch.Tensor]],
    fpr: float = 1e-6,
    top: int = 10,
    scoring: str = "evidence",
    decoding: str = "soft",
    screen_pass_rate: float | None = None,
) -> dict:
    """Rank registered users as the source (or colluders) of a suspect set of images:
    :func:`trace_logits` of the extractor's logits, read one image at a time. ``screen_pass_rate``:
    as for :func:`attribute_images` (the thresholds and the per-image and pooled fprs are those of
    ``uniform_code_fpr``; each ``p_value_bound`` is divided by the rate)."""
    index, rate = _index(registry), _pass_rate(registry, screen_pass_rate)
    _check(extractor, index, fpr)
    logits = extract_logits(extractor, [image for _, image in images])
    traced = trace_logits(logits, index, [name for name, _ in images], fpr * rate, top, scoring, decoding,
                          whitened_weights(extractor, logits, decoding), code_null(extractor, decoding))
    return _stated(traced, fpr, rate, "p_value_bound", "suspects")


TRACING_SCORES = ("evidence", "tardos")


def trace_logits(logits: np.ndarray, registry: Registry | CodeIndex, names: Sequence[str],
                 fpr: float = 1e-6, top: int = 10, scoring: str = "evidence", decoding: str = "soft",
                 weights: np.ndarray | None = None, null: CodeNull | None = None) -> dict:
    """Tracing from the extractor logits ``[n, k]`` of a suspect set of images (one model's, or
    pooled or blended by colluders): :func:`~fingerprint_lm.registry.tracing.trace_evidence`.

    Returns ``{"fpr", "n_users", "n_images", "images", "threshold", "per_image_fpr", "pooled_fpr",
    "suspects": [...]}``; each suspect has ``user_id``, ``n_images`` (images attributed to them),
    ``score`` (pooled), ``p_value_bound``, ``evidence`` (``per_image`` | ``pooled`` | ``both``)
    and ``accused``: accused users first, then by score; ``top`` suspects plus every accused one.
    ``scoring="tardos"``: the symmetric Tardos score of the set's majority bits instead
    (:func:`~fingerprint_lm.registry.tardos.tardos_trace`; the registry's codes are uniform, so
    every bias is 1/2), each suspect with the same fields (``evidence`` is ``pooled`` or None;
    ``n_images`` counts the images per-image attribution names them on at ``per_image_fpr`` =
    ``fpr / n``, outside the accusation). ``decoding``, ``weights`` and ``null``: how per-image
    attribution reads each image (:func:`attribute_logits`); the pooled evidence reads the logits.
    """
    index = _index(registry)
    _check(None, index, fpr)
    if scoring not in TRACING_SCORES:
        raise ConfigError(f"unknown tracing score {scoring!r}; expected one of {', '.join(TRACING_SCORES)}")
    probs = _sigmoid(np.asarray(logits, dtype=np.float64))
    if scoring == "tardos":
        # The fields every trace reports: the Tardos score pools the whole set (its only evidence,
        # so it spends the whole fpr); n_images says how many images per-image attribution names the
        # user on at fpr / n each (stated as per_image_fpr), for information: it accuses nobody.
        per_image_fpr = fpr / len(probs)
        traced = {"scoring": "tardos", "per_image_fpr": per_image_fpr, **tardos_trace(probs, index, fpr=fpr, top=top)}
        decided = _decided(logits, weights, decoding)
        named = Counter(result["user_id"] for result in (identify_logits(decided, index, per_image_fpr, decoding, null)
                                                         if traced["suspects"] else []) if result["accused"])
        for suspect in traced["suspects"]:
            suspect.update(n_images=named.get(suspect["user_id"], 0),
                           evidence="pooled" if suspect["accused"] else None)
    else:
        traced = {"scoring": "evidence", **trace_evidence(probs, index, fpr=fpr, top=top,
                                                          logits=_decided(logits, weights, decoding), decoding=decoding,
                                                          code_null=null)}
    return {"fpr": float(fpr), "decoding": decoding, "n_users": len(index), "n_images": len(names),
            "images": list(names), **traced}
