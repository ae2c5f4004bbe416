// Elementwise passes that PyTorch runs as separate sweeps over memory, here one each.
//
// Dropout: `dropout` multiplies by a keep mask scaled by 1 / (1 - p) in one sweep, the mask computed on the fly
// from a 32-bit key and each element's index (a bijective integer hash, so no random numbers are stored); the
// backward calls it again with the same key on the gradient, which gives the same mask. The Python side takes
// the key from torch's generator, so torch.manual_seed decides every mask.
//
// Patch embedding: `embed_forward` makes y = dropout(y + b + pos[row % period]) in place after PyTorch's product
// y = patches W^T (PyTorch: addmm's bias copy, the position add, the mask draw and multiply); `embed_backward`
// applies the same mask to the gradient and sums it into the bias and position gradients in the same sweep.
//
// Residual + Linear: `add_bias_residual` makes y = y + h + b in one sweep after PyTorch's product y = x W^T,
// where `addmm` writes the bias into the output before the product (which then reads it back) and the residual
// add reads both again into a third tensor.
//
// `add_bias_residual_norm` does the same and also writes z = LayerNorm(y) (with its per-row mean and 1/std, as
// PyTorch's layer_norm saves them for the backward) from the row it has just written, instead of a LayerNorm
// reading y back from memory.
//
// `norm_backward` is that LayerNorm's backward with the residual stream's own gradient added in the same sweep
// (PyTorch: native_layer_norm_backward, then an add): dy = gy + rstd * (gz*w - mean(gz*w) - xhat * mean(gz*w *
// xhat)) per row, and the weight and bias gradients summed per thread (float over 8 rows, double beyond).
//
// Linear + ReLU:
// Forward: y = x W^T comes from PyTorch's matrix product (no bias); `bias_relu` then makes y = max(y + b, 0) in
// place, where `addmm` writes the bias into a fresh [rows, cols] output before the product and `relu` reads it
// back and writes a second one. Backward: `relu_backward_bias` writes g * (y > 0) and sums it over rows for
// the bias gradient in the same sweep (PyTorch: `threshold_backward`, then a separate `sum`). The sums run in
// float over blocks of 8 rows, in double per thread across blocks, and are added in thread order: the same
// bits for the same thread count. Built by timevlm/kernels/build.py.
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace {

// "lowbias32" (C. Wellons' hash prospector): a bijection on 32-bit words with a low avalanche bias.
inline uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

// element i's 16-bit draw against the threshold (as timevlm_dropout decides)
inline bool kept(size_t i, uint32_t key, uint32_t threshold) { return (mix((uint32_t)i ^ key) >> 16) >= threshold; }

// out[j] = sum over threads t of partial[t * stride + j], j < n, added in thread order (the same bits for the
// same thread count)
template <typename T>
void sum_threads(const T* partial, int threads, size_t stride, size_t n, float* out) {
    for (size_t j = 0; j < n; ++j) {
        double s = 0.0;
        for (int t = 0; t < threads; ++t) s += partial[(size_t)t * stride + j];
        out[j] = (float)s;
    }
}

}  // namespace

extern "C" {

// y[i] = x[i] * scale if the 16-bit draw (mix(i ^ key) >> 16) >= threshold, else 0; n < 2^32. y may be x.
void timevlm_dropout(const float* x, float* y, long n, uint32_t key, uint32_t threshold, float scale,
                     int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < n; ++i) {
        y[i] = kept(i, key, threshold) ? x[i] * scale : 0.f;
    }
}

void timevlm_bias_relu(float* y, const float* b, long rows, int cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; ++i) {
        float* r = y + (size_t)i * cols;
#pragma omp simd
        for (int j = 0; j < cols; ++j) {
            const float v = r[j] + b[j];
            r[j] = v > 0.f ? v : 0.f;
        }
    }
}

