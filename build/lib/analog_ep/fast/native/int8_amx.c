/* int8 products of one large synapse W (K x N, e.g. 1000 x 180,000) on Intel AMX, for the fast EP path.
 *
 * Why this exists: at the paper's IMDB shape a relaxation step multiplies W twice (x W^T up, h W down) at
 * 32-64 rows, so each product streams the whole int8 matrix from memory. oneDNN's pre-packed product does
 * that near the bandwidth limit, but its packing (a generic reorder computing s8s8 compensation) costs
 * ~330 ms per batch and the transposed copy it needs another ~190 ms; torch._int_mm on the plain matrix
 * (no packing) is 1.6-2x slower per product. Here W is quantised and laid out for AMX in one pass per
 * orientation at memory speed, and both products run at the bandwidth roofline (docs/history.md).
 * Loaded by analog_ep/fast/amx_int8.py through ctypes; the numbers equal the oneDNN path's
 * (same quantisation, exact int32 accumulation).
 *
 * Layouts (AMX "VNNI": a B tile row holds 16 output columns x 4 consecutive reduction indices):
 *   down  (out = h W, reduction over K):  [Np/16][Kp/4][16][4]
 *   up    (out = x W^T, reduction over N): [Kp/16][Np/4][16][4]
 * Kp = K rounded up to 64, Np = N rounded up to 64; entries past K or N are zero.
 * Every tile is 16 rows x 64 bytes; the kernels keep four accumulator tiles (32 rows x 32 columns). */
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out AMX state only to processes that ask; 0 on success. */
int seqep_amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* max |w|, or NaN if any entry is NaN (AVX-512 max would drop it) */
float seqep_absmax(const float *w, int64_t n, int threads) {
    float best = 0.f;
    int nan_seen = 0;
#pragma omp parallel num_threads(threads) reduction(max : best) reduction(| : nan_seen)
    {
        __m512 m = _mm512_setzero_ps();
        __mmask16 nan = 0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < (n + 15) / 16; ++i) {
            const __m512 x = _mm512_maskz_loadu_ps(lanes_left(n - 16 * i), w + 16 * i);
            m = _mm512_max_ps(m, _mm512_abs_ps(x));
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        }
        const float b = _mm512_reduce_max_ps(m);
        best = b > best ? b : best;
        nan_seen |= nan != 0;
    }
    return nan_seen ? __builtin_nanf("") : best;
}

/* round(w / scale) clamped to +-127, as int32 lanes (round half to even, like torch.round); lanes past the
 * mask are 0. Division, not a reciprocal multiply, so the result equals torch's bit for bit. */
static inline __m512i quantise16(const float *p, __m512 scale, __mmask16 lanes) {
    __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, p), scale);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(127.f)), _mm512_set1_ps(-127.f));
    return _mm512_cvtps_epi32(x);
}

/* Quantise W once per batch into both layouts, one pass over the fp32 matrix per 16 x 16 block (rows past K
 * and columns past N are zero). Either destination may be NULL. */
