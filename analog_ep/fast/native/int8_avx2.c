/* int8 products of the large synapse on AVX2 (no AMX, no VNNI): both products of a relaxation step,
 * x·Wᵀ ("up", into FC-1) and h·W ("down", into the projection layer), with W quantised once per batch to int8
 * (one scale) and the activations per row (r = max|row| / 127), exactly as the AMX and oneDNN int8 kernels
 * quantise: the integer sums are the same, so are the results.
 *
 * Why a kernel: AVX2 multiplies 32 int8 pairs per vpmaddubsw, against 8 fp32 pairs per FMA, and oneDNN's int8
 * path on an AVX2-only CPU is hundreds of times slower than fp32. vpmaddubsw takes one unsigned operand, and
 * both operands here are signed, so the activation's magnitude goes in as the unsigned operand and its sign
 * onto the weight (vpsignb): |a|·(sign(a)·w), exact since |a|, |w| <= 127 keep each pair's sum below 2^15.
 * vpmaddwd against ones then widens pairs of those into int32 lanes.
 *
 * Both products are one micro-kernel, A (rows x G groups of 4 bytes) times a strip of B (G groups x 16
 * columns x 4 bytes) into 4 rows x 16 int32 sums; they differ in the layout of W each reads:
 *   up   layout: [Kp/16 strips][Np/4 groups][16 k][4 n]   (strip j = outputs 16j..16j+15 of x·Wᵀ)
 *   down layout: [Np/16 strips][Kp/4 groups][16 n][4 k]   (strip j = outputs 16j..16j+15 of h·W)
 * Activation buffers are zero-padded to a multiple of 4 rows and to the padded width.
 */
#include "int8_avx2.h"

/* Round-to-nearest-even fp32 -> bf16 bits, as torch converts finite values. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Rows of x (fp32, `ld` floats apart) as int8: r = max|row| / 127 (1 for a row of zeros), q = round(x · (1/r)),
 * into q (rows_padded x width, zero-padded). Returns through r; the torch rule (lowp_weights._quantize_rows). */
void seqep_quantize_rows_avx2(const float *x, int64_t m, int64_t n, int64_t ld, int8_t *q, int64_t rows_padded,
                              int64_t width, float *r, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows_padded; ++i) {
        int8_t *qi = q + i * width;
        if (i >= m) {
            memset(qi, 0, (size_t)width);
            continue;
        }
        const float *xi = x + i * ld;
        const float amax = row_absmax(xi, n);
        const float ri = amax > 0.0f ? amax / 127.0f : 1.0f;
        r[i] = ri;
        const float inv = 1.0f / ri;
        const __m256 vinv = _mm256_set1_ps(inv);
        int64_t j = 0;
        for (; j + 32 <= n; j += 32) _mm256_storeu_si256((__m256i *)(qi + j), codes32(xi + j, vinv));
        for (; j < n; ++j) qi[j] = (int8_t)lrintf(xi[j] * inv);
        if (width > n) memset(qi + n, 0, (size_t)(width - n));
    }
}

/* 16 floats of a row quantised: round(w / scale) clamped to +-127 (round half to even, division as torch
 * divides, so the codes equal torch's bit for bit), as 16 int8; columns from `valid` on are 0. */
static inline __m128i quantise16(const float *p, int64_t valid, __m256 scale) {
    float tail[16];
    if (valid < 16) {
        for (int64_t c = 0; c < 16; ++c) tail[c] = c < valid ? p[c] : 0.0f;
        p = tail;
    }
    const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
    __m256 a = _mm256_div_ps(_mm256_loadu_ps(p), scale), b = _mm256_div_ps(_mm256_loadu_ps(p + 8), scale);
    a = _mm256_max_ps(_mm256_min_ps(a, hi), lo);
    b = _mm256_max_ps(_mm256_min_ps(b, hi), lo);
    const __m256i words = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)); /* a0-3 b0-3 | a4-7 b4-7 */
    const __m128i packed = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    return _mm_shuffle_epi32(packed, _MM_SHUFFLE(3, 1, 2, 0)); /* a0-3 a4-7 b0-3 b4-7 */
}

/* max |w| over `count` floats, NaN if any entry is NaN (the caller refuses such a weight). */
float seqep_absmax_avx2(const float *w, int64_t count, int threads) {
    float best = 0.0f;
    int nan_seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : best) reduction(| : nan_seen)
    for (int64_t b = 0; b < (count + 4095) / 4096; ++b) {
        const int64_t lo = b * 4096, hi = lo + 4096 < count ? lo + 4096 : count;
        __m256 m = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 x = _mm256_loadu_ps(w + i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, x));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, m);
        for (int l = 0; l < 8; ++l) best = lanes[l] > best ? lanes[l] : best;
        nan_seen |= _mm256_movemask_ps(unordered) != 0;
        for (; i < hi; ++i) {
            nan_seen |= isnan(w[i]);
            best = fabsf(w[i]) > best ? fabsf(w[i]) : best;
        }
    }
    return nan_seen ? __builtin_nanf("") : best;
}

