/* One fused Llama forward for a few rows on an x86-64 CPU with AVX512-BF16.
 *
 * Why: a one-token decode step of a small model on two cores is bound by reading the
 * weights once (269 MB bf16 for SmolLM2-135M), but the eager torch path spends half
 * of its ~25 ms in ~2,000 small ops and its GEMVs stream at ~18 GB/s. Here the whole
 * forward is one call: each thread streams its own arena (its rows of every matrix,
 * in the order they are used, on huge pages) so the prefetcher sees one sequential
 * read per core, and norms, RoPE, the KV write, attention and SwiGLU run between the
 * GEMVs without leaving C.
 *
 * Rows are independent: a row's result does not depend on which other rows share the
 * call (every dot product runs the same instructions in the same order), so a draft
 * tree verified in one forward gives bit-identical logits to decoding its accepted
 * path one token at a time. That is what keeps speculation lossless here.
 *
 * Numerics: weights, KV cache and GEMV inputs are bf16 (round to nearest even); dot
 * products accumulate in fp32; the residual stream, norms, RoPE and softmax are fp32.
 * Layout of the KV cache and block tables: treespec_kernels/__init__.py. The same forward runs an
 * EAGLE drafter (an input projection instead of the embedding, no final norm); Medusa's
 * heads have their own small entry point. A drafter's matrices may be int8 (gemv_amx_i8:
 * drafts only rank candidates, verification keeps the output exact). Engine side:
 * engine/fused.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <omp.h>

typedef uint16_t bf16;

/* Two builds of this file (treespec_kernels/cpu_fused.py picks one by the CPU's flags): AVX512-BF16
 * dot products, with AMX tiles where the CPU has them (this file), or AVX2 + FMA for x86-64
 * CPUs without AVX-512 (cpu_fused_avx2.h: the same pieces, fp32 multiply-adds on widened
 * bf16). What differs is below between #if FUSED_AVX512 and #endif; the rest is shared. */
#if defined(__AVX512BF16__)
#define FUSED_AVX512 1
#else
#define FUSED_AVX512 0
#endif

/* Software prefetch, into L2, this far ahead of the weight rows being read: the hardware
 * prefetcher alone leaves one core's stream at ~11 GB/s; 32 KiB ahead reaches ~29 GB/s on
 * two cores, and with DRAM reads in flight during the dot products, 8 rows cost about what
 * one does (16-32 KiB ahead measured best; L1 as the target was slower). */
#ifndef PF_ELEMS
#define PF_ELEMS 16384
#endif
/* KV rows are scattered over the cache and cold (the weight stream evicts them): attention
 * prefetches this many keys ahead (8-64 measured alike). */
#ifndef KV_AHEAD
#define KV_AHEAD 16
#endif

/* ---- small helpers ---------------------------------------------------------------- */

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One thread's share of a matrix: up to two row segments of its arena, written to
 * output columns out0.. and out1.. (gate and up of a SwiGLU sit in one share); amx: how
 * the arena holds these rows, PACK_* below (row-major for gemv, bf16 tiles for gemv_amx,
 * int8 tiles and row scales for gemv_amx_i8; in the AVX2 build, bf16 or int8 16-row
 * panels for gemv_panels(_i8), each segment padded to whole panels, int8 row scales after
 * both segments). */
typedef struct { uint64_t ptr, out0, n0, out1, n1, amx; } Share;

enum { PACK_ROWS = 0, PACK_TILES = 1, PACK_TILES_INT8 = 2, PACK_PANELS = 3, PACK_PANELS_INT8 = 4,
       PACK_ROWS_INT8 = 5 };  /* Share.amx */

/* Inserts row[i + l], for each set bit l of lanes, into top/at (the k best so far, sorted,
 * best first, ties: the lower index) where it beats the k-th: rare after a row's first
 * few chunks, so the vector scans of both builds call this only on a hit. */
static void topk_insert(const float* row, int64_t i, unsigned lanes, int64_t k, float* top, int64_t* at) {
    while (lanes) {
        const int l = __builtin_ctz(lanes);
        lanes &= lanes - 1;
        const float val = row[i + l];
        if (!(val > top[k - 1])) continue;
        int j = (int)k - 1;
        while (j > 0 && top[j - 1] < val) { top[j] = top[j - 1]; at[j] = at[j - 1]; j--; }
        top[j] = val;
        at[j] = i + l;
    }
}

#if FUSED_AVX512

/* 16 fp32 -> 16 bf16, rounded to nearest even like torch (NaN stays NaN). */
static inline __m256i cvt16_bf16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

static inline __mmask16 tail16(int left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

static void to_bf16(const float* x, bf16* y, int n) {
    for (int i = 0; i < n; i += 16)
        _mm256_mask_storeu_epi16(y + i, tail16(n - i), cvt16_bf16(_mm512_maskz_loadu_ps(tail16(n - i), x + i)));
}

static inline __m512 load16_bf16(__mmask16 m, const bf16* p) {  /* 16 bf16 (lanes in m) -> 16 fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* e^x for 16 lanes: Cody-Waite reduction to |r| <= ln2/2, degree-6 Taylor (rel. err ~2e-7). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Four dot products' fp32 lanes summed as one 4-wide result; reduce1 gives, bit for bit,
 * the lane reduce4 would give the same vector, so a score never depends on which
 * other keys shared its tile (tree rows must match decoding their path exactly). */
static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m256 h[4];
    __m512 a[4] = {a0, a1, a2, a3};
    for (int i = 0; i < 4; i++)
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* reduce4 for int32 lanes: the four sums of a0..a3. */
static inline __m128i reduce4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    __m256i h[4];
    __m512i a[4] = {a0, a1, a2, a3};
    for (int i = 0; i < 4; i++) h[i] = _mm256_add_epi32(_mm512_castsi512_si256(a[i]), _mm512_extracti64x4_epi64(a[i], 1));
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(h[0], h[1]), _mm256_hadd_epi32(h[2], h[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* ---- GEMV: Y[m][r] = W[r] . X[m] for a few rows m ------------------------------------ */

/* R weight rows x MC input rows, all of K; R and MC are constants after inlining, so
 * the R*MC accumulators live in registers. The weight rows come from DRAM on the first
 * input chunk and from L1 after that. */
static inline __attribute__((always_inline)) void dot_tile(
    const bf16* W, int K, const bf16* X, int ldx, float* Y, int ldy, const int R, const int MC) {
    __m512 acc[4][6];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < MC; j++) acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i w[4];
        for (int i = 0; i < R; i++) {
            w[i] = _mm512_loadu_si512(W + (size_t)i * K + k);
            _mm_prefetch((const char*)(W + (size_t)i * K + k + PF_ELEMS), _MM_HINT_T1);
        }
        for (int j = 0; j < MC; j++) {
            __m512i x = _mm512_loadu_si512(X + (size_t)j * ldx + k);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i], (__m512bh)x);
        }
    }
    if (k < K) {  /* masked tail: K not a multiple of 32 */
        __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        __m512i w[4];
        for (int i = 0; i < R; i++) w[i] = _mm512_maskz_loadu_epi16(m, W + (size_t)i * K + k);
        for (int j = 0; j < MC; j++) {
            __m512i x = _mm512_maskz_loadu_epi16(m, X + (size_t)j * ldx + k);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i], (__m512bh)x);
        }
    }
    if (R == 4) {  /* 4 sums per input row at once: ~half the shuffles of 4 reduce_adds */
        for (int j = 0; j < MC; j++) _mm_storeu_ps(Y + (size_t)j * ldy, reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
    } else {
        for (int i = 0; i < R; i++)
            for (int j = 0; j < MC; j++) Y[(size_t)j * ldy + i] = _mm512_reduce_add_ps(acc[i][j]);
    }
}

#define TILE_CASES(R)                                                   \
    switch (mc) {                                                       \
        case 1: dot_tile(W, K, X, ldx, Y, ldy, R, 1); break;            \
        case 2: dot_tile(W, K, X, ldx, Y, ldy, R, 2); break;            \
        case 3: dot_tile(W, K, X, ldx, Y, ldy, R, 3); break;            \
        case 4: dot_tile(W, K, X, ldx, Y, ldy, R, 4); break;            \
        case 5: dot_tile(W, K, X, ldx, Y, ldy, R, 5); break;            \
        default: dot_tile(W, K, X, ldx, Y, ldy, R, 6); break;           \
    }

static void tile4(const bf16* W, int K, const bf16* X, int ldx, float* Y, int ldy, int mc) { TILE_CASES(4) }
static void tile1(const bf16* W, int K, const bf16* X, int ldx, float* Y, int ldy, int mc) { TILE_CASES(1) }

/* Y[m * ldy + r] = W[r] . X[m * ldx], r < nrows, m < M. */
static void gemv(const bf16* W, int nrows, int K, const bf16* X, int ldx, int M, float* Y, int ldy) {
    int r = 0;
    for (; r + 4 <= nrows; r += 4)
        for (int m = 0; m < M; m += 6)
            tile4(W + (size_t)r * K, K, X + (size_t)m * ldx, ldx, Y + (size_t)m * ldy + r, ldy, M - m);
    for (; r < nrows; r++)
        for (int m = 0; m < M; m += 6)
            tile1(W + (size_t)r * K, K, X + (size_t)m * ldx, ldx, Y + (size_t)m * ldy + r, ldy, M - m);
}

/* ---- AMX: the same products as tile matrix multiplications ----------------------------
 *
 * On a CPU with AMX (Sapphire Rapids and later) one TDPBF16PS multiplies a 16 x 32 bf16
 * tile of inputs by a 32 x 16 tile of weights (~16x the multiply-adds per cycle of
 * AVX512-BF16), so a tree of 8-32 rows costs about what one row does: the step stays
 * bound by reading the weights. Weights are packed at load (engine/fused.py) as
 * [16-row blocks, in pairs][K / 32][the pair's two blocks][16 k pairs][16 rows][2],
 * which is the B operand's layout, one sequential stream per thread. A row's results do
 * not depend on the other rows of the call: each output element is its own chain of
 * multiply-adds over K in the same order. The kernel uses AMX for every row count on
 * such a CPU, so a tree row and the same token decoded alone match bit for bit. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles: 0-3 accumulators (rows a|b x blocks 0|1), 4-5 inputs (rows a|b), 6-7 weights.
 * Each GEMV loads its configuration; a thread releases its tiles when its forward ends
 * (releasing after every GEMV made one-row steps ~40% slower). */
static __thread int tiles_in_use;

/* GCC does not model that LDTILECFG and TILELOADD read memory: stores to a local buffer
 * that only a tile instruction reads may be dropped as dead. This barrier, taking the
 * buffer's address, makes them happen first. */
#define WRITTEN_FOR_TILES(p) __asm__ volatile("" : : "r"(p) : "memory")

/* Configures tiles 0-7 with rows[i] rows of 64 bytes each (0: unused; touching an
 * unconfigured tile faults). */
