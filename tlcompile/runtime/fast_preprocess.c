/* The preprocessing's hot loops in C, each with the arithmetic of the numpy or Pillow code it replaces (see
 * tlcompile/runtime/fast_preprocess.py): Pillow's bilinear resize, find_field's passes over the frame and the fundus
 * checks' counts.
 *
 * The resize: Pillow's Image.resize(size, Image.BILINEAR) of a uint8 RGB square with no reducing step, the same
 * arithmetic to the last bit, vectorized. Pillow (src/libImaging/Resample.c) computes each output's filter taps in
 * double precision, rounds them to 22-bit fixed point, and resizes in two passes, horizontal then vertical, each
 * output channel an int32 sum rounded to uint8. Its horizontal pass runs over each row's pixels a few taps at a time,
 * which the compiler cannot vectorize (two thirds of its time for a 371 -> 112 px square). Here the rows are taken
 * STRIP at a time and copied transposed into a small buffer (pixel x of the strip's rows side by side, as R, G, B and
 * one spare lane), so each output of the horizontal pass is a sum over a few taps of STRIP * 4 contiguous lanes, which
 * vectorizes; the vertical pass sums whole rows. Every output is the same integer sum as Pillow's (integer addition
 * does not depend on its order).
 *
 * Compiled without fused multiply-add (-ffp-contract=off): the taps' double arithmetic rounds operation by operation,
 * as Pillow's does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)

static double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return 1.0 - x;
    return 0.0;
}

/* Pillow's precompute_coeffs (box from 0 to in_size, filter BILINEAR) and normalize_coeffs_8bpc: for each output
 * position, its first input (first[i]), its number of inputs (count[i]) and their fixed-point weights
 * (kk[i * ksize ...]). Returns ksize, 0 when out of memory. */
