"""Which part of the body is the head: arms raised above it are never taken for it.

Whole-body PET/CT is acquired with the arms up; with the hands inside the field of view
the highest body voxel is a hand, and a head crop measured from there (240 mm down) ends
at the nose with the face left out. The head is found instead as the part of the body
that continues down into the trunk through the neck:

1. every axial slice of the (coarse) body mask is labelled on its own (8-connected);
2. the *trunk* is the largest piece of the widest slice (abdomen, chest, or the widest
   head slice of a head-only scan); its centroid gives the body's midline (x, left-right);
3. going up slice by slice, the tracked region is the set of pieces touching the region
   of the slice below (within one voxel, as 26-connectivity does). Where two or more
   *substantial* pieces touch it (each at least ``min_share`` of the largest and at least
   ``min_trunk_share`` of the trunk's area: above the shoulders, neck and two arms), the
   one nearest the midline is followed (the neck, then the head; smaller pieces, an ear
   lobe, the crumbs of the skull's top on the coarse grid, stay with it) and the others
   are *left out*;
   above that, the voxels of each slice touching the tracked or left-out regions go to the
   nearer of the two (an arm touching the head is split between them, the hands that
   continue the arms over the head stay left out);
4. the head's top is the last slice the tracking reaches.

When it reaches the body's top slice and left nothing out on the way (nothing above or
beside the head, the usual tidy scan) the body is returned as it is (the same array), so
renders without raised arms are unchanged bit for bit. Otherwise the head region is the
body without the left-out pieces and what lies above the head's top, as the 3-D component
holding the tracked head (plus the body below the widest slice): arms and hands beside and
above the head are left out, also when they end below the head's top. At full resolution the
head box is cut to the points nearer to the head region than to the left-out pieces
(head_zone), so an arm touching the head between two coarse voxels is cut midway.
Limit: hands resting on the head (touching it at the coarse grid) are one piece with it
and are not told apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceaudit.core.files import InputError


@dataclass
class HeadRegion:
    """mask: (nz, ny, nx) bool, the body itself when nothing was left out, else the body
    without what the head tracking left out; top: index of the head's highest slice;
    left_out: the arms and hands the tracking left out and the body above the head (None
    when nothing is); left_out_voxels: body voxels not in ``mask``."""

    mask: np.ndarray
    top: int
    left_out: np.ndarray | None = None
    left_out_voxels: int = 0


def _dilate_8(mask: np.ndarray) -> np.ndarray:
    """``mask`` (2-D bool) grown by one voxel in the 8 directions (a 3 x 3 box), nothing
    growing in from outside: what binary_dilation with a 3 x 3 structure gives, without its
    per-call set-up (the tracking dilates every slice)."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _pieces_touching(piece_labels: np.ndarray, region: np.ndarray, n_pieces: int) -> np.ndarray:
    """bool mask of the 8-connected pieces of one slice within one voxel of ``region``.
    piece_labels: the slice's piece ids (0 background, at most ``n_pieces``)."""
    touched = np.zeros(n_pieces + 1, bool)
    touched[piece_labels[_dilate_8(region)]] = True
    touched[0] = False
    return touched[piece_labels]


def _nearer_to_head(candidates: np.ndarray, head: np.ndarray, left_out: np.ndarray) -> np.ndarray:
    """The voxels of ``candidates`` (one slice) nearer to ``head`` than to ``left_out`` (the
    slice below's regions): where an arm touches the head, the contact is split between them."""
    from scipy.ndimage import distance_transform_edt

    if not left_out.any():
        return candidates
    return candidates & (distance_transform_edt(~head) <= distance_transform_edt(~left_out))


