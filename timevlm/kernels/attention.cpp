// Self-attention over many short sequences on the CPU, fp32, forward and backward.
//
// One task per (sequence, head): its queries, keys and values (at most a few hundred rows of a few dozen
// columns) are copied from the packed [rows, 3 * H * D] projection, its bias added on the way, into small
// buffers that stay in the L1/L2 cache; the scores, softmax, weighted values and (backward) all five gradient
// products are computed there, and the results are written straight into the packed layouts the projections
// use: the forward writes [rows, H * D] (what the output projection reads), the backward [rows, 3 * H * D] (the
// gradient of the input projection's output) and the bias gradient. PyTorch's path writes the bias into the
// projection's output before the product (`addmm`), splits the heads out, and in the backward zero-fills the
// three gradients, concatenates them and sums them for the bias: each a full pass over memory.
//
// Math as in FlashAttention: the forward saves each row's log-sum-exp, the backward recomputes the
// probabilities from it. Sizes need not be multiples of anything: buffers are zero-padded to 16 columns.
// Built by timevlm/kernels/build.py with -O3 -march=native (AVX-512 micro-kernel where the CPU has it).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// C[MR x 16*NB] = A[MR x K] B[K x 16*NB]. A is row-major (element (r, k) at A[r * lda + k]) or, with
// A_T, stored transposed (element (r, k) at A[k * lda + r]). B and C are row-major. MR * NB = 16 or 8
// accumulators in registers.
template <int MR, int NB, bool A_T>
inline void tile(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
#if defined(__AVX512F__)
    __m512 acc[MR][NB];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
        __m512 b[NB];
#pragma GCC unroll 4
        for (int c = 0; c < NB; ++c) b[c] = _mm512_loadu_ps(B + (size_t)k * ldb + 16 * c);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const __m512 a = _mm512_set1_ps(A_T ? A[(size_t)k * lda + r] : A[(size_t)r * lda + k]);
#pragma GCC unroll 4
            for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < NB; ++c) _mm512_storeu_ps(C + (size_t)r * ldc + 16 * c, acc[r][c]);
#else
    for (int r = 0; r < MR; ++r) {
        float* c = C + (size_t)r * ldc;
        for (int j = 0; j < 16 * NB; ++j) c[j] = 0.f;
        for (int k = 0; k < K; ++k) {
            const float a = A_T ? A[(size_t)k * lda + r] : A[(size_t)r * lda + k];
            const float* b = B + (size_t)k * ldb;
            for (int j = 0; j < 16 * NB; ++j) c[j] += a * b[j];
        }
    }
#endif
}

// C[M x N] = A[M x K] B[K x N], M a multiple of 8, N of 16 (the buffers are padded to that): 4 x 64 tiles
// where N allows, else 8 x 32 and 8 x 16.
template <bool A_T>
void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
    int j = 0;
    for (; j + 64 <= N; j += 64)
        for (int i = 0; i < M; i += 4)
            tile<4, 4, A_T>(K, A_T ? A + i : A + (size_t)i * lda, lda, B + j, ldb, C + (size_t)i * ldc + j, ldc);
    for (; j + 32 <= N; j += 32)
        for (int i = 0; i < M; i += 8)
            tile<8, 2, A_T>(K, A_T ? A + i : A + (size_t)i * lda, lda, B + j, ldb, C + (size_t)i * ldc + j, ldc);
    for (; j < N; j += 16)
        for (int i = 0; i < M; i += 8)
            tile<8, 1, A_T>(K, A_T ? A + i : A + (size_t)i * lda, lda, B + j, ldb, C + (size_t)i * ldc + j, ldc);
}

