// KV-cache row writes: copy new keys/values [B, T, H, D] into a preallocated cache [B, capacity, H, D] at a row
// offset that is read from device memory (one int32), so the launch does not depend on the offset's value and a
// CUDA graph that captured it stays valid as the offset advances between replays.
//
// The copy is dtype-agnostic: a row is H*D contiguous elements, i.e. row_bytes bytes, so bf16, fp16 and fp32 (and
// anything else) are moved as raw bytes. The widest access that divides the row size, every stride and both base
// addresses is used: 16-byte vector loads/stores when aligned, down to single bytes.
//
// This file is compiled twice: by nvcc into dz_kernels._C (kernels + host launcher), and by NVRTC through
// cupy.RawModule (kernels only). NVRTC cannot open <cstdint> or <cuda_runtime.h>, so the host code is inside
// #ifndef __CUDACC_RTC__ and the kernels use only built-in types (long long, ...) and the struct below.

// 16 bytes moved as one access (nvcc emits ld.global.v4.u32 / st.global.v4.u32 for it).
struct alignas(16) dz_vec16 {
  unsigned long long lo, hi;
};

template <typename Vec>
__device__ __forceinline__ void dz_write_rows_body(Vec* __restrict__ dst, const Vec* __restrict__ src,
                                                   const int* __restrict__ offset, long long B, long long T,
                                                   long long capacity, long long units, long long dst_bstride,
                                                   long long dst_tstride, long long src_bstride,
                                                   long long src_tstride) {
  // units: Vec elements per row; strides in Vec elements.
  const long long off = (long long)(*offset);
  if (off < 0 || off + T > capacity) return;  // out of range: write nothing rather than outside the cache
  const long long rows = B * T;
  const long long row_step = (long long)gridDim.y * blockDim.y;
  const long long unit_step = (long long)gridDim.x * blockDim.x;
  for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += row_step) {
    const long long b = r / T;
    const long long t = r - b * T;
    const Vec* s = src + b * src_bstride + t * src_tstride;
    Vec* d = dst + b * dst_bstride + (off + t) * dst_tstride;
    for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += unit_step) {
      d[u] = s[u];
    }
  }
}

// One entry point per access width, with C linkage so that NVRTC/cupy can find them by plain name.
#define DZ_WRITE_ROWS_KERNEL(NAME, VEC)                                                                   \
  extern "C" __global__ void NAME(VEC* dst, const VEC* src, const int* offset, long long B, long long T,   \
                                  long long capacity, long long units, long long dst_bstride,              \
                                  long long dst_tstride, long long src_bstride, long long src_tstride) {   \
    dz_write_rows_body<VEC>(dst, src, offset, B, T, capacity, units, dst_bstride, dst_tstride, src_bstride, \
                            src_tstride);                                                                  \
  }

DZ_WRITE_ROWS_KERNEL(dz_write_rows_v16, dz_vec16)
DZ_WRITE_ROWS_KERNEL(dz_write_rows_v8, unsigned long long)
DZ_WRITE_ROWS_KERNEL(dz_write_rows_v4, unsigned int)
DZ_WRITE_ROWS_KERNEL(dz_write_rows_v2, unsigned short)
DZ_WRITE_ROWS_KERNEL(dz_write_rows_v1, unsigned char)

#ifndef __CUDACC_RTC__

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kv_cache.h"

