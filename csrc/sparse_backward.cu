// Sparse backward kernels of a TopK SAE over its n*k (token, latent) pairs.
//
// Latent-major gradients (grad W_enc, grad W_dec, grad b_enc) read a latent-major index of the
// pairs built once per step (pairs sorted stably by latent, cut into work items of at most a
// fixed number of pairs, so a hot latent does not serialise one block). Each item sums its
// pairs in fp32 in pair order; a latent with one item writes its row once, a latent with
// several writes fp32 partials that a second kernel adds in item order. No atomics touch an
// output, so results are bitwise deterministic. Token-major gradients (grad values, grad x)
// are row gathers with fp32 accumulation.
//
// Everything takes raw device pointers and a stream: no libtorch, so it builds against any
// torch and on machines without a GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sparse_backward.h"

namespace sae_fast {
namespace {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

constexpr int kTileD = 128;  // threads per block, one column of d each

// One block per (work item, d tile): out_row = sum over the item's pairs p of
// coeff[p] * rows[token[p]] (fp32). Single-item latents store into out (dtype T),
// multi-item latents store fp32 partials into workspace[slot].
template <typename T>
__global__ void scatter_sum_kernel(T* __restrict__ out, float* __restrict__ workspace,
                                    const T* __restrict__ rows, const float* __restrict__ coeff,
                                    const int64_t* __restrict__ token,
                                    const int64_t* __restrict__ item_latent,
                                    const int64_t* __restrict__ item_start,
                                    const int64_t* __restrict__ item_end,
                                    const int64_t* __restrict__ item_slot, int64_t d,
                                    int64_t row_stride) {
  const int64_t item = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTileD + threadIdx.x;
  if (col >= d) return;
  float acc = 0.f;
  for (int64_t p = item_start[item]; p < item_end[item]; ++p) {
    acc += coeff[p] * to_float(rows[token[p] * row_stride + col]);
  }
  const int64_t slot = item_slot[item];
  if (slot < 0) {
    out[item_latent[item] * d + col] = from_float<T>(acc);
  } else {
    workspace[slot * d + col] = acc;
  }
}

// One block per (multi-item latent, d tile): add its partials in item order.
template <typename T>
__global__ void reduce_partials_kernel(T* __restrict__ out, const float* __restrict__ workspace,
                                       const int64_t* __restrict__ latent,
                                       const int64_t* __restrict__ slot_start,
                                       const int64_t* __restrict__ slot_end, int64_t d) {
  const int64_t i = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTileD + threadIdx.x;
  if (col >= d) return;
  float acc = 0.f;
  for (int64_t s = slot_start[i]; s < slot_end[i]; ++s) acc += workspace[s * d + col];
  out[latent[i] * d + col] = from_float<T>(acc);
}

// One warp per pair (t, j): grad_values[t, j] = W[indices[t, j]] . g[t], fp32.
template <typename T>
__global__ void pair_dot_kernel(float* __restrict__ out, const T* __restrict__ W,
                                const T* __restrict__ g, const int64_t* __restrict__ indices,
                                int64_t pairs, int64_t k, int64_t d, int64_t g_stride) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (pair >= pairs) return;
  const T* w = W + indices[pair] * d;
  const T* row = g + (pair / k) * g_stride;
  float acc = 0.f;
  for (int64_t c = lane; c < d; c += 32) acc += to_float(w[c]) * to_float(row[c]);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffff, acc, offset);
  if (lane == 0) out[pair] = acc;
}

// One block per (token, d tile): out[t] = sum_j coeff[t, j] * W[indices[t, j]], fp32, in j order.
template <typename T>
__global__ void gather_sum_kernel(T* __restrict__ out, const T* __restrict__ W,
                                  const float* __restrict__ coeff,
                                  const int64_t* __restrict__ indices, int64_t k, int64_t d) {
  const int64_t t = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTileD + threadIdx.x;
  if (col >= d) return;
  float acc = 0.f;
  for (int64_t j = 0; j < k; ++j) acc += coeff[t * k + j] * to_float(W[indices[t * k + j] * d + col]);
  out[t * d + col] = from_float<T>(acc);
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("sae_fast._C ") + what + ": " + cudaGetErrorString(status));
  }
}

void check_launch(const char* what) {
  check(cudaGetLastError(), what);
}

dim3 tiles(int64_t blocks, int64_t d) {
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>((d + kTileD - 1) / kTileD));
}

template <typename Fn> void dispatch(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(float{}); break;
    case kFloat16: fn(__half{}); break;
    case kBFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("sae_fast._C: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

}  // namespace

void scatter_sum(const ScatterArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  dispatch(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (a.items > 0) {
      scatter_sum_kernel<T><<<tiles(a.items, a.d), kTileD, 0, stream>>>(
          reinterpret_cast<T*>(a.out), reinterpret_cast<float*>(a.workspace),
          reinterpret_cast<const T*>(a.rows), reinterpret_cast<const float*>(a.coeff),
          reinterpret_cast<const int64_t*>(a.token), reinterpret_cast<const int64_t*>(a.item_latent),
          reinterpret_cast<const int64_t*>(a.item_start), reinterpret_cast<const int64_t*>(a.item_end),
          reinterpret_cast<const int64_t*>(a.item_slot), a.d, a.row_stride);
      check_launch("scatter_sum_kernel");
    }
    if (a.split_latents > 0) {
      reduce_partials_kernel<T><<<tiles(a.split_latents, a.d), kTileD, 0, stream>>>(
          reinterpret_cast<T*>(a.out), reinterpret_cast<const float*>(a.workspace),
          reinterpret_cast<const int64_t*>(a.split_latent),
          reinterpret_cast<const int64_t*>(a.split_start),
          reinterpret_cast<const int64_t*>(a.split_end), a.d);
      check_launch("reduce_partials_kernel");
    }
  });
}

void pair_dot(std::uintptr_t out, std::uintptr_t W, std::uintptr_t g, std::uintptr_t indices,
              int64_t n, int64_t k, int64_t d, int64_t g_stride, int dtype, std::uintptr_t stream) {
  const int64_t pairs = n * k;
  if (pairs == 0) return;
  constexpr int warps = 8;
  dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    const unsigned blocks = static_cast<unsigned>((pairs + warps - 1) / warps);
    pair_dot_kernel<T><<<blocks, warps * 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<float*>(out), reinterpret_cast<const T*>(W), reinterpret_cast<const T*>(g),
        reinterpret_cast<const int64_t*>(indices), pairs, k, d, g_stride);
    check_launch("pair_dot_kernel");
  });
}

void gather_sum(std::uintptr_t out, std::uintptr_t W, std::uintptr_t coeff, std::uintptr_t indices,
                int64_t n, int64_t k, int64_t d, int dtype, std::uintptr_t stream) {
  if (n == 0) return;
  dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    gather_sum_kernel<T><<<tiles(n, d), kTileD, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<T*>(out), reinterpret_cast<const T*>(W),
        reinterpret_cast<const float*>(coeff), reinterpret_cast<const int64_t*>(indices), k, d);
    check_launch("gather_sum_kernel");
  });
}

}  // namespace sae_fast
