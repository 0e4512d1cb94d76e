// CUDA kernels on per-row and per-sequence scalars: the combine steps of the log-prob and KL,
// the sequence log-perplexity and the group-normalized weights (contract: ops.h / cuda_ops.h;
// the combine steps share their per-row code with the CPU: softmax_stats.h).
#include "common.cuh"

namespace scope_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Grid of a one-thread-per-item kernel (the kernels loop when items exceed the grid).
inline unsigned int thread_grid(int64_t items) {
  return detail::grid_size((items + kThreads - 1) / kThreads);
}

// ---------------------------------------------------------------------------------------------
// Combine steps: one thread per row, merging the row's statistics over the shards.
// ---------------------------------------------------------------------------------------------
template <typename Acc>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocksPerSM<Acc>)
    logprob_combine_kernel(const Acc* __restrict__ stats, int64_t shards, int64_t rows,
                           Acc inv_temperature, Acc* __restrict__ logprob,
                           Acc* __restrict__ row_stats, int32_t* __restrict__ flags) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    combine_logprob_row(stats, shards, rows, r, inv_temperature, logprob, row_stats, flags);
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocksPerSM<Acc>)
    kl_combine_kernel(const Acc* __restrict__ stats, int64_t shards, int64_t rows, bool reverse,
                      Acc inv_temperature_student, Acc inv_temperature_teacher,
                      Acc* __restrict__ kl, Acc* __restrict__ row_stats,
                      int32_t* __restrict__ flags) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    combine_kl_row(stats, shards, rows, r, reverse, inv_temperature_student,
                   inv_temperature_teacher, kl, row_stats, flags);
  }
}

// ---------------------------------------------------------------------------------------------
// Sequence log-perplexity: one block per sequence.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct SumCount {
  T sum;
  int64_t count;
};

template <typename T>
struct AddSumCount {
  __device__ __forceinline__ SumCount<T> operator()(SumCount<T> a, SumCount<T> b) const {
    return SumCount<T>{a.sum + b.sum, a.count + b.count};
  }
};

__device__ __forceinline__ bool selected(const bool* mask, int64_t i) {
  return mask == nullptr || mask[i];
}

template <typename T>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocksPerSM<T>)
    sequence_logppl_kernel(const T* __restrict__ values, const bool* __restrict__ mask,
                           const int64_t* __restrict__ offsets, int64_t num_seqs,
                           T* __restrict__ log_ppl, int64_t* __restrict__ count) {
  __shared__ SumCount<T> scratch[detail::kMaxWarps];
  for (int64_t s = blockIdx.x; s < num_seqs; s += gridDim.x) {
    SumCount<T> acc{T(0), 0};
    for (int64_t i = offsets[s] + threadIdx.x; i < offsets[s + 1]; i += blockDim.x) {
      if (selected(mask, i)) {
        acc.sum += values[i];
        ++acc.count;
      }
    }
    const SumCount<T> total = detail::block_allreduce(acc, AddSumCount<T>{}, scratch);
    if (threadIdx.x == 0) {
      count[s] = total.count;
      // An empty sequence has no perplexity: NaN here, and the caller reports it.
      log_ppl[s] = total.count > 0 ? -total.sum / static_cast<T>(total.count) : static_cast<T>(NAN);
    }
  }
}

// Writes the tokens of each sequence; positions outside every sequence were zeroed beforehand.
template <typename T>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocksPerSM<T>)
    sequence_logppl_backward_kernel(const T* __restrict__ grad_out, const bool* __restrict__ mask,
                                    const int64_t* __restrict__ offsets,
                                    const int64_t* __restrict__ count, int64_t num_seqs,
                                    T* __restrict__ grad_values) {
  for (int64_t s = blockIdx.x; s < num_seqs; s += gridDim.x) {
    const T coeff = count[s] > 0 ? -grad_out[s] / static_cast<T>(count[s]) : T(0);
    for (int64_t i = offsets[s] + threadIdx.x; i < offsets[s + 1]; i += blockDim.x) {
      grad_values[i] = selected(mask, i) ? coeff : T(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Group-normalized weights: one block per group scanning all n entries (n, the number of
// sequences, is small), a softmax of sign_over_tau * log_ppl over the group's members stabilized
// by their maximum. Non-members were zeroed beforehand.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct MaxCount {
  T max;
  int64_t count;
};

template <typename T>
struct MergeMaxCount {
  __device__ __forceinline__ MaxCount<T> operator()(MaxCount<T> a, MaxCount<T> b) const {
    return MaxCount<T>{stats_max(a.max, b.max), a.count + b.count};
  }
};

template <typename T>
struct Add {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocksPerSM<T>)
    group_weights_kernel(const T* __restrict__ log_ppl, const int64_t* __restrict__ group_index,
                         const bool* __restrict__ member, int64_t n, int64_t num_groups,
                         T sign_over_tau, bool mean_scale, T* __restrict__ out) {
  __shared__ MaxCount<T> max_scratch[detail::kMaxWarps];
  __shared__ T sum_scratch[detail::kMaxWarps];
  // The maximum of sign * log PPL is subtracted before the scaling by 1/tau (as on the CPU):
  // finite for any finite 1/tau.
  const T sign = sign_over_tau < T(0) ? T(-1) : T(1);
  const T inv_tau = sign * sign_over_tau;
  for (int64_t g = blockIdx.x; g < num_groups; g += gridDim.x) {
    MaxCount<T> mc{neg_inf<T>(), 0};
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (member[i] && group_index[i] == g) {
        mc.max = stats_max(mc.max, sign * log_ppl[i]);
        ++mc.count;
      }
    }
    const MaxCount<T> group = detail::block_allreduce(mc, MergeMaxCount<T>{}, max_scratch);
    if (group.count == 0) continue;  // the same on every thread of the block
    T sum = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (member[i] && group_index[i] == g) sum += stats_exp((sign * log_ppl[i] - group.max) * inv_tau);
    }
    const T total = detail::block_allreduce(sum, Add<T>{}, sum_scratch);
    const T scale = mean_scale ? static_cast<T>(group.count) : T(1);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (member[i] && group_index[i] == g) {
        out[i] = stats_exp((sign * log_ppl[i] - group.max) * inv_tau) / total * scale;
      }
    }
  }
}

}  // namespace

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

