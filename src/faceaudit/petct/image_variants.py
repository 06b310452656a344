"""The four images a test study's landmarks are placed on (stage 3): the CT render, the
PET render, the wavelet-denoised PET (BayesShrink) and the U-Net-denoised PET, each the
centre crop of the split's size.

Here: where each variant's image comes from (:class:`PlacementTask`), reading and
cropping them, the content fingerprint of what one fold's variant was placed on, the
U-Net images denoised from a fold's model, and the QA sheet of landmarks over the images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceaudit.core.contracts import RENDER_CROP
from faceaudit.core.files import (
    InputError,
    file_digest,
    make_private_dir,
    read_json_file,
    write_json,
    write_png,
)
from faceaudit.core.images import center_crop, read_grey, to_uint8, wavelet_denoise
from faceaudit.petct.landmarks import Framing, landmark_mad, place_landmarks_batch

VARIANTS = ("ct", "pet", "pet_wavelet", "pet_unet")

#: pt_path -> a callable on (N, H, W) float32 [0, 1] crops returning the same shape
DenoiserLoader = Callable[[Path], Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class PlacementTask:
    """One test image of one fold: where its renders are."""

    fold: int
    id: str
    subject: str
    ct_path: str
    pet_path: str
    unet_path: str | None  # None: the U-Net variant is not scored in this fold
    variants: tuple[str, ...] | None = None  # to place; None: every variant it has images for


def variant_images(task: PlacementTask, *, crop: int | None,
                   variants: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The (crop, crop) float [0, 1] grey image of every variant scored for this task
    (of those in ``variants`` when given; CT and PET are always read, to check them)."""
    ct = read_grey(task.ct_path)
    pet = read_grey(task.pet_path)
    if ct.shape != pet.shape:
        raise InputError(f"CT render {task.ct_path} is {ct.shape} but PET render {task.pet_path} is {pet.shape}")
    size = crop or min(ct.shape)
    if size > min(ct.shape):
        raise InputError(f"crop {size} from splits.json exceeds the render size {ct.shape} of {task.ct_path}")
    images = {"ct": center_crop(ct, size), "pet": center_crop(pet, size)}
    if variants is None or "pet_wavelet" in variants:
        images["pet_wavelet"] = wavelet_denoise(images["pet"])
    if task.unet_path is not None and (variants is None or "pet_unet" in variants):
        unet = read_grey(task.unet_path)
        if min(unet.shape) < size:
            raise InputError(f"denoised image {task.unet_path} is {unet.shape}, smaller than the crop {size}")
        images["pet_unet"] = center_crop(unet, size)
    if variants is not None:
        images = {v: im for v, im in images.items() if v in variants}
    return images


def place_task(task: PlacementTask, *, crop: int | None, framing: Framing,
               min_detection_confidence: float) -> dict[str, np.ndarray | None]:
    """Landmarks of every variant of one task: variant -> (478, 3) or None."""
    images = variant_images(task, crop=crop, variants=task.variants)
    names = list(images)
    lm, det = place_landmarks_batch([images[v] for v in names], framing=framing,
                                    min_detection_confidence=min_detection_confidence)
    return {v: (lm[i] if det[i] else None) for i, v in enumerate(names)}


# --------------------------------------------------------------------------- input fingerprints


def file_sha1(path: str | Path) -> str:
    """SHA-1 of a file's bytes; a fixed marker when there is no such file (so a file
    appearing or disappearing changes the fingerprints it feeds)."""
    try:
        return file_digest(path, "sha1")
    except FileNotFoundError:
        return "missing"


#: the image each variant's landmarks are placed on
VARIANT_SOURCE = {"ct": "ct_path", "pet": "pet_path", "pet_wavelet": "pet_path", "pet_unet": "unet_path"}


