// CUDA kernels of the token log-prob: partial statistics of a vocabulary shard and the gradient
// w.r.t. the shard (contract: ops.h / cuda_ops.h; CPU reference: csrc/cpu/kernels_impl.h).
//
// One block per row (32..256 threads, see row_block_threads). Each thread streams its share of
// the row once, in 16-byte packs when every row is 16-byte aligned (else element by element),
// keeping an online log-sum-exp; the block then merges the threads' summaries with lse_merge,
// the same function that merges tensor-parallel shards.
#include "common.cuh"

namespace scope_kernels {
namespace cuda {
namespace {

using detail::exp2_acc;
using detail::kLog2e;
using detail::load_pack;
using detail::Pack;

// One thread's log-sum-exp of its elements, relative to its running maximum of the raw logits:
// z = sum exp2((x - m) * k) with k = inv_temperature * log2(e), i.e. sum exp((x - m) / T).
template <typename Acc>
struct ThreadLse {
  Acc m = neg_inf<Acc>();
  Acc z = 0;
  Acc check = 0;  // detail::nonfinite_check

  template <typename T, int N>
  __device__ __forceinline__ void add(const Pack<T, N>& pack, Acc k) {
    Acc x[N];
    Acc pack_max = neg_inf<Acc>();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      x[i] = detail::to_acc(pack.e[i]);
      pack_max = fmax(pack_max, x[i]);  // ignores NaN, which `check` catches
      check = detail::nonfinite_check(x[i], check);
    }
    // Rebase on a new maximum (rare after the first packs); from the empty state z stays 0.
    if (pack_max > m) {
      z *= exp2_acc((m - pack_max) * k);
      m = pack_max;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) z += exp2_acc((x[i] - m) * k);
  }
};

template <typename Acc>
struct LseMerge {
  Acc inv_t;
  __device__ __forceinline__ LseStats<Acc> operator()(LseStats<Acc> a, LseStats<Acc> b) const {
    return lse_merge(a, b, inv_t);
  }
};

// N: elements per load (kPackWidth<T> on the aligned path, 1 otherwise).
template <typename T, int N>
__global__ void __launch_bounds__(detail::kMaxBlockThreads, detail::kMinBlocksPerSM<acc_t<T>>)
    logprob_partial_kernel(const LogprobArgs<T> args, acc_t<T>* __restrict__ stats) {
  using Acc = acc_t<T>;
  using L = LogprobStatsLayout;
  __shared__ LseStats<Acc> scratch[detail::kMaxWarps];
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, args.logits.cols);
  const int64_t packs = valid / N;
  const Acc inv_t = args.inv_temperature;
  const Acc k = inv_t * kLog2e<Acc>;
  for (int64_t r = blockIdx.x; r < args.logits.rows; r += gridDim.x) {
    const T* __restrict__ x = args.logits.data + r * args.logits.row_stride;
    ThreadLse<Acc> acc;
    detail::for_each_pack<N>(x, packs, [&](const Pack<T, N>& pack, int64_t) { acc.add(pack, k); });
    for (int64_t j = packs * N + threadIdx.x; j < valid; j += blockDim.x) {
      acc.add(load_pack<T, 1>(x + j), k);
    }
    const bool nonfinite = __syncthreads_or(acc.check != Acc(0));
    const LseStats<Acc> total =
        detail::block_allreduce(LseStats<Acc>{acc.m, acc.z}, LseMerge<Acc>{inv_t}, scratch);
    if (threadIdx.x == 0) {
      const int64_t target = args.target[r];
      int32_t flags = nonfinite ? kFlagNonFiniteFirst : 0;
      if (target < 0 || target >= args.vocab_size) flags |= kFlagTargetOutOfRange;
      const int64_t local = target - args.vocab_start;
      const bool owner = local >= 0 && local < valid;
      Acc* out = stats + r * L::kWidth;
      out[L::kMax] = total.m;
      out[L::kSum] = total.z;
      out[L::kTarget] = owner ? detail::to_acc(x[local]) : Acc(0);
      out[L::kOwner] = owner ? Acc(1) : Acc(0);
      out[L::kFlags] = static_cast<Acc>(flags);
    }
  }
}

// Gradient of one element: g / T * (onehot - p) with log p = (x - m) / T - log_sum, as the CPU
// kernel computes it; zero on padding columns.
template <typename Acc>
struct LogprobGrad {
  Acc g, m, inv_t, log_sum;
  int64_t valid, local;  // local: the target's column, -1 when another shard owns it

  __device__ __forceinline__ Acc operator()(Acc x, int64_t j) const {
    const Acc p = detail::exp_acc((x - m) * inv_t - log_sum);
    const Acc v = j == local ? g * (Acc(1) - p) : -g * p;
    return j < valid ? v : Acc(0);
  }