/* Quantise W (K x N fp32) once per batch into the up and down layouts (either may be NULL), zero-padded to
 * Kp x Np, one pass over W in blocks of 16 x 16. */
void seqep_pack_int8_avx2(const float *w, int64_t K, int64_t N, float scale, int8_t *up, int8_t *down, int64_t Kp,
                          int64_t Np, int threads) {
    const __m256 s = _mm256_set1_ps(scale);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t kb = 0; kb < Kp / STRIP; ++kb) {
        int8_t q[STRIP][STRIP] __attribute__((aligned(16))); /* rows k of the block, 16 columns n each */
        for (int64_t nb = 0; nb < Np / STRIP; ++nb) {
            for (int64_t j = 0; j < STRIP; ++j) {
                const int64_t k = STRIP * kb + j, valid = k < K ? N - STRIP * nb : 0;
                _mm_store_si128((__m128i *)q[j], valid > 0 ? quantise16(w + k * N + STRIP * nb, valid, s)
                                                           : _mm_setzero_si128());
            }
            if (up) /* strip kb, groups 4nb..4nb+3: output k's 4 inputs as one dword */
                for (int64_t g = 0; g < 4; ++g) {
                    int8_t *dst = up + (kb * (Np / 4) + 4 * nb + g) * 64;
                    for (int64_t j = 0; j < STRIP; ++j) memcpy(dst + 4 * j, &q[j][4 * g], 4);
                }
            if (down) /* strip nb, groups 4kb..4kb+3: output n's 4 inputs (rows 4g..4g+3) as one dword */
                for (int64_t g = 0; g < 4; ++g) {
                    const __m128i r0 = _mm_load_si128((const __m128i *)q[4 * g]);
                    const __m128i r1 = _mm_load_si128((const __m128i *)q[4 * g + 1]);
                    const __m128i r2 = _mm_load_si128((const __m128i *)q[4 * g + 2]);
                    const __m128i r3 = _mm_load_si128((const __m128i *)q[4 * g + 3]);
                    const __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
                    const __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
                    __m128i *dst = (__m128i *)(down + (nb * (Kp / 4) + 4 * kb + g) * 64);
                    _mm_store_si128(dst + 0, _mm_unpacklo_epi16(t0, t2));
                    _mm_store_si128(dst + 1, _mm_unpackhi_epi16(t0, t2));
                    _mm_store_si128(dst + 2, _mm_unpacklo_epi16(t1, t3));
                    _mm_store_si128(dst + 3, _mm_unpackhi_epi16(t1, t3));
                }
        }
    }
}

/* out (M x K fp32) = (qx · qWᵀ) · (r_row · scale); qx (Mp x Np, Mp a multiple of 4). */
void seqep_up_int8_avx2(const int8_t *qx, const float *r, const int8_t *up, int64_t M, int64_t Mp, int64_t Np,
                        int64_t K, int64_t Kp, float scale, float *out, int threads) {
    const int64_t groups = Np / 4;
#pragma omp parallel num_threads(threads)
    {
        int32_t *acc = (int32_t *)_mm_malloc((size_t)Mp * STRIP * sizeof(int32_t), 64);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < Kp / STRIP; ++j) {
            strip_sums(qx, Mp, Np, up + j * groups * 64, groups, acc);
            for (int64_t m = 0; m < M; ++m) {
                const float f = r[m] * scale;
                for (int64_t c = 0; c < STRIP && j * STRIP + c < K; ++c)
                    out[m * K + j * STRIP + c] = (float)acc[m * STRIP + c] * f;
            }
        }
        _mm_free(acc);
    }
}

/* out (M x N) = (qh · qW) · scale, fp32 (bf16 = 0) or bf16 bits (bf16 = 1); qh (Mp x Kp, Mp a multiple of 4);
 * the rows' quantisation factors are left to the caller. */
void seqep_down_int8_avx2(const int8_t *qh, const int8_t *down, int64_t M, int64_t Mp, int64_t Kp, int64_t N,
                          int64_t Np, float scale, void *out, int bf16, int threads) {
    const int64_t groups = Kp / 4;
#pragma omp parallel num_threads(threads)
    {
        int32_t acc[ROWS * STRIP];
#pragma omp for schedule(static)
        for (int64_t j = 0; j < Np / STRIP; ++j) {
            const int8_t *strip = down + j * groups * 64;
            const int64_t cols = N - j * STRIP < STRIP ? N - j * STRIP : STRIP;
            for (int64_t m = 0; m < Mp; m += ROWS) {
                memset(acc, 0, sizeof acc);
                micro_4x16(qh + m * Kp, Kp, strip, groups, acc);
                for (int64_t i = 0; i < ROWS && m + i < M; ++i) {
                    if (bf16) {
                        uint16_t *o = (uint16_t *)out + (m + i) * N + j * STRIP;
                        for (int64_t c = 0; c < cols; ++c) o[c] = to_bf16((float)acc[i * STRIP + c] * scale);
                    } else {
                        float *o = (float *)out + (m + i) * N + j * STRIP;
                        for (int64_t c = 0; c < cols; ++c) o[c] = (float)acc[i * STRIP + c] * scale;
                    }
                }
            }
        }
    }
}
