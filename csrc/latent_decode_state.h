// The per-sequence latent decode state machine, written once for the host (latent_decode.cpp)
// and the device (latent_decode_kernels.cu). Deliberately free of torch headers so that the .cu
// file and the C++ file share the exact same transition code.
//
// One call advances one sequence by one decode step. Inputs are the token the sampler produced
// from this step's logits and the sequence's state; outputs are the token this step emits (the
// token recorded in the output and, unless the hidden state is fed back, the next input) and
// whether the next input embedding is this step's final post-norm hidden state.
//
// Modes: kText (sampling text), kLatent (inside a latent block), kDone (finished: EOS, budget,
// or a stop string found by the host). `count` means, by layout:
//   sft         latent slots still to feed back; 0 means "force </abs_vis_token> now".
//   monet_vllm  rows overwritten so far in this block (the reference's `current_len`).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MONET_FAST_HOST_DEVICE __host__ __device__
#else
#define MONET_FAST_HOST_DEVICE
#endif

namespace monet_fast {

constexpr int32_t kModeText = 0;
constexpr int32_t kModeLatent = 1;
constexpr int32_t kModeDone = 2;

constexpr int64_t kLayoutSft = 0;
constexpr int64_t kLayoutMonetVllm = 1;

// Scalars of one latent_step call (same for every sequence of the batch).
struct LatentStepParams {
  int64_t layout;       // kLayoutSft | kLayoutMonetVllm
  int64_t latent_size;  // K >= 1
  int64_t start_id;     // <abs_vis_token>
  int64_t end_id;       // </abs_vis_token>
  int64_t slot_id;      // id recorded for a fed-back latent step (<abs_vis_token_pad>)
  int64_t fill_id;      // id emitted by finished sequences (pad)
  int64_t max_blocks;   // latent blocks a sequence may open; a START past the cap is plain text
  const int64_t* eos;   // [n_eos] stop token ids
  int64_t n_eos;
};

MONET_FAST_HOST_DEVICE inline bool is_eos(int64_t tok, const int64_t* eos, int64_t n_eos) {
  for (int64_t i = 0; i < n_eos; ++i) {
    if (eos[i] == tok) return true;
  }
  return false;
}

// Advances one sequence. Returns the emitted id; sets *use_hidden.
MONET_FAST_HOST_DEVICE inline int64_t latent_step_row(const LatentStepParams& p, int64_t sampled,
                                                      int32_t* mode, int32_t* count,
                                                      int32_t* n_blocks, int32_t* remaining,
                                                      bool* use_hidden) {
  *use_hidden = false;
  if (*mode == kModeDone) return p.fill_id;

  int64_t emit = sampled;
  const bool can_open = *n_blocks < p.max_blocks;
  if (p.layout == kLayoutSft) {
    // sft: no sampling inside a block; K slots are fed back, then END is forced.
    if (*mode == kModeLatent) {
      if (*count > 0) {
        emit = p.slot_id;
        *use_hidden = true;
        *count -= 1;
      } else {
        emit = p.end_id;
        *mode = kModeText;
      }
    } else if (sampled == p.start_id && can_open) {
      // START keeps its token embedding; slot 1's input is the hidden state at START.
      *mode = kModeLatent;
      *count = static_cast<int32_t>(p.latent_size);
      *n_blocks += 1;
    } else if (is_eos(sampled, p.eos, p.n_eos)) {
      *mode = kModeDone;
    }
  } else {
    // monet_vllm (reference runner): the check order below is the reference's — END or a full
    // block first (the sampled id is then REPLACED by END), then the placeholder.
    if (*mode == kModeLatent) {
      if (sampled == p.end_id || *count >= p.latent_size) {
        emit = p.end_id;
        *mode = kModeText;
        *count = 0;
      } else if (is_eos(sampled, p.eos, p.n_eos)) {
        // The reference keeps the sampled placeholder id, and vLLM stops on it if it is EOS.
        *mode = kModeDone;
      } else {
        emit = p.slot_id;
        *use_hidden = true;
        *count += 1;
      }
    } else if (sampled == p.start_id && can_open) {
      // START's own input row is overwritten by the hidden state that predicted it.
      *mode = kModeLatent;
      *count = 1;
      *n_blocks += 1;
      *use_hidden = true;
    } else if (is_eos(sampled, p.eos, p.n_eos)) {
      *mode = kModeDone;
    }
  }
  *remaining -= 1;
  if (*remaining <= 0) *mode = kModeDone;
  return emit;
}

}  // namespace monet_fast
