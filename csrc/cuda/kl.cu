// CUDA kernels of the student-teacher KL: partial statistics of a vocabulary shard and the
// gradient w.r.t. the student shard (contract: ops.h / cuda_ops.h; CPU reference:
// csrc/cpu/kernels_impl.h).
//
// One block per row (32..256 threads). Each thread streams its share of both rows once, in
// 16-byte packs when every row of both inputs is 16-byte aligned (else element by element),
// keeping online PairStats; the block merges them with pair_merge, the function that merges
// tensor-parallel shards. The direction is a template parameter: the weighting side of the KL
// (the distribution the expectation is taken under) is the student for reverse KL, the teacher
// for forward KL.
#include "kl_common.cuh"

namespace scope_kernels {
namespace cuda {
namespace {

using detail::exp2_acc;
using detail::kLn2;
using detail::kLog2e;
using detail::load_pack;
using detail::Pack;
using detail::KLGrad;
using detail::pair_aligned;

// One thread's PairStats, relative to its running maxima, in base 2: with dw = (w - m_w) * k_w
// and do = (o - m_o) * k_o (k = inv_temperature * log2 e),
//   z_w = sum 2^dw,  z_o = sum 2^do,  c2 = sum 2^dw * (dw - do),
// so z_w, z_o are the natural sums and the natural cross term is c2 * ln 2 (stats()).
template <typename Acc>
struct ThreadPair {
  Acc m_w = neg_inf<Acc>();
  Acc z_w = 0;
  Acc c2 = 0;
  Acc m_o = neg_inf<Acc>();
  Acc z_o = 0;
  Acc check_w = 0;  // detail::nonfinite_check of each side
  Acc check_o = 0;

  template <typename T, int N>
  __device__ __forceinline__ void add(const Pack<T, N>& w_pack, const Pack<T, N>& o_pack, Acc k_w,
                                      Acc k_o) {
    Acc w[N], o[N];
    Acc max_w = neg_inf<Acc>(), max_o = neg_inf<Acc>();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      w[i] = detail::to_acc(w_pack.e[i]);
      o[i] = detail::to_acc(o_pack.e[i]);
      max_w = fmax(max_w, w[i]);  // ignores NaN, which the checks catch
      max_o = fmax(max_o, o[i]);
      check_w = detail::nonfinite_check(w[i], check_w);
      check_o = detail::nonfinite_check(o[i], check_o);
    }
    if (max_w > m_w || max_o > m_o) {
      const Acc new_w = stats_max(m_w, max_w), new_o = stats_max(m_o, max_o);
      if (z_w > Acc(0)) {  // re-reference the sums to the new maxima (as pair_merge does)
        const Acc shift_w = (m_w - new_w) * k_w, shift_o = (m_o - new_o) * k_o;  // <= 0
        const Acc scale_w = exp2_acc(shift_w);
        c2 = (c2 + z_w * (shift_w - shift_o)) * scale_w;
        z_w *= scale_w;
        z_o *= exp2_acc(shift_o);
      }
      m_w = new_w;
      m_o = new_o;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const Acc dw = (w[i] - m_w) * k_w;
      const Acc d_o = (o[i] - m_o) * k_o;
      const Acc ew = exp2_acc(dw);
      z_w += ew;
      z_o += exp2_acc(d_o);
      c2 += ew * (dw - d_o);
    }
  }

