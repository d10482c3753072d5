// TrainableDelta: one task's delta in training form — the delta methods of a pack and its head as LibTorch leaf
// tensors that require gradients, applied to the frozen backbone through the model's forward hooks
// (model::ForwardHooks) under autograd (model::Model::ForwardTrainable).
//
// Serving (server/delta) applies many packs to a batch at once, in place and under inference mode; training
// applies one delta to every row, out of place, so that autograd can record it. The two must compute the same
// function: Export()ed and loaded as a delta::DeltaPack, a pack gives the outputs the training forward gave
// (within 1e-5), which a test checks for every method.
//
// Initialization (seeded, so a run is repeatable) follows the methods' papers and PEFT: LoRA A ~ Kaiming-uniform,
// B = 0; adapters' up-projection = 0 (down ~ N(0, 0.01^2)); BitFit and LN-tuning deltas = 0; (IA)^3 scales = 1;
// prompt embeddings = the word embeddings of P random vocabulary tokens; prefix keys / values = the keys / values
// the backbone itself computes at each targeted attention for a sequence of P random tokens (their embeddings
// passed through the layers below and that layer's key / value projections); the head's weights ~ N(0, 0.02^2),
// biases 0. So the backbone's outputs are unchanged at step 0 (identity deltas) except for prefix / prompt, which
// add tokens.
//
// The hooks work under ForwardTrainable (autograd) and under Forward (inference mode, e.g. for evaluation: same
// outputs, no graph).
//
// Owns its parameter tensors. Not thread-safe: one training thread uses it.
#ifndef DELTASERVE_SERVER_TUNING_TRAINABLE_DELTA_H_
#define DELTASERVE_SERVER_TUNING_TRAINABLE_DELTA_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "server/delta/delta_pack.h"
#include "server/delta/method.h"
#include "server/model/model.h"

namespace deltaserve {
namespace tuning {

struct HeadConfig {
  // "classification" or "regression".
  std::string type = "classification";
  // Classification: the classes (>= 2), in logit order.
  std::vector<std::string> labels;
  // Width of an optional dense layer before the output (0 = a linear head on the sentence embedding).
  int64_t hidden = 0;
  // Activation after the dense layer: "tanh", "relu" or "gelu".
  std::string activation = "tanh";
};

struct TrainableSpec {
  // The methods to train: kind and config (hyper-parameters and target patterns, as in delta/method.h); tensors
  // are ignored. At most one of each kind; may be empty (a head alone, or full fine-tuning's head).
  std::vector<delta::MethodSpec> methods;
  HeadConfig head;
};

class TrainableDelta : public model::ForwardHooks {
 public:
  // Every piece applies one delta to every token (broadcast over the last dimension), so either token layout
  // works.
  bool SupportsPackedTokens() const override { return true; }

  // Validates the spec against `model` exactly as a pack would be (delta::CreateMethod's rules and messages:
  // unknown keys, out-of-range hyper-parameters, targets that match nothing; delta::Head::Create's for the head,
  // plus: a classification head needs >= 2 labels, hidden in [0, 65536]) and initializes the parameters with
  // `seed`. INVALID_ARGUMENT naming the problem.
  // REQUIRES: the caller holds model.weights_mutex() shared where a merge may run (prefix initialization runs a
  // forward pass of the backbone, prompt initialization reads its word embeddings). The returned delta refers to
  // nothing in `model` (but its hooks are for `model`'s modules only).
  static absl::StatusOr<std::unique_ptr<TrainableDelta>> Create(const TrainableSpec& spec,
                                                                const model::Model& model, uint64_t seed);

  // The name prefix of the head's parameters ("head/out.weight", ...).
  static constexpr char kHeadPrefix[] = "head/";

  // Every trainable tensor, by a stable name ("lora/encoder.layer.0.attention.self.query.lora_A",
  // "head/out.weight", ...), sorted by name. Leaves with requires_grad, float32, on the model's device.
  const std::vector<std::pair<std::string, at::Tensor>>& parameters() const { return parameters_; }
  // Elements over all parameters (the head included).
  int64_t num_parameters() const;

  // The head on the forward's sentence embeddings ([B, D] -> [B, n] logits, or [B, 1] for regression).
  absl::StatusOr<at::Tensor> HeadForward(const at::Tensor& pooled) const;

  // The pack: canonical method specs (resolved targets, defaults filled) with the current values as detached
  // float32 CPU copies, and the head. manifest.backbone_* are filled from the model.
  absl::StatusOr<delta::PackContents> Export(delta::PackManifest manifest) const;

  // Copies values into the parameters (a checkpoint's, names as in parameters(); other names are ignored).
  // INVALID_ARGUMENT for a missing name or a shape mismatch; then nothing is copied.
  absl::Status LoadValues(const std::map<std::string, at::Tensor>& values);

  // model::ForwardHooks, out of place and autograd-friendly.
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override;
  void OnLinearInput(const model::ModuleInfo& module, at::Tensor* input) override;
  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override;
  void OnLayerNorm(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override;
  void OnAttentionKeyValue(const model::ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override;
  void OnBlockOutput(const model::ModuleInfo& block, at::Tensor* hidden) override;

  // Positions the delta prepends to every row (prompt tuning's soft tokens); 0 otherwise.
  int64_t leading_virtual_tokens() const;

  // Implementation: one piece per method kind (trainable_delta.cc); public only so that the .cc can define it.
  class Piece;
  ~TrainableDelta() override;

 private:
  TrainableDelta();
  std::vector<std::unique_ptr<Piece>> pieces_;  // in delta::MethodKind order
  std::vector<std::pair<std::string, at::Tensor>> parameters_;
  // The backbone (for Export's manifest) and the head.
  std::string backbone_family_, backbone_fingerprint_;
  int64_t embedding_dim_ = 0;
  delta::HeadSpec head_spec_;  // canonical config; tensors are the parameters below
  std::string head_activation_;  // "" without a dense layer
  at::Tensor dense_w_, dense_b_, out_w_, out_b_;  // dense_* undefined without a dense layer
};

}  // namespace tuning
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_TUNING_TRAINABLE_DELTA_H_