static void load_tile_config(const int rows[8]) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.rows[i] = (uint8_t)rows[i];
        c.colsb[i] = rows[i] ? 64 : 0;
    }
    WRITTEN_FOR_TILES(&c);
    _tile_loadconfig(&c);
    tiles_in_use = 1;
}

static void amx_config(int ma, int mb) {
    const int rows[8] = {ma, ma, mb, mb, ma, mb, 16, 16};
    load_tile_config(rows);
}

static void amx_release(void) {
    if (tiles_in_use) _tile_release();
    tiles_in_use = 0;
}

/* One block of 16 weight rows (two: 32) of a tile-packed GEMV, over all KB column tiles:
 * accumulators 0-1 (input rows a) and 2-3 (rows b, when mb) are zeroed, then per column
 * tile: inputs into tiles 4/5 (KC columns, row stride SX bytes), the block's weight tiles
 * into 6/7 (the second HALF elements after the first), and DP, the tile product
 * (_tile_dpbf16ps for bf16, _tile_dpbssd for int8). w advances STEP elements a tile; the
 * prefetch runs PF elements ahead. Uses two, mb and KB of the enclosing GEMV. */
#define AMX_BLOCK(DP, w, STEP, HALF, xa, xb, KC, SX, PF)                                         \
    do {                                                                                        \
        _tile_zero(0); /* touching an unconfigured tile (rows 0) faults */                     \
        if (two) _tile_zero(1);                                                                 \
        if (mb) { _tile_zero(2); if (two) _tile_zero(3); }                                      \
        for (int kb = 0; kb < KB; kb++, w += (STEP)) {                                          \
            for (int i = 0; i < (STEP); i += 64 / (int)sizeof(*w))                              \
                _mm_prefetch((const char*)(w + (PF) + i), _MM_HINT_T1);                         \
            _tile_loadd(4, xa + kb * (KC), SX);                                                 \
            _tile_loadd(6, w, 64);                                                              \
            DP(0, 4, 6);                                                                        \
            if (two) { _tile_loadd(7, w + (HALF), 64); DP(1, 4, 7); }                           \
            if (mb) {                                                                           \
                _tile_loadd(5, xb + kb * (KC), SX);                                             \
                DP(2, 5, 6);                                                                    \
                if (two) DP(3, 5, 7);                                                           \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* Y[m * ldy + r] = W[r] . X[m * ldx] with W tile-packed; nrows % 16 == 0, K % 32 == 0. */
static void gemv_amx(const bf16* W, int nrows, int K, const bf16* X, int ldx, int M, float* Y, int ldy) {
    const int KB = K / 32;
    const long sx = (long)ldx * 2, sy = (long)ldy * 4;
    for (int m0 = 0; m0 < M; m0 += 32) {
        const int ma = M - m0 < 16 ? M - m0 : 16, mb = M - m0 > 32 ? 16 : (M - m0 > 16 ? M - m0 - 16 : 0);
        amx_config(ma, mb);
        const bf16* xa = X + (size_t)m0 * ldx, * xb = xa + (size_t)16 * ldx;
        float* ya = Y + (size_t)m0 * ldy, * yb = ya + (size_t)16 * ldy;
        const bf16* w = W;
        for (int o = 0; o < nrows;) {
            const int two = nrows - o >= 32, step = two ? 1024 : 512;
            AMX_BLOCK(_tile_dpbf16ps, w, step, 512, xa, xb, 32, sx, PF_ELEMS);
            _tile_stored(0, ya + o, sy);
            if (two) _tile_stored(1, ya + o + 16, sy);
            if (mb) {
                _tile_stored(2, yb + o, sy);
                if (two) _tile_stored(3, yb + o + 16, sy);
            }
            o += two ? 32 : 16;
        }
    }
}

/* ---- int8 weights on AMX (a drafter's option) ------------------------------------------
 *
 * A drafter call streams all its weights for a few rows, so int8 weights halve its time;
 * drafts only have to rank tokens well (verification keeps the output exact), so a
 * drafter may use them (engine/fused.py, ``int8``). Weights are quantized per output row
 * at load (w ~ sw[r] * wq[r][k]), the GEMV input per row at each call (x ~ sx[m] * xq[m][k],
 * symmetric, round to nearest even), TDPBSSD sums the products exactly in int32, and
 * y[m][r] = (acc * sx[m]) * sw[r]. Packed like the bf16 tiles, with 64 columns per tile:
 * [16-row blocks, in pairs][K / 64][the pair's two blocks][16 k quads][16 rows][4], then
 * the rows' fp32 scales after the share's weights. */

/* q[m * K + k] = rint(x[m * ldx + k] * 127 / amax_m) ^ flip, s[m] = amax_m / 127; K % 16 == 0.
 * flip 0x80 stores xq + 128 as unsigned bytes (gemv_vnni_i8's input), 0 the int8 itself. */
static void quantize_rows(const bf16* X, int ldx, int M, int K, int8_t* q, float* s, uint8_t flip) {
    const __m128i fl = _mm_set1_epi8((char)flip);
    for (int m = 0; m < M; m++) {
        const bf16* x = X + (size_t)m * ldx;
        __m512 amax = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_bf16(0xffff, x + k)));
        const float a = _mm512_reduce_max_ps(amax);
        const __m512 inv = _mm512_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
        s[m] = a / 127.0f;
        for (int k = 0; k < K; k += 16)
            _mm_storeu_si128((__m128i*)(q + (size_t)m * K + k),
                             _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(
                                 _mm512_mul_ps(load16_bf16(0xffff, x + k), inv))), fl));
    }
}

/* Y[m * ldy + r] = (acc * sx[m]) * sw[r], acc = sum_k X[m][k] * W[r][k] in int32; X int8
 * [M, K] (row stride K); nrows % 16 == 0, K % 64 == 0. */
static void gemv_amx_i8(const int8_t* W, const float* sw, int nrows, int K, const int8_t* X, const float* sx,
                        int M, float* Y, int ldy) {
    const int KB = K / 64;
    int32_t acc[16][16] __attribute__((aligned(64)));
    for (int m0 = 0; m0 < M; m0 += 32) {
        const int ma = M - m0 < 16 ? M - m0 : 16, mb = M - m0 > 32 ? 16 : (M - m0 > 16 ? M - m0 - 16 : 0);
        amx_config(ma, mb);
        const int8_t* xa = X + (size_t)m0 * K, * xb = xa + (size_t)16 * K;
        const int8_t* w = W;
        for (int o = 0; o < nrows;) {
            const int two = nrows - o >= 32, step = two ? 2048 : 1024;
            AMX_BLOCK(_tile_dpbssd, w, step, 1024, xa, xb, 64, K, 2 * PF_ELEMS);
/* scale accumulator tile C (rows `rows` from input row m) into output rows from o + c0 */
#define I8_OUT(C, rows, m, c0)                                                                  \
    do {                                                                                        \
        _tile_stored(C, acc, 64);                                                               \
        const __m512 wsc = _mm512_loadu_ps(sw + o + (c0));                                      \
        for (int i = 0; i < (rows); i++) {                                                      \
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc[i])),         \
                                           _mm512_set1_ps(sx[(m) + i]));                         \
            _mm512_storeu_ps(Y + (size_t)((m) + i) * ldy + o + (c0), _mm512_mul_ps(v, wsc));     \
        }                                                                                       \
    } while (0)
            I8_OUT(0, ma, m0, 0);
            if (two) I8_OUT(1, ma, m0, 16);
            if (mb) {
                I8_OUT(2, mb, m0 + 16, 0);
                if (two) I8_OUT(3, mb, m0 + 16, 16);
            }
#undef I8_OUT
            o += two ? 32 : 16;
        }
    }
}

/* ---- int8 weights without AMX: AVX512-VNNI (a drafter's option) -----------------------
 *
 * The same W8A8 product as gemv_amx_i8 for AVX-512 CPUs without tiles (AMD Zen 4 and 5,
 * Cascade/Cooper Lake): VPDPBUSD multiplies unsigned by signed bytes, so the quantized
 * input is offset to xu = xq + 128 (quantize_rows flips the sign bit) and each row's sum of weights
 * taken back out: sum_k xu[k] w[k] - 128 sum_k w[k] = sum_k xq[k] w[k], the same exact
 * int32 as TDPBSSD's, so a drafter drafts the same trees on either. Weights row-major
 * like PACK_ROWS (int8), then the rows' fp32 scales, then their int32 sums. Half the
 * bytes of bf16 rows and a quarter of the multiply instructions (64 products each). */

/* acc[i][j] over all of K for R weight rows x MC input rows; R, MC constants after inlining. */
static inline __attribute__((always_inline, target("avx512vnni"))) void dot_tile_i8(
    const int8_t* W, const float* sw, const int32_t* wsum, int K, const uint8_t* X, const float* sx,
    float* Y, int ldy, const int R, const int MC) {
    __m512i acc[4][6];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < MC; j++) acc[i][j] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 64) {
        __m512i w[4];
        for (int i = 0; i < R; i++) {
            w[i] = _mm512_loadu_si512(W + (size_t)i * K + k);
            _mm_prefetch((const char*)(W + (size_t)i * K + k + 2 * PF_ELEMS), _MM_HINT_T1);
        }
        for (int j = 0; j < MC; j++) {
            const __m512i x = _mm512_loadu_si512(X + (size_t)j * K + k);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], x, w[i]);
        }
    }
    if (R == 4) {  /* 4 sums per input row at once, as reduce4 (at K = 576 the reductions
                    * cost about what the dot products do) */
        const __m128i off = _mm_mullo_epi32(_mm_loadu_si128((const __m128i*)wsum), _mm_set1_epi32(128));
        const __m128 wsc = _mm_loadu_ps(sw);
        for (int j = 0; j < MC; j++) {
            const __m128i dot = _mm_sub_epi32(reduce4_epi32(acc[0][j], acc[1][j], acc[2][j], acc[3][j]), off);
            _mm_storeu_ps(Y + (size_t)j * ldy, _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(dot), _mm_set1_ps(sx[j])), wsc));
        }
        return;
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < MC; j++) {
            const int32_t dot = _mm512_reduce_add_epi32(acc[i][j]) - 128 * wsum[i];
            Y[(size_t)j * ldy + i] = ((float)dot * sx[j]) * sw[i];  /* gemv_amx_i8's order */
        }
}

#define TILE_I8_CASES(R)                                                              \
    switch (mc) {                                                                     \
        case 1: dot_tile_i8(W, sw, wsum, K, X, sx, Y, ldy, R, 1); break;              \
        case 2: dot_tile_i8(W, sw, wsum, K, X, sx, Y, ldy, R, 2); break;              \
        case 3: dot_tile_i8(W, sw, wsum, K, X, sx, Y, ldy, R, 3); break;              \
        case 4: dot_tile_i8(W, sw, wsum, K, X, sx, Y, ldy, R, 4); break;              \
        case 5: dot_tile_i8(W, sw, wsum, K, X, sx, Y, ldy, R, 5); break;              \
        default: dot_tile_i8(W, sw, wsum, K, X, sx, Y, ldy, R, 6); break;             \
    }

