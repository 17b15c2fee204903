"""GGML's 3-bit i-quant IQ3_S (super-blocks of 256 weights in 110 bytes, 3.4375 bits): each group of 4 weights
is one point of a 512-entry lattice grid (4 odd magnitudes 1..15) times a sign per weight and a scale per 32.
Layout (little-endian): {fp16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4]}
  group g (weights 4g..4g+3): grid index qs[g] | (bit g % 8 of qh[g // 8]) << 8
  weight e: sign bit e % 8 of signs[e // 8] (set: negative)
  32-block b: scale d * (1 + 2 * s), s nibble b % 2 of scales[b // 2]
The quantizer reproduces ggml's `quantize_iq3_s` bit for bit: per 32 weights a search over 19 scales, each rounding
a group to the nearest lattice coordinates and, off the grid, taking the weighted-nearest of the neighbours ggml's
`iq3xs_init_impl` lists (every grid point at the 3 smallest squared distances), then one refit at the best scale."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from qbara.quant.ggml.common import (
    F32,
    bits_to_bytes,
    bytes_to_bits,
    div,
    half_bytes,
    half_from_bytes,
    nearest_int,
    rdiv,
    seq_sum,
    sqrt_f32,
)

QK_K = 256
# llama.cpp's kgrid_512 (ggml-quants.c): grid point i has coordinates l_k = (code >> 3k) & 7, magnitudes 2 l_k + 1.
GRID_CODES = (
    0, 1, 2, 5, 7, 8, 9, 10, 12, 14, 16, 17, 21, 27, 32, 34,
    37, 39, 41, 43, 48, 50, 57, 60, 63, 64, 65, 66, 68, 72, 73, 77,
    80, 83, 87, 89, 93, 100, 113, 117, 122, 128, 129, 133, 135, 136, 139, 142,
    145, 149, 152, 156, 162, 165, 167, 169, 171, 184, 187, 195, 201, 205, 208, 210,
    217, 219, 222, 228, 232, 234, 247, 249, 253, 256, 267, 271, 273, 276, 282, 288,
    291, 297, 312, 322, 324, 336, 338, 342, 347, 353, 357, 359, 374, 379, 390, 393,
    395, 409, 426, 441, 448, 450, 452, 464, 466, 470, 475, 488, 492, 512, 513, 514,
    516, 520, 521, 523, 525, 527, 528, 530, 537, 540, 542, 556, 558, 561, 570, 576,
    577, 579, 582, 584, 588, 593, 600, 603, 609, 616, 618, 632, 638, 640, 650, 653,
    655, 656, 660, 666, 672, 675, 685, 688, 698, 705, 708, 711, 712, 715, 721, 727,
    728, 732, 737, 754, 760, 771, 773, 778, 780, 793, 795, 802, 806, 808, 812, 833,
    840, 843, 849, 856, 858, 873, 912, 916, 919, 932, 934, 961, 963, 968, 970, 977,
    989, 993, 1010, 1016, 1024, 1025, 1027, 1029, 1031, 1032, 1034, 1036, 1038, 1041, 1043, 1047,
    1048, 1050, 1057, 1059, 1061, 1064, 1066, 1079, 1080, 1083, 1085, 1088, 1090, 1096, 1099, 1103,
    1106, 1109, 1113, 1116, 1122, 1129, 1153, 1156, 1159, 1169, 1171, 1176, 1183, 1185, 1195, 1199,
    1209, 1212, 1216, 1218, 1221, 1225, 1234, 1236, 1241, 1243, 1250, 1256, 1270, 1281, 1287, 1296,
    1299, 1306, 1309, 1313, 1338, 1341, 1348, 1353, 1362, 1375, 1376, 1387, 1400, 1408, 1410, 1415,
    1425, 1453, 1457, 1477, 1481, 1494, 1496, 1507, 1512, 1538, 1545, 1547, 1549, 1551, 1554, 1561,
    1563, 1565, 1570, 1572, 1575, 1577, 1587, 1593, 1601, 1603, 1605, 1612, 1617, 1619, 1632, 1648,
    1658, 1662, 1664, 1674, 1680, 1690, 1692, 1704, 1729, 1736, 1740, 1745, 1747, 1751, 1752, 1761,
    1763, 1767, 1773, 1787, 1795, 1801, 1806, 1810, 1817, 1834, 1840, 1844, 1857, 1864, 1866, 1877,
    1882, 1892, 1902, 1915, 1934, 1953, 1985, 1987, 2000, 2002, 2013, 2048, 2052, 2058, 2064, 2068,
    2071, 2074, 2081, 2088, 2104, 2114, 2119, 2121, 2123, 2130, 2136, 2141, 2147, 2153, 2157, 2177,
    2179, 2184, 2189, 2193, 2203, 2208, 2223, 2226, 2232, 2244, 2249, 2251, 2256, 2258, 2265, 2269,
    2304, 2306, 2324, 2335, 2336, 2361, 2373, 2375, 2385, 2418, 2443, 2460, 2480, 2504, 2509, 2520,
    2531, 2537, 2562, 2568, 2572, 2578, 2592, 2596, 2599, 2602, 2614, 2620, 2625, 2627, 2629, 2634,
    2641, 2650, 2682, 2688, 2697, 2707, 2712, 2718, 2731, 2754, 2759, 2760, 2775, 2788, 2793, 2805,
    2811, 2817, 2820, 2832, 2842, 2854, 2890, 2902, 2921, 2923, 2978, 3010, 3012, 3026, 3081, 3083,
    3085, 3097, 3099, 3120, 3136, 3152, 3159, 3188, 3210, 3228, 3234, 3245, 3250, 3256, 3264, 3276,
    3281, 3296, 3349, 3363, 3378, 3392, 3395, 3420, 3440, 3461, 3488, 3529, 3531, 3584, 3588, 3591,
    3600, 3602, 3614, 3616, 3628, 3634, 3650, 3657, 3668, 3683, 3685, 3713, 3716, 3720, 3726, 3729,
    3736, 3753, 3778, 3802, 3805, 3819, 3841, 3845, 3851, 3856, 3880, 3922, 3938, 3970, 3993, 4032,
)
_NEAREST_DISTANCES = 3  # iq3xs_init_impl's nwant for the 512 grid
_SCALE_TRIES = range(-9, 10)  # the search tries id = (15 + 0.2 is) / max
_D_FUDGE = np.float32(1.033)  # ggml stores d = max scale / 31 * 1.033
_GROUPS_AT_ONCE = 1 << 14  # off-grid groups whose neighbours are scored at once


@functools.cache
def _tables() -> tuple[Tensor, Tensor, Tensor]:
    """(512, 4) grid magnitudes, the (4096,) map from packed coordinates to a grid index (-1 off the grid) and the
    (4096, M) neighbours of each off-grid point (-1 padded), ordered by (distance, index) as ggml's qsort does."""
    codes = np.array(GRID_CODES, dtype=np.int64)
    shifts = 3 * np.arange(4)
    grid = 2 * ((codes[:, None] >> shifts) & 7) + 1
    kmap = np.full(4096, -1, dtype=np.int64)
    kmap[codes] = np.arange(len(codes))
    points = 2 * ((np.arange(4096)[:, None] >> shifts) & 7) + 1
    dist = ((points[:, None, :] - grid[None, :, :]) ** 2).sum(axis=2)  # (4096, 512)
    lists = []
    for u in np.flatnonzero(kmap < 0):
        order = np.argsort(dist[u], kind="stable")
        cutoff = np.unique(dist[u])[_NEAREST_DISTANCES - 1]
        lists.append((u, order[dist[u, order] <= cutoff]))
    neighbours = np.full((4096, max(len(n) for _, n in lists)), -1, dtype=np.int64)
    for u, n in lists:
        neighbours[u, :len(n)] = n
    return (torch.from_numpy(grid).float(), torch.from_numpy(kmap), torch.from_numpy(neighbours))