def _split(to_head: np.ndarray, midline_x: float, min_share: float,
           min_voxels: float, pieces: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(head, left out) of one slice's head voxels: unchanged unless they form two or more
    substantial pieces (each >= ``min_share`` of the largest and >= ``min_voxels``): then
    the other substantial pieces than the one nearest the midline are left out (small ones
    stay with the head).

    pieces: the slice's 8-connected piece ids when ``to_head`` is a union of whole pieces
    (its pieces are then those, and the slice is not labelled again); None to label it."""
    if pieces is None:
        from scipy.ndimage import label

        labels, _n = label(to_head, np.ones((3, 3), bool))
    else:
        labels = np.where(to_head, pieces, 0)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    present = np.flatnonzero(sizes)
    if present.size < 2:
        return to_head, np.zeros_like(to_head)
    substantial = present[sizes[present] >= max(min_share * sizes.max(), min_voxels)]
    if substantial.size < 2:
        return to_head, np.zeros_like(to_head)
    rows_cols = np.nonzero(labels)
    in_labels = labels[rows_cols]
    # in order of the pieces' first voxels (row-major), as label numbers them: a tie in
    # distance to the midline goes to the same piece whichever ids the pieces carry
    order = np.argsort([np.flatnonzero(in_labels == i)[0] for i in substantial])
    substantial = substantial[order]
    centres_x = np.array([rows_cols[1][in_labels == i].mean() for i in substantial])
    chosen = substantial[int(np.argmin(np.abs(centres_x - midline_x)))]
    split_off = np.isin(labels, substantial[substantial != chosen])
    return to_head & ~split_off, split_off


def find_head(body: np.ndarray, *, min_share: float = 0.25, min_trunk_share: float = 0.05) -> HeadRegion:
    """The head of a body mask (nz, ny, nx) bool, axis 0 superior, axis 2 left-right.

    See the module docstring. ``min_trunk_share``: a piece smaller than this share of the
    trunk's area is never split off (an upper arm is 12 % of a chest, a forearm 13 % of a
    head slice; the two-voxel crumbs of the skull's top on a 6 mm grid under 1 %).
    Raises InputError for an empty mask.
    """
    from scipy.ndimage import label

    areas = np.count_nonzero(body, axis=(1, 2))
    z_any = np.flatnonzero(areas)
    if z_any.size == 0:
        raise InputError("the body mask is empty; no head to find")
    top = int(z_any[-1])
    widest = int(np.argmax(areas))
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = True                       # each slice labelled on its own, 8-connected
    pieces, n_pieces = label(body, structure=in_plane)
    counts = np.bincount(pieces[widest].ravel())
    counts[0] = 0
    head = pieces[widest] == int(np.argmax(counts))
    left_out = np.zeros_like(head)
    midline_x = float(np.nonzero(head)[1].mean())
    min_voxels = min_trunk_share * np.count_nonzero(head)
    tracked, left_out_of = {widest: head}, {}
    for z in range(widest + 1, top + 1):
        candidates = _pieces_touching(pieces[z], head | left_out, n_pieces)
        to_head = _nearer_to_head(candidates, head, left_out)
        head, split_off = _split(to_head, midline_x, min_share, min_voxels,
                                 pieces[z] if to_head is candidates else None)
        if not head.any():
            break
        left_out = (candidates & ~to_head) | split_off
        tracked[z], left_out_of[z] = head, left_out
    head_top = max(tracked)
    # arms split off beside the head but ending below its top still have to go: the body is
    # kept as it is only when the tracking left nothing out on the way up
    if head_top == top and not any(region.any() for region in left_out_of.values()):
        return HeadRegion(mask=body, top=top)
    return _head_mask(body, tracked, left_out_of, head_top)


def _head_mask(body: np.ndarray, tracked: dict, left_out_of: dict, head_top: int) -> HeadRegion:
    """The body without the left-out pieces and what lies above the head, as the 3-D component
    that holds the tracked head (pieces the upward tracking missed, the underside of the chin
    or an ear lobe seen before it joins the head, come back in)."""
    import cc3d

    left_out = np.zeros_like(body)
    left_out[head_top + 1:] = body[head_top + 1:]
    for z, region in left_out_of.items():
        left_out[z] = region
    labels = cc3d.connected_components(body & ~left_out, connectivity=26)
    tracked_voxels = np.zeros_like(body)
    for z, region in tracked.items():
        tracked_voxels[z] = region
    overlap = np.bincount(labels[tracked_voxels & (labels > 0)])
    mask = labels == int(np.argmax(overlap[1:]) + 1)
    widest = min(tracked)
    mask[:widest] |= body[:widest]
    return HeadRegion(mask=mask, top=head_top, left_out=left_out,
                      left_out_voxels=int(np.count_nonzero(body & ~mask)))


def head_zone(region: HeadRegion, body: np.ndarray, spacing) -> np.ndarray:
    """(nz, ny, nx) bool: the points nearer (mm, 3-D) to the head region than to the body left
    out of it; a full-resolution head is cut to it, so an arm that touches the head between
    two coarse voxels is split off at the midway surface. All True when nothing was left out."""
    from scipy.ndimage import distance_transform_edt

    if region.left_out is None or not region.left_out.any():
        return np.ones_like(body)
    return (distance_transform_edt(~region.mask, sampling=spacing)
            <= distance_transform_edt(~region.left_out, sampling=spacing))
