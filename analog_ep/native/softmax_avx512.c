/* The fast path's two retrieval softmax kernels (analog_ep/fast_retrieval.py: _attention_eager and
 * _delta_attention_eager, the oracles these are tested against), one pass per row in AVX-512.
 *
 * Why: they replace the torch.compile'd versions where our native library loads, so the fast path needs
 * no inductor at run time (~150 MB of resident memory, which kept the SNLI fast path above the reference's
 * peak) and no compile on first use.
 *
 * Rows are the (n x Lq) score rows of one key group, U entries each, contiguous; `scale` is one factor per
 * group row (n of them, each shared by Lq score rows) or NULL. Inputs bf16 (the bmm outputs), sums and
 * exponentials in fp32, outputs bf16. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __mmask16 lanes_left(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : (n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u));
}

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

/* out = softmax(cst + partial * scale) per row. A row of only -inf (no key) or with a NaN is NaN, as torch's
 * softmax gives, or zeros if has_empty (as nan_to_num(0) then gives). */
void seqep_attention(const float *cst, const uint16_t *partial, const float *scale, int64_t n, int64_t lq, int64_t u,
                     int has_empty, uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < n * lq; ++row) {
        const float *c = cst + row * u;
        const uint16_t *p = partial + row * u;
        uint16_t *o = out + row * u;
        const __m512 s = _mm512_set1_ps(scale ? scale[row / lq] : 1.f);
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t j = 0; j < u; j += 16) {
            const __mmask16 m = lanes_left(u - j);
            const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + j), _mm512_mul_ps(load_bf16(p + j, m), s));
            vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
            nan |= _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q);
        }
        const float top = _mm512_reduce_max_ps(vmax);
        if (nan || !(top > -INFINITY)) {
            const __m512 fill = has_empty ? _mm512_setzero_ps() : _mm512_set1_ps(NAN);
            for (int64_t j = 0; j < u; j += 16) store_bf16(o + j, fill, lanes_left(u - j));
            continue;
        }
        const __m512 vtop = _mm512_set1_ps(top);
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < u; j += 16) {
            const __mmask16 m = lanes_left(u - j);
            const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + j), _mm512_mul_ps(load_bf16(p + j, m), s));
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(x, vtop))));
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
        for (int64_t j = 0; j < u; j += 16) {
            const __mmask16 m = lanes_left(u - j);
            const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + j), _mm512_mul_ps(load_bf16(p + j, m), s));
            store_bf16(o + j, _mm512_mul_ps(exp16(_mm512_sub_ps(x, vtop)), inv), m);
        }
    }
}

/* out = softmax(S* + dS) - softmax(S*) from A* = softmax(S*) (bf16) and dS = delta * scale, without
 * cancellation: (A* / z*) expm1(dS - log(z/z*)), z* = sum A*, z = sum A* exp(dS) (both clamped at 1e-30). */
void seqep_delta_attention(const uint16_t *attention, const uint16_t *delta, const float *scale, int64_t n,
                           int64_t lq, int64_t u, uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < n * lq; ++row) {
        const uint16_t *a = attention + row * u, *d = delta + row * u;
        uint16_t *o = out + row * u;
        const __m512 s = _mm512_set1_ps(scale ? scale[row / lq] : 1.f);
        __m512 za = _mm512_setzero_ps(), ze = _mm512_setzero_ps();
        for (int64_t j = 0; j < u; j += 16) {
            const __mmask16 m = lanes_left(u - j);
            const __m512 av = load_bf16(a + j, m);
            za = _mm512_add_ps(za, av);
            ze = _mm512_add_ps(ze, _mm512_maskz_mul_ps(m, exp16(_mm512_mul_ps(load_bf16(d + j, m), s)), av));
        }
        float z_star = _mm512_reduce_add_ps(za), z = _mm512_reduce_add_ps(ze);
        z_star = z_star > 1e-30f ? z_star : 1e-30f;
        z = z > 1e-30f ? z : 1e-30f;
        const __m512 log_ratio = _mm512_set1_ps(logf(z / z_star)), inv = _mm512_set1_ps(1.f / z_star);
        for (int64_t j = 0; j < u; j += 16) {
            const __mmask16 m = lanes_left(u - j);
            const __m512 e = expm1_16(_mm512_sub_ps(_mm512_mul_ps(load_bf16(d + j, m), s), log_ratio));
            store_bf16(o + j, _mm512_mul_ps(_mm512_mul_ps(e, load_bf16(a + j, m)), inv), m);
        }
    }
}