// dst[k * ld_dst + i] = src[i * ld_src + k] for i < rows, k < cols (both multiples of 16: padded buffers)
inline void transpose(int rows, int cols, const float* src, int ld_src, float* dst, int ld_dst) {
#if defined(__AVX512F__)
    for (int i0 = 0; i0 < rows; i0 += 16)
        for (int k0 = 0; k0 < cols; k0 += 16) {  // one 16 x 16 block in registers
            __m512 r[16], t[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (size_t)(i0 + i) * ld_src + k0);
            for (int i = 0; i < 8; ++i) {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            for (int i = 0; i < 4; ++i) {  // r[4i + c], lane l: rows 4i..4i+3 of column 4l + c
                const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
                const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
                r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
                r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
            }
            for (int c = 0; c < 4; ++c) {
                const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
                const __m512 v0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88), v1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
                float* o = dst + (size_t)k0 * ld_dst + i0;
                _mm512_storeu_ps(o + (size_t)c * ld_dst, _mm512_shuffle_f32x4(u0, v0, 0x88));
                _mm512_storeu_ps(o + (size_t)(c + 8) * ld_dst, _mm512_shuffle_f32x4(u0, v0, 0xdd));
                _mm512_storeu_ps(o + (size_t)(c + 4) * ld_dst, _mm512_shuffle_f32x4(u1, v1, 0x88));
                _mm512_storeu_ps(o + (size_t)(c + 12) * ld_dst, _mm512_shuffle_f32x4(u1, v1, 0xdd));
            }
        }
#else
    for (int i = 0; i < rows; ++i)
        for (int k = 0; k < cols; ++k) dst[(size_t)k * ld_dst + i] = src[(size_t)i * ld_src + k];
#endif
}

inline void copy(int n, const float* src, float* dst) {
    for (int k = 0; k < n; ++k) dst[k] = src[k];
}

inline void copy_scaled(int n, const float* src, float s, float* dst) {
    for (int k = 0; k < n; ++k) dst[k] = src[k] * s;
}

// Non-temporal stores are weakly ordered: each thread fences them before the parallel region ends.
inline void fence_stores() {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}

// dst[k] = src[k] * s for an output row segment nothing reads again soon: whole 64-byte lines go straight to
// memory (non-temporal stores, no read-for-ownership) where the segment allows it
inline void store_scaled(int n, const float* src, float s, float* dst) {
#if defined(__AVX512F__)
    if (n % 16 == 0 && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
        const __m512 f = _mm512_set1_ps(s);
        for (int k = 0; k < n; k += 16) _mm512_stream_ps(dst + k, _mm512_mul_ps(_mm512_loadu_ps(src + k), f));
        return;
    }
#endif
    copy_scaled(n, src, s, dst);
}

inline void add_bias(int n, const float* src, const float* bias, float s, float* dst) {
    for (int k = 0; k < n; ++k) dst[k] = (src[k] + bias[k]) * s;
}

// acc[k] += s * sum_i src[i * ld + k]: the rows summed in float (a few dozen), the total kept in double
inline void accumulate(int rows, int n, const float* __restrict__ src, int ld, float s, double* __restrict__ acc) {
    float col[256];
    for (int k0 = 0; k0 < n; k0 += 256) {
        const int m = std::min(256, n - k0);
        for (int k = 0; k < m; ++k) col[k] = 0.f;
        for (int i = 0; i < rows; ++i)
            for (int k = 0; k < m; ++k) col[k] += src[(size_t)i * ld + k0 + k];
        for (int k = 0; k < m; ++k) acc[k0 + k] += (double)col[k] * s;
    }
}

struct Shape {
    int L, H, D, d, row, Lr, Lc, Dp;
    float scale;
    Shape(int L_, int H_, int D_)
        : L(L_), H(H_), D(D_), d(H_ * D_), row(3 * H_ * D_), Lr(round_up(L_, 8)), Lc(round_up(L_, 16)),
          Dp(round_up(D_, 16)), scale(1.0f / std::sqrt((float)D_)) {}
};

// Sequence b, head h: Q (bias added, scaled by 1/sqrt(D)), K and V (bias added) from the packed projection into
// [Lc x Dp] buffers (rows from L on, columns from D on, stay as they are: zero)
inline void pack(const Shape& s, const float* qkv, const float* bias, int b, int h, float* Q, float* K, float* V) {
    const float* src = qkv + (size_t)b * s.L * s.row + (size_t)h * s.D;
    const float *bq = bias + (size_t)h * s.D, *bk = bq + s.d, *bv = bk + s.d;
    for (int i = 0; i < s.L; ++i) {
        const float* r = src + (size_t)i * s.row;
        add_bias(s.D, r, bq, s.scale, Q + (size_t)i * s.Dp);
        add_bias(s.D, r + s.d, bk, 1.f, K + (size_t)i * s.Dp);
        add_bias(s.D, r + 2 * s.d, bv, 1.f, V + (size_t)i * s.Dp);
    }
}

}  // namespace

