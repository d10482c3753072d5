// BitFit: a bias delta added to the output of each targeted linear or layer-norm module, a different one on every
// row. Per module, the hook is one broadcast add of every row's bias (zeros for rows without), or, when at most
// half the rows carry one, an add on each run of rows with the same bias (RowVectors).
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

// Every linear and layer-norm module (BitFit tunes all biases).
const std::vector<std::string> kDefaultTargets = {"re:.*"};

// The width of the bias of module `m`.
int64_t BiasWidth(const model::ModuleInfo& m) {
  return m.kind == model::ModuleKind::kLinear ? m.out_features : m.in_features;
}

class BitFitMethod : public Method {
 public:
  BitFitMethod(MethodSpec spec, std::string model_key, std::map<std::string, at::Tensor> biases)
      : spec_(std::move(spec)), model_key_(std::move(model_key)), biases_(std::move(biases)) {
    for (const auto& [name, b] : biases_) bytes_ += b.nbytes();
  }

  MethodKind kind() const override { return MethodKind::kBitFit; }
  const MethodSpec& spec() const override { return spec_; }
  int64_t bytes() const override { return bytes_; }

  // ModelKey of the model it was created for.
  const std::string& model_key() const { return model_key_; }
  // Module name -> bias delta [out] on the model's device and dtype.
  const std::map<std::string, at::Tensor>& biases() const { return biases_; }

 private:
  MethodSpec spec_;
  std::string model_key_;
  std::map<std::string, at::Tensor> biases_;
  int64_t bytes_ = 0;
};

class BitFitBatch : public MethodBatch {
 public:
  explicit BitFitBatch(int64_t num_rows) : MethodBatch(num_rows) {}

  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    Add(module, output, /*writable=*/true);  // linear outputs may be updated in place (model.h)
  }
  void OnLayerNorm(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    Add(module, output, Exclusive(*output));
  }

  // Module name -> the rows' bias deltas.
  std::unordered_map<std::string, RowVectors> biases_;

 private:
  void Add(const model::ModuleInfo& module, at::Tensor* output, bool writable) {
    auto it = biases_.find(module.name);
    if (it == biases_.end()) return;
    CheckRows(*output, layout(), module, "bitfit");
    ApplyRowVectors(it->second, layout(), /*multiply=*/false, writable, output);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Method>> CreateBitFit(MethodSpec spec, const model::Model& model,
                                                     const MethodLimits& limits) {
  spec.kind = MethodKind::kBitFit;
  DS_RETURN_IF_ERROR(CheckConfigKeys(spec, {"targets"}));
  DS_ASSIGN_OR_RETURN(std::vector<std::string> patterns, TargetPatterns(spec, kDefaultTargets));
  DS_ASSIGN_OR_RETURN(std::vector<const model::ModuleInfo*> modules,
                      ResolveMethodTargets(spec, patterns, model,
                                           {model::ModuleKind::kLinear, model::ModuleKind::kLayerNorm},
                                           "linear and layer-norm modules"));
  MethodSpec canonical;
  canonical.kind = MethodKind::kBitFit;
  std::map<std::string, at::Tensor> biases;
  std::set<std::string> used;
  for (const model::ModuleInfo* m : modules) {
    if (biases.count(m->name)) continue;
    const std::string name = m->name + ".bias";
    DS_ASSIGN_OR_RETURN(at::Tensor bias, RequireTensor(spec, name, {BiasWidth(*m)}, &used));
    DS_ASSIGN_OR_RETURN(biases[m->name], ToModelDevice(bias, model));
    canonical.tensors[name] = std::move(bias);
  }
  DS_RETURN_IF_ERROR(CheckNoUnexpectedTensors(spec, used));
  canonical.config = {{"targets", SortedNames(modules)}};
  return std::unique_ptr<Method>(new BitFitMethod(std::move(canonical), ModelKey(model), std::move(biases)));
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakeBitFitBatch(const std::vector<const Method*>& rows,
                                                             const model::Model& model) {
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const std::string key = ModelKey(model);
  std::vector<const BitFitMethod*> methods(rows.size(), nullptr);
  // Every module some row targets.
  std::set<std::string> modules;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] == nullptr) continue;
    if (rows[i]->kind() != MethodKind::kBitFit) {
      return absl::InvalidArgumentError(
          absl::StrCat("bitfit batch: row ", i, " carries a ", MethodKindName(rows[i]->kind()), " method"));
    }
    methods[i] = static_cast<const BitFitMethod*>(rows[i]);
    if (methods[i]->model_key() != key) {
      return absl::InvalidArgumentError(
          absl::StrCat("bitfit batch: row ", i, "'s method was created for another model, dtype or device"));
    }
    for (const auto& [name, b] : methods[i]->biases()) modules.insert(name);
  }
  auto batch = std::make_unique<BitFitBatch>(num_rows);
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        for (const std::string& name : modules) {
          std::vector<at::Tensor> per_row(rows.size());
          for (size_t i = 0; i < methods.size(); ++i) {
            if (methods[i] == nullptr) continue;
            auto it = methods[i]->biases().find(name);
            if (it != methods[i]->biases().end()) per_row[i] = it->second;
          }
          batch->biases_.emplace(name, PlanRowVectors(per_row, /*identity=*/0));
        }
      },
      "bitfit: preparing the batch"));
  return std::unique_ptr<MethodBatch>(std::move(batch));
}

}  // namespace delta
}  // namespace deltaserve