__attribute__((target("avx512vnni"))) static void tile4_i8(const int8_t* W, const float* sw, const int32_t* wsum,
        int K, const uint8_t* X, const float* sx, float* Y, int ldy, int mc) { TILE_I8_CASES(4) }
__attribute__((target("avx512vnni"))) static void tile1_i8(const int8_t* W, const float* sw, const int32_t* wsum,
        int K, const uint8_t* X, const float* sx, float* Y, int ldy, int mc) { TILE_I8_CASES(1) }

/* Y[m * ldy + r] = (acc * sx[m]) * sw[r] as gemv_amx_i8, X the offset inputs xq + 128
 * [M, K] (row stride K); K % 64 == 0. */
static void gemv_vnni_i8(const int8_t* W, const float* sw, const int32_t* wsum, int nrows, int K,
                         const uint8_t* X, const float* sx, int M, float* Y, int ldy) {
    int r = 0;
    for (; r + 4 <= nrows; r += 4)
        for (int m = 0; m < M; m += 6)
            tile4_i8(W + (size_t)r * K, sw + r, wsum + r, K, X + (size_t)m * K, sx + m, Y + (size_t)m * ldy + r, ldy,
                     M - m);
    for (; r < nrows; r++)
        for (int m = 0; m < M; m += 6)
            tile1_i8(W + (size_t)r * K, sw + r, wsum + r, K, X + (size_t)m * K, sx + m, Y + (size_t)m * ldy + r, ldy,
                     M - m);
}

/* Where this thread quantizes an int8 share's GEMV input: scales [M] then int8 [M, K],
 * set by each forward for its call from its scratch (xq_bytes per thread). Each thread
 * quantizes the whole input for its own share: a few rows, cheaper than a barrier. */
static __thread float* xq_scale;
static __thread int8_t* xq_buf;

static size_t xq_bytes(int M, int kmax) { return (size_t)M * (sizeof(float) + kmax); }

static void xq_use(uint8_t* block, int M) {
    xq_scale = (float*)block;
    xq_buf = (int8_t*)(block + sizeof(float) * (size_t)M);
}

static void gemv_share(const Share* s, int K, const bf16* X, int ldx, int M, float* Y, int ldy) {
    if (s->amx == PACK_TILES_INT8) {
        quantize_rows(X, ldx, M, K, xq_buf, xq_scale, 0);
        const int8_t* W = (const int8_t*)(uintptr_t)s->ptr;
        const float* sw = (const float*)(W + (size_t)(s->n0 + s->n1) * K);
        gemv_amx_i8(W, sw, (int)s->n0, K, xq_buf, xq_scale, M, Y + s->out0, ldy);
        if (s->n1) gemv_amx_i8(W + (size_t)s->n0 * K, sw + s->n0, (int)s->n1, K, xq_buf, xq_scale, M, Y + s->out1, ldy);
        return;
    }
    if (s->amx == PACK_ROWS_INT8) {  /* int8 rows of both segments, their scales, their sums */
        quantize_rows(X, ldx, M, K, xq_buf, xq_scale, 0x80);  /* xq + 128 */
        const int8_t* W = (const int8_t*)(uintptr_t)s->ptr;
        const size_t rows = s->n0 + s->n1;
        const float* sw = (const float*)(W + rows * K);
        const int32_t* wsum = (const int32_t*)(sw + rows);
        const uint8_t* xu = (const uint8_t*)xq_buf;
        gemv_vnni_i8(W, sw, wsum, (int)s->n0, K, xu, xq_scale, M, Y + s->out0, ldy);
        if (s->n1)
            gemv_vnni_i8(W + (size_t)s->n0 * K, sw + s->n0, wsum + s->n0, (int)s->n1, K, xu, xq_scale, M,
                         Y + s->out1, ldy);
        return;
    }
    const bf16* W = (const bf16*)(uintptr_t)s->ptr;
    void (*f)(const bf16*, int, int, const bf16*, int, int, float*, int) = s->amx ? gemv_amx : gemv;
    f(W, (int)s->n0, K, X, ldx, M, Y + s->out0, ldy);
    if (s->n1) f(W + (size_t)s->n0 * K, (int)s->n1, K, X, ldx, M, Y + s->out1, ldy);
}

/* ---- pieces of a layer ------------------------------------------------------------ */

static void rms_norm_row(const float* x, const bf16* w, int n, float eps, bf16* out) {
    __m512 ss = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(tail16(n - i), x + i);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / n + eps));
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = tail16(n - i);
        __m512 wv = load16_bf16(m, w + i);
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv), wv);
        _mm256_mask_storeu_epi16(out + i, m, cvt16_bf16(v));
    }
}

/* silu(g) = g / (1 + e^-g), 16 lanes. */
static inline __m512 silu16(__m512 g) {
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}


/* sc[j * ld + i] = scale * (q_j . K_i): G bf16 queries [G, D] against the n keys at cache
 * slots ks (row `stride` elements apart from kbase), four keys per tile. */
static void qk_scores(const bf16* q, int G, const bf16* kbase, const int64_t* ks, int64_t stride, int n, int D,
                      float scale, float* sc, int ld) {
    for (int i = 0; i < n; i += 4) {
        const int nk = n - i < 4 ? n - i : 4;
        const bf16* kp[4];
        for (int c = 0; c < 4; c++) kp[c] = kbase + ks[i + (c < nk ? c : 0)] * stride;
        for (int c = i + KV_AHEAD; c < i + KV_AHEAD + 4 && c < n; c++)
            for (int d = 0; d < D; d += 32) _mm_prefetch((const char*)(kbase + ks[c] * stride + d), _MM_HINT_T0);
        for (int j0 = 0; j0 < G; j0 += 4) {
            const int nq = G - j0 < 4 ? G - j0 : 4;
            __m512 acc[4][4];
            for (int c = 0; c < 4; c++)
                for (int j = 0; j < 4; j++) acc[c][j] = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 32) {
                __mmask32 m = D - d >= 32 ? 0xffffffffu : (__mmask32)((1u << (D - d)) - 1);
                __m512i kv[4];
                for (int c = 0; c < 4; c++) kv[c] = _mm512_maskz_loadu_epi16(m, kp[c] + d);
                for (int j = 0; j < nq; j++) {
                    __m512i x = _mm512_maskz_loadu_epi16(m, q + (size_t)(j0 + j) * D + d);
                    for (int c = 0; c < 4; c++) acc[c][j] = _mm512_dpbf16_ps(acc[c][j], (__m512bh)kv[c], (__m512bh)x);
                }
            }
            for (int j = 0; j < nq; j++) {
                float v[4];
                _mm_storeu_ps(v, reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
                for (int c = 0; c < nk; c++) sc[(size_t)(j0 + j) * ld + i + c] = v[c] * scale;
            }
        }
    }
}

/* 16 x 16 dwords in place: r[i] element j <-> r[j] element i. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* now r[4a + b] holds, in each 128-bit lane l, elements (row 4l' .. of) column 4 * lane + b
     * of rows 4a .. 4a + 3; two rounds of 128-bit shuffles gather the lanes */
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* The next-but-KV_AHEAD block of up to 16 keys after the one at i (of n), all D dims, into L1. */
static inline void prefetch_key_block(const bf16* kbase, const int64_t* ks, int64_t stride, int i, int n, int D) {
    for (int c = i + KV_AHEAD; c < i + KV_AHEAD + 16 && c < n; c++)
        for (int d = 0; d < D; d += 32) _mm_prefetch((const char*)(kbase + ks[c] * stride + d), _MM_HINT_T0);
}

/* kt[p] = dims d0 + 2p and d0 + 2p + 1 of keys ks[0..nk) side by side (16 lanes of bf16
 * pairs, zero past nk): 32 dims of 16 keys, loaded and transposed (transpose16). */
static inline void load_keys_t(const bf16* kbase, const int64_t* ks, int64_t stride, int nk, int d0, __m512i kt[16]) {
    for (int c = 0; c < 16; c++)
        kt[c] = c < nk ? _mm512_loadu_si512(kbase + ks[c] * stride + d0) : _mm512_setzero_si512();
    transpose16(kt);
}

/* qk_scores with the keys in lanes (D % 32 == 0): per 16 keys, each 32-dim chunk of them is
 * transposed (transpose16: row p = dim pair p of the 16 keys), so a query's 16 scores are one
 * chain of D / 2 pair products against its broadcast dim pairs, with no horizontal sums;
 * queries go 8 at a time (8 independent chains). The chain continues across chunks through
 * sc (fp32 stores and loads are exact). Writes up to 16 columns past n (the caller's ld leaves
 * room). A score is one chain over D in a fixed order whatever keys and queries share the
 * call, so tree rows stay bit-identical to decoding. */
static void qk_scores_t(const bf16* q, int G, const bf16* kbase, const int64_t* ks, int64_t stride, int n, int D,
                        float scale, float* sc, int ld) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (int i = 0; i < n; i += 16) {
        const int nk = n - i < 16 ? n - i : 16;
        prefetch_key_block(kbase, ks, stride, i, n, D);
        for (int d0 = 0; d0 < D; d0 += 32) {
            const int first = d0 == 0, last = d0 + 32 >= D;
            __m512i kt[16];
            load_keys_t(kbase, ks + i, stride, nk, d0, kt);
            for (int j0 = 0; j0 < G; j0 += 8) {
                const int nq = G - j0 < 8 ? G - j0 : 8;
                __m512 acc[8];
                for (int j = 0; j < 8; j++)
                    acc[j] = j < nq && !first ? _mm512_loadu_ps(sc + (size_t)(j0 + j) * ld + i) : _mm512_setzero_ps();
                for (int p = 0; p < 16; p++)
                    for (int j = 0; j < 8; j++)
                        if (j < nq) {
                            const int32_t pair = ((const int32_t*)(q + (size_t)(j0 + j) * D + d0))[p];
                            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)kt[p], (__m512bh)_mm512_set1_epi32(pair));
                        }
                for (int j = 0; j < nq; j++)
                    _mm512_storeu_ps(sc + (size_t)(j0 + j) * ld + i, last ? _mm512_mul_ps(acc[j], sv) : acc[j]);
            }
        }
    }
}

/* qk_scores on AMX tiles (D % 32 == 0, D <= 256): queries are the A operand, 16 keys at a
 * time the B operand (their rows transposed into the pair-interleaved layout), so each
 * tile of scores lands in sc directly; writes up to 16 columns past n (the caller's ld
 * leaves room). A score is one chain over D in a fixed order whatever tile its key and
 * query share, like the AVX512 path, so tree rows stay bit-identical to decoding. */
