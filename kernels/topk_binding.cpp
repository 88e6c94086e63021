// torch binding of the segmented top-k mask kernel (kernels/segmented_topk.cu).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <climits>
#include <cstdint>
#include <vector>

extern "C" size_t slt_topk_workspace_bytes(int64_t num_segments, int64_t num_chunks);
extern "C" int slt_topk_launch(const void* values, int dtype, const int64_t* offsets,
                               const int64_t* ks, int num_segments, const int64_t* chunks,
                               int num_chunks, const int64_t* seg_chunks, void* workspace,
                               bool* mask, int* error, cudaStream_t stream);

// Returns {mask (bool, like values), error flag (int32[1], 1 when a value is not finite)}.
// The tables come from slt/cuda_topk.py's segment_tables. Segment and chunk counts past int
// are refused here; segments of 2^32 values or more (the kernel counts in uint32) cannot be
// seen here, with the offsets on the device: slt.topk sends those layouts to the torch path.
std::vector<torch::Tensor> segmented_topk_mask(const torch::Tensor& values,
                                               const torch::Tensor& offsets,
                                               const torch::Tensor& ks,
                                               const torch::Tensor& chunks,
                                               const torch::Tensor& seg_chunks) {
  TORCH_CHECK(values.is_cuda() && values.dim() == 1 && values.is_contiguous(),
              "values must be a contiguous 1-D CUDA tensor");
  for (const auto* t : {&offsets, &ks, &chunks, &seg_chunks}) {
    TORCH_CHECK(t->is_cuda() && t->device() == values.device() &&
                    t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->dim() == 1,
                "segment tables must be contiguous 1-D int64 tensors on the values' device");
  }
  TORCH_CHECK(ks.numel() <= INT_MAX && chunks.numel() / 3 <= INT_MAX,
              "too many segments or chunks for the kernel's int grid sizes");
  TORCH_CHECK(offsets.numel() == ks.numel() + 1 && seg_chunks.numel() == ks.numel() + 1 &&
                  chunks.numel() % 3 == 0,
              "segment tables of inconsistent sizes");
  int dtype = -1;
  switch (values.scalar_type()) {
    case torch::kFloat: dtype = 0; break;
    case torch::kHalf: dtype = 1; break;
    case torch::kBFloat16: dtype = 2; break;
    default: TORCH_CHECK(false, "values must be float32, float16 or bfloat16");
  }
  const c10::cuda::OptionalCUDAGuard guard(values.device());
  const int num_segments = static_cast<int>(ks.numel());
  const int num_chunks = static_cast<int>(chunks.numel() / 3);
  auto mask = torch::empty({values.numel()}, values.options().dtype(torch::kBool));
  auto error = torch::zeros({1}, values.options().dtype(torch::kInt));  // no kernel clears it
  auto workspace = torch::empty(
      {static_cast<int64_t>(slt_topk_workspace_bytes(num_segments, num_chunks))},
      values.options().dtype(torch::kUInt8));
  const int rc = slt_topk_launch(values.data_ptr(), dtype, offsets.data_ptr<int64_t>(),
                                 ks.data_ptr<int64_t>(), num_segments,
                                 chunks.data_ptr<int64_t>(), num_chunks,
                                 seg_chunks.data_ptr<int64_t>(), workspace.data_ptr(),
                                 mask.data_ptr<bool>(), error.data_ptr<int>(),
                                 c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(rc == 0, "slt top-k kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(rc)));
  return {mask, error};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segmented_topk_mask", &segmented_topk_mask,
        "exact top-k mask per segment, ties to the lower index");
}
