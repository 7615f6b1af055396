// All pybind11 bindings of monet_fast._C in one place; one docstring per function.
#include <torch/python.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "monet_fast compiled extension (latent decoding engine and build facts)";
  m.def("build_info", &monet_fast::build_info,
        "Dict of build facts: compiler, torch_version, cuda, cuda_archs, cuda_version, "
        "cuda_reason, cxx11_abi.");
  m.def("latent_step", &monet_fast::latent_step,
        "One latent-decode state-machine step for a batch, in place (see csrc/ops.h).",
        pybind11::arg("sampled_ids"), pybind11::arg("hidden"), pybind11::arg("embed_weight"),
        pybind11::arg("eos_ids"), pybind11::arg("mode"), pybind11::arg("count"),
        pybind11::arg("n_blocks"), pybind11::arg("remaining"), pybind11::arg("emit_ids"),
        pybind11::arg("use_hidden"), pybind11::arg("next_embeds"), pybind11::arg("layout"),
        pybind11::arg("latent_size"), pybind11::arg("start_id"), pybind11::arg("end_id"),
        pybind11::arg("slot_id"), pybind11::arg("fill_id"), pybind11::arg("max_blocks"));
}