static void qk_scores_amx(const bf16* q, int G, const bf16* kbase, const int64_t* ks, int64_t stride, int n, int D,
                          float scale, float* sc, int ld) {
    const int KB = D / 32, full = G / 16 * 16, tail = G - full;
    const int rows[8] = {16, 16, 16, tail, tail, 0, 0, 0};  /* C, A (full query blocks); B; C, A (the rest) */
    load_tile_config(rows);
    __m512i kt[8][16];  /* per 32 dims: 16 rows (dim pairs) x 16 keys */
    for (int i = 0; i < n; i += 16) {
        const int nk = n - i < 16 ? n - i : 16;
        prefetch_key_block(kbase, ks, stride, i, n, D);
        for (int kb = 0; kb < KB; kb++) load_keys_t(kbase, ks + i, stride, nk, kb * 32, kt[kb]);
        WRITTEN_FOR_TILES(kt);
/* scores of the queries from g0 (tiles: accumulator CT, queries AT) against this key block;
 * a macro because tile numbers must be immediates */
#define QK_GROUP(CT, AT, g0)                                                   \
    do {                                                                       \
        _tile_zero(CT);                                                        \
        for (int kb = 0; kb < KB; kb++) {                                      \
            _tile_loadd(AT, q + (size_t)(g0) * D + kb * 32, (long)D * 2);      \
            _tile_loadd(2, kt[kb], 64);                                        \
            _tile_dpbf16ps(CT, AT, 2);                                         \
        }                                                                      \
        _tile_stored(CT, sc + (size_t)(g0) * ld + i, (long)ld * 4);            \
    } while (0)
        for (int g0 = 0; g0 < full; g0 += 16) QK_GROUP(0, 1, g0);
        if (tail) QK_GROUP(3, 4, full);
#undef QK_GROUP
    }
    const __m512 sv = _mm512_set1_ps(scale);
    for (int j = 0; j < G; j++)
        for (int i = 0; i < n; i += 16)
            _mm512_mask_storeu_ps(sc + (size_t)j * ld + i, tail16(n - i),
                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(tail16(n - i), sc + (size_t)j * ld + i), sv));
}

/* In place: sc[0..n) -> softmax(sc). */
static void softmax(float* sc, int n) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16)  /* max is exact in any order */
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail16(n - i), sc + i));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = tail16(n - i);
        __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + i), mx)));
        _mm512_mask_storeu_ps(sc + i, m, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int i = 0; i < n; i += 16)
        _mm512_mask_storeu_ps(sc + i, tail16(n - i), _mm512_mul_ps(_mm512_maskz_loadu_ps(tail16(n - i), sc + i), inv));
}

/* out[j * D + d] (+)= sum_i p[j * ld + i] * V_i[d] for G queries, V rows at slots ks. Keys
 * outermost: a V row is loaded once per block of 6 queries and each probability is
 * broadcast once for the whole row (4 FMAs per broadcast at D = 64). accumulate: continue
 * the sums already in out (the same fma chain as one call over both key lists: fp32
 * stores and loads are exact). D % 16 == 0. */
static void weighted_values(const float* p, int ld, int G, const bf16* vbase, const int64_t* ks, int64_t stride,
                            int n, int D, float* out, int accumulate) {
    const int DC = D / 16;
    for (int j0 = 0; j0 < G; j0 += 6) {
        const int nq = G - j0 < 6 ? G - j0 : 6;
        for (int c0 = 0; c0 < DC; c0 += 4) {  /* up to 4 chunks (64 dims) of the row at a time */
            const int nc = DC - c0 < 4 ? DC - c0 : 4;
            __m512 acc[6][4];
            for (int j = 0; j < 6; j++)
                for (int c = 0; c < 4; c++)
                    acc[j][c] = accumulate && j < nq && c < nc ? _mm512_loadu_ps(out + (size_t)(j0 + j) * D + (c0 + c) * 16)
                                                               : _mm512_setzero_ps();
            for (int i = 0; i < n; i++) {
                if (j0 == 0 && c0 == 0 && i + KV_AHEAD < n)
                    for (int e = 0; e < D; e += 32) _mm_prefetch((const char*)(vbase + ks[i + KV_AHEAD] * stride + e), _MM_HINT_T0);
                const bf16* vr = vbase + ks[i] * stride + c0 * 16;
                __m512 v[4];
                for (int c = 0; c < nc; c++) v[c] = load16_bf16(0xffff, vr + c * 16);
                for (int j = 0; j < nq; j++) {
                    const __m512 pj = _mm512_set1_ps(p[(size_t)(j0 + j) * ld + i]);
                    for (int c = 0; c < nc; c++) acc[j][c] = _mm512_fmadd_ps(pj, v[c], acc[j][c]);
                }
            }
            for (int j = 0; j < nq; j++)
                for (int c = 0; c < nc; c++) _mm512_storeu_ps(out + (size_t)(j0 + j) * D + (c0 + c) * 16, acc[j][c]);
        }
    }
}

/* AMX for the V sums: A = probabilities (bf16, up to 16 queries x 32 keys), B = 32 V rows
 * pair-interleaved for 16 dims, C = 16 queries x 16 dims (fp32). Tiles 0-3 accumulate
 * four 16-dim column blocks, 4 holds A, 5 holds B. */
static void pv_config(int queries) {
    const int rows[8] = {queries, queries, queries, queries, queries, 16, 0, 0};
    load_tile_config(rows);
}

/* a[r][k] = bf16(p[r * ldp + k]) for k < valid, 0 after; rows x 32. */
static void pv_probs(const float* p, int ldp, int rows, int valid, bf16 a[16][32]) {
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < 32; h += 16) {
            const int left = valid - h < 0 ? 0 : valid - h;
            _mm256_storeu_si256((__m256i*)(a[r] + h), cvt16_bf16(_mm512_maskz_loadu_ps(tail16(left), p + (size_t)r * ldp + h)));
        }
}

/* b: 16 rows (key pairs) x [16 dims x 2 keys] from 32 V rows (NULL: a zero row), dims d0.. */
static void pv_values(const bf16* const v[32], int d0, bf16 b[16][32]) {
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    for (int p = 0; p < 16; p++) {
        const __m512i a = v[2 * p] ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(v[2 * p] + d0)))
                                   : _mm512_setzero_si512();
        const __m512i c = v[2 * p + 1] ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(v[2 * p + 1] + d0)))
                                       : _mm512_setzero_si512();
        _mm512_storeu_si512(b[p], _mm512_permutex2var_epi16(a, idx, c));
    }
}

/* C tiles 0..nb-1 += A (probabilities of `rows` queries over one 32-key tile, from p) x
 * the tile's V rows, for the column blocks from cb0. */
static void pv_tile(const float* p, int ldp, int rows, int valid, const bf16* const v[32], int cb0, int nb) {
    bf16 a[16][32] __attribute__((aligned(64))), b[16][32] __attribute__((aligned(64)));
    pv_probs(p, ldp, rows, valid, a);
    WRITTEN_FOR_TILES(a);
    _tile_loadd(4, a, 64);
#define PV_BLOCK(C)                                            \
    if (nb > C) {                                              \
        pv_values(v, (cb0 + C) * 16, b);                       \
        WRITTEN_FOR_TILES(b);                                  \
        _tile_loadd(5, b, 64);                                 \
        _tile_dpbf16ps(C, 4, 5);                               \
    }
    PV_BLOCK(0) PV_BLOCK(1) PV_BLOCK(2) PV_BLOCK(3)
#undef PV_BLOCK
}

#define PV_TILES(OP)                                                            \
    do {                                                                        \
        if (nb > 0) OP(0, out + (size_t)0 * 16);                                \
        if (nb > 1) OP(1, out + (size_t)1 * 16);                                \
        if (nb > 2) OP(2, out + (size_t)2 * 16);                                \
        if (nb > 3) OP(3, out + (size_t)3 * 16);                                \
    } while (0)
#define PV_LOAD(C, at) _tile_loadd(C, at, (long)D * 4)
#define PV_STORE(C, at) _tile_stored(C, at, (long)D * 4)
#define PV_ZERO(C, at) _tile_zero(C)

/* One attention unit's V sums on AMX tiles: nr rows of `group` queries each; row i's
 * probabilities sit at sc[(i * group + j) * ld + k] over its key list (the ctx prefix
 * slots ps, then its own slots own[i][0 .. own_n[i])); out: fp32 [nr * group, D].
 * Every row's list is cut into 32-key tiles from its start: tiles wholly inside the
 * prefix are summed once for all the unit's queries, the rest per row, continuing the
 * same accumulators, so a row's result is the same chain of tile products whether a key
 * was prefix or its own (tree rows stay bit-identical to decoding). Probabilities are
 * rounded to bf16 for the tiles, as in flash attention. D % 16 == 0, group <= 16. */
static void values_amx(const float* sc, int ld, int nr, int group, int D, const bf16* vb, int64_t stride,
                       const int64_t* ps, int ctx, const int64_t* own_slots, const int64_t* own_at,
                       const int* own_n, int r0, float* ob) {
    const int Q = nr * group, shared = ctx / 32, DB = D / 16;
    const bf16* v[32];
    for (int q0 = 0; q0 < Q; q0 += 16) {
        const int mq = Q - q0 < 16 ? Q - q0 : 16;
        pv_config(mq);
        for (int cb0 = 0; cb0 < DB; cb0 += 4) {
            const int nb = DB - cb0 < 4 ? DB - cb0 : 4;
            float* out = ob + (size_t)q0 * D + cb0 * 16;
            PV_TILES(PV_ZERO);
            for (int t = 0; t < shared; t++) {
                for (int k = 0; k < 32; k++) v[k] = vb + ps[t * 32 + k] * stride;
                pv_tile(sc + (size_t)q0 * ld + t * 32, ld, mq, 32, v, cb0, nb);
            }
            PV_TILES(PV_STORE);
        }
    }
    pv_config(group);
    for (int i = 0; i < nr; i++) {
        const int64_t* own = own_slots + own_at[r0 + i];
        const int n = ctx + own_n[r0 + i];
        for (int cb0 = 0; cb0 < DB; cb0 += 4) {
            const int nb = DB - cb0 < 4 ? DB - cb0 : 4;
            float* out = ob + (size_t)i * group * D + cb0 * 16;
            PV_TILES(PV_LOAD);
            for (int k0 = shared * 32; k0 < n; k0 += 32) {
                for (int k = 0; k < 32; k++) {
                    const int key = k0 + k;
                    v[k] = key >= n ? NULL : vb + (key < ctx ? ps[key] : own[key - ctx]) * stride;
                }
                pv_tile(sc + (size_t)i * group * ld + k0, ld, group, n - k0, v, cb0, nb);
            }
            PV_TILES(PV_STORE);
        }
    }
}
#undef PV_TILES
#undef PV_LOAD
#undef PV_STORE
#undef PV_ZERO

/* (*m, *at) <- the larger of itself and the first maximum of x[0..n), whose indices are
 * base + i; on a tie the lower index wins, so scanning a row in pieces, in any order,
 * finds torch.argmax's first maximum. NaN never wins. */
