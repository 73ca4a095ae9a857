/* Selective scan (Mamba's S6 recurrence) on CPU in fp32: forward and backward.
 *
 *   dt_l = softplus(delta_l + delta_bias)  (or delta_l + delta_bias)
 *   h_l  = exp(dt_l * A) * h_{l-1} + dt_l * u_l * B_l        (N states per channel)
 *   y_l  = C_l . h_l + D * u_l ;  out_l = y_l * silu(z_l)  if z is given
 *
 * Layouts (all contiguous fp32): u, delta, z, out (batch, dim, length); A (dim, state);
 * B, C (batch, groups, length, state) -- transposed from mamba's (.., state, length) so that the
 * N states of one position are adjacent; D, delta_bias (dim,); last (batch, dim, state).
 *
 * One (batch, channel) row is scanned by one thread with its N states in vector registers; the
 * loop over states is vectorised (OpenMP simd), and exp(dt A) is computed inline in that loop:
 * it does not depend on the state, so the exponentials of consecutive positions overlap and the
 * dependent chain is one FMA per position. The cost is bounded by the exponentials.
 * The backward recomputes the row's states into a thread-local buffer of length * state floats
 * (never a (batch, dim, length, state) tensor), then runs the adjoint recurrence backwards.
 *
 * Every result is the same bit for bit at any thread count: no sum's order depends on which
 * thread ran which row. Rows are independent in the forward, so they are handed out dynamically.
 * The backward's sums over channels (dB, dC: over the channels of a group) go through blocks of
 * channels fixed by the shape alone: one thread sums a block's rows in channel order into the
 * block's partial buffer, and after each batch element the partials are added in block order.
 * The sums over the batch (dA, dD, delta_bias) are made in batch order: batch elements are done
 * one after the other, and within one each channel belongs to one thread.
 * Built by models/ssm.py with the system C compiler; OpenMP is optional.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#define CHUNK 64                   /* positions whose dt (a softplus each) is computed in one batch */
#define SOFTPLUS_THRESHOLD 20.0f   /* torch's and mamba-ssm's: softplus(x) = x above it */
#define ALIGN_FLOATS 16            /* keep every scratch region 64-byte aligned */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int64_t batch, dim, length, state, groups;
    const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias;  /* D, z, delta_bias may be NULL */
    int32_t softplus, threads;
    float *scratch;  /* threads * ss_scratch_floats(...) floats */
} ScanArgs;

typedef struct {
    const float *dout, *dlast;  /* dlast may be NULL */
    float *du, *ddelta, *dz;    /* (batch, dim, length); dz unused when z is NULL */
    float *dA, *dD, *dbias;     /* sums over the batch, zero on entry: (dim, state), (dim,), (dim,) */
    float *dB, *dC;             /* (batch, groups, length, state) */
    float *partial;             /* ss_partial_floats(...) floats: each channel block's dB, dC sums */
} ScanGrads;

