/* The AVX2 + FMA build of the fused forward's vector pieces (included by cpu_fused.c when
 * the compiler targets no AVX512-BF16): for x86-64 CPUs without AVX-512, such as AMD Zen 2
 * and Zen 3 or Intel client cores.
 *
 * Weights stay bf16 (half the bytes of fp32 to stream), but with no bf16 dot-product
 * instruction every product is an fp32 FMA after widening: a bf16 is the top half of an
 * fp32, so one 256-bit load of 16 bf16 gives two fp32 vectors with one shift (the even
 * elements, the low halves of each dword) and one AND (the odd elements).
 *
 * GEMVs read weights packed as 16-row panels ([K][16], rows interleaved so that the shift
 * yields rows 0-7 and the AND rows 8-15: engine/fused.py, PACK_PANELS): each k broadcasts
 * one input value against 16 output rows, so outputs sit in lanes and need no horizontal
 * sums. Every output is two fp32 FMA chains over K (even and odd k) added at the end, for
 * any number of input rows, so a tree row's result is bit-identical to the same token
 * decoded alone, as in the AVX-512 build. A 9-row tree costs ~9x one row's multiply-adds,
 * which an AVX2 core's two FMA pipes do not hide behind the weight stream as AMX does:
 * small trees pay here (engine/config.py, auto_tree_budget).
 *
 * A drafter's matrices may be int8 panels instead (PACK_PANELS_INT8, engine/fused.py): per
 * output row w ~ sw[r] * q[r][k], widened to fp32 in registers, the input kept fp32, and
 * y = acc * sw[r]: half the bytes of a drafter call, which streams all its weights for a
 * few rows (drafts only rank candidates; verification keeps the output exact). */

/* ---- conversions and vector helpers --------------------------------------------------- */

static inline bf16 f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN (as torch) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* 8 fp32 -> 8 bf16, the same rounding as f32_to_bf16. */
static inline __m128i cvt8_bf16(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* dwords < 2^16 -> words: packus works per 128-bit lane, the permute joins the halves */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

static inline __m256 load8_bf16(const bf16* p) {  /* 8 bf16 -> 8 fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

/* 16 bf16 -> their even elements (lo) and odd elements (hi) as fp32: the split layout. */
static inline void load16_split(const bf16* p, __m256* lo, __m256* hi) {
    const __m256i raw = _mm256_loadu_si256((const __m256i*)p);
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    *hi = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xffff0000u)));
}