extern "C" {

// qkv [B, L, 3*H*D] (the projection before its bias), bias [3*H*D] -> out [B, L, H*D], lse [B, H, L].
// `threads` OpenMP threads over the B sequences.
void timevlm_attention_forward(const float* qkv, const float* bias, float* out, float* lse, int B, int L, int H,
                               int D, int threads) {
    const Shape s(L, H, D);
#pragma omp parallel num_threads(threads)
    {
        // Q [Lc x Dp] (pre-scaled), Kt [Dp x Lc], V [Lc x Dp], S [Lc x Lc], O [Lc x Dp], K staging [Lc x Dp]
        std::vector<float> buf((size_t)4 * s.Lc * s.Dp + (size_t)s.Dp * s.Lc + (size_t)s.Lc * s.Lc, 0.f);
        float *Q = buf.data(), *Kt = Q + s.Lc * s.Dp, *V = Kt + s.Dp * s.Lc, *S = V + s.Lc * s.Dp;
        float *O = S + s.Lc * s.Lc, *Ks = O + s.Lc * s.Dp;
        std::vector<float> inv(s.Lc);
#pragma omp for schedule(static)
        for (int b = 0; b < B; ++b) {
          for (int h = 0; h < H; ++h) {
            const int t = b * H + h;
            pack(s, qkv, bias, b, h, Q, Ks, V);
            transpose(s.Lc, s.Dp, Ks, s.Dp, Kt, s.Lc);
            gemm<false>(s.Lr, s.Lc, s.Dp, Q, s.Dp, Kt, s.Lc, S, s.Lc);
            float* row_lse = lse + (size_t)t * L;
            for (int i = 0; i < L; ++i) {
                float* p = S + (size_t)i * s.Lc;
                float m = -INFINITY;
                for (int j = 0; j < L; ++j) m = std::max(m, p[j]);
                float sum = 0.f;
                for (int j = 0; j < L; ++j) {
                    const float e = std::exp(p[j] - m);
                    p[j] = e;
                    sum += e;
                }
                for (int j = L; j < s.Lc; ++j) p[j] = 0.f;  // padded keys weigh nothing
                inv[i] = 1.0f / sum;
                row_lse[i] = m + std::log(sum);
            }
            gemm<false>(s.Lr, s.Dp, s.Lc, S, s.Lc, V, s.Dp, O, s.Dp);
            float* dst = out + (size_t)b * L * s.d + (size_t)h * D;
            for (int i = 0; i < L; ++i) store_scaled(D, O + (size_t)i * s.Dp, inv[i], dst + (size_t)i * s.d);
          }
        }
        fence_stores();
    }
}

// dout, out [B, L, H*D], qkv [B, L, 3*H*D], bias [3*H*D], lse [B, H, L] -> dqkv [B, L, 3*H*D] (every element
// written) and dbias [3*H*D] (its sum over rows, in double per thread, added in thread order).
void timevlm_attention_backward(const float* dout, const float* qkv, const float* bias, const float* out,
                                const float* lse, float* dqkv, float* dbias, int B, int L, int H, int D,
                                int threads) {
    const Shape s(L, H, D);
    std::vector<double> partial((size_t)threads * s.row, 0.0);
#pragma omp parallel num_threads(threads)
    {
        double* db = partial.data() + (size_t)omp_get_thread_num() * s.row;
        const size_t n = (size_t)s.Lc * s.Dp;
        // Q (pre-scaled), K, Kt, Vt, dO, G (staging) [Lc x Dp or Dp x Lc]; P, dS [Lc x Lc]
        std::vector<float> buf(7 * n + 2 * (size_t)s.Lc * s.Lc, 0.f);
        float *Q = buf.data(), *K = Q + n, *Kt = K + n, *Vt = Kt + n, *dO = Vt + n, *G = dO + n, *Vs = G + n;
        float *P = Vs + n, *dS = P + (size_t)s.Lc * s.Lc;
        std::vector<float> delta(s.Lc);
#pragma omp for schedule(static)
        for (int b = 0; b < B; ++b) {
          for (int h = 0; h < H; ++h) {
            const int t = b * H + h;
            const float* go = dout + (size_t)b * L * s.d + (size_t)h * D;
            const float* o = out + (size_t)b * L * s.d + (size_t)h * D;
            float* dst = dqkv + (size_t)b * L * s.row + (size_t)h * D;
            const float* row_lse = lse + (size_t)t * L;
            double *dbq = db + (size_t)h * D, *dbk = dbq + s.d, *dbv = dbk + s.d;
            pack(s, qkv, bias, b, h, Q, K, Vs);
            for (int i = 0; i < L; ++i) {
                const float* g = go + (size_t)i * s.d;
                const float* oi = o + (size_t)i * s.d;
                copy(D, g, dO + (size_t)i * s.Dp);
                float acc = 0.f;
                for (int k = 0; k < D; ++k) acc += g[k] * oi[k];
                delta[i] = acc;  // rowsum(dO * O)
            }
            transpose(s.Lc, s.Dp, K, s.Dp, Kt, s.Lc);
            transpose(s.Lc, s.Dp, Vs, s.Dp, Vt, s.Lc);
            // P = exp(Q K^T / sqrt(D) - lse); padded rows and columns stay 0
            gemm<false>(s.Lr, s.Lc, s.Dp, Q, s.Dp, Kt, s.Lc, P, s.Lc);
            for (int i = 0; i < L; ++i) {
                float* p = P + (size_t)i * s.Lc;
                for (int j = 0; j < L; ++j) p[j] = std::exp(p[j] - row_lse[i]);
                for (int j = L; j < s.Lc; ++j) p[j] = 0.f;
            }
            for (int i = L; i < s.Lr; ++i) std::memset(P + (size_t)i * s.Lc, 0, s.Lc * sizeof(float));
            // dV = P^T dO
            gemm<true>(s.Lr, s.Dp, s.Lr, P, s.Lc, dO, s.Dp, G, s.Dp);
            for (int i = 0; i < L; ++i) store_scaled(D, G + (size_t)i * s.Dp, 1.f, dst + (size_t)i * s.row + 2 * s.d);
            accumulate(L, D, G, s.Dp, 1.f, dbv);
            // dS = P * (dO V^T - delta)
            gemm<false>(s.Lr, s.Lc, s.Dp, dO, s.Dp, Vt, s.Lc, dS, s.Lc);
            for (int i = 0; i < s.Lr; ++i) {
                float* g = dS + (size_t)i * s.Lc;
                const float* p = P + (size_t)i * s.Lc;
                const float di = i < L ? delta[i] : 0.f;
                for (int j = 0; j < s.Lc; ++j) g[j] = p[j] * (g[j] - di);
            }
            // dQ = dS K / sqrt(D)
            gemm<false>(s.Lr, s.Dp, s.Lr, dS, s.Lc, K, s.Dp, G, s.Dp);
            for (int i = 0; i < L; ++i) store_scaled(D, G + (size_t)i * s.Dp, s.scale, dst + (size_t)i * s.row);
            accumulate(L, D, G, s.Dp, s.scale, dbq);
            // dK = dS^T Q / sqrt(D) (Q is already scaled)
            gemm<true>(s.Lr, s.Dp, s.Lr, dS, s.Lc, Q, s.Dp, G, s.Dp);
            for (int i = 0; i < L; ++i) store_scaled(D, G + (size_t)i * s.Dp, 1.f, dst + (size_t)i * s.row + s.d);
            accumulate(L, D, G, s.Dp, 1.f, dbk);
          }
        }
        fence_stores();
    }
    for (int k = 0; k < s.row; ++k) {
        double sum = 0.0;
        for (int t = 0; t < threads; ++t) sum += partial[(size_t)t * s.row + k];
        dbias[k] = (float)sum;
    }
}

}  // extern "C"
