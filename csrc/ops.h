// Host entry points of monet_fast._C, declared once; bindings live in bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "latent_decode_state.h"

// Forward declaration: keeps torch headers out of TUs that only need build_info (each TU that
// includes ATen costs 30-60 s to compile on small machines).
namespace at {
class Tensor;
}  // namespace at

namespace monet_fast {

// Build facts a bug report needs: compiler, torch version built against, CUDA on/off, archs.
pybind11::dict build_info();

// ---- latent decoding (latent_decode.cpp, latent_decode_kernels.cu) ----
// One decode step of the latent-feedback state machine for a batch of B sequences, in place:
// reads the token sampled from this step's logits, advances each sequence's state, writes the
// token the step emits and the next step's input embedding (the token's embedding row, or this
// step's hidden state when it is fed back). No host synchronisation; CPU and CUDA.
// Semantics per layout: latent_decode_state.h. Reference in Python: monet_fast._ops.
void latent_step(const at::Tensor& sampled_ids,   // [B] int64, sampled from this step's logits
                 const at::Tensor& hidden,        // [B, H] final post-norm hidden state, this step
                 const at::Tensor& embed_weight,  // [V, H] token embedding table (same dtype)
                 const at::Tensor& eos_ids,       // [E] int64 stop token ids
                 at::Tensor& mode,                // [B] int32 in/out: 0 text, 1 latent, 2 done
                 at::Tensor& count,               // [B] int32 in/out: see latent_decode_state.h
                 at::Tensor& n_blocks,            // [B] int32 in/out: latent blocks opened
                 at::Tensor& remaining,           // [B] int32 in/out: tokens left to emit
                 at::Tensor& emit_ids,            // [B] int64 out: token emitted this step
                 at::Tensor& use_hidden,          // [B] bool out: next input = hidden[b]
                 at::Tensor& next_embeds,         // [B, H] out: next step's input embeddings
                 int64_t layout,                  // 0 sft, 1 monet_vllm
                 int64_t latent_size,             // K >= 1
                 int64_t start_id, int64_t end_id, int64_t slot_id, int64_t fill_id,
                 int64_t max_blocks);             // latent blocks allowed per sequence

#ifdef MONET_FAST_WITH_CUDA
// CUDA body of latent_step (inputs already validated there): one block per sequence.
void latent_step_cuda(const at::Tensor& sampled_ids, const at::Tensor& hidden,
                      const at::Tensor& embed_weight, at::Tensor& mode, at::Tensor& count,
                      at::Tensor& n_blocks, at::Tensor& remaining, at::Tensor& emit_ids,
                      at::Tensor& use_hidden, at::Tensor& next_embeds,
                      const LatentStepParams& params);
#endif

}  // namespace monet_fast
