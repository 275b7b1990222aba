// Fused projection epilogue of a DiT self-attention layer, and the KV-cache write alone (CUDA version of
// dz_kernels/kv_cache/triton_kernels.py; same contract, same numerics).
//
// dz_qk_norm_rope_kv_<act>_<cache>: one thread block per token row (b, l) of q, k, v [B, L, C] (C = H * D):
//   q_rot[b, l]          = rope(rmsnorm(q[b, l]) * wq)      (output [B, L, H, D], contiguous)
//   k_cache[b, pos + l]  = rope(rmsnorm(k[b, l]) * wk)
//   v_cache[b, pos + l]  = v[b, l]
// RMSNorm over the full C; RoPE rotates the adjacent pairs (x[2i], x[2i+1]) of each head by the token's fp32
// cos/sin [L, D/2]. `pos` is one int32 in device memory (the launch does not depend on it: CUDA-graph friendly).
// A cache row outside [0, T) is not written. Rounding follows the unfused PyTorch chain: fp32 math, the normalized
// value rounded to the activation dtype before the weight multiply, the product rounded again when the weight has
// the activation dtype (w_f32 == 0), the rotated value rounded to the activation dtype; 1/sqrt(mean + eps) with
// IEEE division and square root. The rotation x0 * c - x1 * s rounds both products (__fmul_rn: nvcc would contract
// it into a fused multiply-add, which near a cancellation can flip the sign of a result torch computes).
// <cache> "fp8": keys and values quantized per (token, head) to E4M3: scale = max(amax, amax_floor) / 448 (fp32,
// stored in k_scale/v_scale [B, T, H]), q = e4m3(clamp(x / scale, -448, 448)) rounded to nearest even; a head
// holding a NaN gets a NaN scale and NaN values (the convention of dz_kernels/_common.py: fmaxf/fminf drop NaN, so
// the amax and the clamp here are written to keep it).
//
// dz_kv_write_<act>_<cache>: rows of k_new, v_new [B, L, H, D] (already rotated) into the cache, converted or
// quantized the same way.
//
// Work split: the block's threads first reduce the sums of squares of the q and k rows; then each warp owns whole
// heads (lanes stride over a head's pairs), so a head's FP8 amax is one warp reduction.
//
// Compiled twice: by nvcc into dz_kernels._C (kernels + the host launchers at the end), and by NVRTC through
// cupy.RawModule (kernels only). NVRTC cannot open <cstdint> or <cuda_runtime.h>: the host code is inside
// #ifndef __CUDACC_RTC__ and the kernels use only built-in types (long long).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace dzqk {

// ---- activation types: load as float, round to the type and back
template <typename T>
struct Act;

template <>
struct Act<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ float round(float x) { return x; }
  static __device__ __forceinline__ void store(float* p, float x) { *p = x; }
};

template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ float round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

template <>
struct Act<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ float round(float x) { return __half2float(__float2half_rn(x)); }
  static __device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
};

// ---- cache element: the activation type itself, or FP8 E4M3 bytes
struct Fp8 {
  unsigned char bits;
};

template <typename T, typename CT>
struct Store {
  static constexpr bool kFp8 = false;
  static __device__ __forceinline__ void put(CT* p, float x, float /*inv*/) { Act<T>::store(p, x); }
};

template <typename T>
struct Store<T, Fp8> {
  static constexpr bool kFp8 = true;
  static __device__ __forceinline__ void put(Fp8* p, float x, float scale) {
    float y = __fdiv_rn(x, scale);
    y = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);  // a NaN compares false and stays NaN (-> 0x7F)
    p->bits = (unsigned char)__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
  }
};

