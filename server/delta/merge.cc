#include "server/delta/merge.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"

namespace deltaserve {
namespace delta {
namespace {

const model::ModuleInfo* FindModule(const model::Model& model, const std::string& name) {
  for (const auto& m : model.modules()) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

// "<module>.<suffix>" -> "<module>", or "" when `name` does not end with ".<suffix>".
std::string ModuleOf(const std::string& name, const std::string& suffix) {
  const std::string tail = "." + suffix;
  return absl::EndsWith(name, tail) ? name.substr(0, name.size() - tail.size()) : std::string();
}

std::set<std::string> StringSet(const nlohmann::json& j) {
  std::set<std::string> out;
  if (j.is_array()) {
    for (const auto& v : j) {
      if (v.is_string()) out.insert(v.get<std::string>());
    }
  }
  return out;
}

}  // namespace

bool IsMergeable(const DeltaPack& pack, const model::Model& model) {
  if (pack.methods().empty()) return false;
  for (const auto& method : pack.methods()) {
    switch (method->kind()) {
      case MethodKind::kLora:
      case MethodKind::kLnTuning:
      case MethodKind::kIa3:
        break;
      case MethodKind::kBitFit:
        for (const auto& [name, t] : method->spec().tensors) {
          const model::ModuleInfo* m = FindModule(model, ModuleOf(name, "bias"));
          if (m == nullptr || !m->has_bias || model.parameters().count(m->name + ".bias") == 0) return false;
        }
        break;
      default:
        return false;
    }
  }
  return true;
}

absl::StatusOr<std::unique_ptr<MergedPack>> MergedPack::Merge(const DeltaPack& pack, const model::Model& model) {
  if (!IsMergeable(pack, model)) {
    return absl::FailedPreconditionError(absl::StrCat("delta pack ", pack.digest(),
                                                      " cannot be merged: only lora, bitfit (on layers with a "
                                                      "bias), ln_tuning and ia3 fold into the weights"));
  }
  std::unique_ptr<MergedPack> merged(new MergedPack());
  const auto& params = model.parameters();
  // The model's tensor for `name`, saved before its first change.
  auto param = [&](const std::string& name) -> absl::StatusOr<at::Tensor> {
    auto it = params.find(name);
    if (it == params.end()) return absl::InternalError(absl::StrCat("the model has no parameter ", name));
    if (merged->saved_.count(name) == 0) {
      DS_ASSIGN_OR_RETURN(at::Tensor copy, TorchCall([&] { return it->second.clone(); }, "saving a weight"));
      merged->saved_[name] = {it->second, copy};
    }
    return it->second;
  };
  absl::Status status = TorchCallVoid(
      [&] {
        c10::InferenceMode guard;
        for (const auto& method : pack.methods()) {
          const MethodSpec& spec = method->spec();
          for (const auto& [name, t] : spec.tensors) {
            switch (method->kind()) {
              case MethodKind::kLora: {
                const std::string module = ModuleOf(name, "lora_A");
                if (module.empty()) break;
                const double scale =
                    spec.config.value("alpha", 1.0) / static_cast<double>(spec.config.value("rank", int64_t{1}));
                at::Tensor w = param(module + ".weight").value();
                const at::Tensor& b = spec.tensors.at(module + ".lora_B");
                w.add_(at::matmul(b, t).to(w.options()), scale);
                break;
              }
              case MethodKind::kBitFit: {
                at::Tensor bias = param(name).value();
                bias.add_(t.to(bias.options()));
                break;
              }
              case MethodKind::kLnTuning: {
                at::Tensor p = param(name).value();  // "<ln>.weight" (gain) or "<ln>.bias"
                p.add_(t.to(p.options()));
                break;
              }
              case MethodKind::kIa3: {
                const std::string module = ModuleOf(name, "ia3_l");
                if (module.empty()) break;
                const bool feedforward = StringSet(spec.config["feedforward"]).count(module) > 0;
                at::Tensor w = param(module + ".weight").value();
                const at::Tensor l = t.to(w.options());
                if (feedforward) {
                  w.mul_(l.unsqueeze(0));  // W diag(l): scales the input
                } else {
                  w.mul_(l.unsqueeze(1));  // diag(l) W
                  if (params.count(module + ".bias")) param(module + ".bias").value().mul_(l);
                }
                break;
              }
              default:
                break;
            }
          }
        }
      },
      "merging a delta pack");
  if (!status.ok()) {
    (void)merged->Restore();
    return status;
  }
  return merged;
}

absl::Status MergedPack::Restore() {
  if (restored_) return absl::OkStatus();
  restored_ = true;
  return TorchCallVoid(
      [&] {
        c10::InferenceMode guard;
        for (auto& [name, pair] : saved_) pair.first.copy_(pair.second);
      },
      "restoring merged weights");
}

MergedPack::~MergedPack() { (void)Restore(); }

int64_t MergedPack::saved_bytes() const {
  int64_t n = 0;
  for (const auto& [name, pair] : saved_) n += static_cast<int64_t>(pair.second.nbytes());
  return n;
}

}  // namespace delta
}  // namespace deltaserve