  // A valid column other than the target's.
  __device__ __forceinline__ Acc other(Acc x) const {
    return -g * detail::exp_acc((x - m) * inv_t - log_sum);
  }
};

template <typename T, int N>
__global__ void __launch_bounds__(detail::kMaxBlockThreads, detail::kMinBlocksPerSM<acc_t<T>>)
    logprob_backward_kernel(const LogprobArgs<T> args, const acc_t<T>* __restrict__ grad_out,
                            const acc_t<T>* __restrict__ row_stats, const MutRows<T> grad) {
  using Acc = acc_t<T>;
  using R = LogprobRowLayout;
  const int64_t cols = args.logits.cols;
  const int64_t packs = cols / N;
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, cols);
  const Acc inv_t = args.inv_temperature;
  for (int64_t r = blockIdx.x; r < args.logits.rows; r += gridDim.x) {
    T* __restrict__ out = grad.data + r * grad.row_stride;
    const Acc g = grad_out[r] * inv_t;
    if (g == Acc(0)) {  // masked tokens: nothing to compute
      detail::zero_row<N>(out, cols);
      continue;
    }
    const T* __restrict__ x = args.logits.data + r * args.logits.row_stride;
    const int64_t local = args.target[r] - args.vocab_start;
    const LogprobGrad<Acc> fn{g,
                              row_stats[r * R::kWidth + R::kMax],
                              inv_t,
                              row_stats[r * R::kWidth + R::kLogSum],
                              valid,
                              local >= 0 && local < valid ? local : -1};
    detail::for_each_pack<N>(x, packs, [&](const Pack<T, N>& in, int64_t p) {
      Acc v[N];
      const int64_t first = p * N;
      if (first + N <= valid && (fn.local < first || fn.local >= first + N)) {  // the usual pack
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = fn.other(detail::to_acc(in.e[i]));
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = fn(detail::to_acc(in.e[i]), first + i);
      }
      detail::store_pack(out + first, detail::pack_from_acc<T, N>(v));
    });
    for (int64_t j = packs * N + threadIdx.x; j < cols; j += blockDim.x) {
      out[j] = detail::from_acc<T>(fn(detail::to_acc(x[j]), j));
    }
  }
}

}  // namespace

template <typename T>
int logprob_partial(const LogprobArgs<T>& args, acc_t<T>* stats, void* stream) {
  const ConstRows<T>& m = args.logits;
  if (m.rows == 0) return 0;
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, m.cols);
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned int blocks = detail::grid_size(m.rows);
  if (detail::rows_aligned(m.data, m.rows, m.row_stride)) {
    constexpr int N = detail::kPackWidth<T>;
    logprob_partial_kernel<T, N>
        <<<blocks, detail::row_block_threads(valid / N), 0, s>>>(args, stats);
  } else {
    logprob_partial_kernel<T, 1><<<blocks, detail::row_block_threads(valid), 0, s>>>(args, stats);
  }
  return detail::launch_status();
}

template <typename T>
int logprob_backward(const LogprobArgs<T>& args, const acc_t<T>* grad_out,
                     const acc_t<T>* row_stats, MutRows<T> grad, void* stream) {
  const ConstRows<T>& m = args.logits;
  if (m.rows == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned int blocks = detail::grid_size(m.rows);
  if (detail::rows_aligned(m.data, m.rows, m.row_stride) &&
      detail::rows_aligned(static_cast<const T*>(grad.data), grad.rows, grad.row_stride)) {
    constexpr int N = detail::kPackWidth<T>;
    logprob_backward_kernel<T, N><<<blocks, detail::row_block_threads(m.cols / N), 0, s>>>(
        args, grad_out, row_stats, grad);
  } else {
    logprob_backward_kernel<T, 1>
        <<<blocks, detail::row_block_threads(m.cols), 0, s>>>(args, grad_out, row_stats, grad);
  }
  return detail::launch_status();
}

#define SCOPE_CUDA_INSTANTIATE_LOGPROB(T)                                                       \
  template int logprob_partial<T>(const LogprobArgs<T>&, acc_t<T>*, void*);                    \
  template int logprob_backward<T>(const LogprobArgs<T>&, const acc_t<T>*, const acc_t<T>*,    \
                                   MutRows<T>, void*);

SCOPE_CUDA_INSTANTIATE_LOGPROB(float)
SCOPE_CUDA_INSTANTIATE_LOGPROB(double)
SCOPE_CUDA_INSTANTIATE_LOGPROB(BFloat16)
SCOPE_CUDA_INSTANTIATE_LOGPROB(Half)

#undef SCOPE_CUDA_INSTANTIATE_LOGPROB

}  // namespace cuda
}  // namespace scope_kernels
