// Helpers shared by the CPU and CUDA op implementations: dtype dispatch, tensor -> kernel views,
// and the checks every entry point makes (the Python layer gives friendlier errors first; these
// guard direct torch.ops calls).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "scope_kernels/ops.h"

namespace scope_megatron {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the kernel element type of a logits dtype.
template <typename Fn>
void dispatch_logits_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(TypeTag<float>{});
      break;
    case at::kDouble:
      fn(TypeTag<double>{});
      break;
    case at::kBFloat16:
      fn(TypeTag<scope_kernels::BFloat16>{});
      break;
    case at::kHalf:
      fn(TypeTag<scope_kernels::Half>{});
      break;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, bfloat16, float16 or float64, got ", dtype);
  }
}

// Calls fn(TypeTag<Acc>{}) for an accumulation dtype (float32 or float64).
template <typename Fn>
void dispatch_acc_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(TypeTag<float>{});
      break;
    case at::kDouble:
      fn(TypeTag<double>{});
      break;
    default:
      TORCH_CHECK(false, op, ": expected a float32 or float64 tensor, got ", dtype);
  }
}

// Accumulation dtype for a logits dtype.
inline at::ScalarType acc_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
scope_kernels::ConstRows<T> const_rows(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.const_data_ptr()), t.size(0), t.size(1), t.stride(0)};
}

template <typename T>
scope_kernels::MutRows<T> mut_rows(at::Tensor& t) {
  return {reinterpret_cast<T*>(t.mutable_data_ptr()), t.size(0), t.size(1), t.stride(0)};
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// [rows, cols] logits with contiguous columns (rows may be strided).
inline void check_logits(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [tokens, vocab_shard], got shape ",
              t.sizes());
  TORCH_CHECK(t.size(1) == 0 || t.stride(1) == 1, op, ": ", name,
              " must have contiguous columns (stride(1) == 1)");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), op, ": ", name,
              " rows must not overlap");
}

inline void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* op,
                         const char* name, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
}

inline void check_row_stats(const at::Tensor& t, int64_t rows, int64_t width,
                            at::ScalarType dtype, const char* op, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == width && t.is_contiguous(), op,
              ": row_stats must be a contiguous [", rows, ", ", width, "] tensor, got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": row_stats must be ", dtype);
  TORCH_CHECK(t.device() == device, op, ": row_stats is on ", t.device(), ", expected ", device);
}

inline void check_vocab(int64_t vocab_start, int64_t vocab_size, const char* op) {
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  TORCH_CHECK(vocab_size > 0, op, ": vocab_size must be > 0, got ", vocab_size);
}

inline void check_stats(const at::Tensor& stats, int64_t width, const char* op) {
  TORCH_CHECK(stats.dim() == 3 && stats.size(2) == width, op,
              ": stats must have shape [shards, rows, ", width, "], got ", stats.sizes());
  TORCH_CHECK(stats.size(0) >= 1, op, ": stats need at least one shard");
  TORCH_CHECK(stats.is_contiguous(), op, ": stats must be contiguous");
}

inline void check_kl_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op) {
  check_logits(student, op, "student_logits");
  check_logits(teacher, op, "teacher_logits");
  TORCH_CHECK(student.sizes() == teacher.sizes(), op,
              ": student and teacher logits must have the same shape, got ", student.sizes(),
              " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op,
              ": student and teacher logits must have the same dtype, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(), op,
              ": student and teacher logits must be on the same device, got ", student.device(),
              " and ", teacher.device());
}

// Grain for at::parallel_for over rows: at least ~32K elements per task.
inline int64_t row_grain(int64_t cols) {
  const int64_t g = 32768 / (cols > 0 ? cols : 1);
  return g > 0 ? g : 1;
}

// Offsets [seqs + 1] describing which values belong to each sequence.
inline void check_segments(const at::Tensor& values, const c10::optional<at::Tensor>& mask,
                           const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), op,
              ": values must be a contiguous 1-D tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous(),
              op, ": offsets must be a contiguous int64 tensor of shape [sequences + 1]");
  if (mask.has_value()) {
    check_vector(*mask, values.size(0), at::kBool, op, "mask", values.device());
  }
  TORCH_CHECK(offsets.device() == values.device(), op, ": offsets must be on ", values.device());
}

}  // namespace scope_megatron
