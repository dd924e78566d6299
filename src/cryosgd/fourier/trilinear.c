/* Central slices of a centred half-grid and their back-projection: the CPU kernels of
 * cryosgd.fourier.slice (extract_many, insert_many), built at first use by cryosgd.fourier.native.
 *
 * The arithmetic is that of slice.py's _extract_corners and _insert_corners, point by point:
 * the slice point q = Aᵀ (kx, ky, 0) of point t = b · P + p, read at −q where qx < 0 (the
 * imaginary parts, and the channels marked `conjugate`, change sign there), its lowest
 * stencil corner on the centred grid (n + 1, n + 1, n/2 + 1), clamped as _base_corner
 * clamps it, and the 8 trilinear weights (the nearest voxel, weight 1). The stencils of a
 * block of points are made first, in a loop the compiler vectorises (cloned for AVX-512, AVX2
 * and plain x86-64 where the compiler can, chosen at load time), then read or scattered point
 * by point; the arithmetic, and so every rounding, is the same in each clone. Each call
 * handles the points [start, stop): gathers write their own rows,
 * scatters add into their own accumulator, so that threads never share one. A point that is
 * not finite is clamped to the grid like one beyond it (NaN compares false both ways, and its
 * x, which the flip makes ≥ 0 otherwise, goes to 0): its weights, and so its values, are NaN,
 * and no memory outside the grid is touched.
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__ELF__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)  /* needs the loader's ifunc: glibc on ELF */
#define CLONED __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef CLONED
#define CLONED
#endif

#define BLOCK 64  /* points whose stencils are made together */

/* The flat offsets of a stencil's 8 corners from its lowest one in the centred grid of box n
   (dz slowest, dx fastest: slice.py's _corner_offsets). */
static void corner_offsets(int64_t n, int64_t offset[8])
{
    const int64_t nh = n / 2 + 1, plane = (n + 1) * nh;
    for (int k = 0; k < 8; ++k) offset[k] = (k >> 2) * plane + ((k >> 1) & 1) * nh + (k & 1);
}

#define DEFINE_KERNELS(SUFFIX, REAL, FLOOR)                                                                 \
/* Stencils of `count` frequencies under rotation a: each one's lowest corner (cx, cy, cz) on the           \
   centred grid, its 8 weights w[k][i] (dz slowest, dx fastest: slice.py's _corner_offsets; the             \
   nearest voxel: w[0] = 1) and its flip sign. */                                                           \
static inline void stencils_##SUFFIX(const REAL *restrict a, const REAL *restrict freq, int64_t count,      \
                                     int nearest, int64_t n, int32_t *restrict cx, int32_t *restrict cy,    \
                                     int32_t *restrict cz, REAL (*restrict w)[BLOCK], REAL *restrict sign)  \
{                                                                                                           \
    const REAL h = (REAL)(n / 2), shift = nearest ? (REAL)0.5 : (REAL)0, top = nearest ? h : h - 1;         \
    for (int64_t i = 0; i < count; ++i) {                                                                   \
        const REAL kx = freq[2 * i], ky = freq[2 * i + 1];                                                  \
        REAL qx = kx * a[0] + ky * a[3], qy = kx * a[1] + ky * a[4], qz = kx * a[2] + ky * a[5];            \
        const REAL s = qx < 0 ? (REAL)-1 : (REAL)1;                                                         \
        qx *= s; qy *= s; qz *= s;                                                                          \
        REAL fx = FLOOR(qx + shift), fy = FLOOR(qy + shift), fz = FLOOR(qz + shift);                        \
        fx = fx > 0 ? (fx < top ? fx : top) : 0;  /* qx ≥ 0 after the flip; NaN goes to 0 too */            \
        fy = fy > -h ? (fy < top ? fy : top) : -h;                                                          \
        fz = fz > -h ? (fz < top ? fz : top) : -h;                                                          \
        cx[i] = (int32_t)fx; cy[i] = (int32_t)fy; cz[i] = (int32_t)fz;                                      \
        sign[i] = s;                                                                                        \
        const REAL dx = qx - fx, dy = qy - fy, dz = qz - fz;                                                \
        const REAL ex = 1 - dx, ey = 1 - dy, ez = 1 - dz;                                                   \
        w[0][i] = (ez * ey) * ex; w[1][i] = (ez * ey) * dx;                                                 \
        w[2][i] = (ez * dy) * ex; w[3][i] = (ez * dy) * dx;                                                 \
        w[4][i] = (dz * ey) * ex; w[5][i] = (dz * ey) * dx;                                                 \
        w[6][i] = (dz * dy) * ex; w[7][i] = (dz * dy) * dx;                                                 \
        if (nearest) w[0][i] = 1;                                                                           \
    }                                                                                                       \
}                                                                                                           \
                                                                                                            \
/* The block of points from t: at most BLOCK, within one image, ending by `stop`. Sets its image *b         \
   and first pixel *p, each point's lowest corner as a flat index `base` of the centred grid, its           \
   weights and flip sign; returns the block's size. */                                                      \
