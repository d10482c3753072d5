// LoRA: y = W x + b + (alpha / rank) * B A x on the targeted linear layers, a different (A, B) on every row.
//
// Batching (SGMV, as in Punica / S-LoRA, on the CPU): the base matmul is shared by all rows. Per targeted module,
// the rows that carry a LoRA there form segments of consecutive rows with the same LoRA; OnLinear adds
// (x_seg A^T)(s B)^T to each segment's rows of the output in place, with two GEMMs on the LoRA's own factors (no
// per-batch copies of them). Segments run on the intra-op threads in parallel (ForEachSegmentPiece).
#include <ATen/ATen.h>

#include <algorithm>
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

const std::vector<std::string> kDefaultTargets = {"query", "value"};

class LoraMethod : public Method {
 public:
  struct Target {
    at::Tensor a_t;  // [in, r] on the model's device and dtype
    at::Tensor b_t;  // [r, out], scaled by alpha / rank
  };

  LoraMethod(MethodSpec spec, std::string model_key, std::map<std::string, Target> targets)
      : spec_(std::move(spec)), model_key_(std::move(model_key)), targets_(std::move(targets)) {
    for (const auto& [name, t] : targets_) bytes_ += t.a_t.nbytes() + t.b_t.nbytes();
  }

  MethodKind kind() const override { return MethodKind::kLora; }
  const MethodSpec& spec() const override { return spec_; }
  int64_t bytes() const override { return bytes_; }

  // ModelKey of the model it was created for.
  const std::string& model_key() const { return model_key_; }
  const std::map<std::string, Target>& targets() const { return targets_; }

 private:
  MethodSpec spec_;
  std::string model_key_;
  int64_t bytes_ = 0;
  std::map<std::string, Target> targets_;
};

class LoraBatch : public MethodBatch {
 public:
  // A run of consecutive rows [first, first + count) that carry the same LoRA at a module (SGMV's segment).
  struct Segment {
    int64_t first = 0;
    int64_t count = 0;
    const LoraMethod::Target* factors = nullptr;
  };

  explicit LoraBatch(int64_t num_rows) : MethodBatch(num_rows) {}

  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = modules_.find(module.name);
    if (it == modules_.end()) return;
    const model::TokenLayout& rows = layout();
    CheckRows(input, rows, module, "lora");
    CheckRows(*output, rows, module, "lora");
    const at::Tensor x = input.contiguous();
    // The model lets hooks update outputs in place, also a fused projection's slice (model.h): a segment's
    // tokens are a [tokens, out] matrix with a row stride BLAS takes as it is.
    // y[segment] += (x[segment] A^T) (s B)^T; a segment's tokens are contiguous in both.
    auto apply = [&](const Segment& s) {
      rows.Rows(*output, s.first, s.count)
          .addmm_(at::mm(rows.Rows(x, s.first, s.count), s.factors->a_t), s.factors->b_t);
    };
    ForEachSegmentPiece(it->second, rows.rows(), x, apply);
  }

  // Module name -> the segments of the rows that carry a LoRA there, in row order.
  std::unordered_map<std::string, std::vector<Segment>> modules_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Method>> CreateLora(MethodSpec spec, const model::Model& model,
                                                   const MethodLimits& limits) {
  spec.kind = MethodKind::kLora;
  DS_RETURN_IF_ERROR(CheckConfigKeys(spec, {"rank", "alpha", "targets"}));
  DS_ASSIGN_OR_RETURN(const int64_t rank, ConfigPositiveInt(spec, "rank", limits.max_rank, 8));
  DS_ASSIGN_OR_RETURN(const double alpha, ConfigNumber(spec, "alpha", static_cast<double>(rank)));
  DS_ASSIGN_OR_RETURN(std::vector<std::string> patterns, TargetPatterns(spec, kDefaultTargets));
  DS_ASSIGN_OR_RETURN(std::vector<const model::ModuleInfo*> modules,
                      ResolveMethodTargets(spec, patterns, model, {model::ModuleKind::kLinear}, "linear modules"));
  const double scaling = alpha / static_cast<double>(rank);

  std::map<std::string, LoraMethod::Target> targets;
  MethodSpec canonical;
  canonical.kind = MethodKind::kLora;
  std::set<std::string> used;
  std::set<std::string> seen;
  for (const model::ModuleInfo* m : modules) {
    if (!seen.insert(m->name).second) continue;
    const std::string a_name = m->name + ".lora_A", b_name = m->name + ".lora_B";
    DS_ASSIGN_OR_RETURN(at::Tensor a, RequireTensor(spec, a_name, {rank, m->in_features}, &used));
    DS_ASSIGN_OR_RETURN(at::Tensor b, RequireTensor(spec, b_name, {m->out_features, rank}, &used));
    DS_ASSIGN_OR_RETURN(at::Tensor a_t_cpu, TorchCall([&] { return a.t().contiguous(); }, "lora: A^T"));
    DS_ASSIGN_OR_RETURN(at::Tensor b_t_cpu,
                        TorchCall([&] { return b.t().mul(scaling).contiguous(); }, "lora: scaled B^T"));
    LoraMethod::Target target;
    DS_ASSIGN_OR_RETURN(target.a_t, ToModelDevice(a_t_cpu, model));
    DS_ASSIGN_OR_RETURN(target.b_t, ToModelDevice(b_t_cpu, model));
    targets[m->name] = std::move(target);
    canonical.tensors[a_name] = std::move(a);
    canonical.tensors[b_name] = std::move(b);
  }
  DS_RETURN_IF_ERROR(CheckNoUnexpectedTensors(spec, used));
  canonical.config = {{"rank", rank}, {"alpha", alpha}, {"targets", SortedNames(modules)}};
  return std::unique_ptr<Method>(new LoraMethod(std::move(canonical), ModelKey(model), std::move(targets)));
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakeLoraBatch(const std::vector<const Method*>& rows,
                                                           const model::Model& model) {
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const std::string key = ModelKey(model);
  std::vector<const LoraMethod*> loras(rows.size(), nullptr);
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] == nullptr) continue;
    if (rows[i]->kind() != MethodKind::kLora) {
      return absl::InvalidArgumentError(
          absl::StrCat("lora batch: row ", i, " carries a ", MethodKindName(rows[i]->kind()), " method"));
    }
    loras[i] = static_cast<const LoraMethod*>(rows[i]);
    if (loras[i]->model_key() != key) {
      return absl::InvalidArgumentError(
          absl::StrCat("lora batch: row ", i, "'s method was created for another model, dtype or device"));
    }
  }
  // Each targeted module's segments: consecutive rows with the same LoRA there share one.
  auto batch = std::make_unique<LoraBatch>(num_rows);
  for (int64_t i = 0; i < num_rows; ++i) {
    if (loras[i] == nullptr) continue;
    for (const auto& [name, target] : loras[i]->targets()) {
      std::vector<LoraBatch::Segment>& segments = batch->modules_[name];
      if (!segments.empty() && segments.back().factors == &target &&
          segments.back().first + segments.back().count == i) {
        ++segments.back().count;
      } else {
        segments.push_back({i, 1, &target});
      }
    }
  }
  return std::unique_ptr<MethodBatch>(std::move(batch));
}

}  // namespace delta
}  // namespace deltaserve