// threshold 0 keeps everything (scale 1: no dropout)
void timevlm_embed_forward(float* __restrict__ y, const float* __restrict__ b, const float* __restrict__ pos,
                           long rows, int cols, int period, uint32_t key, uint32_t threshold, float scale,
                           int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; ++i) {
        float* __restrict__ r = y + (size_t)i * cols;
        const float* __restrict__ p = pos + (size_t)(i % period) * cols;
        const size_t base = (size_t)i * cols;
#pragma omp simd
        for (int j = 0; j < cols; ++j) r[j] = kept(base + j, key, threshold) ? (r[j] + b[j] + p[j]) * scale : 0.f;
    }
}

// gd = the masked, scaled gradient; dpos [period, cols] and db [cols] its sums (float per thread, then double)
void timevlm_embed_backward(const float* __restrict__ g, float* __restrict__ gd, float* __restrict__ dpos,
                            float* __restrict__ db, long rows, int cols, int period, uint32_t key, uint32_t threshold,
                            float scale, int threads) {
    std::vector<float> partial((size_t)threads * period * cols, 0.f);
#pragma omp parallel num_threads(threads)
    {
        float* __restrict__ acc = partial.data() + (size_t)omp_get_thread_num() * period * cols;
#pragma omp for schedule(static)
        for (long i = 0; i < rows; ++i) {
            const float* __restrict__ gr = g + (size_t)i * cols;
            float* __restrict__ out = gd + (size_t)i * cols;
            float* __restrict__ a = acc + (size_t)(i % period) * cols;
            const size_t base = (size_t)i * cols;
#pragma omp simd
            for (int j = 0; j < cols; ++j) {
                const float v = kept(base + j, key, threshold) ? gr[j] * scale : 0.f;
                out[j] = v;
                a[j] += v;
            }
        }
    }
    sum_threads(partial.data(), threads, (size_t)period * cols, (size_t)period * cols, dpos);
    for (int j = 0; j < cols; ++j) {
        double s = 0.0;
        for (int k = 0; k < period; ++k) s += dpos[(size_t)k * cols + j];
        db[j] = (float)s;
    }
}

void timevlm_add_bias_residual(float* __restrict__ y, const float* __restrict__ h, const float* __restrict__ b,
                               long rows, int cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; ++i) {
        float* __restrict__ r = y + (size_t)i * cols;
        const float* __restrict__ hr = h + (size_t)i * cols;
#pragma omp simd
        for (int j = 0; j < cols; ++j) r[j] += hr[j] + b[j];
    }
}

void timevlm_add_bias_residual_norm(float* __restrict__ y, const float* __restrict__ h, const float* __restrict__ b,
                                    const float* __restrict__ w, const float* __restrict__ beta, float* __restrict__ z,
                                    float* __restrict__ mean, float* __restrict__ rstd, long rows, int cols, float eps,
                                    int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; ++i) {
        float* __restrict__ r = y + (size_t)i * cols;
        const float* __restrict__ hr = h + (size_t)i * cols;
        float* __restrict__ zr = z + (size_t)i * cols;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < cols; ++j) {
            r[j] += hr[j] + b[j];
            sum += r[j];
        }
        const float m = sum / cols;
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int j = 0; j < cols; ++j) sq += (r[j] - m) * (r[j] - m);
        const float inv = 1.0f / std::sqrt(sq / cols + eps);
#pragma omp simd
        for (int j = 0; j < cols; ++j) zr[j] = (r[j] - m) * inv * w[j] + beta[j];
        mean[i] = m;
        rstd[i] = inv;
    }
}