static void first_max(const float* x, int64_t n, int64_t base, float* m, int64_t* at) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i where = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {  /* each lane keeps its first maximum */
        const __m512 v = _mm512_loadu_ps(x + i);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, gt, v);
        where = _mm512_mask_mov_epi32(where, gt, idx);
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
    }
    float lanes[16];
    int32_t lane_at[16];
    _mm512_storeu_ps(lanes, best);
    _mm512_storeu_si512(lane_at, where);
    for (int l = 0; l < 16; l++)
        if (lane_at[l] >= 0 && (lanes[l] > *m || (lanes[l] == *m && base + lane_at[l] < *at))) {
            *m = lanes[l];
            *at = base + lane_at[l];
        }
    for (; i < n; i++)
        if (x[i] > *m || (x[i] == *m && base + i < *at)) { *m = x[i]; *at = base + i; }
}

/* out[c] = bf16(silu(g[c]) * up[c]), c < n: SwiGLU. */
static void swiglu(const float* g, const float* up, int n, bf16* out) {
    for (int c = 0; c < n; c += 16) {
        const __mmask16 m = tail16(n - c);
        __m512 a = _mm512_mul_ps(silu16(_mm512_maskz_loadu_ps(m, g + c)), _mm512_maskz_loadu_ps(m, up + c));
        _mm256_mask_storeu_epi16(out + c, m, cvt16_bf16(a));
    }
}

/* A Medusa block's residual: f += silu(y + bias); out = bf16(f). n elements. */
static void silu_residual(float* f, const float* y, const bf16* bias, int n, bf16* out) {
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = tail16(n - i);
        __m512 z = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), load16_bf16(m, bias + i));
        __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, f + i), silu16(z));
        _mm512_mask_storeu_ps(f + i, m, v);
        _mm256_mask_storeu_epi16(out + i, m, cvt16_bf16(v));
    }
}

static void values_finish(float* out, int rows, int D) { (void)out; (void)rows; (void)D; }  /* dims in order */

/* The k largest of row[0..n) into top/at (kept sorted, best first, ties: lower index),
 * which hold k entries of -inf on entry; returns the row's maximum. */
static float topk_scan(const float* row, int64_t n, int64_t k, float* top, int64_t* at) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail16((int)(n - i < 16 ? n - i : 16));
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, row + i);
        vmax = _mm512_max_ps(vmax, v);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, _mm512_set1_ps(top[k - 1]), _CMP_GT_OQ);
        if (gt) topk_insert(row, i, gt, k, top, at);
    }
    return _mm512_reduce_max_ps(vmax);
}

static float sum_exp(const float* row, int64_t n, float mx) {  /* sum_i e^(row[i] - mx) */
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail16((int)(n - i < 16 ? n - i : 16));
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + i),
                                                                             _mm512_set1_ps(mx)))));
    }
    return _mm512_reduce_add_ps(sum);
}

/* Sum of x[lo, hi), read as the GEMVs read (a bandwidth probe, fused_stream_sum). */
static double stream_sum_part(const float* x, int64_t lo, int64_t hi) {
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = lo;
    for (; i + 64 <= hi; i += 64)
        for (int c = 0; c < 4; c++) {
            _mm_prefetch((const char*)(x + i + PF_ELEMS / 2 + 16 * c), _MM_HINT_T1);
            a[c] = _mm512_add_ps(a[c], _mm512_loadu_ps(x + i + 16 * c));
        }
    double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    for (; i < hi; i++) s += x[i];
    return s;
}

#else
#include "cpu_fused_avx2.h"
#endif