static int64_t round_up(int64_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

#define TILE 16  /* channels gathered and scattered together: 64 bytes, one cache line of fp32 */

/* TILE floats of TILE channels, or of TILE positions of one channel: one vector (GCC vector extensions, so the
 * compiler picks the registers); 64-byte aligned, so a pointer to it is only made into aligned memory (scratch). */
typedef float tile_vec __attribute__((vector_size(TILE * sizeof(float))));
/* The same vector at any float address: one unaligned vector load or store, where memcpy may be expanded into two
 * half-width moves (and a whole vector read back from two half stores waits for them to reach the cache). */
typedef float tile_vec_any __attribute__((vector_size(TILE * sizeof(float)), aligned(sizeof(float)), may_alias));
INLINE tile_vec vec_load(const float *p) { return *(const tile_vec_any *)p; }
INLINE void vec_store(float *p, tile_vec v) { *(tile_vec_any *)p = v; }
/* Lanes of two vectors x, y by index: below TILE x's, from TILE on y's (clang's and GCC 12's builtin, else GCC's). */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE2(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
typedef int32_t tile_lanes __attribute__((vector_size(TILE * sizeof(int32_t))));
#define SHUFFLE2(x, y, ...) __builtin_shuffle(x, y, (tile_lanes){__VA_ARGS__})
#endif

/* Sums of the 16 lanes of each of 16 vectors (p[0..15]) into out[0..15], by the halving tree: lanes i and i + 8, then
 * i + 4, i + 2, i + 1. That is the order in which a vectorised reduction (omp simd reduction) of a loop over 16 states
 * adds them on 8- and 16-lane vector units, one position at a time: four lane moves and four adds per position. Here
 * 16 positions share them: each step adds the halves of two vectors at once, 45 moves and adds for 16 sums. */
INLINE void hsum16_batch(const tile_vec p[16], float *out)
{
    tile_vec a[8], b[4], c[2];
    for (int k = 0; k < 8; k++)  /* a[k]: lanes 0-7 the 8-lane sums of p[2k], 8-15 those of p[2k + 1] */
        a[k] = SHUFFLE2(p[2 * k], p[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
               + SHUFFLE2(p[2 * k], p[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int k = 0; k < 4; k++)  /* b[k]: four lanes of 4-lane sums each for p[4k] .. p[4k + 3] */
        b[k] = SHUFFLE2(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
               + SHUFFLE2(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int k = 0; k < 2; k++)  /* c[k]: two lanes of 2-lane sums each for p[8k] .. p[8k + 7] */
        c[k] = SHUFFLE2(b[2 * k], b[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
               + SHUFFLE2(b[2 * k], b[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    vec_store(out, SHUFFLE2(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
                   + SHUFFLE2(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}

/* hsum16_batch of the first n < 16 vectors (the rest are not read). */
INLINE void hsum16_part(const tile_vec p[16], int64_t n, float *out)
{
    tile_vec q[16];
    float sums[16];
    for (int64_t i = 0; i < 16; i++) q[i] = i < n ? p[i] : (tile_vec){0};
    hsum16_batch(q, sums);
    for (int64_t i = 0; i < n; i++) out[i] = sums[i];
}

/* Floats of scratch one thread needs: forward, dt for a block of positions; backward, four
 * per-position arrays, exp(dt A) and the states for the whole row. */
int64_t ss_scratch_floats(int64_t length, int64_t state, int32_t backward)
{
    return backward ? 4 * round_up(length) + 2 * round_up(length * state) : round_up(CHUNK);
}

/* exp(x) = 2^k * p(r) with k = round(x / ln 2), r = x - k ln 2 (two-part ln 2 so r is exact enough)
 * and Cephes' degree-7 polynomial for exp(r); relative error at most about 3e-7 over the clamped range.
 * Inline rather than libmvec's expf: the call clobbers every vector register, so the scan state
 * would be spilled around it, and the compiler cannot interleave it with the recurrence. */
#define EXP_LO (-87.3f)  /* exp(-87.3) ~ 1.2e-38: still a normal float, so 2^k below is exact */
#define EXP_HI 88.3f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
INLINE float exp_inline(float x)
{
    x = fminf(fmaxf(x, EXP_LO), EXP_HI);
    const float k = floorf(x * LOG2E + 0.5f);
    const float r = x - k * LN2_HI - k * LN2_LO;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* The scan's exponentials at 16 states with AVX-512, and one forward position (forward_step16: h <- exp(dt_l A) h +
 * dt_l u_l B_l, returned, and the products C_l h into *prod). These are the operations the compiler makes of exp_inline
 * and the loop around it (r reduced by one multiply-add with ln 2, the polynomial in Horner form, exp's power of two
 * applied to h before the polynomial), with one exception: the power of two 2^k scales h (or exp(r)) by one vscalefps,
 * exact like the multiplication it replaces, where the vectorised loop builds 2^k from k's bits and multiplies (four
 * operations). h stays in a register between positions; the compiled loop stored and reloaded it at every position,
 * on the recurrence's critical path. exp16_parts gives exp(r) and k, with exp(x) = exp(r) 2^k. */
INLINE __m512 exp16_parts(__m512 x, __m512 *k)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    *k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5f)),
                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(*k, _mm512_set1_ps(-(LN2_HI + LN2_LO)), x);
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500e-4f), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));  /* p r^2 + r + 1 as ((p r + 1) r + 1) */
}

INLINE __m512 forward_step16(__m512 h, __m512 A, float dtl, float dtu, const float *B, const float *C, tile_vec *prod)
{
    __m512 k;
    const __m512 e = exp16_parts(_mm512_mul_ps(_mm512_set1_ps(dtl), A), &k);
    h = _mm512_fmadd_ps(_mm512_scalef_ps(h, k), e, _mm512_mul_ps(_mm512_set1_ps(dtu), _mm512_loadu_ps(B)));
    *prod = (tile_vec)_mm512_mul_ps(h, _mm512_loadu_ps(C));
    return h;
}
#endif

INLINE float softplus(float x) { return x <= SOFTPLUS_THRESHOLD ? log1pf(expf(x)) : x; }
INLINE float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* dt for positions [l0, l0 + T) of one row. */
INLINE void compute_dt(const float *delta, float bias, int softplus_on, int64_t l0, int64_t T, float *dt)
{
    if (softplus_on) {
#pragma omp simd
        for (int64_t t = 0; t < T; t++) dt[t] = softplus(delta[l0 + t] + bias);
    } else {
#pragma omp simd
        for (int64_t t = 0; t < T; t++) dt[t] = delta[l0 + t] + bias;
    }
}

/* decay[l, n] = exp(dt_l A_n) and input[l, n] = dt_l u_l B_ln for the L positions of a row. */
INLINE void discretise(const float *dt, const float *A, const float *u, const float *B, int64_t L,
                       const int64_t N, float *decay, float *input)
{
#if defined(__AVX512F__)
    if (N == TILE) {  /* exp(dt A) = 2^k exp(r) with one vscalefps, as in forward_step16 */
        const __m512 Av = _mm512_loadu_ps(A);
        for (int64_t t = 0; t < L; t++) {
            __m512 k;
            const __m512 e = exp16_parts(_mm512_mul_ps(_mm512_set1_ps(dt[t]), Av), &k);
            _mm512_storeu_ps(decay + t * N, _mm512_scalef_ps(e, k));
            _mm512_storeu_ps(input + t * N, _mm512_mul_ps(_mm512_set1_ps(dt[t] * u[t]), _mm512_loadu_ps(B + t * N)));
        }
        return;
    }
#endif
    for (int64_t t = 0; t < L; t++) {
        const float dtl = dt[t], dtu = dt[t] * u[t];
        const float *Bt = B + t * N;
#pragma omp simd
        for (int64_t n = 0; n < N; n++) {
            decay[t * N + n] = exp_inline(dtl * A[n]);
            input[t * N + n] = dtu * Bt[n];
        }
    }
}

/* Forward of one row of channel d from its u, delta, z (NULL: no gate) and its group's B, C, all in scan order with
 * positions adjacent (B and C: the N states of a position adjacent, positions N floats apart): writes out[0..L) and
 * last[0..N). The channel-major kernel and the token kernel both run it, so their rows agree bit for bit. */
INLINE void forward_core(const ScanArgs *a, int64_t d, const int64_t N, float *dt, const float *u, const float *delta,
                         const float *z, const float *B, const float *C, float *out, float *last)
{
    const int64_t L = a->length;
    const float *A = a->A + d * N;
    const float bias = a->delta_bias ? a->delta_bias[d] : 0.0f, Dd = a->D ? a->D[d] : 0.0f;
    float h[N];

    for (int64_t n = 0; n < N; n++) h[n] = 0.0f;
    for (int64_t l0 = 0; l0 < L; l0 += CHUNK) {
        const int64_t T = L - l0 < CHUNK ? L - l0 : CHUNK;
        compute_dt(delta, bias, a->softplus, l0, T, dt);
        if (N == TILE) {  /* the products C_l h_l kept, summed TILE positions at a time (CHUNK is a multiple) */
            tile_vec P[TILE];
#if defined(__AVX512F__)
            __m512 hv = _mm512_loadu_ps(h);
            const __m512 Av = _mm512_loadu_ps(A);
            for (int64_t t = 0; t < T; t++) {
                hv = forward_step16(hv, Av, dt[t], dt[t] * u[l0 + t], B + (l0 + t) * N, C + (l0 + t) * N,
                                    &P[t % TILE]);
                if (t % TILE == TILE - 1) hsum16_batch(P, out + l0 + t - (TILE - 1));
            }
            _mm512_storeu_ps(h, hv);
#else
            for (int64_t t = 0; t < T; t++) {
                const float *Bt = B + (l0 + t) * N, *Ct = C + (l0 + t) * N;
                const float dtl = dt[t], dtu = dt[t] * u[l0 + t];
#pragma omp simd
                for (int64_t n = 0; n < N; n++) {  /* the exponentials do not depend on h: they overlap */
                    h[n] = exp_inline(dtl * A[n]) * h[n] + dtu * Bt[n];
                    P[t % TILE][n] = h[n] * Ct[n];
                }
                if (t % TILE == TILE - 1) hsum16_batch(P, out + l0 + t - (TILE - 1));
            }
#endif
            if (T % TILE) hsum16_part(P, T % TILE, out + l0 + T - T % TILE);
            continue;
        }
        for (int64_t t = 0; t < T; t++) {
            const float *Bt = B + (l0 + t) * N, *Ct = C + (l0 + t) * N;
            const float dtl = dt[t], dtu = dt[t] * u[l0 + t];
            float y = 0.0f;
#pragma omp simd reduction(+ : y)
            for (int64_t n = 0; n < N; n++) {
                h[n] = exp_inline(dtl * A[n]) * h[n] + dtu * Bt[n];
                y += h[n] * Ct[n];
            }
            out[l0 + t] = y;
        }
    }
    if (z) {
#pragma omp simd
        for (int64_t l = 0; l < L; l++) out[l] = (out[l] + Dd * u[l]) * z[l] * sigmoid(z[l]);
    } else {
#pragma omp simd
        for (int64_t l = 0; l < L; l++) out[l] += Dd * u[l];
    }
    for (int64_t n = 0; n < N; n++) last[n] = h[n];
}

/* Forward of one (b, d) row of the channel-major layout: writes out[0..L) and last[0..N). */
INLINE void forward_row(const ScanArgs *a, int64_t b, int64_t d, const int64_t N, float *buf,
                        float *out, float *last)
{
    const int64_t L = a->length, row = (b * a->dim + d) * L;
    const int64_t grp = b * a->groups + d / (a->dim / a->groups);
    forward_core(a, d, N, buf, a->u + row, a->delta + row, a->z ? a->z + row : NULL, a->B + grp * L * N,
                 a->C + grp * L * N, out, last);
}

#if defined(__AVX512F__)
/* The backward's two loops over positions at 16 states with AVX-512: the operations the vectorised loops compile to,
 * with the state (recompute16) and the adjoint and dA (reverse16) kept in registers from one position to the next,
 * where the compiled loops stored and reloaded them at every position, and the sums over the states made 16 positions
 * at a time (hsum16_batch). The first position's C_0 . h_0, which has no previous state, the compiled loop summed as
 * one chain of fused multiply-adds over the states in order: so is it here. */
INLINE void recompute16(int64_t L, const float *decay, const float *C, float *H, float *dy)
{
    tile_vec P[TILE];
    __m512 h = _mm512_loadu_ps(H);  /* h_0 = dt_0 u_0 B_0 */
    P[0] = (tile_vec)_mm512_mul_ps(h, _mm512_loadu_ps(C));
    for (int64_t l = 1; l < L; l++) {
        h = _mm512_fmadd_ps(_mm512_loadu_ps(decay + l * TILE), h, _mm512_loadu_ps(H + l * TILE));
        _mm512_storeu_ps(H + l * TILE, h);
        P[l % TILE] = (tile_vec)_mm512_mul_ps(h, _mm512_loadu_ps(C + l * TILE));
        if (l % TILE == TILE - 1) hsum16_batch(P, dy + l - (TILE - 1));
    }
    if (L % TILE) hsum16_part(P, L % TILE, dy + L - L % TILE);
    __m128 y = _mm_setzero_ps();
    for (int64_t n = 0; n < TILE; n++) y = _mm_fmadd_ss(_mm_set_ss(H[n]), _mm_set_ss(C[n]), y);
    dy[0] = _mm_cvtss_f32(y);
}

INLINE void reverse16(int64_t L, const float *A, const float *B, const float *C, const float *H, const float *decay,
                      const float *dy, const float *dt, const float *u, float *adj, float *dA, float *dB, float *dC,
                      float *gB, float *gAh)
{
    tile_vec PB[TILE], PA[TILE];
    const __m512 Av = _mm512_loadu_ps(A);
    __m512 adjv = _mm512_loadu_ps(adj), dAv = _mm512_loadu_ps(dA);
    for (int64_t l = L - 1; l >= 0; l--) {
        const __m512 dyl = _mm512_set1_ps(dy[l]), dec = _mm512_loadu_ps(decay + l * TILE);
        const __m512 hprev = l > 0 ? _mm512_loadu_ps(H + (l - 1) * TILE) : _mm512_setzero_ps();
        const __m512 an = _mm512_fmadd_ps(dyl, _mm512_loadu_ps(C + l * TILE), adjv);  /* full adjoint of h_l */
        const __m512 th = _mm512_mul_ps(_mm512_mul_ps(an, dec), hprev);  /* adjoint through exp(dt A) h_{l-1} */
        float *dBl = dB + l * TILE, *dCl = dC + l * TILE;
        _mm512_storeu_ps(dCl, _mm512_fmadd_ps(dyl, _mm512_loadu_ps(H + l * TILE), _mm512_loadu_ps(dCl)));
        _mm512_storeu_ps(dBl, _mm512_fmadd_ps(an, _mm512_set1_ps(dt[l] * u[l]), _mm512_loadu_ps(dBl)));
        PB[l % TILE] = (tile_vec)_mm512_mul_ps(an, _mm512_loadu_ps(B + l * TILE));
        PA[l % TILE] = (tile_vec)_mm512_mul_ps(th, Av);
        dAv = _mm512_fmadd_ps(th, _mm512_set1_ps(dt[l]), dAv);
        adjv = _mm512_mul_ps(an, dec);
        if (l % TILE == 0) {  /* positions l .. l + TILE - 1 done (fewer at the end of a row) */
            if (L - l >= TILE) {
                hsum16_batch(PB, gB + l);
                hsum16_batch(PA, gAh + l);
            } else {
                hsum16_part(PB, L - l, gB + l);
                hsum16_part(PA, L - l, gAh + l);
            }
        }
    }
    _mm512_storeu_ps(adj, adjv);
    _mm512_storeu_ps(dA, dAv);
}
#endif

/* Backward of one row of channel d (batch element b) from its u, delta, z (NULL: no gate), dout and its group's B, C,
 * laid out as forward_core reads them; writes du, ddelta and dz (where z is given) in the same order. dB, dC point at
 * the partial sums of the row's channel block, and the row's dA, dD, dbias are added to the sums over the batch
 * elements before b. Everything per position that is not part of the recurrence (gates, softplus derivative, du,
 * ddelta) is done in separate loops over positions, which vectorise; the reverse loop only carries the adjoint of the
 * state. Both kernels run it, as forward_core. */
INLINE void backward_core(const ScanArgs *a, const ScanGrads *g, int64_t b, int64_t d, const int64_t N, float *buf,
                          float *dB, float *dC, const float *u, const float *delta, const float *z, const float *dout,
                          const float *B, const float *C, float *du, float *ddelta, float *dz)
{
    const int64_t L = a->length;
    const float *A = a->A + d * N;
    const float bias = a->delta_bias ? a->delta_bias[d] : 0.0f, Dd = a->D ? a->D[d] : 0.0f;
    float *dt = buf, *dy = dt + round_up(L), *gB = dy + round_up(L), *gAh = gB + round_up(L);
    float *decay = gAh + round_up(L), *H = decay + round_up(L * N);
    float adj[N], dA[N], zero[N];
    float dD = 0.0f, dbias = 0.0f;

    /* Recompute the states (H[l] = h_l) and the scan output C_l . h_l (into dy). */
    compute_dt(delta, bias, a->softplus, 0, L, dt);
    discretise(dt, A, u, B, L, N, decay, H);
#if defined(__AVX512F__)
    if (N == TILE)
        recompute16(L, decay, C, H, dy);
    else
#endif
        for (int64_t l = 0; l < L; l++) {
            const float *hprev = l > 0 ? H + (l - 1) * N : NULL;
            float y = 0.0f;
#pragma omp simd reduction(+ : y)
            for (int64_t n = 0; n < N; n++) {
                if (hprev) H[l * N + n] += decay[l * N + n] * hprev[n];
                y += H[l * N + n] * C[l * N + n];
            }
            dy[l] = y;
        }

    /* Gradient of the gated output with respect to y (and to z). */
    if (z) {
#pragma omp simd reduction(+ : dD)
        for (int64_t l = 0; l < L; l++) {
            const float y = dy[l] + Dd * u[l], s = sigmoid(z[l]);
            dz[l] = dout[l] * y * s * (1.0f + z[l] * (1.0f - s));  /* silu'(z) = s (1 + z (1 - s)) */
            dy[l] = dout[l] * z[l] * s;
            dD += dy[l] * u[l];
        }
    } else {
#pragma omp simd reduction(+ : dD)
        for (int64_t l = 0; l < L; l++) {
            dy[l] = dout[l];
            dD += dy[l] * u[l];
        }
    }

    /* Adjoint recurrence, last position first: adj = dL/dh_l carried to h_{l-1} through exp(dt A). */
    for (int64_t n = 0; n < N; n++) {
        adj[n] = g->dlast ? g->dlast[(b * a->dim + d) * N + n] : 0.0f;
        dA[n] = 0.0f;
        zero[n] = 0.0f;
    }
#if defined(__AVX512F__)
    if (N == TILE)
        reverse16(L, A, B, C, H, decay, dy, dt, u, adj, dA, dB, dC, gB, gAh);
    else
#endif
    for (int64_t l = L - 1; l >= 0; l--) {
        const float *h = H + l * N, *hprev = l > 0 ? H + (l - 1) * N : zero, *dec = decay + l * N;
        const float *Bl = B + l * N, *Cl = C + l * N;
        float *dBl = dB + l * N, *dCl = dC + l * N;
        const float dyl = dy[l], dtl = dt[l], dtu = dt[l] * u[l];
        float sB = 0.0f, sA = 0.0f;
#pragma omp simd reduction(+ : sB, sA)
        for (int64_t n = 0; n < N; n++) {
            const float an = adj[n] + dyl * Cl[n];    /* full adjoint of h_l */
            const float th = an * dec[n] * hprev[n];  /* adjoint through exp(dt A) h_{l-1} */
            dCl[n] += dyl * h[n];
            dBl[n] += an * dtu;
            sB += an * Bl[n];
            sA += th * A[n];
            dA[n] += th * dtl;
            adj[n] = an * dec[n];
        }
        gB[l] = sB;
        gAh[l] = sA;
    }

    /* du, and ddelta through dt = softplus(delta + bias) (derivative sigmoid, 1 above the threshold). */
#pragma omp simd
    for (int64_t l = 0; l < L; l++) du[l] = dy[l] * Dd + dt[l] * gB[l];
    if (a->softplus) {
#pragma omp simd reduction(+ : dbias)
        for (int64_t l = 0; l < L; l++) {
            const float x = delta[l] + bias;
            ddelta[l] = (gAh[l] + u[l] * gB[l]) * (x <= SOFTPLUS_THRESHOLD ? sigmoid(x) : 1.0f);
            dbias += ddelta[l];
        }
    } else {
#pragma omp simd reduction(+ : dbias)
        for (int64_t l = 0; l < L; l++) {
            ddelta[l] = gAh[l] + u[l] * gB[l];
            dbias += ddelta[l];
        }
    }
    for (int64_t n = 0; n < N; n++) g->dA[d * N + n] += dA[n];
    g->dD[d] += dD;
    g->dbias[d] += dbias;
}

/* Backward of one (b, d) row of the channel-major layout. */
INLINE void backward_row(const ScanArgs *a, const ScanGrads *g, int64_t b, int64_t d, const int64_t N,
                         float *buf, float *dB, float *dC)
{
    const int64_t L = a->length, row = (b * a->dim + d) * L;
    const int64_t grp = b * a->groups + d / (a->dim / a->groups);
    backward_core(a, g, b, d, N, buf, dB, dC, a->u + row, a->delta + row, a->z ? a->z + row : NULL, g->dout + row,
                  a->B + grp * L * N, a->C + grp * L * N, g->du + row, g->ddelta + row, a->z ? g->dz + row : NULL);
}

/* The common state size gets a compile-time N, so a row's state lives in vector registers. */
#define COMMON_STATE 16
/* Forward rows are handed out in small batches as threads come free, not split evenly up front: on a
 * shared machine one thread is often late, and an even split would then wait for it. */
#define ROWS_PER_GRAB 8
/* The backward splits the channels of a group into blocks of equal size (the last may be shorter),
 * set by the shape alone, never by the thread count: at most MAX_BLOCKS blocks, enough to keep many
 * threads busy, and at least MIN_BLOCK_ROWS channels per block, since each block costs a pass over
 * its partial sums (2 * length * state floats): at batch 8, 256 channels, 1024 positions, blocks of
 * 4 channels made the backward ~10% slower on one thread than blocks of 16, which are as fast as
 * the former one partial buffer per thread. */
#define MAX_BLOCKS 64
#define MIN_BLOCK_ROWS 16
#define REDUCE_TILE 512            /* floats of one group's dB (and dC) summed over the blocks at once */

static int64_t block_rows(int64_t per_group)
{
    const int64_t rows = (per_group + MAX_BLOCKS - 1) / MAX_BLOCKS;
    return rows > MIN_BLOCK_ROWS ? rows : MIN_BLOCK_ROWS;
}
static int64_t group_blocks(int64_t per_group) { return (per_group + block_rows(per_group) - 1) / block_rows(per_group); }

/* Floats of ScanGrads.partial: two sums (dB, dC) of length * state floats per channel block. */
int64_t ss_partial_floats(int64_t dim, int64_t groups, int64_t length, int64_t state)
{
    return groups * group_blocks(dim / groups) * 2 * round_up(length * state);
}

void ss_forward(const ScanArgs *a, float *out, float *last)
{
    const int64_t rows = a->batch * a->dim, N = a->state;
#pragma omp parallel num_threads(a->threads)
    {
        float *buf = a->scratch + omp_get_thread_num() * ss_scratch_floats(a->length, N, 0);
#pragma omp for schedule(dynamic, ROWS_PER_GRAB)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t b = r / a->dim, d = r % a->dim;
            if (N == COMMON_STATE)
                forward_row(a, b, d, COMMON_STATE, buf, out + r * a->length, last + r * N);
            else
                forward_row(a, b, d, N, buf, out + r * a->length, last + r * N);
        }
    }
}

void ss_backward(const ScanArgs *a, const ScanGrads *g)
{
    const int64_t N = a->state, LN = a->length * N, GLN = a->groups * LN, stride = round_up(LN);
    const int64_t per_group = a->dim / a->groups, rows = block_rows(per_group), blocks = group_blocks(per_group);
    const int64_t tiles = (LN + REDUCE_TILE - 1) / REDUCE_TILE;
#pragma omp parallel num_threads(a->threads)
    {
        float *buf = a->scratch + omp_get_thread_num() * ss_scratch_floats(a->length, N, 1);
        for (int64_t b = 0; b < a->batch; b++) {
            /* Blocks, not rows, are handed out: the rows of a block run in channel order on one thread. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t k = 0; k < a->groups * blocks; k++) {
                float *pB = g->partial + k * 2 * stride, *pC = pB + stride;
                const int64_t d0 = k / blocks * per_group + k % blocks * rows, group_end = (k / blocks + 1) * per_group;
                const int64_t d1 = d0 + rows < group_end ? d0 + rows : group_end;
                memset(pB, 0, 2 * stride * sizeof(float));
                for (int64_t d = d0; d < d1; d++) {
                    if (N == COMMON_STATE)
                        backward_row(a, g, b, d, COMMON_STATE, buf, pB, pC);
                    else
                        backward_row(a, g, b, d, N, buf, pB, pC);
                }
            }
            /* The implicit barrier above means every block of batch element b is done. Each float of dB
             * and dC is the sum of its blocks' partials in block order; the tiles only split the work. */
#pragma omp for schedule(static)
            for (int64_t t = 0; t < a->groups * tiles; t++) {
                const int64_t grp = t / tiles, i0 = t % tiles * REDUCE_TILE;
                const int64_t T = LN - i0 < REDUCE_TILE ? LN - i0 : REDUCE_TILE;
                float *dB = g->dB + b * GLN + grp * LN + i0, *dC = g->dC + b * GLN + grp * LN + i0;
                const float *p = g->partial + grp * blocks * 2 * stride + i0;
                memcpy(dB, p, T * sizeof(float));
                memcpy(dC, p + stride, T * sizeof(float));
                for (int64_t k = 1; k < blocks; k++) {
                    p += 2 * stride;
#pragma omp simd
                    for (int64_t i = 0; i < T; i++) {
                        dB[i] += p[i];
                        dC[i] += p[stride + i];
                    }
                }
            }
        }
    }
}

/* ---- Token layout and scan order walked by index arithmetic (ss_forward_tokens, ss_backward_tokens) ----
 *
 * The same recurrence as ss_forward / ss_backward, bit for bit: every row runs the same row functions
 * (forward_core, backward_core) on the same values; only where a value is read from and written to
 * changes. u, delta, z
 * are read through strides (any layout; the models pass the token-major (batch, length, channels) views
 * their linear layers produce); B and C through (batch, length, group) strides with the N states of one
 * position adjacent; out, du, ddelta, dz are written token-major and contiguous (batch, length, dim);
 * dB and dC (batch, length, groups, state) contiguous, which is the layout of the linear layer's output
 * gradient. Scan position l of a row reads and writes raster token pos[l], computed once per call from
 * the order (order_position below), so the models never flip, transpose or gather a tensor to scan it
 * in another order. u, delta, z and dout are first gathered into contiguous thread scratch so that the
 * per-position loops stay the vectorised loops of the channel-major kernel, TILE channels at a time:
 * one cache line of a token-major row holds 16 channels, so a tile reads (and writes back) each line
 * once, where a row at a time would walk a 4-byte column with a stride of whole kilobytes, which maps
 * onto a few cache sets and misses on every position. B and C of a group are copied into scan order
 * once for the rows that share them (gather_states), the layout the row functions read. */

typedef struct {
    ScanArgs base;                       /* u, delta, z, B, C point at element (0, 0, 0) of their views */
    int64_t su[3], sdelta[3], sz[3];     /* strides (batch, position, channel) in floats */
    int64_t sB[3], sC[3];                /* strides (batch, position, group); the state stride is 1 */
    int32_t order, grid, prefix;         /* the scan order: see order_position */
    /* rank > 0: delta is not read but made, delta[b, l, e] = sum_k dtr[b, l, k] wdt[e, k] (see project_tile) */
    const float *dtr, *wdt;              /* the low-rank dt (batch, length, rank) strided; wdt (dim, rank) contiguous */
    int64_t sdtr[3];                     /* dtr's strides (batch, position, rank) in floats */
    int64_t rank;
} TokenArgs;

#define ORDER_RASTER (-1)
#define ORDER_REVERSED (-2)
#define ORDER_COLUMNS (-3)
#define ORDER_COLUMNS_REVERSED (-4)

/* Token scanned at step l: the first `prefix` tokens in place, then the other n = length - prefix tokens
 * (a grid x grid grid where the order needs one) in raster order, reversed, by columns (top to bottom,
 * left to right), by columns reversed, or along a snake 0..7 (see models/mamba.py snake_order): bit 1
 * columns instead of rows, bit 2 from the bottom, bit 4 from the right, every other line backwards. */
static int64_t order_position(int32_t order, int64_t grid, int64_t prefix, int64_t length, int64_t l)
{
    if (l < prefix) return l;
    const int64_t n = length - prefix;
    l -= prefix;
    if (order == ORDER_RASTER) return prefix + l;
    if (order == ORDER_REVERSED) return prefix + n - 1 - l;
    if (order == ORDER_COLUMNS_REVERSED) l = n - 1 - l;
    if (order == ORDER_COLUMNS || order == ORDER_COLUMNS_REVERSED) return prefix + l % grid * grid + l / grid;
    int64_t r = l / grid, c = l % grid;
    if (r & 1) c = grid - 1 - c;
    if (order & 4) c = grid - 1 - c;
    if (order & 2) r = grid - 1 - r;
    return prefix + ((order & 1) ? c * grid + r : r * grid + c);
}

static void fill_positions(int32_t order, int64_t grid, int64_t prefix, int64_t length, int64_t *pos)
{
    for (int64_t l = 0; l < length; l++) pos[l] = order_position(order, grid, prefix, length, l);
}

/* Positions ahead whose token rows a tile move prefetches: at batch 8 a layer's streams (2 MB each at the cpu preset)
 * outgrow the L2 cache, and the rows of a scan order are too far apart for the hardware prefetcher to follow. */
#define PREFETCH_AHEAD 32

/* Floats from one row of a gathered tile to the next: one cache line more than the row needs. The TILE rows of every
 * stream are read and written at the same positions together; rows a power of two of lines apart (length 256: 1 KB)
 * would all fall into a few sets of the L1 cache and evict each other, an odd number of lines apart they spread over
 * all the sets. */
static int64_t tile_ld(int64_t length) { return round_up(length) + ALIGN_FLOATS; }
#define FWD_STREAMS 4  /* u, delta, z, y */
#define BWD_STREAMS 7  /* u, delta, z, dout, du, ddelta, dz */

/* Scratch floats per thread of the token entries: the channel-major kernel's, the gathered tile, and one group's B and
 * C in scan order (gather_states). */
int64_t ss_token_scratch_floats(int64_t length, int64_t state, int32_t backward)
{
    const int64_t streams = backward ? BWD_STREAMS : FWD_STREAMS;
    return ss_scratch_floats(length, state, backward) + streams * TILE * tile_ld(length) + 2 * round_up(length * state);
}

/* One step of the TILE x TILE transpose: rows i and i + s (bit s of i clear) exchange the s x s blocks off the
 * diagonal, so that bit s of the row index and bit s of the lane swap; the steps s = 8, 4, 2, 1 swap every bit. */
#define TRANSPOSE_STEP(r, s, LO, HI)                      \
    for (int i = 0; i < TILE; i++)                        \
        if (!(i & (s))) {                                 \
            const tile_vec x = (r)[i], y = (r)[i + (s)];  \
            (r)[i] = SHUFFLE2(x, y, LO);                  \
            (r)[i + (s)] = SHUFFLE2(x, y, HI);            \
        }
#define LANES_8_LO 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define LANES_8_HI 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LANES_4_LO 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define LANES_4_HI 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LANES_2_LO 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define LANES_2_HI 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LANES_1_LO 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define LANES_1_HI 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31

/* r[i][j] <- r[j][i] */
INLINE void transpose_tile(tile_vec r[TILE])
{
    TRANSPOSE_STEP(r, 8, LANES_8_LO, LANES_8_HI);
    TRANSPOSE_STEP(r, 4, LANES_4_LO, LANES_4_HI);
    TRANSPOSE_STEP(r, 2, LANES_2_LO, LANES_2_HI);
    TRANSPOSE_STEP(r, 1, LANES_1_LO, LANES_1_HI);
}

/* dst[j * ld + l] = src[pos[l] * sl + j * sd] for T <= TILE channels j: scan step l of channel j. A full tile of
 * unit-stride channels moves TILE positions at a time, read as TILE vectors of channels and transposed in registers,
 * rather than element by element, where each position's TILE stores go to TILE different rows. */
INLINE void gather_tile(const float *src, int64_t sl, int64_t sd, const int64_t *pos, int64_t L, int64_t T,
                        float *dst, int64_t ld)
{
    int64_t l = 0;
    if (T == TILE && sd == 1)
        for (; l + TILE <= L; l += TILE) {
            tile_vec r[TILE];
            if (l + PREFETCH_AHEAD + TILE <= L)
                for (int i = 0; i < TILE; i++) __builtin_prefetch(src + pos[l + PREFETCH_AHEAD + i] * sl);
            for (int i = 0; i < TILE; i++) r[i] = vec_load(src + pos[l + i] * sl);
            transpose_tile(r);
            for (int j = 0; j < TILE; j++) vec_store(dst + j * ld + l, r[j]);
        }
    for (; l < L; l++) {
        const float *p = src + pos[l] * sl;
        for (int64_t j = 0; j < T; j++) dst[j * ld + l] = p[j * sd];
    }
}

/* The inverse into a contiguous token-major (length, dim) slab: out[pos[l] * dim + j] = src[j * ld + l]. */
INLINE void scatter_tile(const float *src, int64_t ld, const int64_t *pos, int64_t L, int64_t T, int64_t dim,
                         float *out)
{
    int64_t l = 0;
    if (T == TILE)
        for (; l + TILE <= L; l += TILE) {
            tile_vec r[TILE];
            for (int j = 0; j < TILE; j++) r[j] = vec_load(src + j * ld + l);
            transpose_tile(r);
            if (l + PREFETCH_AHEAD + TILE <= L)
                for (int i = 0; i < TILE; i++) __builtin_prefetch(out + pos[l + PREFETCH_AHEAD + i] * dim, 1);
            for (int i = 0; i < TILE; i++) vec_store(out + pos[l + i] * dim, r[i]);
        }
    for (; l < L; l++) {
        float *p = out + pos[l] * dim;
        for (int64_t j = 0; j < T; j++) p[j] = src[j * ld + l];
    }
}

/* dst[j * ld + l] = delta of channel d0 + j at scan step l, made from the low-rank dt of batch element b (rank > 0):
 * sum_k dtr[pos[l], k] wdt[d0 + j, k] as one chain of fused multiply-adds from k = 0, the order in which the BLAS
 * product it replaces (dt_proj, K = rank) sums on this CPU, so delta has the same bits (fmaf: the compiler may not
 * reorder it, as it may a sum under -ffast-math). A full tile of positions is made TILE positions at a time, lanes
 * over channels, and transposed in registers into the rows, as gather_tile moves one. */
INLINE void project_tile(const TokenArgs *t, const int64_t *pos, int64_t b, int64_t d0, int64_t T, float *dst,
                         int64_t ld)
{
    const int64_t L = t->base.length, R = t->rank, sl = t->sdtr[1], sk = t->sdtr[2];
    const float *src = t->dtr + b * t->sdtr[0];
    tile_vec w[R];  /* w[k][j]: channel d0 + j's weight k (zero beyond T) */
    for (int64_t k = 0; k < R; k++)
        for (int64_t j = 0; j < TILE; j++) w[k][j] = j < T ? t->wdt[(d0 + j) * R + k] : 0.0f;
    int64_t l = 0;
    if (T == TILE)
        for (; l + TILE <= L; l += TILE) {
            tile_vec r[TILE];
            if (l + PREFETCH_AHEAD + TILE <= L)
                for (int i = 0; i < TILE; i++) __builtin_prefetch(src + pos[l + PREFETCH_AHEAD + i] * sl);
            for (int i = 0; i < TILE; i++) {
                const float *p = src + pos[l + i] * sl;
                tile_vec acc = {0};
                for (int64_t k = 0; k < R; k++) {
                    const float x = p[k * sk];
#pragma omp simd
                    for (int j = 0; j < TILE; j++) acc[j] = __builtin_fmaf(x, w[k][j], acc[j]);
                }
                r[i] = acc;
            }
            transpose_tile(r);
            for (int j = 0; j < TILE; j++) vec_store(dst + j * ld + l, r[j]);
        }
    for (; l < L; l++) {
        const float *p = src + pos[l] * sl;
        for (int64_t j = 0; j < T; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < R; k++) acc = __builtin_fmaf(p[k * sk], w[k][j], acc);
            dst[j * ld + l] = acc;
        }
    }
}

/* B and C of batch element b, group grp in scan order into Bs, Cs (length x N each, positions N floats apart): the
 * layout forward_core and backward_core read, so that their per-position loops do not look up positions; made once
 * for the rows of a tile (forward) or channel block (backward) that share them. */
INLINE void gather_states(const TokenArgs *t, const int64_t *pos, int64_t b, int64_t grp, float *Bs, float *Cs)
{
    const ScanArgs *a = &t->base;
    const int64_t L = a->length, N = a->state;
    const float *B = a->B + b * t->sB[0] + grp * t->sB[2], *C = a->C + b * t->sC[0] + grp * t->sC[2];
    for (int64_t l = 0; l < L; l++) {
        memcpy(Bs + l * N, B + pos[l] * t->sB[1], N * sizeof(float));
        memcpy(Cs + l * N, C + pos[l] * t->sC[1], N * sizeof(float));
    }
}

/* Gather channels [d0, d0 + T) of batch element b of the streams u, delta, z (and dout) into the tile; delta made
 * from the low-rank dt where rank > 0 (project_tile). */
static void gather_inputs(const TokenArgs *t, const float *dout, const int64_t *pos, int64_t b, int64_t d0,
                          int64_t T, float *tile, int64_t ld)
{
    const ScanArgs *a = &t->base;
    const int64_t L = a->length;
    gather_tile(a->u + b * t->su[0] + d0 * t->su[2], t->su[1], t->su[2], pos, L, T, tile, ld);
    if (t->rank)
        project_tile(t, pos, b, d0, T, tile + TILE * ld, ld);
    else
        gather_tile(a->delta + b * t->sdelta[0] + d0 * t->sdelta[2], t->sdelta[1], t->sdelta[2], pos, L, T,
                    tile + TILE * ld, ld);
    if (a->z)
        gather_tile(a->z + b * t->sz[0] + d0 * t->sz[2], t->sz[1], t->sz[2], pos, L, T, tile + 2 * TILE * ld, ld);
    if (dout)
        gather_tile(dout + b * L * a->dim + d0, a->dim, 1, pos, L, T, tile + 3 * TILE * ld, ld);
}

/* Prefetch the token rows of scan steps [l0, l1) of channels d0.. of batch element b in the streams u, delta, z (and
 * dout; dt for delta where rank > 0): the tile a thread will likely take next, a slice of it during each row of the
 * current one, so that its gather finds the lines in the cache (at batch 8 a layer's streams come from memory; the
 * tile's own prefetches, a few positions ahead, cannot cover that latency). Tiles are handed out in order, so with
 * every thread busy a thread's next tile is about the number of threads further on; a wrong guess costs only the
 * prefetches. */
INLINE void prefetch_tile_rows(const TokenArgs *t, const float *dout, const int64_t *pos, int64_t b, int64_t d0,
                               int64_t l0, int64_t l1)
{
    const ScanArgs *a = &t->base;
    for (int64_t l = l0; l < l1; l++) {
        __builtin_prefetch(a->u + b * t->su[0] + pos[l] * t->su[1] + d0 * t->su[2]);
        if (t->rank)
            __builtin_prefetch(t->dtr + b * t->sdtr[0] + pos[l] * t->sdtr[1]);
        else
            __builtin_prefetch(a->delta + b * t->sdelta[0] + pos[l] * t->sdelta[1] + d0 * t->sdelta[2]);
        if (a->z) __builtin_prefetch(a->z + b * t->sz[0] + pos[l] * t->sz[1] + d0 * t->sz[2]);
        if (dout) __builtin_prefetch(dout + (b * a->length + pos[l]) * a->dim + d0);
    }
}

/* pos: the caller's length int64 slots, filled here. out (batch, length, dim); last (batch, dim, state). */
void ss_forward_tokens(const TokenArgs *t, int64_t *pos, float *out, float *last)
{
    const ScanArgs *a = &t->base;
    const int64_t N = a->state, L = a->length, E = a->dim, ld = tile_ld(L);
    const int64_t tiles = (E + TILE - 1) / TILE;
    fill_positions(t->order, t->grid, t->prefix, L, pos);
#pragma omp parallel num_threads(a->threads)
    {
        float *dt = a->scratch + omp_get_thread_num() * ss_token_scratch_floats(L, N, 0);
        float *tile = dt + ss_scratch_floats(L, N, 0), *y = tile + 3 * TILE * ld;
        float *Bs = tile + FWD_STREAMS * TILE * ld, *Cs = Bs + round_up(L * N);
        int64_t held = -1;  /* the (batch element, group) whose B and C are in Bs, Cs */
        /* rows are independent: tiles are handed out as threads come free (see ROWS_PER_GRAB) */
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < a->batch * tiles; k++) {
            const int64_t b = k / tiles, d0 = k % tiles * TILE, T = E - d0 < TILE ? E - d0 : TILE;
            const int64_t kn = k + omp_get_num_threads();  /* see prefetch_tile_rows */
            gather_inputs(t, NULL, pos, b, d0, T, tile, ld);
            for (int64_t j = 0; j < T; j++) {
                const int64_t grp = (d0 + j) / (E / a->groups);
                if (held != b * a->groups + grp) {
                    gather_states(t, pos, b, grp, Bs, Cs);
                    held = b * a->groups + grp;
                }
                if (kn < a->batch * tiles)
                    prefetch_tile_rows(t, NULL, pos, kn / tiles, kn % tiles * TILE, j * L / T, (j + 1) * L / T);
                const float *u = tile + j * ld, *delta = u + TILE * ld, *z = a->z ? delta + TILE * ld : NULL;
                float *lst = last + (b * E + d0 + j) * N;
                if (N == COMMON_STATE)
                    forward_core(a, d0 + j, COMMON_STATE, dt, u, delta, z, Bs, Cs, y + j * ld, lst);
                else
                    forward_core(a, d0 + j, N, dt, u, delta, z, Bs, Cs, y + j * ld, lst);
            }
            scatter_tile(y, ld, pos, L, T, E, out + b * L * E + d0);
        }
    }
}

/* ScanGrads as for ss_backward, except du, ddelta, dz, dout (batch, length, dim) and dB, dC
 * (batch, length, groups, state), all contiguous. */
void ss_backward_tokens(const TokenArgs *t, const ScanGrads *g, int64_t *pos)
{
    const ScanArgs *a = &t->base;
    const int64_t N = a->state, L = a->length, G = a->groups, LN = L * N, stride = round_up(LN);
    const int64_t E = a->dim, ld = tile_ld(L);
    const int64_t per_group = a->dim / G, rows = block_rows(per_group), blocks = group_blocks(per_group);
    fill_positions(t->order, t->grid, t->prefix, L, pos);
#pragma omp parallel num_threads(a->threads)
    {
        float *buf = a->scratch + omp_get_thread_num() * ss_token_scratch_floats(L, N, 1);
        float *tile = buf + ss_scratch_floats(L, N, 1);
        float *Bs = tile + BWD_STREAMS * TILE * ld, *Cs = Bs + round_up(L * N);
        for (int64_t b = 0; b < a->batch; b++) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t k = 0; k < G * blocks; k++) {
                float *pB = g->partial + k * 2 * stride, *pC = pB + stride;
                const int64_t d0 = k / blocks * per_group + k % blocks * rows, group_end = (k / blocks + 1) * per_group;
                const int64_t d1 = d0 + rows < group_end ? d0 + rows : group_end;
                memset(pB, 0, 2 * stride * sizeof(float));
                gather_states(t, pos, b, k / blocks, Bs, Cs);  /* a block's channels are one group's */
                /* the block's rows in channel order, as in ss_backward, a tile of them gathered at a time */
                for (int64_t e0 = d0; e0 < d1; e0 += TILE) {
                    const int64_t T = d1 - e0 < TILE ? d1 - e0 : TILE;
                    /* the next tile: the block's own, or the block this thread likely takes next */
                    const int64_t kn = k + omp_get_num_threads();
                    const int64_t dn = e0 + TILE < d1 ? e0 + TILE
                                       : kn < G * blocks ? kn / blocks * per_group + kn % blocks * rows : -1;
                    gather_inputs(t, g->dout, pos, b, e0, T, tile, ld);
                    for (int64_t j = 0; j < T; j++) {
                        if (dn >= 0) prefetch_tile_rows(t, g->dout, pos, b, dn, j * L / T, (j + 1) * L / T);
                        const float *u = tile + j * ld, *delta = u + TILE * ld, *z = delta + TILE * ld;
                        const float *dout = z + TILE * ld;
                        float *du = tile + (4 * TILE + j) * ld, *ddelta = du + TILE * ld, *dz = ddelta + TILE * ld;
                        if (N == COMMON_STATE)
                            backward_core(a, g, b, e0 + j, COMMON_STATE, buf, pB, pC, u, delta, a->z ? z : NULL, dout,
                                          Bs, Cs, du, ddelta, dz);
                        else
                            backward_core(a, g, b, e0 + j, N, buf, pB, pC, u, delta, a->z ? z : NULL, dout, Bs, Cs,
                                          du, ddelta, dz);
                    }
                    scatter_tile(tile + 4 * TILE * ld, ld, pos, L, T, E, g->du + b * L * E + e0);
                    scatter_tile(tile + 5 * TILE * ld, ld, pos, L, T, E, g->ddelta + b * L * E + e0);
                    if (a->z) scatter_tile(tile + 6 * TILE * ld, ld, pos, L, T, E, g->dz + b * L * E + e0);
                }
            }
            /* As in ss_backward: each float is its blocks' partials summed in block order; scan position l
             * of the partials lands on raster token pos[l]. Split by positions, which only divides the work. */
#pragma omp for schedule(static)
            for (int64_t q = 0; q < G * L; q++) {
                const int64_t grp = q / L, l = q % L;
                float *dB = g->dB + ((b * L + pos[l]) * G + grp) * N, *dC = g->dC + ((b * L + pos[l]) * G + grp) * N;
                const float *p = g->partial + grp * blocks * 2 * stride + l * N;
                memcpy(dB, p, N * sizeof(float));
                memcpy(dC, p + stride, N * sizeof(float));
                for (int64_t k = 1; k < blocks; k++) {
                    p += 2 * stride;
#pragma omp simd
                    for (int64_t i = 0; i < N; i++) {
                        dB[i] += p[i];
                        dC[i] += p[stride + i];
                    }
                }
            }
        }
    }
}

/* ---- Mamba's depthwise causal conv + SiLU along a scan order, on the token layout (ss_conv_*_tokens) ----
 *
 * out_l = silu(bias + sum_k w_k x_{l - (width - 1) + k}) over the scan steps l of one channel (steps before
 * the first read as zero), so that the conv, like the scan, sees the tokens in scan order while x and out
 * stay (batch, length, dim) in raster order: step l is token pos[l], as in the scan. x is read through
 * strides, out, dout and dx are contiguous (batch, length, dim); each tile of TILE channels is gathered into
 * scan order in thread scratch, convolved row by row and scattered back. The backward gives dx and the sums
 * over the batch of dweight (dim, width) and dbias (dim,): each channel tile is one thread's, which adds the
 * batch elements in order, so the bits do not depend on the thread count. */

typedef struct {
    int64_t batch, dim, length, width;
    const float *x, *weight, *bias;      /* x (batch, length, dim) strided; weight (dim, width); bias NULL or (dim,) */
    int64_t sx[3];                       /* x's strides (batch, position, channel) in floats */
    int32_t order, grid, prefix;         /* the scan order: see order_position */
    int32_t threads;
    float *scratch;                      /* threads * ss_conv_scratch_floats(length, backward) floats */
} ConvArgs;

#define CONV_FWD_TILES 2  /* x and out */
#define CONV_BWD_TILES 3  /* x, dout and dx, plus one row of the pre-activation's gradient */

int64_t ss_conv_scratch_floats(int64_t length, int32_t backward)
{
    return (backward ? CONV_BWD_TILES * TILE + 1 : CONV_FWD_TILES * TILE) * tile_ld(length);
}

/* The pre-activation of one row in scan order: a_l = bias + w_0 x_{l-W+1} + ... + w_{W-1} x_l. */
INLINE void conv_row(const float *x, const float *w, float bias, int64_t W, int64_t L, float *a)
{
#pragma omp simd
    for (int64_t l = 0; l < L; l++) a[l] = bias;
    for (int64_t k = 0; k < W; k++) {
        const int64_t shift = W - 1 - k;
#pragma omp simd
        for (int64_t l = shift; l < L; l++) a[l] += w[k] * x[l - shift];
    }
}

void ss_conv_forward_tokens(const ConvArgs *c, int64_t *pos, float *out)
{
    const int64_t L = c->length, E = c->dim, W = c->width, ld = tile_ld(L), tiles = (E + TILE - 1) / TILE;
    fill_positions(c->order, c->grid, c->prefix, L, pos);
#pragma omp parallel num_threads(c->threads)
    {
        float *x = c->scratch + omp_get_thread_num() * ss_conv_scratch_floats(L, 0), *y = x + TILE * ld;
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < c->batch * tiles; k++) {
            const int64_t b = k / tiles, d0 = k % tiles * TILE, T = E - d0 < TILE ? E - d0 : TILE;
            gather_tile(c->x + b * c->sx[0] + d0 * c->sx[2], c->sx[1], c->sx[2], pos, L, T, x, ld);
            for (int64_t j = 0; j < T; j++) {
                float *a = y + j * ld;
                conv_row(x + j * ld, c->weight + (d0 + j) * W, c->bias ? c->bias[d0 + j] : 0.0f, W, L, a);
#pragma omp simd
                for (int64_t l = 0; l < L; l++) a[l] = a[l] * sigmoid(a[l]);
            }
            scatter_tile(y, ld, pos, L, T, E, out + b * L * E + d0);
        }
    }
}