namespace dz {

namespace {

// Launch shape shared with the cupy path in dz_kernels/_ext.py (_write_rows_launch_shape): blockDim.x covers a
// row's units (a multiple of 32, at most 256), blockDim.y packs several short rows into one 256-thread block.
void launch_shape(int64_t units, int64_t rows, dim3* grid, dim3* block) {
  const int64_t tx = std::min<int64_t>(256, ((units + 31) / 32) * 32);
  const int64_t ty = 256 / tx;
  const int64_t gx = std::min<int64_t>((units + tx - 1) / tx, 65535);
  const int64_t gy = std::min<int64_t>((rows + ty - 1) / ty, 65535);
  *block = dim3((unsigned)tx, (unsigned)ty, 1);
  *grid = dim3((unsigned)gx, (unsigned)gy, 1);
}

template <typename Vec>
cudaError_t launch(void* dst, const void* src, const int32_t* offset, int64_t B, int64_t T, int64_t capacity,
                   int64_t row_bytes, int64_t dst_bstride, int64_t dst_tstride, int64_t src_bstride,
                   int64_t src_tstride, cudaStream_t stream) {
  const int64_t w = (int64_t)sizeof(Vec);
  const int64_t units = row_bytes / w;
  dim3 grid, block;
  launch_shape(units, B * T, &grid, &block);
  void (*kernel)(Vec*, const Vec*, const int*, long long, long long, long long, long long, long long, long long,
                 long long, long long) = nullptr;
  if constexpr (sizeof(Vec) == 16) kernel = dz_write_rows_v16;
  if constexpr (sizeof(Vec) == 8) kernel = dz_write_rows_v8;
  if constexpr (sizeof(Vec) == 4) kernel = dz_write_rows_v4;
  if constexpr (sizeof(Vec) == 2) kernel = dz_write_rows_v2;
  if constexpr (sizeof(Vec) == 1) kernel = dz_write_rows_v1;
  kernel<<<grid, block, 0, stream>>>(static_cast<Vec*>(dst), static_cast<const Vec*>(src),
                                     reinterpret_cast<const int*>(offset), B, T, capacity, units,
                                     dst_bstride / w, dst_tstride / w, src_bstride / w, src_tstride / w);
  return cudaGetLastError();
}

}  // namespace

int write_rows_vector_bytes(const void* dst, const void* src, int64_t row_bytes, int64_t dst_bstride,
                            int64_t dst_tstride, int64_t src_bstride, int64_t src_tstride) {
  const uint64_t bits = (uint64_t)reinterpret_cast<uintptr_t>(dst) | (uint64_t)reinterpret_cast<uintptr_t>(src) |
                        (uint64_t)row_bytes | (uint64_t)dst_bstride | (uint64_t)dst_tstride |
                        (uint64_t)src_bstride | (uint64_t)src_tstride;
  for (int w = 16; w > 1; w /= 2) {
    if ((bits & (uint64_t)(w - 1)) == 0) return w;
  }
  return 1;
}

const char* write_rows(void* dst, const void* src, const int32_t* offset, int64_t B, int64_t T, int64_t capacity,
                       int64_t row_bytes, int64_t dst_bstride, int64_t dst_tstride, int64_t src_bstride,
                       int64_t src_tstride, void* stream_ptr) {
  if (B <= 0 || T <= 0 || row_bytes <= 0) return nullptr;  // nothing to copy
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err = cudaSuccess;
  switch (write_rows_vector_bytes(dst, src, row_bytes, dst_bstride, dst_tstride, src_bstride, src_tstride)) {
    case 16:
      err = launch<dz_vec16>(dst, src, offset, B, T, capacity, row_bytes, dst_bstride, dst_tstride, src_bstride,
                          src_tstride, stream);
      break;
    case 8:
      err = launch<unsigned long long>(dst, src, offset, B, T, capacity, row_bytes, dst_bstride, dst_tstride,
                                       src_bstride, src_tstride, stream);
      break;
    case 4:
      err = launch<unsigned int>(dst, src, offset, B, T, capacity, row_bytes, dst_bstride, dst_tstride,
                                 src_bstride, src_tstride, stream);
      break;
    case 2:
      err = launch<unsigned short>(dst, src, offset, B, T, capacity, row_bytes, dst_bstride, dst_tstride,
                                   src_bstride, src_tstride, stream);
      break;
    default:
      err = launch<unsigned char>(dst, src, offset, B, T, capacity, row_bytes, dst_bstride, dst_tstride,
                                  src_bstride, src_tstride, stream);
      break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return -1;
  return v;
}

}  // namespace dz

#endif  // __CUDACC_RTC__