// max that keeps a NaN from either side (fmaxf returns the other operand)
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// max(amax, floor) / 448 with IEEE division; a NaN amax gives a NaN scale
__device__ __forceinline__ float fp8_scale(float amax, float floor) {
  return __fdiv_rn(amax < floor ? floor : amax, 448.0f);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {  // NaN-propagating
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// the rotation of the pair (x0, x1) by (c, s), each product rounded (no fused multiply-add), as torch computes it
__device__ __forceinline__ float rot0(float x0, float x1, float c, float s) {
  return __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
}
__device__ __forceinline__ float rot1(float x0, float x1, float c, float s) {
  return __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// Sums a and b over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the totals.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[32];
  __shared__ float sb[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  a = lane < nw ? sa[lane] : 0.0f;
  b = lane < nw ? sb[lane] : 0.0f;
  a = warp_sum(a);
  b = warp_sum(b);
}

// Normalized, weighted value of element i of a row (the chain's roundings; see the file comment).
template <typename T>
__device__ __forceinline__ float norm_w(const T* x, long long i, float rstd, const void* w, int w_f32) {
  float n = Act<T>::round(Act<T>::load(x + i) * rstd);
  if (w_f32) return n * static_cast<const float*>(w)[i];
  return Act<T>::round(n * Act<T>::load(static_cast<const T*>(w) + i));
}

__device__ __forceinline__ float rstd_of(float ss, int C, float eps) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fdiv_rn(ss, (float)C) + eps));
}

template <typename T, typename CT>
__device__ __forceinline__ void qk_norm_rope_kv_body(
    const T* __restrict__ q, long long sqb, long long sql, const T* __restrict__ k, long long skb, long long skl,
    const T* __restrict__ v, long long svb, long long svl, const void* __restrict__ wq, const void* __restrict__ wk,
    int w_f32, const float* __restrict__ cosp, long long scos, const float* __restrict__ sinp, long long ssin,
    T* __restrict__ q_out, CT* __restrict__ k_cache, CT* __restrict__ v_cache, long long scb, long long sct,
    float* __restrict__ k_scale, float* __restrict__ v_scale, long long ssb, long long sst,
    const int* __restrict__ pos, long long L, long long Tcap, int H, int D, float eps, float amax_floor) {
  const long long row = blockIdx.x;
  const long long b = row / L;
  const long long l = row - b * L;
  const int C = H * D;
  const int half = D / 2;
  const T* qr = q + b * sqb + l * sql;
  const T* kr = k + b * skb + l * skl;
  const T* vr = v + b * svb + l * svl;
  const float* cr = cosp + l * scos;
  const float* sr = sinp + l * ssin;
  T* qo = q_out + row * (long long)C;

  // 1. sums of squares of the q and k rows
  float sq = 0.0f, sk = 0.0f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float a = Act<T>::load(qr + i);
    const float c = Act<T>::load(kr + i);
    sq += a * a;
    sk += c * c;
  }
  block_sum2(sq, sk);
  const float rq = rstd_of(sq, C, eps);
  const float rk = rstd_of(sk, C, eps);

  const long long p0 = (long long)(*pos);
  const bool ok = p0 >= 0 && p0 + L <= Tcap;  // uniform over the block
  CT* kc = k_cache + b * scb + (p0 + l) * sct;
  CT* vc = v_cache + b * scb + (p0 + l) * sct;

  // 2. per head: one warp
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int h = warp; h < H; h += nw) {
    const long long base = (long long)h * D;
    float amax_k = 0.0f, amax_v = 0.0f;
    for (int i = lane; i < half; i += 32) {
      const long long e = base + 2 * i;
      const float c = cr[i], s = sr[i];
      const float y0 = norm_w(qr, e, rq, wq, w_f32), y1 = norm_w(qr, e + 1, rq, wq, w_f32);
      Act<T>::store(qo + e, rot0(y0, y1, c, s));
      Act<T>::store(qo + e + 1, rot1(y0, y1, c, s));
      if (ok) {
        const float z0 = norm_w(kr, e, rk, wk, w_f32), z1 = norm_w(kr, e + 1, rk, wk, w_f32);
        const float r0 = Act<T>::round(rot0(z0, z1, c, s)), r1 = Act<T>::round(rot1(z0, z1, c, s));
        const float v0 = Act<T>::load(vr + e), v1 = Act<T>::load(vr + e + 1);
        if (Store<T, CT>::kFp8) {
          amax_k = max_nan(amax_k, max_nan(fabsf(r0), fabsf(r1)));
          amax_v = max_nan(amax_v, max_nan(fabsf(v0), fabsf(v1)));
        } else {
          Store<T, CT>::put(kc + e, r0, 1.0f);
          Store<T, CT>::put(kc + e + 1, r1, 1.0f);
          Store<T, CT>::put(vc + e, v0, 1.0f);
          Store<T, CT>::put(vc + e + 1, v1, 1.0f);
        }
      }
    }
    if (Store<T, CT>::kFp8 && ok) {
      const float ks = fp8_scale(warp_max(amax_k), amax_floor);
      const float vs = fp8_scale(warp_max(amax_v), amax_floor);
      for (int i = lane; i < half; i += 32) {  // second pass over the head (its loads hit L1)
        const long long e = base + 2 * i;
        const float c = cr[i], s = sr[i];
        const float z0 = norm_w(kr, e, rk, wk, w_f32), z1 = norm_w(kr, e + 1, rk, wk, w_f32);
        Store<T, CT>::put(kc + e, Act<T>::round(rot0(z0, z1, c, s)), ks);
        Store<T, CT>::put(kc + e + 1, Act<T>::round(rot1(z0, z1, c, s)), ks);
        Store<T, CT>::put(vc + e, Act<T>::load(vr + e), vs);
        Store<T, CT>::put(vc + e + 1, Act<T>::load(vr + e + 1), vs);
      }
      if (lane == 0) {
        k_scale[b * ssb + (p0 + l) * sst + h] = ks;
        v_scale[b * ssb + (p0 + l) * sst + h] = vs;
      }
    }
  }
}