static inline int64_t block_##SUFFIX(const REAL *rotations, const REAL *freq, int64_t points_per_image,     \
                                     int nearest, int64_t n, int64_t t, int64_t stop, int64_t *b,           \
                                     int64_t *p, int64_t *base, REAL (*w)[BLOCK], REAL *sign)               \
{                                                                                                           \
    const int64_t nh = n / 2 + 1, centre = (n / 2) * nh * (n + 2);                                          \
    int32_t cx[BLOCK], cy[BLOCK], cz[BLOCK];                                                                \
    *b = t / points_per_image; *p = t % points_per_image;                                                   \
    int64_t count = stop - t < BLOCK ? stop - t : BLOCK;                                                    \
    if (count > points_per_image - *p) count = points_per_image - *p;                                       \
    stencils_##SUFFIX(rotations + 9 * *b, freq + 2 * *p, count, nearest, n, cx, cy, cz, w, sign);           \
    for (int64_t i = 0; i < count; ++i)                                                                     \
        base[i] = ((int64_t)cz[i] * (n + 1) + cy[i]) * nh + cx[i] + centre;                                 \
    return count;                                                                                           \
}                                                                                                           \
                                                                                                            \
/* volume (S, C, 2) channel-last (real, imaginary) → out (B · P, C, 2) */                                   \
CLONED void gather_##SUFFIX(const REAL *rotations, const REAL *freq, int64_t points_per_image,              \
                            const REAL *volume, int64_t channels, int nearest, int64_t n, REAL *out,        \
                            int64_t start, int64_t stop)                                                    \
{                                                                                                           \
    const int corners = nearest ? 1 : 8;                                                                    \
    int64_t offset[8], base[BLOCK], b, p; REAL w[8][BLOCK], sign[BLOCK];                                    \
    corner_offsets(n, offset);                                                                              \
    for (int64_t t = start; t < stop;) {                                                                    \
        const int64_t count = block_##SUFFIX(rotations, freq, points_per_image, nearest, n, t, stop,        \
                                             &b, &p, base, w, sign);                                        \
        for (int64_t i = 0; i < count; ++i, ++t) {                                                          \
            REAL *row = out + t * channels * 2;                                                             \
            for (int64_t c = 0; c < channels; ++c) {                                                        \
                REAL re = 0, im = 0;                                                                        \
                for (int k = 0; k < corners; ++k) {                                                         \
                    const REAL *v = volume + ((base[i] + offset[k]) * channels + c) * 2;                    \
                    re += w[k][i] * v[0];                                                                   \
                    im += w[k][i] * v[1];                                                                   \
                }                                                                                           \
                row[2 * c] = re;                                                                            \
                row[2 * c + 1] = im * sign[i];                                                              \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
}                                                                                                           \
                                                                                                            \
/* values (C, S · P) real → out (V, C) channel-last: row b scatters image source[b] (b without a source)    \
   times scale[b] (1 without), with the weights to powers[c] (1 or 2) */                                    \
CLONED void scatter_##SUFFIX(const REAL *rotations, const REAL *freq, int64_t points_per_image,             \
                             const REAL *values, int64_t channels, int64_t channel_stride,                  \
                             const int64_t *source, const REAL *scale,                                      \
                             const int *conjugate, const int *powers, int nearest, int64_t n, REAL *out,    \
                             int64_t start, int64_t stop)                                                   \
{                                                                                                           \
    const int corners = nearest ? 1 : 8;                                                                    \
    int64_t offset[8], base[BLOCK], b, p; REAL w[8][BLOCK], sign[BLOCK];                                    \
    corner_offsets(n, offset);                                                                              \
    for (int64_t t = start; t < stop;) {                                                                    \
        const int64_t count = block_##SUFFIX(rotations, freq, points_per_image, nearest, n, t, stop,        \
                                             &b, &p, base, w, sign);                                        \
        const REAL *from = values + (source ? source[b] : b) * points_per_image + p;                        \
        const REAL factor = scale ? scale[b] : (REAL)1;                                                     \
        for (int64_t i = 0; i < count; ++i, ++t) {                                                          \
            for (int64_t c = 0; c < channels; ++c) {                                                        \
                REAL v = from[c * channel_stride + i] * factor;                                             \
                if (conjugate[c]) v *= sign[i];                                                             \
                REAL *target = out + c;                                                                     \
                if (powers[c] == 2)                                                                         \
                    for (int k = 0; k < corners; ++k)                                                       \
                        target[(base[i] + offset[k]) * channels] += (w[k][i] * w[k][i]) * v;                \
                else                                                                                        \
                    for (int k = 0; k < corners; ++k)                                                       \
                        target[(base[i] + offset[k]) * channels] += w[k][i] * v;                            \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
}

DEFINE_KERNELS(float, float, floorf)
DEFINE_KERNELS(double, double, floor)
