// LN-tuning: deltas of the gain and bias of each targeted layer norm, a different pair on every row:
//   y' = normalized(x) * (gain + dgain) + (bias + dbias) = y + normalized(x) * dgain + dbias.
// MakeLnTuningBatch gathers, per layer norm, the deltas of the rows that carry one into [B', d]; the hook
// re-normalizes only those rows (layer_norm without affine, the module's eps) and index_adds the delta back.
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

namespace deltaserve {
namespace delta {
namespace {

// Every layer norm.
const std::vector<std::string> kDefaultTargets = {"re:.*"};

class LnTuningMethod : public Method {
 public:
  struct Target {
    at::Tensor gain;  // [d] on the model's device and dtype
    at::Tensor bias;  // [d]
  };

  LnTuningMethod(MethodSpec spec, std::string model_key, std::map<std::string, Target> targets)
      : spec_(std::move(spec)), model_key_(std::move(model_key)), targets_(std::move(targets)) {
    for (const auto& [name, t] : targets_) bytes_ += t.gain.nbytes() + t.bias.nbytes();
  }

  MethodKind kind() const override { return MethodKind::kLnTuning; }
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

class LnTuningBatch : public MethodBatch {
 public:
  struct ModuleDelta {
    at::Tensor rows;  // [B'] int64: the rows that carry a delta here; undefined when all do
    std::vector<int64_t> row_ids;  // the same rows, on the host
    at::Tensor gain;  // [B', d]
    at::Tensor bias;  // [B', d]
    double eps = 0;
  };

  explicit LnTuningBatch(int64_t num_rows) : MethodBatch(num_rows) {}

  void OnLayerNorm(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = modules_.find(module.name);
    if (it == modules_.end()) return;
    const ModuleDelta& d = it->second;
    const model::TokenLayout& layout = this->layout();
    CheckRows(input, layout, module, "ln_tuning");
    CheckRows(*output, layout, module, "ln_tuning");
    const int64_t width = input.size(-1);
    // `index`: what carries a delta here along the first dimension (rows padded, their tokens packed);
    // undefined when everything does. gain / bias: one per row of `x`, or per token packed.
    at::Tensor index = d.rows, gain = d.gain, bias = d.bias;
    if (layout.packed() && d.rows.defined()) {
      std::vector<int64_t> tokens, owner;  // each carrying token and the entry of its row in d.gain / d.bias
      for (size_t j = 0; j < d.row_ids.size(); ++j) {
        for (int64_t t = layout.offset(d.row_ids[j]); t < layout.offset(d.row_ids[j] + 1); ++t) {
          tokens.push_back(t);
          owner.push_back(static_cast<int64_t>(j));
        }
      }
      index = IndexTensor(tokens, input.device());
      const at::Tensor entries = IndexTensor(owner, input.device());
      gain = gain.index_select(0, entries);
      bias = bias.index_select(0, entries);
    } else {
      gain = layout.PerRow(gain, input);
      bias = layout.PerRow(bias, input);
    }
    at::Tensor x = index.defined() ? input.index_select(0, index) : input;
    at::Tensor normalized = at::layer_norm(x, {width}, {}, {}, d.eps);
    at::Tensor delta = normalized.mul(gain).add(bias);
    const bool in_place = Exclusive(*output);
    if (index.defined()) {
      if (in_place) {
        output->index_add_(0, index, delta);
      } else {
        *output = output->index_add(0, index, delta);
      }
    } else if (in_place) {
      output->add_(delta);
    } else {
      *output = output->add(delta);
    }
  }

