/* Both products of a folded relaxation step in one pass over the folded synapse (AVX2 + FMA: every x86-64 CPU
 * since 2013, AMD and Intel alike).
 *
 * A sample's folded synapse F has a row of H floats per (projection p, distinct key u, query q): the batch's
 * vocabulary holds one (Lq x H) block per (projection, word), and a sample's rows for (p, u) are the block
 * slots[s, p, u]. Per sample s and copy j (the +-beta copies of a nudged phase share the sample's synapse):
 *   scores[s, j, n] = cst[s, n] + gamma * F_n . h[s, j, :]       n = (p, u, q)
 *   up[s, j, :]     = sum_n alpha[s, j, n] F_n
 * Each row is read once for both products and all copies, five rows at a time, while the copies' H
 * accumulators stay in L1. Slots past a projection's count (u >= sizes[s, p]) are padding: their score is
 * cst (-inf) and they add nothing. The samples are shared out over the threads.
 *
 * The torch products in `analog_ep/fast/folded.py` are this kernel's oracle (the same sums in another order).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float sum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* R consecutive rows of F (length and stride n) against one copy: acc += sum_r h[r] F_r (ACC), dot[r] = F_r . a
 * (DOT). Five rows a pass keep both FMA units busy within AVX2's 16 registers. */
#define ROW_BLOCK(NAME, R, ACC, DOT)                                                                      \
    static void NAME##_##R(const float *f, int64_t n, const float *h, const float *a, float *acc, float *dot) { \
        __m256 hv[R], d[R];                                                                               \
        float tail[R];                                                                                    \
        for (int r = 0; r < R; r++) {                                                                     \
            hv[r] = _mm256_set1_ps(ACC ? h[r] : 0.0f);                                                    \
            d[r] = _mm256_setzero_ps();                                                                   \
            tail[r] = 0.0f;                                                                               \
        }                                                                                                 \
        int64_t k = 0;                                                                                    \
        for (; k + 8 <= n; k += 8) {                                                                      \
            __m256 av = DOT ? _mm256_loadu_ps(a + k) : _mm256_setzero_ps();                               \
            __m256 s = ACC ? _mm256_loadu_ps(acc + k) : _mm256_setzero_ps();                              \
            for (int r = 0; r < R; r++) {                                                                 \
                __m256 fv = _mm256_loadu_ps(f + r * n + k);                                               \
                if (ACC) s = _mm256_fmadd_ps(hv[r], fv, s);                                               \
                if (DOT) d[r] = _mm256_fmadd_ps(fv, av, d[r]);                                            \
            }                                                                                             \
            if (ACC) _mm256_storeu_ps(acc + k, s);                                                        \
        }                                                                                                 \
        for (; k < n; k++) {                                                                              \
            float s = ACC ? acc[k] : 0.0f;                                                                \
            for (int r = 0; r < R; r++) {                                                                 \
                if (ACC) s += h[r] * f[r * n + k];                                                        \
                if (DOT) tail[r] += f[r * n + k] * a[k];                                                  \
            }                                                                                             \
            if (ACC) acc[k] = s;                                                                          \
        }                                                                                                 \
        if (DOT)                                                                                          \
            for (int r = 0; r < R; r++) dot[r] = sum8(d[r]) + tail[r];                                    \
    }
#define ROW_BLOCKS(NAME, ACC, DOT) \
    ROW_BLOCK(NAME, 1, ACC, DOT)   \
    ROW_BLOCK(NAME, 2, ACC, DOT)   \
    ROW_BLOCK(NAME, 3, ACC, DOT)   \
    ROW_BLOCK(NAME, 4, ACC, DOT)   \
    ROW_BLOCK(NAME, 5, ACC, DOT)
ROW_BLOCKS(both, 1, 1)
ROW_BLOCKS(dot_only, 0, 1)
ROW_BLOCKS(acc_only, 1, 0)

typedef void (*row_block)(const float *, int64_t, const float *, const float *, float *, float *);
static const row_block BOTH[6] = {0, both_1, both_2, both_3, both_4, both_5};
static const row_block DOT_ONLY[6] = {0, dot_only_1, dot_only_2, dot_only_3, dot_only_4, dot_only_5};
static const row_block ACC_ONLY[6] = {0, acc_only_1, acc_only_2, acc_only_3, acc_only_4, acc_only_5};

/* G (V, Lq, H) the vocabulary's blocks, slots (c, P, U), sizes (c, P), h (c, m, H), alpha and cst (c, P, U, Lq
 * as (c, m, N) and (c, N)) -> scores (c, m, N), up (c, m, H); all contiguous, fp32 (int64 indices). Either
 * output may be NULL, for a schedule that needs one product at a time (then h or alpha is not read). */
void seqep_fold_products(const float *G, const int64_t *slots, const int64_t *sizes, const float *h,
                         const float *alpha, const float *cst, float gamma, float *scores, float *up, int64_t c,
                         int64_t m, int64_t P, int64_t U, int64_t Lq, int64_t H, int threads) {
    const int64_t N = P * U * Lq;
    const row_block *blocks = scores && up ? BOTH : (scores ? DOT_ONLY : ACC_ONLY);
    if (!scores && !up) return;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t s = 0; s < c; s++) {
        if (up) memset(up + s * m * H, 0, (size_t)(m * H) * sizeof(float));
        for (int64_t p = 0; p < P; p++) {
            for (int64_t u = 0; u < U; u++) {
                const int64_t first = (p * U + u) * Lq;
                if (u >= sizes[s * P + p]) {
                    if (scores)
                        for (int64_t j = 0; j < m; j++)
                            memcpy(scores + (s * m + j) * N + first, cst + s * N + first, (size_t)Lq * sizeof(float));
                    continue;
                }
                const float *block = G + slots[(s * P + p) * U + u] * Lq * H;
                for (int64_t q = 0; q < Lq; q += 5) {
                    const int64_t rows = Lq - q < 5 ? Lq - q : 5;
                    for (int64_t j = 0; j < m; j++) {
                        const float *w = alpha ? alpha + (s * m + j) * N + first + q : 0;
                        const float *hj = h ? h + (s * m + j) * H : 0;
                        float *dot = scores ? scores + (s * m + j) * N + first + q : 0;
                        float *acc = up ? up + (s * m + j) * H : 0;
                        blocks[rows](block + q * H, H, w, hj, acc, dot);
                    }
                }
                if (scores)
                    for (int64_t j = 0; j < m; j++) {
                        float *dot = scores + (s * m + j) * N + first;
                        for (int64_t q = 0; q < Lq; q++) dot[q] = cst[s * N + first + q] + gamma * dot[q];
                    }
            }
        }
    }
}
