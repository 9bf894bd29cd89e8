/* int8 products that follow a state's changes (AVX2): a relaxation step's products computed from the codes that
 * changed since the last step, not from the whole state.
 *
 * Why: a relaxing network settles unit by unit and sample by sample, and once its int8 codes stop changing the
 * dense products of the large synapse recompute the same integer sums step after step (at the IMDB paper shape
 * most of a batch's rows change no code, or a handful, in most free and nudged steps). Integer sums can be
 * updated exactly: with a row's scale kept, acc = Σ q·w changes by Σ (q_new − q_old)·w over the changed codes
 * only, and the result is the dense product of the new codes, bit for bit (int32 arithmetic is exact, and wraps
 * alike either way).
 *
 * Per row, one pass (`seqep_quantize_delta_avx2`) decides: the row keeps its scale r while max|x| stays within
 * [127 r / widen, 127 r] (codes at most log2(widen) bits coarser than a fresh scale's), else takes r = max|x| / 127
 * and is recomputed whole; kept rows list their changed groups of 4 codes (old and new) unless there are more
 * than `max_changes`, and then are recomputed whole too. With a dead band (`band` > 0) a kept row's code changes only
 * where the value left it by more than 0.5 + band steps: codes then hold still where values hover about a
 * rounding boundary (quantised synchronous dynamics settle into such two-step cycles), at an error of at most
 * 0.5 + band steps instead of 0.5. Layouts: those of int8_avx2.c (strip j of a layout holds
 * `groups` groups of 4 inputs x 16 outputs, 64 bytes each); acc rows hold the int32 sums of all `strips` x 16
 * outputs, `acc_ld` apart.
 */
#include "int8_avx2.h"

/* 32 floats against their previous codes `old` (int8), with a dead band: a code moves to round(x·inv) only where
 * x·inv is more than 0.5 + band from it, so values that hover about a rounding boundary do not flip it back
 * and forth (band 0: plain rounding, the codes of `codes32`). */
static inline __m256i codes32_banded(const float *x, __m256 inv, const int8_t *old, float band) {
    const __m256 limit = _mm256_set1_ps(0.5f + band), sign = _mm256_set1_ps(-0.0f);
    __m256i part[4];
    for (int k = 0; k < 4; ++k) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), inv);
        const __m256i before = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(old + 8 * k)));
        const __m256 away = _mm256_andnot_ps(sign, _mm256_sub_ps(v, _mm256_cvtepi32_ps(before)));
        const __m256 move = _mm256_cmp_ps(away, limit, _CMP_GT_OQ);
        part[k] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(before),
                                                       _mm256_castsi256_ps(_mm256_cvtps_epi32(v)), move));
    }
    const __m256i abcd = _mm256_packs_epi16(_mm256_packs_epi32(part[0], part[1]), _mm256_packs_epi32(part[2], part[3]));
    return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Rows of x (m x n fp32, `ld` floats apart) against their previous codes q (m x width int8, zero-padded; updated
 * to the new codes) and scales r (in/out; r <= 0: no codes but zeros, and zero sums). status[i]: 0 no code changed,
 * 1 changed groups listed (changed/old_codes/new_codes rows of `max_changes`, count[i] of them), 2 recompute the
 * row whole, 3 the row became zero (its sums are zero: nothing to multiply). */
void seqep_quantize_delta_avx2(const float *x, int64_t m, int64_t n, int64_t ld, int8_t *q, int64_t width, float *r,
                               float widen, float band, int64_t max_changes, int32_t *status, int32_t *changed,
                               int32_t *old_codes, int32_t *new_codes, int32_t *count, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < m; ++i) {
        const float *xi = x + i * ld;
        int8_t *qi = q + i * width;
        const float amax = row_absmax(xi, n);
        count[i] = 0;
        if (amax == 0.0f) { /* a zero row (a state not yet moved, a difference still zero): zero codes, no scale */
            status[i] = r[i] > 0.0f ? 3 : 0; /* r <= 0: its codes and sums are zero already */
            memset(qi, 0, (size_t)width);
            r[i] = 0.0f;
            continue;
        }
        const float t = r[i] > 0.0f ? amax * (1.0f / r[i]) : 0.0f; /* the largest code, before rounding */
        const int keep = r[i] > 0.0f && t <= 127.25f && t * widen >= 127.0f;
        if (!keep)
            r[i] = amax / 127.0f;
        const float inv = 1.0f / r[i];
        const __m256 vinv = _mm256_set1_ps(inv);
        int64_t found = 0;
        int32_t *ch = changed + i * max_changes, *oc = old_codes + i * max_changes, *nc = new_codes + i * max_changes;
        for (int64_t j = 0; j < width; j += 32) {
            const int64_t bytes = width - j < 32 ? width - j : 32; /* width is a multiple of 16 */
            int8_t before[32] = {0};
            if (keep)
                memcpy(before, qi + j, (size_t)bytes);
            __m256i fresh;
            if (j + 32 <= n) {
                fresh = keep && band > 0.0f ? codes32_banded(xi + j, vinv, before, band) : codes32(xi + j, vinv);
            } else { /* the tail: codes up to n, zeros to the padded width */
                int8_t tail[32];
                for (int64_t c = 0; c < 32; ++c) {
                    const float v = j + c < n ? xi[j + c] * inv : 0.0f;
                    const int moves = !keep || fabsf(v - (float)before[c]) > 0.5f + band;
                    tail[c] = moves ? (int8_t)lrintf(v) : before[c];
                }
                fresh = _mm256_loadu_si256((const __m256i *)tail);
            }
            if (keep) {
                const __m256i old = _mm256_loadu_si256((const __m256i *)before);
                unsigned same = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(fresh, old)));
                unsigned diff = ~same & ((1u << (bytes / 4)) - 1u);
                while (diff) {
                    const int b = __builtin_ctz(diff);
                    diff &= diff - 1;
                    if (found < max_changes) {
                        ch[found] = (int32_t)(j / 4 + b);
                        memcpy(&oc[found], before + 4 * b, 4);
                        int8_t now[32];
                        _mm256_storeu_si256((__m256i *)now, fresh);
                        memcpy(&nc[found], now + 4 * b, 4);
                    }
                    ++found;
                }
            }
            int8_t now[32];
            _mm256_storeu_si256((__m256i *)now, fresh);
            memcpy(qi + j, now, (size_t)bytes);
        }
        status[i] = !keep || found > max_changes ? 2 : found > 0;
        count[i] = (int32_t)(found > max_changes ? 0 : found);
    }
}

