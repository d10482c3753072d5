// (IA)^3: learned per-feature scales, a different set on every row: the outputs of the targeted linears (keys and
// values by default) and, for the "feedforward" targets, their inputs (the FFN down-projection's input, i.e. the
// activated intermediate: l_ff). Per module, the hook is one broadcast multiply by every row's scale (ones for rows
// without), or, when at most half the rows carry one, a multiply on each run of rows with the same scale
// (RowVectors).
#include <ATen/ATen.h>

#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/methods_internal.h"
#include "server/delta/module_patterns.h"

namespace deltaserve {
namespace delta {
namespace {

// PEFT's BERT defaults: keys, values and the FFN down-projection (encoder.layer.N.output.dense, not
// encoder.layer.N.attention.output.dense, which the dotted suffix "output.dense" would also match).
const char kFeedForwardPattern[] = "re:.*\\.layer\\.[0-9]+\\.output\\.dense";
const std::vector<std::string> kDefaultTargets = {"key", "value", kFeedForwardPattern};
const std::vector<std::string> kDefaultFeedForward = {kFeedForwardPattern};

// config["feedforward"] as a list of valid patterns (may be empty), or the defaults when absent.
absl::StatusOr<std::vector<std::string>> FeedForwardPatterns(const MethodSpec& spec, bool* explicit_list) {
  *explicit_list = false;
  auto it = spec.config.find("feedforward");
  if (it == spec.config.end() || it->is_null()) return kDefaultFeedForward;
  *explicit_list = true;
  if (!it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ia3: \"feedforward\" must be a list of module patterns, got ", it->dump()));
  }
  std::vector<std::string> out;
  for (const auto& p : *it) {
    if (!p.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("ia3: \"feedforward\" must hold strings, got ", p.dump()));
    }
    absl::Status valid = ValidatePattern(p.get<std::string>());
    if (!valid.ok()) return absl::InvalidArgumentError(absl::StrCat("ia3: \"feedforward\": ", valid.message()));
    out.push_back(p.get<std::string>());
  }
  return out;
}

class Ia3Method : public Method {
 public:
  struct Target {
    bool feedforward = false;  // scales the input (else the output)
    at::Tensor scale;          // [in] or [out] on the model's device and dtype
  };

  Ia3Method(MethodSpec spec, std::string model_key, std::map<std::string, Target> targets)
      : spec_(std::move(spec)), model_key_(std::move(model_key)), targets_(std::move(targets)) {
    for (const auto& [name, t] : targets_) bytes_ += t.scale.nbytes();
  }

  MethodKind kind() const override { return MethodKind::kIa3; }
  const MethodSpec& spec() const override { return spec_; }
  int64_t bytes() const override { return bytes_; }

  // ModelKey of the model it was created for.
  const std::string& model_key() const { return model_key_; }
  const std::map<std::string, Target>& targets() const { return targets_; }

 private:
  MethodSpec spec_;
  std::string model_key_;
  std::map<std::string, Target> targets_;
  int64_t bytes_ = 0;
};

class Ia3Batch : public MethodBatch {
 public:
  explicit Ia3Batch(int64_t num_rows) : MethodBatch(num_rows) {}

