// CUDA body of latent_step: the per-step select-and-update of the latent decode state machine.
//
// One thread block per sequence. Thread 0 advances the sequence's state (the transition code is
// shared with the CPU path through latent_decode_state.h) and publishes the emitted id and the
// "feed back" flag through shared memory; then the whole block writes the next input row:
// either the emitted token's embedding row or this step's hidden state. Everything stays on the
// device, so a latent block never needs the host and the step can live inside a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: we need no cuBLAS/cuSPARSE
// handles, and the lighter include set compiles faster.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "latent_decode_state.h"
#include "ops.h"

namespace monet_fast {

namespace {

// 128 threads: a 3584-wide bf16 row is 28 iterations of coalesced 2-byte loads per thread; the
// kernel is launch-bound at decode batch sizes, so wider blocks buy nothing.
constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void latent_step_kernel(const int64_t* __restrict__ sampled_ids,  // [B]
                                   const scalar_t* __restrict__ hidden,      // [B, H]
                                   int64_t hidden_row_stride,
                                   const scalar_t* __restrict__ embed,  // [V, H]
                                   int64_t embed_row_stride, int64_t vocab,
                                   int32_t* __restrict__ mode,       // [B]
                                   int32_t* __restrict__ count,      // [B]
                                   int32_t* __restrict__ n_blocks,   // [B]
                                   int32_t* __restrict__ remaining,  // [B]
                                   int64_t* __restrict__ emit_ids,   // [B]
                                   bool* __restrict__ use_hidden,    // [B]
                                   scalar_t* __restrict__ next_embeds,  // [B, H]
                                   int64_t next_row_stride, int64_t hidden_size,
                                   LatentStepParams params) {
  const int64_t b = blockIdx.x;
  __shared__ int64_t s_emit;
  __shared__ bool s_use;
  if (threadIdx.x == 0) {
    bool fed_back = false;
    const int64_t emit = latent_step_row(params, sampled_ids[b], &mode[b], &count[b],
                                         &n_blocks[b], &remaining[b], &fed_back);
    CUDA_KERNEL_ASSERT(emit >= 0 && emit < vocab);
    emit_ids[b] = emit;
    use_hidden[b] = fed_back;
    s_emit = emit;
    s_use = fed_back;
  }
  __syncthreads();
  const scalar_t* src = s_use ? hidden + b * hidden_row_stride : embed + s_emit * embed_row_stride;
  scalar_t* dst = next_embeds + b * next_row_stride;
  for (int64_t i = threadIdx.x; i < hidden_size; i += blockDim.x) {
    dst[i] = src[i];
  }
}

}  // namespace

void latent_step_cuda(const at::Tensor& sampled_ids, const at::Tensor& hidden,
                      const at::Tensor& embed_weight, at::Tensor& mode, at::Tensor& count,
                      at::Tensor& n_blocks, at::Tensor& remaining, at::Tensor& emit_ids,
                      at::Tensor& use_hidden, at::Tensor& next_embeds,
                      const LatentStepParams& params) {
  // Shapes, dtypes and devices were checked by latent_step (latent_decode.cpp).
  const int64_t batch = sampled_ids.size(0);
  if (batch == 0) return;
  const c10::cuda::OptionalCUDAGuard device_guard(sampled_ids.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, embed_weight.scalar_type(), "latent_step_cuda", [&] {
        latent_step_kernel<scalar_t><<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
            sampled_ids.data_ptr<int64_t>(), hidden.data_ptr<scalar_t>(), hidden.stride(0),
            embed_weight.data_ptr<scalar_t>(), embed_weight.stride(0), embed_weight.size(0),
            mode.data_ptr<int32_t>(), count.data_ptr<int32_t>(), n_blocks.data_ptr<int32_t>(),
            remaining.data_ptr<int32_t>(), emit_ids.data_ptr<int64_t>(),
            use_hidden.data_ptr<bool>(), next_embeds.data_ptr<scalar_t>(), next_embeds.stride(0),
            hidden.size(1), params);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace monet_fast
