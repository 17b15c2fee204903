"""GGML's 3-bit i-quants IQ3_S and IQ3_XXS (super-blocks of 256 weights): each group of 4 weights is one point of
a lattice grid (4 odd magnitudes 1..15; 512 points for IQ3_S, 256 for IQ3_XXS) times a sign per weight and a scale
per 32. Layouts (little-endian):
  IQ3_S (110 B, 3.4375 bits) {fp16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4]}
    group g (weights 4g..4g+3): grid index qs[g] | (bit g % 8 of qh[g // 8]) << 8
    weight e: sign bit e % 8 of signs[e // 8] (set: negative)
    32-block b: scale d * (1 + 2 * s), s nibble b % 2 of scales[b // 2]
  IQ3_XXS (98 B, 3.0625 bits) {fp16 d; u8 grid[64]; u32 aux[8]}
    group g: grid index grid[g], its magnitudes stored as XXS_LEVELS[l] (4 (2l + 1), the top one 62); 32-block b:
    aux[b] = 4 x 7 sign bits (weights 8k..8k+6 of the block at bits 7k; weight 8k+7 negative when those 7 have an
    odd count, ggml's ksigns) | s << 28, scale d * (0.5 + s) / 2
The quantizers reproduce ggml's `quantize_iq3_s` / `quantize_iq3_xxs` bit for bit (numpy float32, every try at
once): per 32 weights a search over 19 (IQ3_XXS: 31) scales, each rounding a group to the nearest lattice
coordinates and, off the grid, taking the weighted-nearest of the neighbours ggml's `iq3xs_init_impl` lists (every
grid point at the 3 (IQ3_XXS: 2) smallest squared distances), then one refit at the best scale. (numpy: torch's
many small threaded ops crawl on a busy machine.)"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qbara.quant.ggml.common import (
    bytes_to_bits,
    half_bytes,
    half_from_bytes,
    iquant_search_weights,
)

QK_K = 256
# llama.cpp's kgrid_512 (ggml-quants.c): grid point i has coordinates l_k = (code >> 3k) & 7, magnitudes 2 l_k + 1.
GRID_512 = (
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
# llama.cpp's kgrid_256, IQ3_XXS's grid (same coding)
GRID_256 = (
    0, 2, 4, 9, 11, 15, 16, 18, 25, 34, 59, 61, 65, 67, 72, 74,
    81, 85, 88, 90, 97, 108, 120, 128, 130, 132, 137, 144, 146, 153, 155, 159,
    169, 175, 189, 193, 199, 200, 202, 213, 248, 267, 287, 292, 303, 315, 317, 321,
    327, 346, 362, 413, 436, 456, 460, 462, 483, 497, 513, 515, 520, 522, 529, 531,
    536, 538, 540, 551, 552, 576, 578, 585, 592, 594, 641, 643, 648, 650, 657, 664,
    698, 704, 706, 720, 729, 742, 758, 769, 773, 808, 848, 852, 870, 889, 901, 978,
    992, 1024, 1026, 1033, 1035, 1040, 1042, 1046, 1049, 1058, 1089, 1091, 1093, 1096, 1098, 1105,
    1112, 1139, 1143, 1144, 1152, 1154, 1161, 1167, 1168, 1170, 1183, 1184, 1197, 1217, 1224, 1228,
    1272, 1276, 1309, 1323, 1347, 1367, 1377, 1404, 1473, 1475, 1486, 1509, 1537, 1544, 1546, 1553,
    1555, 1576, 1589, 1594, 1600, 1602, 1616, 1625, 1636, 1638, 1665, 1667, 1672, 1685, 1706, 1722,
    1737, 1755, 1816, 1831, 1850, 1856, 1862, 1874, 1901, 1932, 1950, 1971, 2011, 2032, 2052, 2063,
    2077, 2079, 2091, 2095, 2172, 2192, 2207, 2208, 2224, 2230, 2247, 2277, 2308, 2345, 2356, 2389,
    2403, 2424, 2501, 2504, 2506, 2520, 2570, 2593, 2616, 2624, 2630, 2646, 2669, 2700, 2714, 2746,
    2754, 2795, 2824, 2835, 2839, 2874, 2882, 2905, 2984, 3028, 3042, 3092, 3108, 3110, 3124, 3153,
    3185, 3215, 3252, 3288, 3294, 3364, 3397, 3434, 3483, 3523, 3537, 3587, 3589, 3591, 3592, 3610,
    3626, 3670, 3680, 3722, 3749, 3754, 3776, 3789, 3803, 3824, 3857, 3873, 3904, 3906, 3924, 3992,
)


@dataclass(frozen=True)
class _Lattice:
    """What differs between IQ3_S and IQ3_XXS's searches (ggml's quantize_row_iq3_s_impl / _xxs_impl)."""

    codes: tuple[int, ...]
    nearest_distances: int  # iq3xs_init_impl's nwant: neighbours at this many smallest distances
    tries: int  # the search tries id = (15 + 0.2 is) / max for is in -tries .. tries
    eps: float  # a block whose largest magnitude is below it gets scale 0 (IQ3_S: 0, only an all-zero one)
    refit_all: bool  # IQ3_S rounds every group again at the best scale, IQ3_XXS only the off-grid ones
    fudge: float  # ggml stores d = max scale / 31 * fudge

    @property
    def steps(self) -> np.ndarray:  # 15 + is * 0.2f in float32, as C computes it
        return np.float32(15) + np.arange(-self.tries, self.tries + 1).astype(np.float32) * np.float32(0.2)


IQ3S = _Lattice(GRID_512, 3, 9, 0.0, True, 1.033)
# ggml-common.h's iq3xxs_grid bytes for l = 0..7: the dequantizer's magnitudes (the search uses 2l + 1)
XXS_LEVELS = (4, 12, 20, 28, 36, 44, 52, 62)
IQ3XXS = _Lattice(GRID_256, 2, 15, 1e-8, False, 1.0125)
_GROUPS_AT_ONCE = 1 << 12  # off-grid groups whose neighbours are scored at once


@functools.cache
def _tables(lat: _Lattice) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(G, 4) float32 grid magnitudes, the (4096,) map from packed coordinates (3 bits each) to a grid index (-1
    off the grid), the (4096, M) neighbours of each off-grid point (-1 padded), ordered by (distance, index) as
    ggml's qsort leaves them, and their (4096,) counts."""
    codes = np.array(lat.codes, dtype=np.int64)
    shifts = 3 * np.arange(4)
    grid = 2 * ((codes[:, None] >> shifts) & 7) + 1
    kmap = np.full(4096, -1, dtype=np.int64)
    kmap[codes] = np.arange(len(codes))
    points = 2 * ((np.arange(4096)[:, None] >> shifts) & 7) + 1
    dist = ((points[:, None, :] - grid[None, :, :]) ** 2).sum(axis=2)  # (4096, G)
    lists = {}
    for u in np.flatnonzero(kmap < 0):
        order = np.argsort(dist[u], kind="stable")
        cutoff = np.unique(dist[u])[lat.nearest_distances - 1]
        lists[u] = order[dist[u, order] <= cutoff]
    neighbours = np.full((4096, max(map(len, lists.values()))), -1, dtype=np.int64)
    counts = np.zeros(4096, dtype=np.int64)
    for u, n in lists.items():
        neighbours[u, :len(n)], counts[u] = n, len(n)
    return grid.astype(np.float32), kmap, neighbours, counts


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit: the low 23 bits of v + 1.5 * 2^23 in float32, less 2^22. Rounds half to even
    for |v| < 2^22 only; beyond (a group at a tiny refit scale) its wrapped values are what ggml uses too."""
    return ((v + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000


def _nearest_neighbour(lat: _Lattice, u: np.ndarray, xval: np.ndarray, w: np.ndarray, scale: np.ndarray
                       ) -> np.ndarray:
    """ggml's iq3_find_best_neighbour for G off-grid groups: the first listed neighbour of least
    sum_i w_i (scale q_i - x_i)^2 (float32, summed in order). u (G,) packed coordinates, xval / w (G, 4), scale
    (G,) -> grid indices (G,). Groups go by their number of neighbours (IQ3_S: 3 to 38, 7 on average), in slices
    padded to the longest list in each."""
    grid, _, neighbours, counts = _tables(lat)
    grid_t = np.ascontiguousarray(grid.T)  # (4, 512): one coordinate per row, so each term below is contiguous
    count = counts[u]
    order = np.argsort(count, kind="stable")
    out = np.empty_like(u)
    for start in range(0, len(u), _GROUPS_AT_ONCE):
        part = order[start:start + _GROUPS_AT_ONCE]
        cand = neighbours[u[part], :count[part[-1]]]  # a -1 pad reads the last grid point: masked below
        s, x, wp = scale[part, None], xval[part], w[part]
        d2 = None
        for i in range(4):
            diff = s * grid_t[i][cand] - x[:, i, None]
            term = (wp[:, i, None] * diff) * diff
            d2 = term if d2 is None else d2 + term
        d2[cand < 0] = np.inf
        out[part] = np.take_along_axis(cand, d2.argmin(axis=1)[:, None], axis=1)[:, 0]
    return out


def _round_to_grid(lat: _Lattice, xval: np.ndarray, waux: np.ndarray, inv: np.ndarray, scale: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each group of 4 of the (B, 32) magnitudes at T inverse scales `inv` (T, B): its grid index (T, B, 8) and
    whether rounding landed on the grid (T, B, 8); off it, the nearest neighbour at `scale` (T, B)."""
    _, kmap, _, _ = _tables(lat)
    coords = np.clip(_nearest_int(np.float32(0.5) * (inv[:, :, None] * xval[None] - np.float32(1))), 0, 7)
    u = (coords.reshape(*inv.shape, 8, 4).astype(np.int64) << np.array([0, 3, 6, 9])).sum(axis=3)
    index = kmap[u]
    on_grid = index >= 0
    t, b, k = np.nonzero(~on_grid)
    if len(t):
        index[t, b, k] = _nearest_neighbour(lat, u[t, b, k], xval.reshape(-1, 8, 4)[b, k],
                                            waux.reshape(-1, 8, 4)[b, k], scale[t, b])
    return index, on_grid