  void OnLinearInput(const model::ModuleInfo& module, at::Tensor* input) override {
    Scale(input_scales_, module, input, Exclusive(*input));
  }
  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    Scale(output_scales_, module, output, /*writable=*/true);  // linear outputs may be updated in place (model.h)
  }

  // Module name -> the rows' scales.
  std::unordered_map<std::string, RowVectors> input_scales_, output_scales_;

 private:
  void Scale(const std::unordered_map<std::string, RowVectors>& scales, const model::ModuleInfo& module,
             at::Tensor* t, bool writable) {
    auto it = scales.find(module.name);
    if (it == scales.end()) return;
    CheckRows(*t, layout(), module, "ia3");
    ApplyRowVectors(it->second, layout(), /*multiply=*/true, writable, t);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Method>> CreateIa3(MethodSpec spec, const model::Model& model,
                                                  const MethodLimits& limits) {
  spec.kind = MethodKind::kIa3;
  DS_RETURN_IF_ERROR(CheckConfigKeys(spec, {"targets", "feedforward"}));
  DS_ASSIGN_OR_RETURN(std::vector<std::string> patterns, TargetPatterns(spec, kDefaultTargets));
  bool explicit_feedforward = false;
  DS_ASSIGN_OR_RETURN(std::vector<std::string> ff_patterns, FeedForwardPatterns(spec, &explicit_feedforward));
  DS_ASSIGN_OR_RETURN(std::vector<const model::ModuleInfo*> modules,
                      ResolveMethodTargets(spec, patterns, model, {model::ModuleKind::kLinear}, "linear modules"));
  // Feed-forward modules: the targets that also match a feed-forward pattern.
  auto is_feedforward = [&](const std::string& name) {
    for (const std::string& p : ff_patterns) {
      if (PatternMatches(p, name)) return true;
    }
    return false;
  };
  if (explicit_feedforward) {
    for (const std::string& p : ff_patterns) {
      bool any = false;
      for (const model::ModuleInfo* m : modules) any = any || PatternMatches(p, m->name);
      if (!any) {
        return absl::InvalidArgumentError(absl::StrCat("ia3: feedforward pattern \"", p,
                                                       "\" matches none of the targets (feed-forward modules must "
                                                       "also be targets)"));
      }
    }
  }
  MethodSpec canonical;
  canonical.kind = MethodKind::kIa3;
  std::map<std::string, Ia3Method::Target> targets;
  std::vector<const model::ModuleInfo*> feedforward;
  std::set<std::string> used;
  for (const model::ModuleInfo* m : modules) {
    if (targets.count(m->name)) continue;
    Ia3Method::Target& target = targets[m->name];
    target.feedforward = is_feedforward(m->name);
    if (target.feedforward) feedforward.push_back(m);
    const std::string name = m->name + ".ia3_l";
    DS_ASSIGN_OR_RETURN(at::Tensor l,
                        RequireTensor(spec, name, {target.feedforward ? m->in_features : m->out_features}, &used));
    DS_ASSIGN_OR_RETURN(target.scale, ToModelDevice(l, model));
    canonical.tensors[name] = std::move(l);
  }
  DS_RETURN_IF_ERROR(CheckNoUnexpectedTensors(spec, used));
  canonical.config = {{"targets", SortedNames(modules)},
                      {"feedforward", nlohmann::json(SortedNames(feedforward))}};
  return std::unique_ptr<Method>(new Ia3Method(std::move(canonical), ModelKey(model), std::move(targets)));
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakeIa3Batch(const std::vector<const Method*>& rows,
                                                          const model::Model& model) {
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const std::string key = ModelKey(model);
  std::vector<const Ia3Method*> methods(rows.size(), nullptr);
  // (module, feed-forward) for every module some row targets.
  std::set<std::pair<std::string, bool>> modules;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] == nullptr) continue;
    if (rows[i]->kind() != MethodKind::kIa3) {
      return absl::InvalidArgumentError(
          absl::StrCat("ia3 batch: row ", i, " carries a ", MethodKindName(rows[i]->kind()), " method"));
    }
    methods[i] = static_cast<const Ia3Method*>(rows[i]);
    if (methods[i]->model_key() != key) {
      return absl::InvalidArgumentError(
          absl::StrCat("ia3 batch: row ", i, "'s method was created for another model, dtype or device"));
    }
    for (const auto& [name, t] : methods[i]->targets()) modules.insert({name, t.feedforward});
  }
  auto batch = std::make_unique<Ia3Batch>(num_rows);
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        for (const auto& [name, feedforward] : modules) {
          std::vector<at::Tensor> per_row(rows.size());
          for (size_t i = 0; i < methods.size(); ++i) {
            if (methods[i] == nullptr) continue;
            auto it = methods[i]->targets().find(name);
            if (it == methods[i]->targets().end() || it->second.feedforward != feedforward) continue;
            per_row[i] = it->second.scale;
          }
          auto& scales = feedforward ? batch->input_scales_ : batch->output_scales_;
          scales.emplace(name, PlanRowVectors(per_row, /*identity=*/1));
        }
      },
      "ia3: preparing the batch"));
  return std::unique_ptr<MethodBatch>(std::move(batch));
}

}  // namespace delta
}  // namespace deltaserve