void seqep_pack_int8(const float *w, int64_t K, int64_t N, float scale, int8_t *down, int8_t *up, int64_t Kp,
                     int64_t Np, int threads) {
    const __m512 s = _mm512_set1_ps(scale);
    const __m512i low_byte = _mm512_set1_epi32(0xff);
    const __m512i dword_of_row = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t kb = 0; kb < Kp / 16; ++kb) {
        int32_t q[16][4] __attribute__((aligned(64))); /* 16 rows x 16 int8, read as 4 dwords per row */
        for (int64_t nb = 0; nb < Np / 16; ++nb) {
            const __mmask16 lanes = lanes_left(N - 16 * nb);
            __m512i v[16];
            for (int j = 0; j < 16; ++j) {
                const int64_t k = 16 * kb + j;
                v[j] = k < K ? quantise16(w + k * N + 16 * nb, s, lanes) : _mm512_setzero_si512();
            }
            for (int g = 0; g < 4 && down; ++g) { /* row: column c's 4 K-indices 4g..4g+3 as one dword */
                __m512i row = _mm512_setzero_si512();
                for (int j = 0; j < 4; ++j)
                    row = _mm512_or_si512(row, _mm512_slli_epi32(_mm512_and_si512(v[4 * g + j], low_byte), 8 * j));
                _mm512_stream_si512((__m512i *)(down + (nb * (Kp / 4) + 4 * kb + g) * 64), row);
            }
            if (up) { /* row: hidden unit j's 4 N-indices 4g..4g+3 as one dword */
                for (int j = 0; j < 16; ++j) _mm_store_si128((__m128i *)q[j], _mm512_cvtsepi32_epi8(v[j]));
                for (int g = 0; g < 4; ++g) {
                    const __m512i row = _mm512_i32gather_epi32(dword_of_row, &q[0][g], 4);
                    _mm512_stream_si512((__m512i *)(up + (kb * (Np / 4) + 4 * nb + g) * 64), row);
                }
            }
        }
    }
    _mm_sfence();
}

/* Two 16 x 16 int32 tiles side by side (columns n0..n0+15 and n0+16..n0+31) -> rows x cols of out, times
 * scale: each row's 32 values as one 64-byte store, streamed past the cache when whole and aligned (the
 * output is far larger than the cache; a partial-line write would first read the line from memory). */
static inline void store_pair_bf16(const int32_t *left, const int32_t *right, int rows, int64_t cols, float scale,
                                   uint16_t *out, int64_t ld) {
    const __m512 s = _mm512_set1_ps(scale);
    const __mmask32 lanes = cols >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << cols) - 1ull);
    for (int r = 0; r < rows; ++r) {
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(left + 16 * r)), s);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(right + 16 * r)), s);
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        uint16_t *o = out + r * ld;
        if (cols >= 32 && ((uintptr_t)o & 63) == 0)
            _mm512_stream_si512((__m512i *)o, v);
        else
            _mm512_mask_storeu_epi16(o, lanes, v);
    }
}

static inline int rows_left(int64_t m, int64_t M) { return M - m >= 16 ? 16 : (M - m <= 0 ? 0 : (int)(M - m)); }

/* One 64-deep step of the 2 x 2 tile block: accumulators 0-3 (rows 0-15 / 16-31 by columns 0-15 / 16-31) +=
 * rows a0, a1 (lda apart) . B tiles b0, b1 */
static inline void quad_step(const int8_t *a0, const int8_t *a1, int64_t lda, const int8_t *b0, const int8_t *b1) {
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_loadd(4, a0, lda);
    _tile_loadd(5, a1, lda);
    _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 5, 6);
    _tile_dpbssd(2, 4, 7); _tile_dpbssd(3, 5, 7);
}

static inline void rows_down_to_up(const int8_t *s, int8_t *o);

/* 32 rows x 32 columns of a . W * scale into bf16 out (rows_left rows, cols_left columns of it; ld: out's row
 * stride): a0 the 32 rows (lda apart), b the pair of 16-column blocks of the down layout (steps of 64 along K
 * each). With up (the fused kernel's scratch, rows4 rows a K-block), the pair's tiles, as they are loaded,
 * are also written there in the up layout. */
