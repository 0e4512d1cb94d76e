// Device-side building blocks shared by the CUDA kernels: element conversions, 16-byte packed
// loads and stores, block reductions and launch shapes.
//
// Pure CUDA C++ (no torch headers). types.h defines its element conversions for the host only;
// the device versions here use the cuda_fp16 / cuda_bf16 intrinsics, which stay available when
// torch's build defines __CUDA_NO_HALF_CONVERSIONS__ and friends.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <type_traits>

#include "scope_kernels/cuda_ops.h"

namespace scope_kernels {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Element conversions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(BFloat16 x) {
  return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
__device__ __forceinline__ float to_acc(Half x) { return __half2float(__ushort_as_half(x.bits)); }

// Accumulated value -> element, rounding to nearest even (NaN stays NaN), as the CPU kernels do.
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ BFloat16 from_acc<BFloat16>(float v) {
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
}
template <>
__device__ __forceinline__ Half from_acc<Half>(float v) {
  return Half{__half_as_ushort(__float2half_rn(v))};
}

// ---------------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------------
template <typename Acc>
constexpr Acc kLog2e = Acc(1.4426950408889634074);
template <typename Acc>
constexpr Acc kLn2 = Acc(0.6931471805599453094);

// 2^x. In float this is one MUFU.EX2 (ex2.approx.ftz: results below 2^-126 flush to 0, which
// spares the denormal scaling exp2f adds around it; such terms are below float32 resolution of
// every sum they enter), far cheaper than expf's range reduction. The kernels evaluate exp(d) as exp2(d * log2 e) (the partial kernels fold log2 e
// into their scale factors): the extra rounding of the argument is a relative error of about
// |d| * 2^-24 on exp(d), negligible wherever exp(d) matters (d near 0) and far below the
// float32 tolerances elsewhere. float64 (gradcheck) uses the accurate exp2.
__device__ __forceinline__ float exp2_acc(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }

template <typename Acc>
__device__ __forceinline__ Acc exp_acc(Acc x) {
  return exp2_acc(x * kLog2e<Acc>);
}

// check = nonfinite_check(x, check) stays exactly 0 while every x is finite and becomes NaN for
// good after a NaN or +-Inf (x * 0 is NaN for those): one FMA per element.
template <typename Acc>
__device__ __forceinline__ Acc nonfinite_check(Acc x, Acc check) {
  return fma(x, Acc(0), check);
}

// ---------------------------------------------------------------------------------------------
// Packed (16-byte) loads and stores
// ---------------------------------------------------------------------------------------------
// Elements per 16-byte access: 8 bf16 / fp16, 4 float, 2 double.
template <typename T>
constexpr int kPackWidth = 16 / static_cast<int>(sizeof(T));

// N consecutive elements. N == kPackWidth<T> moves as one 16-byte access (the address must be
// 16-byte aligned); N == 1 is the scalar path for rows that are not aligned.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T e[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  Pack<T, N> out;
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, sizeof(raw));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out.e[i] = p[i];
  }
  return out;
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    uint4 raw;
    memcpy(&raw, &v, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = v.e[i];
  }
}

// N accumulated values -> a pack of elements, rounding to nearest even: two at a time with the
// paired conversions (one instruction per pair) for bf16 / fp16.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> pack_from_acc(const acc_t<T> (&v)[N]) {
  Pack<T, N> out;
  if constexpr (N % 2 == 0 && std::is_same<T, BFloat16>::value) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(v[i], v[i + 1]);
      memcpy(&out.e[i], &pair, sizeof(pair));
    }
  } else if constexpr (N % 2 == 0 && std::is_same<T, Half>::value) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const __half2 pair = __floats2half2_rn(v[i], v[i + 1]);
      memcpy(&out.e[i], &pair, sizeof(pair));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out.e[i] = from_acc<T>(v[i]);
  }
  return out;
}