static int64_t coeffs(int64_t in_size, int64_t out_size, int32_t **first_out, int32_t **count_out, int32_t **kk_out) {
    const float in0 = 0.0f, in1 = (float)in_size;
    double filterscale, scale;
    filterscale = scale = (double)(in1 - in0) / (double)out_size;
    if (filterscale < 1.0) filterscale = 1.0;
    const double support = 1.0 * filterscale;
    const int64_t ksize = (int64_t)ceil(support) * 2 + 1;
    double *k = malloc(sizeof(double) * (size_t)ksize);
    int32_t *first = malloc(sizeof(int32_t) * (size_t)out_size);
    int32_t *count = malloc(sizeof(int32_t) * (size_t)out_size);
    int32_t *kk = malloc(sizeof(int32_t) * (size_t)(out_size * ksize));
    if (!k || !first || !count || !kk) {
        free(k), free(first), free(count), free(kk);
        return 0;
    }
    for (int64_t xx = 0; xx < out_size; xx++) {
        const double center = in0 + (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        double ww = 0.0;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = (int)in_size;
        xmax -= xmin;
        int x;
        for (x = 0; x < xmax; x++) {
            const double w = bilinear_filter((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++) {
            if (ww != 0.0) k[x] /= ww;
        }
        for (; x < ksize; x++) k[x] = 0;
        for (x = 0; x < ksize; x++) {
            kk[xx * ksize + x] = k[x] < 0 ? (int32_t)(-0.5 + k[x] * (1 << PRECISION_BITS))
                                          : (int32_t)(0.5 + k[x] * (1 << PRECISION_BITS));
        }
        first[xx] = xmin;
        count[xx] = xmax;
    }
    free(k);
    *first_out = first, *count_out = count, *kk_out = kk;
    return ksize;
}

static inline uint8_t clip8(int32_t in) {
    const int32_t v = in >> PRECISION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

#define STRIP 16            /* rows of the window per horizontal step */
#define LANES (STRIP * 4)   /* int32 lanes of one pixel column of a strip: R, G, B, spare */

/* The horizontal pass: temp[r][xx] (4 bytes, the fourth unused) for the rows row0 .. row0 + rows of the window. */
static int horizontal(const uint8_t *frame, int64_t h, int64_t w, int64_t top, int64_t left, int64_t win_w,
                      int64_t row0, int64_t rows, int64_t out_w, int64_t ksize, const int32_t *first,
                      const int32_t *count, const int32_t *kk, uint8_t *temp) {
    uint8_t *cols = malloc((size_t)(win_w * LANES)); /* cols[x][r][4]: pixel (strip row r, x) of the window */
    if (!cols) return -1;
    const int64_t x0 = left < 0 ? -left : 0, x1 = left + win_w > w ? w - left : win_w; /* inside the frame */
    for (int64_t r0 = 0; r0 < rows; r0 += STRIP) {
        const int64_t n = rows - r0 < STRIP ? rows - r0 : STRIP;
        memset(cols, 0, (size_t)(win_w * LANES)); /* black outside the frame, and the rows past the last */
        for (int64_t r = 0; r < n; r++) {
            const int64_t y = top + row0 + r0 + r;
            if (y < 0 || y >= h || x1 <= x0) continue; /* a row outside the frame, or no column inside it */
            const uint8_t *src = frame + (y * w + left) * 3; /* only offset by x >= x0, inside the frame */
            /* Four bytes at a time (the fourth is the next pixel's, a spare lane here), but for the frame's very last
             * pixel, whose fourth byte would be past the end. */
            const int64_t x4 = y == h - 1 && x1 == w - left ? x1 - 1 : x1;
            for (int64_t x = x0; x < x4; x++) memcpy(cols + (x * STRIP + r) * 4, src + x * 3, 4);
            for (int64_t x = x4; x < x1; x++) memcpy(cols + (x * STRIP + r) * 4, src + x * 3, 3);
        }
        for (int64_t xx = 0; xx < out_w; xx++) {
            int32_t acc[LANES];
            for (int j = 0; j < LANES; j++) acc[j] = 1 << (PRECISION_BITS - 1);
            const int32_t *k = kk + xx * ksize;
            const uint8_t *col = cols + (int64_t)first[xx] * LANES;
            for (int32_t t = 0; t < count[xx]; t++) {
                const int32_t weight = k[t];
                for (int j = 0; j < LANES; j++) acc[j] += weight * (int32_t)col[t * LANES + j];
            }
            uint8_t px[LANES]; /* rounded in one vectorized loop, then stored a pixel (4 bytes) at a time */
            for (int j = 0; j < LANES; j++) px[j] = clip8(acc[j]);
            for (int64_t r = 0; r < n; r++) memcpy(temp + ((r0 + r) * out_w + xx) * 4, px + r * 4, 4);
        }
    }
    free(cols);
    return 0;
}

/* The vertical pass: out[yy][xx][c] from temp's rows (out_w pixels of 4 bytes each). */
static int vertical(const uint8_t *temp, int64_t out_h, int64_t out_w, int64_t ksize, const int32_t *first,
                    const int32_t *count, const int32_t *kk, uint8_t *out) {
    const int64_t n = out_w * 4;
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)n);
    uint8_t *px = malloc((size_t)n);
    if (!acc || !px) {
        free(acc), free(px);
        return -1;
    }
    for (int64_t yy = 0; yy < out_h; yy++) {
        for (int64_t j = 0; j < n; j++) acc[j] = 1 << (PRECISION_BITS - 1);
        for (int32_t t = 0; t < count[yy]; t++) {
            const int32_t weight = kk[yy * ksize + t];
            const uint8_t *row = temp + (first[yy] + t) * n;
            for (int64_t j = 0; j < n; j++) acc[j] += weight * (int32_t)row[j];
        }
        for (int64_t j = 0; j < n; j++) px[j] = clip8(acc[j]);
        uint8_t *dst = out + yy * out_w * 3;
        for (int64_t xx = 0; xx < out_w; xx++) memcpy(dst + xx * 3, px + xx * 4, 3);
    }
    free(acc), free(px);
    return 0;
}

/* The window of the frame (h x w x 3, C order) whose top-left pixel is (top, left) and size win_h x win_w, parts
 * outside the frame black (crop_square's square), resized to out_h x out_w x 3 into out, as Pillow's
 * Image.fromarray(window).resize((out_w, out_h), Image.BILINEAR) when it resizes both ways, horizontally first
 * (Pillow >= 13 resizes vertically first when the height shrinks more than twice as much as the width: the caller
 * checks). Returns 0; -1 when out of memory; -2 for sizes it does not take (a side that does not change). */
int tl_resize_bilinear(const uint8_t *frame, int64_t h, int64_t w, int64_t top, int64_t left, int64_t win_h,
                       int64_t win_w, int64_t out_h, int64_t out_w, uint8_t *out) {
    if (out_w == win_w || out_h == win_h || h < 1 || w < 1 || win_h < 1 || win_w < 1 || out_h < 1 || out_w < 1)
        return -2;
    int32_t *vfirst = NULL, *vcount = NULL, *vkk = NULL, *hfirst = NULL, *hcount = NULL, *hkk = NULL;
    uint8_t *temp = NULL;
    int status = -1;
    const int64_t vksize = coeffs(win_h, out_h, &vfirst, &vcount, &vkk);
    const int64_t hksize = vksize ? coeffs(win_w, out_w, &hfirst, &hcount, &hkk) : 0;
    if (!vksize || !hksize) goto done;
    /* Only the rows of the window the vertical pass reads are resized horizontally, as Pillow does. */
    const int64_t row0 = vfirst[0], rows = vfirst[out_h - 1] + vcount[out_h - 1] - row0;
    for (int64_t i = 0; i < out_h; i++) vfirst[i] -= (int32_t)row0;
    temp = malloc((size_t)(rows * out_w * 4));
    if (!temp) goto done;
    if (horizontal(frame, h, w, top, left, win_w, row0, rows, out_w, hksize, hfirst, hcount, hkk, temp)) goto done;
    status = vertical(temp, out_h, out_w, vksize, vfirst, vcount, vkk, out);
done:
    free(vfirst), free(vcount), free(vkk), free(hfirst), free(hcount), free(hkk), free(temp);
    return status;
}

/* ------------------------------------------------------------------------------------------------ field of view */
/* find_field's first pass: the luminance max(R, G, B) of every step-th pixel of every step-th row of the frame
 * (h x w x 3, C order) into lum (hs x ws, hs = ceil(h / step), ws = ceil(w / step)), and its 256-bin histogram. */
void tl_luminance_histogram(const uint8_t *frame, int64_t h, int64_t w, int64_t step, uint8_t *lum, int64_t *hist) {
    const int64_t hs = (h + step - 1) / step, ws = (w + step - 1) / step;
    int64_t counts[4][256]; /* four tables, so that runs of one value (the black surround) do not wait on one counter */
    memset(counts, 0, sizeof(counts));
    for (int64_t ys = 0; ys < hs; ys++) {
        const uint8_t *src = frame + ys * step * w * 3;
        uint8_t *dst = lum + ys * ws;
        for (int64_t xs = 0; xs < ws; xs++) {
            const uint8_t *p = src + xs * step * 3;
            const uint8_t rg = p[0] > p[1] ? p[0] : p[1];
            dst[xs] = rg > p[2] ? rg : p[2];
        }
        int64_t xs = 0;
        for (; xs + 4 <= ws; xs += 4) {
            counts[0][dst[xs]]++, counts[1][dst[xs + 1]]++, counts[2][dst[xs + 2]]++, counts[3][dst[xs + 3]]++;
        }
        for (; xs < ws; xs++) counts[0][dst[xs]]++;
    }
    for (int v = 0; v < 256; v++) hist[v] = counts[0][v] + counts[1][v] + counts[2][v] + counts[3][v];
}

/* find_field's second pass over the luminance (hs x ws): the field is lum > cut. For every row, how many field pixels
 * it has, and the first and last of them (-1 where none); the same for every column. Branch-free over each row, so
 * the column updates vectorize. */
void tl_field_lines(const uint8_t *lum, int64_t hs, int64_t ws, int64_t cut, int32_t *row_count, int32_t *row_first,
                    int32_t *row_last, int32_t *col_count, int32_t *col_first, int32_t *col_last) {
    for (int64_t x = 0; x < ws; x++) col_count[x] = 0, col_first[x] = -1, col_last[x] = -1;
    for (int64_t y = 0; y < hs; y++) {
        const uint8_t *row = lum + y * ws;
        const int32_t yy = (int32_t)y;
        int32_t count = 0;
        for (int64_t x = 0; x < ws; x++) {
            const int32_t m = row[x] > cut;
            count += m;
            col_count[x] += m;
            col_first[x] = m && col_first[x] < 0 ? yy : col_first[x];
            col_last[x] = m ? yy : col_last[x];
        }
        int64_t first = 0, last = ws - 1;
        if (count) {
            while (row[first] <= cut) first++;
            while (row[last] <= cut) last--;
        }
        row_count[y] = count, row_first[y] = count ? (int32_t)first : -1, row_last[y] = count ? (int32_t)last : -1;
    }
}

/* ---------------------------------------------------------------------------------------------- fundus checks */
/* damage_reason's count over the grid of every step-th pixel (hs x ws, as find_field's): the pixels (y < hs - period,
 * x < ws - period) equal in all three channels to the pixels period to their right and period below, with
 * max(R, G, B) >= min_bright. */
int64_t tl_repeated(const uint8_t *frame, int64_t h, int64_t w, int64_t step, int64_t period, int64_t min_bright) {
    const int64_t hs = (h + step - 1) / step, ws = (w + step - 1) / step;
    const int64_t row = w * 3 * step, right = period * step * 3, down = period * row;
    int64_t count = 0;
    for (int64_t y = 0; y < hs - period; y++) {
        const uint8_t *p = frame + y * row;
        int64_t n = 0;
        for (int64_t x = 0; x < ws - period; x++, p += step * 3) {
            const int same = p[0] == p[right] && p[1] == p[right + 1] && p[2] == p[right + 2] && p[0] == p[down] &&
                             p[1] == p[down + 1] && p[2] == p[down + 2];
            const uint8_t rg = p[0] > p[1] ? p[0] : p[1], lum = rg > p[2] ? rg : p[2];
            n += same && lum >= min_bright;
        }
        count += n;
    }
    return count;
}

/* Which side of the circle of radius r around (cx, cy) the grid pixel at (dx, dy) from the centre is on, as
 * screen._within decides: from the squared distance where a relative 1e-9 cannot change the answer, else from
 * hypot (the C library's, which numpy's np.hypot calls too). */
static int within(double d2, double dx, double dy, double r, int inner) {
    const double r2 = r * r, low = r2 * (1 - 1e-9), high = r2 * (1 + 1e-9);
    if (d2 > low && d2 < high) return inner ? hypot(dx, dy) <= r : hypot(dx, dy) >= r;
    return inner ? d2 <= low : d2 >= high;
}

/* not_fundus_reason's statistics over the grid: the pixels within r_in of the field's centre (cx, cy) and those at
 * least r_out from it (distances as numpy computes them: dx = x * step - cx, dy = y * step - cy,
 * d2 = dy * dy + dx * dx); their counts (counts[0] inside, counts[1] outside), the 256-bin histograms of max(R, G, B)
 * inside and outside, and the sums of R, G and B inside. */
void tl_field_statistics(const uint8_t *frame, int64_t h, int64_t w, int64_t step, double cx, double cy, double r_in,
                         double r_out, int64_t *counts, int64_t *lum_inside, int64_t *lum_outside, int64_t *sums) {
    const int64_t hs = (h + step - 1) / step, ws = (w + step - 1) / step;
    /* Four tables each, by column modulo 4, so that runs of one value (the black surround) do not wait on one
     * counter; summed at the end. */
    int64_t in_tables[4][256], out_tables[4][256], n_in = 0, n_out = 0, r = 0, g = 0, b = 0;
    memset(in_tables, 0, sizeof(in_tables));
    memset(out_tables, 0, sizeof(out_tables));
    for (int64_t y = 0; y < hs; y++) {
        const double dy = (double)(y * step) - cy;
        const uint8_t *p = frame + y * step * w * 3;
        for (int64_t x = 0; x < ws; x++, p += step * 3) {
            const double dx = (double)(x * step) - cx;
            const double d2 = dy * dy + dx * dx;
            const uint8_t rg = p[0] > p[1] ? p[0] : p[1], lum = rg > p[2] ? rg : p[2];
            if (within(d2, dx, dy, r_in, 1)) {
                n_in++, in_tables[x & 3][lum]++;
                r += p[0], g += p[1], b += p[2];
            }
            if (within(d2, dx, dy, r_out, 0)) n_out++, out_tables[x & 3][lum]++;
        }
    }
    for (int v = 0; v < 256; v++) {
        lum_inside[v] = in_tables[0][v] + in_tables[1][v] + in_tables[2][v] + in_tables[3][v];
        lum_outside[v] = out_tables[0][v] + out_tables[1][v] + out_tables[2][v] + out_tables[3][v];
    }
    counts[0] = n_in, counts[1] = n_out, sums[0] = r, sums[1] = g, sums[2] = b;
}
