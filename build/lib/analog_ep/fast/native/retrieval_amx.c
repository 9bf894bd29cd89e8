/* The fast path's Hopfield retrieval over one group of distinct keys (analog_ep/fast/retrieval.py), scores,
 * softmax and values in one AMX bf16 pass per block of 32 query rows.
 *
 * Why: the retrieval is many small products (SNLI: 1,024 rows of 25 x 300 by 300 x 25 each a step), where
 * torch's batched matmul and a separate softmax kernel each make a pass over memory, and every projection
 * that reads the same sentence reads its keys again. Here a block's scores (fp32), weights (bf16) and values
 * never leave the cache. Its softmax is the torch kernels' math, per row (retrieval.py's _attention_eager and
 * _delta_attention_eager).
 *
 * Per group row r (n of them): queries q (lq x d, bf16), keys as two AMX "VNNI" layouts packed once per batch
 * (seqep_pack_keys) for each distinct key set ("slot": SNLI's four projections read two key sets per sample,
 * the nudged phases' +-beta copies the same ones again), U keys padded to up (a multiple of 32) and d to dp
 * (a multiple of 32), zero there:
 *   kt: gamma K^T, [dp/2][up][2]  (B operand of the scores: pairs of d, then keys)
 *   kv: K,         [up/2][dp][2]  (B operand of the values: pairs of keys, then d)
 * Free phase:   w = softmax(cst + (q kt) * scale), U entries per row (cst fp32, -inf on padded keys).
 * Nudged phase: w = softmax(S* + dS) - softmax(S*) from A* = base and dS = (q kt) * scale, without
 *   cancellation: (A* / z*) expm1(dS - log(z / z*)), z* = sum A*, z = sum A* exp(dS) (both clamped at 1e-30).
 * Then out = w K (lq x d, bf16) and, if asked, w itself (weights_out, lq x U, bf16). A free row of only -inf
 * (no key) or with a NaN is NaN, as torch's softmax gives, or zeros if has_empty (as nan_to_num(0) gives).
 * block_absmax (if not NULL): max |out| of each row's blocks of 32 queries (n x ceil(lq / 32)), which the next
 * step's int8 product needs to quantise this state (amx_int8.PackedInt8.down_up): a pass over it saved.
 * Rows past n_base are copies of rows r % n_base (the stacked +-beta batch): key slot, cst and base are read
 * there. Rows are taken in `order` (sorted by slot), so a slot's keys are read from memory once per step and
 * from cache for the rows that share them. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "common.h"

#define ROWS 32 /* query rows per block: two tiles */

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store_bf16(uint16_t *p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* exp(x), x <= 88: x = k ln2 + r, |r| <= ln2/2, Taylor to r^7 (relative error < 6e-9), times 2^k by
 * scalef (0 below the fp32 range; -inf gives exactly 0, NaN gives NaN). */
static inline __m512 exp16(__m512 x) {
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x); /* ln2 split in two */
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-1e30f), _CMP_NLE_UQ); /* NaN stays NaN */
    return _mm512_maskz_scalef_ps(keep, p, k);
}

/* expm1(x), accurate relative to itself near 0: Taylor to x^9 for |x| < 0.5 (relative error < 3e-10),
 * exp(x) - 1 elsewhere (no cancellation there: |expm1(x)| > 0.39). */
static inline __m512 expm1_16(__m512 x) {
    __m512 p = _mm512_set1_ps(1.f / 362880.f);
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.f / 40320.f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.f / 5040.f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(0.5f));
    p = _mm512_mul_ps(_mm512_fmadd_ps(p, x, _mm512_set1_ps(1.f)), x);
    const __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(0.5f), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(small, _mm512_sub_ps(exp16(x), _mm512_set1_ps(1.f)), p);
}

/* one free-phase weight row: softmax over the first u of x = raw * s + c (raw: the row's fp32 scores, reused as
 * scratch), zeros up to up. Each exponential is taken once and kept in x. */