  std::unordered_map<std::string, ModuleDelta> modules_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Method>> CreateLnTuning(MethodSpec spec, const model::Model& model,
                                                       const MethodLimits& limits) {
  spec.kind = MethodKind::kLnTuning;
  DS_RETURN_IF_ERROR(CheckConfigKeys(spec, {"targets"}));
  DS_ASSIGN_OR_RETURN(std::vector<std::string> patterns, TargetPatterns(spec, kDefaultTargets));
  DS_ASSIGN_OR_RETURN(std::vector<const model::ModuleInfo*> modules,
                      ResolveMethodTargets(spec, patterns, model, {model::ModuleKind::kLayerNorm},
                                           "layer-norm modules"));
  MethodSpec canonical;
  canonical.kind = MethodKind::kLnTuning;
  std::map<std::string, LnTuningMethod::Target> targets;
  std::set<std::string> used;
  for (const model::ModuleInfo* m : modules) {
    if (targets.count(m->name)) continue;
    const std::string gain_name = m->name + ".weight", bias_name = m->name + ".bias";
    DS_ASSIGN_OR_RETURN(at::Tensor gain, RequireTensor(spec, gain_name, {m->in_features}, &used));
    DS_ASSIGN_OR_RETURN(at::Tensor bias, RequireTensor(spec, bias_name, {m->in_features}, &used));
    LnTuningMethod::Target& target = targets[m->name];
    DS_ASSIGN_OR_RETURN(target.gain, ToModelDevice(gain, model));
    DS_ASSIGN_OR_RETURN(target.bias, ToModelDevice(bias, model));
    canonical.tensors[gain_name] = std::move(gain);
    canonical.tensors[bias_name] = std::move(bias);
  }
  DS_RETURN_IF_ERROR(CheckNoUnexpectedTensors(spec, used));
  canonical.config = {{"targets", SortedNames(modules)}};
  return std::unique_ptr<Method>(new LnTuningMethod(std::move(canonical), ModelKey(model), std::move(targets)));
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakeLnTuningBatch(const std::vector<const Method*>& rows,
                                                               const model::Model& model) {
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const std::string key = ModelKey(model);
  std::vector<const LnTuningMethod*> methods(rows.size(), nullptr);
  std::map<std::string, std::vector<int64_t>> module_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] == nullptr) continue;
    if (rows[i]->kind() != MethodKind::kLnTuning) {
      return absl::InvalidArgumentError(
          absl::StrCat("ln_tuning batch: row ", i, " carries a ", MethodKindName(rows[i]->kind()), " method"));
    }
    methods[i] = static_cast<const LnTuningMethod*>(rows[i]);
    if (methods[i]->model_key() != key) {
      return absl::InvalidArgumentError(
          absl::StrCat("ln_tuning batch: row ", i, "'s method was created for another model, dtype or device"));
    }
    for (const auto& [name, t] : methods[i]->targets()) module_rows[name].push_back(static_cast<int64_t>(i));
  }
  std::unordered_map<std::string, double> eps;
  for (const model::ModuleInfo& m : model.modules()) {
    if (module_rows.count(m.name)) eps[m.name] = m.eps;
  }
  auto batch = std::make_unique<LnTuningBatch>(num_rows);
  const c10::Device device(model.info().device);
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        std::map<std::vector<int64_t>, at::Tensor> row_tensors;  // one index tensor per distinct row set
        for (const auto& [name, row_ids] : module_rows) {
          LnTuningBatch::ModuleDelta d;
          std::vector<at::Tensor> gains, biases;
          for (int64_t r : row_ids) {
            const LnTuningMethod::Target& t = methods[r]->targets().at(name);
            gains.push_back(t.gain);
            biases.push_back(t.bias);
          }
          d.gain = at::stack(gains);
          d.bias = at::stack(biases);
          if (static_cast<int64_t>(row_ids.size()) != num_rows) {
            at::Tensor& index = row_tensors[row_ids];
            if (!index.defined()) index = IndexTensor(row_ids, device);
            d.rows = index;
            d.row_ids = row_ids;
          }
          d.eps = eps[name];
          batch->modules_.emplace(name, std::move(d));
        }
      },
      "ln_tuning: preparing the batch"));
  return std::unique_ptr<MethodBatch>(std::move(batch));
}

}  // namespace delta
}  // namespace deltaserve
