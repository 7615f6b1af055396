// latent_step: one decode step of the latent-feedback state machine for a whole batch, plus the
// select of the next input embedding (token embedding row or fed-back hidden state).
//
// CPU: a loop over the batch (B is small, H rows are memcpy'd). CUDA: dispatched to
// latent_step_cuda (latent_decode_kernels.cu), one thread block per sequence, so that nothing in
// a decode step needs the host — the step can be captured in a CUDA graph. The transition logic
// itself lives in latent_decode_state.h and is shared by both.
#include <ATen/ATen.h>

#include <cstring>

#include "latent_decode_state.h"
#include "ops.h"

namespace monet_fast {

namespace {

void check_state_vector(const at::Tensor& t, const char* name, int64_t batch, at::ScalarType dtype,
                        const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "latent_step: ", name, " must have shape [",
              batch, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "latent_step: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "latent_step: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == device, "latent_step: ", name, " is on ", t.device(),
              " but sampled_ids is on ", device);
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t hidden,
                at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == hidden,
              "latent_step: ", name, " must have shape [", rows < 0 ? "V" : std::to_string(rows),
              ", ", hidden, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "latent_step: ", name, " must have the dtype of ",
              "embed_weight (", dtype, "), got ", t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1, "latent_step: ", name, " last dimension must be contiguous");
  TORCH_CHECK(t.device() == device, "latent_step: ", name, " is on ", t.device(),
              " but sampled_ids is on ", device);
}

void latent_step_cpu(const at::Tensor& sampled_ids, const at::Tensor& hidden,
                     const at::Tensor& embed_weight, at::Tensor& mode, at::Tensor& count,
                     at::Tensor& n_blocks, at::Tensor& remaining, at::Tensor& emit_ids,
                     at::Tensor& use_hidden, at::Tensor& next_embeds,
                     const LatentStepParams& params) {
  const int64_t batch = sampled_ids.size(0);
  const int64_t hidden_size = hidden.size(1);
  const int64_t vocab = embed_weight.size(0);
  const size_t row_bytes = static_cast<size_t>(hidden_size) * hidden.element_size();
  const int64_t* sampled = sampled_ids.data_ptr<int64_t>();
  int32_t* mode_p = mode.data_ptr<int32_t>();
  int32_t* count_p = count.data_ptr<int32_t>();
  int32_t* blocks_p = n_blocks.data_ptr<int32_t>();
  int32_t* remaining_p = remaining.data_ptr<int32_t>();
  int64_t* emit_p = emit_ids.data_ptr<int64_t>();
  bool* use_p = use_hidden.data_ptr<bool>();
  const char* hidden_p = static_cast<const char*>(hidden.data_ptr());
  const char* embed_p = static_cast<const char*>(embed_weight.data_ptr());
  char* out_p = static_cast<char*>(next_embeds.data_ptr());
  const int64_t elem = hidden.element_size();
  for (int64_t b = 0; b < batch; ++b) {
    bool fed_back = false;
    const int64_t emit = latent_step_row(params, sampled[b], &mode_p[b], &count_p[b],
                                         &blocks_p[b], &remaining_p[b], &fed_back);
    TORCH_CHECK(emit >= 0 && emit < vocab, "latent_step: sequence ", b, " emits token id ", emit,
                " outside the embedding table [0, ", vocab, ")");
    emit_p[b] = emit;
    use_p[b] = fed_back;
    const char* src = fed_back ? hidden_p + b * hidden.stride(0) * elem
                               : embed_p + emit * embed_weight.stride(0) * elem;
    std::memcpy(out_p + b * next_embeds.stride(0) * elem, src, row_bytes);
  }
}

}  // namespace

void latent_step(const at::Tensor& sampled_ids, const at::Tensor& hidden,
                 const at::Tensor& embed_weight, const at::Tensor& eos_ids, at::Tensor& mode,
                 at::Tensor& count, at::Tensor& n_blocks, at::Tensor& remaining,
                 at::Tensor& emit_ids, at::Tensor& use_hidden, at::Tensor& next_embeds,
                 int64_t layout, int64_t latent_size, int64_t start_id, int64_t end_id,
                 int64_t slot_id, int64_t fill_id, int64_t max_blocks) {
  TORCH_CHECK(layout == kLayoutSft || layout == kLayoutMonetVllm,
              "latent_step: layout must be 0 (sft) or 1 (monet_vllm), got ", layout);
  TORCH_CHECK(latent_size >= 1, "latent_step: latent_size must be >= 1, got ", latent_size);
  TORCH_CHECK(max_blocks >= 0, "latent_step: max_blocks must be >= 0, got ", max_blocks);
  TORCH_CHECK(sampled_ids.dim() == 1 && sampled_ids.scalar_type() == at::kLong &&
                  sampled_ids.is_contiguous(),
              "latent_step: sampled_ids must be a contiguous 1-D int64 tensor, got ",
              sampled_ids.scalar_type(), " ", sampled_ids.sizes());
  const int64_t batch = sampled_ids.size(0);
  const at::Device device = sampled_ids.device();
  check_state_vector(mode, "mode", batch, at::kInt, device);
  check_state_vector(count, "count", batch, at::kInt, device);
  check_state_vector(n_blocks, "n_blocks", batch, at::kInt, device);
  check_state_vector(remaining, "remaining", batch, at::kInt, device);
  check_state_vector(emit_ids, "emit_ids", batch, at::kLong, device);
  check_state_vector(use_hidden, "use_hidden", batch, at::kBool, device);
  TORCH_CHECK(eos_ids.dim() == 1 && eos_ids.scalar_type() == at::kLong && eos_ids.is_contiguous(),
              "latent_step: eos_ids must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(eos_ids.device() == device, "latent_step: eos_ids is on ", eos_ids.device(),
              " but sampled_ids is on ", device);
  TORCH_CHECK(embed_weight.dim() == 2, "latent_step: embed_weight must be [V, H], got ",
              embed_weight.sizes());
  const int64_t hidden_size = embed_weight.size(1);
  const at::ScalarType dtype = embed_weight.scalar_type();
  check_rows(embed_weight, "embed_weight", -1, hidden_size, dtype, device);
  check_rows(hidden, "hidden", batch, hidden_size, dtype, device);
  check_rows(next_embeds, "next_embeds", batch, hidden_size, dtype, device);
  TORCH_CHECK(!next_embeds.is_same(hidden), "latent_step: next_embeds must not alias hidden");

  LatentStepParams params{layout,  latent_size, start_id, end_id, slot_id,
                          fill_id, max_blocks,  eos_ids.data_ptr<int64_t>(),
                          eos_ids.numel()};
  if (device.is_cuda()) {
#ifdef MONET_FAST_WITH_CUDA
    latent_step_cuda(sampled_ids, hidden, embed_weight, mode, count, n_blocks, remaining,
                     emit_ids, use_hidden, next_embeds, params);
    return;
#else
    TORCH_CHECK(false, "latent_step: monet_fast._C was built without CUDA; rebuild it with a CUDA ",
                "torch and nvcc, or use monet_fast._ops.latent_step_torch");
#endif
  }
  TORCH_CHECK(device.is_cpu(), "latent_step: unsupported device ", device);
  latent_step_cpu(sampled_ids, hidden, embed_weight, mode, count, n_blocks, remaining, emit_ids,
                  use_hidden, next_embeds, params);
}

}  // namespace monet_fast