static void softmax_row(float *x, const float *c, float s, int64_t u, int64_t up, int has_empty, uint16_t *w) {
    const __m512 vs = _mm512_set1_ps(s);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t j = 0; j < u; j += 16) {
        const __mmask16 m = lanes_left(u - j);
        const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), vs, _mm512_maskz_loadu_ps(m, c + j));
        _mm512_storeu_ps(x + j, v);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
        nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    }
    const float top = _mm512_reduce_max_ps(vmax);
    if (nan || !(top > -INFINITY)) {
        const __m512 fill = has_empty ? _mm512_setzero_ps() : _mm512_set1_ps(NAN);
        for (int64_t j = 0; j < up; j += 16) store_bf16(w + j, j < u ? fill : _mm512_setzero_ps(), 0xffff);
        return;
    }
    const __m512 vtop = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < u; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(lanes_left(u - j), exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), vtop)));
        _mm512_storeu_ps(x + j, e);
        total = _mm512_add_ps(total, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    for (int64_t j = 0; j < up; j += 16)
        store_bf16(w + j, j < u ? _mm512_mul_ps(_mm512_loadu_ps(x + j), inv) : _mm512_setzero_ps(), 0xffff);
}

/* one nudged-phase weight row from A* (a, u entries, bf16) and dS = raw * s (raw: the row's fp32 scores, reused
 * as scratch for dS); zeros up to up */
static void delta_row(const uint16_t *a, float *ds, float s, int64_t u, int64_t up, uint16_t *w) {
    const __m512 vs = _mm512_set1_ps(s);
    __m512 za = _mm512_setzero_ps(), ze = _mm512_setzero_ps();
    for (int64_t j = 0; j < u; j += 16) {
        const __mmask16 m = lanes_left(u - j);
        const __m512 av = load_bf16(a + j, m), v = _mm512_mul_ps(_mm512_loadu_ps(ds + j), vs);
        _mm512_storeu_ps(ds + j, v);
        za = _mm512_add_ps(za, av);
        ze = _mm512_add_ps(ze, _mm512_maskz_mul_ps(m, exp16(v), av));
    }
    float z_star = _mm512_reduce_add_ps(za), z = _mm512_reduce_add_ps(ze);
    z_star = z_star > 1e-30f ? z_star : 1e-30f;
    z = z > 1e-30f ? z : 1e-30f;
    const __m512 log_ratio = _mm512_set1_ps(logf(z / z_star)), inv = _mm512_set1_ps(1.f / z_star);
    for (int64_t j = 0; j < up; j += 16) {
        const __mmask16 m = lanes_left(u - j);
        const __m512 e = expm1_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, ds + j), log_ratio));
        store_bf16(w + j, _mm512_maskz_mul_ps(m, _mm512_mul_ps(e, load_bf16(a + j, m)), inv), 0xffff);
    }
}

/* kt and kv of n rows of keys (u x d, bf16) and gamma K^T (d x u, bf16, as the torch path rounds it) */
void seqep_pack_keys(const uint16_t *keys, const uint16_t *keys_t, int64_t n, int64_t u, int64_t d, int64_t up,
                     int64_t dp, uint16_t *kt, uint16_t *kv, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const uint16_t *k = keys + r * u * d, *t = keys_t + r * d * u;
        uint16_t *a = kt + r * dp * up, *b = kv + r * up * dp;
        for (int64_t i = 0; i < dp; ++i)
            for (int64_t j = 0; j < up; ++j) a[((i / 2) * up + j) * 2 + i % 2] = (i < d && j < u) ? t[i * u + j] : 0;
        for (int64_t j = 0; j < up; ++j)
            for (int64_t i = 0; i < dp; ++i) b[((j / 2) * dp + i) * 2 + j % 2] = (i < d && j < u) ? k[j * d + i] : 0;
    }
}

