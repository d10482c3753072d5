// BitFit: batched per-row bias deltas vs each row alone, vs re-computed modules, identity, validation, bfloat16.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
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

const std::vector<model::ModuleKind> kKinds = {model::ModuleKind::kLinear, model::ModuleKind::kLayerNorm};

int64_t Width(const model::ModuleInfo& m) {
  return m.kind == model::ModuleKind::kLinear ? m.out_features : m.in_features;
}

// Random bias deltas on `patterns` (nullptr: the default, every linear and layer norm).
MethodSpec RandomBitFit(const model::Model& model, const std::vector<std::string>* patterns, uint64_t seed,
                        bool zero = false) {
  MethodSpec spec;
  spec.kind = MethodKind::kBitFit;
  if (patterns != nullptr) spec.config["targets"] = *patterns;
  auto modules = ResolveTargets(patterns ? *patterns : std::vector<std::string>{"re:.*"}, model, kKinds);
  EXPECT_TRUE(modules.ok()) << modules.status();
  for (const model::ModuleInfo* m : modules.value_or(std::vector<const model::ModuleInfo*>{})) {
    spec.tensors[m->name + ".bias"] = zero ? at::zeros({Width(*m)}) : RandomTensor({Width(*m)}, 0.1, seed++);
  }
  return spec;
}

// The independent reference: each targeted module recomputed from its parameters with the bias b + delta.
class NaiveBitFit : public model::ForwardHooks {
 public:
  NaiveBitFit(const MethodSpec& spec, const model::Model& model) : model_(model) {
    for (const auto& [name, t] : spec.tensors) deltas_[name.substr(0, name.size() - 5)] = t;  // strip ".bias"
  }
  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = deltas_.find(module.name);
    if (it == deltas_.end()) return;
    const at::Tensor w = model_.parameters().at(module.name + ".weight");
    *output = at::linear(input, w, Bias(module.name, it->second, w.options()));
  }
  void OnLayerNorm(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = deltas_.find(module.name);
    if (it == deltas_.end()) return;
    const at::Tensor g = model_.parameters().at(module.name + ".weight");
    *output = at::layer_norm(input, {input.size(-1)}, g, Bias(module.name, it->second, g.options()), module.eps);
  }

 private:
  at::Tensor Bias(const std::string& module, const at::Tensor& delta, const at::TensorOptions& options) {
    auto it = model_.parameters().find(module + ".bias");
    const at::Tensor d = delta.to(options);
    return it == model_.parameters().end() ? d : it->second.add(d);
  }
  const model::Model& model_;
  std::map<std::string, at::Tensor> deltas_;
};

TEST(BitFitTest, MixedBatchEqualsEachRowAlone) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> norms = {"re:.*LayerNorm"};
    const std::vector<std::string> some = {"query", "output.dense", "re:encoder\\.layer\\.1\\..*LayerNorm"};
    for (uint64_t seed : {1, 2, 3}) {
      SCOPED_TRACE(seed);
      auto m0 = CreateOrFail(RandomBitFit(*model, nullptr, seed * 100 + 1), *model);
      auto m1 = CreateOrFail(RandomBitFit(*model, &norms, seed * 100 + 2), *model);
      auto m2 = CreateOrFail(RandomBitFit(*model, &some, seed * 100 + 3), *model);
      auto m3 = CreateOrFail(RandomBitFit(*model, nullptr, seed * 100 + 4), *model);
      ASSERT_TRUE(m0 && m1 && m2 && m3);
      const auto rows = RandomRows(*model, 8, 1, 12, seed);
      const double tol = BatchTolerance(*model, MethodKind::kBitFit, rows, 1e-5, 4);
      auto diff = MaxBatchVsSoloDiff(*model, MethodKind::kBitFit, rows,
                                     {m0.get(), nullptr, m1.get(), m2.get(), m1.get(), m3.get(), nullptr, m0.get()});
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      std::cout << name << " seed " << seed << ": mixed batch vs solo " << *diff << " (tolerance " << tol << ")\n";
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kBitFit, rows, std::vector<const Method*>(8, m2.get()));
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      // Few rows carry one (runs of rows, the rest untouched).
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kBitFit, rows,
                                {nullptr, m3.get(), m3.get(), nullptr, nullptr, m1.get(), nullptr, nullptr});
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
    }
  }
}

TEST(BitFitTest, MatchesRecomputedModules) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> some = {"key", "intermediate.dense", "re:encoder\\.layer\\.0\\..*LayerNorm"};
    const MethodSpec specs[] = {RandomBitFit(*model, nullptr, 7), RandomBitFit(*model, &some, 8)};
    std::vector<std::unique_ptr<Method>> methods;
    for (const MethodSpec& s : specs) {
      methods.push_back(CreateOrFail(s, *model));
      ASSERT_TRUE(methods.back());
    }
    const auto rows = RandomRows(*model, 3, 3, 10, 42);
    const double tol = BatchTolerance(*model, MethodKind::kBitFit, rows, 1e-4, 4);
    auto batch = MakeBatchOrFail(MethodKind::kBitFit, {methods[0].get(), methods[1].get(), nullptr}, *model);
    ASSERT_TRUE(batch);
    const model::ForwardOutput batched = ForwardOrFail(*model, rows, batch.get());
    const model::ForwardOutput base = ForwardOrFail(*model, rows, nullptr);
    for (size_t i = 0; i < 2; ++i) {
      SCOPED_TRACE(i);
      NaiveBitFit naive(methods[i]->spec(), *model);
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

TEST(BitFitTest, ZeroDeltasLeaveOutputsUnchanged) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> norms = {"re:.*LayerNorm"};
    auto m0 = CreateOrFail(RandomBitFit(*model, nullptr, 11, /*zero=*/true), *model);
    auto m1 = CreateOrFail(RandomBitFit(*model, &norms, 12, /*zero=*/true), *model);
    ASSERT_TRUE(m0 && m1);
    const auto rows = RandomRows(*model, 4, 1, 9, 5);
    auto batch = MakeBatchOrFail(MethodKind::kBitFit, {m0.get(), m1.get(), nullptr, m0.get()}, *model);
    ASSERT_TRUE(batch);
    EXPECT_LE(MaxDiff(ForwardOrFail(*model, rows, batch.get()), ForwardOrFail(*model, rows, nullptr)), 1e-6);
  }
}