static inline void down_pair(const int8_t *a0, int64_t lda, const int8_t *b, int64_t steps, int8_t *up,
                             int64_t rows4, int64_t rows_left_, int64_t cols_left, float scale, uint16_t *out,
                             int64_t ld) {
    int32_t c[4][256] __attribute__((aligned(64)));
    const int8_t *b0 = b, *b1 = b + steps * 1024, *a1 = a0 + 16 * lda;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k = 0; k < steps; ++k) {
        quad_step(a0 + k * 64, a1 + k * 64, lda, b0 + k * 1024, b1 + k * 1024);
        if (up) /* the two blocks just loaded, into the up layout (4 K-blocks of 16 each) */
            for (int q = 0; q < 4; ++q) {
                int8_t *o = up + (4 * k + q) * rows4 * 64;
                rows_down_to_up(b0 + k * 1024 + q * 256, o);
                rows_down_to_up(b1 + k * 1024 + q * 256, o + 256);
            }
    }
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
    if (cols_left > 0) {
        store_pair_bf16(c[0], c[2], rows_left(0, rows_left_), cols_left, scale, out, ld);
        store_pair_bf16(c[1], c[3], rows_left(16, rows_left_), cols_left, scale, out + 16 * ld, ld);
    }
}

/* out (M x N, bf16) = a (Mp x Kp int8, zero past M and K) . W * scale. Mp % 32 == 0. Parallel over pairs of
 * 16-column blocks; the pair's 2 x Kp x 16 bytes of W stay in cache for every 32-row block of a. */
void seqep_down_int8(const int8_t *a, const int8_t *down, int64_t M, int64_t Mp, int64_t Kp, int64_t N, int64_t Np,
                     float scale, uint16_t *out, int threads) {
    const int64_t block = Kp / 4 * 64, steps = Kp / 64;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles();
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < Np / 32; ++pair)
            for (int64_t m0 = 0; m0 < Mp; m0 += 32)
                down_pair(a + m0 * Kp, Kp, down + 2 * pair * block, steps, NULL, 0, M - m0, N - 32 * pair, scale,
                          out + m0 * N + 32 * pair, N);
        _mm_sfence();
        _tile_release();
    }
}

#define UP_CHUNK 32 /* 64-column steps per pass over the hidden blocks: Mp x 2 KB of x stays in cache */

/* out (M x K, fp32) = x (Mp x N int8, rows zero past M) . W^T, row m times row_scale[m] * scale.
 * acc: scratch of Mp x Kp int32 (partial sums, tile-blocked). Each thread owns a range of hidden-block
 * pairs and walks the reduction over N in chunks, so x is read ~once and W exactly once. */
void seqep_up_int8(const int8_t *x, const float *row_scale, const int8_t *up, int64_t M, int64_t Mp, int64_t N,
                   int64_t Np, int64_t K, int64_t Kp, float scale, float *out, int32_t *acc, int threads) {
    const int64_t strip = Np / 4 * 64, full = N / 64, steps = (N + 63) / 64, pairs = Kp / 32, hblocks = Kp / 16;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        int8_t tail[32][64] __attribute__((aligned(64)));
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t p0 = pairs * id / nt, p1 = pairs * (id + 1) / nt;
        for (int64_t k0 = 0; k0 < steps; k0 += UP_CHUNK) {
            const int64_t k1 = k0 + UP_CHUNK < steps ? k0 + UP_CHUNK : steps;
            for (int64_t p = p0; p < p1; ++p) {
                const int8_t *b0 = up + 2 * p * strip, *b1 = b0 + strip;
                for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
                    int32_t *c00 = acc + ((m0 / 16) * hblocks + 2 * p) * 256, *c10 = c00 + hblocks * 256;
                    if (k0 == 0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else {
                        _tile_loadd(0, c00, 64); _tile_loadd(1, c10, 64);
                        _tile_loadd(2, c00 + 256, 64); _tile_loadd(3, c10 + 256, 64);
                    }
                    const int8_t *a0 = x + m0 * N, *a1 = a0 + 16 * N;
                    for (int64_t k = k0; k < k1; ++k) {
                        if (k < full) {
                            quad_step(a0 + k * 64, a1 + k * 64, N, b0 + k * 1024, b1 + k * 1024);
                        } else { /* the last, partial 64 columns: zero-padded copy */
                            memset(tail, 0, sizeof tail);
                            for (int r = 0; r < 32; ++r) memcpy(tail[r], a0 + r * N + k * 64, (size_t)(N - k * 64));
                            quad_step(tail[0], tail[16], 64, b0 + k * 1024, b1 + k * 1024);
                        }
                    }
                    _tile_stored(0, c00, 64); _tile_stored(1, c10, 64);
                    _tile_stored(2, c00 + 256, 64); _tile_stored(3, c10 + 256, 64);
                }
            }
        }
        _tile_release();
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            const __m512 s = _mm512_set1_ps(row_scale[m] * scale);
            const int32_t *row = acc + ((m / 16) * hblocks) * 256 + (m % 16) * 16;
            for (int64_t hb = 0; hb < hblocks && 16 * hb < K; ++hb) {
                __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(row + hb * 256)), s);
                _mm512_mask_storeu_ps(out + m * K + 16 * hb, lanes_left(K - 16 * hb), v);
            }
        }
    }
}

