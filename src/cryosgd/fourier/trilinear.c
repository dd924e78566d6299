/* Back-projection of central slices into a centred half-grid: the CPU kernel of
 * cryosgd.fourier.slice.insert_many, compiled at first use by cryosgd.fourier.native.
 *
 * The arithmetic is that of slice.py's _insert_corners, point by point: the slice point
 * q = Aᵀ (kx, ky, 0), read at −q where qx < 0 (the channels marked `conjugate` change
 * sign there), its lowest stencil corner on the centred grid (n + 1, n + 1, n/2 + 1),
 * clamped as _base_corner clamps it, and each channel added to the 8 trilinear corners
 * with the weight to its power (1 or 2; the nearest voxel with weight 1). One pass, no
 * temporaries; each call adds the points [start, stop) into its own `out`, so that
 * threads never share an accumulator.
 */
#include <math.h>

#define DEFINE_SCATTER(NAME, REAL, FLOOR)                                                       \
void NAME(const REAL *rotations, const REAL *freq, long points_per_image, const REAL *values,   \
          long channels, long channel_stride, const int *conjugate, const int *powers,          \
          int nearest, long n, REAL *out, long out_stride, long start, long stop)               \
{                                                                                               \
    const long h = n / 2, nh = n / 2 + 1;                                                       \
    const long origin = h * nh * (n + 2);                                                       \
    const long offsets[8] = {0, 1, nh, nh + 1, (n + 1) * nh, (n + 1) * nh + 1,                 \
                             (n + 1) * nh + nh, (n + 1) * nh + nh + 1};                         \
    for (long t = start; t < stop; ++t) {                                                       \
        const long b = t / points_per_image, p = t % points_per_image;                          \
        const REAL *a = rotations + 9 * b;                                                      \
        const REAL kx = freq[2 * p], ky = freq[2 * p + 1];                                      \
        REAL qx = kx * a[0] + ky * a[3], qy = kx * a[1] + ky * a[4], qz = kx * a[2] + ky * a[5]; \
        const REAL sign = qx < 0 ? (REAL)-1 : (REAL)1;                                          \
        qx *= sign; qy *= sign; qz *= sign;                                                     \
        const REAL shift = nearest ? (REAL)0.5 : (REAL)0;                                       \
        const REAL top = nearest ? (REAL)h : (REAL)(h - 1);                                     \
        REAL cx = FLOOR(qx + shift), cy = FLOOR(qy + shift), cz = FLOOR(qz + shift);            \
        cx = cx < -h ? -h : (cx > top ? top : cx);                                              \
        cy = cy < -h ? -h : (cy > top ? top : cy);                                              \
        cz = cz < -h ? -h : (cz > top ? top : cz);                                              \
        const long base = ((long)cz * (n + 1) + (long)cy) * nh + (long)cx + origin;             \
        REAL w[8];                                                                              \
        int corners = 1;                                                                        \
        if (nearest) {                                                                          \
            w[0] = 1;                                                                           \
        } else {                                                                                \
            const REAL fx = qx - cx, fy = qy - cy, fz = qz - cz;                                \
            const REAL px[2] = {1 - fx, fx}, py[2] = {1 - fy, fy}, pz[2] = {1 - fz, fz};        \
            for (int k = 0; k < 8; ++k)                                                         \
                w[k] = (pz[k >> 2] * py[(k >> 1) & 1]) * px[k & 1];                             \
            corners = 8;                                                                        \
        }                                                                                       \
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

DEFINE_SCATTER(scatter_float, float, floorf)
DEFINE_SCATTER(scatter_double, double, floor)
