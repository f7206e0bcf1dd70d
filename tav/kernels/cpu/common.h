// Small helpers shared by every kernels/cpu/*.cc. kernels/native.py puts this header's text into each library's
// build key, so editing it rebuilds them all (a cached library never outlives the header it was built with).
#pragma once

#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tav {

// MindSpore names fp32 "float32" (and, in some paths, "float").
inline bool is_f32(const char *dtype) {
  return dtype != nullptr && (std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0);
}

#ifdef _OPENMP
inline int max_threads() { return omp_get_max_threads(); }  // threads a parallel region may use
inline int team_size() { return omp_get_num_threads(); }    // threads of the enclosing parallel region
inline int thread_id() { return omp_get_thread_num(); }
#else
inline int max_threads() { return 1; }
inline int team_size() { return 1; }
inline int thread_id() { return 0; }
#endif

inline int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Rows of a (..., last) tensor: the product of all but the last axis.
inline int64_t rows_of(int ndim, const int64_t *shape) { return ndim == 0 ? 1 : numel(ndim - 1, shape); }

}  // namespace tav
