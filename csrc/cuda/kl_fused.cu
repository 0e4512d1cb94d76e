// CUDA kernel of the fused KL: the per-row KL and the weighted gradient w.r.t. the student in
// one pass over the logits, for a shard that holds the whole vocabulary (contract: ops.h
// kl_fused; CPU version: csrc/cpu/kl_fused.cpp).
//
// Why: the two-pass kernels (kl.cu) read both logit rows in the forward and again in the
// backward (10 bytes per bf16 element with the gradient write); when the upstream gradient of
// each row is known before the forward (SCOPE's per-token weights), the gradient can be written
// while the rows are still on chip (6 bytes per element: the one-pass floor).
//
// Design (bytes first): a persistent grid, one row pair per block at a time. Each thread holds
// its share of the current row pair in registers (kFusedPacks 16-byte packs of each row, so a
// 512-thread block holds 512 * 10 * 8 = 40960 bf16 columns: a Qwen vocabulary over 4 ranks),
// while cp.async copies the block's *next* row pair into shared memory behind it. Per row:
//   wait for the copy -> shared to registers -> thread maxima -> issue the next copy ->
//   sums -> block reduction -> KL and row statistics -> gradient from registers -> store.
// Every thread copies, and later reads back, only its own shared-memory slots, so the copy
// needs no block barrier; the maxima consume every loaded register before the next copy
// overwrites those slots (in-order issue), which orders the reuse. The kernel runs 16 warps per
// SM (the registers hold the rows), so it is written for few instructions per element: maxima
// and minima on bf16 / fp16 pairs, the non-finite check from them and the sums (no per-element
// test), masks only on the pack holding the last valid column, paired output conversions.
// Measured on an H100 (benchmarks/NOTES.md): 1.15x the one-pass floor at 16384 x 37984 bf16.
// Registers bound the row length (kFusedMaxThreads * kFusedPacks packs); longer rows, rows that
// are not 16-byte aligned or not a whole number of packs, and float64 take the two-pass kernels
// (kl_fused_on_chip() says which; the torch binding falls back). The gradient must be written
// to 16-byte aligned rows (a fresh contiguous tensor). With SCOPE_CUDA_FUSED_CLUSTER=1 on sm_90,
// rows up to 4x longer (Qwen's full 151936 columns) run on clusters of 4 blocks that split each
// row and merge their statistics through distributed shared memory: written and tested for
// compilation only so far, hence opt-in (benchmarks/NOTES.md).
#include <cooperative_groups.h>

#include <cstdlib>

#include "kl_common.cuh"

