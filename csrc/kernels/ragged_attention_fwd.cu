// Instantiations and launch of the ragged-attention forward kernel. No torch header here: nvcc parses only
// the CUDA headers, which keeps the build short (the host checks are in csrc/ragged_attention.cpp).
#include <atomic>

#include "ragged_attention_fwd.cuh"

namespace vitslim {
namespace ragged_attention {

namespace {

constexpr int kMaxDevices = 64;

// Opts `kernel` into `smem` bytes of dynamic shared memory on the current device, once per device: the
// attribute stays set, and cudaFuncSetAttribute on every launch is a driver call in the hot path (one per
// block per step at batch 1, where the launches set the latency).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t smem, std::atomic<bool> (&done)[kMaxDevices]) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess && device < kMaxDevices) done[device].store(true, std::memory_order_release);
  return err;
}

template <typename scalar_t, int WP>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  const int64_t blocks = p.batch * p.heads * ((p.n + kBlockM - 1) / kBlockM);
  const size_t smem = sizeof(float) * smem_floats(WP);
  auto kernel = _ragged_attention_fwd_kernel<scalar_t, WP>;
  if (smem > 48 * 1024) {  // above the default limit, dynamic shared memory must be opted into
    static std::atomic<bool> done[kMaxDevices] = {};  // one set per instantiation (kernel and smem)
    const cudaError_t err = allow_dynamic_smem(kernel, smem, done);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(p.q), static_cast<const scalar_t*>(p.k), static_cast<const scalar_t*>(p.v),
      static_cast<scalar_t*>(p.o), p.table,
      p.stride_q[0], p.stride_q[1], p.stride_q[2],
      p.stride_k[0], p.stride_k[1], p.stride_k[2],
      p.stride_v[0], p.stride_v[1], p.stride_v[2],
      p.stride_o[0], p.stride_o[1], p.stride_o[2],
      p.n, p.heads, p.qk_scale);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_for_width(const FwdParams& p, cudaStream_t stream) {
  if (p.widest <= 64) return launch<scalar_t, 64>(p, stream);
  if (p.widest <= 128) return launch<scalar_t, 128>(p, stream);
  return launch<scalar_t, 256>(p, stream);
}

}  // namespace

cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_for_width<float>(p, stream);
    case DType::kFloat16: return launch_for_width<__half>(p, stream);
    case DType::kBFloat16: return launch_for_width<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

#define VITSLIM_STR2(...) #__VA_ARGS__
#define VITSLIM_STR(...) VITSLIM_STR2(__VA_ARGS__)

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return VITSLIM_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace ragged_attention
}  // namespace vitslim