/* Symmetric int8 per row, as lowp_weights._quantize_rows: r = max|x_row| / 127 (1 for a row of zeros),
 * q = round(x / r). x: M rows of N fp32 (is_bf16 = 0) or bf16 values, row stride ld elements. q: Mp x ldq,
 * zero past N and past M (the kernels' padding). One thread per row block, two passes over a row that
 * stays in cache: x is read from memory once (a compiled torch version reads it twice). */
static inline __m512 load16(const void *x, int is_bf16, int64_t i, __mmask16 lanes) {
    if (is_bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)x + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(lanes, (const float *)x + i);
}

void seqep_quantize_rows(const void *x, int is_bf16, int64_t M, int64_t N, int64_t ld, int8_t *q, int64_t Mp,
                         int64_t ldq, float *r, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < Mp; ++m) {
        int8_t *out = q + m * ldq;
        if (m >= M) {
            memset(out, 0, (size_t)ldq);
            continue;
        }
        const int64_t row = m * ld;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t i = 0; i < N; i += 16)
            amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, is_bf16, row + i, lanes_left(N - i))));
        const float a = _mm512_reduce_max_ps(amax);
        const float scale = a > 0.f ? a / 127.f : 1.f;
        const __m512 inv = _mm512_set1_ps(1.f / scale);
        for (int64_t i = 0; i < N; i += 16) {
            const __mmask16 lanes = lanes_left(N - i);
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, is_bf16, row + i, lanes), inv));
            _mm_mask_storeu_epi8(out + i, lanes, _mm512_cvtsepi32_epi8(v));
        }
        if (ldq > N) memset(out + N, 0, (size_t)(ldq - N));
        r[m] = scale;
    }
}

/* The up layout from the down layout. Four consecutive down rows of a 16-column block nb (256 bytes at s: k4 =
 * 4 kb + q, q < 4) hold W[16 kb + 4 q + i][16 nb + 4 s + g] at byte 4 (4 s + g) + i of row q; the up row
 * (kb, n4 = 4 nb + s) wants it at byte 4 (4 q + i) + g. So: a 4 x 4 byte transpose inside each 16-byte lane
 * (one shuffle), then a 4 x 4 transpose of the lanes across the four rows; up row s goes to o + 64 s. */
static inline void rows_down_to_up(const int8_t *s, int8_t *o) {
    const __m512i in_lane = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i d0 = _mm512_shuffle_epi8(_mm512_load_si512(s), in_lane);
    const __m512i d1 = _mm512_shuffle_epi8(_mm512_load_si512(s + 64), in_lane);
    const __m512i d2 = _mm512_shuffle_epi8(_mm512_load_si512(s + 128), in_lane);
    const __m512i d3 = _mm512_shuffle_epi8(_mm512_load_si512(s + 192), in_lane);
    const __m512i t0 = _mm512_shuffle_i64x2(d0, d1, 0x44), t1 = _mm512_shuffle_i64x2(d0, d1, 0xee);
    const __m512i t2 = _mm512_shuffle_i64x2(d2, d3, 0x44), t3 = _mm512_shuffle_i64x2(d2, d3, 0xee);
    _mm512_store_si512(o, _mm512_shuffle_i64x2(t0, t2, 0x88));
    _mm512_store_si512(o + 64, _mm512_shuffle_i64x2(t0, t2, 0xdd));
    _mm512_store_si512(o + 128, _mm512_shuffle_i64x2(t1, t3, 0x88));
    _mm512_store_si512(o + 192, _mm512_shuffle_i64x2(t1, t3, 0xdd));
}


