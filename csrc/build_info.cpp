// build_info(): what this extension was compiled with. Python compares "torch_version" with the
// torch it runs under, so a stale build fails with "rebuild" instead of an undefined symbol.
#include "ops.h"

namespace monet_fast {

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = CXX_COMPILER_ID;
  info["cxx_standard"] = __cplusplus;
  info["torch_version"] = MONET_FAST_TORCH_VERSION;
#ifdef MONET_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = MONET_FAST_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef _GLIBCXX_USE_CXX11_ABI
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#endif
  return info;
}

}  // namespace monet_fast