/* dout, dx (batch, length, dim) contiguous; dweight (dim, width) and dbias (dim,) are overwritten (dbias may be
 * NULL when there is no bias). */
void ss_conv_backward_tokens(const ConvArgs *c, const float *dout, int64_t *pos, float *dx, float *dweight,
                             float *dbias)
{
    const int64_t L = c->length, E = c->dim, W = c->width, ld = tile_ld(L), tiles = (E + TILE - 1) / TILE;
    fill_positions(c->order, c->grid, c->prefix, L, pos);
#pragma omp parallel num_threads(c->threads)
    {
        float *x = c->scratch + omp_get_thread_num() * ss_conv_scratch_floats(L, 1);
        float *dy = x + TILE * ld, *dxt = dy + TILE * ld, *da = dxt + TILE * ld;
#pragma omp for schedule(dynamic, 1)
        for (int64_t q = 0; q < tiles; q++) {
            const int64_t d0 = q * TILE, T = E - d0 < TILE ? E - d0 : TILE;
            for (int64_t j = 0; j < T; j++) {
                for (int64_t k = 0; k < W; k++) dweight[(d0 + j) * W + k] = 0.0f;
                if (dbias) dbias[d0 + j] = 0.0f;
            }
            for (int64_t b = 0; b < c->batch; b++) {
                gather_tile(c->x + b * c->sx[0] + d0 * c->sx[2], c->sx[1], c->sx[2], pos, L, T, x, ld);
                gather_tile(dout + b * L * E + d0, E, 1, pos, L, T, dy, ld);
                for (int64_t j = 0; j < T; j++) {
                    const float *xr = x + j * ld, *dyr = dy + j * ld, *w = c->weight + (d0 + j) * W;
                    float *dxr = dxt + j * ld, *dw = dweight + (d0 + j) * W, db = 0.0f;
                    conv_row(xr, w, c->bias ? c->bias[d0 + j] : 0.0f, W, L, da);
#pragma omp simd reduction(+ : db)
                    for (int64_t l = 0; l < L; l++) {  /* silu'(a) = s (1 + a (1 - s)) */
                        const float s = sigmoid(da[l]);
                        da[l] = dyr[l] * s * (1.0f + da[l] * (1.0f - s));
                        db += da[l];
                    }
                    /* dx_m = sum_k w_k da_{m + W - 1 - k}, the transposed conv; dw_k = sum_l da_l x_{l - (W-1) + k} */
#pragma omp simd
                    for (int64_t m = 0; m < L; m++) dxr[m] = 0.0f;
                    for (int64_t k = 0; k < W; k++) {
                        const int64_t shift = W - 1 - k;
                        float s = 0.0f;
#pragma omp simd reduction(+ : s)
                        for (int64_t l = shift; l < L; l++) {
                            dxr[l - shift] += w[k] * da[l];
                            s += da[l] * xr[l - shift];
                        }
                        dw[k] += s;
                    }
                    if (dbias) dbias[d0 + j] += db;
                }
                scatter_tile(dxt, ld, pos, L, T, E, dx + b * L * E + d0);
            }
        }
    }
}

