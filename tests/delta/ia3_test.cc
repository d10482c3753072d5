// (IA)^3: batched per-row scales vs each row alone, vs re-scaled weights, identity, validation, bfloat16.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/delta/method.h"
#include "server/delta/module_patterns.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using ::testing::HasSubstr;
using testing::BatchTolerance;
using testing::CreateOrFail;
using testing::ForwardOrFail;
using testing::MakeBatchOrFail;
using testing::MaxBatchVsSoloDiff;
using testing::MaxDiff;
using testing::RandomRows;
using testing::RowDiff;
using testing::RandomTensor;
using testing::TestModels;
using testing::TinyBert;

const char kFfn[] = "re:.*\\.layer\\.[0-9]+\\.output\\.dense";

// Random scales near 1 on `targets` (nullptr: the defaults: key, value and the FFN down-projections, the latter
// as feed-forward modules), `feedforward` (nullptr: the default) choosing which scale the input.
MethodSpec RandomIa3(const model::Model& model, const std::vector<std::string>* targets,
                     const std::vector<std::string>* feedforward, uint64_t seed, bool ones = false) {
  MethodSpec spec;
  spec.kind = MethodKind::kIa3;
  if (targets != nullptr) spec.config["targets"] = *targets;
  if (feedforward != nullptr) spec.config["feedforward"] = *feedforward;
  const std::vector<std::string> t = targets ? *targets : std::vector<std::string>{"key", "value", kFfn};
  const std::vector<std::string> ff = feedforward ? *feedforward : std::vector<std::string>{kFfn};
  auto modules = ResolveTargets(t, model, {model::ModuleKind::kLinear});
  EXPECT_TRUE(modules.ok()) << modules.status();
  for (const model::ModuleInfo* m : modules.value_or(std::vector<const model::ModuleInfo*>{})) {
    bool is_ff = false;
    for (const std::string& p : ff) is_ff = is_ff || PatternMatches(p, m->name);
    const int64_t n = is_ff ? m->in_features : m->out_features;
    spec.tensors[m->name + ".ia3_l"] = ones ? at::ones({n}) : RandomTensor({n}, 0.3, seed++).add(1);
  }
  return spec;
}

// The independent reference: each targeted linear recomputed with re-scaled weights: diag(l) W and l * b for an
// output scale, W diag(l) for an input scale.
class NaiveIa3 : public model::ForwardHooks {
 public:
  NaiveIa3(const MethodSpec& spec, const model::Model& model) : model_(model), spec_(spec) {
    for (const auto& name : spec.config["feedforward"]) feedforward_.insert(name.get<std::string>());
  }
  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = spec_.tensors.find(module.name + ".ia3_l");
    if (it == spec_.tensors.end()) return;
    const at::Tensor w = model_.parameters().at(module.name + ".weight");
    const at::Tensor b = model_.parameters().at(module.name + ".bias");
    const at::Tensor l = it->second.to(w.options());
    if (feedforward_.count(module.name)) {
      *output = at::linear(input, w.mul(l.unsqueeze(0)), b);
    } else {
      *output = at::linear(input, w.mul(l.unsqueeze(1)), b.mul(l));
    }
  }

 private:
  const model::Model& model_;
  const MethodSpec spec_;
  std::set<std::string> feedforward_;
};

TEST(Ia3Test, MixedBatchEqualsEachRowAlone) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    // Every linear; output.dense of layer 0 scaled at its output, of layer 1 at its input; no feed-forward module.
    const std::vector<std::string> all = {"re:.*"};
    const std::vector<std::string> ff1 = {"encoder.layer.1.output.dense", "intermediate.dense"};
    const std::vector<std::string> some = {"query", "output.dense"};
    const std::vector<std::string> none;
    for (uint64_t seed : {1, 2, 3}) {
      SCOPED_TRACE(seed);
      auto m0 = CreateOrFail(RandomIa3(*model, nullptr, nullptr, seed * 100 + 1), *model);
      auto m1 = CreateOrFail(RandomIa3(*model, &all, &ff1, seed * 100 + 2), *model);
      auto m2 = CreateOrFail(RandomIa3(*model, &some, &none, seed * 100 + 3), *model);
      auto m3 = CreateOrFail(RandomIa3(*model, nullptr, nullptr, seed * 100 + 4), *model);
      ASSERT_TRUE(m0 && m1 && m2 && m3);
      const auto rows = RandomRows(*model, 8, 1, 12, seed);
      const double tol = BatchTolerance(*model, MethodKind::kIa3, rows, 1e-5, 4);
      auto diff = MaxBatchVsSoloDiff(*model, MethodKind::kIa3, rows,
                                     {m0.get(), nullptr, m1.get(), m2.get(), m1.get(), m3.get(), nullptr, m0.get()});
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      std::cout << name << " seed " << seed << ": mixed batch vs solo " << *diff << " (tolerance " << tol << ")\n";
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kIa3, rows, std::vector<const Method*>(8, m2.get()));
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      // Few rows carry one (runs of rows, the rest untouched).
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kIa3, rows,
                                {nullptr, m3.get(), m3.get(), nullptr, nullptr, m1.get(), nullptr, nullptr});
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
    }
  }
}