/* acc rows `rows[0..nrows)` = the whole products q[rows] · W (q: m x width codes, width = 4 · groups). */
void seqep_int8_rows_avx2(const int8_t *q, int64_t width, const int64_t *rows, int64_t nrows, const int8_t *layout,
                          int64_t strips, int64_t groups, int32_t *acc, int64_t acc_ld, int threads) {
    const int64_t padded = (nrows + ROWS - 1) / ROWS * ROWS;
    int8_t *a = (int8_t *)_mm_malloc((size_t)(padded * width), 64); /* the rows, gathered and zero-padded */
    for (int64_t i = 0; i < padded; ++i) {
        if (i < nrows)
            memcpy(a + i * width, q + rows[i] * width, (size_t)width);
        else
            memset(a + i * width, 0, (size_t)width);
    }
#pragma omp parallel num_threads(threads)
    {
        int32_t *part = (int32_t *)_mm_malloc((size_t)padded * STRIP * sizeof(int32_t), 64);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < strips; ++j) {
            strip_sums(a, padded, width, layout + j * groups * 64, groups, part);
            for (int64_t i = 0; i < nrows; ++i)
                memcpy(acc + rows[i] * acc_ld + j * STRIP, part + i * STRIP, STRIP * sizeof(int32_t));
        }
        _mm_free(part);
    }
    _mm_free(a);
}

/* One group's term of 16 outputs: Σ_k a[k] · B[c][k] as two ymm of int32 (a = 4 codes as one dword). */
static inline void group_term(int32_t word, const int8_t *B, __m256i *lo, __m256i *hi) {
    const __m256i ones = _mm256_set1_epi16(1), a = _mm256_set1_epi32(word), mag = _mm256_abs_epi8(a);
    const __m256i b0 = _mm256_load_si256((const __m256i *)B), b1 = _mm256_load_si256((const __m256i *)(B + 32));
    *lo = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(b0, a)), ones);
    *hi = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(b1, a)), ones);
}

/* acc rows `rows[0..nrows)` += Σ over their listed groups of (new − old codes) · W. */
void seqep_int8_changes_avx2(const int64_t *rows, int64_t nrows, const int32_t *changed, const int32_t *old_codes,
                             const int32_t *new_codes, const int32_t *count, int64_t max_changes,
                             const int8_t *layout, int64_t strips, int64_t groups, int32_t *acc, int64_t acc_ld,
                             int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < strips; ++j) {
        const int8_t *strip = layout + j * groups * 64;
        for (int64_t i = 0; i < nrows; ++i) {
            const int64_t row = rows[i];
            int32_t *out = acc + row * acc_ld + j * STRIP;
            __m256i lo = _mm256_loadu_si256((const __m256i *)out), hi = _mm256_loadu_si256((const __m256i *)(out + 8));
            const int32_t *ch = changed + row * max_changes, *oc = old_codes + row * max_changes,
                          *nc = new_codes + row * max_changes;
            for (int32_t k = 0; k < count[row]; ++k) {
                __m256i nlo, nhi, olo, ohi;
                group_term(nc[k], strip + 64 * (int64_t)ch[k], &nlo, &nhi);
                group_term(oc[k], strip + 64 * (int64_t)ch[k], &olo, &ohi);
                lo = _mm256_add_epi32(lo, _mm256_sub_epi32(nlo, olo));
                hi = _mm256_add_epi32(hi, _mm256_sub_epi32(nhi, ohi));
            }
            _mm256_storeu_si256((__m256i *)out, lo);
            _mm256_storeu_si256((__m256i *)(out + 8), hi);
        }
    }
}

/* out rows `rows[0..nrows)` (`out_ld` apart, fp32 or bf16 bits) = acc's first `n` sums of the row x factor[row]. */
void seqep_int8_dequantise_rows_avx2(const int32_t *acc, int64_t acc_ld, const int64_t *rows, int64_t nrows,
                                     int64_t n, const float *factor, void *out, int64_t out_ld, int bf16,
                                     int threads) {
    const int64_t blocks = (n + 1023) / 1024;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t i = 0; i < nrows; ++i)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t row = rows[i], lo = b * 1024, hi = lo + 1024 < n ? lo + 1024 : n;
            const int32_t *a = acc + row * acc_ld;
            const __m256 f = _mm256_set1_ps(factor[row]);
            int64_t c = lo;
            if (bf16) {
                uint16_t *o = (uint16_t *)out + row * out_ld;
                for (; c < hi; ++c) {
                    float v = (float)a[c] * factor[row];
                    uint32_t u;
                    memcpy(&u, &v, 4);
                    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch converts */
                    o[c] = (uint16_t)(u >> 16);
                }
                continue;
            }
            float *o = (float *)out + row * out_ld;
            for (; c + 8 <= hi; c += 8)
                _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(a + c))), f));
            for (; c < hi; ++c) o[c] = (float)a[c] * factor[row];
        }
}