static inline __m256i tail8(int left) {  /* lanes < left set */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(left < 8 ? left : 8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum8(__m256 a) {  /* a fixed order: ((0+4)+(2+6)) + ((1+5)+(3+7)) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

static void to_bf16(const float* x, bf16* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i*)(y + i), cvt8_bf16(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] = f32_to_bf16(x[i]);
}

/* e^x for 8 lanes: as exp16 in the AVX-512 build (Cody-Waite, degree-6 Taylor), with 2^n
 * built in the exponent bits (x clamped to [-87, 88] so that n stays a normal exponent). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 silu8(__m256 g) {  /* g / (1 + e^-g) */
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

static inline float silu1(float g) {  /* one lane of silu8, for tails */
    float in[8] = {g}, out[8];
    _mm256_storeu_ps(out, silu8(_mm256_loadu_ps(in)));
    return out[0];
}

/* ---- GEMV on 16-row panels -------------------------------------------------------------- */

/* Rows [0, valid) of one panel ([K][16]) times MC fp32 input rows (X, row stride K):
 * Y[j * ldy + r]. Two accumulators per output (even and odd k) keep four to twelve FMA
 * chains in flight whatever MC is, and fix each output's order of additions. LOAD(k, lo,
 * hi) widens the panel's 16 weights of column k (rows 0-7 into lo, 8-15 into hi); SCALE
 * (lo, hi) finishes the sums. */
#define PANEL_COLUMN(LOAD, kk, u)                                                               \
    do {                                                                                        \
        __m256 lo, hi;                                                                          \
        LOAD(kk, lo, hi);                                                                       \
        for (int j = 0; j < MC; j++) {                                                          \
            const __m256 x = _mm256_broadcast_ss(X + (size_t)j * K + (kk));                     \
            acc[j][0][u] = _mm256_fmadd_ps(lo, x, acc[j][0][u]);                                \
            acc[j][1][u] = _mm256_fmadd_ps(hi, x, acc[j][1][u]);                                \
        }                                                                                       \
    } while (0)
#define PANEL_TILE(LOAD, SCALE)                                                                 \
    __m256 acc[3][2][2]; /* [input row][rows 0-7 | 8-15][k parity] */                          \
    const char* pf = *pf_io;                                                                    \
    for (int j = 0; j < MC; j++)                                                                \
        for (int h = 0; h < 2; h++) acc[j][h][0] = acc[j][h][1] = _mm256_setzero_ps();         \
    int k = 0;                                                                                  \
    for (; k + 2 <= K; k += 2) {                                                                \
        PANEL_COLUMN(LOAD, k, 0);                                                               \
        PANEL_COLUMN(LOAD, k + 1, 1);                                                           \
    }                                                                                           \
    if (k < K) PANEL_COLUMN(LOAD, k, 0); /* odd K: the last column joins the even chain */     \
    for (int j = 0; j < MC; j++) {                                                              \
        float* y = Y + (size_t)j * ldy;                                                         \
        __m256 lo = _mm256_add_ps(acc[j][0][0], acc[j][0][1]), hi = _mm256_add_ps(acc[j][1][0], acc[j][1][1]); \
        SCALE(lo, hi);                                                                          \
        if (valid == 16) {                                                                      \
            _mm256_storeu_ps(y, lo);                                                            \
            _mm256_storeu_ps(y + 8, hi);                                                        \
        } else { /* the last panel of a matrix whose rows are not a multiple of 16 */          \
            _mm256_maskstore_ps(y, tail8(valid), lo);                                           \
            if (valid > 8) _mm256_maskstore_ps(y + 8, tail8(valid - 8), hi);                    \
        }                                                                                       \
    }                                                                                           \
    *pf_io = pf;

/* The weight stream's prefetch cursor (one per thread: its arena is read in order). One
 * line is prefetched per 64 bytes of panel read, up to pf_cap: on a panel's first pass
 * (the only one of a one-row GEMV) that keeps the cursor PF_ELEMS ahead, as a fixed
 * distance would; on the further passes of a GEMV of more than three rows, which read the
 * panel from cache, it runs on towards PF_LEAD_MAX ahead of the panel's end, so DRAM keeps
 * streaming the next panels while these passes compute instead of idling. */
#define PF_BYTES ((ptrdiff_t)PF_ELEMS * 2)
#ifndef PF_LEAD_MAX
#define PF_LEAD_MAX (4 * PF_BYTES)
#endif
static __thread const char* pf_cursor;

#define PREFETCH_NEXT()                                                                         \
    do {                                                                                        \
        if (pf < pf_cap) {                                                                      \
            _mm_prefetch(pf, _MM_HINT_T1);                                                      \
            pf += 64;                                                                           \
        }                                                                                       \
    } while (0)

/* bf16 panels: rows interleaved (engine/fused.py, _PANEL_ORDER) so that the even elements
 * are rows 0-7 and the odd ones rows 8-15; a prefetch per 64 bytes (two columns). */
#define LOAD_BF16(k, lo, hi)                                                                    \
    do {                                                                                        \
        if (!((k) & 1)) PREFETCH_NEXT();                                                        \
        load16_split(w + (size_t)(k) * 16, &lo, &hi);                                           \
    } while (0)
#define NO_SCALE(lo, hi) (void)0

static inline __attribute__((always_inline)) void panel_tile(const bf16* w, int K, const float* X, float* Y,
                                                               int ldy, int valid, const int MC,
                                                               const char** pf_io, const char* pf_cap) {
    PANEL_TILE(LOAD_BF16, NO_SCALE)
}

/* int8 panels: rows in order, 16 bytes a column (a prefetch per four). */
#define LOAD_INT8(k, lo, hi)                                                                    \
    do {                                                                                        \
        if (!((k) & 3)) PREFETCH_NEXT();                                                        \
        const __m128i b = _mm_loadu_si128((const __m128i*)(q + (size_t)(k) * 16));              \
        lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));                                       \
        hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));                \
    } while (0)