/* Asks Linux for the AMX tile state (once per process); 0 when granted. */
int fused_amx_enable(void) {
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

/* One packed matrix's GEMV, all of its thread shares (tests and benchmarks of the packings):
 * Y[m * ldy + r] = W[r] . X[m], X bf16 [M, K]. Returns 0, or -1 without scratch memory. */
int fused_gemv(const Share* shares, int64_t threads, int64_t K, const bf16* X, int64_t M, float* Y, int64_t ldy) {
    const size_t xq_per = xq_bytes((int)M, (int)K);
    uint8_t* xq = malloc(xq_per * threads);
    if (!xq) return -1;
#pragma omp parallel num_threads((int)threads)
    {
        const int t = omp_get_thread_num();
        xq_use(xq + xq_per * t, (int)M);
        gemv_share(&shares[t], (int)K, X, (int)K, (int)M, Y, (int)ldy);
        amx_release();
    }
    free(xq);
    return 0;
}

/* Rotate-half RoPE of one head vector in place, with this row's cos/sin [D/2]. */
static void rope_head(float* v, const float* cs, const float* sn, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

/* ---- the forward -------------------------------------------------------------------- */

/* A packed model: a Llama decoder (token embeddings in, final norm, LM head), or an
 * EAGLE drafter (an input projection fc([embedding ; feature]) + bias in, no final norm,
 * the draft head). */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, layers, vocab, threads;
    int64_t fc_in;          /* 0, or the width of the rows the input projection reads */
    int64_t amx_attention;  /* attention scores on AMX tiles (qk_scores_amx) */
    float eps, scale;       /* RMSNorm epsilon, attention scale */
    const Share* shares;    /* [(4 * layers + 2) * threads]: qkv, o, gate_up, down per layer; head; fc */
    const uint64_t* norms;  /* [2 * layers + 1] addresses of bf16 [hidden] weights; an input norm's or the
                             * last 0: none (EAGLE-1/2's layer 0 has no input norm, a drafter no final norm) */
    const bf16* embed;      /* bf16 [vocab, hidden] (with fc_in: only for Batch.feats) */
    const float* inv_freq;  /* fp32 [head_dim / 2] */
    const bf16* fc_bias;    /* bf16 [hidden] or NULL */
} Model;

/* One forward: M rows of B sequences over a paged KV cache (layout: treespec_kernels/__init__.py).
 * Row r of sequence b sees the b's context_lens[b] cached tokens, then either its own
 * visible slots vis_slots[vis_ptr[r] .. vis_ptr[r + 1]) (when vis_ptr is set; in position
 * order, itself last), or the new rows of its sequence that tree_mask allows (NULL:
 * causal): tree_mask[r][j] lets it see row qsl[b] + j. */
typedef struct {
    bf16* kv;               /* bf16 [2, layers, num_blocks, block_size, kv_heads, head_dim] */
    int64_t num_blocks, block_size;
    int64_t M;
    const int64_t* ids;     /* [M] token ids (with fc_in: only for Batch.feats) */
    const int64_t* positions, * slots;  /* [M] */
    const int32_t* row_seq; /* [M] sequence of each row */
    const int32_t* block_tables;  /* [B, max_blocks] */
    int64_t max_blocks;
    const int32_t* context_lens, * qsl;  /* [B], [B + 1] */
    const uint8_t* tree_mask;  /* NULL or [M, mask_cols] */
    int64_t mask_cols;
    const int32_t* vis_ptr;    /* NULL or [M + 1] */
    const int64_t* vis_slots;
    const bf16* inputs;     /* [M, fc_in] with fc_in */
    int64_t R;
    const int64_t* logit_rows;  /* [R] -> logits fp32 [R, vocab] */
    bf16* hidden_out;       /* [M, hidden]: final-norm (or, without one, last) hidden states */
    float* logits;
    int64_t* argmax;        /* NULL or [R]: each logits row's first maximum (greedy verification) */
    const uint64_t* feats;  /* NULL, or with fc_in and ids: [M] addresses of bf16 [fc_in - hidden]
                             * rows; input row m is then [embed[ids[m]] ; *feats[m]] (EAGLE: the
                             * token's embedding and a feature row, gathered here, not in torch) */
} Batch;

/* Returns 0, or -1 when scratch memory could not be allocated. */
int fused_forward(const Model* mdl, const Batch* bt_) {
    const int H = (int)mdl->hidden, NH = (int)mdl->heads, NKV = (int)mdl->kv_heads;
    const int D = (int)mdl->head_dim, I = (int)mdl->inter, L = (int)mdl->layers;
    const int V = (int)mdl->vocab, T = (int)mdl->threads, FC = (int)mdl->fc_in;
    const float eps = mdl->eps, scale = mdl->scale;
    const Share* shares = mdl->shares;
    const uint64_t* norms = mdl->norms;
    const int M = (int)bt_->M, R = (int)bt_->R, max_blocks = (int)bt_->max_blocks, mask_cols = (int)bt_->mask_cols;
    const int64_t BS = bt_->block_size, layer_slots = bt_->num_blocks * BS;
    const int64_t* slots = bt_->slots, * positions = bt_->positions, * logit_rows = bt_->logit_rows;
    const int32_t* row_seq = bt_->row_seq, * block_tables = bt_->block_tables;
    const int32_t* context_lens = bt_->context_lens, * qsl = bt_->qsl;
    const uint8_t* tree_mask = bt_->tree_mask;
    bf16* kv = bt_->kv, * hidden_out = bt_->hidden_out;
    float* logits = bt_->logits;
    const int QKV = (NH + 2 * NKV) * D, half = D / 2, group = NH / NKV;
    void (*qk)(const bf16*, int, const bf16*, const int64_t*, int64_t, int, int, float, float*, int) = qk_scores;
#if FUSED_AVX512
    if (mdl->amx_attention) qk = qk_scores_amx;
    else if (D % 32 == 0) qk = qk_scores_t;
#endif
    const int XB = H > NH * D ? H : NH * D;

    /* Key lists, the same for every layer: each sequence's prefix slots (shared by all its
     * rows) and each row's visible new slots (itself and, in a tree, its ancestors). */
    int B = 0;
    for (int r = 0; r < M; r++) B = row_seq[r] + 1 > B ? row_seq[r] + 1 : B;
    int64_t n_prefix = 0, max_new = 1;
    for (int b = 0; b < B; b++) {
        n_prefix += context_lens[b];
        max_new = qsl[b + 1] - qsl[b] > max_new ? qsl[b + 1] - qsl[b] : max_new;
    }
    /* Scratch sized once the key lists are known (NULL until then, so one cleanup frees all). */
    float* x = NULL, * y = NULL, * o = NULL, * cs = NULL, * scores = NULL, * obuf = NULL, * own_scores = NULL;
    bf16* xb = NULL, * act = NULL, * qbuf = NULL, * fc_in = NULL;
    uint8_t* xq = NULL, * parts = NULL;
    int64_t* prefix_slots = malloc(sizeof(int64_t) * (n_prefix + 1));
    int64_t* prefix_at = malloc(sizeof(int64_t) * (B + 1));
    const int64_t n_own = bt_->vis_ptr ? bt_->vis_ptr[M] : (int64_t)M * max_new;
    int64_t* own_slots = malloc(sizeof(int64_t) * (n_own + 1));
    int64_t* own_at = malloc(sizeof(int64_t) * (M + 1));
    int* own_n = malloc(sizeof(int) * M);
    /* Units of attention work: (sequence, KV head, part of its rows); where whole KV heads
     * cannot keep every thread busy, a tree's rows are split in T parts, each of which
     * reads the prefix once (below: which heads).
     * A part's own keys are scored once for all its queries, against the union of its
     * rows' visible new slots (uni_slots); own_col maps each row's k-th own key to its
     * column there. (One tile pass per unit: per row, the tile setup cost more than the
     * few scores.) */
    int* units = malloc(sizeof(int) * 6 * (size_t)(B * NKV * T + 1));
    int* own_col = malloc(sizeof(int) * (n_own + 1));
    int64_t* uni_slots = malloc(sizeof(int64_t) * (n_own + (int64_t)(T + 1) * M + 1));  /* parts' and whole unions */
#define FREE_SCRATCH()                                                                            \
    do {                                                                                          \
        free(x); free(y); free(o); free(xb); free(act); free(cs); free(scores); free(qbuf);        \
        free(obuf); free(own_scores); free(prefix_slots); free(prefix_at); free(own_slots);       \
        free(own_at); free(own_n); free(units); free(own_col); free(uni_slots); free(xq);         \
        free(parts); free(fc_in);                                                                 \
    } while (0)
    if (!prefix_slots || !prefix_at || !own_slots || !own_at || !own_n || !units || !own_col || !uni_slots) {
        FREE_SCRATCH();
        return -1;
    }
    int n_units = 0, max_part = 1, n_uni = 0, max_uni = 0;
    prefix_at[0] = 0;
    for (int b = 0; b < B; b++) {
        const int32_t* bt = block_tables + (size_t)b * max_blocks;
        int64_t* ps = prefix_slots + prefix_at[b];
        for (int p = 0; p < context_lens[b]; p++) ps[p] = (int64_t)bt[p / BS] * BS + p % BS;
        prefix_at[b + 1] = prefix_at[b] + context_lens[b];
        const int first = qsl[b], n_new = qsl[b + 1] - first;
        for (int r = first; r < first + n_new; r++) {
            own_n[r] = 0;
            if (bt_->vis_ptr) {
                own_at[r] = bt_->vis_ptr[r];
                own_n[r] = bt_->vis_ptr[r + 1] - bt_->vis_ptr[r];
                memcpy(own_slots + own_at[r], bt_->vis_slots + own_at[r], sizeof(int64_t) * own_n[r]);
                continue;
            }
            own_at[r] = (int64_t)r * max_new;
            for (int j = 0; j < n_new; j++) {
                int sees = tree_mask ? tree_mask[(size_t)r * mask_cols + j] : (first + j <= r);
                if (sees) {
                    own_col[own_at[r] + own_n[r]] = j;  /* the union below is the sequence's new slots */
                    own_slots[own_at[r] + own_n[r]++] = slots[first + j];
                }
            }
        }
        const int parts = n_new < T ? n_new : T, per = (n_new + parts - 1) / parts;
        /* Every part scores the whole prefix again, so a KV head's rows are split only where
         * whole heads cannot keep all threads busy: in a target's tree, the heads past a
         * multiple of T (3 heads on 2 threads: two whole, one split in two); in a drafter's
         * (vis_ptr: own-key columns are per union) every head. */
        const int whole = parts == 1 || bt_->vis_ptr ? 0 : NKV - NKV % T;
        for (int pass = 0; pass < 2; pass++) {  /* the whole heads [0, whole), then the split ones */
            const int step = pass == 0 ? n_new : per, h0 = pass == 0 ? 0 : whole, h1 = pass == 0 ? whole : NKV;
            if (h0 == h1) continue;  /* no heads of this kind */
            max_part = step > max_part ? step : max_part;
            for (int r0 = first; r0 < first + n_new; r0 += step) {
                const int r1 = r0 + step < first + n_new ? r0 + step : first + n_new, at = n_uni;
                for (int r = r0; r < r1; r++)
                    for (int k = 0; k < own_n[r]; k++) {
                        if (bt_->vis_ptr) {  /* first-seen order; draft trees are small */
                            const int64_t slot = own_slots[own_at[r] + k];
                            int j = at;
                            while (j < n_uni && uni_slots[j] != slot) j++;
                            if (j == n_uni) uni_slots[n_uni++] = slot;
                            own_col[own_at[r] + k] = j - at;
                        } else {  /* column j is new row first + j in every union */
                            const int j = own_col[own_at[r] + k];
                            while (n_uni - at <= j) { uni_slots[n_uni] = slots[first + n_uni - at]; n_uni++; }
                        }
                    }
                max_uni = n_uni - at > max_uni ? n_uni - at : max_uni;
                for (int kvh = h0; kvh < h1; kvh++) {
                    int* u = units + 6 * n_units++;
                    u[0] = b; u[1] = kvh; u[2] = r0; u[3] = r1; u[4] = at; u[5] = n_uni - at;
                }
            }
        }
    }
    int max_keys = 1;
    for (int r = 0; r < M; r++)
        if (context_lens[row_seq[r]] + own_n[r] > max_keys) max_keys = context_lens[row_seq[r]] + own_n[r];
    x = malloc(sizeof(float) * M * H);              /* residual stream */
    y = malloc(sizeof(float) * M * (QKV > 2 * I ? QKV : 2 * I));  /* GEMV outputs */
    o = malloc(sizeof(float) * M * H);
    xb = malloc(sizeof(bf16) * M * XB);              /* bf16 GEMV input */
    act = malloc(sizeof(bf16) * M * I);              /* SwiGLU output */
    cs = malloc(sizeof(float) * M * half * 2);      /* cos, sin per row */
    const int ld = (max_keys + 31) / 16 * 16, QU = max_part * group;  /* one query's scores; queries per unit */
    scores = malloc(sizeof(float) * (size_t)T * QU * ld);
    qbuf = malloc(sizeof(bf16) * (size_t)T * QU * D);
    obuf = malloc(sizeof(float) * (size_t)T * QU * D);
    const int uld = (max_uni + 31) / 16 * 16;  /* a query's scores against its part's own keys */
    own_scores = malloc(sizeof(float) * (size_t)T * QU * uld);
    const int MQ = M > R ? M : R;
    int KQ = XB > I ? XB : I;  /* the widest GEMV input */
    if (FC > KQ) KQ = FC;
    const size_t xq_per = xq_bytes(MQ, KQ);  /* int8 shares' quantized inputs, per thread */
    xq = malloc(xq_per * T);
    parts = malloc((sizeof(float) + sizeof(int64_t)) * (size_t)T * (R + 1));  /* per-thread argmax parts */
    float* part_max = (float*)(parts + sizeof(int64_t) * (size_t)T * (R + 1));
    int64_t* part_at = (int64_t*)parts;
    if (!x || !y || !o || !xb || !act || !cs || !scores || !qbuf || !obuf || !own_scores || !xq || !parts) {
        FREE_SCRATCH();
        return -1;
    }
    const bf16* fc_x = bt_->inputs;
    if (FC && bt_->feats) {  /* gather the [embedding ; feature] input rows */
        fc_in = malloc(sizeof(bf16) * (size_t)M * FC);
        if (!fc_in) {
            FREE_SCRATCH();
            return -1;
        }
        for (int r = 0; r < M; r++) {
            memcpy(fc_in + (size_t)r * FC, mdl->embed + (size_t)bt_->ids[r] * H, sizeof(bf16) * H);
            memcpy(fc_in + (size_t)r * FC + H, (const bf16*)(uintptr_t)bt_->feats[r], sizeof(bf16) * (FC - H));
        }
        fc_x = fc_in;
    }
    for (int r = 0; r < M; r++) {
        if (!FC) {
            const bf16* e = mdl->embed + (size_t)bt_->ids[r] * H;
            for (int i = 0; i < H; i++) x[(size_t)r * H + i] = bf16_to_f32(e[i]);
        }
        for (int i = 0; i < half; i++) {
            float f = (float)positions[r] * mdl->inv_freq[i];  /* fp32 angle, as transformers computes it */
            cs[(size_t)r * D + i] = cosf(f);
            cs[(size_t)r * D + half + i] = sinf(f);
        }
    }

#pragma omp parallel num_threads(T)
    {
        const int t = omp_get_thread_num();
        float* sc = scores + (size_t)t * QU * ld;
        bf16* qb = qbuf + (size_t)t * QU * D;
        float* ob = obuf + (size_t)t * QU * D;
        float* us = own_scores + (size_t)t * QU * uld;
        xq_use(xq + xq_per * t, MQ);
        if (FC) {  /* EAGLE: x = fc([embedding ; feature]) + bias */
            gemv_share(&shares[(size_t)(4 * L + 1) * T + t], FC, fc_x, FC, M, x, H);
#pragma omp barrier
            if (mdl->fc_bias) {
#pragma omp for schedule(static)
                for (int r = 0; r < M; r++)
                    for (int i = 0; i < H; i++) x[(size_t)r * H + i] += bf16_to_f32(mdl->fc_bias[i]);
            }
        }
        for (int l = 0; l < L; l++) {
            const Share* sh = shares + (size_t)4 * l * T;
            bf16* kc = kv + (size_t)l * layer_slots * NKV * D;
            bf16* vc = kv + ((size_t)L + l) * layer_slots * NKV * D;
#pragma omp for schedule(static)
            for (int r = 0; r < M; r++) {
                if (norms[2 * l])
                    rms_norm_row(x + (size_t)r * H, (const bf16*)(uintptr_t)norms[2 * l], H, eps, xb + (size_t)r * H);
                else  /* no input norm (a published EAGLE-1/2 drafter's layer 0) */
                    to_bf16(x + (size_t)r * H, xb + (size_t)r * H, H);
            }
            gemv_share(&sh[0 * T + t], H, xb, H, M, y, QKV);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < M; r++) {  /* RoPE on q and k, then write k and v to the cache */
                float* row = y + (size_t)r * QKV;
                const float* c = cs + (size_t)r * D;
                for (int h = 0; h < NH + NKV; h++) rope_head(row + h * D, c, c + half, half);
                size_t at = (size_t)slots[r] * NKV * D;
                to_bf16(row + NH * D, kc + at, NKV * D);
                to_bf16(row + (NH + NKV) * D, vc + at, NKV * D);
            }
#pragma omp for schedule(dynamic, 1)
            for (int u = 0; u < n_units; u++) {
                const int* un = units + 6 * u;
                const int b = un[0], kvh = un[1], r0 = un[2], nr = un[3] - r0;
                const int ctx = context_lens[b], Q = nr * group;
                const int64_t* ps = prefix_slots + prefix_at[b];
                const bf16* kb = kc + kvh * D;
                const bf16* vb = vc + kvh * D;
                for (int i = 0; i < nr; i++)  /* queries: the group's heads of each row, bf16 */
                    to_bf16(y + (size_t)(r0 + i) * QKV + kvh * group * D, qb + (size_t)i * group * D, group * D);
                qk(qb, Q, kb, ps, NKV * D, ctx, D, scale, sc, ld);
                if (un[5]) qk(qb, Q, kb, uni_slots + un[4], NKV * D, un[5], D, scale, us, uld);
                for (int i = 0; i < nr; i++) {  /* each row's own keys after its prefix, then softmax */
                    const int r = r0 + i;
                    const int* cols = own_col + own_at[r];
                    for (int j = 0; j < group; j++) {
                        float* row = sc + (size_t)(i * group + j) * ld;
                        const float* from = us + (size_t)(i * group + j) * uld;
                        for (int k = 0; k < own_n[r]; k++) row[ctx + k] = from[cols[k]];
                        softmax(row, ctx + own_n[r]);
                    }
                }
#if FUSED_AVX512
                if (mdl->amx_attention) {
                    values_amx(sc, ld, nr, group, D, vb, NKV * D, ps, ctx, own_slots, own_at, own_n, r0, ob);
                } else
#endif
                {
                    weighted_values(sc, ld, Q, vb, ps, NKV * D, ctx, D, ob, 0);
                    for (int i = 0; i < nr; i++)
                        weighted_values(sc + (size_t)i * group * ld + ctx, ld, group, vb, own_slots + own_at[r0 + i],
                                        NKV * D, own_n[r0 + i], D, ob + (size_t)i * group * D, 1);
                    values_finish(ob, Q, D);
                }
                for (int i = 0; i < nr; i++)
                    to_bf16(ob + (size_t)i * group * D, xb + (size_t)(r0 + i) * NH * D + kvh * group * D, group * D);
            }
            gemv_share(&sh[1 * T + t], NH * D, xb, NH * D, M, o, H);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < M; r++) {
                for (int i = 0; i < H; i++) x[(size_t)r * H + i] += o[(size_t)r * H + i];
                rms_norm_row(x + (size_t)r * H, (const bf16*)(uintptr_t)norms[2 * l + 1], H, eps, xb + (size_t)r * H);
            }
            {   /* gate and up of the same columns are in this thread's share, so SwiGLU
                 * needs nothing from the other threads */
                const Share* s = &sh[2 * T + t];
                gemv_share(s, H, xb, H, M, y, 2 * I);
                for (int r = 0; r < M; r++) {
                    const float* g = y + (size_t)r * 2 * I + s->out0;
                    swiglu(g, g + I, (int)s->n0, act + (size_t)r * I + s->out0);
                }
            }
#pragma omp barrier
            gemv_share(&sh[3 * T + t], I, act, I, M, o, H);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < M; r++)
                for (int i = 0; i < H; i++) x[(size_t)r * H + i] += o[(size_t)r * H + i];
        }