template <typename T, typename CT>
__device__ __forceinline__ void kv_write_body(const T* __restrict__ k, long long skb, long long skl, long long skh,
                                              const T* __restrict__ v, long long svb, long long svl, long long svh,
                                              CT* __restrict__ k_cache, CT* __restrict__ v_cache, long long scb,
                                              long long sct, float* __restrict__ k_scale,
                                              float* __restrict__ v_scale, long long ssb, long long sst,
                                              const int* __restrict__ pos, long long L, long long Tcap, int H, int D,
                                              float amax_floor) {
  const long long row = blockIdx.x;
  const long long b = row / L;
  const long long l = row - b * L;
  const long long p0 = (long long)(*pos);
  if (!(p0 >= 0 && p0 + L <= Tcap)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int h = warp; h < H; h += nw) {
    const T* kr = k + b * skb + l * skl + h * skh;
    const T* vr = v + b * svb + l * svl + h * svh;
    CT* kc = k_cache + b * scb + (p0 + l) * sct + (long long)h * D;
    CT* vc = v_cache + b * scb + (p0 + l) * sct + (long long)h * D;
    float ks = 1.0f, vs = 1.0f;
    if (Store<T, CT>::kFp8) {
      float ak = 0.0f, av = 0.0f;
      for (int d = lane; d < D; d += 32) {
        ak = max_nan(ak, fabsf(Act<T>::load(kr + d)));
        av = max_nan(av, fabsf(Act<T>::load(vr + d)));
      }
      ks = fp8_scale(warp_max(ak), amax_floor);
      vs = fp8_scale(warp_max(av), amax_floor);
      if (lane == 0) {
        k_scale[b * ssb + (p0 + l) * sst + h] = ks;
        v_scale[b * ssb + (p0 + l) * sst + h] = vs;
      }
    }
    for (int d = lane; d < D; d += 32) {
      Store<T, CT>::put(kc + d, Act<T>::load(kr + d), ks);
      Store<T, CT>::put(vc + d, Act<T>::load(vr + d), vs);
    }
  }
}

}  // namespace dzqk