#define ROW_SCALES(lo, hi)                                                                      \
    do {                                                                                        \
        lo = _mm256_mul_ps(lo, s0);                                                             \
        hi = _mm256_mul_ps(hi, s1);                                                             \
    } while (0)

static inline __attribute__((always_inline)) void panel_tile_i8(const int8_t* q, const float* sw, int K,
                                                                  const float* X, float* Y, int ldy, int valid,
                                                                  const int MC, const char** pf_io, const char* pf_cap) {
    const __m256 s0 = _mm256_loadu_ps(sw), s1 = _mm256_loadu_ps(sw + 8);  /* padded: 16 scales a panel */
    PANEL_TILE(LOAD_INT8, ROW_SCALES)
}

/* Y[m * ldy + r] = W[r] . X[m] for r < nrows, W in panels of 16 rows (the last zero-padded,
 * `bytes` each), X fp32 [M, K]; int8 panels (Q, its rows' scales sw) through the same loops.
 * A cursor outside [PF_BYTES, PF_LEAD_MAX] ahead belongs to another arena (or forward). */
#define PANEL_PASSES(TILE, base, bytes, ...)                                                    \
    const char* pf = pf_cursor;                                                                 \
    const char* start = (const char*)(base);                                                    \
    if (pf < start + PF_BYTES || pf > start + PF_LEAD_MAX + 64) pf = start + PF_BYTES;          \
    for (int p = 0; p < nrows; p += 16) {                                                       \
        const int valid = nrows - p < 16 ? nrows - p : 16;                                      \
        const char* pf_cap = start + (size_t)(p / 16 + 1) * (bytes) + PF_LEAD_MAX;              \
        for (int m = 0; m < M; m += 3) {                                                        \
            const float* x = X + (size_t)m * K;                                                 \
            float* y = Y + (size_t)m * ldy + p;                                                 \
            switch (M - m) {                                                                    \
                case 1: TILE(__VA_ARGS__, K, x, y, ldy, valid, 1, &pf, pf_cap); break;          \
                case 2: TILE(__VA_ARGS__, K, x, y, ldy, valid, 2, &pf, pf_cap); break;          \
                default: TILE(__VA_ARGS__, K, x, y, ldy, valid, 3, &pf, pf_cap); break;         \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    pf_cursor = pf;

static void gemv_panels(const bf16* W, int nrows, int K, const float* X, int M, float* Y, int ldy) {
    PANEL_PASSES(panel_tile, W, (size_t)K * 32, W + (size_t)p * K)
}

static void gemv_panels_i8(const int8_t* Q, const float* sw, int nrows, int K, const float* X, int M, float* Y,
                           int ldy) {
    PANEL_PASSES(panel_tile_i8, Q, (size_t)K * 16, Q + (size_t)p * K, sw + p)
}

/* Each thread widens the whole GEMV input to fp32 for its own share (a few rows, cheaper
 * than a barrier); the scratch is set per forward from its per-thread block. */
static __thread float* xf_buf;

static size_t xq_bytes(int M, int kmax) { return (size_t)M * kmax * sizeof(float); }

static void xq_use(uint8_t* block, int M) {
    (void)M;
    xf_buf = (float*)block;
}

static void amx_release(void) {}  /* no tiles in this build */

static void gemv_share(const Share* s, int K, const bf16* X, int ldx, int M, float* Y, int ldy) {
    for (int m = 0; m < M; m++) {
        const bf16* x = X + (size_t)m * ldx;
        float* xf = xf_buf + (size_t)m * K;
        int k = 0;
        for (; k + 8 <= K; k += 8) _mm256_storeu_ps(xf + k, load8_bf16(x + k));
        for (; k < K; k++) xf[k] = bf16_to_f32(x[k]);
    }
    const size_t rows0 = (size_t)(s->n0 + 15) / 16 * 16;  /* the first segment, padded to panels */
    if (s->amx == PACK_PANELS_INT8) {  /* int8 panels of both segments, then their scales */
        const int8_t* Q = (const int8_t*)(uintptr_t)s->ptr;
        const float* sw = (const float*)(Q + (rows0 + (size_t)(s->n1 + 15) / 16 * 16) * K);
        gemv_panels_i8(Q, sw, (int)s->n0, K, xf_buf, M, Y + s->out0, ldy);
        if (s->n1) gemv_panels_i8(Q + rows0 * K, sw + rows0, (int)s->n1, K, xf_buf, M, Y + s->out1, ldy);
        return;
    }
    const bf16* W = (const bf16*)(uintptr_t)s->ptr;
    gemv_panels(W, (int)s->n0, K, xf_buf, M, Y + s->out0, ldy);
    if (s->n1) gemv_panels(W + rows0 * K, (int)s->n1, K, xf_buf, M, Y + s->out1, ldy);
}

/* ---- pieces of a layer -------------------------------------------------------------------- */

static void rms_norm_row(const float* x, const bf16* w, int n, float eps, bf16* out) {
    __m256 ss = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    float s = hsum8(ss);
    for (int j = i; j < n; j++) s += x[j] * x[j];
    const float inv = 1.0f / sqrtf(s / n + eps);
    const __m256 iv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(out + i), cvt8_bf16(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv),
                                                                      load8_bf16(w + i))));
    for (; i < n; i++) out[i] = f32_to_bf16(x[i] * inv * bf16_to_f32(w[i]));
}

