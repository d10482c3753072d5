#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/isfinite.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/methods_internal.h"
#include "server/delta/module_patterns.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<at::Tensor> RequireTensor(const MethodSpec& spec, const std::string& name,
                                         const std::vector<int64_t>& shape, std::set<std::string>* used) {
  const char* kind = MethodKindName(spec.kind);
  auto it = spec.tensors.find(name);
  if (it == spec.tensors.end() || !it->second.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(kind, ": tensor \"", name, "\" is missing"));
  }
  const at::Tensor& t = it->second;
  if (t.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(
        absl::StrCat(kind, ": tensor \"", name, "\" is ", c10::toString(t.scalar_type()), ", expected float32"));
  }
  if (t.sizes() != c10::IntArrayRef(shape)) {
    return absl::InvalidArgumentError(absl::StrCat(kind, ": tensor \"", name, "\" has shape ",
                                                   ShapeString(t.sizes()), ", expected ", ShapeString(shape)));
  }
  DS_ASSIGN_OR_RETURN(bool finite, TorchCall([&] { return at::isfinite(t).all().item<bool>(); }, "finite check"));
  if (!finite) {
    return absl::InvalidArgumentError(absl::StrCat(kind, ": tensor \"", name, "\" holds NaN or Inf values"));
  }
  if (used != nullptr) used->insert(name);
  return t.contiguous();
}

