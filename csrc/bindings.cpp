// All pybind11 bindings of monet_fast._C in one place; one docstring per function.
#include <torch/python.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "monet_fast compiled extension (latent decoding engine and build facts)";
  m.def("build_info", &monet_fast::build_info,
        "Dict of build facts: compiler, torch_version, cuda, cuda_archs, cxx11_abi.");
}