/* out[c] = bf16(silu(g[c]) * up[c]), c < n: SwiGLU. */
static void swiglu(const float* g, const float* up, int n, bf16* out) {
    int c = 0;
    for (; c + 8 <= n; c += 8)
        _mm_storeu_si128((__m128i*)(out + c), cvt8_bf16(_mm256_mul_ps(silu8(_mm256_loadu_ps(g + c)), _mm256_loadu_ps(up + c))));
    for (; c < n; c++) out[c] = f32_to_bf16(silu1(g[c]) * up[c]);
}

/* A Medusa block's residual: f += silu(y + bias); out = bf16(f). n elements. */
static void silu_residual(float* f, const float* y, const bf16* bias, int n, bf16* out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_add_ps(_mm256_loadu_ps(f + i), silu8(_mm256_add_ps(_mm256_loadu_ps(y + i), load8_bf16(bias + i))));
        _mm256_storeu_ps(f + i, v);
        _mm_storeu_si128((__m128i*)(out + i), cvt8_bf16(v));
    }
    for (; i < n; i++) {
        f[i] += silu1(y[i] + bf16_to_f32(bias[i]));
        out[i] = f32_to_bf16(f[i]);
    }
}

/* ---- attention ------------------------------------------------------------------------------
 * Queries and keys are bf16 [.., D] with D % 16 == 0; both are widened in the split layout
 * (per 16 dims: the 8 even, then the 8 odd), which permutes the dims of both alike. */

/* sc[j * ld + i] = scale * (q_j . K_i): G queries against the n keys at cache slots ks,
 * eight keys at a time (eight FMA chains); a key's score is one chain over D in a fixed
 * order whatever keys share its block. */
