// Fused multi-head softmax attention for CPU, fp32, forward and backward, as MindSpore AOT Custom op functions.
//
// Layout. q (B, Nq, H, D), k and v (B, Nk, H, D), contiguous: the (B, N, H*D) activations of the UNet seen as
// 4-D (a reshape, no copy). Head h of row n is the D floats at ((b*N + n)*H + h)*D, so every query/key/value row
// of a head is read in place with a row stride of H*D floats; nothing is transposed outside this file. The output
// and the gradients are written in the same layout. `scale` is a 1-element fp32 tensor.
//
// Forward (flash attention with an online softmax). Work item = (batch*head, tile of 16 queries); the 16 queries
// sit in the 16 lanes of one vector, so the softmax's running max and sum are lane-wise (no horizontal
// reductions). For each block of keys (128, fewer for D > 32 so the block's value rows stay in L1): scores
// s_j = sum_d k[j,d] * q^T[d] (k broadcast from memory, 4 keys at a time), new max, rescale of the accumulator,
// p_j = 2^(s_j - m) with a polynomial exp2 (q is pre-multiplied by scale*log2(e)), then o^T[d] += v[j,d] * p_j
// (4 columns at a time). Nothing larger than one key block of scores (at most 128 x 16 floats) exists.
//
// Backward (flash attention backward, probabilities recomputed from the row log-sum-exp). Work item = one
// batch*head, so dK and dV (accumulated over all queries) and dQ (accumulated over all keys) belong to one
// thread: no races, no reductions (and no parallelism beyond batch*heads work items). The log-sum-exp is read
// from the forward (attention_forward_lse's second output) or recomputed by a statistics-only forward pass.
// Then for each block of 16 keys (keys in lanes) and each tile of 16 queries, 4 queries at a time:
//     p = 2^(s - lse2),  dP = dO V^T,  dS = p * (dP - rowsum(dO * O)),
//     dV^T += dO^T p,  dK^T += q^T dS,  and, after a 16x16 in-register transpose of dS, dQ^T += K^T dS^T.
// Padded queries of a partial tile read a row of zeros and contribute exactly zero; padded keys get p = 0.
//
// Vectors are GCC/Clang vector extensions of 16 floats: one zmm register with AVX-512, two ymm with AVX2, four
// NEON registers on aarch64. No intrinsics, so the same source compiles everywhere -march=native points.
//
// Entry points (AOT signature int f(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
// void *stream, void *extra); params = inputs, then outputs; nonzero return = error):
//   attention_forward      (q, k, v, scale) -> out
//   attention_forward_lse  (q, k, v, scale) -> out, lse (B, H, Nq) natural-log log-sum-exp of the scaled scores
//   attention_backward     (q, k, v, out, dout, scale) -> dq, dk, dv          (recomputes the log-sum-exp)
//   attention_backward_lse (q, k, v, out, dout, scale, lse) -> dq, dk, dv
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

// Without AVX-512 GCC notes that 64-byte vector arguments change the ABI; every function taking them is inline.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

constexpr int W = 16;            // lanes per vector (queries per forward tile, keys per backward block)
constexpr int R = 4;             // register blocking: keys (forward) / queries (backward) handled together
constexpr int BLOCK_KEYS = 128;  // most keys per forward block: 128 x 64 B of scores stay in L1
// Keys per forward block for head dim D: the block's value rows (read once per 4 output columns) fit in 16 KiB of L1.
inline int forward_block_keys(int64_t D) {
    int64_t n = 16384 / (D * (int64_t)sizeof(float)) / R * R;
    return (int)(n < 16 ? 16 : n > BLOCK_KEYS ? BLOCK_KEYS : n);
}

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

#define INLINE inline __attribute__((always_inline))

INLINE vf splat(float x) { return vf{} + x; }
INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

// 2^x for x <= ~0 (Cephes exp2f: x = n + f, |f| <= 1/2, degree-6 polynomial, ~2 ulp). Inputs below -125 are
// clamped there (2^-125 ~ 2e-38, negligible next to the row maximum's 1), keeping the result a normal float.
INLINE vf exp2v(vf x) {
    x = x < splat(-125.0f) ? splat(-125.0f) : x;
    x = x > splat(127.0f) ? splat(127.0f) : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
    vf n = (x + magic) - magic;
    vf f = x - n;
    vf p = splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    vu bits;  // p * 2^n by adding n to the exponent field (unsigned: shifting negative ints is not portable C++17)
    std::memcpy(&bits, &p, sizeof bits);
    bits += (vu)__builtin_convertvector(n, vi) << 23;
    std::memcpy(&p, &bits, sizeof p);
    return p;
}

