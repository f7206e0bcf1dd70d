// Layout copies for the UNet on CPU (fp32), as MindSpore AOT ops. They move data and compute nothing, so their
// results are bit-identical to the MindSpore ops they replace; they exist because MindSpore 2.10's CPU kernels
// for these copies keep workspace alive for the life of a graph.
//
//   swap_middle_axes            (A, B, C, D) -> (A, C, B, D), the UNet's layout changes (channels <-> tokens,
//                               frames <-> positions). Its own inverse with B and C exchanged. MindSpore 2.10's CPU
//                               Transpose holds twice its output as workspace for the life of the graph.
//   frame_gather_{fwd,bwd}      a generic gather of frames driven by a table (F, S) int32 of source frames, the
//                               sparse-causal keys/values of attn1 with tav.models.attention's frame policy:
//                               x ((B F), D, C) -> y ((B F), S*D, C), y[b*F + i, s*D:(s+1)*D] = x[b*F + table[i, s]].
//                               The backward is the scatter-add: every frame's gradient summed from each place it
//                               was copied to, in the order (i, s) -- one order, whatever the thread count.
//
// Calling convention (MindSpore AOT): params = inputs then outputs; shapes/ndims describe each.
#include <cstdint>
#include <cstring>

#include "common.h"

namespace {

using tav::is_f32;

bool is_i32(const char *dtype) { return dtype != nullptr && std::strcmp(dtype, "int32") == 0; }

int swap_middle_axes_impl(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // input (A, B, C, D); output (A, C, B, D)
  if (nparam != 2 || !is_f32(dtypes[0]) || ndims[0] != 4 || ndims[1] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t a = shapes[0][0], b = shapes[0][1], c = shapes[0][2], d = shapes[0][3];
  if (shapes[1][0] != a || shapes[1][1] != c || shapes[1][2] != b || shapes[1][3] != d) return 2;
  // Tiles of 16 x 16 (b, c) pairs so both the reads and the writes stay within a few cache lines per row.
  constexpr int64_t kTile = 16;
  const int64_t b_tiles = (b + kTile - 1) / kTile, c_tiles = (c + kTile - 1) / kTile;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < a; ++i)
    for (int64_t tile = 0; tile < b_tiles * c_tiles; ++tile) {
      const int64_t b0 = (tile / c_tiles) * kTile, c0 = (tile % c_tiles) * kTile;
      const int64_t b1 = b0 + kTile < b ? b0 + kTile : b, c1 = c0 + kTile < c ? c0 + kTile : c;
      const float *src = x + i * b * c * d;
      float *dst = y + i * b * c * d;
      for (int64_t cc = c0; cc < c1; ++cc)
        for (int64_t bb = b0; bb < b1; ++bb) {
          const float *from = src + (bb * c + cc) * d;
          float *to = dst + (cc * b + bb) * d;
          for (int64_t k = 0; k < d; ++k) to[k] = from[k];
        }
    }
  return 0;
}

// The table (frames, sources) of source frames, checked: every entry a frame of the same video.
bool valid_table(const int32_t *table, int64_t frames, int64_t sources) {
  for (int64_t e = 0; e < frames * sources; ++e)
    if (table[e] < 0 || table[e] >= frames) return false;
  return true;
}

int frame_gather_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: x ((B F), D, C) fp32, table (F, S) int32; output ((B F), S*D, C)
  if (nparam != 3 || !is_f32(dtypes[0]) || !is_i32(dtypes[1]) || ndims[0] != 3 || ndims[1] != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *table = static_cast<const int32_t *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t frames = shapes[1][0], sources = shapes[1][1];
  const int64_t bf = shapes[0][0], plane = shapes[0][1] * shapes[0][2];
  if (frames < 1 || bf % frames != 0 || shapes[2][1] != sources * shapes[0][1]) return 2;
  if (!valid_table(table, frames, sources)) return 3;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < bf; ++item) {
    const int64_t first = item - item % frames, i = item % frames;
    for (int64_t s = 0; s < sources; ++s)
      std::memcpy(y + (item * sources + s) * plane, x + (first + table[i * sources + s]) * plane,
                  sizeof(float) * plane);
  }
  return 0;
}

int frame_gather_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // inputs: dy ((B F), S*D, C) fp32, table (F, S) int32; output dx ((B F), D, C)
  if (nparam != 3 || !is_f32(dtypes[0]) || !is_i32(dtypes[1]) || ndims[0] != 3 || ndims[1] != 2) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const int32_t *table = static_cast<const int32_t *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t frames = shapes[1][0], sources = shapes[1][1];
  const int64_t bf = shapes[2][0], plane = shapes[2][1] * shapes[2][2];
  if (frames < 1 || bf % frames != 0 || shapes[0][1] != sources * shapes[2][1]) return 2;
  if (!valid_table(table, frames, sources)) return 3;
  const int64_t videos = bf / frames;
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (plane + kChunk - 1) / kChunk;
  // Threads own disjoint (video, element range) blocks, so the sums over frames never race.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t v = 0; v < videos; ++v)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t e0 = chunk * kChunk, e1 = e0 + kChunk < plane ? e0 + kChunk : plane;
      const int64_t first = v * frames;
      for (int64_t f = 0; f < frames; ++f) std::memset(dx + (first + f) * plane + e0, 0, sizeof(float) * (e1 - e0));
      for (int64_t i = 0; i < frames; ++i)
        for (int64_t s = 0; s < sources; ++s) {
          const float *g = dy + ((first + i) * sources + s) * plane;
          float *d_source = dx + (first + table[i * sources + s]) * plane;
          for (int64_t e = e0; e < e1; ++e) d_source[e] += g[e];
        }
    }
  return 0;
}

}  // namespace

extern "C" {

int swap_middle_axes(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return swap_middle_axes_impl(n, p, nd, s, t);
}
int frame_gather_fwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return frame_gather_forward(n, p, nd, s, t);
}
int frame_gather_bwd(int n, void **p, int *nd, int64_t **s, const char **t, void *, void *) {
  return frame_gather_backward(n, p, nd, s, t);
}

}  // extern "C"
