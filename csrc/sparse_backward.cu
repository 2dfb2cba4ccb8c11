// Sparse backward kernels of a TopK SAE over its n*k (token, latent) pairs.
//
// Latent-major gradients (grad W_enc, grad W_dec, grad b_enc) read a latent-major index of the
// pairs (pairs sorted stably by latent, cut into work items of at most a fixed number of
// pairs, so a hot latent does not serialise one block). Each item sums its pairs in fp32 in
// pair order; a latent with one item writes its row once, a latent with several writes fp32
// partials that a second kernel adds in item order. No atomics touch an output, so results
// are bitwise deterministic. Token-major gradients (grad values, grad x) are row gathers with
// fp32 accumulation.
//
// The index is built on the device without knowing its size on the host: its arrays have an
// upper bound of entries, and the entries past the real ones name latent -1, which the kernels
// skip. Rows are read VEC elements (16 bytes) at a time where the row width, the strides and
// the pointers allow it, else one element at a time.
//
// Everything takes raw device pointers and a stream: no libtorch, so it builds against any
// torch and on machines without a GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

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

constexpr int kThreads = 128;  // threads per block, VEC columns of d each

// N consecutive elements, loaded or stored as one aligned access.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte access of T when rows are read VEC at a time (VEC 1: one each).
template <typename T, int VEC> __host__ __device__ constexpr int chunk() {
  return VEC == 1 ? 1 : 16 / sizeof(T);
}

// acc[i] += c * row[i] for VEC consecutive elements, 16 bytes at a time when VEC > 1.
template <typename T, int VEC> __device__ __forceinline__ void add_row(float* acc, const T* row, float c) {
  constexpr int kChunk = chunk<T, VEC>();
  static_assert(VEC % kChunk == 0, "VEC must be a whole number of 16-byte accesses");
#pragma unroll
  for (int i0 = 0; i0 < VEC; i0 += kChunk) {
    const Pack<T, kChunk> p = *reinterpret_cast<const Pack<T, kChunk>*>(row + i0);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc[i0 + i] += c * to_float(p.v[i]);
  }
}

template <typename T, int VEC> __device__ __forceinline__ void store_row(T* row, const float* acc) {
  constexpr int kChunk = chunk<T, VEC>();
#pragma unroll
  for (int i0 = 0; i0 < VEC; i0 += kChunk) {
    Pack<T, kChunk> p;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) p.v[i] = from_float<T>(acc[i0 + i]);
    *reinterpret_cast<Pack<T, kChunk>*>(row + i0) = p;
  }
}

// One block per (work item, d tile): out_row (+)= sum over the item's pairs p of
// coeff[p] * rows[token[p]] (fp32). Single-item latents store into out (dtype O, T or fp32;
// ACCUMULATE: added to what out holds), multi-item latents store fp32 partials into
// workspace[slot].
template <typename T, typename O, int VEC, bool ACCUMULATE>
__global__ void scatter_sum_kernel(O* __restrict__ out, float* __restrict__ workspace,
                                   const T* __restrict__ rows, const float* __restrict__ coeff,
                                   const int64_t* __restrict__ token,
                                   const int64_t* __restrict__ item_latent,
                                   const int64_t* __restrict__ item_start,
                                   const int64_t* __restrict__ item_end,
                                   const int64_t* __restrict__ item_slot, int64_t d,
                                   int64_t row_stride) {
  const int64_t item = blockIdx.x;
  const int64_t latent = item_latent[item];
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * VEC;
  if (latent < 0 || col >= d) return;
  float acc[VEC] = {};
  for (int64_t p = item_start[item]; p < item_end[item]; ++p) {
    add_row<T, VEC>(acc, rows + token[p] * row_stride + col, coeff[p]);
  }
  const int64_t slot = item_slot[item];
  if (slot < 0) {
    O* dst = out + latent * d + col;
    if (ACCUMULATE) add_row<O, VEC>(acc, dst, 1.f);
    store_row<O, VEC>(dst, acc);
  } else {
    store_row<float, VEC>(workspace + slot * d + col, acc);
  }
}

