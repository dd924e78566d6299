/* Central slices of a centred half-grid and their back-projection: the CPU kernels of
 * cryosgd.fourier.slice (extract_many, insert_many), built at first use by cryosgd.fourier.native.
 *
 * The arithmetic is that of slice.py's _extract_corners and _insert_corners, point by point:
 * the slice point q = Aᵀ (kx, ky, 0) of point t = b · P + p, read at −q where qx < 0 (the
 * imaginary parts, and the channels marked `conjugate`, change sign there), its lowest
 * stencil corner on the centred grid (n + 1, n + 1, n/2 + 1), clamped as _base_corner
 * clamps it, and the 8 trilinear weights (the nearest voxel, weight 1). One pass, no
 * temporaries; each call handles the points [start, stop): gathers write their own rows,
 * scatters add into their own accumulator, so that threads never share one. A point that is
 * not finite is clamped to the grid like one beyond it (NaN compares false both ways): its
 * weights, and so its values, are NaN, and no memory outside the grid is touched.
 */
#include <math.h>
#include <stdint.h>

#define DEFINE_KERNELS(SUFFIX, REAL, FLOOR)                                                                 \
/* The stencil of frequency (kx, ky) under rotation a: the flat indices `at` of its corners in the         \
   centred grid, their weights `w` and the flip `sign`; returns the number of corners (8, or 1). */         \
static inline int stencil_##SUFFIX(const REAL *a, REAL kx, REAL ky, int nearest, int64_t n, int64_t *at,    \
                                   REAL *w, REAL *sign)                                                     \
{                                                                                                           \
    const int64_t h = n / 2, nh = n / 2 + 1;                                                                \
    REAL qx = kx * a[0] + ky * a[3], qy = kx * a[1] + ky * a[4], qz = kx * a[2] + ky * a[5];                \
    *sign = qx < 0 ? (REAL)-1 : (REAL)1;                                                                    \
    qx *= *sign; qy *= *sign; qz *= *sign;                                                                  \
    const REAL shift = nearest ? (REAL)0.5 : (REAL)0;                                                       \
    const REAL top = nearest ? (REAL)h : (REAL)(h - 1);                                                     \
    REAL cx = FLOOR(qx + shift), cy = FLOOR(qy + shift), cz = FLOOR(qz + shift);                            \
    cx = cx > -h ? (cx < top ? cx : top) : -h;                                                              \
    cy = cy > -h ? (cy < top ? cy : top) : -h;                                                              \
    cz = cz > -h ? (cz < top ? cz : top) : -h;                                                              \
    const int64_t base = ((int64_t)cz * (n + 1) + (int64_t)cy) * nh + (int64_t)cx + h * nh * (n + 2);       \
    if (nearest) {                                                                                          \
        at[0] = base;                                                                                       \
        w[0] = 1;                                                                                           \
        return 1;                                                                                           \
    }                                                                                                       \
    const REAL fx = qx - cx, fy = qy - cy, fz = qz - cz;                                                    \
    const REAL px[2] = {1 - fx, fx}, py[2] = {1 - fy, fy}, pz[2] = {1 - fz, fz};                            \
    for (int k = 0; k < 8; ++k) {  /* dz slowest, dx fastest: slice.py's _corner_offsets */                 \
        at[k] = base + (k >> 2) * (n + 1) * nh + ((k >> 1) & 1) * nh + (k & 1);                             \
        w[k] = (pz[k >> 2] * py[(k >> 1) & 1]) * px[k & 1];                                                 \
    }                                                                                                       \
    return 8;                                                                                               \
}                                                                                                           \
                                                                                                            \
/* volume (S, C, 2) channel-last (real, imaginary) → out (B · P, C, 2) */                                   \
void gather_##SUFFIX(const REAL *rotations, const REAL *freq, int64_t points_per_image,                     \
                     const REAL *volume, int64_t channels, int nearest, int64_t n, REAL *out,               \
                     int64_t start, int64_t stop)                                                           \
{                                                                                                           \
    for (int64_t t = start, b = start / points_per_image, p = start % points_per_image; t < stop; ++t) {     \
        int64_t at[8]; REAL w[8], sign;                                                                     \
        const int corners = stencil_##SUFFIX(rotations + 9 * b, freq[2 * p], freq[2 * p + 1], nearest, n,   \
                                             at, w, &sign);                                                 \
        if (++p == points_per_image) { p = 0; ++b; }                                                        \
        REAL *row = out + t * channels * 2;                                                                 \
        for (int64_t c = 0; c < channels; ++c) {                                                            \
            REAL re = 0, im = 0;                                                                            \
            for (int k = 0; k < corners; ++k) {                                                             \
                const REAL *v = volume + (at[k] * channels + c) * 2;                                        \
                re += w[k] * v[0];                                                                          \
                im += w[k] * v[1];                                                                          \
            }                                                                                               \
            row[2 * c] = re;                                                                                \
            row[2 * c + 1] = im * sign;                                                                     \
        }                                                                                                   \
    }                                                                                                       \
}                                                                                                           \
                                                                                                            \
/* values (C, S · P) real → out (V, C) channel-last: row b scatters image source[b] (b without a source)             \
   times scale[b] (1 without), with the weights to powers[c] (1 or 2) */                                   \
void scatter_##SUFFIX(const REAL *rotations, const REAL *freq, int64_t points_per_image,                    \
                      const REAL *values, int64_t channels, int64_t channel_stride,                         \
                      const int64_t *source, const REAL *scale,                                             \
                      const int *conjugate, const int *powers, int nearest, int64_t n, REAL *out,           \
                      int64_t start, int64_t stop)                                                          \
{                                                                                                           \
    for (int64_t t = start, b = start / points_per_image, p = start % points_per_image; t < stop; ++t) {     \
        int64_t at[8]; REAL w[8], sign;                                                                     \
        const int corners = stencil_##SUFFIX(rotations + 9 * b, freq[2 * p], freq[2 * p + 1], nearest, n,   \
                                             at, w, &sign);                                                 \
        const int64_t from = (source ? source[b] : b) * points_per_image + p;                               \
        const REAL factor = scale ? scale[b] : (REAL)1;                                                     \
        if (++p == points_per_image) { p = 0; ++b; }                                                        \
        for (int64_t c = 0; c < channels; ++c) {                                                            \
            REAL v = values[c * channel_stride + from] * factor;                                            \
            if (conjugate[c]) v *= sign;                                                                    \
            REAL *target = out + c;                                                                         \
            if (powers[c] == 2)                                                                             \
                for (int k = 0; k < corners; ++k) target[at[k] * channels] += (w[k] * w[k]) * v;            \
            else                                                                                            \
                for (int k = 0; k < corners; ++k) target[at[k] * channels] += w[k] * v;                     \
        }                                                                                                   \
    }                                                                                                       \
}

DEFINE_KERNELS(float, float, floorf)
DEFINE_KERNELS(double, double, floor)
