/* Central slices of a centred half-grid and their back-projection: the CPU kernels of
 * cryosgd.fourier.slice (extract_many, insert_many), built at first use by cryosgd.fourier.native.
 *
 * The arithmetic is that of slice.py's _extract_corners and _insert_corners, point by point:
 * the slice point q = Aᵀ (kx, ky, 0) of point t = b · P + p, read at −q where qx < 0 (the
 * imaginary parts, and the channels marked `conjugate`, change sign there), its lowest
 * stencil corner on the centred grid (n + 1, n + 1, n/2 + 1), clamped as _base_corner
 * clamps it, and the 8 trilinear weights (the nearest voxel, weight 1). One pass, no
 * temporaries; each call handles the points [start, stop): gathers write their own rows,
 * scatters add into their own accumulator, so that threads never share one.
 */
#include <math.h>

#define DEFINE_KERNELS(SUFFIX, REAL, FLOOR)                                                      \
static int stencil_##SUFFIX(const REAL *rotations, const REAL *freq, long points_per_image,     \
                            int nearest, long n, long t, long *base, REAL *w, REAL *sign)       \
{                                                                                               \
    const long h = n / 2, nh = n / 2 + 1;                                                       \
    const long b = t / points_per_image, p = t % points_per_image;                              \
    const REAL *a = rotations + 9 * b;                                                          \
    const REAL kx = freq[2 * p], ky = freq[2 * p + 1];                                          \
    REAL qx = kx * a[0] + ky * a[3], qy = kx * a[1] + ky * a[4], qz = kx * a[2] + ky * a[5];     \
    *sign = qx < 0 ? (REAL)-1 : (REAL)1;                                                        \
    qx *= *sign; qy *= *sign; qz *= *sign;                                                      \
    const REAL shift = nearest ? (REAL)0.5 : (REAL)0;                                           \
    const REAL top = nearest ? (REAL)h : (REAL)(h - 1);                                         \
    REAL cx = FLOOR(qx + shift), cy = FLOOR(qy + shift), cz = FLOOR(qz + shift);                \
    cx = cx < -h ? -h : (cx > top ? top : cx);                                                  \
    cy = cy < -h ? -h : (cy > top ? top : cy);                                                  \
    cz = cz < -h ? -h : (cz > top ? top : cz);                                                  \
    *base = ((long)cz * (n + 1) + (long)cy) * nh + (long)cx + h * nh * (n + 2);                 \
    if (nearest) {                                                                              \
        w[0] = 1;                                                                               \
        return 1;                                                                               \
    }                                                                                           \
    const REAL fx = qx - cx, fy = qy - cy, fz = qz - cz;                                        \
    const REAL px[2] = {1 - fx, fx}, py[2] = {1 - fy, fy}, pz[2] = {1 - fz, fz};                \
    for (int k = 0; k < 8; ++k)                                                                 \
        w[k] = (pz[k >> 2] * py[(k >> 1) & 1]) * px[k & 1];                                     \
    return 8;                                                                                   \
}                                                                                               \
                                                                                                \
/* volume (S, C, 2) channel-last (real, imaginary) → out (B · P, C, 2) */                       \
void gather_##SUFFIX(const REAL *rotations, const REAL *freq, long points_per_image,            \
                     const REAL *volume, long channels, int nearest, long n, REAL *out,         \
                     long start, long stop)                                                     \
{                                                                                               \
    const long nh = n / 2 + 1;                                                                  \
    const long offsets[8] = {0, 1, nh, nh + 1, (n + 1) * nh, (n + 1) * nh + 1,                 \
                             (n + 1) * nh + nh, (n + 1) * nh + nh + 1};                         \
    for (long t = start; t < stop; ++t) {                                                       \
        long base; REAL w[8], sign;                                                             \
        const int corners = stencil_##SUFFIX(rotations, freq, points_per_image, nearest, n, t,  \
                                             &base, w, &sign);                                  \
        REAL *row = out + t * channels * 2;                                                     \
        for (long c = 0; c < channels; ++c) {                                                   \
            REAL re = 0, im = 0;                                                                \
            for (int k = 0; k < corners; ++k) {                                                 \
                const REAL *v = volume + ((base + offsets[k]) * channels + c) * 2;              \
                re += w[k] * v[0];                                                              \
                im += w[k] * v[1];                                                              \
            }                                                                                   \
            row[2 * c] = re;                                                                    \
            row[2 * c + 1] = im * sign;                                                         \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* values (C, B · P) real → out (C, S): weights to powers[c] (1 or 2) */                        \
void scatter_##SUFFIX(const REAL *rotations, const REAL *freq, long points_per_image,           \
                      const REAL *values, long channels, long channel_stride,                   \
                      const int *conjugate, const int *powers, int nearest, long n, REAL *out,  \
                      long out_stride, long start, long stop)                                   \
{                                                                                               \
    const long nh = n / 2 + 1;                                                                  \
    const long offsets[8] = {0, 1, nh, nh + 1, (n + 1) * nh, (n + 1) * nh + 1,                 \
                             (n + 1) * nh + nh, (n + 1) * nh + nh + 1};                         \
    for (long t = start; t < stop; ++t) {                                                       \
        long base; REAL w[8], sign;                                                             \
        const int corners = stencil_##SUFFIX(rotations, freq, points_per_image, nearest, n, t,  \
                                             &base, w, &sign);                                  \
        for (long c = 0; c < channels; ++c) {                                                   \
            REAL v = values[c * channel_stride + t];                                            \
            if (conjugate[c]) v *= sign;                                                        \
            REAL *target = out + c * out_stride + base;                                         \
            if (powers[c] == 2)                                                                 \
                for (int k = 0; k < corners; ++k) target[offsets[k]] += (w[k] * w[k]) * v;     \
            else                                                                                \
                for (int k = 0; k < corners; ++k) target[offsets[k]] += w[k] * v;               \
        }                                                                                       \
    }                                                                                           \
}

DEFINE_KERNELS(float, float, floorf)
DEFINE_KERNELS(double, double, floor)
