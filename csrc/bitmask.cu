// Packed-bitmask application on CUDA: the same op and semantics as dotllm/kernels/__init__.py.
//
// One thread owns 8 consecutive logits (one mask byte), and a warp's 32 threads own 256
// contiguous logits, so every access is a coalesced 16-byte vector for bf16/fp16 (two for
// fp32). A byte of 0xFF writes nothing, a byte of 0 is a vector store of -inf, and only a
// mixed byte reads its logits back: the fewest bytes the operation allows.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;  // mask bytes per thread, spaced kThreads apart

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <>
__device__ __forceinline__ __half neg_inf<__half>() { return __ushort_as_half(0xFC00); }
template <>
__device__ __forceinline__ __nv_bfloat16 neg_inf<__nv_bfloat16>() {
  return __ushort_as_bfloat16(0xFF80);
}

// 8 logits as one aligned vector: 16 bytes for 2-byte types, 32 for float.
template <typename T>
struct alignas(8 * sizeof(T)) Vec8 {
  T v[8];
};

template <typename T>
__global__ void apply_bitmask_kernel(T* __restrict__ logits, int64_t logits_stride,
                                     int64_t vocab_size, const int32_t* __restrict__ masks,
                                     int64_t mask_stride, int64_t mask_words,
                                     const int32_t* __restrict__ logit_rows,
                                     const int32_t* __restrict__ mask_rows) {
  const int64_t row = blockIdx.x;
  const int64_t logit_row = logit_rows ? logit_rows[row] : row;
  const int64_t mask_row = mask_rows ? mask_rows[row] : row;
  if (mask_row < 0) return;  // a gathered row of -1 is unconstrained
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(masks + mask_row * mask_stride);
  const int64_t mask_bytes = mask_words * 4;
  T* out = logits + logit_row * logits_stride;
  const bool aligned = (reinterpret_cast<uintptr_t>(out) % sizeof(Vec8<T>)) == 0;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kThreads * kBytesPerThread;

  // Three phases, so that every load is in flight before the first store: mask bytes,
  // then the logits of mixed bytes, then the stores.
  uint8_t bytes[kBytesPerThread];
#pragma unroll
  for (int k = 0; k < kBytesPerThread; ++k) {
    const int64_t b = first + k * kThreads + threadIdx.x;
    bytes[k] = b < mask_bytes ? __ldg(mask + b) : 0;  // past the mask: padded vocab
  }
  Vec8<T> v[kBytesPerThread];
#pragma unroll
  for (int k = 0; k < kBytesPerThread; ++k) {
    const int64_t col = (first + k * kThreads + threadIdx.x) * 8;
    if (aligned && col + 8 <= vocab_size && bytes[k] != 0 && bytes[k] != 0xFF) {
      v[k] = *reinterpret_cast<const Vec8<T>*>(out + col);
    }
  }
#pragma unroll
  for (int k = 0; k < kBytesPerThread; ++k) {
    const int64_t col = (first + k * kThreads + threadIdx.x) * 8;
    const uint8_t byte = bytes[k];
    if (col >= vocab_size || byte == 0xFF) continue;
    if (aligned && col + 8 <= vocab_size) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (!((byte >> j) & 1)) v[k].v[j] = neg_inf<T>();
      }
      *reinterpret_cast<Vec8<T>*>(out + col) = v[k];
    } else {
      for (int j = 0; j < 8 && col + j < vocab_size; ++j) {
        if (!((byte >> j) & 1)) out[col + j] = neg_inf<T>();
      }
    }
  }
}

template <typename T>
void launch(const torch::Tensor& logits, const torch::Tensor& masks, int64_t rows,
            const int32_t* logit_rows, const int32_t* mask_rows) {
  const int64_t vocab_size = logits.size(1);
  const int64_t per_block = kThreads * kBytesPerThread * 8;  // logits per block
  const dim3 grid(rows, (vocab_size + per_block - 1) / per_block);
  apply_bitmask_kernel<T><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<T*>(logits.data_ptr()), logits.stride(0), vocab_size,
      masks.data_ptr<int32_t>(), masks.stride(0), masks.size(1), logit_rows, mask_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply(torch::Tensor logits, torch::Tensor masks, c10::optional<torch::Tensor> logit_rows,
           c10::optional<torch::Tensor> mask_rows) {
  TORCH_CHECK(logits.is_cuda() && masks.is_cuda(), "logits and bitmask must be on CUDA");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [batch, vocab]");
  TORCH_CHECK(masks.dim() == 2 && masks.stride(1) == 1 && masks.scalar_type() == at::kInt,
              "bitmask must be int32 [rows, words]");
  const int64_t rows = logit_rows ? logit_rows->numel()
                       : mask_rows ? mask_rows->numel() : masks.size(0);
  if (rows == 0 || logits.size(1) == 0) return;
  TORCH_CHECK(logits.size(1) <= int64_t{65535} * kThreads * kBytesPerThread * 8,
              "vocabulary too wide");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int32_t* lr = logit_rows ? logit_rows->data_ptr<int32_t>() : nullptr;
  const int32_t* mr = mask_rows ? mask_rows->data_ptr<int32_t>() : nullptr;
  switch (logits.scalar_type()) {
    case at::kFloat: return launch<float>(logits, masks, rows, lr, mr);
    case at::kHalf: return launch<__half>(logits, masks, rows, lr, mr);
    case at::kBFloat16: return launch<__nv_bfloat16>(logits, masks, rows, lr, mr);
    default: TORCH_CHECK(false, "logits must be float32, float16 or bfloat16");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &apply, "Apply packed token bitmasks to logits in place",
        py::arg("logits"), py::arg("masks"), py::arg("logit_rows"), py::arg("mask_rows"));
}