/* ---- The 3 x 3 depthwise grid conv + SiLU on the token layout (ss_grid_conv_forward, _backward) ----
 *
 *   a_{i,j} = bias + sum_{di, dj in -1..1} w_{di,dj} x_{i+di, j+dj}   (zero outside the grid),  out = a * sigmoid(a)
 *
 * per channel, on x (batch, grid * grid, dim) read through its strides with the channel stride 1 (the in_proj
 * output's view), out, dout and dx contiguous (batch, grid * grid, dim). TILE channels of one batch element are one
 * vector (GCC vector extensions: the compiler picks the registers), copied first into thread scratch with a border of
 * zeros, so that every position takes the same nine taps with no test: a is the bias plus the nine taps (in an order
 * the compiler fixes, -ffast-math), each lane on its own (a tap outside the grid adds w * 0), and the sigmoid is
 * exp_inline's arithmetic, so the bits do not depend on the thread count. The backward hands out channel tiles only: a
 * tile's gradient of a, its dx, and its dweight and dbias sums (over the batch in order, then the positions in raster
 * order) are made by one thread, so those sums too are in a fixed order. */

typedef struct {
    int64_t batch, grid, dim;
    const float *x, *weight, *bias;      /* x (batch, grid * grid, dim) strided; weight (dim, 3, 3); bias NULL or (dim,) */
    int64_t sx[2];                       /* x's strides (batch, position) in floats; the channel stride is 1 */
    int32_t threads;
} GridConvArgs;