TEST(Ia3Test, MatchesRecomputedModules) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> all = {"re:.*"};
    const std::vector<std::string> ff = {"output.dense", "intermediate.dense"};
    const MethodSpec specs[] = {RandomIa3(*model, nullptr, nullptr, 7), RandomIa3(*model, &all, &ff, 8)};
    std::vector<std::unique_ptr<Method>> methods;
    for (const MethodSpec& s : specs) {
      methods.push_back(CreateOrFail(s, *model));
      ASSERT_TRUE(methods.back());
    }
    const auto rows = RandomRows(*model, 3, 3, 10, 42);
    const double tol = BatchTolerance(*model, MethodKind::kIa3, rows, 1e-4, 4);
    auto batch = MakeBatchOrFail(MethodKind::kIa3, {methods[0].get(), methods[1].get(), nullptr}, *model);
    ASSERT_TRUE(batch);
    const model::ForwardOutput batched = ForwardOrFail(*model, rows, batch.get());
    const model::ForwardOutput base = ForwardOrFail(*model, rows, nullptr);
    for (size_t i = 0; i < 2; ++i) {
      SCOPED_TRACE(i);
      NaiveIa3 naive(methods[i]->spec(), *model);
      const model::ForwardOutput ref = ForwardOrFail(*model, {rows[i]}, &naive);
      const int64_t len = static_cast<int64_t>(rows[i].size());
      const double diff = RowDiff(batched, static_cast<int64_t>(i), 0, ref, 0, len);
      EXPECT_LE(diff, tol);
      EXPECT_GT((ref.hidden_states[0] - base.hidden_states[i].narrow(0, 0, len)).abs().max().item<double>(), 1e-3);
      std::cout << name << " row " << i << ": batch vs recomputed modules " << diff << "\n";
    }
    // The row without a delta is the plain forward.
    EXPECT_LE((batched.pooled[2] - base.pooled[2]).abs().max().item<double>(), 1e-6);
  }
}

TEST(Ia3Test, AllOnesLeaveOutputsUnchanged) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> all = {"re:.*"};
    const std::vector<std::string> ff = {"output.dense"};
    auto m0 = CreateOrFail(RandomIa3(*model, nullptr, nullptr, 11, /*ones=*/true), *model);
    auto m1 = CreateOrFail(RandomIa3(*model, &all, &ff, 12, /*ones=*/true), *model);
    ASSERT_TRUE(m0 && m1);
    const auto rows = RandomRows(*model, 4, 1, 9, 5);
    auto batch = MakeBatchOrFail(MethodKind::kIa3, {m0.get(), m1.get(), nullptr, m0.get()}, *model);
    ASSERT_TRUE(batch);
    EXPECT_LE(MaxDiff(ForwardOrFail(*model, rows, batch.get()), ForwardOrFail(*model, rows, nullptr)), 1e-6);
  }
}

TEST(Ia3Test, CanonicalSpecResolvesTargets) {
  auto model = TinyBert();
  ASSERT_TRUE(model);
  MethodSpec spec = RandomIa3(*model, nullptr, nullptr, 13);
  spec.config = nlohmann::json::object();  // all defaults
  auto m = CreateOrFail(spec, *model);
  ASSERT_TRUE(m);
  // PEFT's BERT defaults: keys, values and the FFN down-projections (not attention.output.dense).
  EXPECT_EQ(m->spec().config["targets"],
            nlohmann::json({"encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
                            "encoder.layer.0.output.dense", "encoder.layer.1.attention.self.key",
                            "encoder.layer.1.attention.self.value", "encoder.layer.1.output.dense"}));
  EXPECT_EQ(m->spec().config["feedforward"],
            nlohmann::json({"encoder.layer.0.output.dense", "encoder.layer.1.output.dense"}));
  EXPECT_EQ(m->spec().tensors.at("encoder.layer.0.output.dense.ia3_l").size(0), 64);  // its input width
  EXPECT_EQ(m->spec().tensors.size(), 6u);
  EXPECT_EQ(m->bytes(), 4 * 2 * (32 + 32 + 64));
  auto again = CreateOrFail(m->spec(), *model);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->spec().config, m->spec().config);
  // No feed-forward module at all.
  const std::vector<std::string> kv = {"key", "value"}, none;
  auto plain = CreateOrFail(RandomIa3(*model, &kv, &none, 14), *model);
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->spec().config["feedforward"], nlohmann::json::array());
  auto plain_again = CreateOrFail(plain->spec(), *model);
  ASSERT_TRUE(plain_again);
  EXPECT_EQ(plain_again->spec().config, plain->spec().config);
}