/* The whole up layout from the down layout (for x W^T alone, when only the down layout was packed). */
void seqep_down_to_up(const int8_t *down, int64_t Kp, int64_t Np, int8_t *up, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < Np / 16; ++nb)
        for (int64_t kb = 0; kb < Kp / 16; ++kb)
            rows_down_to_up(down + (nb * (Kp / 4) + 4 * kb) * 64, up + (kb * (Np / 4) + 4 * nb) * 64);
}


/* int8 codes of columns c0 .. c1 of the bf16 rows x (M x N; zero past M and N) into stage (Mp x chunk) */
static void stage_codes(const uint16_t *x, const float *row_scale, int64_t M, int64_t Mp, int64_t N, int64_t c0,
                        int64_t c1, int64_t chunk, int8_t *stage) {
    for (int64_t m = 0; m < Mp; ++m) {
        int8_t *o = stage + m * chunk;
        if (m >= M) {
            memset(o, 0, (size_t)(c1 - c0));
            continue;
        }
        const __m512 inv = _mm512_set1_ps(1.f / row_scale[m]);
        /* the next chunk's part of this row: rows are N apart, so each chunk reads short runs, which the
         * hardware prefetcher does not fetch ahead; requested here, they are in L2 when the next chunk starts */
        for (int64_t j = c1; j < c1 + (c1 - c0) && j < N; j += 32) _mm_prefetch((const char *)(x + m * N + j), _MM_HINT_T1);
        for (int64_t j = c0; j < c1; j += 16) {
            const __m512 v = load16(x, 1, m * N + j, lanes_left(N - j));
            _mm_store_si128((__m128i *)(o + j - c0), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv))));
        }
    }
}

/* Both products of a synchronous step in one read of W: out_down (M x N, bf16) = a . W * scale exactly as
 * seqep_down_int8, and out_up (M x K, fp32) = x . W^T exactly as seqep_up_int8. At 32-64 rows each product
 * alone streams all of W from memory; here the down product's B tiles, once loaded, are also turned into the
 * up layout (rows_down_to_up) in a per-thread scratch, and the up product reads that from cache. The shuffles
 * sit inside the down product's loop, where the core mostly waits for memory: as separate passes they cost
 * 2.5 ms more per call (1000 x 180,000, 32 rows; a software prefetch of the next chunk during them was slower
 * still). Threads own ranges of 64-column groups; their partial up sums (exact int32) are added at the end.
 * a: Mp x Kp int8 (zero past M, K); x: Mp x Np int8 (zero past M, N), or NULL and x_bf16 (M x N, the
 * retrieval's output) quantised here, a chunk of columns at a time, with the row factors row_scale (so its
 * separate quantisation pass, a read and a write of the whole state, is saved; the codes are the same:
 * round(x * (1 / row_scale)) as seqep_quantize_rows). acc: threads x Mp x Kp int32; scratch: threads x
 * chunk x Kp int8; x_stage: threads x Mp x chunk int8 (with x_bf16); all 64-byte aligned. chunk: columns per
 * pass (a multiple of 64), whose up layout and staged codes stay in L2 (amx_int8.fused_chunk). */
