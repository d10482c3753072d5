// Delta methods: the small trained pieces a task adds to the frozen backbone, and their per-batch application.
//
// The survey's three families, one class each behind the Method interface:
//   addition-based:        adapter (sequential bottleneck; Houlsby or Pfeiffer placement), parallel_adapter,
//                          prefix (per-layer key/value prefixes), prompt (soft tokens after the embeddings)
//   specification-based:   bitfit (bias deltas), ln_tuning (layer-norm gain and bias deltas)
//                          (task heads live in head.h: a head is part of a pack, not a hook on the backbone)
//   reparameterization:    lora (low-rank A/B on linear layers), ia3 (learned scaling of keys, values and the
//                          feed-forward intermediate)
//
// A Method is immutable after CreateMethod() validated it against the model: thread-safe, shared by every batch
// that uses it. A MethodBatch is built for one forward pass (rows[i] = the method of this kind row i carries, or
// nullptr) and is used by that pass's thread only. Every MethodBatch computes the base model once for all rows and
// adds each row's delta with gathered / grouped tensor ops; a row without a method of this kind is unchanged.
//
// Tensor conventions in a MethodSpec: float32, contiguous, on the CPU; names are module-relative:
//   lora:             "<linear>.lora_A" [r, in], "<linear>.lora_B" [out, r]; config {"rank", "alpha", "targets"}
//   ia3:              "<linear>.ia3_l" [out] (scales the output) or [in] for modules in config "feedforward"
//                     (scales the input); config {"targets", "feedforward"}
//   bitfit:           "<linear or layer norm>.bias" [out] added to the output; config {"targets"}
//   ln_tuning:        "<layer norm>.weight" [d] and "<layer norm>.bias" [d]: deltas of gain and bias;
//                     config {"targets"}
//   adapter:          "<block output>.down.weight" [b, h], ".down.bias" [b], ".up.weight" [h, b], ".up.bias" [h];
//                     config {"bottleneck", "activation", "placement": "houlsby"|"pfeiffer"|"custom", "targets",
//                     "scaling"}; h' = h + scaling * up(act(down(h)))
//   parallel_adapter: same tensors on a block output; its input is the sub-layer's input
//                     (ModuleInfo::sublayer_input); config {"bottleneck", "activation", "targets", "scaling"}
//   prefix:           "<attention>.prefix_keys" [P, NH*DH], "<attention>.prefix_values" [P, NH*DH];
//                     config {"num_virtual_tokens", "targets"}
//   prompt:           "prompt_embeddings" [P, E] (E = width of embeddings.word_embeddings);
//                     config {"num_virtual_tokens"}
// "targets" is a list of patterns over module names (module_patterns.h); each method documents its default.
#ifndef DELTASERVE_SERVER_DELTA_METHOD_H_
#define DELTASERVE_SERVER_DELTA_METHOD_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

// The enum order is the order in which methods of different kinds act at a shared hook point: additive deltas
// first (lora, bitfit, ln_tuning, parallel_adapter), then scaling (ia3), then the sequence-changing and
// sequential ones (prefix, prompt, adapter).
enum class MethodKind { kLora, kBitFit, kLnTuning, kParallelAdapter, kIa3, kPrefix, kPrompt, kAdapter };
inline constexpr int kNumMethodKinds = 8;

// "lora", "bitfit", "ln_tuning", "parallel_adapter", "ia3", "prefix", "prompt", "adapter".
const char* MethodKindName(MethodKind kind);
// INVALID_ARGUMENT naming the known methods for anything else.
absl::StatusOr<MethodKind> ParseMethodKind(absl::string_view name);

// A method as stored in a pack.
struct MethodSpec {
  MethodKind kind = MethodKind::kLora;
  nlohmann::json config = nlohmann::json::object();  // hyper-parameters; see the table above
  std::map<std::string, at::Tensor> tensors;          // float32 CPU tensors; names as in the table above
};

// Upper bounds a pack must respect (a pack is outside input: nothing in it is trusted).
struct MethodLimits {
  // Largest LoRA rank.
  int64_t max_rank = 1024;
  // Largest adapter bottleneck.
  int64_t max_bottleneck = 8192;
  // Most prefix / prompt virtual tokens.
  int64_t max_virtual_tokens = 512;
};

class Method {
 public:
  virtual ~Method() = default;
  virtual MethodKind kind() const = 0;
  // The canonical spec: config with every default filled in and targets resolved to the exact module names
  // (sorted), tensors float32 contiguous on the CPU. Serializing it gives the pack's canonical bytes.
  virtual const MethodSpec& spec() const = 0;
  // Bytes its tensors take on the model's device.
  virtual int64_t bytes() const = 0;
};

// The per-batch application of one kind. Hooks follow model::ForwardHooks; rows are the batch rows. Every kind
// handles both token layouts (model::TokenLayout): per-token hook tensors are [B, T, ...] or, when the model
// packs the batch, [N, ...].
class MethodBatch : public model::ForwardHooks {
 public:
  // How many positions at the start of row `row`'s output sequence are not the caller's tokens (prompt
  // tuning's soft tokens); 0 for every other kind.
  virtual int64_t LeadingVirtualTokens(int64_t row) const { return 0; }

  bool SupportsPackedTokens() const override { return true; }
  void OnTokenLayout(const model::TokenLayout& layout) override { layout_ = layout; }

 protected:
  explicit MethodBatch(int64_t num_rows) : layout_(model::TokenLayout::Padded(num_rows)) {}
  // The layout of the per-token tensors the hooks get now (padded until the model says otherwise).
  const model::TokenLayout& layout() const { return layout_; }

 private:
  model::TokenLayout layout_;
};

// Validates `spec` against `model` and builds the method with its tensors on the model's device and dtype.
// Errors (INVALID_ARGUMENT unless said): a config key of the wrong type or out of range, over `limits`; a target
// pattern that matches no module of the right kind (the message lists the closest module names); a tensor that
// is missing, unexpected, of the wrong shape or dtype, or holds NaN/Inf.
absl::StatusOr<std::unique_ptr<Method>> CreateMethod(MethodSpec spec, const model::Model& model,
                                                     const MethodLimits& limits);

// The batch application of `kind`. REQUIRES: every non-null rows[i] is a Method of `kind` created for `model`.
absl::StatusOr<std::unique_ptr<MethodBatch>> MakeMethodBatch(MethodKind kind, std::vector<const Method*> rows,
                                                             const model::Model& model);

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_METHOD_H_
