// Host side of the ragged-attention family: argument checks, then the launch (csrc/kernels/).
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuBLAS/cuSPARSE headers

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/ragged_attention_fwd.h"

namespace vitslim {

namespace {

std::string join(const std::vector<int64_t>& values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << "]";
  return out.str();
}

void copy_strides(const at::Tensor& t, int64_t* strides) {
  for (int d = 0; d < 3; ++d) strides[d] = t.stride(d);
}

}  // namespace

void ragged_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                          const std::vector<int64_t>& head_dims, double scale) {
  namespace ra = ragged_attention;
  TORCH_CHECK(q.dim() == 3, "ragged_attention_fwd: q must be (B, N, sum(head_dims)), got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "ragged_attention_fwd: q, k, v and out must have the same shape, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes(), ", ", out.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "ragged_attention_fwd: dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && out.scalar_type() == dtype,
              "ragged_attention_fwd: q, k, v and out must share one dtype, got ", dtype, ", ", k.scalar_type(),
              ", ", v.scalar_type(), ", ", out.scalar_type());
  TORCH_CHECK(std::isfinite(scale), "ragged_attention_fwd: scale must be finite, got ", scale);

  ra::FwdParams p{};
  int64_t offset = 0;
  for (const int64_t w : head_dims) {
    TORCH_CHECK(w >= 0, "ragged_attention_fwd: head_dims must be non-negative, got ", join(head_dims));
    TORCH_CHECK(w <= ra::kMaxWidth, "ragged_attention_fwd: the CUDA kernel takes heads up to ", ra::kMaxWidth,
                " wide, got a head of width ", w, " in ", join(head_dims), "; use implementation='triton'");
    if (w > 0) {
      TORCH_CHECK(p.heads < ra::kMaxHeads, "ragged_attention_fwd: the CUDA kernel takes at most ", ra::kMaxHeads,
                  " heads of non-zero width, got more in ", join(head_dims), "; use implementation='triton'");
      p.table.offset[p.heads] = static_cast<int32_t>(offset);
      p.table.width[p.heads] = static_cast<int32_t>(w);
      p.heads += 1;
      p.widest = std::max(p.widest, static_cast<int>(w));
    }
    offset += w;
  }
  TORCH_CHECK(offset == q.size(2), "ragged_attention_fwd: last dim of q is ", q.size(2),
              " but sum(head_dims) = ", offset, " for ", join(head_dims));
  // Devices last: every check above runs (and is tested) on CPU tensors too.
  TORCH_CHECK(q.is_cuda(), "ragged_attention_fwd: tensors must be on a CUDA device, got q on ", q.device());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && out.device() == q.device(),
              "ragged_attention_fwd: q, k, v and out must be on one device, got ", q.device(), ", ",
              k.device(), ", ", v.device(), ", ", out.device());
  const int64_t B = q.size(0);
  const int64_t N = q.size(1);
  if (B == 0 || N == 0 || p.heads == 0) return;  // nothing to compute: zero-width heads own no output column
  TORCH_CHECK(N <= std::numeric_limits<int>::max() - ra::kBlockM, "ragged_attention_fwd: sequence length ", N,
              " is too long for the CUDA kernel");
  const int64_t blocks = B * p.heads * ((N + ra::kBlockM - 1) / ra::kBlockM);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "ragged_attention_fwd: B * heads * ceil(N / ",
              ra::kBlockM, ") = ", blocks, " blocks is more than one launch takes; split the batch");

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  copy_strides(q, p.stride_q);
  copy_strides(k, p.stride_k);
  copy_strides(v, p.stride_v);
  copy_strides(out, p.stride_o);
  p.batch = B;
  p.n = static_cast<int>(N);
  p.qk_scale = static_cast<float>(scale * 1.4426950408889634);  // softmax in base 2: exp(x) = exp2(x log2 e)
  p.dtype = dtype == at::kFloat ? ra::DType::kFloat32
          : dtype == at::kHalf  ? ra::DType::kFloat16
                                : ra::DType::kBFloat16;

  const c10::cuda::CUDAGuard guard(q.device());
  C10_CUDA_CHECK(ra::launch_fwd(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
}

std::string compiled_archs() { return ragged_attention::compiled_archs(); }

int cuda_runtime_version() { return ragged_attention::cuda_runtime_version(); }

}  // namespace vitslim