/* n bf16 values from src to dst, the whole 64-byte lines of dst by streaming stores: the output is far larger
 * than the cache, and a plain store would first read each line from memory. */
static inline void stream_out(const uint16_t *src, int64_t n, uint16_t *dst) {
    int64_t head = (int64_t)((64 - ((uintptr_t)dst & 63)) & 63) / 2;
    if (((uintptr_t)dst & 1) || head > n) head = n; /* odd address (never, for torch's tensors) or tiny: plain */
    for (int64_t j = 0; j < head; j += 32) {
        const int64_t k = head - j < 32 ? head - j : 32;
        _mm512_mask_storeu_epi16(dst + j, (__mmask32)((k >= 32 ? ~0ull : (1ull << k) - 1)), _mm512_loadu_si512(src + j));
    }
    int64_t j = head;
    for (; j + 32 <= n; j += 32) _mm512_stream_si512((__m512i *)(dst + j), _mm512_loadu_si512(src + j));
    if (j < n) _mm512_mask_storeu_epi16(dst + j, (__mmask32)((1ull << (n - j)) - 1), _mm512_loadu_si512(src + j));
}

static inline float round_bf16(float v) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_set1_ps(v));
    return _mm512_cvtss_f32(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}

/* where block m0 of row r reports: rows in order, then blocks */
static inline int64_t task_of_row(int64_t r, int64_t m0, int64_t lq) { return r * ((lq + ROWS - 1) / ROWS) + m0 / ROWS; }

/* C tiles 0-3 (rows 0-15 / 16-31 by columns c .. c+15 / c+16 .. c+31) into a fp32 block with ld floats a row */
static inline void store_quad(float *block, int64_t ld, int64_t c) {
    _tile_stored(0, block + c, ld * 4);
    _tile_stored(1, block + 16 * ld + c, ld * 4);
    _tile_stored(2, block + c + 16, ld * 4);
    _tile_stored(3, block + 16 * ld + c + 16, ld * 4);
}