#pragma omp for schedule(static)
        for (int r = 0; r < M; r++) {
            if (norms[2 * L])
                rms_norm_row(x + (size_t)r * H, (const bf16*)(uintptr_t)norms[2 * L], H, eps, hidden_out + (size_t)r * H);
            else
                to_bf16(x + (size_t)r * H, hidden_out + (size_t)r * H, H);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < R; i++)
            memcpy(xb + (size_t)i * H, hidden_out + (size_t)logit_rows[i] * H, sizeof(bf16) * H);
        if (R > 0) gemv_share(&shares[(size_t)4 * L * T + t], H, xb, H, R, logits, V);
        if (R > 0 && bt_->argmax) {  /* each row's first maximum: per thread over the columns it just
                                      * wrote (still in its cache), then combined */
            const Share* s = &shares[(size_t)4 * L * T + t];
            for (int i = 0; i < R; i++) {
                float m = -INFINITY;
                int64_t at = INT64_MAX;
                first_max(logits + (size_t)i * V + s->out0, (int64_t)s->n0, (int64_t)s->out0, &m, &at);
                if (s->n1) first_max(logits + (size_t)i * V + s->out1, (int64_t)s->n1, (int64_t)s->out1, &m, &at);
                part_max[(size_t)t * R + i] = m;
                part_at[(size_t)t * R + i] = at;
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int i = 0; i < R; i++) {
                float m = -INFINITY;
                int64_t at = INT64_MAX;
                for (int u = 0; u < T; u++) {
                    const float v = part_max[(size_t)u * R + i];
                    const int64_t a = part_at[(size_t)u * R + i];
                    if (a != INT64_MAX && (v > m || (v == m && a < at))) { m = v; at = a; }
                }
                bt_->argmax[i] = at == INT64_MAX ? 0 : at;  /* no number above -inf: torch says 0 */
            }
        }
        amx_release();
    }
    FREE_SCRATCH();
#undef FREE_SCRATCH
    return 0;
}

/* Medusa heads on one feature per request, and their logits: head i applies `layers`
 * residual blocks f <- f + silu(W f + b) to the feature, then the draft head. Every head's
 * first block reads the same feature, so those are one stacked [heads * hidden, hidden]
 * matrix and stream as one GEMV; later blocks read each head's own feature. */
typedef struct {
    int64_t hidden, heads, layers, vocab, threads;
    const Share* shares;  /* [(2 + (layers - 1) * heads) * threads]: stacked first blocks, the
                             later blocks (layer-major, then head), the draft head */
    const bf16* bias;     /* bf16 [layers, heads, hidden] */
} Medusa;

/* x: bf16 [B, hidden] -> feats bf16 [B * heads, hidden] (row b * heads + i), logits fp32
 * [B * heads, vocab]. Returns 0, or -1 when scratch memory could not be allocated. */
int medusa_forward(const Medusa* md, int64_t B, const bf16* x, bf16* feats, float* logits) {
    const int H = (int)md->hidden, K = (int)md->heads, NL = (int)md->layers, V = (int)md->vocab, T = (int)md->threads;
    const int64_t rows = B * K;
    float* y = malloc(sizeof(float) * (size_t)rows * H);  /* block outputs */
    float* f = malloc(sizeof(float) * (size_t)rows * H);  /* each head's feature, fp32 */
    const size_t xq_per = xq_bytes((int)rows, H);
    uint8_t* xq = malloc(xq_per * T);
    if (!y || !f || !xq) { free(y); free(f); free(xq); return -1; }
    for (int64_t r = 0; r < rows; r++)
        for (int i = 0; i < H; i++) f[(size_t)r * H + i] = bf16_to_f32(x[(size_t)(r / K) * H + i]);
#pragma omp parallel num_threads(T)
    {
        const int t = omp_get_thread_num();
        xq_use(xq + xq_per * t, (int)rows);
        for (int l = 0; l < NL; l++) {
            if (l == 0)
                gemv_share(&md->shares[t], H, x, H, (int)B, y, K * H);
            else
                for (int i = 0; i < K; i++)
                    gemv_share(&md->shares[(size_t)(1 + (l - 1) * K + i) * T + t], H, feats + (size_t)i * H, K * H,
                               (int)B, y + (size_t)i * H, K * H);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {  /* request r / K, head r % K */
                silu_residual(f + (size_t)r * H, y + (size_t)r * H, md->bias + ((size_t)l * K + r % K) * H, H,
                              feats + (size_t)r * H);
            }
        }
        gemv_share(&md->shares[(size_t)(1 + (NL - 1) * K) * T + t], H, feats, H, (int)rows, logits, V);
        amx_release();
    }
    free(y);
    free(f);
    free(xq);
    return 0;
}

/* out[r] = the first index of the largest of x[r, 0..n) (torch.argmax; NaNs are not
 * looked at): greedy verification's argmax over [rows, vocab] logits, ~10x faster than
 * torch's for a tree's rows. */
void fused_argmax(const float* x, int64_t rows, int64_t n, int64_t* out, int64_t threads) {
#pragma omp parallel for num_threads((int)threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float m = -INFINITY;
        out[r] = 0;
        first_max(x + r * n, n, 0, &m, &out[r]);
    }
}

/* Per row of x [rows, n]: the k largest values as log-probabilities (value - logsumexp of
 * the row), best first (ties: the lower index first), and their indices: a drafter's
 * top-k over its draft-vocabulary logits, ~10x faster than torch's topk + logsumexp at
 * these sizes. k <= 64. */
void fused_topk(const float* x, int64_t rows, int64_t n, int64_t k, float* vals, int64_t* idx, int64_t threads) {
#pragma omp parallel for num_threads((int)threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float* row = x + r * n;
        float top[64];
        int64_t at[64];
        for (int j = 0; j < k; j++) { top[j] = -INFINITY; at[j] = 0; }
        const float mx = topk_scan(row, n, k, top, at);
        const float lse = mx + logf(sum_exp(row, n, mx));
        for (int j = 0; j < k; j++) {
            vals[r * k + j] = top[j] - lse;
            idx[r * k + j] = at[j];
        }
    }
}

/* ---- an EAGLE-2 draft step ----------------------------------------------------------
 *
 * One call per request and step (engine/drafters/eagle.py): run the request's pending
 * (token, feature) pairs through the drafter (the catch-up), then the EAGLE-2 tree search,
 * one drafter forward per depth, and the rerank. In Python the search's bookkeeping (top-k
 * lists, frontier, visible slots, the call's arrays) cost about as much as the forwards'
 * own weight reads on a small drafter; here it costs microseconds.
 *
 * The search, exactly as the torch path's (EagleDrafter._propose_batch): the root's top_k
 * children from the last pair's logits are depth 1; while not stopped, the frontier (<= k
 * nodes) is forwarded at once, each row seeing the request's pairs, its forwarded ancestors
 * and itself, and the frontier's children join the tree; the next frontier is the k best
 * children by cumulative log-probability (ties: the first in (frontier, rank) order). Stop
 * when the budget-th best score so far is at least the best frontier score (no deeper node
 * can make the selection) or when the best frontier path is less likely than min_prob.
 * Then keep the budget best nodes by score (ties: shallower, then earlier), never a node
 * without its parent. Scores are fp64 sums of the fp32 top-k log-probabilities. */
typedef struct {
    bf16* kv;                   /* the request's drafter cache [2, layers, 1, capacity, kv_heads, head_dim] */
    int64_t capacity;           /* slots; the caller reserves length + n_new + depth * top_k */
    int64_t length;             /* in: pairs in the cache; out: after the catch-up */
    int64_t n_new;              /* pending pairs: token ids, and addresses of their feature rows */
    const int64_t* new_ids;
    const uint64_t* new_feats;
    bf16* last_hidden;          /* in/out [hidden]: drafter output at the last pair */
    float* last_logits;         /* in/out [vocab]: its draft-head logits */
    const int64_t* vocab_ids;   /* NULL, or [vocab]: the token id of each draft-head row */
    int64_t budget, top_k, depth;
    double min_prob;
    int64_t* tokens, * parents; /* out: [budget] nodes in (depth, index) order, parents local (-1: root) */
    int64_t n_out;
    int64_t forwards;           /* out: drafter forwards run (the catch-up and one per depth) */
} EagleStep;

typedef struct { double score; int64_t depth, index; } NodeKey;