def _nearest_neighbour(nb: Tensor, grid: Tensor, xval: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """ggml's iq3_find_best_neighbour for G groups: the first listed neighbour of least sum_i w_i (scale q_i - x_i)^2
    (float32, summed in order). nb (G, M) with -1 padding, xval / w (G, 4), scale (G,) -> grid indices (G,)."""
    out = torch.empty(nb.shape[0], dtype=torch.int64, device=nb.device)
    for start in range(0, nb.shape[0], _GROUPS_AT_ONCE):
        part = slice(start, start + _GROUPS_AT_ONCE)
        cand = nb[part]
        diff = scale[part, None, None] * grid[cand.clamp(min=0)] - xval[part, None, :]
        t = (w[part, None, :] * diff) * diff
        d2 = ((t[..., 0] + t[..., 1]) + t[..., 2]) + t[..., 3]
        d2 = d2.masked_fill(cand < 0, float("inf"))
        out[part] = cand.gather(1, d2.argmin(dim=1, keepdim=True)).squeeze(1)
    return out


def _round_to_grid(xval: Tensor, waux: Tensor, inv: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Each group of 4 of the (B, 32) magnitudes at inverse scale `inv` (B,): its grid index (B, 8) and whether
    rounding landed on the grid (B, 8); off it, the nearest neighbour at `scale` (B,)."""
    grid, kmap, neighbours = (t.to(xval.device) for t in _tables())
    l = nearest_int(0.5 * (inv[:, None] * xval - 1)).clamp_(0, 7).long().view(-1, 8, 4)
    u = (l << torch.tensor([0, 3, 6, 9], device=xval.device)).sum(dim=2)
    index = kmap[u]
    on_grid = index >= 0
    off = (~on_grid).nonzero(as_tuple=True)
    if off[0].numel():
        index[off] = _nearest_neighbour(neighbours[u[off]], grid, xval.view(-1, 8, 4)[off],
                                        waux.view(-1, 8, 4)[off], scale[off[0]])
    return index, on_grid


def _fit(index: Tensor, weight: Tensor, xval: Tensor) -> tuple[Tensor, Tensor]:
    q = _tables()[0].to(xval.device)[index].view(-1, 32)
    wq = weight * q
    return seq_sum(((weight * xval) * q).t().contiguous()), seq_sum((wq * q).t().contiguous())


def _search(weight: Tensor, xval: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 32) search weights and magnitudes -> each 32's scale (B,) and grid indices (B, 8)."""
    waux = sqrt_f32(weight)
    top = xval.amax(dim=1)
    top = torch.where(top > 0, top, torch.ones_like(top))  # all-zero blocks: scale 0, set below
    best = torch.zeros_like(top)
    scale = div(top, 15.0)
    index = torch.zeros(xval.shape[0], 8, dtype=torch.int64, device=xval.device)
    on_grid = torch.zeros(xval.shape[0], 8, dtype=torch.bool, device=xval.device)
    for step in _SCALE_TRIES:
        inv = rdiv(float(np.float32(15) + np.float32(step) * np.float32(0.2)), top)
        trial, trial_on = _round_to_grid(xval, waux, inv, rdiv(1.0, inv))
        sumqx, sumq2 = _fit(trial, weight, xval)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = torch.where(better, sumqx / sumq2, scale)
        best = torch.where(better, scale * sumqx, best)
        index = torch.where(better[:, None], trial, index)
        on_grid = torch.where(better[:, None], trial_on, on_grid)
    redo = ((~on_grid).any(dim=1) & (scale > 0)).nonzero().squeeze(1)
    if redo.numel():  # one more rounding at the best scale, every group of the block, and its refit
        s = scale[redo]
        index[redo] = _round_to_grid(xval[redo], waux[redo], rdiv(1.0, s), s)[0]
        sumqx, sumq2 = _fit(index[redo], weight[redo], xval[redo])
        scale[redo] = torch.where(sumq2 > 0, sumqx / sumq2, s)
    return scale, index


def quantize_iq3_s(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 110) IQ3_S bytes; `qw` (N, 256): importance, weighting each weight by
    qw * sqrt(sigma2 + x^2) with sigma2 twice the super-block's mean square (ggml's; `row_sigma2` unused)."""
    n = x.shape[0]
    blocks = x.reshape(-1, 32)
    if qw is None:
        weight = blocks * blocks
    else:
        sigma2 = seq_sum((x * x).t().contiguous()) * 2 / QK_K  # both exact: powers of two
        weight = qw.reshape(-1, 32) * sqrt_f32(sigma2.repeat_interleave(QK_K // 32)[:, None] + blocks * blocks)
    negative = blocks < 0
    xval = torch.where(negative, -blocks, blocks)
    scale, index = _search(weight, xval)
    empty = xval.amax(dim=1) == 0
    scale = torch.where(empty, torch.zeros_like(scale), scale)
    index = torch.where(empty[:, None], torch.zeros_like(index), index)
    flip = scale < 0  # never for weights >= 0; ggml flips every sign then
    negative = negative ^ flip[:, None]
    scale = scale.abs()

    scales = scale.view(n, QK_K // 32)
    top = scales.amax(dim=1)
    d = div(top, 31.0)
    inv = torch.where(top > 0, rdiv(1.0, d), torch.zeros_like(d))
    ls = nearest_int(0.5 * (inv[:, None] * scales - 1)).clamp_(0, 15)
    ls = torch.where(top[:, None] > 0, ls, torch.zeros_like(ls)).to(torch.uint8)
    dh = torch.where(top > 0, d * torch.tensor(_D_FUDGE, device=x.device), torch.zeros_like(d))
    qh = bits_to_bytes((index >> 8).view(n, QK_K // 32, 8), dim=2)
    signs = bits_to_bytes(negative.view(n, QK_K // 32, 4, 8), dim=3)
    qs, signs = _skip_empty((index & 255).to(torch.uint8).view(n, QK_K // 32, 8), signs, empty.view(n, QK_K // 32))
    return torch.cat([half_bytes(dh), qs, qh, signs, ls[:, 0::2] | (ls[:, 1::2] << 4)], dim=1)


def _skip_empty(qs: Tensor, signs: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
    """ggml's layout quirk: an all-zero 32-block writes no qs / signs bytes and does not advance their pointers, so
    the next blocks' move up one slot each and the last slots stay zero (qh and the scales stay in place).
    (n, 8, 8) qs and (n, 8, 4) signs per 32-block -> (n, 64), (n, 32)."""
    slot = torch.where(empty, QK_K // 32, empty.logical_not().long().cumsum(dim=1) - 1)  # empty ones: a dump slot
    packed_qs = qs.new_zeros(qs.shape[0], QK_K // 32 + 1, 8).scatter_(1, slot[:, :, None].expand_as(qs), qs)
    packed_signs = signs.new_zeros(qs.shape[0], QK_K // 32 + 1, 4).scatter_(1, slot[:, :, None].expand_as(signs),
                                                                           signs)
    return packed_qs[:, :-1].reshape(-1, QK_K // 4), packed_signs[:, :-1].reshape(-1, QK_K // 8)


def dequantize_iq3_s(raw: Tensor, out: Tensor) -> Tensor:
    n = raw.shape[0]
    grid = _tables()[0].to(raw.device)
    index = raw[:, 2:66].long() | (bytes_to_bits(raw[:, 66:74], dim=2).reshape(n, 64).long() << 8)
    negative = bytes_to_bits(raw[:, 74:106], dim=2).reshape(n, QK_K).bool()
    s = raw[:, 106:110]
    step = half_from_bytes(raw[:, :2])[:, None] * (1 + 2 * torch.stack([s & 15, s >> 4], dim=2).reshape(n, 8)).float()
    out.view(n, 8, 32).copy_(grid[index].view(n, 8, 32)).mul_(step[:, :, None])
    return out.mul_(1.0 - 2.0 * negative.float())
