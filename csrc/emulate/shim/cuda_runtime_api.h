// CPU emulation (tests only, see ../ragged_attention_fwd_emulate.cpp): the CUDA runtime names the kernel
// headers use.
#pragma once
#include <cstdint>
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