  __device__ __forceinline__ PairStats<Acc> stats() const {
    return PairStats<Acc>{m_w, z_w, c2 * kLn2<Acc>, m_o, z_o};
  }
};

template <typename Acc>
struct PairMerge {
  Acc inv_w, inv_o;
  __device__ __forceinline__ PairStats<Acc> operator()(PairStats<Acc> a, PairStats<Acc> b) const {
    return pair_merge(a, b, inv_w, inv_o);
  }
};

template <typename T, int N, bool kReverse>
__global__ void __launch_bounds__(detail::kMaxBlockThreads, detail::kMinBlocksPerSM<acc_t<T>>)
    kl_partial_kernel(const KLArgs<T> args, acc_t<T>* __restrict__ stats) {
  using Acc = acc_t<T>;
  __shared__ PairStats<Acc> scratch[detail::kMaxWarps];
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, args.student.cols);
  const int64_t packs = valid / N;
  const ConstRows<T>& w_rows = kReverse ? args.student : args.teacher;
  const ConstRows<T>& o_rows = kReverse ? args.teacher : args.student;
  const Acc inv_w = kReverse ? args.inv_temperature_student : args.inv_temperature_teacher;
  const Acc inv_o = kReverse ? args.inv_temperature_teacher : args.inv_temperature_student;
  const Acc k_w = inv_w * kLog2e<Acc>, k_o = inv_o * kLog2e<Acc>;
  for (int64_t r = blockIdx.x; r < args.student.rows; r += gridDim.x) {
    const T* __restrict__ w = w_rows.data + r * w_rows.row_stride;
    const T* __restrict__ o = o_rows.data + r * o_rows.row_stride;
    ThreadPair<Acc> acc;
    detail::for_each_pack_pair<N>(
        w, o, packs,
        [&](const Pack<T, N>& w_pack, const Pack<T, N>& o_pack, int64_t) {
          acc.add(w_pack, o_pack, k_w, k_o);
        });
    for (int64_t j = packs * N + threadIdx.x; j < valid; j += blockDim.x) {
      acc.add(load_pack<T, 1>(w + j), load_pack<T, 1>(o + j), k_w, k_o);
    }
    const bool nonfinite_w = __syncthreads_or(acc.check_w != Acc(0));
    const bool nonfinite_o = __syncthreads_or(acc.check_o != Acc(0));
    const PairStats<Acc> total =
        detail::block_allreduce(acc.stats(), PairMerge<Acc>{inv_w, inv_o}, scratch);
    if (threadIdx.x == 0) {
      const bool nonfinite_student = kReverse ? nonfinite_w : nonfinite_o;
      const bool nonfinite_teacher = kReverse ? nonfinite_o : nonfinite_w;
      const int32_t flags = (nonfinite_student ? kFlagNonFiniteFirst : 0) |
                            (nonfinite_teacher ? kFlagNonFiniteSecond : 0);
      pair_to_kl_stats(total, kReverse, static_cast<Acc>(flags),
                       stats + r * KLStatsLayout::kWidth);
    }
  }
}

// kFixup (kl_backward_fixup): grad already holds the gradient for the upstream gradient
// `expected`; rows where grad_out equals it are skipped, the others rewritten as below, and
// their number added to *mismatches (when not null). Its row scan needs a few more registers:
// one block fewer per SM (only the rare rewritten rows run at that occupancy), and no spills.
template <typename Acc, bool kFixup>
constexpr int kBackwardBlocksPerSM = detail::kMinBlocksPerSM<Acc> - (kFixup ? 1 : 0);

template <typename T, int N, bool kReverse, bool kFixup>
__global__ void __launch_bounds__(detail::kMaxBlockThreads, kBackwardBlocksPerSM<acc_t<T>, kFixup>)
    kl_backward_kernel(const KLArgs<T> args, const acc_t<T>* __restrict__ grad_out,
                       const acc_t<T>* __restrict__ row_stats, const MutRows<T> grad,
                       const acc_t<T>* __restrict__ expected,
                       unsigned long long* __restrict__ mismatches) {
  using Acc = acc_t<T>;
  using R = KLRowLayout;
  const int64_t rows = args.student.rows;
  const int64_t cols = args.student.cols;
  const int64_t packs = cols / N;
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, cols);
  const Acc inv_s = args.inv_temperature_student;
  const Acc inv_t = args.inv_temperature_teacher;
  // The gradient of row r, written by the whole block (no barrier inside).
  const auto backward_row = [&](const int64_t r) {
    T* __restrict__ out = grad.data + r * grad.row_stride;
    const Acc g = grad_out[r] * inv_s;
    if (g == Acc(0)) {  // masked tokens: nothing to compute
      detail::zero_row<N>(out, cols);
      return;
    }
    const T* __restrict__ s = args.student.data + r * args.student.row_stride;
    const T* __restrict__ t = args.teacher.data + r * args.teacher.row_stride;
    const Acc* rs = row_stats + r * R::kWidth;
    const KLGrad<Acc, kReverse> fn{g,
                                   rs[R::kMaxStudent],
                                   inv_s,
                                   rs[R::kLogSumStudent],
                                   rs[R::kMaxTeacher],
                                   inv_t,
                                   rs[R::kLogSumTeacher],
                                   rs[R::kKL],
                                   valid};
    detail::for_each_pack_pair<N>(
        s, t, packs, [&](const Pack<T, N>& s_pack, const Pack<T, N>& t_pack, int64_t p) {
          Acc v[N];
          if ((p + 1) * N <= valid) {  // every column of the pack is valid (all but one pack)
#pragma unroll
            for (int i = 0; i < N; ++i) {
              v[i] = fn.value(detail::to_acc(s_pack.e[i]), detail::to_acc(t_pack.e[i]));
            }
          } else {
#pragma unroll
            for (int i = 0; i < N; ++i) {
              v[i] = fn(detail::to_acc(s_pack.e[i]), detail::to_acc(t_pack.e[i]), p * N + i);
            }
          }
          detail::store_pack(out + p * N, detail::pack_from_acc<T, N>(v));
        });
    for (int64_t j = packs * N + threadIdx.x; j < cols; j += blockDim.x) {
      out[j] = detail::from_acc<T>(fn(detail::to_acc(s[j]), detail::to_acc(t[j]), j));
    }
  };
  if constexpr (!kFixup) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) backward_row(r);
  } else {
    // The block's rows (r = blockIdx.x + i * gridDim.x, as above) are compared blockDim.x at a
    // time, one row per thread: the usual case (every row already right) costs one parallel
    // read per block, not one block per row.
    const int64_t stride = gridDim.x;
    for (int64_t i0 = 0; blockIdx.x + i0 * stride < rows; i0 += blockDim.x) {
      const int64_t mine = blockIdx.x + (i0 + threadIdx.x) * stride;
      const bool differs = mine < rows && !(grad_out[mine] == expected[mine]);
      const int count = __syncthreads_count(differs);
      if (count == 0) continue;
      if (threadIdx.x == 0 && mismatches != nullptr) {
        atomicAdd(mismatches, static_cast<unsigned long long>(count));
      }
      for (int64_t i = i0; i < i0 + blockDim.x; ++i) {
        const int64_t r = blockIdx.x + i * stride;
        if (r >= rows) break;
        if (!(grad_out[r] == expected[r])) backward_row(r);  // the same test in every thread
      }
    }
  }
}

