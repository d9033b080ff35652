// Device states on CUDA: the same ops and blob layout as dotllm/kernels/states.py.
//
// One thread a row. Both ops are a handful of loads a row (resolve) or a binary search
// over one state's sorted tokens (advance): the cost that matters is the launches' host
// time in the worker's step. On an H100 host the step's mask work for 256 device-state
// rows took 162 us with these, 206 us with the Triton ops (bench/test_worker_mask.py).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

constexpr int kHeader = 2;  // N, T
constexpr int kThreads = 128;

__global__ void resolve_kernel(const int32_t* __restrict__ buffer,
                               const int32_t* __restrict__ bases,
                               const int32_t* __restrict__ states,
                               const int32_t* __restrict__ state_slots,
                               int32_t* __restrict__ out, const int32_t* __restrict__ positions,
                               int64_t rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const int32_t k = state_slots[i];
  out[positions[i]] = buffer[static_cast<int64_t>(bases[k]) + kHeader + states[k]];
}

template <typename Token>
__global__ void advance_kernel(const int32_t* __restrict__ buffer,
                               const int32_t* __restrict__ bases, int32_t* __restrict__ states,
                               const int32_t* __restrict__ state_slots,
                               const Token* __restrict__ sampled, int64_t sampled_stride,
                               const int32_t* __restrict__ logit_rows, int64_t rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const int32_t k = state_slots[i];
  const int64_t token = static_cast<int64_t>(sampled[logit_rows[i] * sampled_stride]);
  const int64_t base = bases[k];
  const int32_t state = states[k];
  const int64_t n = buffer[base];
  const int64_t count = buffer[base + 1];
  const int64_t at_offsets = base + kHeader + n + state;
  const int64_t at_tokens = base + kHeader + 2 * n + 1;
  int64_t left = buffer[at_offsets];
  const int64_t hi = buffer[at_offsets + 1];
  int64_t right = hi;
  while (left < right) {  // the first of the state's tokens >= token
    const int64_t mid = left + (right - left) / 2;
    if (buffer[at_tokens + mid] < token) {
      left = mid + 1;
    } else {
      right = mid;
    }
  }
  // A token the state does not allow leaves it as it is (the host's accept ends it).
  if (left < hi && buffer[at_tokens + left] == token) states[k] = buffer[at_tokens + count + left];
}

void check_index(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 1 && t.scalar_type() == at::kInt && t.is_contiguous(),
              name, " must be a contiguous 1-D int32 CUDA tensor");
}

unsigned blocks(int64_t rows) { return static_cast<unsigned>((rows + kThreads - 1) / kThreads); }

void resolve(torch::Tensor buffer, torch::Tensor bases, torch::Tensor states,
             torch::Tensor state_slots, torch::Tensor out, torch::Tensor positions) {
  for (const auto* t : {&buffer, &bases, &states, &state_slots, &out, &positions}) {
    check_index(*t, "every argument");
  }
  TORCH_CHECK(positions.numel() == state_slots.numel(), "one position a state slot");
  const int64_t rows = state_slots.numel();
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(buffer.device());
  resolve_kernel<<<blocks(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      buffer.data_ptr<int32_t>(), bases.data_ptr<int32_t>(), states.data_ptr<int32_t>(),
      state_slots.data_ptr<int32_t>(), out.data_ptr<int32_t>(), positions.data_ptr<int32_t>(),
      rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Token>
void launch_advance(const torch::Tensor& buffer, const torch::Tensor& bases,
                    const torch::Tensor& states, const torch::Tensor& state_slots,
                    const torch::Tensor& sampled, const torch::Tensor& logit_rows) {
  const int64_t rows = state_slots.numel();
  advance_kernel<Token><<<blocks(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      buffer.data_ptr<int32_t>(), bases.data_ptr<int32_t>(), states.data_ptr<int32_t>(),
      state_slots.data_ptr<int32_t>(), sampled.data_ptr<Token>(), sampled.stride(0),
      logit_rows.data_ptr<int32_t>(), rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void advance(torch::Tensor buffer, torch::Tensor bases, torch::Tensor states,
             torch::Tensor state_slots, torch::Tensor sampled, torch::Tensor logit_rows) {
  for (const auto* t : {&buffer, &bases, &states, &state_slots, &logit_rows}) {
    check_index(*t, "buffer, bases, states, state slots and logits rows");
  }
  TORCH_CHECK(sampled.is_cuda() && sampled.dim() == 2 && sampled.size(1) >= 1,
              "sampled must be [rows, >= 1] token ids on CUDA");
  TORCH_CHECK(logit_rows.numel() == state_slots.numel(), "one logits row a state slot");
  const int64_t rows = state_slots.numel();
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(buffer.device());
  switch (sampled.scalar_type()) {
    case at::kInt: return launch_advance<int32_t>(buffer, bases, states, state_slots, sampled,
                                                  logit_rows);
    case at::kLong: return launch_advance<int64_t>(buffer, bases, states, state_slots, sampled,
                                                   logit_rows);
    default: TORCH_CHECK(false, "sampled token ids must be int32 or int64");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("resolve", &resolve, "Arena slots of device states' mask rows",
        py::arg("buffer"), py::arg("bases"), py::arg("states"), py::arg("state_slots"),
        py::arg("out"), py::arg("positions"));
  m.def("advance", &advance, "Move device states by the tokens sampled",
        py::arg("buffer"), py::arg("bases"), py::arg("states"), py::arg("state_slots"),
        py::arg("sampled"), py::arg("logit_rows"));
}