// C-linkage entry points (plain names for NVRTC/cupy): activation dtype x cache dtype.
#define DZ_QK_NORM_ROPE_KV_KERNEL(NAME, T, CT)                                                                    \
  extern "C" __global__ void NAME(                                                                              \
      const T* q, long long sqb, long long sql, const T* k, long long skb, long long skl, const T* v,            \
      long long svb, long long svl, const void* wq, const void* wk, int w_f32, const float* cosp,                \
      long long scos, const float* sinp, long long ssin, T* q_out, CT* k_cache, CT* v_cache, long long scb,      \
      long long sct, float* k_scale, float* v_scale, long long ssb, long long sst, const int* pos, long long L,   \
      long long Tcap, int H, int D, float eps, float amax_floor) {                                               \
    dzqk::qk_norm_rope_kv_body<T, CT>(q, sqb, sql, k, skb, skl, v, svb, svl, wq, wk, w_f32, cosp, scos, sinp,   \
                                      ssin, q_out, k_cache, v_cache, scb, sct, k_scale, v_scale, ssb, sst, pos, \
                                      L, Tcap, H, D, eps, amax_floor);                                          \
  }

#define DZ_KV_WRITE_KERNEL(NAME, T, CT)                                                                            \
  extern "C" __global__ void NAME(const T* k, long long skb, long long skl, long long skh, const T* v,           \
                                  long long svb, long long svl, long long svh, CT* k_cache, CT* v_cache,         \
                                  long long scb, long long sct, float* k_scale, float* v_scale, long long ssb,   \
                                  long long sst, const int* pos, long long L, long long Tcap, int H, int D,      \
                                  float amax_floor) {                                                           \
    dzqk::kv_write_body<T, CT>(k, skb, skl, skh, v, svb, svl, svh, k_cache, v_cache, scb, sct, k_scale, v_scale, \
                               ssb, sst, pos, L, Tcap, H, D, amax_floor);                                       \
  }