// In-place transpose of a 16x16 block held as 16 vectors: 4 butterfly stages of two-input shuffles.
template <int B>
INLINE void transpose_stage(vf *a) {
    static_assert(W == 16, "transpose written for 16 lanes");
    for (int r = 0; r < W; ++r) {
        if (r & B) continue;
        vf lo = a[r], hi = a[r + B];
#if defined(__clang__)
        vf x, y;
        for (int c = 0; c < W; ++c) {  // clang: plain lane loop, vectorised by the optimiser
            x[c] = (c & B) ? hi[c - B] : lo[c];
            y[c] = (c & B) ? hi[c] : lo[c + B];
        }
#else
        constexpr vi mlo = {
            (0 & B) ? 16 + 0 - B : 0,   (1 & B) ? 16 + 1 - B : 1,   (2 & B) ? 16 + 2 - B : 2,
            (3 & B) ? 16 + 3 - B : 3,   (4 & B) ? 16 + 4 - B : 4,   (5 & B) ? 16 + 5 - B : 5,
            (6 & B) ? 16 + 6 - B : 6,   (7 & B) ? 16 + 7 - B : 7,   (8 & B) ? 16 + 8 - B : 8,
            (9 & B) ? 16 + 9 - B : 9,   (10 & B) ? 16 + 10 - B : 10, (11 & B) ? 16 + 11 - B : 11,
            (12 & B) ? 16 + 12 - B : 12, (13 & B) ? 16 + 13 - B : 13, (14 & B) ? 16 + 14 - B : 14,
            (15 & B) ? 16 + 15 - B : 15};
        constexpr vi mhi = {
            (0 & B) ? 16 + 0 : 0 + B,   (1 & B) ? 16 + 1 : 1 + B,   (2 & B) ? 16 + 2 : 2 + B,
            (3 & B) ? 16 + 3 : 3 + B,   (4 & B) ? 16 + 4 : 4 + B,   (5 & B) ? 16 + 5 : 5 + B,
            (6 & B) ? 16 + 6 : 6 + B,   (7 & B) ? 16 + 7 : 7 + B,   (8 & B) ? 16 + 8 : 8 + B,
            (9 & B) ? 16 + 9 : 9 + B,   (10 & B) ? 16 + 10 : 10 + B, (11 & B) ? 16 + 11 : 11 + B,
            (12 & B) ? 16 + 12 : 12 + B, (13 & B) ? 16 + 13 : 13 + B, (14 & B) ? 16 + 14 : 14 + B,
            (15 & B) ? 16 + 15 : 15 + B};
        vf x = __builtin_shuffle(lo, hi, mlo);
        vf y = __builtin_shuffle(lo, hi, mhi);
#endif
        a[r] = x;
        a[r + B] = y;
    }
}

INLINE void transpose16(vf *a) {
    transpose_stage<8>(a);
    transpose_stage<4>(a);
    transpose_stage<2>(a);
    transpose_stage<1>(a);
}

struct Dims {
    int64_t batch, nq, nk, heads, dim;
    int64_t row() const { return heads * dim; }  // stride between consecutive rows of one head
};

