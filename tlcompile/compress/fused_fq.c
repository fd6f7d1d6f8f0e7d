/* NNCF's fake quantization (forward and backward) for float32 CPU tensors, each in one pass over the tensor.
 *
 * NNCF's own CPU "kernel" (nncf/torch/extensions/src/quantization/cpu/functions_cpu.cpp) composes ATen operations:
 * its backward recomputes the forward (7 passes) and then makes about 10 more passes and temporaries (gt, lt, sub,
 * mul_, masked_fill_ x3, mul_, clone, sum_like). Here every element is read once per call, in loops the compiler
 * vectorizes.
 *
 * Same arithmetic, in the same order, with the same float32 operations (built with -ffp-contract=off, so no fused
 * multiply-add changes a rounding): the forward output and the input gradient are bit-identical to NNCF's; the range
 * and low gradients are the same float32 products summed in another order (in double: per lane, per block of
 * elements, then the blocks in order, so the result does not depend on the number of threads).
 *
 * The per-channel values (low, high = low + range, s = (levels - 1) / range, zp = round(-low * s), rr = 1 / range)
 * are computed by the caller with the ATen operations NNCF uses. The input is viewed as runs of `inner` elements,
 * run r belonging to channel r % channels (channels = 1, inner = n: one scale for the tensor). Plain C, no torch
 * headers: it compiles in about a second (tlcompile/compress/fused_fq.py).
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 16384 /* elements per task; partial sums are kept per block */
#define LANES 8     /* independent partial sums within a run */
#define CHUNK 256   /* elements computed before their products are summed (a multiple of LANES) */
/* A tensor of one block (a batch-1 inference's activations) stays on the calling thread: no fork and join per call. */

static inline float fake_quantize(float x, float low, float high, float s, float zp) {
    float v = x > high ? high : x; /* at::min (x stays when NaN) */
    v = v < low ? low : v;         /* at::max */
    v -= low;
    v *= s;
    v -= zp;
    v = nearbyintf(v); /* round half to even, as at::round */
    return v / s;
}

/* c ? a : b with integer masks: GCC does not vectorize the gradient loop with the plain conditional. */
static inline float pick(int c, float a, float b) {
    uint32_t ua, ub, mask = 0u - (uint32_t)(c != 0), u;
    float out;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    u = (ua & mask) | (ub & ~mask);
    memcpy(&out, &u, sizeof out);
    return out;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Elements per block: the caller sizes the backward's scratch (a partial sum per block and channel) with it. */
int64_t tl_fq_block(void) { return BLOCK; }

void tl_fq_forward(const float *restrict x, float *restrict y, int64_t n, int64_t channels, int64_t inner,
                   const float *low, const float *high, const float *s, const float *zp, int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (blocks > 1)
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t end = min64(n, (block + 1) * BLOCK);
        for (int64_t a = block * BLOCK; a < end;) {
            const int64_t run = a / inner, b = min64(end, (run + 1) * inner), c = run % channels;
            const float lo = low[c], hi = high[c], sc = s[c], z = zp[c];
            for (int64_t i = a; i < b; ++i) y[i] = fake_quantize(x[i], lo, hi, sc, z);
            a = b;
        }
    }
}

/* range_sums, low_sums (low_sums may be NULL: symmetric): blocks * channels doubles of scratch, zeroed by the
 * caller; grad_range, grad_low (or NULL): channels floats, the results. */
void tl_fq_backward(const float *restrict g, const float *restrict x, float *restrict gi, int64_t n,
                    int64_t channels, int64_t inner, const float *low, const float *high, const float *s,
                    const float *zp, const float *rr, float alpha, double *range_sums, double *low_sums,
                    float *grad_range, float *grad_low, int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (blocks > 1)
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t end = min64(n, (block + 1) * BLOCK);
        double *rs = range_sums + block * channels, *ls = low_sums ? low_sums + block * channels : 0;
        float range_part[CHUNK], low_part[CHUNK];
        for (int64_t a = block * BLOCK; a < end;) {
            const int64_t run = a / inner, b = min64(end, (run + 1) * inner), c = run % channels;
            const float lo = low[c], hi = high[c], sc = s[c], z = zp[c], r = rr[c];
            /* Element i's product goes to lane (i - a) % LANES: the lanes add independently, in a fixed order. */
            double range_sum[LANES] = {0}, low_sum[LANES] = {0};
            for (int64_t start = a; start < b; start += CHUNK) {
                const int64_t count = min64(CHUNK, b - start);
                const float *restrict xs = x + start, *restrict gs = g + start;
                float *restrict out = gi + start;
                int64_t j;
                /* Two loops, each simple enough to vectorize: the forward, then the gradients. */
                for (j = 0; j < count; ++j) range_part[j] = fake_quantize(xs[j], lo, hi, sc, z);
                for (j = 0; j < count; ++j) {
                    const float xi = xs[j], gv = gs[j];
                    const int above = xi > hi, below = xi < lo; /* mask_hi, mask_lo */
                    float err = (range_part[j] - xi) * r;
                    err = pick(above, 1.0f, err);
                    err = pick(below, alpha, err);
                    range_part[j] = err * gv;
                    out[j] = pick(above | below, 0.0f, gv); /* masked_fill_(outside, 0) */
                    low_part[j] = pick(above | below, gv, 0.0f);
                }
                for (j = 0; j + LANES <= count; j += LANES) {
                    for (int lane = 0; lane < LANES; ++lane) {
                        range_sum[lane] += (double)range_part[j + lane];
                        low_sum[lane] += (double)low_part[j + lane];
                    }
                }
                for (int lane = 0; j < count; ++j, ++lane) { /* a run's last chunk only: CHUNK % LANES == 0 */
                    range_sum[lane] += (double)range_part[j];
                    low_sum[lane] += (double)low_part[j];
                }
            }
            for (int lane = 0; lane < LANES; ++lane) {
                rs[c] += range_sum[lane];
                if (ls) ls[c] += low_sum[lane];
            }
            a = b;
        }
    }
    for (int64_t c = 0; c < channels; ++c) {
        double range_total = 0.0, low_total = 0.0;
        for (int64_t block = 0; block < blocks; ++block) {
            range_total += range_sums[block * channels + c];
            if (low_sums) low_total += low_sums[block * channels + c];
        }
        grad_range[c] = (float)range_total;
        if (grad_low) grad_low[c] = (float)low_total;
    }
}
