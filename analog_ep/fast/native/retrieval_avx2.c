/* The Hopfield retrieval over a group of distinct keys in fp32 on AVX2: scores, softmax and values in one pass per
 * block of QB queries, the block's scores kept in cache, where torch takes two batched products and a softmax pass
 * between them (`retrieval.DistinctKeys.retrieve`, its oracle in the tests).
 *
 *   out[r, i, :] = Σ_u w[r, i, u] k[r, u, :],  w[r, i, :] = softmax_u(c[r, i, u] + scale[r] · Σ_e q[r, i, e] kt[r, e, u])
 *
 * q (n, Lq, d), kt (n, d, U) (γ-scaled keys, transposed), k (n, U, d), c (n, Lc, U) with Lc = 1 (one constant for
 * every query) or Lq; scale (n) or NULL. A row whose scores are all −inf (every key masked) retrieves zeros. exp is
 * its Taylor polynomial to degree 6 after range reduction (~2 ulp), where torch uses Sleef's: the results agree to
 * fp32 rounding. Tiles of QB queries × 16 keys (scores) and QB queries × 16 channels (values): with few queries
 * (pooled queries, sentences) this beats MKL's small batched products; with hundreds it does not, and
 * `retrieval` keeps torch's there (FUSED_MAX_QUERIES).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define QB 6 /* queries per block: 4-8 measured, 6 the best at the shapes that use this kernel */
static inline __m256i tail_mask(int64_t left) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? left : 8)), lanes);
}
/* e^x for 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial (Horner), 2^n by the exponent
 * bits. Lanes below −87.3 (−inf included) give 0; x is at most 0 here (scores minus their maximum). */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}
/* Scores of nq (<= QB) queries against U keys into s (QB rows, Up = U rounded up to 16 floats apart). */
static void block_scores(const float *q, int64_t nq, int64_t d, const float *kt, int64_t U, int64_t Up, float *s) {
    for (int64_t u0 = 0; u0 < U; u0 += 16) {
        const __m256i m0 = tail_mask(U - u0), m1 = tail_mask(U - u0 - 8);
        __m256 a0[QB], a1[QB];
        for (int i = 0; i < QB; ++i) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
        for (int64_t e = 0; e < d; ++e) {
            const __m256 k0 = _mm256_maskload_ps(kt + e * U + u0, m0), k1 = _mm256_maskload_ps(kt + e * U + u0 + 8, m1);
            for (int i = 0; i < QB; ++i) { const __m256 b = _mm256_broadcast_ss(q + (i < nq ? i : 0) * d + e);
                a0[i] = _mm256_fmadd_ps(b, k0, a0[i]); a1[i] = _mm256_fmadd_ps(b, k1, a1[i]); }
        }
        for (int i = 0; i < QB; ++i) { _mm256_store_ps(s + i * Up + u0, a0[i]); _mm256_store_ps(s + i * Up + u0 + 8, a1[i]); }
    }
}
/* One query's weights in place: w = softmax(c + scale · s) over U; all −inf gives zeros. */
static void softmax_row(float *s, const float *c, float scale, int64_t U) {
    const __m256 vs = _mm256_set1_ps(scale);
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t u = 0;
    for (; u + 8 <= U; u += 8) { const __m256 x = _mm256_fmadd_ps(vs, _mm256_load_ps(s + u), _mm256_loadu_ps(c + u)); _mm256_store_ps(s + u, x); vmax = _mm256_max_ps(vmax, x); }
    float m = -INFINITY, lanes[8]; _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
    for (; u < U; ++u) { s[u] = fmaf(scale, s[u], c[u]); m = s[u] > m ? s[u] : m; }
    if (m == -INFINITY) { memset(s, 0, (size_t)U * sizeof(float)); return; }
    const __m256 vm = _mm256_set1_ps(m); __m256 vsum = _mm256_setzero_ps();
    u = 0;
    for (; u + 8 <= U; u += 8) { const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(s + u), vm)); _mm256_store_ps(s + u, e); vsum = _mm256_add_ps(vsum, e); }
    if (u < U) { float x[8], e[8]; for (int l = 0; l < 8; ++l) x[l] = u + l < U ? s[u + l] - m : -INFINITY;
        _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(x))); for (int l = 0; u + l < U; ++l) s[u + l] = e[l]; vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(e)); }
    _mm256_storeu_ps(lanes, vsum); float z = 0.0f; for (int l = 0; l < 8; ++l) z += lanes[l];
    const __m256 inv = _mm256_set1_ps(1.0f / z);
    u = 0; for (; u + 8 <= U; u += 8) _mm256_store_ps(s + u, _mm256_mul_ps(_mm256_load_ps(s + u), inv));
    for (; u < U; ++u) s[u] *= 1.0f / z;
}
/* out rows (nq x d) = w (nq x U, rows Up apart; rows past nq zero) · k (U x d). */
static void block_values(const float *w, int64_t nq, int64_t U, int64_t Up, const float *k, int64_t d, float *out) {
    for (int64_t e0 = 0; e0 < d; e0 += 16) {
        const __m256i m0 = tail_mask(d - e0), m1 = tail_mask(d - e0 - 8);
        __m256 a0[QB], a1[QB];
        for (int i = 0; i < QB; ++i) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
        for (int64_t u = 0; u < U; ++u) {
            const __m256 k0 = _mm256_maskload_ps(k + u * d + e0, m0), k1 = _mm256_maskload_ps(k + u * d + e0 + 8, m1);
            for (int i = 0; i < QB; ++i) { const __m256 b = _mm256_broadcast_ss(w + i * Up + u);
                a0[i] = _mm256_fmadd_ps(b, k0, a0[i]); a1[i] = _mm256_fmadd_ps(b, k1, a1[i]); }
        }
        for (int i = 0; i < QB && i < nq; ++i) { _mm256_maskstore_ps(out + i * d + e0, m0, a0[i]); _mm256_maskstore_ps(out + i * d + e0 + 8, m1, a1[i]); }
    }
}
void seqep_retrieve_f32(const float *q, const float *kt, const float *k, const float *c, int64_t c_rows,
                        const float *scale, int64_t n, int64_t Lq, int64_t d, int64_t U, float *out, int threads) {
    const int64_t Up = (U + 15) / 16 * 16, blocks = (Lq + QB - 1) / QB;
#pragma omp parallel num_threads(threads)
    {
        float *s = (float *)aligned_alloc(32, (size_t)(QB * Up) * sizeof(float));
        memset(s, 0, (size_t)(QB * Up) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t job = 0; job < n * blocks; ++job) {
            const int64_t r = job / blocks, i0 = (job % blocks) * QB, nq = Lq - i0 < QB ? Lq - i0 : QB;
            block_scores(q + (r * Lq + i0) * d, nq, d, kt + r * d * U, U, Up, s);
            for (int64_t i = 0; i < nq; ++i) softmax_row(s + i * Up, c + (r * c_rows + (c_rows == 1 ? 0 : i0 + i)) * U, scale ? scale[r] : 1.0f, U);
            for (int64_t i = nq; i < QB; ++i) memset(s + i * Up, 0, (size_t)Up * sizeof(float));
            block_values(s, nq, U, Up, k + r * U * d, d, out + (r * Lq + i0) * d);
        }
        free(s);
    }
}