static int node_key_order(const void* a, const void* b) {  /* score desc, then depth, then index */
    const NodeKey* x = a, * y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    if (x->depth != y->depth) return x->depth < y->depth ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static int node_depth_order(const void* a, const void* b) {  /* depth, then index */
    const NodeKey* x = a, * y = b;
    if (x->depth != y->depth) return x->depth < y->depth ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static int cum_order(const void* a, const void* b) {  /* score desc, then index (heapq.nlargest's order) */
    const NodeKey* x = a, * y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Whether expanding the frontier one more depth cannot pay (EagleDrafter._stop). */
static int eagle_stop(const double* score, int64_t n, const int64_t* frontier, int64_t nf, int64_t budget,
                      double min_prob, NodeKey* keys /* scratch [n] */) {
    double best = -INFINITY;
    for (int64_t j = 0; j < nf; j++) best = score[frontier[j]] > best ? score[frontier[j]] : best;
    if (n >= budget) {
        for (int64_t i = 0; i < n; i++) keys[i] = (NodeKey){score[i], 0, i};
        qsort(keys, n, sizeof(NodeKey), cum_order);
        if (keys[budget - 1].score >= best) return 1;
    }
    return exp(best) < min_prob;
}

/* Returns 0, -1 when memory could not be allocated, -2 on bad sizes (top_k not in 1..64,
 * or a cache without room for the pending pairs and every depth's rows). */
int eagle_propose(const Model* mdl, EagleStep* e) {
    const int64_t H = mdl->hidden, V = mdl->vocab, k = e->top_k, budget = e->budget, depth = e->depth;
    if (k < 1 || k > 64 || k > V || budget < 1 || depth < 1 || e->n_new < 0) return -2;
    if (e->length + e->n_new + (depth - 1) * k > e->capacity) return -2;
    const int64_t max_nodes = k + (depth - 1) * k * k;
    const int32_t table = 0;
    e->forwards = 0;
    int64_t* tok = malloc(sizeof(int64_t) * 4 * max_nodes);  /* per node: token, parent, depth, cache slot */
    double* score = malloc(sizeof(double) * max_nodes);
    NodeKey* keys = malloc(sizeof(NodeKey) * max_nodes);
    int64_t* rows = malloc(sizeof(int64_t) * 4 * k);  /* a depth's positions, slots, ids, logit rows */
    uint64_t* feats = malloc(sizeof(uint64_t) * (k + 1));
    int32_t* vis_ptr = malloc(sizeof(int32_t) * (k + 1));
    int64_t* vis = malloc(sizeof(int64_t) * k * depth);
    float* vals = malloc(sizeof(float) * k * k);
    int64_t* idx = malloc(sizeof(int64_t) * k * k);
    bf16* hid = malloc(sizeof(bf16) * H * (2 * k + (e->n_new > 0 ? e->n_new : 1)));  /* two depths, the catch-up */
    float* logits = malloc(sizeof(float) * V * k);
    int rc = 0;
    if (!tok || !score || !keys || !rows || !feats || !vis_ptr || !vis || !vals || !idx || !hid || !logits) {
        rc = -1;
        goto done;
    }
    /* fslot: a forwarded node's cache slot (-1: not forwarded); after the rerank, a kept
     * node's index in the output (-1: dropped) */
    int64_t* parent = tok + max_nodes, * dep = tok + 2 * max_nodes, * fslot = tok + 3 * max_nodes;
    int32_t qsl[2] = {0, 0}, ctx;
    Batch b;
    memset(&b, 0, sizeof b);
    b.kv = e->kv;
    b.num_blocks = 1;
    b.block_size = e->capacity;
    b.row_seq = (const int32_t*)calloc(1, sizeof(int32_t) * (e->n_new > k ? e->n_new : k));
    b.block_tables = &table;
    b.max_blocks = 1;
    b.context_lens = &ctx;
    b.qsl = qsl;
    if (!b.row_seq) {
        rc = -1;
        goto done;
    }
    if (e->n_new > 0) {  /* the catch-up: the pending pairs, causally, after the cached ones */
        const int64_t n = e->n_new;
        int64_t* pos = malloc(sizeof(int64_t) * n), last = n - 1;
        if (!pos) {
            rc = -1;
            goto free_seq;
        }
        for (int64_t i = 0; i < n; i++) pos[i] = e->length + i;
        ctx = (int32_t)e->length;
        qsl[1] = (int32_t)n;
        b.M = n;
        b.ids = e->new_ids;
        b.feats = e->new_feats;
        b.positions = b.slots = pos;
        b.R = 1;
        b.logit_rows = &last;
        b.hidden_out = hid + 2 * k * H;
        b.logits = e->last_logits;
        rc = fused_forward(mdl, &b);
        e->forwards++;
        free(pos);
        if (rc) goto free_seq;
        memcpy(e->last_hidden, hid + (2 * k + n - 1) * H, sizeof(bf16) * H);
        e->length += n;
    }
    ctx = (int32_t)e->length;
    /* depth 1: the root's children */
    fused_topk(e->last_logits, 1, V, k, vals, idx, mdl->threads);
    int64_t n = 0, nf = k, m = 0;
    int64_t frontier[64];
    for (int64_t j = 0; j < k; j++, n++) {
        tok[n] = e->vocab_ids ? e->vocab_ids[idx[j]] : idx[j];
        parent[n] = -1;
        dep[n] = 1;
        score[n] = vals[j];
        fslot[n] = -1;
        frontier[j] = n;
        feats[j] = (uint64_t)(uintptr_t)e->last_hidden;
    }
    for (int64_t d = 1; d < depth; d++) {
        if (eagle_stop(score, n, frontier, nf, budget, e->min_prob, keys)) break;
        int64_t* pos = rows, * slots = rows + k, * ids = rows + 2 * k, * lrows = rows + 3 * k;
        int32_t at = 0;
        for (int64_t j = 0; j < nf; j++) {  /* each row sees its forwarded ancestors, then itself */
            const int64_t node = frontier[j];
            pos[j] = e->length + d - 1;
            slots[j] = fslot[node] = e->length + m + j;
            ids[j] = tok[node];
            lrows[j] = j;
            vis_ptr[j] = at;
            int64_t chain = 0;
            for (int64_t a = node; a >= 0; a = parent[a]) chain++;
            at += (int32_t)chain;
            for (int64_t a = node, i = at - 1; a >= 0; a = parent[a], i--) vis[i] = fslot[a];
        }
        vis_ptr[nf] = at;
        bf16* out = hid + (d % 2) * k * H;  /* the previous depth's rows stay readable as features */
        qsl[1] = (int32_t)nf;
        b.M = nf;
        b.ids = ids;
        b.feats = feats;
        b.positions = pos;
        b.slots = slots;
        b.vis_ptr = vis_ptr;
        b.vis_slots = vis;
        b.R = nf;
        b.logit_rows = lrows;
        b.hidden_out = out;
        b.logits = logits;
        if ((rc = fused_forward(mdl, &b))) goto free_seq;
        e->forwards++;
        m += nf;
        fused_topk(logits, nf, V, k, vals, idx, mdl->threads);
        /* the children, in (frontier, rank) order; the next frontier: the k best of them */
        const int64_t base = n, nc = nf * k, keep = k < nc ? k : nc;
        for (int64_t i = 0; i < nc; i++, n++) {
            tok[n] = e->vocab_ids ? e->vocab_ids[idx[i]] : idx[i];
            parent[n] = frontier[i / k];
            dep[n] = d + 1;
            score[n] = score[frontier[i / k]] + (double)vals[i];
            fslot[n] = -1;
            keys[i] = (NodeKey){score[n], 0, i};
        }
        qsort(keys, nc, sizeof(NodeKey), cum_order);
        for (int64_t j = 0; j < keep; j++) {
            frontier[j] = base + keys[j].index;
            feats[j] = (uint64_t)(uintptr_t)(out + (keys[j].index / k) * H);
        }
        nf = keep;
    }
    /* the rerank (engine/drafters/trees.py select_dynamic) */
    for (int64_t i = 0; i < n; i++) {
        keys[i] = (NodeKey){score[i], dep[i], i};
        fslot[i] = -1;
    }
    qsort(keys, n, sizeof(NodeKey), node_key_order);
    int64_t kept = 0;
    for (int64_t i = 0; i < n && kept < budget; i++) {  /* keys[0 .. kept): the kept nodes */
        const int64_t node = keys[i].index;
        if (parent[node] == -1 || fslot[parent[node]] >= 0) {
            fslot[node] = 0;
            keys[kept++] = (NodeKey){0.0, dep[node], node};
        }
    }
    qsort(keys, kept, sizeof(NodeKey), node_depth_order);
    for (int64_t i = 0; i < kept; i++) {  /* parents come first in this order */
        const int64_t node = keys[i].index;
        fslot[node] = i;
        e->tokens[i] = tok[node];
        e->parents[i] = parent[node] == -1 ? -1 : fslot[parent[node]];
    }
    e->n_out = kept;
free_seq:
    free((void*)b.row_seq);
done:
    free(tok); free(score); free(keys); free(rows); free(feats); free(vis_ptr); free(vis); free(vals); free(idx);
    free(hid); free(logits);
    return rc;
}

/* KV compaction (treespec_kernels/compaction.py copy_slots): in each of `planes` planes of rows of
 * row_bytes (K and V of every layer), row dst[m] <- row src[m] for m < n, a plane's reads
 * all before its writes, so sources and destinations may overlap. A step moves a few rows
 * per plane, which torch's advanced indexing takes ~0.15 ms to set up. Returns 0, or -1
 * when the scratch row buffer could not be allocated. */
int fused_copy_rows(uint8_t* base, int64_t planes, int64_t per_plane, int64_t row_bytes, const int64_t* src,
                    const int64_t* dst, int64_t n) {
    uint8_t* tmp = malloc((size_t)(n * row_bytes) + 1);
    if (!tmp) return -1;
    for (int64_t p = 0; p < planes; p++) {
        uint8_t* plane = base + (size_t)(p * per_plane * row_bytes);
        for (int64_t m = 0; m < n; m++) memcpy(tmp + m * row_bytes, plane + src[m] * row_bytes, (size_t)row_bytes);
        for (int64_t m = 0; m < n; m++) memcpy(plane + dst[m] * row_bytes, tmp + m * row_bytes, (size_t)row_bytes);
    }
    free(tmp);
    return 0;
}

/* A read-bandwidth probe for benchmarks (bench/common.py): the sum of n floats, read
 * the way the GEMVs read their arenas (one sequential stream per thread, prefetched). */
double fused_stream_sum(const float* x, int64_t n, int64_t threads) {
    double total = 0;
#pragma omp parallel num_threads((int)threads) reduction(+ : total)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t lo = n * t / T / 64 * 64, hi = t == T - 1 ? n : n * (t + 1) / T / 64 * 64;
        total += stream_sum_part(x, lo, hi);
    }
    return total;
}

/* Memory for the weight arenas, on 2 MiB pages where the kernel allows (fewer TLB misses
 * while streaming: ~34 vs ~28 GB/s read on two cores here). Freed with fused_free. */
void* fused_alloc(uint64_t bytes) {
    const uint64_t huge = 2u << 20;
    void* p = aligned_alloc(huge, (bytes + huge - 1) / huge * huge);
    if (p) madvise(p, (bytes + huge - 1) / huge * huge, MADV_HUGEPAGE);
    return p;
}

void fused_free(void* p) { free(p); }