// ---------------------------------------------------------------------------------------------------------------
// Forward: one tile of up to QV*16 queries of one (batch, head) against all keys; query i of the tile is lane i%16
// of vector i/16. q, o: first query row of the tile; k, v: first key row of the head. lse2: base-2 log-sum-exp per
// query (or null). With PV=false only the statistics are computed (the backward's recomputation).
// Buffers: qt[D*QV], acc[D*QV], scores[BLOCK_KEYS*QV].
template <int DT, int QV, bool PV>
void forward_tile(const float *q, const float *k, const float *v, float *o, float *lse2, int nqt, int64_t nk,
                  int64_t dim_rt, int64_t stride, float qscale, vf *qt, vf *acc, vf *scores) {
    const int64_t D = DT ? DT : dim_rt;
    for (int64_t d = 0; d < D; ++d)
        for (int u = 0; u < QV; ++u) {
            vf t = {};
            for (int i = 0; i < W && u * W + i < nqt; ++i) t[i] = q[(u * W + i) * stride + d] * qscale;
            qt[d * QV + u] = t;
            if (PV) acc[d * QV + u] = vf{};
        }
    vf m[QV], l[QV];
    for (int u = 0; u < QV; ++u) m[u] = splat(-INFINITY), l[u] = vf{};
    const int block = forward_block_keys(D);
    for (int64_t k0 = 0; k0 < nk; k0 += block) {
        const int nb = (int)(nk - k0 < block ? nk - k0 : block);
        const float *kb = k + k0 * stride;
        vf mnew[QV];
        for (int u = 0; u < QV; ++u) mnew[u] = m[u];
        int j = 0;
        for (; j + R <= nb; j += R) {
            const float *kr[R];
            vf sc[R][QV];
            for (int r = 0; r < R; ++r) {
                kr[r] = kb + (j + r) * stride;
                for (int u = 0; u < QV; ++u) sc[r][u] = vf{};
            }
            for (int64_t d = 0; d < D; ++d)
                for (int u = 0; u < QV; ++u) {
                    const vf x = qt[d * QV + u];
                    for (int r = 0; r < R; ++r) sc[r][u] += kr[r][d] * x;
                }
            for (int r = 0; r < R; ++r)
                for (int u = 0; u < QV; ++u) {
                    scores[(j + r) * QV + u] = sc[r][u];
                    mnew[u] = vmax(mnew[u], sc[r][u]);
                }
        }
        for (; j < nb; ++j) {
            const float *kr = kb + j * stride;
            vf sc[QV];
            for (int u = 0; u < QV; ++u) sc[u] = vf{};
            for (int64_t d = 0; d < D; ++d)
                for (int u = 0; u < QV; ++u) sc[u] += kr[d] * qt[d * QV + u];
            for (int u = 0; u < QV; ++u) {
                scores[j * QV + u] = sc[u];
                mnew[u] = vmax(mnew[u], sc[u]);
            }
        }
        vf alpha[QV];
        for (int u = 0; u < QV; ++u) {
            alpha[u] = exp2v(m[u] - mnew[u]);
            m[u] = mnew[u];
            vf l0 = {};
            for (int jj = 0; jj < nb; ++jj) {
                const vf p = exp2v(scores[jj * QV + u] - m[u]);
                scores[jj * QV + u] = p;
                l0 += p;
            }
            l[u] = l[u] * alpha[u] + l0;
        }
        if (!PV) continue;
        const float *vb = v + k0 * stride;
        int64_t d = 0;
        for (; d + R <= D; d += R) {
            vf a[R][QV];
            for (int r = 0; r < R; ++r)
                for (int u = 0; u < QV; ++u) a[r][u] = acc[(d + r) * QV + u] * alpha[u];
            const float *vr = vb + d;
            for (int jj = 0; jj < nb; ++jj, vr += stride)
                for (int u = 0; u < QV; ++u) {
                    const vf p = scores[jj * QV + u];
                    for (int r = 0; r < R; ++r) a[r][u] += vr[r] * p;
                }
            for (int r = 0; r < R; ++r)
                for (int u = 0; u < QV; ++u) acc[(d + r) * QV + u] = a[r][u];
        }
        for (; d < D; ++d) {
            vf a[QV];
            for (int u = 0; u < QV; ++u) a[u] = acc[d * QV + u] * alpha[u];
            const float *vr = vb + d;
            for (int jj = 0; jj < nb; ++jj, vr += stride)
                for (int u = 0; u < QV; ++u) a[u] += vr[0] * scores[jj * QV + u];
            for (int u = 0; u < QV; ++u) acc[d * QV + u] = a[u];
        }
    }
    for (int u = 0; u < QV; ++u) {
        const int n = nqt - u * W < W ? nqt - u * W : W;
        if (PV) {
            const vf inv = splat(1.0f) / l[u];
            for (int64_t d = 0; d < D; ++d) {
                const vf r = acc[d * QV + u] * inv;
                for (int i = 0; i < n; ++i) o[(u * W + i) * stride + d] = r[i];
            }
        }
        if (lse2)
            for (int i = 0; i < n; ++i) lse2[u * W + i] = m[u][i] + std::log2(l[u][i]);
    }
}