void seqep_retrieve(const uint16_t *q, const uint16_t *kt, const uint16_t *kv, const int64_t *slot,
                    const int64_t *order, const float *cst, const uint16_t *base, const float *scale, int64_t n,
                    int64_t n_base, int64_t lq, int64_t d, int64_t u, int64_t up, int64_t dp, int has_empty,
                    uint16_t *weights_out, uint16_t *out, float *block_absmax, int threads) {
#pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        /* per thread: the block's queries (zero-padded), scores, weights and values */
        uint16_t *qb = aligned_alloc(64, (size_t)(ROWS * dp * 2));
        float *sb = aligned_alloc(64, (size_t)(ROWS * up * 4));
        uint16_t *wb = aligned_alloc(64, (size_t)(ROWS * up * 2));
        float *vb = aligned_alloc(64, (size_t)(ROWS * 32 * 4));
        uint16_t *ob = aligned_alloc(64, (size_t)(ROWS * dp * 2));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < n * ((lq + ROWS - 1) / ROWS); ++task) {
            const int64_t r = order[task / ((lq + ROWS - 1) / ROWS)], m0 = (task % ((lq + ROWS - 1) / ROWS)) * ROWS;
            const int64_t rows = lq - m0 < ROWS ? lq - m0 : ROWS, rb = r % n_base;
            const uint16_t *kt_r = kt + slot[rb] * dp * up, *kv_r = kv + slot[rb] * up * dp;
            /* queries: whole 32-column steps straight from q (rows past the block read the next row's queries,
             * whose scores are dropped), the last partial step from a zero-padded copy; the whole block copied
             * where its tiles would read past the end of q */
            const uint16_t *qr = q + (r * lq + m0) * d;
            const int direct = (r * lq + m0 + ROWS) * d <= n * lq * d;
            const int64_t whole = direct ? d / 32 * 32 : 0;
            for (int64_t i = 0; i < ROWS; ++i) {
                uint16_t *o = qb + i * dp;
                const int64_t from = whole, count = i < rows ? d - from : 0;
                memcpy(o + from, qr + i * d + from, (size_t)(count * 2));
                memset(o + from + count, 0, (size_t)((dp - from - count) * 2));
            }
            for (int64_t c = 0; c < up; c += 32) { /* scores: (32 x dp) . (dp x 32) per column pair */
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t k = 0; k < dp; k += 32) {
                    const uint16_t *a = k < whole ? qr + k : qb + k;
                    const int64_t lda = (k < whole ? d : dp) * 2;
                    _tile_loadd(4, a, lda);
                    _tile_loadd(5, a + 16 * lda / 2, lda);
                    _tile_loadd(6, kt_r + ((k / 2) * up + c) * 2, up * 4);
                    _tile_loadd(7, kt_r + ((k / 2) * up + c + 16) * 2, up * 4);
                    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 5, 6);
                    _tile_dpbf16ps(2, 4, 7); _tile_dpbf16ps(3, 5, 7);
                }
                store_quad(sb, up, c);
            }
            const float s = scale ? scale[r] : 1.f;
            for (int64_t i = 0; i < ROWS; ++i) {
                uint16_t *w = wb + i * up;
                float *x = sb + i * up;
                if (i >= rows) {
                    memset(w, 0, (size_t)(up * 2));
                    continue;
                }
                const int64_t row = r * lq + m0 + i, key_row = rb * lq + m0 + i;
                if (base)
                    delta_row(base + key_row * u, x, s, u, up, w);
                else
                    softmax_row(x, cst + key_row * u, s, u, up, has_empty, w);
                if (weights_out) memcpy(weights_out + row * u, w, (size_t)(u * 2));
            }
            if (!out) continue;
            /* values, 32 columns at a time: each (32 x up) . (up x 32) product is turned into bf16 rows of the
             * block while its 4 KB are in L1 (a whole fp32 block, 40 KB at d = 300, spilled the cache) */
            __m512 vmax = _mm512_setzero_ps();
            for (int64_t c = 0; c < dp; c += 32) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t k = 0; k < up; k += 32) {
                    _tile_loadd(4, wb + k, up * 2);
                    _tile_loadd(5, wb + 16 * up + k, up * 2);
                    _tile_loadd(6, kv_r + ((k / 2) * dp + c) * 2, dp * 4);
                    _tile_loadd(7, kv_r + ((k / 2) * dp + c + 16) * 2, dp * 4);
                    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 5, 6);
                    _tile_dpbf16ps(2, 4, 7); _tile_dpbf16ps(3, 5, 7);
                }
                store_quad(vb, 32, 0);
                const __mmask16 m0_ = lanes_left(d - c), m1_ = lanes_left(d - c - 16);
                for (int64_t i = 0; i < rows; ++i) { /* the block's rows, packed as they lie in out */
                    const __m512 v0 = _mm512_load_ps(vb + i * 32), v1 = _mm512_load_ps(vb + i * 32 + 16);
                    store_bf16(ob + i * d + c, v0, m0_);
                    store_bf16(ob + i * d + c + 16, v1, m1_);
                    vmax = _mm512_mask_max_ps(vmax, m0_, vmax, _mm512_abs_ps(v0));
                    vmax = _mm512_mask_max_ps(vmax, m1_, vmax, _mm512_abs_ps(v1));
                }
            }
            stream_out(ob, rows * d, out + (r * lq + m0) * d);
            if (block_absmax) /* max |out| of the block, as bf16 rounds it (rounding keeps the order) */
                block_absmax[task_of_row(r, m0, lq)] = round_bf16(_mm512_reduce_max_ps(vmax));
        }
        _mm_sfence();
        free(qb); free(sb); free(wb); free(vb); free(ob);
        _tile_release();
    }
}
