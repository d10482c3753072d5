#include "server/delta/merge.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"

namespace deltaserve {
namespace delta {
namespace {

// MergeBreakEvenTokens' factors: for a pack of one kind, break-even tokens x pack bytes / merged weight bytes, as
// delta_bench measures it (2 threads, OpenBLAS; docs/BENCHMARKS.md): lora 35-39 on use-lite and BERT-base (19-33
// for query/value only), ia3 3-5, bitfit 16-40, ln_tuning 8-10 (those two merge within ~50 tokens either way).
constexpr double kLoraMergeFactor = 36;
constexpr double kIa3MergeFactor = 4;
constexpr double kBitFitMergeFactor = 24;
constexpr double kLnTuningMergeFactor = 8;

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

// The parameters merging `method` rewrites, each with the fold that rewrites it (run in this order).
struct Fold {
  std::string parameter;
  std::function<void(at::Tensor&)> apply;
};

std::vector<Fold> FoldsOf(const Method& method, const model::Model& model) {
  const MethodSpec& spec = method.spec();
  const auto& params = model.parameters();
  std::vector<Fold> folds;
  for (const auto& [name, t] : spec.tensors) {
    const at::Tensor& delta = t;
    switch (method.kind()) {
      case MethodKind::kLora: {
        const std::string module = ModuleOf(name, "lora_A");
        if (module.empty()) break;
        const double scale =
            spec.config.value("alpha", 1.0) / static_cast<double>(spec.config.value("rank", int64_t{1}));
        const at::Tensor& b = spec.tensors.at(module + ".lora_B");
        folds.push_back({module + ".weight", [delta, b, scale](at::Tensor& w) {
                           w.add_(at::matmul(b, delta).to(w.options()), scale);
                         }});
        break;
      }
      case MethodKind::kBitFit:
      case MethodKind::kLnTuning:  // "<ln>.weight" (gain) or "<ln>.bias": both add
        folds.push_back({name, [delta](at::Tensor& p) { p.add_(delta.to(p.options())); }});
        break;
      case MethodKind::kIa3: {
        const std::string module = ModuleOf(name, "ia3_l");
        if (module.empty()) break;
        if (StringSet(spec.config.value("feedforward", nlohmann::json::array())).count(module) > 0) {
          // W diag(l): scales the input.
          folds.push_back(
              {module + ".weight", [delta](at::Tensor& w) { w.mul_(delta.to(w.options()).unsqueeze(0)); }});
        } else {
          // diag(l) W, l * b: scales the output.
          folds.push_back(
              {module + ".weight", [delta](at::Tensor& w) { w.mul_(delta.to(w.options()).unsqueeze(1)); }});
          if (params.count(module + ".bias")) {
            folds.push_back({module + ".bias", [delta](at::Tensor& b) { b.mul_(delta.to(b.options())); }});
          }
        }
        break;
      }
      default:
        break;
    }
  }
  return folds;
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


int64_t MergedWeightBytes(const DeltaPack& pack, const model::Model& model) {
  if (!IsMergeable(pack, model)) return 0;
  std::set<std::string> touched;
  for (const auto& method : pack.methods()) {
    for (const Fold& fold : FoldsOf(*method, model)) touched.insert(fold.parameter);
  }
  int64_t bytes = 0;
  for (const std::string& name : touched) {
    auto it = model.parameters().find(name);
    if (it != model.parameters().end()) bytes += static_cast<int64_t>(it->second.nbytes());
  }
  return bytes;
}

int64_t MergeBreakEvenTokens(const DeltaPack& pack, const model::Model& model) {
  const int64_t merged = MergedWeightBytes(pack, model);
  if (merged == 0) return std::numeric_limits<int64_t>::max();
  auto factor = [](MethodKind kind) {
    switch (kind) {
      case MethodKind::kLora:
        return kLoraMergeFactor;
      case MethodKind::kIa3:
        return kIa3MergeFactor;
      case MethodKind::kBitFit:
        return kBitFitMergeFactor;
      default:  // ln_tuning
        return kLnTuningMergeFactor;
    }
  };
  double per_token = 0;  // the hooks' cost per token, as merged-weight bytes that take as long to merge
  for (const auto& method : pack.methods()) per_token += method->bytes() / factor(method->kind());
  if (per_token <= 0) return std::numeric_limits<int64_t>::max();
  return static_cast<int64_t>(std::ceil(merged / per_token));
}

absl::StatusOr<std::unique_ptr<MergedPack>> MergedPack::Merge(const DeltaPack& pack, const model::Model& model) {
  if (!IsMergeable(pack, model)) {
    return absl::FailedPreconditionError(absl::StrCat("delta pack ", pack.digest(),
                                                      " cannot be merged: only lora, bitfit (on layers with a "
                                                      "bias), ln_tuning and ia3 fold into the weights"));
  }
  absl::Mutex* mu = &model.weights_mutex();
  mu->Lock();
  // From here on, the destructor (Restore) puts back what was saved and unlocks.
  std::unique_ptr<MergedPack> merged(new MergedPack(mu));
  const auto& params = model.parameters();
  for (const auto& method : pack.methods()) {
    for (const Fold& fold : FoldsOf(*method, model)) {
      auto it = params.find(fold.parameter);
      if (it == params.end()) {
        (void)merged->Restore();
        return absl::InternalError(absl::StrCat("merging delta pack ", pack.digest(), ": the model has no parameter ",
                                                fold.parameter, " (the weights were restored)"));
      }
      at::Tensor weight = it->second;  // shares the model's storage
      absl::Status status = TorchCallVoid(
          [&] {
            c10::InferenceMode guard;
            if (merged->saved_.count(fold.parameter) == 0) merged->saved_[fold.parameter] = {weight, weight.clone()};
            fold.apply(weight);
          },
          absl::StrCat("merging delta pack ", pack.digest(), " into ", fold.parameter));
      if (!status.ok()) {
        (void)merged->Restore();
        return absl::Status(status.code(), absl::StrCat(status.message(), " (the weights were restored)"));
      }
    }
  }
  return merged;
}

absl::Status MergedPack::Restore() {
  if (restored_) return absl::OkStatus();
  restored_ = true;
  absl::Status status = TorchCallVoid(
      [&] {
        c10::InferenceMode guard;
        for (auto& [name, pair] : saved_) pair.first.copy_(pair.second);
      },
      "restoring merged weights");
  weights_mutex_->Unlock();
  return status;
}

MergedPack::~MergedPack() { (void)Restore(); }

int64_t MergedPack::saved_bytes() const {
  int64_t n = 0;
  for (const auto& [name, pair] : saved_) n += static_cast<int64_t>(pair.second.nbytes());
  return n;
}

}  // namespace delta
}  // namespace deltaserve
