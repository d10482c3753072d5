#include "server/delta/head.h"

#include <ATen/ops/gelu.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/tanh.h>
#include <c10/core/InferenceMode.h>

#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"

namespace deltaserve {
namespace delta {
namespace {

constexpr const char* kOutWeight = "out.weight";
constexpr const char* kOutBias = "out.bias";
constexpr const char* kDenseWeight = "dense.weight";
constexpr const char* kDenseBias = "dense.bias";

absl::Status HeadError(absl::string_view what) { return absl::InvalidArgumentError(absl::StrCat("head: ", what)); }

// spec.tensors[name] checked like the methods' RequireTensor: present, float32, of `shape`, finite. Returns a
// contiguous CPU tensor and marks `name` used.
absl::StatusOr<at::Tensor> RequireHeadTensor(const HeadSpec& spec, const std::string& name,
                                             const std::vector<int64_t>& shape, std::set<std::string>* used) {
  auto it = spec.tensors.find(name);
  if (it == spec.tensors.end() || !it->second.defined()) {
    return HeadError(absl::StrCat("tensor \"", name, "\" is missing"));
  }
  const at::Tensor& t = it->second;
  if (t.scalar_type() != at::kFloat) {
    return HeadError(absl::StrCat("tensor \"", name, "\" is ", c10::toString(t.scalar_type()), ", expected float32"));
  }
  if (t.sizes() != c10::IntArrayRef(shape)) {
    return HeadError(
        absl::StrCat("tensor \"", name, "\" has shape ", ShapeString(t.sizes()), ", expected ", ShapeString(shape)));
  }
  DS_ASSIGN_OR_RETURN(bool finite, TorchCall([&] { return at::isfinite(t).all().item<bool>(); }, "head: finite check"));
  if (!finite) return HeadError(absl::StrCat("tensor \"", name, "\" holds NaN or Inf values"));
  used->insert(name);
  return TorchCall([&] { return t.to(at::kCPU).contiguous(); }, "head: contiguous CPU copy");
}

absl::StatusOr<at::Tensor> ToDevice(const at::Tensor& t, const model::Model& model) {
  return TorchCall([&] { return t.to(c10::Device(model.info().device), at::kFloat).contiguous(); },
                   "head: placing a tensor on the model's device");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Head>> Head::Create(HeadSpec spec, const model::Model& model) {
  const nlohmann::json& config = spec.config;
  if (!config.is_object()) return HeadError(absl::StrCat("config must be a JSON object, got ", config.dump()));
  for (auto it = config.begin(); it != config.end(); ++it) {
    if (it.key() != "type" && it.key() != "labels" && it.key() != "activation") {
      return HeadError(absl::StrCat("unknown config key \"", it.key(), "\" (known: type, labels, activation)"));
    }
  }

  std::unique_ptr<Head> head(new Head());

  // Type.
  auto type_it = config.find("type");
  if (type_it == config.end() || type_it->is_null()) {
    return HeadError("\"type\" is required (\"classification\" or \"regression\")");
  }
  if (!type_it->is_string()) {
    return HeadError(absl::StrCat("\"type\" must be \"classification\" or \"regression\", got ", type_it->dump()));
  }
  const std::string type = type_it->get<std::string>();
  if (type == "classification") {
    head->type_ = Type::kClassification;
  } else if (type == "regression") {
    head->type_ = Type::kRegression;
  } else {
    return HeadError(absl::StrCat("unknown type \"", type, "\" (known: classification, regression)"));
  }

  // Labels.
  auto labels_it = config.find("labels");
  const bool has_labels = labels_it != config.end() && !labels_it->is_null();
  if (head->type_ == Type::kClassification) {
    if (!has_labels) return HeadError("classification needs \"labels\" (a non-empty list of strings)");
    if (!labels_it->is_array() || labels_it->empty()) {
      return HeadError(absl::StrCat("\"labels\" must be a non-empty list of strings, got ", labels_it->dump()));
    }
    std::set<std::string> seen;
    for (const nlohmann::json& label : *labels_it) {
      if (!label.is_string()) {
        return HeadError(absl::StrCat("\"labels\" must hold strings, got ", label.dump()));
      }
      const std::string& s = label.get_ref<const std::string&>();
      if (s.empty()) return HeadError("\"labels\" holds an empty label");
      if (!seen.insert(s).second) return HeadError(absl::StrCat("label \"", s, "\" appears twice in \"labels\""));
      head->labels_.push_back(s);
    }
  } else if (has_labels) {
    return HeadError("a regression head has no \"labels\"");
  }
  const int64_t n = head->type_ == Type::kClassification ? static_cast<int64_t>(head->labels_.size()) : 1;

  // Activation (validated even when unused, so a typo is never silently ignored).
  std::string activation = "tanh";
  auto act_it = config.find("activation");
  if (act_it != config.end() && !act_it->is_null()) {
    if (!act_it->is_string()) {
      return HeadError(absl::StrCat("\"activation\" must be \"tanh\", \"relu\" or \"gelu\", got ", act_it->dump()));
    }
    activation = act_it->get<std::string>();
    if (activation != "tanh" && activation != "relu" && activation != "gelu") {
      return HeadError(absl::StrCat("unknown activation \"", activation, "\" (known: tanh, relu, gelu)"));
    }
  }

  // Tensors.
  const int64_t D = model.info().embedding_dim;
  std::set<std::string> used;
  HeadSpec canonical;
  const bool has_dense = spec.tensors.count(kDenseWeight) > 0 || spec.tensors.count(kDenseBias) > 0;
  int64_t d_in = D;
  if (has_dense) {
    auto w_it = spec.tensors.find(kDenseWeight);
    if (w_it == spec.tensors.end() || !w_it->second.defined()) {
      return HeadError(absl::StrCat("tensor \"", kDenseWeight, "\" is missing (\"", kDenseBias, "\" is present)"));
    }
    if (w_it->second.dim() != 2 || w_it->second.size(0) < 1) {
      return HeadError(absl::StrCat("tensor \"", kDenseWeight, "\" has shape ", ShapeString(w_it->second.sizes()),
                                    ", expected [d_hidden, ", D, "] with d_hidden >= 1"));
    }
    const int64_t d_hidden = w_it->second.size(0);
    DS_ASSIGN_OR_RETURN(at::Tensor dense_w, RequireHeadTensor(spec, kDenseWeight, {d_hidden, D}, &used));
    DS_ASSIGN_OR_RETURN(at::Tensor dense_b, RequireHeadTensor(spec, kDenseBias, {d_hidden}, &used));
    canonical.tensors[kDenseWeight] = dense_w;
    canonical.tensors[kDenseBias] = dense_b;
    d_in = d_hidden;
  }
  DS_ASSIGN_OR_RETURN(at::Tensor out_w, RequireHeadTensor(spec, kOutWeight, {n, d_in}, &used));
  DS_ASSIGN_OR_RETURN(at::Tensor out_b, RequireHeadTensor(spec, kOutBias, {n}, &used));
  canonical.tensors[kOutWeight] = out_w;
  canonical.tensors[kOutBias] = out_b;
  for (const auto& [name, t] : spec.tensors) {
    if (!used.count(name)) {
      return HeadError(absl::StrCat("unexpected tensor \"", name, "\" (known: ", kOutWeight, ", ", kOutBias, ", ",
                                    kDenseWeight, ", ", kDenseBias, ")"));
    }
  }

  // Canonical config: every default filled in; "activation" only when a dense layer uses it.
  canonical.config = nlohmann::json::object();
  canonical.config["type"] = type;
  if (head->type_ == Type::kClassification) canonical.config["labels"] = head->labels_;
  if (has_dense) {
    canonical.config["activation"] = activation;
    head->activation_ = activation;
  }

  if (has_dense) {
    DS_ASSIGN_OR_RETURN(head->dense_w_, ToDevice(canonical.tensors[kDenseWeight], model));
    DS_ASSIGN_OR_RETURN(head->dense_b_, ToDevice(canonical.tensors[kDenseBias], model));
  }
  DS_ASSIGN_OR_RETURN(head->out_w_, ToDevice(out_w, model));
  DS_ASSIGN_OR_RETURN(head->out_b_, ToDevice(out_b, model));
  head->spec_ = std::move(canonical);
  return head;
}

int64_t Head::bytes() const {
  int64_t total = 0;
  for (const at::Tensor* t : {&dense_w_, &dense_b_, &out_w_, &out_b_}) {
    if (t->defined()) total += static_cast<int64_t>(t->nbytes());
  }
  return total;
}

absl::StatusOr<at::Tensor> Head::Apply(const at::Tensor& pooled) const {
  const int64_t D = dense_w_.defined() ? dense_w_.size(1) : out_w_.size(1);
  if (!pooled.defined()) return HeadError("Apply: the embeddings are undefined");
  if (pooled.scalar_type() != at::kFloat) {
    return HeadError(absl::StrCat("Apply: embeddings are ", c10::toString(pooled.scalar_type()), ", expected float32"));
  }
  if (pooled.dim() != 2 || pooled.size(1) != D) {
    return HeadError(
        absl::StrCat("Apply: embeddings have shape ", ShapeString(pooled.sizes()), ", expected [N, ", D, "]"));
  }
  return TorchCall(
      [&] {
        c10::InferenceMode guard;
        at::Tensor x = pooled.to(out_w_.device());
        if (dense_w_.defined()) {
          x = at::linear(x, dense_w_, dense_b_);
          if (activation_ == "relu") {
            x = at::relu(x);
          } else if (activation_ == "gelu") {
            x = at::gelu(x);
          } else {
            x = at::tanh(x);
          }
        }
        return at::linear(x, out_w_, out_b_);
      },
      "head: apply");
}

}  // namespace delta
}  // namespace deltaserve
