// Host entry points of the sparse backward kernels (sparse_backward.cu), bound in bindings.cpp.
#pragma once

#include <cstdint>

namespace sae_fast {

// dtype codes shared with sae_fast/backends/cuda.py
constexpr int kFloat32 = 0;
constexpr int kFloat16 = 1;
constexpr int kBFloat16 = 2;

// out[latent] (+)= sum over the latent's pairs p of coeff[p] * rows[token[p]], from a
// latent-major index cut into work items (see sparse_backward.cu); items and split_latents
// are the sizes of its arrays, whose entries past the real ones name latent -1. accumulate:
// add to what out holds; out_dtype: dtype, or fp32 (sums held in fp32 across calls). Pointers
// are device addresses.
struct ScatterArgs {
  std::uintptr_t out, workspace, rows, coeff, token;
  std::uintptr_t item_latent, item_start, item_end, item_slot;
  std::uintptr_t split_latent, split_start, split_end;
  int64_t items, split_latents, d, row_stride;
  bool accumulate;
  int out_dtype;
  int dtype;
  std::uintptr_t stream;
};

void scatter_sum(const ScatterArgs& args);

// out[t * k + j] = W[indices[t, j]] . g[t] in fp32 (W rows contiguous, g rows g_stride apart).
void pair_dot(std::uintptr_t out, std::uintptr_t W, std::uintptr_t g, std::uintptr_t indices,
              int64_t n, int64_t k, int64_t d, int64_t g_stride, int dtype, std::uintptr_t stream);

// out[t] = sum_j coeff[t, j] * W[indices[t, j]] (coeff fp32, out and W in dtype).
void gather_sum(std::uintptr_t out, std::uintptr_t W, std::uintptr_t coeff, std::uintptr_t indices,
                int64_t n, int64_t k, int64_t d, int dtype, std::uintptr_t stream);

}  // namespace sae_fast
