// pybind11 bindings of sae_fast._C: plain integers (device pointers, sizes, dtype codes, the
// CUDA stream) in, exceptions with the CUDA error text out. Every argument is named, and the
// Python side (sae_fast/backends/cuda.py) passes them as keywords.
#include <pybind11/pybind11.h>

#include "sparse_backward.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "sae_fast CUDA kernels for the sparse backward (no libtorch linkage)";
  m.def(
      "scatter_sum",
      [](std::uintptr_t out, std::uintptr_t workspace, std::uintptr_t rows, std::uintptr_t coeff,
         std::uintptr_t token, std::uintptr_t item_latent, std::uintptr_t item_start,
         std::uintptr_t item_end, std::uintptr_t item_slot, std::uintptr_t split_latent,
         std::uintptr_t split_start, std::uintptr_t split_end, int64_t items,
         int64_t split_latents, int64_t d, int64_t row_stride, bool accumulate, int out_dtype,
         int dtype, std::uintptr_t stream) {
        sae_fast::scatter_sum({out, workspace, rows, coeff, token, item_latent, item_start,
                               item_end, item_slot, split_latent, split_start, split_end, items,
                               split_latents, d, row_stride, accumulate, out_dtype, dtype,
                               stream});
      },
      "Per-latent sums of coeff-weighted rows over a latent-major pair index (grad W_enc, grad "
      "W_dec, grad b_enc).",
      py::kw_only(), py::arg("out"), py::arg("workspace"), py::arg("rows"), py::arg("coeff"),
      py::arg("token"), py::arg("item_latent"), py::arg("item_start"), py::arg("item_end"),
      py::arg("item_slot"), py::arg("split_latent"), py::arg("split_start"),
      py::arg("split_end"), py::arg("items"), py::arg("split_latents"), py::arg("d"),
      py::arg("row_stride"), py::arg("accumulate"), py::arg("out_dtype"), py::arg("dtype"),
      py::arg("stream"));
  m.def("pair_dot", &sae_fast::pair_dot, "Row dot products per pair (grad values).",
        py::kw_only(), py::arg("out"), py::arg("W"), py::arg("g"), py::arg("indices"),
        py::arg("n"), py::arg("k"), py::arg("d"), py::arg("g_stride"), py::arg("dtype"),
        py::arg("stream"));
  m.def("gather_sum", &sae_fast::gather_sum, "Coefficient-weighted row gathers (grad x, decode).",
        py::kw_only(), py::arg("out"), py::arg("W"), py::arg("coeff"), py::arg("indices"),
        py::arg("n"), py::arg("k"), py::arg("d"), py::arg("dtype"), py::arg("stream"));
  m.attr("DTYPES") = py::dict(py::arg("float32") = sae_fast::kFloat32,
                              py::arg("float16") = sae_fast::kFloat16,
                              py::arg("bfloat16") = sae_fast::kBFloat16);
}