template <int DT>
void forward(const Dims &s, const float *q, const float *k, const float *v, float *o, float *lse,
             float scale) {
    // One query vector per tile: two (32 queries, each broadcast key/value element used twice) measured slower
    // (D=40: 214 vs 177 ms single-threaded), and one keeps short query axes (attn_temp's 8) from wasting lanes.
    constexpr int QV = 1, TQ = QV * W;
    const int64_t D = s.dim, stride = s.row(), tiles = (s.nq + TQ - 1) / TQ;
    const int64_t items = s.batch * s.heads * tiles;
    const float qscale = scale * LOG2E;
#pragma omp parallel
    {
        std::vector<vf> qt(D * QV), acc(D * QV), scores(BLOCK_KEYS * QV);
        float lse2[TQ];
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t bh = item / tiles, t = item % tiles, b = bh / s.heads, h = bh % s.heads;
            const int64_t i0 = t * TQ;
            const int nqt = (int)(s.nq - i0 < TQ ? s.nq - i0 : TQ);
            const int64_t qoff = ((b * s.nq + i0) * s.heads + h) * D;
            const int64_t koff = (b * s.nk * s.heads + h) * D;
            forward_tile<DT, QV, true>(q + qoff, k + koff, v + koff, o + qoff, lse ? lse2 : nullptr, nqt, s.nk, D,
                                       stride, qscale, qt.data(), acc.data(), scores.data());
            if (lse) {
                float *dst = lse + bh * s.nq + i0;
                for (int i = 0; i < nqt; ++i) dst[i] = lse2[i] * LN2;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward for one (batch, head). Pointers are at row 0 of that head; the buffers belong to the calling thread.
struct BackwardBuffers {
    std::vector<float> lse2, delta, zeros;
    std::vector<vf> dqt, kt, vt, dkt, dvt, ds, qt, acc, scores;
    BackwardBuffers(int64_t nq, int64_t D)
        : lse2((nq + W - 1) / W * W), delta((nq + W - 1) / W * W), zeros(D),
          dqt((nq + W - 1) / W * D), kt(D), vt(D), dkt(D), dvt(D), ds(W), qt(D), acc(D), scores(BLOCK_KEYS) {}
};

template <int DT>
void backward_head(const Dims &s, const float *q, const float *k, const float *v, const float *o,
                   const float *dout, const float *lse, float *dq, float *dk, float *dv, float scale,
                   BackwardBuffers &buf) {
    const int64_t D = DT ? DT : s.dim, stride = s.row(), nq = s.nq, nk = s.nk;
    const int64_t tiles = (nq + W - 1) / W;
    const float c = scale * LOG2E;
    float *lse2 = buf.lse2.data(), *delta = buf.delta.data();
    const float *zeros = buf.zeros.data();
    // Row statistics (base 2) and rowsum(dO * O); padded queries get 0 and 0 (with zero rows they add nothing).
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t i0 = t * W;
        const int nqt = (int)(nq - i0 < W ? nq - i0 : W);
        if (lse)
            for (int i = 0; i < nqt; ++i) lse2[i0 + i] = lse[i0 + i] * LOG2E;
        else
            forward_tile<DT, 1, false>(q + i0 * stride, k, v, nullptr, lse2 + i0, nqt, nk, D, stride, c,
                                    buf.qt.data(), buf.acc.data(), buf.scores.data());
        for (int i = nqt; i < W; ++i) lse2[i0 + i] = 0.0f, delta[i0 + i] = 0.0f;
        for (int i = 0; i < nqt; ++i) {
            const float *a = o + (i0 + i) * stride, *g = dout + (i0 + i) * stride;
            float sum = 0.0f;
            for (int64_t d = 0; d < D; ++d) sum += a[d] * g[d];
            delta[i0 + i] = sum;
        }
    }
    vf *dqt = buf.dqt.data(), *kt = buf.kt.data(), *vt = buf.vt.data(), *dkt = buf.dkt.data(),
       *dvt = buf.dvt.data(), *ds = buf.ds.data();
    for (int64_t i = 0; i < tiles * D; ++i) dqt[i] = vf{};
    for (int64_t k0 = 0; k0 < nk; k0 += W) {
        const int nb = (int)(nk - k0 < W ? nk - k0 : W);
        for (int64_t d = 0; d < D; ++d) {
            vf a = {}, b = {};
            for (int j = 0; j < nb; ++j) {
                a[j] = k[(k0 + j) * stride + d] * c;
                b[j] = v[(k0 + j) * stride + d];
            }
            kt[d] = a;
            vt[d] = b;
            dkt[d] = vf{};
            dvt[d] = vf{};
        }
        vi valid;
        for (int j = 0; j < W; ++j) valid[j] = j < nb ? -1 : 0;
        const float *krow = k + k0 * stride;
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t i0 = t * W;
            for (int r0 = 0; r0 < W; r0 += R) {
                const float *qr[R], *gr[R];
                vf sc[R], dp[R];
                for (int r = 0; r < R; ++r) {
                    const int64_t i = i0 + r0 + r;
                    qr[r] = i < nq ? q + i * stride : zeros;
                    gr[r] = i < nq ? dout + i * stride : zeros;
                    sc[r] = vf{};
                    dp[r] = vf{};
                }
                for (int64_t d = 0; d < D; ++d) {
                    const vf x = kt[d], y = vt[d];
                    for (int r = 0; r < R; ++r) {
                        sc[r] += qr[r][d] * x;
                        dp[r] += gr[r][d] * y;
                    }
                }
                vf p[R], g[R];
                for (int r = 0; r < R; ++r) {
                    const int64_t i = i0 + r0 + r;
                    p[r] = exp2v(sc[r] - lse2[i]);
                    p[r] = valid ? p[r] : vf{};
                    g[r] = p[r] * (dp[r] - delta[i]);
                    ds[r0 + r] = g[r];
                }
                for (int64_t d = 0; d < D; ++d) {
                    vf a = dvt[d], b = dkt[d];
                    for (int r = 0; r < R; ++r) {
                        a += gr[r][d] * p[r];
                        b += qr[r][d] * g[r];
                    }
                    dvt[d] = a;
                    dkt[d] = b;
                }
            }
            transpose16(ds);  // ds[j] = dS[tile queries, key j]: queries in lanes
            vf *dqtile = dqt + t * D;
            int64_t d = 0;
            for (; d + R <= D; d += R) {
                vf a0 = dqtile[d], a1 = dqtile[d + 1], a2 = dqtile[d + 2], a3 = dqtile[d + 3];
                const float *kr = krow + d;
                for (int j = 0; j < nb; ++j, kr += stride) {
                    const vf x = ds[j];
                    a0 += kr[0] * x;
                    a1 += kr[1] * x;
                    a2 += kr[2] * x;
                    a3 += kr[3] * x;
                }
                dqtile[d] = a0;
                dqtile[d + 1] = a1;
                dqtile[d + 2] = a2;
                dqtile[d + 3] = a3;
            }
            for (; d < D; ++d) {
                vf a = dqtile[d];
                const float *kr = krow + d;
                for (int j = 0; j < nb; ++j, kr += stride) a += kr[0] * ds[j];
                dqtile[d] = a;
            }
        }
        for (int64_t d = 0; d < D; ++d) {
            const vf a = dkt[d] * scale, b = dvt[d];
            for (int j = 0; j < nb; ++j) {
                dk[(k0 + j) * stride + d] = a[j];
                dv[(k0 + j) * stride + d] = b[j];
            }
        }
    }
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t i0 = t * W;
        const int nqt = (int)(nq - i0 < W ? nq - i0 : W);
        for (int64_t d = 0; d < D; ++d) {
            const vf a = dqt[t * D + d] * scale;
            for (int i = 0; i < nqt; ++i) dq[(i0 + i) * stride + d] = a[i];
        }
    }
}