static void qk_scores(const bf16* q, int G, const bf16* kbase, const int64_t* ks, int64_t stride, int n, int D,
                      float scale, float* sc, int ld) {
    float kf[8][256] __attribute__((aligned(32)));  /* the block's keys, fp32 split (D <= 256) */
    float qf[256] __attribute__((aligned(32)));
    for (int i = 0; i < n; i += 8) {
        const int nk = n - i < 8 ? n - i : 8;
        for (int c = 0; c < 8; c++) {
            const bf16* kp = kbase + ks[i + (c < nk ? c : 0)] * stride;
            for (int d = 0; d < D; d += 16) {
                __m256 lo, hi;
                load16_split(kp + d, &lo, &hi);
                _mm256_store_ps(kf[c] + d, lo);
                _mm256_store_ps(kf[c] + d + 8, hi);
            }
        }
        for (int c = i + KV_AHEAD; c < i + KV_AHEAD + 8 && c < n; c++)
            for (int d = 0; d < D; d += 32) _mm_prefetch((const char*)(kbase + ks[c] * stride + d), _MM_HINT_T0);
        for (int j = 0; j < G; j++) {
            for (int d = 0; d < D; d += 16) {
                __m256 lo, hi;
                load16_split(q + (size_t)j * D + d, &lo, &hi);
                _mm256_store_ps(qf + d, lo);
                _mm256_store_ps(qf + d + 8, hi);
            }
            __m256 acc[8];
            for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) {
                const __m256 x = _mm256_load_ps(qf + d);
                for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(x, _mm256_load_ps(kf[c] + d), acc[c]);
            }
            for (int c = 0; c < nk; c++) sc[(size_t)j * ld + i + c] = hsum8(acc[c]) * scale;
        }
    }
}

/* In place: sc[0..n) -> softmax(sc). */
static void softmax(float* sc, int n) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sc + i));
    float mx = hmax8(vmax);
    for (int j = i; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (i = 0; i < n; i += 8) {  /* the tail as a masked vector: the same exp as full lanes */
        const __m256i m = tail8(n - i);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(sc + i, m), m8)), _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(sc + i, m, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(sum));
    for (i = 0; i < n; i += 8) {
        const __m256i m = tail8(n - i);
        _mm256_maskstore_ps(sc + i, m, _mm256_mul_ps(_mm256_maskload_ps(sc + i, m), inv));
    }
}

/* out[j * D + d] (+)= sum_i p[j * ld + i] * V_i[d] for G queries, V rows at slots ks; out
 * in the split layout (values_finish restores the dims' order). Per 16 dims, keys
 * innermost: a V row's 16 dims are widened once per block of 6 queries. accumulate:
 * continue the sums in out (the same chain as one call over both key lists). */
static void weighted_values(const float* p, int ld, int G, const bf16* vbase, const int64_t* ks, int64_t stride,
                            int n, int D, float* out, int accumulate) {
    for (int j0 = 0; j0 < G; j0 += 6) {
        const int nq = G - j0 < 6 ? G - j0 : 6;
        for (int d = 0; d < D; d += 16) {
            __m256 acc[6][2];
            for (int j = 0; j < 6; j++)
                for (int h = 0; h < 2; h++)
                    acc[j][h] = accumulate && j < nq ? _mm256_loadu_ps(out + (size_t)(j0 + j) * D + d + 8 * h)
                                                     : _mm256_setzero_ps();
            for (int i = 0; i < n; i++) {
                if (j0 == 0 && d == 0 && i + KV_AHEAD < n)
                    for (int e = 0; e < D; e += 32) _mm_prefetch((const char*)(vbase + ks[i + KV_AHEAD] * stride + e), _MM_HINT_T0);
                __m256 lo, hi;
                load16_split(vbase + ks[i] * stride + d, &lo, &hi);
                for (int j = 0; j < nq; j++) {
                    const __m256 pj = _mm256_broadcast_ss(p + (size_t)(j0 + j) * ld + i);
                    acc[j][0] = _mm256_fmadd_ps(pj, lo, acc[j][0]);
                    acc[j][1] = _mm256_fmadd_ps(pj, hi, acc[j][1]);
                }
            }
            for (int j = 0; j < nq; j++)
                for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + (size_t)(j0 + j) * D + d + 8 * h, acc[j][h]);
        }
    }
}