#define GRID_TAPS 9

/* Floats of scratch per thread: the padded (grid + 2)^2 tile of x, and in the backward that of the gradient of a. */
int64_t ss_grid_conv_scratch_floats(int64_t grid, int32_t backward)
{
    return (backward ? 2 : 1) * (grid + 2) * (grid + 2) * TILE;
}

/* T <= TILE floats of src, zero beyond T. A whole tile is one vector load: a copy of T floats is a call to memcpy. */
INLINE tile_vec tile_load(const float *src, int64_t T)
{
    tile_vec v = {0};
    if (T == TILE) memcpy(&v, src, sizeof v);
    else memcpy(&v, src, T * sizeof(float));
    return v;
}

/* Channels [d0, d0 + T) of one batch element (src points at channel d0 of position 0, positions sl floats apart)
 * into the interior of dst, a (g + 2) x (g + 2) grid of TILE-vectors, channels beyond T zero. Only the interior is
 * written: the border is zeroed once per thread (the caller's memset), and every gather leaves it zero. */
INLINE void grid_tile_gather(const float *src, int64_t sl, int64_t g, int64_t T, tile_vec *dst)
{
    for (int64_t i = 0; i < g; i++)
        for (int64_t j = 0; j < g; j++) dst[(i + 1) * (g + 2) + j + 1] = tile_load(src + (i * g + j) * sl, T);
}

