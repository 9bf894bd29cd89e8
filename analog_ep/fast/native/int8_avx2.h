/* The int8 micro-kernel of the AVX2 set, shared by the dense products (int8_avx2.c) and the products that
 * follow a state's changes (int8_delta_avx2.c), and the row quantiser's parts: see int8_avx2.c for the layouts
 * and why the products are exact. */
#ifndef SEQEP_INT8_AVX2_H
#define SEQEP_INT8_AVX2_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define STRIP 16     /* output columns per strip: two ymm of 8 int32 */
#define ROWS 4       /* rows per micro-kernel call */
#define UP_GROUPS 512 /* groups of 4 inputs per pass of x·Wᵀ: the strip's 32 KB of W stays in L1/L2 across rows */

/* acc[r][0..15] += Σ_g A[r, 4g..4g+3] · B[g, c, 0..3] for 4 rows; A rows `lda` bytes apart. */
static inline void micro_4x16(const int8_t *A, int64_t lda, const int8_t *B, int64_t groups, int32_t *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c00 = _mm256_loadu_si256((const __m256i *)(acc + 0)), c01 = _mm256_loadu_si256((const __m256i *)(acc + 8));
    __m256i c10 = _mm256_loadu_si256((const __m256i *)(acc + 16)), c11 = _mm256_loadu_si256((const __m256i *)(acc + 24));
    __m256i c20 = _mm256_loadu_si256((const __m256i *)(acc + 32)), c21 = _mm256_loadu_si256((const __m256i *)(acc + 40));
    __m256i c30 = _mm256_loadu_si256((const __m256i *)(acc + 48)), c31 = _mm256_loadu_si256((const __m256i *)(acc + 56));
    const int8_t *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
    for (int64_t g = 0; g < groups; ++g) {
        const __m256i b0 = _mm256_load_si256((const __m256i *)(B + 64 * g));
        const __m256i b1 = _mm256_load_si256((const __m256i *)(B + 64 * g + 32));
        int32_t v;
#define SEQEP_ROW(ap, lo, hi)                                                                              \
        memcpy(&v, (ap) + 4 * g, 4);                                                                      \
        {                                                                                                 \
            const __m256i a = _mm256_set1_epi32(v), mag = _mm256_abs_epi8(a);                             \
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(b0, a)), ones)); \
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(b1, a)), ones)); \
        }
        SEQEP_ROW(a0, c00, c01)
        SEQEP_ROW(a1, c10, c11)
        SEQEP_ROW(a2, c20, c21)
        SEQEP_ROW(a3, c30, c31)
#undef SEQEP_ROW
    }
    _mm256_storeu_si256((__m256i *)(acc + 0), c00); _mm256_storeu_si256((__m256i *)(acc + 8), c01);
    _mm256_storeu_si256((__m256i *)(acc + 16), c10); _mm256_storeu_si256((__m256i *)(acc + 24), c11);
    _mm256_storeu_si256((__m256i *)(acc + 32), c20); _mm256_storeu_si256((__m256i *)(acc + 40), c21);
    _mm256_storeu_si256((__m256i *)(acc + 48), c30); _mm256_storeu_si256((__m256i *)(acc + 56), c31);
}

/* One strip's int32 sums for `rows` rows (a multiple of ROWS) of A (`width` bytes apart, width = 4 · groups):
 * part[r][0..15] = Σ_g A[r, 4g..4g+3] · strip[g], in passes of UP_GROUPS groups (the strip's part stays in L1/L2
 * across the rows). */
static inline void strip_sums(const int8_t *A, int64_t rows, int64_t width, const int8_t *strip, int64_t groups,
                              int32_t *part) {
    memset(part, 0, (size_t)rows * STRIP * sizeof(int32_t));
    for (int64_t g0 = 0; g0 < groups; g0 += UP_GROUPS) {
        const int64_t gn = groups - g0 < UP_GROUPS ? groups - g0 : UP_GROUPS;
        for (int64_t i = 0; i < rows; i += ROWS)
            micro_4x16(A + i * width + 4 * g0, width, strip + 64 * g0, gn, part + i * STRIP);
    }
}

/* 32 floats quantised by `inv` to int8 in order (round half to even; |x·inv| <= 127 here, packs saturate). */
static inline __m256i codes32(const float *x, __m256 inv) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), inv));
    const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), inv));
    const __m256i abcd = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* max |x| over a row of n floats. */
static inline float row_absmax(const float *x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    float amax = 0.0f, lanes[8];
    _mm256_storeu_ps(lanes, mx);
    for (int l = 0; l < 8; ++l) amax = lanes[l] > amax ? lanes[l] : amax;
    for (; j < n; ++j) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    return amax;
}

#endif