// One block per (multi-item latent, d tile): add its partials in item order.
template <typename O, int VEC, bool ACCUMULATE>
__global__ void reduce_partials_kernel(O* __restrict__ out, const float* __restrict__ workspace,
                                       const int64_t* __restrict__ split_latent,
                                       const int64_t* __restrict__ slot_start,
                                       const int64_t* __restrict__ slot_end, int64_t d) {
  const int64_t i = blockIdx.x;
  const int64_t latent = split_latent[i];
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * VEC;
  if (latent < 0 || col >= d) return;
  float acc[VEC] = {};
  for (int64_t s = slot_start[i]; s < slot_end[i]; ++s) {
    add_row<float, VEC>(acc, workspace + s * d + col, 1.f);
  }
  O* dst = out + latent * d + col;
  if (ACCUMULATE) add_row<O, VEC>(acc, dst, 1.f);
  store_row<O, VEC>(dst, acc);
}

// One warp per pair (t, j): grad_values[t, j] = W[indices[t, j]] . g[t], fp32.
template <typename T, int VEC>
__global__ void pair_dot_kernel(float* __restrict__ out, const T* __restrict__ W,
                                const T* __restrict__ g, const int64_t* __restrict__ indices,
                                int64_t pairs, int64_t k, int64_t d, int64_t g_stride) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (pair >= pairs) return;
  const T* w = W + indices[pair] * d;
  const T* row = g + (pair / k) * g_stride;
  float acc = 0.f;
  for (int64_t c = lane * VEC; c < d; c += 32 * VEC) {
    const Pack<T, VEC> a = *reinterpret_cast<const Pack<T, VEC>*>(w + c);
    const Pack<T, VEC> b = *reinterpret_cast<const Pack<T, VEC>*>(row + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc += to_float(a.v[i]) * to_float(b.v[i]);
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffff, acc, offset);
  if (lane == 0) out[pair] = acc;
}

// One block per (token, d tile): out[t] = sum_j coeff[t, j] * W[indices[t, j]], fp32, in j order.
template <typename T, int VEC>
__global__ void gather_sum_kernel(T* __restrict__ out, const T* __restrict__ W,
                                  const float* __restrict__ coeff,
                                  const int64_t* __restrict__ indices, int64_t k, int64_t d) {
  const int64_t t = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * VEC;
  if (col >= d) return;
  float acc[VEC] = {};
  for (int64_t j = 0; j < k; ++j) add_row<T, VEC>(acc, W + indices[t * k + j] * d + col, coeff[t * k + j]);
  store_row<T, VEC>(out + t * d + col, acc);
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("sae_fast._C ") + what + ": " + cudaGetErrorString(status));
  }
}

void check_launch(const char* what) {
  check(cudaGetLastError(), what);
}

dim3 tiles(int64_t blocks, int64_t d, int vec) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>((d + per_block - 1) / per_block));
}

bool aligned(std::uintptr_t ptr) { return ptr % 16 == 0; }

// Elements per access: 16 bytes when d, the row strides and every pointer allow it, else 1.
template <typename T> int vector_width(int64_t d, std::initializer_list<int64_t> strides,
                                       std::initializer_list<std::uintptr_t> pointers) {
  constexpr int vec = 16 / sizeof(T);
  if (d % vec != 0) return 1;
  for (int64_t s : strides) if (s % vec != 0) return 1;
  for (std::uintptr_t p : pointers) if (!aligned(p)) return 1;
  return vec;
}

template <typename Fn> void dispatch(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(float{}); break;
    case kFloat16: fn(__half{}); break;
    case kBFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("sae_fast._C: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

// Runs body<VEC> with VEC the vector width for T, or 1.
template <typename T, typename Body> void with_width(int vec, Body&& body) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec == kVec) {
    body(std::integral_constant<int, kVec>{});
  } else {
    body(std::integral_constant<int, 1>{});
  }
}

