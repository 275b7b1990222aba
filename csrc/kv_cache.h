// Host-side declarations for csrc/kv_cache.cu (included by csrc/bindings.cpp and by kv_cache.cu itself).
#pragma once

#include <cstdint>

namespace dz {

// Copies B*T rows of `row_bytes` bytes each: row (b, t) of `src` goes to row (b, *offset + t) of `dst`.
// Strides are in bytes; `offset` points to one int32 in device memory; `stream` is a cudaStream_t.
// Writes nothing when *offset < 0 or *offset + T > capacity (the host wrapper checks the range when it can).
// Returns nullptr on success, else CUDA's error string.
const char* write_rows(void* dst, const void* src, const int32_t* offset, int64_t B, int64_t T, int64_t capacity,
                       int64_t row_bytes, int64_t dst_bstride, int64_t dst_tstride, int64_t src_bstride,
                       int64_t src_tstride, void* stream);

// Width in bytes (16, 8, 4, 2 or 1) of the loads/stores write_rows uses for these pointers and strides.
int write_rows_vector_bytes(const void* dst, const void* src, int64_t row_bytes, int64_t dst_bstride,
                            int64_t dst_tstride, int64_t src_bstride, int64_t src_tstride);

// cudaRuntimeGetVersion of the runtime linked into the extension (works without a GPU).
int cuda_runtime_version();

}  // namespace dz