TEST(Ia3Test, RejectsBadSpecs) {
  auto model = TinyBert();
  ASSERT_TRUE(model);
  const model::Model& m = *model;
  const MethodSpec good = RandomIa3(m, nullptr, nullptr, 21);
  const std::string k = "encoder.layer.0.attention.self.key.ia3_l";
  const std::string ff = "encoder.layer.1.output.dense.ia3_l";
  ASSERT_TRUE(CreateMethod(good, m, {}).ok());
  auto expect_invalid = [&](const MethodSpec& spec, const std::vector<std::string>& parts) {
    const absl::Status s = CreateMethod(spec, m, {}).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    for (const std::string& p : parts) EXPECT_THAT(std::string(s.message()), HasSubstr(p));
  };
  {
    MethodSpec s = good;
    s.tensors.erase(ff);
    expect_invalid(s, {"ia3", ff, "missing"});
  }
  {
    MethodSpec s = good;
    s.tensors["encoder.layer.0.attention.output.dense.ia3_l"] = at::ones({32});
    expect_invalid(s, {"unexpected", "encoder.layer.0.attention.output.dense.ia3_l"});
  }
  {
    // A feed-forward module's scale has its input width (64), not its output width.
    MethodSpec s = good;
    s.tensors[ff] = at::ones({32});
    expect_invalid(s, {ff, "shape", "[32]", "[64]"});
  }
  {
    MethodSpec s = good;
    s.tensors[k] = s.tensors[k].clone();
    s.tensors[k][3] = std::numeric_limits<float>::quiet_NaN();
    expect_invalid(s, {k, "NaN"});
  }
  {
    MethodSpec s = good;
    s.tensors[k] = s.tensors[k].clone();
    s.tensors[k][0] = std::numeric_limits<float>::infinity();
    expect_invalid(s, {k, "Inf"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {"encoder.layer.0.attention.self.kee"};
    expect_invalid(s, {"kee", "matches no", "closest", "encoder.layer.0.attention.self.key"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {"output.LayerNorm"};
    expect_invalid(s, {"output.LayerNorm", "layer_norm module", "linear modules only"});
  }
  {
    MethodSpec s = good;
    s.config["feedforward"] = {"intermediate.dense"};
    expect_invalid(s, {"feedforward", "intermediate.dense", "none of the targets"});
  }
  {
    MethodSpec s = good;
    s.config["feedforward"] = "output.dense";
    expect_invalid(s, {"feedforward"});
  }
  {
    MethodSpec s = good;
    s.config["feedforward"] = {"re:["};
    expect_invalid(s, {"feedforward", "re:["});
  }
  {
    MethodSpec s = good;
    s.config["scale"] = 2;
    expect_invalid(s, {"unknown config key", "scale"});
  }
}

TEST(Ia3Test, BFloat16ModelIsCloseToFloat32) {
  c10::InferenceMode guard;
  auto fp32 = TinyBert("float32");
  auto bf16 = TinyBert("bfloat16");
  ASSERT_TRUE(fp32 && bf16);
  const std::vector<std::string> all = {"re:.*"};
  const std::vector<std::string> ff = {"output.dense"};
  const MethodSpec specs[] = {RandomIa3(*fp32, nullptr, nullptr, 31), RandomIa3(*fp32, &all, &ff, 32)};
  std::vector<std::unique_ptr<Method>> m32, m16;
  for (const MethodSpec& s : specs) {
    m32.push_back(CreateOrFail(s, *fp32));
    m16.push_back(CreateOrFail(s, *bf16));
    ASSERT_TRUE(m32.back() && m16.back());
  }
  EXPECT_EQ(m16[0]->bytes() * 2, m32[0]->bytes());
  const auto rows = RandomRows(*fp32, 4, 2, 12, 77);
  const std::vector<int> pick = {0, -1, 1, 0};
  std::vector<const Method*> r32, r16;
  for (int p : pick) {
    r32.push_back(p < 0 ? nullptr : m32[p].get());
    r16.push_back(p < 0 ? nullptr : m16[p].get());
  }
  auto b32 = MakeBatchOrFail(MethodKind::kIa3, r32, *fp32);
  auto b16 = MakeBatchOrFail(MethodKind::kIa3, r16, *bf16);
  ASSERT_TRUE(b32 && b16);
  const model::ForwardOutput out32 = ForwardOrFail(*fp32, rows, b32.get());
  const model::ForwardOutput out16 = ForwardOrFail(*bf16, rows, b16.get());
  const model::ForwardOutput base32 = ForwardOrFail(*fp32, rows, nullptr);
  const double diff = (out16.pooled - out32.pooled).abs().max().item<double>();
  const double effect = (base32.pooled - out32.pooled).abs().max().item<double>();
  std::cout << "bf16 vs fp32 pooled: " << diff << " (the delta's effect: " << effect << ")\n";
  EXPECT_LE(diff, 0.1);
  EXPECT_LT(diff, effect);
  auto solo = MaxBatchVsSoloDiff(*bf16, MethodKind::kIa3, rows, r16);
  ASSERT_TRUE(solo.ok()) << solo.status();
  EXPECT_LE(*solo, 0.1);
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