namespace scope_kernels {
namespace cuda {
namespace {

using detail::exp2_acc;
using detail::KLGrad;
using detail::kLn2;
using detail::kLog2e;
using detail::Pack;

constexpr int kFusedPacks = 10;
constexpr int kFusedMaxThreads = 512;
constexpr int kFusedMaxWarps = kFusedMaxThreads / detail::kWarpSize;
// Static shared memory of the kernel (reduction slots, cluster exchange slots), at most: the
// launch plan keeps the dynamic buffer within the device's per-block limit minus this.
constexpr size_t kFusedStaticSmemBound = 1024;

// ---- asynchronous global -> shared copies (sm_80+; a plain copy through registers before) ----
__device__ __forceinline__ void copy_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = __ldg(static_cast<const uint4*>(gmem));
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

template <typename T>
__device__ __forceinline__ Pack<T, detail::kPackWidth<T>> as_pack(const uint4& raw) {
  Pack<T, detail::kPackWidth<T>> p;
  memcpy(&p, &raw, sizeof(raw));
  return p;
}

// Warp-level PairStats reduction (every lane gets the warp's total).
template <typename Acc>
__device__ __forceinline__ PairStats<Acc> warp_pair_reduce(PairStats<Acc> v, Acc inv_w, Acc inv_o) {
#pragma unroll
  for (int offset = detail::kWarpSize / 2; offset > 0; offset /= 2) {
    v = pair_merge(v, detail::shfl_xor(v, offset), inv_w, inv_o);
  }
  return v;
}

// Calls f(e) for the elements e of pack p (of N) that are valid columns (< valid_cols): without
// a test per element on every pack but the one holding the last valid column.
template <int N, typename F>
__device__ __forceinline__ void for_valid_elements(int p, int valid_cols, const F& f) {
  if (p * N + N <= valid_cols) {
#pragma unroll
    for (int e = 0; e < N; ++e) f(e);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if (p * N + e < valid_cols) f(e);
    }
  }
}

// Running maximum and minimum of a thread's elements. 16-bit types compare whole packs as
// element pairs (one instruction per two elements, no conversion; NaN is ignored like fmax
// does, and shows in the sums instead); float element by element.
template <typename T>
struct Range {
  using Acc = acc_t<T>;
  Acc hi = neg_inf<Acc>(), lo = -neg_inf<Acc>();
  __device__ __forceinline__ void add_one(Acc x) {
    hi = fmax(hi, x);
    lo = fmin(lo, x);
  }
  __device__ __forceinline__ void add(const uint4& raw) {
    const auto pack = as_pack<T>(raw);
#pragma unroll
    for (int e = 0; e < detail::kPackWidth<T>; ++e) add_one(detail::to_acc(pack.e[e]));
  }
  __device__ __forceinline__ Acc max() const { return hi; }
  // +-Inf among the elements, or NaN (which turns the sum z of exponentials into NaN).
  __device__ __forceinline__ bool nonfinite(Acc z) const {
    return hi == -neg_inf<Acc>() || lo == neg_inf<Acc>() || z != z;
  }
};

template <typename P2, uint32_t kNegInf2, uint32_t kPosInf2>
struct PairRange {
  // Element pairs (__nv_bfloat162 / __half2) as 32-bit words.
  P2 hi, lo;
  float hi_one = neg_inf<float>(), lo_one = -neg_inf<float>();  // the partial pack's elements
  __device__ __forceinline__ PairRange() {
    const uint32_t n = kNegInf2, q = kPosInf2;
    memcpy(&hi, &n, 4);
    memcpy(&lo, &q, 4);
  }
  __device__ __forceinline__ void add_one(float x) {
    hi_one = fmaxf(hi_one, x);
    lo_one = fminf(lo_one, x);
  }
  __device__ __forceinline__ void add(const uint4& raw) {
    P2 w[4];
    memcpy(w, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      hi = __hmax2(hi, w[i]);
      lo = __hmin2(lo, w[i]);
    }
  }
  __device__ __forceinline__ float max() const {
    return fmaxf(hi_one, fmaxf(__low2float(hi), __high2float(hi)));
  }
  __device__ __forceinline__ float min() const {
    return fminf(lo_one, fminf(__low2float(lo), __high2float(lo)));
  }
  __device__ __forceinline__ bool nonfinite(float z) const {
    return max() == -neg_inf<float>() || min() == neg_inf<float>() || z != z;
  }
};

template <>
struct Range<BFloat16> : PairRange<__nv_bfloat162, 0xff80ff80u, 0x7f807f80u> {};
template <>
struct Range<Half> : PairRange<__half2, 0xfc00fc00u, 0x7c007c00u> {};

// Starts copying this thread's packs of row r of both inputs into its shared-memory slots.
template <typename T, int N>
__device__ __forceinline__ void prefetch_row(const KLArgs<T>& args, int64_t r, int packs,
                                             uint4* s_buf, uint4* t_buf) {
  const T* s = args.student.data + r * args.student.row_stride;
  const T* t = args.teacher.data + r * args.teacher.row_stride;
  const int nt = blockDim.x, tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kFusedPacks; ++i) {
    const int p = tid + i * nt;
    if (p < packs) {
      copy_async_16(&s_buf[i * nt + tid], s + static_cast<int64_t>(p) * N);
      copy_async_16(&t_buf[i * nt + tid], t + static_cast<int64_t>(p) * N);
    }
  }
  copy_async_commit();
}

// Merges the block totals of the kCluster blocks of a cluster (distributed shared memory,
// sm_90): every block ends with the same row total and flags, merged in rank order. One cluster
// barrier per row: the slots alternate with the row parity, and a block writes a slot again
// only after the next row's barrier, which every block reaches after its reads.
// broadcast: a shared slot that every thread of the block has read before the call.
template <int kCluster, typename Acc>
__device__ __forceinline__ void cluster_merge(PairStats<Acc>& total, int32_t& flags, int parity,
                                              Acc inv_w, Acc inv_o, PairStats<Acc>* broadcast) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ PairStats<Acc> part[2];
  __shared__ int32_t part_flags[2];
  __shared__ int32_t merged_flags;
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (threadIdx.x == 0) {
    part[parity] = total;
    part_flags[parity] = flags;
  }
  cluster.sync();
  if (threadIdx.x == 0) {
    PairStats<Acc> merged = pair_empty<Acc>();
    int32_t f = 0;
    for (int q = 0; q < kCluster; ++q) {
      merged = pair_merge(merged, *cluster.map_shared_rank(&part[parity], q), inv_w, inv_o);
      f |= *cluster.map_shared_rank(&part_flags[parity], q);
    }
    *broadcast = merged;
    merged_flags = f;
  }
  __syncthreads();
  total = *broadcast;
  flags = merged_flags;
#else
  __trap();  // clusters need sm_90; the launcher never starts this kernel on older devices
#endif
}