template <int DT>
void backward(const Dims &s, const float *q, const float *k, const float *v, const float *o, const float *dout,
              const float *lse, float *dq, float *dk, float *dv, float scale) {
    const int64_t D = s.dim, items = s.batch * s.heads;
#pragma omp parallel
    {
        BackwardBuffers buf(s.nq, D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < items; ++bh) {
            const int64_t b = bh / s.heads, h = bh % s.heads;
            const int64_t qoff = (b * s.nq * s.heads + h) * D, koff = (b * s.nk * s.heads + h) * D;
            backward_head<DT>(s, q + qoff, k + koff, v + koff, o + qoff, dout + qoff,
                              lse ? lse + bh * s.nq : nullptr, dq + qoff, dk + koff, dv + koff, scale, buf);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checking and head-dim dispatch (fully unrolled d loops for the head sizes models use).

using tav::is_f32;

// Checks params[0..2] = q, k, v as (B, N, H, D) fp32 and the extra tensors listed; fills Dims.
bool same_shape(int ndim, const int64_t *shape, int expected_ndim, const int64_t *expected) {
    if (ndim != expected_ndim) return false;
    for (int i = 0; i < ndim; ++i)
        if (shape[i] != expected[i]) return false;
    return true;
}

bool is_lse_shape(int ndim, const int64_t *shape, const Dims &s) {
    const int64_t expected[3] = {s.batch, s.heads, s.nq};
    return same_shape(ndim, shape, 3, expected);
}

bool read_dims(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, Dims &s) {
    if (nparam != expected) return false;
    for (int i = 0; i < nparam; ++i)
        if (!is_f32(dtypes[i])) return false;
    for (int i = 0; i < 3; ++i)
        if (ndims[i] != 4) return false;
    const int64_t *qs = shapes[0], *ks = shapes[1], *vs = shapes[2];
    s = Dims{qs[0], qs[1], ks[1], qs[2], qs[3]};
    for (int i = 0; i < 4; ++i)
        if (ks[i] != vs[i]) return false;
    if (ks[0] != qs[0] || ks[2] != qs[2] || ks[3] != qs[3]) return false;
    return s.batch >= 0 && s.nq >= 0 && s.nk >= 1 && s.heads >= 1 && s.dim >= 1;
}

#define DISPATCH_DIM(dim, fn, ...)                        \
    switch (dim) {                                        \
        case 8: fn<8>(__VA_ARGS__); break;                \
        case 16: fn<16>(__VA_ARGS__); break;              \
        case 32: fn<32>(__VA_ARGS__); break;              \
        case 40: fn<40>(__VA_ARGS__); break;              \
        case 64: fn<64>(__VA_ARGS__); break;              \
        case 80: fn<80>(__VA_ARGS__); break;              \
        case 128: fn<128>(__VA_ARGS__); break;            \
        case 160: fn<160>(__VA_ARGS__); break;            \
        default: fn<0>(__VA_ARGS__); break;               \
    }

int run_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool with_lse) {
    Dims s;
    if (!read_dims(nparam, with_lse ? 6 : 5, ndims, shapes, dtypes, s)) return 1;
    if (!same_shape(ndims[4], shapes[4], 4, shapes[0])) return 1;
    if (with_lse && !is_lse_shape(ndims[5], shapes[5], s)) return 1;
    const float scale = *static_cast<const float *>(params[3]);
    float *lse = with_lse ? static_cast<float *>(params[5]) : nullptr;
    DISPATCH_DIM(s.dim, forward, s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<const float *>(params[2]), static_cast<float *>(params[4]), lse, scale);
    return 0;
}

int run_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool with_lse) {
    Dims s;
    if (!read_dims(nparam, with_lse ? 10 : 9, ndims, shapes, dtypes, s)) return 1;
    const int first_out = with_lse ? 7 : 6;
    for (int i : {3, 4, first_out})  // out, dout, dq have q's shape; dk, dv k's
        if (!same_shape(ndims[i], shapes[i], 4, shapes[0])) return 1;
    for (int i : {first_out + 1, first_out + 2})
        if (!same_shape(ndims[i], shapes[i], 4, shapes[1])) return 1;
    if (with_lse && !is_lse_shape(ndims[6], shapes[6], s)) return 1;
    const float scale = *static_cast<const float *>(params[5]);
    const float *lse = with_lse ? static_cast<const float *>(params[6]) : nullptr;
    DISPATCH_DIM(s.dim, backward, s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                 static_cast<const float *>(params[4]), lse, static_cast<float *>(params[first_out]),
                 static_cast<float *>(params[first_out + 1]), static_cast<float *>(params[first_out + 2]), scale);
    return 0;
}

}  // namespace

extern "C" {

int attention_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                      void *) {
    return run_forward(nparam, params, ndims, shapes, dtypes, false);
}

int attention_forward_lse(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
    return run_forward(nparam, params, ndims, shapes, dtypes, true);
}

int attention_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                       void *) {
    return run_backward(nparam, params, ndims, shapes, dtypes, false);
}

int attention_backward_lse(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
    return run_backward(nparam, params, ndims, shapes, dtypes, true);
}

}  // extern "C"