// Row traversals: visit(...) is called for this thread's packs p = threadIdx.x + i * blockDim.x
// < packs of a row. Each thread keeps two 16-byte loads in flight (a streaming kernel needs tens
// of KB in flight per SM to cover the memory latency): one row is read two packs at a time, two
// rows (student and teacher) one pack of each at a time.
template <int N, typename T, typename Visit>
__device__ __forceinline__ void for_each_pack(const T* __restrict__ row, int64_t packs,
                                              const Visit& visit) {
  const int64_t stride = blockDim.x;
  int64_t p = threadIdx.x;
  for (; p + stride < packs; p += 2 * stride) {
    const Pack<T, N> a = load_pack<T, N>(row + p * N);
    const Pack<T, N> b = load_pack<T, N>(row + (p + stride) * N);
    visit(a, p);
    visit(b, p + stride);
  }
  if (p < packs) visit(load_pack<T, N>(row + p * N), p);
}

template <int N, typename T, typename Visit>
__device__ __forceinline__ void for_each_pack_pair(const T* __restrict__ row_a,
                                                   const T* __restrict__ row_b, int64_t packs,
                                                   const Visit& visit) {
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    visit(load_pack<T, N>(row_a + p * N), load_pack<T, N>(row_b + p * N), p);
  }
}

// Zeroes a row of `cols` elements with the block's threads (packs of N when N > 1, which then
// requires the row to be 16-byte aligned).
template <int N, typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ out, int64_t cols) {
  Pack<T, N> zeros;
#pragma unroll
  for (int i = 0; i < N; ++i) zeros.e[i] = from_acc<T>(acc_t<T>(0));
  const int64_t packs = cols / N;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) store_pack(out + p * N, zeros);
  for (int64_t j = packs * N + threadIdx.x; j < cols; j += blockDim.x) out[j] = zeros.e[0];
}

// True when every row of a [rows, *] matrix starts on a 16-byte boundary, so that the kernels
// may use the packed path.
template <typename T>
inline bool rows_aligned(const T* data, int64_t rows, int64_t row_stride) {
  const bool base = reinterpret_cast<uintptr_t>(data) % 16 == 0;
  const bool stride = rows <= 1 || (row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  return base && stride;
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 256;
constexpr int kMaxWarps = kMaxBlockThreads / kWarpSize;
// Minimum resident 256-thread blocks per SM promised in the kernels' __launch_bounds__, by
// accumulation type (ptxas derives its register budget from it; the thread bound alone lets
// it cap 256-thread kernels at 64 registers, where the float64 kernels spill).
//   float32 accumulation: 6 blocks = at most 40 registers, 3/4 occupancy, enough loads in
//     flight for the streaming row kernels;
//   float64 (used by gradcheck, register pairs): 2 blocks = at most 128 registers, no spills.
template <typename Acc>
constexpr int kMinBlocksPerSM = sizeof(Acc) == sizeof(double) ? 2 : 6;

// Shuffles any trivially copyable value of whole 32-bit words (the statistics structs), one
// word at a time with shuffle(word).
template <typename S, typename Shuffle>
__device__ __forceinline__ S shuffle_words(const S& v, const Shuffle& shuffle) {
  static_assert(sizeof(S) % 4 == 0, "shuffled values must consist of 32-bit words");
  constexpr int kWords = sizeof(S) / 4;
  uint32_t w[kWords];
  memcpy(w, &v, sizeof(S));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = shuffle(w[i]);
  S out;
  memcpy(&out, w, sizeof(S));
  return out;
}

template <typename S>
__device__ __forceinline__ S shfl_xor(const S& v, int lane_mask) {
  return shuffle_words(v, [lane_mask](uint32_t w) { return __shfl_xor_sync(0xffffffffu, w, lane_mask); });
}

template <typename S>
__device__ __forceinline__ S shfl_down(const S& v, int delta) {
  return shuffle_words(v, [delta](uint32_t w) { return __shfl_down_sync(0xffffffffu, w, delta); });
}

// Reduces one value per thread with merge(a, b) and returns the block's total to every thread
// (the same value on all of them). Each warp reduces its values with shuffles, then warp 0
// merges the warp totals (a tree: log2(warps) merges instead of one per warp on every thread).
// blockDim.x must be a multiple of 32 and at most 32 * 32; scratch is a __shared__ array of
// blockDim.x / 32 values. Safe to call repeatedly with the same scratch (it synchronizes first).
template <typename S, typename Merge>
__device__ __forceinline__ S block_allreduce(S v, const Merge& merge, S* scratch) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = merge(v, shfl_xor(v, offset));
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warps > 1 && warp == 0) {
    S w = scratch[lane < warps ? lane : 0];
    // shuffle-down tree over the first `warps` lanes: lane 0 ends with the total
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const S other = shfl_down(w, offset);
      if (offset < warps && lane + offset < warps) w = merge(w, other);
    }
    __syncwarp();  // every lane of warp 0 has read scratch before lane 0 overwrites it
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

// ---------------------------------------------------------------------------------------------
// Launch shapes
// ---------------------------------------------------------------------------------------------
// Blocks of a grid with one block (or thread) per item, looping when there are more items than
// a grid can have blocks (gridDim.x <= 2^31 - 1).
inline unsigned int grid_size(int64_t items) {
  constexpr int64_t kMaxGrid = 0x7fffffff;
  return static_cast<unsigned int>(items < kMaxGrid ? items : kMaxGrid);
}

// The current device (or -1, the error cleared: the next launch check must not report it).
inline int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return device;
}