/* Prefetch row i of a tile's grid (src at channel d0 of position 0, positions sl floats apart): the rows of one
 * tile are a cache line each, far apart, and at batch 8 they come from memory. */
INLINE void grid_prefetch_row(const float *src, int64_t sl, int64_t g, int64_t i)
{
    for (int64_t j = 0; j < g; j++) __builtin_prefetch(src + (i * g + j) * sl);
}

/* TILE lanes into T <= TILE floats of dst. */
INLINE void tile_store(float *dst, tile_vec v, int64_t T)
{
    if (T == TILE) memcpy(dst, &v, sizeof v);
    else memcpy(dst, &v, T * sizeof(float));
}

INLINE tile_vec tile_sigmoid(tile_vec a)
{
    tile_vec s;
#pragma omp simd
    for (int64_t q = 0; q < TILE; q++) s[q] = 1.0f / (1.0f + exp_inline(-a[q]));
    return s;
}

/* Weights of channels [d0, d0 + T), one vector per tap k = 3 (di + 1) + dj + 1 (zero beyond T), and the biases. */
INLINE void grid_tile_weights(const GridConvArgs *c, int64_t d0, int64_t T, tile_vec *w, tile_vec *bias)
{
    for (int64_t k = 0; k < GRID_TAPS; k++)
        for (int64_t q = 0; q < TILE; q++) w[k][q] = q < T ? c->weight[(d0 + q) * GRID_TAPS + k] : 0.0f;
    for (int64_t q = 0; q < TILE; q++) (*bias)[q] = q < T && c->bias ? c->bias[d0 + q] : 0.0f;
}

