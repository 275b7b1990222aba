// Host entry points of csrc/qk_norm_rope.cu (see that file): the fused q/k RMSNorm + RoPE + KV-cache write, and the
// plain (optionally FP8-quantizing) KV-cache write. Pointers are device addresses, strides are in elements, and
// each returns nullptr on success or an error string.
#pragma once
#include <cstdint>

namespace dz {
const char* qk_norm_rope_kv(int dtype, int cache_fp8, const void* q, int64_t sqb, int64_t sql, const void* k,
                            int64_t skb, int64_t skl, const void* v, int64_t svb, int64_t svl, const void* wq,
                            const void* wk, int w_f32, const float* cosp, int64_t scos, const float* sinp,
                            int64_t ssin, void* q_out, void* k_cache, void* v_cache, int64_t scb, int64_t sct,
                            float* k_scale, float* v_scale, int64_t ssb, int64_t sst, const int32_t* pos, int64_t B,
                            int64_t L, int64_t Tcap, int H, int D, float eps, float amax_floor, void* stream);
const char* kv_write(int dtype, int cache_fp8, const void* k, int64_t skb, int64_t skl, int64_t skh, const void* v,
                     int64_t svb, int64_t svl, int64_t svh, void* k_cache, void* v_cache, int64_t scb, int64_t sct,
                     float* k_scale, float* v_scale, int64_t ssb, int64_t sst, const int32_t* pos, int64_t B,
                     int64_t L, int64_t Tcap, int H, int D, float amax_floor, void* stream);
}  // namespace dz
