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
#include "qk_norm_rope.h"

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

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check_result(const char* what, const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string(what) + ": " + err);
}

void qk_norm_rope_kv(int dtype, int cache_fp8, std::uintptr_t q, int64_t sqb, int64_t sql, std::uintptr_t k,
                     int64_t skb, int64_t skl, std::uintptr_t v, int64_t svb, int64_t svl, std::uintptr_t wq,
                     std::uintptr_t wk, int w_f32, std::uintptr_t cosp, int64_t scos, std::uintptr_t sinp,
                     int64_t ssin, std::uintptr_t q_out, std::uintptr_t k_cache, std::uintptr_t v_cache, int64_t scb,
                     int64_t sct, std::uintptr_t k_scale, std::uintptr_t v_scale, int64_t ssb, int64_t sst,
                     std::uintptr_t pos, int64_t B, int64_t L, int64_t Tcap, int H, int D, float eps,
                     float amax_floor, std::uintptr_t stream) {
  if (B > 0 && L > 0) {
    if (!q || !k || !v || !wq || !wk || !cosp || !sinp || !q_out || !k_cache || !v_cache || !pos)
      throw std::invalid_argument("qk_norm_rope_kv: null device pointer");
    if (cache_fp8 && (!k_scale || !v_scale))
      throw std::invalid_argument("qk_norm_rope_kv: an FP8 cache needs k_scale and v_scale");
  }
  check_result("qk_norm_rope_kv",
               dz::qk_norm_rope_kv(dtype, cache_fp8, ptr<const void>(q), sqb, sql, ptr<const void>(k), skb, skl,
                                   ptr<const void>(v), svb, svl, ptr<const void>(wq), ptr<const void>(wk), w_f32,
                                   ptr<const float>(cosp), scos, ptr<const float>(sinp), ssin, ptr<void>(q_out),
                                   ptr<void>(k_cache), ptr<void>(v_cache), scb, sct, ptr<float>(k_scale),
                                   ptr<float>(v_scale), ssb, sst, ptr<const int32_t>(pos), B, L, Tcap, H, D, eps,
                                   amax_floor, ptr<void>(stream)));
}

void kv_write(int dtype, int cache_fp8, std::uintptr_t k, int64_t skb, int64_t skl, int64_t skh, std::uintptr_t v,
              int64_t svb, int64_t svl, int64_t svh, std::uintptr_t k_cache, std::uintptr_t v_cache, int64_t scb,
              int64_t sct, std::uintptr_t k_scale, std::uintptr_t v_scale, int64_t ssb, int64_t sst,
              std::uintptr_t pos, int64_t B, int64_t L, int64_t Tcap, int H, int D, float amax_floor,
              std::uintptr_t stream) {
  if (B > 0 && L > 0) {
    if (!k || !v || !k_cache || !v_cache || !pos) throw std::invalid_argument("kv_write: null device pointer");
    if (cache_fp8 && (!k_scale || !v_scale))
      throw std::invalid_argument("kv_write: an FP8 cache needs k_scale and v_scale");
  }
  check_result("kv_write", dz::kv_write(dtype, cache_fp8, ptr<const void>(k), skb, skl, skh, ptr<const void>(v), svb,
                                        svl, svh, ptr<void>(k_cache), ptr<void>(v_cache), scb, sct,
                                        ptr<float>(k_scale), ptr<float>(v_scale), ssb, sst, ptr<const int32_t>(pos),
                                        B, L, Tcap, H, D, amax_floor, ptr<void>(stream)));
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
  m.def("qk_norm_rope_kv", &qk_norm_rope_kv, py::call_guard<py::gil_scoped_release>(),
        "Fused q/k RMSNorm + RoPE + KV-cache write (see csrc/qk_norm_rope.cu; wrapper: dz_kernels.kv_cache.cuda).");
  m.def("kv_write", &kv_write, py::call_guard<py::gil_scoped_release>(),
        "KV-cache write of new keys/values, FP8-quantized when the cache is E4M3 (wrapper: dz_kernels.kv_cache.cuda).");
}
