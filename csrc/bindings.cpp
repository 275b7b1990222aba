// pybind11 module dz_kernels._C: raw-pointer entry points for the kernels in csrc/*.cu.
//
// The functions take device addresses (Python ints from tensor.data_ptr()), sizes, strides and a cudaStream_t
// (torch.cuda.current_stream().cuda_stream): no libtorch headers, so no ABI tie to a torch build. The Python
// wrappers in dz_kernels/_ext.py check dtype, device, shape and strides and raise clear errors before calling here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kv_cache.h"

#ifndef DZ_CUDA_ARCHS
#define DZ_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace {

void write_rows(std::uintptr_t dst, std::uintptr_t src, std::uintptr_t offset, int64_t B, int64_t T,
                int64_t capacity, int64_t row_bytes, int64_t dst_bstride, int64_t dst_tstride, int64_t src_bstride,
                int64_t src_tstride, std::uintptr_t stream) {
  if (B < 0 || T < 0 || capacity < 0 || row_bytes < 0)
    throw std::invalid_argument("write_rows: negative size (B, T, capacity and row_bytes must be >= 0)");
  if (T > capacity) throw std::invalid_argument("write_rows: T (rows to write) exceeds the cache capacity");
  if (B > 0 && T > 0 && row_bytes > 0 && (dst == 0 || src == 0 || offset == 0))
    throw std::invalid_argument("write_rows: null device pointer");
  const char* err = dz::write_rows(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                                   reinterpret_cast<const int32_t*>(offset), B, T, capacity, row_bytes, dst_bstride,
                                   dst_tstride, src_bstride, src_tstride, reinterpret_cast<void*>(stream));
  if (err != nullptr) throw std::runtime_error(std::string("write_rows: CUDA error: ") + err);
}

int vector_bytes(std::uintptr_t dst, std::uintptr_t src, int64_t row_bytes, int64_t dst_bstride, int64_t dst_tstride,
                 int64_t src_bstride, int64_t src_tstride) {
  return dz::write_rows_vector_bytes(reinterpret_cast<const void*>(dst), reinterpret_cast<const void*>(src),
                                     row_bytes, dst_bstride, dst_tstride, src_bstride, src_tstride);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dz_kernels CUDA kernels (raw-pointer bindings; use the wrappers in dz_kernels._ext)";
  m.attr("compiled_archs") = py::str(DZ_CUDA_ARCHS);
  m.def("write_rows", &write_rows, py::call_guard<py::gil_scoped_release>(), py::arg("dst"), py::arg("src"),
        py::arg("offset"), py::arg("B"), py::arg("T"), py::arg("capacity"), py::arg("row_bytes"),
        py::arg("dst_bstride"), py::arg("dst_tstride"), py::arg("src_bstride"), py::arg("src_tstride"),
        py::arg("stream"),
        "Copy rows (b, t) of src to rows (b, *offset + t) of dst on `stream`; sizes/strides in bytes.");
  m.def("write_rows_vector_bytes", &vector_bytes, py::arg("dst"), py::arg("src"), py::arg("row_bytes"),
        py::arg("dst_bstride"), py::arg("dst_tstride"), py::arg("src_bstride"), py::arg("src_tstride"),
        "Access width in bytes (16/8/4/2/1) that write_rows uses for these addresses and strides.");
  m.def("cuda_runtime_version", &dz::cuda_runtime_version, "cudaRuntimeGetVersion of the linked runtime.");
}