// No block of a cluster may exit while another can still read its shared memory.
template <int kCluster>
__device__ __forceinline__ void cluster_exit_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kCluster > 1) cooperative_groups::this_cluster().sync();
#endif
}

// launch: blockDim.x = 32 * 2^k <= kFusedMaxThreads with blockDim.x * kFusedPacks >= the
// packs of a block's columns; dynamic shared memory 2 * slots * blockDim.x * 16 bytes,
// slots = ceil(packs / blockDim.x). kCluster > 1 (sm_90, launched as clusters of kCluster
// blocks): the blocks of a cluster split each row's columns into kCluster contiguous parts and
// merge their statistics through distributed shared memory; rows too long for one block's
// registers (Qwen's 151936 columns at TP=1) then stay on chip too.
template <typename T, bool kReverse, int kCluster>
__global__ void __launch_bounds__(kFusedMaxThreads, 1)
    kl_fused_kernel(const KLArgs<T> args, const acc_t<T>* __restrict__ weight,
                    acc_t<T>* __restrict__ kl_out, acc_t<T>* __restrict__ row_stats,
                    int32_t* __restrict__ flags_out, const MutRows<T> grad, const int slots) {
  using Acc = acc_t<T>;
  using R = KLRowLayout;
  constexpr int N = detail::kPackWidth<T>;
  constexpr int P = kFusedPacks;
  extern __shared__ uint4 buffer[];  // [slots][blockDim.x] student packs, then the teacher's
  // The block reduction's slots (warp totals, then the block's in the last), with the warps'
  // non-finite flags beside them; two sets, alternating with the row parity (see below).
  __shared__ PairStats<Acc> scratch[2][kFusedMaxWarps + 1];
  __shared__ int32_t warp_flags[2][kFusedMaxWarps + 1];
  // with cluster_merge's slots (two PairStats, three int32)
  static_assert(sizeof(scratch) + sizeof(warp_flags) + 2 * sizeof(PairStats<Acc>) + 3 * sizeof(int32_t) <=
                    kFusedStaticSmemBound,
                "kFusedStaticSmemBound must cover the kernel's static shared memory");

  const int nt = blockDim.x;
  const int tid = threadIdx.x;
  const int lane = tid % detail::kWarpSize, warp = tid / detail::kWarpSize;
  const int64_t rows = args.student.rows;
  // This block's columns: packs [first, first + packs) of every row (all of them without a
  // cluster). Pack counts fit in int: at most kCluster * kFusedMaxThreads * kFusedPacks.
  const int all_packs = static_cast<int>(args.student.cols / N);
  const int rank = kCluster > 1 ? static_cast<int>(blockIdx.x % kCluster) : 0;
  const int chunk = (all_packs + kCluster - 1) / kCluster;
  const int first = rank * chunk;
  const int packs = all_packs - first < chunk ? (all_packs > first ? all_packs - first : 0) : chunk;
  // valid columns counted from this block's first column (may be <= 0: all padding)
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, args.student.cols);
  const int valid_cols = static_cast<int>(valid) - first * N;
  const Acc inv_s = args.inv_temperature_student, inv_t = args.inv_temperature_teacher;
  const Acc k_s = inv_s * kLog2e<Acc>, k_t = inv_t * kLog2e<Acc>;
  const Acc inv_w = kReverse ? inv_s : inv_t, inv_o = kReverse ? inv_t : inv_s;
  uint4* const s_buf = buffer;
  uint4* const t_buf = buffer + static_cast<int64_t>(slots) * nt;
  KLArgs<T> part = args;  // this block's columns
  part.student.data += static_cast<int64_t>(first) * N;
  part.teacher.data += static_cast<int64_t>(first) * N;
  const int64_t row_step = gridDim.x / kCluster;
  int parity = 0;  // of the row: selects the reduction slots and the cluster exchange slots

  int64_t r = blockIdx.x / kCluster;
  if (r < rows) prefetch_row<T, N>(part, r, packs, s_buf, t_buf);
  for (; r < rows; r += row_step) {
    copy_async_wait_all();
    // The loops over the packs a thread holds (slot i: pack tid + i * nt) are spelled out: one
    // lambda helper for all four made ptxas spill the sm_80 builds of the cluster kernel.
    uint4 s_reg[P], t_reg[P];
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (tid + i * nt < packs) {
        s_reg[i] = s_buf[i * nt + tid];
        t_reg[i] = t_buf[i * nt + tid];
      }
    }

    // Thread maxima and minima over the valid columns (the minima only for the non-finite check:
    // NaN shows in the sums, +-Inf in the maxima / minima).
    Range<T> range_s, range_t;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int p = tid + i * nt;
      if (p < packs) {
        if (p * N + N <= valid_cols) {
          range_s.add(s_reg[i]);
          range_t.add(t_reg[i]);
        } else {  // the pack with the last valid column
          const auto sp = as_pack<T>(s_reg[i]);
          const auto tp = as_pack<T>(t_reg[i]);
          for_valid_elements<N>(p, valid_cols, [&](int e) {
            range_s.add_one(detail::to_acc(sp.e[e]));
            range_t.add_one(detail::to_acc(tp.e[e]));
          });
        }
      }
    }
    // Every register loaded from the buffer has been consumed: the next copy may overwrite it.
    if (r + row_step < rows) prefetch_row<T, N>(part, r + row_step, packs, s_buf, t_buf);
    const Acc max_s = range_s.max(), max_t = range_t.max();

    // Sums relative to the thread maxima, in base 2 (see ThreadPair in kl.cu).
    Acc z_s = 0, z_t = 0, c2 = 0;
    auto add = [&](Acc s, Acc t) {
      const Acc ds = (s - max_s) * k_s;
      const Acc dt = (t - max_t) * k_t;
      const Acc es = exp2_acc(ds), et = exp2_acc(dt);
      z_s += es;
      z_t += et;
      c2 += kReverse ? es * (ds - dt) : et * (dt - ds);
    };
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int p = tid + i * nt;
      if (p < packs) {
        const auto sp = as_pack<T>(s_reg[i]);
        const auto tp = as_pack<T>(t_reg[i]);
        for_valid_elements<N>(p, valid_cols, [&](int e) {
          add(detail::to_acc(sp.e[e]), detail::to_acc(tp.e[e]));
        });
      }
    }
    const bool bad_s = range_s.nonfinite(z_s), bad_t = range_t.nonfinite(z_t);
    PairStats<Acc> v = kReverse ? PairStats<Acc>{max_s, z_s, c2 * kLn2<Acc>, max_t, z_t}
                                : PairStats<Acc>{max_t, z_t, c2 * kLn2<Acc>, max_s, z_s};

    // Block reduction: warps, then the warp totals in warp 0, the non-finite flags with them
    // (warp votes, no barrier of their own): two barriers per row. The slots alternate with the
    // row parity: a thread's last read of a set (the block total of row r) comes before it
    // reaches row r + 1's first barrier, and row r + 2 writes the set only after that barrier.
    PairStats<Acc>* const partials = scratch[parity];
    int32_t* const partial_flags = warp_flags[parity];
    const bool warp_bad_s = __any_sync(0xffffffffu, bad_s), warp_bad_t = __any_sync(0xffffffffu, bad_t);
    v = warp_pair_reduce(v, inv_w, inv_o);
    if (lane == 0) {
      partials[warp] = v;
      partial_flags[warp] = (warp_bad_s ? kFlagNonFiniteFirst : 0) | (warp_bad_t ? kFlagNonFiniteSecond : 0);
    }
    __syncthreads();
    if (warp == 0) {
      const bool mine = lane < nt / detail::kWarpSize;
      v = mine ? partials[lane] : pair_empty<Acc>();
      const int32_t f = mine ? partial_flags[lane] : 0;
      v = warp_pair_reduce(v, inv_w, inv_o);
      const bool any_s = __any_sync(0xffffffffu, f & kFlagNonFiniteFirst);
      const bool any_t = __any_sync(0xffffffffu, f & kFlagNonFiniteSecond);
      if (lane == 0) {
        partials[kFusedMaxWarps] = v;
        partial_flags[kFusedMaxWarps] = (any_s ? kFlagNonFiniteFirst : 0) | (any_t ? kFlagNonFiniteSecond : 0);
      }
    }
    __syncthreads();
    PairStats<Acc> total = partials[kFusedMaxWarps];
    int32_t flags = partial_flags[kFusedMaxWarps];
    if constexpr (kCluster > 1) {
      cluster_merge<kCluster>(total, flags, parity, inv_w, inv_o, partials + kFusedMaxWarps);
    }
    parity ^= 1;

    const Acc kl = pair_kl(total);
    const Acc m_s = kReverse ? total.m_w : total.m_o, m_t = kReverse ? total.m_o : total.m_w;
    const Acc log_sum_s = stats_log(kReverse ? total.z_w : total.z_o);
    const Acc log_sum_t = stats_log(kReverse ? total.z_o : total.z_w);
    if (tid == 0 && rank == 0) {
      kl_out[r] = flags ? static_cast<Acc>(NAN) : kl;  // as combine_kl_row writes it
      Acc* rs = row_stats + r * R::kWidth;
      rs[R::kKL] = kl;
      rs[R::kMaxStudent] = m_s;
      rs[R::kLogSumStudent] = log_sum_s;
      rs[R::kMaxTeacher] = m_t;
      rs[R::kLogSumTeacher] = log_sum_t;
      flags_out[r] = flags;
    }

    // Gradient from the registers, written once.
    const KLGrad<Acc, kReverse> fn{weight[r] * inv_s, m_s, inv_s, log_sum_s, m_t, inv_t, log_sum_t,
                                   kl, valid};
    T* __restrict__ out = grad.data + r * grad.row_stride + static_cast<int64_t>(first) * N;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int p = tid + i * nt;
      if (p < packs) {
        const auto sp = as_pack<T>(s_reg[i]);
        const auto tp = as_pack<T>(t_reg[i]);
        Acc g[N] = {};  // padding columns keep 0
        for_valid_elements<N>(p, valid_cols, [&](int e) {
          g[e] = fn.value(detail::to_acc(sp.e[e]), detail::to_acc(tp.e[e]));
        });
        detail::store_pack(out + static_cast<int64_t>(p) * N, detail::pack_from_acc<T, N>(g));
      }
    }
  }
  cluster_exit_barrier<kCluster>();
}