template <typename T, typename O, int VEC, bool ACCUMULATE>
void launch_scatter(const ScatterArgs& a, cudaStream_t stream) {
  if (a.items > 0) {
    scatter_sum_kernel<T, O, VEC, ACCUMULATE><<<tiles(a.items, a.d, VEC), kThreads, 0, stream>>>(
        reinterpret_cast<O*>(a.out), reinterpret_cast<float*>(a.workspace),
        reinterpret_cast<const T*>(a.rows), reinterpret_cast<const float*>(a.coeff),
        reinterpret_cast<const int64_t*>(a.token), reinterpret_cast<const int64_t*>(a.item_latent),
        reinterpret_cast<const int64_t*>(a.item_start), reinterpret_cast<const int64_t*>(a.item_end),
        reinterpret_cast<const int64_t*>(a.item_slot), a.d, a.row_stride);
    check_launch("scatter_sum_kernel");
  }
  if (a.split_latents > 0) {
    reduce_partials_kernel<O, VEC, ACCUMULATE><<<tiles(a.split_latents, a.d, VEC), kThreads, 0, stream>>>(
        reinterpret_cast<O*>(a.out), reinterpret_cast<const float*>(a.workspace),
        reinterpret_cast<const int64_t*>(a.split_latent),
        reinterpret_cast<const int64_t*>(a.split_start),
        reinterpret_cast<const int64_t*>(a.split_end), a.d);
    check_launch("reduce_partials_kernel");
  }
}

}  // namespace

void scatter_sum(const ScatterArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (a.out_dtype != a.dtype && a.out_dtype != kFloat32) {
    throw std::invalid_argument("sae_fast._C scatter_sum: out_dtype must be dtype or 0 (fp32)");
  }
  dispatch(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    // Every array is read 16 bytes at a time when d and the rows' stride are whole numbers of
    // 16 / sizeof(T) elements: then so is every fp32 offset (4 per 16 bytes).
    const int vec = vector_width<T>(a.d, {a.row_stride}, {a.out, a.rows, a.workspace});
    auto run = [&](auto out_zero) {
      using O = decltype(out_zero);
      with_width<T>(vec, [&](auto width) {
        if (a.accumulate) {
          launch_scatter<T, O, decltype(width)::value, true>(a, stream);
        } else {
          launch_scatter<T, O, decltype(width)::value, false>(a, stream);
        }
      });
    };
    if (a.out_dtype == a.dtype) {
      run(T{});
    } else {
      run(float{});
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
    with_width<T>(vector_width<T>(d, {g_stride}, {W, g}), [&](auto width) {
      pair_dot_kernel<T, decltype(width)::value>
          <<<blocks, warps * 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              reinterpret_cast<float*>(out), reinterpret_cast<const T*>(W),
              reinterpret_cast<const T*>(g), reinterpret_cast<const int64_t*>(indices), pairs, k,
              d, g_stride);
    });
    check_launch("pair_dot_kernel");
  });
}

void gather_sum(std::uintptr_t out, std::uintptr_t W, std::uintptr_t coeff, std::uintptr_t indices,
                int64_t n, int64_t k, int64_t d, int dtype, std::uintptr_t stream) {
  if (n == 0) return;
  dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    with_width<T>(vector_width<T>(d, {}, {out, W}), [&](auto width) {
      constexpr int vec = decltype(width)::value;
      gather_sum_kernel<T, vec><<<tiles(n, d, vec), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
          reinterpret_cast<T*>(out), reinterpret_cast<const T*>(W),
          reinterpret_cast<const float*>(coeff), reinterpret_cast<const int64_t*>(indices), k, d);
    });
    check_launch("gather_sum_kernel");
  });
}

}  // namespace sae_fast
