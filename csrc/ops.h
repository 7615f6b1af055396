// Host entry points of monet_fast._C, declared once; bindings live in bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace monet_fast {

// Build facts a bug report needs: compiler, torch version built against, CUDA on/off, archs.
pybind11::dict build_info();

}  // namespace monet_fast