DZ_QK_NORM_ROPE_KV_KERNEL(dz_qk_norm_rope_kv_f32_f32, float, float)
DZ_QK_NORM_ROPE_KV_KERNEL(dz_qk_norm_rope_kv_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
DZ_QK_NORM_ROPE_KV_KERNEL(dz_qk_norm_rope_kv_f16_f16, __half, __half)
DZ_QK_NORM_ROPE_KV_KERNEL(dz_qk_norm_rope_kv_f32_fp8, float, dzqk::Fp8)
DZ_QK_NORM_ROPE_KV_KERNEL(dz_qk_norm_rope_kv_bf16_fp8, __nv_bfloat16, dzqk::Fp8)
DZ_QK_NORM_ROPE_KV_KERNEL(dz_qk_norm_rope_kv_f16_fp8, __half, dzqk::Fp8)

DZ_KV_WRITE_KERNEL(dz_kv_write_f32_f32, float, float)
DZ_KV_WRITE_KERNEL(dz_kv_write_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
DZ_KV_WRITE_KERNEL(dz_kv_write_f16_f16, __half, __half)
DZ_KV_WRITE_KERNEL(dz_kv_write_f32_fp8, float, dzqk::Fp8)
DZ_KV_WRITE_KERNEL(dz_kv_write_bf16_fp8, __nv_bfloat16, dzqk::Fp8)
DZ_KV_WRITE_KERNEL(dz_kv_write_f16_fp8, __half, dzqk::Fp8)

#ifndef __CUDACC_RTC__

#include <cuda_runtime.h>

#include <cstdint>

#include "qk_norm_rope.h"

namespace dz {

// Threads per block for H heads: one warp per head, at most 8 warps (the cupy path in
// dz_kernels/kv_cache/cuda.py uses the same rule).
int qk_norm_rope_threads(int H) { return 32 * (H < 8 ? (H < 1 ? 1 : H) : 8); }

namespace {

template <typename T, typename CT>
using QkKernel = void (*)(const T*, long long, long long, const T*, long long, long long, const T*, long long,
                          long long, const void*, const void*, int, const float*, long long, const float*, long long,
                          T*, CT*, CT*, long long, long long, float*, float*, long long, long long, const int*,
                          long long, long long, int, int, float, float);

template <typename T, typename CT>
using WriteKernel = void (*)(const T*, long long, long long, long long, const T*, long long, long long, long long,
                             CT*, CT*, long long, long long, float*, float*, long long, long long, const int*,
                             long long, long long, int, int, float);

template <typename T, typename CT>
cudaError_t launch_qk(QkKernel<T, CT> kernel, const void* q, int64_t sqb, int64_t sql, const void* k, int64_t skb,
                      int64_t skl, const void* v, int64_t svb, int64_t svl, const void* wq, const void* wk,
                      int w_f32, const float* cosp, int64_t scos, const float* sinp, int64_t ssin, void* q_out,
                      void* k_cache, void* v_cache, int64_t scb, int64_t sct, float* k_scale, float* v_scale,
                      int64_t ssb, int64_t sst, const int32_t* pos, int64_t B, int64_t L, int64_t Tcap, int H, int D,
                      float eps, float amax_floor, cudaStream_t stream) {
  kernel<<<dim3((unsigned)(B * L)), dim3((unsigned)qk_norm_rope_threads(H)), 0, stream>>>(
      static_cast<const T*>(q), sqb, sql, static_cast<const T*>(k), skb, skl, static_cast<const T*>(v), svb, svl, wq,
      wk, w_f32, cosp, scos, sinp, ssin, static_cast<T*>(q_out), static_cast<CT*>(k_cache),
      static_cast<CT*>(v_cache), scb, sct, k_scale, v_scale, ssb, sst, reinterpret_cast<const int*>(pos), L, Tcap,
      H, D, eps, amax_floor);
  return cudaGetLastError();
}

template <typename T, typename CT>
cudaError_t launch_write(WriteKernel<T, CT> kernel, const void* k, int64_t skb, int64_t skl, int64_t skh,
                         const void* v, int64_t svb, int64_t svl, int64_t svh, void* k_cache, void* v_cache,
                         int64_t scb, int64_t sct, float* k_scale, float* v_scale, int64_t ssb, int64_t sst,
                         const int32_t* pos, int64_t B, int64_t L, int64_t Tcap, int H, int D, float amax_floor,
                         cudaStream_t stream) {
  kernel<<<dim3((unsigned)(B * L)), dim3((unsigned)qk_norm_rope_threads(H)), 0, stream>>>(
      static_cast<const T*>(k), skb, skl, skh, static_cast<const T*>(v), svb, svl, svh, static_cast<CT*>(k_cache),
      static_cast<CT*>(v_cache), scb, sct, k_scale, v_scale, ssb, sst, reinterpret_cast<const int*>(pos), L, Tcap, H,
      D, amax_floor);
  return cudaGetLastError();
}

}  // namespace

// dtype codes: 0 float32, 1 bfloat16, 2 float16; cache_fp8: 0 the cache has the activation dtype, 1 E4M3 bytes.
// Strides in elements. Returns nullptr on success, else an error string (bad code or CUDA's launch error).
const char* qk_norm_rope_kv(int dtype, int cache_fp8, const void* q, int64_t sqb, int64_t sql, const void* k,
                            int64_t skb, int64_t skl, const void* v, int64_t svb, int64_t svl, const void* wq,
                            const void* wk, int w_f32, const float* cosp, int64_t scos, const float* sinp,
                            int64_t ssin, void* q_out, void* k_cache, void* v_cache, int64_t scb, int64_t sct,
                            float* k_scale, float* v_scale, int64_t ssb, int64_t sst, const int32_t* pos, int64_t B,
                            int64_t L, int64_t Tcap, int H, int D, float eps, float amax_floor, void* stream_ptr) {
  if (B <= 0 || L <= 0) return nullptr;
  if (H < 1 || D < 2 || D % 2) return "qk_norm_rope_kv: H must be >= 1 and D even";
  if (B * L > 2147483647LL) return "qk_norm_rope_kv: B * L exceeds the grid limit";
  cudaStream_t s = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err;
#define DZ_QK_ARGS q, sqb, sql, k, skb, skl, v, svb, svl, wq, wk, w_f32, cosp, scos, sinp, ssin, q_out, k_cache, \
                   v_cache, scb, sct, k_scale, v_scale, ssb, sst, pos, B, L, Tcap, H, D, eps, amax_floor, s
  if (dtype == 0 && !cache_fp8) err = launch_qk<float, float>(dz_qk_norm_rope_kv_f32_f32, DZ_QK_ARGS);
  else if (dtype == 1 && !cache_fp8)
    err = launch_qk<__nv_bfloat16, __nv_bfloat16>(dz_qk_norm_rope_kv_bf16_bf16, DZ_QK_ARGS);
  else if (dtype == 2 && !cache_fp8) err = launch_qk<__half, __half>(dz_qk_norm_rope_kv_f16_f16, DZ_QK_ARGS);
  else if (dtype == 0) err = launch_qk<float, dzqk::Fp8>(dz_qk_norm_rope_kv_f32_fp8, DZ_QK_ARGS);
  else if (dtype == 1) err = launch_qk<__nv_bfloat16, dzqk::Fp8>(dz_qk_norm_rope_kv_bf16_fp8, DZ_QK_ARGS);
  else if (dtype == 2) err = launch_qk<__half, dzqk::Fp8>(dz_qk_norm_rope_kv_f16_fp8, DZ_QK_ARGS);
  else return "qk_norm_rope_kv: unknown dtype code (0 float32, 1 bfloat16, 2 float16)";
#undef DZ_QK_ARGS
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* kv_write(int dtype, int cache_fp8, const void* k, int64_t skb, int64_t skl, int64_t skh, const void* v,
                     int64_t svb, int64_t svl, int64_t svh, void* k_cache, void* v_cache, int64_t scb, int64_t sct,
                     float* k_scale, float* v_scale, int64_t ssb, int64_t sst, const int32_t* pos, int64_t B,
                     int64_t L, int64_t Tcap, int H, int D, float amax_floor, void* stream_ptr) {
  if (B <= 0 || L <= 0) return nullptr;
  if (H < 1 || D < 1) return "kv_write: H and D must be >= 1";
  if (B * L > 2147483647LL) return "kv_write: B * L exceeds the grid limit";
  cudaStream_t s = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err;
#define DZ_W_ARGS k, skb, skl, skh, v, svb, svl, svh, k_cache, v_cache, scb, sct, k_scale, v_scale, ssb, sst, pos, B, \
                  L, Tcap, H, D, amax_floor, s
  if (dtype == 0 && !cache_fp8) err = launch_write<float, float>(dz_kv_write_f32_f32, DZ_W_ARGS);
  else if (dtype == 1 && !cache_fp8) err = launch_write<__nv_bfloat16, __nv_bfloat16>(dz_kv_write_bf16_bf16, DZ_W_ARGS);
  else if (dtype == 2 && !cache_fp8) err = launch_write<__half, __half>(dz_kv_write_f16_f16, DZ_W_ARGS);
  else if (dtype == 0) err = launch_write<float, dzqk::Fp8>(dz_kv_write_f32_fp8, DZ_W_ARGS);
  else if (dtype == 1) err = launch_write<__nv_bfloat16, dzqk::Fp8>(dz_kv_write_bf16_fp8, DZ_W_ARGS);
  else if (dtype == 2) err = launch_write<__half, dzqk::Fp8>(dz_kv_write_f16_fp8, DZ_W_ARGS);
  else return "kv_write: unknown dtype code (0 float32, 1 bfloat16, 2 float16)";
#undef DZ_W_ARGS
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace dz

#endif  // __CUDACC_RTC__