template <typename T, bool kReverse>
void launch_kl_partial(const KLArgs<T>& args, acc_t<T>* stats, cudaStream_t s) {
  const unsigned int blocks = detail::grid_size(args.student.rows);
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, args.student.cols);
  if (pair_aligned(args)) {
    constexpr int N = detail::kPackWidth<T>;
    kl_partial_kernel<T, N, kReverse>
        <<<blocks, detail::row_block_threads(valid / N), 0, s>>>(args, stats);
  } else {
    kl_partial_kernel<T, 1, kReverse>
        <<<blocks, detail::row_block_threads(valid), 0, s>>>(args, stats);
  }
}

template <typename T, bool kReverse, bool kFixup>
void launch_kl_backward(const KLArgs<T>& args, const acc_t<T>* grad_out,
                        const acc_t<T>* row_stats, MutRows<T> grad, const acc_t<T>* expected,
                        unsigned long long* mismatches, cudaStream_t s) {
  constexpr int N = detail::kPackWidth<T>;
  const int64_t cols = args.student.cols;
  const bool packed = pair_aligned(args) &&
                      detail::rows_aligned(static_cast<const T*>(grad.data), grad.rows, grad.row_stride);
  const int threads = detail::row_block_threads(packed ? cols / N : cols);
  unsigned int blocks = detail::grid_size(args.student.rows);
  if constexpr (kFixup) {
    // The blocks resident at once (its launch bounds' count of 256-thread blocks per SM, more
    // for smaller blocks), each scanning its rows in one parallel read: one block per row made
    // this launch 18 us at 16384 rows, all of it block scheduling. The rows a block rewrites
    // stay spread over the grid, which fills the device when every row differs.
    constexpr int kBlocks = kBackwardBlocksPerSM<acc_t<T>, true>;
    const int64_t per_sm = (kBlocks > 0 ? kBlocks : 1) * (detail::kMaxBlockThreads / threads);
    const int64_t cap = per_sm * detail::multiprocessors();
    if (cap > 0 && cap < blocks) blocks = static_cast<unsigned int>(cap);
  }
  if (packed) {
    kl_backward_kernel<T, N, kReverse, kFixup>
        <<<blocks, threads, 0, s>>>(args, grad_out, row_stats, grad, expected, mismatches);
  } else {
    kl_backward_kernel<T, 1, kReverse, kFixup>
        <<<blocks, threads, 0, s>>>(args, grad_out, row_stats, grad, expected, mismatches);
  }
}

}  // namespace