/* sum over the nine taps, in raster order, of w_k times the padded grid p around interior position (i, j), onto a */
INLINE tile_vec grid_tile_taps(tile_vec a, const tile_vec *w, const tile_vec *p, int64_t g, int64_t i, int64_t j)
{
    const int64_t gp = g + 2;
    for (int64_t di = 0; di < 3; di++)
        for (int64_t dj = 0; dj < 3; dj++) a += w[3 * di + dj] * p[(i + di) * gp + j + dj];
    return a;
}

void ss_grid_conv_forward(const GridConvArgs *c, float *scratch, float *out)
{
    const int64_t g = c->grid, L = g * g, E = c->dim, tiles = (E + TILE - 1) / TILE;
#pragma omp parallel num_threads(c->threads)
    {
        tile_vec w[GRID_TAPS], bias;
        tile_vec *xp = (tile_vec *)(scratch + omp_get_thread_num() * ss_grid_conv_scratch_floats(g, 0));
        memset(xp, 0, (g + 2) * (g + 2) * sizeof(tile_vec));  /* the zero border, see grid_tile_gather */
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < c->batch * tiles; k++) {
            const int64_t b = k / tiles, d0 = k % tiles * TILE, T = E - d0 < TILE ? E - d0 : TILE;
            const int64_t kn = k + omp_get_num_threads();  /* as in the scan: likely this thread's next task */
            const float *xn = kn < c->batch * tiles ? c->x + kn / tiles * c->sx[0] + kn % tiles * TILE : NULL;
            float *o = out + b * L * E + d0;
            grid_tile_weights(c, d0, T, w, &bias);
            grid_tile_gather(c->x + b * c->sx[0] + d0, c->sx[1], g, T, xp);
            for (int64_t i = 0; i < g; i++) {
                if (xn) grid_prefetch_row(xn, c->sx[1], g, i);
                for (int64_t j = 0; j < g; j++) {
                    const tile_vec a = grid_tile_taps(bias, w, xp, g, i, j);
                    tile_store(o + (i * g + j) * E, a * tile_sigmoid(a), T);
                }
            }
        }
    }
}