// The launch shape of a row of `packs` packs: the smallest block (32..512 threads, powers of
// two) whose registers hold the row, and the shared-memory slots per thread.
struct FusedShape {
  int threads = 0;
  int slots = 0;
  size_t smem = 0;
};

// The smallest block the fused kernel starts from: 32 threads, or SCOPE_CUDA_FUSED_THREADS
// (rounded up to a power of two, at most kFusedMaxThreads; read once). A larger block spreads a
// row over more threads with fewer packs each: at 16384 x 18992 bf16 the default shape is 2
// blocks of 256 threads per SM, 512 gives 1 block of 512 as at 37984 columns (run 4b: 1.28x and
// 1.16x the one-pass floor). For tools/tune_kernels.py to compare them.
inline int fused_min_threads() {
  static const int value = [] {
    const char* env = std::getenv("SCOPE_CUDA_FUSED_THREADS");
    const long long v = env != nullptr ? std::atoll(env) : 0;
    int threads = detail::kWarpSize;
    while (threads < v && threads < kFusedMaxThreads) threads *= 2;
    return threads;
  }();
  return value;
}

inline FusedShape fused_shape(int64_t packs) {
  FusedShape shape;
  int threads = fused_min_threads();
  while (static_cast<int64_t>(threads) * kFusedPacks < packs && threads < kFusedMaxThreads) {
    threads *= 2;
  }
  if (packs < 1 || static_cast<int64_t>(threads) * kFusedPacks < packs) return shape;
  shape.threads = threads;
  shape.slots = static_cast<int>((packs + threads - 1) / threads);
  shape.smem = 2 * static_cast<size_t>(shape.slots) * threads * sizeof(uint4);
  return shape;
}