def _fit(lat: _Lattice, index: np.ndarray, weight_t: np.ndarray, xval_t: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """sum w x q and sum w q^2 over each block's 32 weights in order, for (T, B, 8) grid indices; weight_t / xval_t
    (32, B). numpy reduces the leading axis of a contiguous array row by row, i.e. in index order."""
    q = np.ascontiguousarray(_tables(lat)[0][index].transpose(2, 3, 0, 1)).reshape(32, *index.shape[:2])
    return (np.add.reduce((weight_t * xval_t)[:, None] * q, axis=0),
            np.add.reduce((weight_t[:, None] * q) * q, axis=0))


def _search(lat: _Lattice, weight: np.ndarray, xval: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 32) search weights and magnitudes -> each 32's scale (B,) and grid indices (B, 8); `empty` blocks get 0."""
    waux = np.sqrt(weight.astype(np.float64)).astype(np.float32)  # correctly rounded sqrtf
    weight_t, xval_t = np.ascontiguousarray(weight.T), np.ascontiguousarray(xval.T)
    top = np.where(empty, np.float32(1), xval.max(axis=1))
    inv = lat.steps[:, None] / top[None, :]
    trial, trial_on = _round_to_grid(lat, xval, waux, inv, np.float32(1) / inv)
    sumqx, sumq2 = _fit(lat, trial, weight_t, xval_t)
    best = np.zeros_like(top)
    scale = top / np.float32(15)
    chosen = np.full(len(top), -1)
    for step in range(len(inv)):  # in order: a later try must beat the best so far strictly
        better = (sumq2[step] > 0) & (sumqx[step] * sumqx[step] > best * sumq2[step])
        scale = np.where(better, sumqx[step] / np.where(better, sumq2[step], np.float32(1)), scale)
        best = np.where(better, scale * sumqx[step], best)
        chosen = np.where(better, step, chosen)
    blocks = np.arange(len(top))
    picked = chosen >= 0
    index = np.where(picked[:, None], trial[chosen.clip(0), blocks], 0)
    # no try taken: IQ3_S counts every group off the grid, IQ3_XXS every group on it
    on_grid = np.where(picked[:, None], trial_on[chosen.clip(0), blocks], not lat.refit_all)
    redo = np.flatnonzero(~on_grid.all(axis=1) & (scale > 0) & ~empty)
    if len(redo):  # one more rounding at the best scale (IQ3_XXS: of the off-grid groups only) and its refit
        s = scale[redo]
        again = _round_to_grid(lat, xval[redo], waux[redo], (np.float32(1) / s)[None], s[None])[0][0]
        index[redo] = again if lat.refit_all else np.where(on_grid[redo], index[redo], again)
        sumqx, sumq2 = _fit(lat, index[redo][None], weight_t[:, redo], xval_t[:, redo])
        scale[redo] = np.where(sumq2[0] > 0, sumqx[0] / np.where(sumq2[0] > 0, sumq2[0], np.float32(1)), s)
    scale[empty], index[empty] = 0, 0
    return scale, index


def _weights(x: Tensor, qw: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 256) -> (B, 32) fp32 weights and their search weights (`iquant_search_weights`: x^2, or
    qw * sqrt(sigma2 + x^2) with sigma2 twice the super-block's mean square)."""
    x = x.detach().cpu().float()
    weight = iquant_search_weights(x, None if qw is None else qw.detach().cpu().float())
    return x.numpy().reshape(-1, 32), np.ascontiguousarray(weight.t().numpy())


def _super_scales(lat: _Lattice, scale: np.ndarray, n: int) -> tuple[Tensor, np.ndarray]:
    """Each super-block's fp16 d (as (n, 2) bytes) and 4-bit block scales (n, 8): d = max / 31 * fudge, the block
    scale nearest_int((scale / (max / 31) - 1) / 2) in [0, 15]."""
    scales = scale.reshape(n, QK_K // 32)
    top = scales.max(axis=1)
    d = top / np.float32(31)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(top > 0, np.float32(1) / d, np.float32(0))
        ls = np.clip(_nearest_int(np.float32(0.5) * (inv[:, None] * scales - np.float32(1))), 0, 15)
        dh = np.where(top > 0, d * np.float32(lat.fudge), np.float32(0)).astype(np.float16)  # beyond fp16: inf
    return half_bytes(torch.from_numpy(dh)), np.where(top[:, None] > 0, ls, 0).astype(np.uint32)


def quantize_iq3_s(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 110) IQ3_S bytes; `qw` (N, 256): importance, weighting each weight by
    qw * sqrt(sigma2 + x^2) with sigma2 twice the super-block's mean square (ggml's; `row_sigma2` unused)."""
    n = x.shape[0]
    blocks, weight = _weights(x, qw)
    negative = blocks < 0
    xval = np.where(negative, -blocks, blocks)
    empty = xval.max(axis=1) == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale, index = _search(IQ3S, weight, xval, empty)
    negative ^= (scale < 0)[:, None]  # never for weights >= 0; ggml flips every sign then
    dh, ls = _super_scales(IQ3S, np.abs(scale), n)
    qh = np.packbits((index >> 8).astype(np.uint8).reshape(n, QK_K // 32, 8), axis=2, bitorder="little")
    signs = np.packbits(negative.reshape(n, QK_K // 32, 4, 8), axis=3, bitorder="little")
    qs, signs = _skip_empty((index & 255).astype(np.uint8).reshape(n, QK_K // 32, 8), signs.reshape(n, -1, 4),
                            empty.reshape(n, QK_K // 32))
    rest = np.concatenate([qs, qh.reshape(n, 8), signs, (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)], axis=1)
    return torch.cat([dh, torch.from_numpy(rest)], dim=1).to(x.device)


def quantize_iq3_xxs(x: Tensor, qw: Tensor | None = None, row_sigma2: Tensor | None = None) -> Tensor:
    """(N, 256) fp32 -> (N, 98) IQ3_XXS bytes (arguments as `quantize_iq3_s`). Only an even number of each 8 weights
    can be negative: where the count is odd, the weight of least w x^2 (the first of equals) is taken as its
    opposite, i.e. searched as a negative magnitude."""
    n = x.shape[0]
    blocks, weight = _weights(x, qw)
    negative = blocks < 0
    xval = np.where(negative, -blocks, blocks).reshape(-1, 8)
    odd = np.flatnonzero(negative.reshape(-1, 8).sum(axis=1) % 2)
    if len(odd):
        least = ((weight * blocks) * blocks).reshape(-1, 8)[odd].argmin(axis=1)
        xval[odd, least] = -xval[odd, least]
        negative.reshape(-1, 8)[odd, least] ^= True
    xval = xval.reshape(-1, 32)
    empty = xval.max(axis=1) < np.float32(IQ3XXS.eps)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale, index = _search(IQ3XXS, weight, xval, empty)
    negative ^= (scale < 0)[:, None]  # ggml flips the 7 stored bits, and so the parity one
    negative[empty] = False
    dh, ls = _super_scales(IQ3XXS, np.abs(scale), n)
    seven = np.packbits(negative.reshape(-1, 4, 8), axis=2, bitorder="little")[:, :, 0].astype(np.uint32) & 127
    aux = seven[:, 0] | (seven[:, 1] << 7) | (seven[:, 2] << 14) | (seven[:, 3] << 21) | (ls.reshape(-1) << 28)
    rest = np.concatenate([index.astype(np.uint8).reshape(n, 64), aux.astype("<u4").reshape(n, 8).view(np.uint8)],
                          axis=1)
    return torch.cat([dh, torch.from_numpy(rest)], dim=1).to(x.device)


def _skip_empty(qs: np.ndarray, signs: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's layout quirk: an all-zero 32-block writes no qs / signs bytes and does not advance their pointers, so
    the next blocks' move up one slot each and the last slots stay zero (qh and the scales stay in place).
    (n, 8, 8) qs and (n, 8, 4) signs per 32-block -> (n, 64), (n, 32)."""
    n = len(qs)
    rows, blocks = np.nonzero(~empty)
    slot = np.cumsum(~empty, axis=1)[rows, blocks] - 1
    packed_qs, packed_signs = np.zeros_like(qs), np.zeros_like(signs)
    packed_qs[rows, slot], packed_signs[rows, slot] = qs[rows, blocks], signs[rows, blocks]
    return packed_qs.reshape(n, QK_K // 4), packed_signs.reshape(n, QK_K // 8)


def dequantize_iq3_s(raw: Tensor, out: Tensor) -> Tensor:
    n = raw.shape[0]
    grid = torch.from_numpy(_tables(IQ3S)[0]).to(raw.device)
    index = raw[:, 2:66].long() | (bytes_to_bits(raw[:, 66:74], dim=2).reshape(n, 64).long() << 8)
    negative = bytes_to_bits(raw[:, 74:106], dim=2).reshape(n, QK_K).bool()
    s = raw[:, 106:110]
    step = half_from_bytes(raw[:, :2])[:, None] * (1 + 2 * torch.stack([s & 15, s >> 4], dim=2).reshape(n, 8)).float()
    out.view(n, 8, 32).copy_(grid[index].view(n, 8, 32)).mul_(step[:, :, None])
    return out.mul_(1.0 - 2.0 * negative.float())


def dequantize_iq3_xxs(raw: Tensor, out: Tensor) -> Tensor:
    n = raw.shape[0]
    levels = torch.tensor(XXS_LEVELS, dtype=torch.float32, device=raw.device)
    grid = levels[(torch.from_numpy(_tables(IQ3XXS)[0]).to(raw.device).long() - 1) // 2]
    aux = raw[:, 66:98].reshape(n, 8, 4).long()
    aux = aux[..., 0] | (aux[..., 1] << 8) | (aux[..., 2] << 16) | (aux[..., 3] << 24)  # (n, 8) little-endian u32
    seven = (aux[:, :, None] >> torch.arange(0, 28, 7, device=raw.device)) & 127  # (n, 8, 4)
    parity = bytes_to_bits(seven.to(torch.uint8), dim=3).sum(dim=3) & 1
    negative = bytes_to_bits((seven | (parity << 7)).to(torch.uint8), dim=3).reshape(n, QK_K).bool()
    step = half_from_bytes(raw[:, :2])[:, None] * ((aux >> 28).float() + 0.5) * 0.5
    out.view(n, 8, 32).copy_(grid[raw[:, 2:66].long()].view(n, 8, 32)).mul_(step[:, :, None])
    return out.mul_(1.0 - 2.0 * negative.float())