TEST(BitFitTest, CanonicalSpecResolvesTargets) {
  auto model = TinyBert();
  ASSERT_TRUE(model);
  auto m = CreateOrFail(RandomBitFit(*model, nullptr, 13), *model);
  ASSERT_TRUE(m);
  // Tiny BERT: per layer 6 linears and 2 layer norms, plus the embeddings' layer norm.
  const nlohmann::json& targets = m->spec().config["targets"];
  ASSERT_EQ(targets.size(), 17u);
  EXPECT_TRUE(std::is_sorted(targets.begin(), targets.end()));
  EXPECT_EQ(targets[0], "embeddings.LayerNorm");
  EXPECT_EQ(m->spec().tensors.size(), 17u);
  EXPECT_EQ(m->bytes(), 4 * (2 * (5 * 32 + 64 + 2 * 32) + 32));
  auto again = CreateOrFail(m->spec(), *model);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->spec().config, m->spec().config);
}

TEST(BitFitTest, RejectsBadSpecs) {
  auto model = TinyBert();
  ASSERT_TRUE(model);
  const model::Model& m = *model;
  const std::vector<std::string> some = {"query", "attention.output.LayerNorm"};
  const MethodSpec good = RandomBitFit(m, &some, 21);
  const std::string q = "encoder.layer.0.attention.self.query.bias";
  const std::string ln = "encoder.layer.1.attention.output.LayerNorm.bias";
  ASSERT_TRUE(CreateMethod(good, m, {}).ok());
  auto expect_invalid = [&](const MethodSpec& spec, const std::vector<std::string>& parts) {
    const absl::Status s = CreateMethod(spec, m, {}).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    for (const std::string& p : parts) EXPECT_THAT(std::string(s.message()), HasSubstr(p));
  };
  {
    MethodSpec s = good;
    s.tensors.erase(ln);
    expect_invalid(s, {"bitfit", ln, "missing"});
  }
  {
    MethodSpec s = good;
    s.tensors["encoder.layer.0.attention.self.key.bias"] = at::zeros({32});
    expect_invalid(s, {"unexpected", "encoder.layer.0.attention.self.key.bias"});
  }
  {
    MethodSpec s = good;
    s.tensors[q] = at::zeros({33});
    expect_invalid(s, {q, "shape", "[33]", "[32]"});
  }
  {
    MethodSpec s = good;
    s.tensors[q] = at::zeros({1, 32});
    expect_invalid(s, {q, "shape"});
  }
  {
    MethodSpec s = good;
    s.tensors[ln] = s.tensors[ln].clone();
    s.tensors[ln][3] = std::numeric_limits<float>::quiet_NaN();
    expect_invalid(s, {ln, "NaN"});
  }
  {
    MethodSpec s = good;
    s.tensors[ln] = s.tensors[ln].clone();
    s.tensors[ln][0] = -std::numeric_limits<float>::infinity();
    expect_invalid(s, {ln, "Inf"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {"encoder.layer.0.attention.output.LayerNrm"};
    expect_invalid(s, {"LayerNrm", "matches no", "closest", "encoder.layer.0.attention.output.LayerNorm"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {"word_embeddings"};
    expect_invalid(s, {"word_embeddings", "embedding module", "linear and layer-norm modules only"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = nlohmann::json::array();
    expect_invalid(s, {"targets"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {1, 2};
    expect_invalid(s, {"targets"});
  }
  {
    MethodSpec s = good;
    s.config["rank"] = 4;
    expect_invalid(s, {"unknown config key", "rank"});
  }
}

TEST(BitFitTest, BFloat16ModelIsCloseToFloat32) {
  c10::InferenceMode guard;
  auto fp32 = TinyBert("float32");
  auto bf16 = TinyBert("bfloat16");
  ASSERT_TRUE(fp32 && bf16);
  const std::vector<std::string> norms = {"re:.*LayerNorm"};
  const MethodSpec specs[] = {RandomBitFit(*fp32, nullptr, 31), RandomBitFit(*fp32, &norms, 32)};
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
  auto b32 = MakeBatchOrFail(MethodKind::kBitFit, r32, *fp32);
  auto b16 = MakeBatchOrFail(MethodKind::kBitFit, r16, *bf16);
  ASSERT_TRUE(b32 && b16);
  const model::ForwardOutput out32 = ForwardOrFail(*fp32, rows, b32.get());
  const model::ForwardOutput out16 = ForwardOrFail(*bf16, rows, b16.get());
  const model::ForwardOutput base32 = ForwardOrFail(*fp32, rows, nullptr);
  const double diff = (out16.pooled - out32.pooled).abs().max().item<double>();
  const double effect = (base32.pooled - out32.pooled).abs().max().item<double>();
  std::cout << "bf16 vs fp32 pooled: " << diff << " (the delta's effect: " << effect << ")\n";
  EXPECT_LE(diff, 0.1);
  EXPECT_LT(diff, effect);
  auto solo = MaxBatchVsSoloDiff(*bf16, MethodKind::kBitFit, rows, r16);
  ASSERT_TRUE(solo.ok()) << solo.status();
  EXPECT_LE(*solo, 0.1);
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