template <typename Acc>
int logprob_combine(const Acc* stats, int64_t shards, int64_t rows, Acc inv_temperature,
                    Acc* logprob, Acc* row_stats, int32_t* flags, void* stream) {
  if (rows == 0) return 0;
  logprob_combine_kernel<Acc><<<thread_grid(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      stats, shards, rows, inv_temperature, logprob, row_stats, flags);
  return detail::launch_status();
}

template <typename Acc>
int kl_combine(const Acc* stats, int64_t shards, int64_t rows, bool reverse,
               Acc inv_temperature_student, Acc inv_temperature_teacher, Acc* kl, Acc* row_stats,
               int32_t* flags, void* stream) {
  if (rows == 0) return 0;
  kl_combine_kernel<Acc><<<thread_grid(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      stats, shards, rows, reverse, inv_temperature_student, inv_temperature_teacher, kl,
      row_stats, flags);
  return detail::launch_status();
}

template <typename T>
int sequence_logppl(const T* values, const bool* mask, const int64_t* offsets, int64_t num_seqs,
                    T* log_ppl, int64_t* count, void* stream) {
  if (num_seqs == 0) return 0;
  sequence_logppl_kernel<T>
      <<<detail::grid_size(num_seqs), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          values, mask, offsets, num_seqs, log_ppl, count);
  return detail::launch_status();
}

template <typename T>
int sequence_logppl_backward(const T* grad_out, const bool* mask, const int64_t* offsets,
                             const int64_t* count, int64_t num_seqs, int64_t num_values,
                             T* grad_values, void* stream) {
  if (num_values == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  const cudaError_t zeroed = cudaMemsetAsync(grad_values, 0, num_values * sizeof(T), s);
  if (zeroed != cudaSuccess) return static_cast<int>(zeroed);
  if (num_seqs == 0) return 0;
  sequence_logppl_backward_kernel<T><<<detail::grid_size(num_seqs), kThreads, 0, s>>>(
      grad_out, mask, offsets, count, num_seqs, grad_values);
  return detail::launch_status();
}

template <typename T>
int group_weights(const T* log_ppl, const int64_t* group_index, const bool* member, int64_t n,
                  int64_t num_groups, T sign_over_tau, bool mean_scale, T* out, void* stream) {
  if (n == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  const cudaError_t zeroed = cudaMemsetAsync(out, 0, n * sizeof(T), s);
  if (zeroed != cudaSuccess) return static_cast<int>(zeroed);
  if (num_groups == 0) return 0;
  group_weights_kernel<T><<<detail::grid_size(num_groups), kThreads, 0, s>>>(
      log_ppl, group_index, member, n, num_groups, sign_over_tau, mean_scale, out);
  return detail::launch_status();
}

#define SCOPE_CUDA_INSTANTIATE_SCALAR_OPS(Acc)                                                  \
  template int logprob_combine<Acc>(const Acc*, int64_t, int64_t, Acc, Acc*, Acc*, int32_t*,   \
                                    void*);                                                    \
  template int kl_combine<Acc>(const Acc*, int64_t, int64_t, bool, Acc, Acc, Acc*, Acc*,       \
                               int32_t*, void*);                                               \
  template int sequence_logppl<Acc>(const Acc*, const bool*, const int64_t*, int64_t, Acc*,    \
                                    int64_t*, void*);                                          \
  template int sequence_logppl_backward<Acc>(const Acc*, const bool*, const int64_t*,          \
                                             const int64_t*, int64_t, int64_t, Acc*, void*);   \
  template int group_weights<Acc>(const Acc*, const int64_t*, const bool*, int64_t, int64_t,   \
                                  Acc, bool, Acc*, void*);

SCOPE_CUDA_INSTANTIATE_SCALAR_OPS(float)
SCOPE_CUDA_INSTANTIATE_SCALAR_OPS(double)

#undef SCOPE_CUDA_INSTANTIATE_SCALAR_OPS

}  // namespace cuda
}  // namespace scope_kernels