/* dout, dx (batch, grid * grid, dim) contiguous; dweight (dim, 3, 3) and dbias (dim,) are overwritten (dbias may be
 * NULL when there is no bias); scratch: threads * ss_grid_conv_scratch_floats(grid, 1) floats. */
void ss_grid_conv_backward(const GridConvArgs *c, const float *dout, float *scratch, float *dx, float *dweight,
                           float *dbias)
{
    const int64_t g = c->grid, gp = g + 2, L = g * g, E = c->dim, tiles = (E + TILE - 1) / TILE;
#pragma omp parallel num_threads(c->threads)
    {
        tile_vec w[GRID_TAPS], wflip[GRID_TAPS], bias, dw[GRID_TAPS], db;
        tile_vec *xp = (tile_vec *)(scratch + omp_get_thread_num() * ss_grid_conv_scratch_floats(g, 1));
        tile_vec *dap = xp + gp * gp;  /* the gradient of a, with the same zero border */
        memset(xp, 0, 2 * gp * gp * sizeof(tile_vec));  /* the zero borders, see grid_tile_gather */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t d0 = t * TILE, T = E - d0 < TILE ? E - d0 : TILE;
            grid_tile_weights(c, d0, T, w, &bias);
            for (int64_t k = 0; k < GRID_TAPS; k++) wflip[k] = w[GRID_TAPS - 1 - k];
            db = (tile_vec){0};
            for (int64_t k = 0; k < GRID_TAPS; k++) dw[k] = (tile_vec){0};
            for (int64_t b = 0; b < c->batch; b++) {
                const float *dy = dout + b * L * E + d0;
                float *dxb = dx + b * L * E + d0;
                /* the next batch element of this tile, or after the last the tile this thread likely takes next */
                const int64_t tn = b + 1 < c->batch ? t : t + omp_get_num_threads(), bn = b + 1 < c->batch ? b + 1 : 0;
                grid_tile_gather(c->x + b * c->sx[0] + d0, c->sx[1], g, T, xp);
                /* da = dout * silu'(a), silu'(a) = s (1 + a (1 - s)); dbias and dweight summed as da is made */
                for (int64_t i = 0; i < g; i++) {
                    if (tn < tiles) {
                        grid_prefetch_row(c->x + bn * c->sx[0] + tn * TILE, c->sx[1], g, i);
                        grid_prefetch_row(dout + bn * L * E + tn * TILE, E, g, i);
                    }
                    for (int64_t j = 0; j < g; j++) {
                        const tile_vec a = grid_tile_taps(bias, w, xp, g, i, j), s = tile_sigmoid(a);
                        const tile_vec dyv = tile_load(dy + (i * g + j) * E, T);
                        const tile_vec d = dyv * s * (1.0f + a * (1.0f - s));
                        dap[(i + 1) * gp + j + 1] = d;
                        db += d;
                        for (int64_t di = 0; di < 3; di++)
                            for (int64_t dj = 0; dj < 3; dj++) dw[3 * di + dj] += d * xp[(i + di) * gp + j + dj];
                    }
                }
                /* dx_{i,j} = sum over taps of w_{di,dj} da_{i-di, j-dj}: the transposed conv, the flipped kernel on
                 * the padded da, taps in raster order of the flipped kernel */
                for (int64_t i = 0; i < g; i++)
                    for (int64_t j = 0; j < g; j++)
                        tile_store(dxb + (i * g + j) * E, grid_tile_taps((tile_vec){0}, wflip, dap, g, i, j), T);
            }
            for (int64_t q = 0; q < T; q++) {
                for (int64_t k = 0; k < GRID_TAPS; k++) dweight[(d0 + q) * GRID_TAPS + k] = dw[k][q];
                if (dbias) dbias[d0 + q] = db[q];
            }
        }
    }
}