// Blocks of a cluster when a row is too long for one block: 4 (a quarter of the row each).
constexpr int kFusedCluster = 4;

// Row-splitting clusters are opt-in until they are measured on a GPU:
// SCOPE_CUDA_FUSED_CLUSTER=1 (benchmarks/NOTES.md).
inline bool clusters_enabled() {
  static const bool value = [] {
    const char* env = std::getenv("SCOPE_CUDA_FUSED_CLUSTER");
    return env != nullptr && env[0] == '1';
  }();
  return value;
}

// How a row of `packs` packs runs: on one block, or split over a cluster (cluster = 1 / 4);
// cluster = 0 when it cannot run on chip here.
struct FusedPlan {
  int cluster = 0;
  FusedShape shape;
};

inline FusedPlan fused_plan(int64_t packs) {
  FusedPlan plan;
  const int device = detail::current_device();
  const int optin = detail::device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
  const int major = detail::device_attribute<cudaDevAttrComputeCapabilityMajor>(device);
  if (optin <= static_cast<int>(kFusedStaticSmemBound) || major == 0) {
    return plan;  // the queries failed (or no room): the two-pass kernels run
  }
  // the dynamic buffer plus the kernel's static shared memory within the per-block limit
  const size_t limit = static_cast<size_t>(optin) - kFusedStaticSmemBound;
  const FusedShape one = fused_shape(packs);
  if (one.threads != 0 && one.smem <= limit) {
    plan.cluster = 1;
    plan.shape = one;
  } else if (clusters_enabled() && major >= 9) {
    const FusedShape part = fused_shape((packs + kFusedCluster - 1) / kFusedCluster);
    if (part.threads != 0 && part.smem <= limit) {
      plan.cluster = kFusedCluster;
      plan.shape = part;
    }
  }
  return plan;
}