void timevlm_norm_backward(const float* __restrict__ gz, const float* __restrict__ gy, const float* __restrict__ y,
                           const float* __restrict__ mean, const float* __restrict__ rstd,
                           const float* __restrict__ w, float* __restrict__ dy, float* __restrict__ dw,
                           float* __restrict__ db, long rows, int cols, int threads) {
    const long block = 8;
    const long blocks = (rows + block - 1) / block;
    std::vector<double> partial((size_t)threads * 2 * cols, 0.0);
#pragma omp parallel num_threads(threads)
    {
        double* __restrict__ acc = partial.data() + (size_t)omp_get_thread_num() * 2 * cols;
        std::vector<float> scratch(3 * (size_t)cols);
        float* __restrict__ sw = scratch.data();
        float* __restrict__ sb = sw + cols;
        float* __restrict__ xh = sb + cols;
#pragma omp for schedule(static)
        for (long k = 0; k < blocks; ++k) {
            for (int j = 0; j < cols; ++j) sw[j] = sb[j] = 0.f;
            for (long i = k * block; i < std::min(rows, (k + 1) * block); ++i) {
                const float* __restrict__ g = gz + (size_t)i * cols;
                const float* __restrict__ yr = y + (size_t)i * cols;
                const float m = mean[i], r = rstd[i];
                float a = 0.f, c = 0.f;
#pragma omp simd reduction(+ : a, c)
                for (int j = 0; j < cols; ++j) {
                    const float x = (yr[j] - m) * r;
                    const float gw = g[j] * w[j];
                    xh[j] = x;
                    a += gw;
                    c += gw * x;
                    sw[j] += g[j] * x;
                    sb[j] += g[j];
                }
                a /= cols;
                c /= cols;
                float* __restrict__ out = dy + (size_t)i * cols;
                if (gy != nullptr) {
                    const float* __restrict__ gr = gy + (size_t)i * cols;
#pragma omp simd
                    for (int j = 0; j < cols; ++j) out[j] = gr[j] + r * (g[j] * w[j] - a - xh[j] * c);
                } else {
#pragma omp simd
                    for (int j = 0; j < cols; ++j) out[j] = r * (g[j] * w[j] - a - xh[j] * c);
                }
            }
            for (int j = 0; j < cols; ++j) {
                acc[j] += sw[j];
                acc[cols + j] += sb[j];
            }
        }
    }
    sum_threads(partial.data(), threads, 2 * (size_t)cols, cols, dw);
    sum_threads(partial.data() + cols, threads, 2 * (size_t)cols, cols, db);
}

void timevlm_relu_backward_bias(const float* __restrict__ g, const float* __restrict__ y, float* __restrict__ gx,
                                float* __restrict__ db, long rows, int cols, int threads) {
    const long block = 8;  // rows summed in float, then added to the thread's sums in double
    const bool nt = cols % 16 == 0 && (reinterpret_cast<uintptr_t>(gx) & 63) == 0;
    const long blocks = (rows + block - 1) / block;
    std::vector<double> partial((size_t)threads * cols, 0.0);
#pragma omp parallel num_threads(threads)
    {
        double* __restrict__ acc = partial.data() + (size_t)omp_get_thread_num() * cols;
        std::vector<float> sums(cols);
        float* __restrict__ bs = sums.data();
#pragma omp for schedule(static)
        for (long k = 0; k < blocks; ++k) {
            for (int j = 0; j < cols; ++j) bs[j] = 0.f;
            for (long i = k * block; i < std::min(rows, (k + 1) * block); ++i) {
                const float* __restrict__ gr = g + (size_t)i * cols;
                const float* __restrict__ yr = y + (size_t)i * cols;
                float* __restrict__ out = gx + (size_t)i * cols;
#if defined(__AVX512F__)
                if (nt) {  // whole lines straight to memory: the two products read them next
                    for (int j = 0; j < cols; j += 16) {
                        const __m512 v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(yr + j), _mm512_setzero_ps(), _CMP_GT_OQ),
                                                             _mm512_loadu_ps(gr + j));
                        _mm512_stream_ps(out + j, v);
                        _mm512_storeu_ps(bs + j, _mm512_add_ps(_mm512_loadu_ps(bs + j), v));
                    }
                    continue;
                }
#endif
                for (int j = 0; j < cols; ++j) {
                    const float v = yr[j] > 0.f ? gr[j] : 0.f;
                    out[j] = v;
                    bs[j] += v;
                }
            }
            for (int j = 0; j < cols; ++j) acc[j] += bs[j];
        }
#if defined(__AVX512F__)
        _mm_sfence();
#endif
    }
    sum_threads(partial.data(), threads, cols, cols, db);
}

}  // extern "C"