absl::Status CheckNoUnexpectedTensors(const MethodSpec& spec, const std::set<std::string>& used) {
  for (const auto& [name, t] : spec.tensors) {
    if (!used.count(name)) {
      return absl::InvalidArgumentError(absl::StrCat(MethodKindName(spec.kind), ": unexpected tensor \"", name,
                                                     "\" (not used by any target of this method)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> ToModelDevice(const at::Tensor& t, const model::Model& model) {
  const model::ModelInfo& info = model.info();
  const at::ScalarType dtype = info.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  return TorchCall([&] { return t.to(c10::Device(info.device), dtype).contiguous(); }, "placing a delta tensor");
}

absl::StatusOr<std::vector<std::string>> TargetPatterns(const MethodSpec& spec,
                                                        const std::vector<std::string>& defaults) {
  auto it = spec.config.find("targets");
  if (it == spec.config.end() || it->is_null()) return defaults;
  if (!it->is_array() || it->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(MethodKindName(spec.kind), ": \"targets\" must be a non-empty list of module patterns"));
  }
  std::vector<std::string> out;
  for (const auto& p : *it) {
    if (!p.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(MethodKindName(spec.kind), ": \"targets\" must hold strings, got ", p.dump()));
    }
    out.push_back(p.get<std::string>());
  }
  return out;
}

absl::StatusOr<int64_t> ConfigPositiveInt(const MethodSpec& spec, const char* key, int64_t max, int64_t fallback) {
  auto it = spec.config.find(key);
  if (it == spec.config.end() || it->is_null()) {
    if (fallback < 0) {
      return absl::InvalidArgumentError(absl::StrCat(MethodKindName(spec.kind), ": \"", key, "\" is required"));
    }
    return fallback;
  }
  if (!it->is_number_integer() || it->get<int64_t>() < 1 || it->get<int64_t>() > max) {
    return absl::InvalidArgumentError(absl::StrCat(MethodKindName(spec.kind), ": \"", key,
                                                   "\" must be an integer in [1, ", max, "], got ", it->dump()));
  }
  return it->get<int64_t>();
}

absl::StatusOr<double> ConfigNumber(const MethodSpec& spec, const char* key, double fallback) {
  auto it = spec.config.find(key);
  if (it == spec.config.end() || it->is_null()) return fallback;
  if (!it->is_number() || !std::isfinite(it->get<double>())) {
    return absl::InvalidArgumentError(
        absl::StrCat(MethodKindName(spec.kind), ": \"", key, "\" must be a finite number, got ", it->dump()));
  }
  return it->get<double>();
}

absl::StatusOr<std::string> ConfigString(const MethodSpec& spec, const char* key, const std::string& fallback) {
  auto it = spec.config.find(key);
  if (it == spec.config.end() || it->is_null()) return fallback;
  if (!it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(MethodKindName(spec.kind), ": \"", key, "\" must be a string, got ", it->dump()));
  }
  return it->get<std::string>();
}

absl::Status CheckConfigKeys(const MethodSpec& spec, const std::vector<std::string>& known) {
  const char* kind = MethodKindName(spec.kind);
  if (spec.config.is_null()) return absl::OkStatus();
  if (!spec.config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(kind, ": config must be a JSON object, got ", spec.config.dump()));
  }
  for (const auto& item : spec.config.items()) {
    if (std::find(known.begin(), known.end(), item.key()) == known.end()) {
      return absl::InvalidArgumentError(absl::StrCat(kind, ": unknown config key \"", item.key(), "\" (known: ",
                                                     absl::StrJoin(known, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<const model::ModuleInfo*>> ResolveMethodTargets(
    const MethodSpec& spec, const std::vector<std::string>& patterns, const model::Model& model,
    const std::vector<model::ModuleKind>& kinds, const char* what) {
  const char* kind = MethodKindName(spec.kind);
  absl::StatusOr<std::vector<const model::ModuleInfo*>> resolved = ResolveTargets(patterns, model, kinds);
  if (resolved.ok()) {
    if (resolved->empty()) {
      return absl::InvalidArgumentError(absl::StrCat(kind, ": the targets match no ", what));
    }
    return resolved;
  }
  if (resolved.status().code() != absl::StatusCode::kInvalidArgument) return resolved.status();
  for (const std::string& pattern : patterns) {
    if (!ValidatePattern(pattern).ok()) continue;
    bool right_kind = false;
    const model::ModuleInfo* other = nullptr;
    for (const model::ModuleInfo& m : model.modules()) {
      if (!PatternMatches(pattern, m.name)) continue;
      if (std::find(kinds.begin(), kinds.end(), m.kind) != kinds.end()) {
        right_kind = true;
        break;
      }
      if (other == nullptr) other = &m;
    }
    if (!right_kind && other != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(kind, ": target \"", pattern, "\" matches ",
                                                     model::ModuleKindName(other->kind), " module \"", other->name,
                                                     "\"; ", kind, " applies to ", what, " only"));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(kind, ": ", resolved.status().message()));
}

std::vector<std::string> SortedNames(const std::vector<const model::ModuleInfo*>& modules) {
  std::set<std::string> names;
  for (const model::ModuleInfo* m : modules) names.insert(m->name);
  return std::vector<std::string>(names.begin(), names.end());
}

std::string ModelKey(const model::Model& model) {
  const model::ModelInfo& info = model.info();
  return absl::StrCat(info.fingerprint, "|", info.dtype, "|", info.device);
}

at::Tensor IndexTensor(const std::vector<int64_t>& v, const c10::Device& device) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t.to(device);
}

void CheckRows(const at::Tensor& t, const model::TokenLayout& layout, const model::ModuleInfo& module,
               const char* kind) {
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == layout.leading(), kind, " batch of ", layout.rows(), " rows",
              layout.packed() ? " packed" : "", " got a tensor of shape ", t.sizes(), " at ", module.name);
}

bool Exclusive(const at::Tensor& t) {
  return t.use_count() == 1 && t.storage().use_count() == 1 && t.is_contiguous();
}

RowVectors PlanRowVectors(const std::vector<at::Tensor>& per_row, double identity) {
  RowVectors plan;
  int64_t carrying = 0;
  bool same = true;  // every row carries the same vector
  at::Tensor like;
  for (const at::Tensor& v : per_row) {
    if (!v.defined()) {
      same = false;
      continue;
    }
    ++carrying;
    same = same && (!like.defined() || v.is_same(like));
    if (!like.defined()) like = v;
  }
  if (!like.defined()) return plan;
  const int64_t rows = static_cast<int64_t>(per_row.size());
  if (same) {
    plan.dense = like.unsqueeze(0);
    return plan;
  }
  if (2 * carrying <= rows) {
    for (int64_t i = 0; i < rows; ++i) {
      const at::Tensor& v = per_row[i];
      if (!v.defined()) continue;
      if (!plan.segments.empty() && plan.segments.back().vector.is_same(v) &&
          plan.segments.back().first + plan.segments.back().count == i) {
        ++plan.segments.back().count;
      } else {
        plan.segments.push_back({i, 1, v});
      }
    }
    return plan;
  }
  const at::Tensor fill = at::full({like.size(0)}, identity, like.options());
  std::vector<at::Tensor> filled(per_row.begin(), per_row.end());
  for (at::Tensor& v : filled) {
    if (!v.defined()) v = fill;
  }
  plan.dense = at::stack(filled);
  return plan;
}

void ApplyRowVectors(const RowVectors& plan, const model::TokenLayout& layout, bool multiply, bool writable,
                     at::Tensor* t) {
  if (plan.dense.defined()) {
    const at::Tensor v = layout.PerRow(plan.dense, *t);
    if (writable) {
      multiply ? t->mul_(v) : t->add_(v);
    } else {
      *t = multiply ? t->mul(v) : t->add(v);
    }
    return;
  }
  if (plan.segments.empty()) return;
  if (!writable) *t = t->clone(at::MemoryFormat::Contiguous);
  for (const RowVectors::Segment& s : plan.segments) {
    at::Tensor rows = layout.Rows(*t, s.first, s.count);
    multiply ? rows.mul_(s.vector) : rows.add_(s.vector);
  }
}

}  // namespace delta
}  // namespace deltaserve