void seqep_down_up_int8(const int8_t *a, const int8_t *x, const uint16_t *x_bf16, const float *row_scale,
                        const int8_t *down, int64_t M, int64_t Mp, int64_t K, int64_t Kp, int64_t N, int64_t Np,
                        float scale, uint16_t *out_down, float *out_up, int32_t *acc, int8_t *scratch,
                        int8_t *x_stage, int64_t chunk, int threads) {
    const int64_t block = Kp / 4 * 64, ksteps = Kp / 64, groups = Np / 64, hpairs = Kp / 32, hblocks = Kp / 16;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int32_t *my_acc = acc + (int64_t)id * Mp * Kp;
        int8_t *my_scratch = scratch + (int64_t)id * chunk * Kp;
        int8_t *my_stage = x_bf16 ? x_stage + (int64_t)id * Mp * chunk : NULL;
        const int64_t g0 = groups * id / nt, g1 = groups * (id + 1) / nt;
        for (int64_t c0 = 64 * g0; c0 < 64 * g1; c0 += chunk) {
            const int64_t c1 = c0 + chunk < 64 * g1 ? c0 + chunk : 64 * g1, rows4 = (c1 - c0) / 4;
            for (int64_t pair = c0 / 32; pair < c1 / 32; ++pair) /* down, and the pair into the up layout */
                for (int64_t m0 = 0; m0 < Mp; m0 += 32)
                    down_pair(a + m0 * Kp, Kp, down + 2 * pair * block, ksteps,
                              m0 == 0 ? my_scratch + 4 * (2 * pair - c0 / 16) * 64 : NULL, rows4, M - m0,
                              N - 32 * pair, scale, out_down + m0 * N + 32 * pair, N);
            if (x_bf16) stage_codes(x_bf16, row_scale, M, Mp, N, c0, c1, chunk, my_stage);
            for (int64_t p = 0; p < hpairs; ++p) { /* up: this chunk's share of the reduction over N */
                const int8_t *b0 = my_scratch + 2 * p * rows4 * 64, *b1 = b0 + rows4 * 64;
                for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
                    int32_t *c00 = my_acc + ((m0 / 16) * hblocks + 2 * p) * 256, *c10 = c00 + hblocks * 256;
                    if (c0 == 64 * g0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else {
                        _tile_loadd(0, c00, 64); _tile_loadd(1, c10, 64);
                        _tile_loadd(2, c00 + 256, 64); _tile_loadd(3, c10 + 256, 64);
                    }
                    const int64_t lda = x_bf16 ? chunk : Np;
                    const int8_t *a0 = x_bf16 ? my_stage + m0 * chunk : x + m0 * Np + c0, *a1 = a0 + 16 * lda;
                    for (int64_t s = 0; s < (c1 - c0) / 64; ++s)
                        quad_step(a0 + s * 64, a1 + s * 64, lda, b0 + s * 1024, b1 + s * 1024);
                    _tile_stored(0, c00, 64); _tile_stored(1, c10, 64);
                    _tile_stored(2, c00 + 256, 64); _tile_stored(3, c10 + 256, 64);
                }
            }
        }
        if (g1 == g0) memset(my_acc, 0, (size_t)(Mp * Kp) * sizeof(int32_t)); /* more threads than groups */
        _mm_sfence();
        _tile_release();
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            const __m512 s = _mm512_set1_ps(row_scale[m] * scale);
            const int64_t row = ((m / 16) * hblocks) * 256 + (m % 16) * 16;
            for (int64_t hb = 0; hb < hblocks && 16 * hb < K; ++hb) {
                __m512i sum = _mm512_load_si512(acc + row + hb * 256);
                for (int t = 1; t < nt; ++t) sum = _mm512_add_epi32(sum, _mm512_load_si512(acc + t * Mp * Kp + row + hb * 256));
                _mm512_mask_storeu_ps(out_up + m * K + 16 * hb, lanes_left(K - 16 * hb), _mm512_mul_ps(_mm512_cvtepi32_ps(sum), s));
            }
        }
    }
}
