// LoRA: y = W x + b + (alpha / rank) * B A x on the targeted linear layers, a different (A, B) on every row.
//
// Batching (BGMV, as in Punica / S-LoRA): the base matmul is shared by all rows; MakeLoraBatch gathers, for each
// targeted module, the A^T and the pre-scaled B^T of every row that carries a LoRA there into [B', in, rmax] and
// [B', rmax, out] (zero-padded to the largest rank among those rows), so OnLinear does two batched matmuls on the
// rows that need it, the second accumulating into the output (baddbmm; an index_select / index_add when only some
// rows carry one). When all those rows carry the same LoRA, its 2-D factors are used as they are (addmm).
// The output is updated in place only when nothing else holds it (Exclusive, methods_internal.h).
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

  LoraMethod(MethodSpec spec, std::string model_key, int64_t rank, std::map<std::string, Target> targets)
      : spec_(std::move(spec)), model_key_(std::move(model_key)), rank_(rank), targets_(std::move(targets)) {
    for (const auto& [name, t] : targets_) bytes_ += t.a_t.nbytes() + t.b_t.nbytes();
  }

  MethodKind kind() const override { return MethodKind::kLora; }
  const MethodSpec& spec() const override { return spec_; }
  int64_t bytes() const override { return bytes_; }

  // ModelKey of the model it was created for.
  const std::string& model_key() const { return model_key_; }
  int64_t rank() const { return rank_; }
  const std::map<std::string, Target>& targets() const { return targets_; }

 private:
  MethodSpec spec_;
  std::string model_key_;
  int64_t rank_ = 0;
  int64_t bytes_ = 0;
  std::map<std::string, Target> targets_;
};

class LoraBatch : public MethodBatch {
 public:
  struct ModuleDelta {
    at::Tensor rows;  // [B'] int64: the rows that carry a LoRA here; undefined when all do
    at::Tensor a;     // [B', in, rmax], or [in, r] when those rows all carry the same LoRA (`shared`)
    at::Tensor b;     // [B', rmax, out] or [r, out], scaled by alpha / rank
    bool shared = false;
  };

  explicit LoraBatch(int64_t num_rows) : num_rows_(num_rows) {}

  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = modules_.find(module.name);
    if (it == modules_.end()) return;
    const ModuleDelta& d = it->second;
    CheckRows(input, num_rows_, module, "lora");
    CheckRows(*output, num_rows_, module, "lora");
    const int64_t in = input.size(-1), out = output->size(-1);
    const bool in_place = Exclusive(*output);
    if (d.shared && !d.rows.defined()) {
      // One LoRA on every row: output + (x A^T) (s B)^T as one addmm on the flattened rows.
      const at::Tensor xa = at::mm(input.reshape({-1, in}), d.a);  // [M, r]
      if (in_place) {
        output->view({-1, out}).addmm_(xa, d.b);
      } else {
        *output = at::addmm(output->reshape({-1, out}), xa, d.b).view(output->sizes());
      }
      return;
    }
    at::Tensor x = input.reshape({num_rows_, -1, in});  // [B, N, in]
    if (!d.rows.defined()) {
      // Every row carries a LoRA here: two batched matmuls, the second accumulating into the output.
      const at::Tensor xa = at::bmm(x, d.a);  // [B, N, rmax]
      if (in_place) {
        output->view({num_rows_, -1, out}).baddbmm_(xa, d.b);
      } else {
        *output = at::baddbmm(output->reshape({num_rows_, -1, out}), xa, d.b).view(output->sizes());
      }
      return;
    }
    // Some rows: gather them, two batched matmuls, scatter-add back.
    x = x.index_select(0, d.rows);
    const at::Tensor delta = d.shared ? at::matmul(at::matmul(x, d.a), d.b) : at::bmm(at::bmm(x, d.a), d.b);
    if (in_place) {
      output->view({num_rows_, -1, out}).index_add_(0, d.rows, delta);
    } else {
      *output = output->reshape({num_rows_, -1, out}).index_add(0, d.rows, delta).view(output->sizes());
    }
  }

  std::unordered_map<std::string, ModuleDelta> modules_;

 private:
  const int64_t num_rows_;
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
  return std::unique_ptr<Method>(new LoraMethod(std::move(canonical), ModelKey(model), rank, std::move(targets)));
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
  // The rows of each targeted module.
  std::map<std::string, std::vector<int64_t>> module_rows;
  for (int64_t i = 0; i < num_rows; ++i) {
    if (loras[i] == nullptr) continue;
    for (const auto& [name, target] : loras[i]->targets()) module_rows[name].push_back(i);
  }
  auto batch = std::make_unique<LoraBatch>(num_rows);
  const c10::Device device(model.info().device);
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        std::map<std::vector<int64_t>, at::Tensor> row_tensors;  // one index tensor per distinct row set
        for (const auto& [name, row_ids] : module_rows) {
          LoraBatch::ModuleDelta d;
          if (static_cast<int64_t>(row_ids.size()) != num_rows) {
            at::Tensor& index = row_tensors[row_ids];
            if (!index.defined()) index = IndexTensor(row_ids, device);
            d.rows = index;
          }
          bool one_lora = true;
          int64_t rmax = 0;
          for (int64_t r : row_ids) {
            one_lora = one_lora && loras[r] == loras[row_ids.front()];
            rmax = std::max(rmax, loras[r]->rank());
          }
          if (one_lora) {
            const LoraMethod::Target& t = loras[row_ids.front()]->targets().at(name);
            d.shared = true;
            d.a = t.a_t;
            d.b = t.b_t;
            batch->modules_.emplace(name, std::move(d));
            continue;
          }
          // Each distinct LoRA's factors padded to rmax once, then one gather per row.
          std::unordered_map<const LoraMethod*, std::pair<at::Tensor, at::Tensor>> padded;
          std::vector<at::Tensor> as, bs;
          as.reserve(row_ids.size());
          bs.reserve(row_ids.size());
          for (int64_t r : row_ids) {
            auto [it, inserted] = padded.try_emplace(loras[r]);
            if (inserted) {
              const LoraMethod::Target& t = loras[r]->targets().at(name);
              const int64_t pad = rmax - loras[r]->rank();
              it->second.first = pad == 0 ? t.a_t : at::constant_pad_nd(t.a_t, {0, pad});
              it->second.second = pad == 0 ? t.b_t : at::constant_pad_nd(t.b_t, {0, 0, 0, pad});
            }
            as.push_back(it->second.first);
            bs.push_back(it->second.second);
          }
          d.a = at::stack(as);
          d.b = at::stack(bs);
          batch->modules_.emplace(name, std::move(d));
        }
      },
      "lora: preparing the batch"));
  return std::unique_ptr<MethodBatch>(std::move(batch));
}

}  // namespace delta
}  // namespace deltaserve
