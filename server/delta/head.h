// Head: a task head on the model's sentence embedding (ModelInfo::embedding_dim wide). Part of a delta pack.
//
//   classification: logits = out(act(dense(x))) (dense optional), one logit per label; scores = softmax(logits)
//   regression:     value  = out(act(dense(x))), out has one row
//
// Tensors (HeadSpec::tensors, float32 CPU): "out.weight" [n, d_in], "out.bias" [n], and optionally
// "dense.weight" [d_hidden, D], "dense.bias" [d_hidden] (then d_in = d_hidden, else d_in = D).
// Config: {"type": "classification"|"regression", "labels": [..] (classification; n = labels),
//          "activation": "tanh"|"relu"|"gelu" (used only with dense; default "tanh")}.
//
// Immutable after Create(): thread-safe.
#ifndef DELTASERVE_SERVER_DELTA_HEAD_H_
#define DELTASERVE_SERVER_DELTA_HEAD_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

struct HeadSpec {
  nlohmann::json config = nlohmann::json::object();
  std::map<std::string, at::Tensor> tensors;
};

class Head {
 public:
  enum class Type { kClassification, kRegression };

  // Validates `spec` against the model's embedding width (INVALID_ARGUMENT naming what is wrong: type, labels
  // empty or duplicated, tensor missing / unexpected / misshapen / NaN or Inf) and places the tensors on the
  // model's device (float32).
  static absl::StatusOr<std::unique_ptr<Head>> Create(HeadSpec spec, const model::Model& model);

  Type type() const { return type_; }
  const std::vector<std::string>& labels() const { return labels_; }
  // The canonical spec (defaults filled in), for serialization.
  const HeadSpec& spec() const { return spec_; }
  int64_t bytes() const;

  // [N, D] float32 sentence embeddings -> [N, n] float32 logits (classification) or [N, 1] values (regression).
  absl::StatusOr<at::Tensor> Apply(const at::Tensor& pooled) const;

 private:
  Head() = default;
  Type type_ = Type::kClassification;
  std::vector<std::string> labels_;
  std::string activation_;
  HeadSpec spec_;
  at::Tensor dense_w_, dense_b_, out_w_, out_b_;
};

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_HEAD_H_