// An attribute of a device that does not change while the process runs (multiprocessors,
// shared memory per block, compute capability), asked of the driver once per device and
// attribute: launchers read them on every call. 0 if the query fails (the error cleared) or
// the value is not positive.
template <cudaDeviceAttr kAttr>
inline int device_attribute(int device) {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices] = {};
  const bool cacheable = device >= 0 && device < kDevices;
  if (cacheable) {
    const int cached = known[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  if (device < 0 || cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (value <= 0) return 0;
  if (cacheable) known[device].store(value, std::memory_order_relaxed);
  return value;
}

// The current device's multiprocessor count (0 if the query fails: callers then fall back to a
// grid of one block per item).
inline int64_t multiprocessors() {
  return device_attribute<cudaDevAttrMultiProcessorCount>(current_device());
}

// The dynamic shared memory a kernel may ask for on a device is one limit per function
// (cudaFuncAttributeMaxDynamicSharedMemorySize), not one per launch shape: it is only ever
// raised here, to the largest `smem` seen for (device, kernel), so that a shape cached earlier
// still fits after a smaller one. Thread-safe.
inline cudaError_t raise_dynamic_smem(int device, const void* kernel, size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> limit;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = limit[{device, kernel}];
  if (smem <= current) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess) current = smem;
  return err;
}

// A launch shape's residency (blocks or clusters resident at once on the device), computed by
// compute(int64_t* out) -> cudaError_t at the first call for (device, kernel, threads, smem) and
// cached after it succeeded: the driver's occupancy queries cost microseconds of host time per
// launch otherwise. Thread-safe; compute runs under the lock (first launches only).
template <typename Compute>
cudaError_t cached_residency(int device, const void* kernel, int threads, size_t smem,
                             int64_t* resident, const Compute& compute) {
  using Key = std::tuple<int, const void*, int, size_t>;
  static std::mutex mutex;
  static std::map<Key, int64_t> known;
  const Key key{device, kernel, threads, smem};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) {
    *resident = found->second;
    return cudaSuccess;
  }
  const cudaError_t err = compute(resident);
  if (err == cudaSuccess) known.emplace(key, *resident);
  return err;
}

// Packs of a row per warp of a one-block-per-row kernel. Fewer threads per row means fewer
// block reductions per element (each costs a few hundred instructions per thread and two
// barriers) and a smaller partial last round; more threads, more rows in flight per SM.
// SCOPE_CUDA_PACKS_PER_WARP overrides the default (read once; for tuning: tools/tune_kernels.py).
inline int64_t packs_per_warp() {
  static const int64_t value = [] {
    const char* env = std::getenv("SCOPE_CUDA_PACKS_PER_WARP");
    const long long v = env != nullptr ? std::atoll(env) : 0;
    return v > 0 ? static_cast<int64_t>(v) : int64_t{4 * kWarpSize};
  }();
  return value;
}

// Threads of a one-block-per-row kernel whose rows hold `work` packs: a warp per
// packs_per_warp() packs, from one warp up to kMaxBlockThreads. Short rows thus do not leave
// most of a 256-thread block idle.
inline int row_block_threads(int64_t work) {
  const int64_t per_warp = packs_per_warp();
  const int64_t warps = (work + per_warp - 1) / per_warp;
  return kWarpSize * static_cast<int>(warps < 1 ? 1 : (warps > kMaxWarps ? kMaxWarps : warps));
}

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace detail
}  // namespace cuda
}  // namespace scope_kernels