/* rows x D values from the split layout back to the dims' order, in place. */
static void values_finish(float* out, int rows, int D) {
    for (int r = 0; r < rows; r++)
        for (int d = 0; d < D; d += 16) {
            float* v = out + (size_t)r * D + d;
            const __m256 ev = _mm256_loadu_ps(v), od = _mm256_loadu_ps(v + 8);
            const __m256 a = _mm256_unpacklo_ps(ev, od), b = _mm256_unpackhi_ps(ev, od);  /* per 128-bit lane */
            _mm256_storeu_ps(v, _mm256_permute2f128_ps(a, b, 0x20));
            _mm256_storeu_ps(v + 8, _mm256_permute2f128_ps(a, b, 0x31));
        }
}

/* ---- rows of logits ------------------------------------------------------------------------ */

/* (*m, *at) <- the larger of itself and the first maximum of x[0..n), indices base + i;
 * ties: the lower index. NaN never wins. */
static void first_max(const float* x, int64_t n, int64_t base, float* m, int64_t* at) {
    __m256 best = _mm256_set1_ps(-INFINITY);
    __m256i where = _mm256_set1_epi32(-1), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {  /* each lane keeps its first maximum */
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
        best = _mm256_blendv_ps(best, v, gt);
        where = _mm256_blendv_epi8(where, idx, _mm256_castps_si256(gt));
        idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
    }
    float lanes[8];
    int32_t lane_at[8];
    _mm256_storeu_ps(lanes, best);
    _mm256_storeu_si256((__m256i*)lane_at, where);
    for (int l = 0; l < 8; l++)
        if (lane_at[l] >= 0 && (lanes[l] > *m || (lanes[l] == *m && base + lane_at[l] < *at))) {
            *m = lanes[l];
            *at = base + lane_at[l];
        }
    for (; i < n; i++)
        if (x[i] > *m || (x[i] == *m && base + i < *at)) { *m = x[i]; *at = base + i; }
}

/* The k largest of row[0..n) into top/at (kept sorted, best first, ties: lower index),
 * which hold k entries of -inf on entry; returns the row's maximum. */
static float topk_scan(const float* row, int64_t n, int64_t k, float* top, int64_t* at) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 8) {
        const __m256i m = tail8((int)(n - i < 8 ? n - i : 8));
        const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(row + i, m), _mm256_castsi256_ps(m));
        vmax = _mm256_max_ps(vmax, v);
        const int gt = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(top[k - 1]), _CMP_GT_OQ));
        if (gt) topk_insert(row, i, (unsigned)gt, k, top, at);
    }
    return hmax8(vmax);
}

static float sum_exp(const float* row, int64_t n, float mx) {  /* sum_i e^(row[i] - mx) */
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256i m = tail8((int)(n - i < 8 ? n - i : 8));
        sum = _mm256_add_ps(sum, _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(row + i, m), _mm256_set1_ps(mx))),
                                               _mm256_castsi256_ps(m)));
    }
    return hsum8(sum);
}

/* Sum of x[lo, hi), read as the GEMVs read (a bandwidth probe, fused_stream_sum). */
static double stream_sum_part(const float* x, int64_t lo, int64_t hi) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = lo;
    for (; i + 32 <= hi; i += 32)
        for (int c = 0; c < 4; c++) {
            if (c % 2 == 0) _mm_prefetch((const char*)(x + i + PF_ELEMS / 2 + 8 * c), _MM_HINT_T1);
            a[c] = _mm256_add_ps(a[c], _mm256_loadu_ps(x + i + 8 * c));
        }
    double s = hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    for (; i < hi; i++) s += x[i];
    return s;
}
