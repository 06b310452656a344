"""Aligned landmark matching at scale: 1,000 probes x 1,000 gallery faces.

Synthetic but realistic landmark sets: a MediaPipe face mesh of skimage's astronaut
portrait as the base face, per-identity shape noise, and an independent random pose
(rotation, scale, translation) for each probe and gallery face. Times the
common-reference Procrustes path (the default ``similarity`` alignment: generalised
Procrustes mean of the gallery, every face aligned once, one distance matrix) and the
upstream per-pair ICP path; the ICP time for all 10^6 pairs is extrapolated from a
timed sample of pairs, and the printout says so.

Run: .venv/bin/python benchmarks/bench_matching.py [--n 1000] [--icp_pairs 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.spatial.transform import Rotation

from faceaudit.core.ranking import topk_accuracy, true_match_ranks
from faceaudit.petct.alignment import distance_matrix, icp_distance_matrix


def base_face() -> tuple[np.ndarray, str]:
    """(478, 3) landmarks of a real face (MediaPipe on the astronaut), or a random cloud."""
    try:
        from skimage import color, data

        from faceaudit.petct.landmarks import place_landmarks_batch

        lm, det = place_landmarks_batch([color.rgb2gray(data.astronaut()).astype(np.float32)])
        if det[0]:
            return lm[0], "MediaPipe landmarks of skimage.data.astronaut()"
    except Exception as exc:  # the benchmark still runs without MediaPipe
        print(f"(MediaPipe unavailable: {exc})")
    rng = np.random.default_rng(0)
    return np.column_stack([rng.uniform(0.3, 0.7, 478), rng.uniform(0.25, 0.75, 478),
                            rng.normal(0, 0.03, 478)]), "random point cloud"


def posed(faces: np.ndarray, rng: np.random.Generator, *, degrees: float = 15.0, scale: float = 0.1,
          shift: float = 0.05) -> np.ndarray:
    """An independent random similarity pose for each face of (n, 478, 3)."""
    n = len(faces)
    rot = Rotation.from_euler("xyz", rng.uniform(-degrees, degrees, (n, 3)), degrees=True).as_matrix()
    c = faces.mean(axis=1, keepdims=True)
    s = 1 + rng.uniform(-scale, scale, (n, 1, 1))
    return s * np.einsum("nij,nmj->nmi", rot, faces - c) + c + rng.uniform(-shift, shift, (n, 1, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="identities (probes = gallery size)")
    parser.add_argument("--icp_pairs", type=int, default=300, help="ICP pairs timed for the extrapolation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    base, source = base_face()
    iod = np.linalg.norm(base[33, :2] - base[263, :2])  # eye corners, for the noise scale only
    # identity shape differences ~3 % of the IOD per coordinate; re-detection noise ~0.5 %
    identities = base + rng.normal(0, 0.03 * iod, (args.n,) + base.shape)
    gallery = posed(identities, rng)
    probes = posed(identities + rng.normal(0, 0.005 * iod, identities.shape), rng)
    subjects = np.array([f"s{i}" for i in range(args.n)])
    print(f"base face: {source}; {args.n} probes x {args.n} gallery faces, independent random poses")

    t0 = time.perf_counter()
    d_none = distance_matrix(probes, gallery, align="none")
    t_none = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_sim = distance_matrix(probes, gallery, align="similarity")
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_rigid = distance_matrix(probes, gallery, align="rigid")
    t_rigid = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranks = {name: true_match_ranks(d, subjects, subjects) for name, d in
             (("none", d_none), ("rigid", d_rigid), ("similarity", d_sim))}
    t_rank = (time.perf_counter() - t0) / 3

    # upstream path: ICP of each gallery (CT) face onto each probe (PET), then the norm
    pairs = rng.integers(0, args.n, (args.icp_pairs, 2))
    t0 = time.perf_counter()
    for i, j in pairs:
        icp_distance_matrix(probes[i:i + 1], gallery[j:j + 1])
    per_pair = (time.perf_counter() - t0) / args.icp_pairs
    t_icp = per_pair * args.n * args.n

    print(f"{'path':<44}{'seconds':>10}{'top-1 %':>10}")
    for key, name, t in (("none", "unaligned distance matrix", t_none),
                         ("rigid", "rigid, common reference (Procrustes)", t_rigid),
                         ("similarity", "similarity, common reference (Procrustes)", t_sim)):
        acc = 100 * topk_accuracy(ranks[key], (1,))[1]
        print(f"{name:<44}{t:>10.3f}{acc:>10.1f}")
    print(f"{'ranking (true_match_ranks), per matrix':<44}{t_rank:>10.3f}")
    print(f"{'per-pair ICP (upstream), EXTRAPOLATED':<44}{t_icp:>10.1f}"
          f"   ({per_pair * 1e3:.2f} ms/pair timed on {args.icp_pairs} random pairs x {args.n ** 2:,} pairs)")
    verdict = "PASS" if t_sim < 2.0 else "FAIL"
    print(f"similarity-aligned matching {args.n}x{args.n}: {t_sim:.3f} s ({verdict}: target < 2 s); "
          f"per-pair ICP / common-reference similarity = {t_icp / t_sim:,.0f}x")


if __name__ == "__main__":
    main()