template <typename T, bool kReverse, int kCluster>
int launch_kl_fused(const KLArgs<T>& args, const acc_t<T>* weight, acc_t<T>* kl,
                    acc_t<T>* row_stats, int32_t* flags, MutRows<T> grad, const FusedShape& shape,
                    cudaStream_t stream) {
  auto kernel = kl_fused_kernel<T, kReverse, kCluster>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t rows = args.student.rows;
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(shape.threads);
  config.dynamicSmemBytes = shape.smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = kCluster;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  // Clusters (single blocks when kCluster == 1) resident at once, asked of the driver at the
  // first launch of this kernel and shape on this device, after raising the kernel's
  // shared-memory limit to this shape's need if it is the largest yet (the limit only ever
  // rises, so a shape found in the cache still fits): later launches take no driver query.
  const auto* key = reinterpret_cast<const void*>(kernel);
  int64_t resident = 0;
  err = detail::cached_residency(
      device, key, shape.threads, shape.smem, &resident, [&](int64_t* out) {
        cudaError_t e = detail::raise_dynamic_smem(device, key, shape.smem);
        if (e != cudaSuccess) return e;
        if constexpr (kCluster == 1) {
          const int sms = detail::device_attribute<cudaDevAttrMultiProcessorCount>(device);
          if (sms == 0) return cudaErrorInvalidDevice;  // not cached: the next launch asks again
          int per_sm = 0;
          e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, shape.threads,
                                                            shape.smem);
          *out = static_cast<int64_t>(per_sm) * sms;
        } else {
          int clusters = 0;
          cudaLaunchConfig_t query = config;
          query.gridDim = dim3(kCluster);
          e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &query);
          *out = clusters;
        }
        return e;
      });
  if (err != cudaSuccess) return static_cast<int>(err);
  if (resident < 1) return static_cast<int>(cudaErrorLaunchOutOfResources);
  const auto blocks = static_cast<unsigned int>((rows < resident ? rows : resident) * kCluster);
  if constexpr (kCluster == 1) {  // a plain launch (the path measured in run 2)
    kernel<<<blocks, shape.threads, shape.smem, stream>>>(args, weight, kl, row_stats, flags, grad,
                                                          shape.slots);
  } else {
    config.gridDim = dim3(blocks);
    err = cudaLaunchKernelEx(&config, kernel, args, weight, kl, row_stats, flags, grad, shape.slots);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return detail::launch_status();
}

