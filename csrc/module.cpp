// The one pybind11 module of the package: vitslim_kernels._C. Host entry points live in one file per op
// family (argument checks there); this file only binds them.
// torch's pybind11 casters only, not <torch/extension.h>: that one parses the whole C++ frontend
// (55 s of g++ instead of 16 s on this 2-core build machine).
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitslim_kernels CUDA kernels (load through vitslim_kernels._ext, not directly)";
  m.def("ragged_attention_fwd", &vitslim::ragged_attention_fwd,
        "Ragged-width attention forward into out. q, k, v, out: (B, N, sum(head_dims)), any strides.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("head_dims"), py::arg("scale"));
  m.def("compiled_archs", &vitslim::compiled_archs,
        "nvcc's __CUDA_ARCH_LIST__ for the kernels, e.g. '800,900'");
  m.def("cuda_runtime_version", &vitslim::cuda_runtime_version,
        "CUDART_VERSION of the toolkit that compiled the kernels, e.g. 13000");
}
