// CPU emulation (tests only): just enough CUDA for the kernels of csrc/kernels to run on CPU threads, one
// std::thread per CUDA thread, a barrier for __syncthreads, a per-warp exchange for __shfl_xor_sync, and the
// block's shared memory from the harness (exact size, so AddressSanitizer sees any overrun).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>

#include "cuda_runtime_api.h"

#define VITSLIM_EMULATED 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

// alignas as on the GPU, so UndefinedBehaviorSanitizer reports a misaligned vector access.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct uint3 { unsigned x, y, z; };

namespace emu {
constexpr int kMaxWarps = 32;
inline thread_local uint3 thread_idx{0, 0, 0};
inline thread_local uint3 block_idx{0, 0, 0};
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barrier[kMaxWarps] = {};
inline float warp_exchange[kMaxWarps][32];
inline float* shared_memory = nullptr;
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)

inline float* dynamic_shared_memory() { return emu::shared_memory; }

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// Every lane of the warp must call it (as on the GPU with a full mask).
inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  emu::warp_barrier[warp]->arrive_and_wait();  // the previous exchange has been read by every lane
  emu::warp_exchange[warp][lane] = value;
  emu::warp_barrier[warp]->arrive_and_wait();
  return emu::warp_exchange[warp][lane ^ lane_mask];
}

using std::max;
using std::min;