template <typename T>
int kl_partial(const KLArgs<T>& args, acc_t<T>* stats, void* stream) {
  if (args.student.rows == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (args.reverse) {
    launch_kl_partial<T, true>(args, stats, s);
  } else {
    launch_kl_partial<T, false>(args, stats, s);
  }
  return detail::launch_status();
}

template <typename T>
int kl_backward(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* row_stats,
                MutRows<T> grad, void* stream) {
  if (args.student.rows == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (args.reverse) {
    launch_kl_backward<T, true, false>(args, grad_out, row_stats, grad, nullptr, nullptr, s);
  } else {
    launch_kl_backward<T, false, false>(args, grad_out, row_stats, grad, nullptr, nullptr, s);
  }
  return detail::launch_status();
}

template <typename T>
int kl_backward_fixup(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* expected,
                      const acc_t<T>* row_stats, MutRows<T> grad, unsigned long long* mismatches,
                      void* stream) {
  if (args.student.rows == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (args.reverse) {
    launch_kl_backward<T, true, true>(args, grad_out, row_stats, grad, expected, mismatches, s);
  } else {
    launch_kl_backward<T, false, true>(args, grad_out, row_stats, grad, expected, mismatches, s);
  }
  return detail::launch_status();
}

#define SCOPE_CUDA_INSTANTIATE_KL(T)                                                           \
  template int kl_partial<T>(const KLArgs<T>&, acc_t<T>*, void*);                             \
  template int kl_backward<T>(const KLArgs<T>&, const acc_t<T>*, const acc_t<T>*, MutRows<T>, \
                              void*);                                                         \
  template int kl_backward_fixup<T>(const KLArgs<T>&, const acc_t<T>*, const acc_t<T>*,        \
                                    const acc_t<T>*, MutRows<T>, unsigned long long*, void*);

SCOPE_CUDA_INSTANTIATE_KL(float)
SCOPE_CUDA_INSTANTIATE_KL(double)
SCOPE_CUDA_INSTANTIATE_KL(BFloat16)
SCOPE_CUDA_INSTANTIATE_KL(Half)

#undef SCOPE_CUDA_INSTANTIATE_KL

}  // namespace cuda
}  // namespace scope_kernels