def variant_fingerprint(tasks: list[PlacementTask], variant: str, *,
                        sha1: Callable[[str], str] = file_sha1) -> str:
    """SHA-1 of what one fold's landmarks of ``variant`` were computed from: per id
    (in id order) the id, subject and the bytes of the image file placed on.

    The matching stage fingerprints its landmark inputs the same way
    (``faceaudit.petct.matching.input_fingerprint``); here the inputs are image files.
    A U-Net image computed from a model is refreshed by ``denoise_fold`` when the
    model or PET changes, so hashing the image covers the model too.
    """
    attr = VARIANT_SOURCE[variant]
    h = hashlib.sha1(variant.encode())
    for t in sorted(tasks, key=lambda t: t.id):
        path = getattr(t, attr)
        h.update(f"\0{t.id}\0{t.subject}\0{'none' if path is None else sha1(path)}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- U-Net variant


def default_denoiser_loader(pt_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from faceaudit.petct.denoiser import (
        load_denoiser,  # imports torch: only when a fold needs its model
    )

    return load_denoiser(pt_path, device="cpu")


def _stored_sources(sources_path: Path) -> dict[str, str]:
    """sources.json of an earlier run; unreadable: nothing written before is trusted."""
    try:
        return {str(i): str(s) for i, s in read_json_file(sources_path).items()} if sources_path.is_file() else {}
    except (InputError, AttributeError):
        return {}


def _read_crops(tasks: list[PlacementTask], crop: int | None, out_dir: Path) -> tuple[list, list[str]]:
    """The PET crops to denoise; an item whose PET cannot be read is left out (the placement
    reports it) and an image denoised from its earlier PET is removed."""
    crops, ids = [], []
    for t in tasks:
        try:
            pet = read_grey(t.pet_path)
            crops.append(center_crop(pet, crop or min(pet.shape)))
            ids.append(t.id)
        except (InputError, ValueError):
            (out_dir / f"{t.id}.png").unlink(missing_ok=True)
    return crops, ids


def denoise_fold(tasks: list[PlacementTask], model_file: Path, out_dir: Path, *, crop: int | None,
                 load_denoiser: DenoiserLoader, batch_size: int = 32, overwrite: bool = False,
                 sha1: Callable[[str], str] | None = None) -> dict[str, str]:
    """Apply a fold's denoiser to its test PET crops; write out_dir/<id>.png; id -> path.

    An image written before is reused only when out_dir/sources.json says it came
    from this model's and this PET's exact bytes at this crop (a re-trained model or
    a new render is denoised again). Items whose PET cannot be read are left out
    (the placement reports them). When the denoiser cannot be loaded or run, or an image
    cannot be written, no image of these tasks is left in out_dir (nor in sources.json)
    and the error is raised: the fold's U-Net variant is not scored, so none of its faces stay.
    """
    sha1 = sha1 or file_sha1
    model_sha1 = sha1(str(model_file))
    sources_path = out_dir / "sources.json"
    sources = _stored_sources(sources_path)
    wanted = {t.id: hashlib.sha1(f"{model_sha1}\0{crop}\0{sha1(t.pet_path)}".encode()).hexdigest() for t in tasks}
    todo, done = [], {}
    for t in tasks:
        target = out_dir / f"{t.id}.png"
        if target.is_file() and not overwrite and sources.get(t.id) == wanted[t.id]:
            done[t.id] = str(target)
        else:
            todo.append(t)
    if not todo:
        return done
    try:
        denoiser = load_denoiser(model_file)
        crops, ids = _read_crops(todo, crop, out_dir)
        make_private_dir(out_dir)
        for start in range(0, len(ids), batch_size):
            batch = np.stack(crops[start:start + batch_size]).astype(np.float32)
            out = np.asarray(denoiser(batch), dtype=np.float32)
            if out.shape != batch.shape:
                raise InputError(f"expected denoiser {model_file} to return shape {batch.shape}, found {out.shape}")
            for i, img in enumerate(out):
                path = out_dir / f"{ids[start + i]}.png"
                write_png(path, to_uint8(img))
                done[ids[start + i]] = str(path)
                sources[ids[start + i]] = wanted[ids[start + i]]
            write_json(sources_path, sources)  # per batch: an interrupted run keeps what it finished
    except BaseException:
        _remove_denoised(out_dir, [t.id for t in tasks], sources)
        raise
    return done


def _remove_denoised(out_dir: Path, ids: list[str], sources: dict[str, str]) -> None:
    """Remove the denoised images of ``ids`` and their sources.json entries (best effort: the
    error that brought us here is the one reported)."""
    for item_id in ids:
        with suppress(OSError):     # a folder where the image was to go: nothing of ours there
            (out_dir / f"{item_id}.png").unlink(missing_ok=True)
        sources.pop(item_id, None)
    sources_path = out_dir / "sources.json"
    try:
        if sources:
            write_json(sources_path, sources)
        else:
            sources_path.unlink(missing_ok=True)
    except OSError:     # a full disk: drop the record rather than keep one naming gone images
        with suppress(OSError):
            sources_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- QA


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray | None, *, reference: np.ndarray | None = None,
                   scale: int = 2) -> np.ndarray:
    """Grey (H, W) float image -> RGB uint8 (upscaled), reference landmarks red, landmarks green."""
    from PIL import Image, ImageDraw

    grey = to_uint8(image)
    im = Image.fromarray(grey).convert("RGB")
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for pts, colour in ((reference, (255, 60, 60)), (landmarks, (40, 255, 80))):
        if pts is None or not np.isfinite(pts).all():
            continue
        for x, y in zip(pts[:, 0] * im.width, pts[:, 1] * im.height):
            draw.ellipse((float(x) - 1, float(y) - 1, float(x) + 1, float(y) + 1), fill=colour)
    return np.asarray(im)


def qa_montage(tasks: list[PlacementTask], landmarks: dict[tuple[int, str], dict[str, np.ndarray | None]],
               variants: list[str], *, crop: int | None, upstream_mad: bool) -> np.ndarray | None:
    """One row per sampled test image: CT with its landmarks, then every PET variant
    with its landmarks (green) over the CT's (red), labelled with the MAD."""
    from faceaudit.core.figures import montage

    tiles, labels = [], []
    for t in tasks:
        try:
            images = variant_images(t, crop=crop)
        except (InputError, ValueError):
            continue
        found = landmarks.get((t.fold, t.id), {})
        ct_lm = found.get("ct")
        for v in variants:
            lm = found.get(v)
            if v == "ct":
                tiles.append(draw_landmarks(images[v], lm))
                labels.append(f"{'' if lm is not None else 'no face '}{t.id}")
                continue
            if v not in images:
                continue
            tiles.append(draw_landmarks(images[v], lm, reference=ct_lm))
            if lm is None:
                tag = "no face"
            elif ct_lm is None:
                tag = "no CT"
            else:
                tag = f"MAD {landmark_mad(ct_lm, lm, upstream=upstream_mad):.1f}%"
            labels.append(f"{v} {tag}")
    if not tiles:
        return None
    return montage(tiles, labels=labels, ncols=len(variants), tile=2 * (crop or RENDER_CROP))
