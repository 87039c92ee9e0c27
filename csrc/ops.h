// Host entry points of vitslim_kernels._C (defined in one host file per op family, bound in module.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace vitslim {

// out = ragged attention of q, k, v (each (B, N, sum(head_dims)), any strides); out is (B, N, D), written in
// full (every column belongs to exactly one head of non-zero width). Forward only.
void ragged_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                          const std::vector<int64_t>& head_dims, double scale);

// nvcc's __CUDA_ARCH_LIST__ for the kernels, e.g. "800,900" (empty if unknown).
std::string compiled_archs();

// CUDART_VERSION of the toolkit that compiled the kernels, e.g. 13000.
int cuda_runtime_version();

}  // namespace vitslim