template <typename T, bool kReverse>
int launch_kl_fused(const KLArgs<T>& args, const acc_t<T>* weight, acc_t<T>* kl,
                    acc_t<T>* row_stats, int32_t* flags, MutRows<T> grad, const FusedPlan& plan,
                    cudaStream_t stream) {
  if (plan.cluster == kFusedCluster) {
    return launch_kl_fused<T, kReverse, kFusedCluster>(args, weight, kl, row_stats, flags, grad,
                                                         plan.shape, stream);
  }
  return launch_kl_fused<T, kReverse, 1>(args, weight, kl, row_stats, flags, grad, plan.shape, stream);
}

// The plan of a pair of inputs, or cluster = 0 when they cannot run on chip.
template <typename T>
FusedPlan fused_plan(const KLArgs<T>& args) {
  constexpr int N = detail::kPackWidth<T>;
  const int64_t cols = args.student.cols;
  if (cols % N != 0 || !detail::pair_aligned(args)) return FusedPlan{};
  return fused_plan(cols / N);
}

}  // namespace

template <typename T>
bool kl_fused_on_chip(const KLArgs<T>& args) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return false;  // float64 (gradcheck) takes the two-pass kernels
  } else {
    return fused_plan(args).cluster != 0;
  }
}

template <typename T>
int kl_fused(const KLArgs<T>& args, const acc_t<T>* weight, acc_t<T>* kl, acc_t<T>* row_stats,
             int32_t* flags, MutRows<T> grad, void* stream) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return static_cast<int>(cudaErrorNotSupported);
  } else {
    if (args.student.rows == 0) return 0;
    const FusedPlan plan = fused_plan(args);
    if (plan.cluster == 0) return static_cast<int>(cudaErrorNotSupported);
    if (!detail::rows_aligned(static_cast<const T*>(grad.data), grad.rows, grad.row_stride)) {
      return static_cast<int>(cudaErrorMisalignedAddress);
    }
    const auto s = static_cast<cudaStream_t>(stream);
    return args.reverse ? launch_kl_fused<T, true>(args, weight, kl, row_stats, flags, grad, plan, s)
                        : launch_kl_fused<T, false>(args, weight, kl, row_stats, flags, grad, plan, s);
  }
}

#define SCOPE_CUDA_INSTANTIATE_KL_FUSED(T)                                                    \
  template bool kl_fused_on_chip<T>(const KLArgs<T>&);                                        \
  template int kl_fused<T>(const KLArgs<T>&, const acc_t<T>*, acc_t<T>*, acc_t<T>*, int32_t*, \
                           MutRows<T>, void*);

SCOPE_CUDA_INSTANTIATE_KL_FUSED(float)
SCOPE_CUDA_INSTANTIATE_KL_FUSED(double)
SCOPE_CUDA_INSTANTIATE_KL_FUSED(BFloat16)
SCOPE_CUDA_INSTANTIATE_KL_FUSED(Half)

#undef SCOPE_CUDA_INSTANTIATE_KL_FUSED

}  // namespace cuda
}  // namespace scope_kernels
