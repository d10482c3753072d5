// LoRA: batched per-row application vs each row alone, vs merged weights, identity, validation, bfloat16.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/delta/method.h"
#include "server/delta/methods_internal.h"
#include "server/delta/module_patterns.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::BatchTolerance;
using testing::CreateOrFail;
using testing::ForwardOrFail;
using testing::MakeBatchOrFail;
using testing::MaxBatchVsSoloDiff;
using testing::MaxDiff;
using testing::RandomRows;
using testing::RandomTensor;
using testing::TestModels;
using testing::TinyBert;

// The linear modules `patterns` resolve to.
std::vector<const model::ModuleInfo*> Linears(const model::Model& model, const std::vector<std::string>& patterns) {
  auto r = ResolveTargets(patterns, model, {model::ModuleKind::kLinear});
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : std::vector<const model::ModuleInfo*>{};
}

// A random LoRA on `patterns` (nullptr: the default targets, query and value).
MethodSpec RandomLora(const model::Model& model, const std::vector<std::string>* patterns, int64_t rank,
                      double alpha, uint64_t seed, bool zero_b = false) {
  MethodSpec spec;
  spec.kind = MethodKind::kLora;
  spec.config["rank"] = rank;
  spec.config["alpha"] = alpha;
  if (patterns != nullptr) spec.config["targets"] = *patterns;
  const std::vector<std::string> defaults = {"query", "value"};
  for (const model::ModuleInfo* m : Linears(model, patterns ? *patterns : defaults)) {
    // Of the size training gives: A like PEFT's init (~1/sqrt(in)), B grown from zero to a modest size.
    spec.tensors[m->name + ".lora_A"] =
        RandomTensor({rank, m->in_features}, 1.0 / std::sqrt(static_cast<double>(m->in_features)), seed++);
    spec.tensors[m->name + ".lora_B"] =
        zero_b ? at::zeros({m->out_features, rank}) : RandomTensor({m->out_features, rank}, 0.05, seed++);
  }
  return spec;
}

// The independent reference: each targeted linear recomputed with merged weights W + (alpha / r) B A.
class NaiveLora : public model::ForwardHooks {
 public:
  NaiveLora(const MethodSpec& spec, const model::Model& model) : model_(model) {
    const double scaling = spec.config["alpha"].get<double>() / spec.config["rank"].get<double>();
    for (const auto& [name, a] : spec.tensors) {
      const std::string suffix = ".lora_A";
      if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
        continue;
      }
      const std::string module = name.substr(0, name.size() - suffix.size());
      const at::Tensor b = spec.tensors.at(module + ".lora_B");
      merged_[module] = at::matmul(b, a).mul(scaling);
    }
  }

  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = merged_.find(module.name);
    if (it == merged_.end()) return;
    const at::Tensor w = model_.parameters().at(module.name + ".weight");
    const at::Tensor b = model_.parameters().at(module.name + ".bias");
    *output = at::linear(input, w.add(it->second.to(w.options())), b);
  }

 private:
  const model::Model& model_;
  std::map<std::string, at::Tensor> merged_;
};

struct TestSegment {
  int64_t first = 0;
  int64_t count = 0;
};

// Which rows each call covered, and on which thread.
struct SegmentCalls {
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> pieces;  // (first, count) in call order
  std::vector<std::thread::id> threads;
};

void RunSegments(const at::Tensor& like, SegmentCalls* calls) {
  const std::vector<TestSegment> segments = {{0, 5}, {5, 1}, {6, 9}, {15, 1}};
  ForEachSegmentPiece(segments, 16, like, [&](const TestSegment& s) {
    std::lock_guard<std::mutex> lock(calls->mu);
    calls->pieces.emplace_back(s.first, s.count);
    calls->threads.push_back(std::this_thread::get_id());
  });
}

TEST(SegmentPiecesTest, Float32CoversEveryRowOnceAcrossTheIntraOpThreads) {
  SegmentCalls calls;
  RunSegments(at::zeros({2, 2}, at::kFloat), &calls);
  std::vector<int> covered(16, 0);
  for (const auto& [first, count] : calls.pieces) {
    for (int64_t r = first; r < first + count; ++r) ++covered[r];
  }
  EXPECT_THAT(covered, ::testing::Each(1));
}

TEST(SegmentPiecesTest, OtherDtypesRunWholeSegmentsInOrderOnTheCallingThread) {
  // bfloat16 GEMMs go to oneDNN, which crashes when several threads create primitives at once (Debian's 2.6.3).
  const int saved = at::get_num_threads();
  at::set_num_threads(2);
  SegmentCalls calls;
  RunSegments(at::zeros({2, 2}, at::kBFloat16), &calls);
  at::set_num_threads(saved);
  EXPECT_EQ(calls.pieces, (std::vector<std::pair<int64_t, int64_t>>{{0, 5}, {5, 1}, {6, 9}, {15, 1}}));
  EXPECT_THAT(calls.threads, ::testing::Each(std::this_thread::get_id()));
}

TEST(LoraTest, MixedBatchEqualsEachRowAlone) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> all = {"re:.*"};
    const std::vector<std::string> some = {"attention.output.dense", "intermediate.dense"};
    const std::vector<std::string> layer0 = {"re:encoder\\.layer\\.0\\..*"};
    for (uint64_t seed : {1, 2, 3}) {
      SCOPED_TRACE(seed);
      auto m0 = CreateOrFail(RandomLora(*model, nullptr, 8, 8, seed * 100 + 1), *model);
      auto m1 = CreateOrFail(RandomLora(*model, &all, 4, 16, seed * 100 + 2), *model);
      auto m2 = CreateOrFail(RandomLora(*model, &some, 2, 3.5, seed * 100 + 3), *model);
      auto m3 = CreateOrFail(RandomLora(*model, &layer0, 16, 8, seed * 100 + 4), *model);
      auto m4 = CreateOrFail(RandomLora(*model, &all, 8, 8, seed * 100 + 5), *model);
      ASSERT_TRUE(m0 && m1 && m2 && m3 && m4);
      const auto rows = RandomRows(*model, 8, 1, 12, seed);
      const double tol = BatchTolerance(*model, MethodKind::kLora, rows, 1e-5, 4);
      // Mixed ranks and targets, rows without.
      auto diff = MaxBatchVsSoloDiff(*model, MethodKind::kLora, rows,
                                     {m0.get(), nullptr, m1.get(), m2.get(), m1.get(), m3.get(), nullptr, m4.get()});
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      std::cout << name << " seed " << seed << ": mixed batch vs solo " << *diff << " (tolerance " << tol << ")\n";
      // Every row a different LoRA on every linear (the benchmark's case: every module on every row).
      std::vector<std::unique_ptr<Method>> owned;
      std::vector<const Method*> distinct;
      for (int i = 0; i < 8; ++i) {
        owned.push_back(CreateOrFail(RandomLora(*model, &all, 8, 16, seed * 1000 + 10 * i), *model));
        distinct.push_back(owned.back().get());
      }
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kLora, rows, distinct);
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      // One LoRA on every row (the shared path).
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kLora, rows, std::vector<const Method*>(8, m1.get()));
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
    }
  }
}

TEST(LoraTest, MatchesMergedWeightsReference) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> all = {"re:.*"};
    const std::vector<std::string> some = {"key", "output.dense"};
    const MethodSpec specs[] = {RandomLora(*model, &all, 4, 16, 7), RandomLora(*model, &some, 3, 1.5, 8),
                                RandomLora(*model, nullptr, 8, 8, 9)};
    std::vector<std::unique_ptr<Method>> methods;
    std::vector<const Method*> ptrs;
    for (const MethodSpec& s : specs) {
      methods.push_back(CreateOrFail(s, *model));
      ASSERT_TRUE(methods.back());
      ptrs.push_back(methods.back().get());
    }
    const auto rows = RandomRows(*model, 3, 3, 10, 42);
    const double tol = BatchTolerance(*model, MethodKind::kLora, rows, 1e-4, 4);
    auto batch = MakeBatchOrFail(MethodKind::kLora, ptrs, *model);
    ASSERT_TRUE(batch);
    const model::ForwardOutput batched = ForwardOrFail(*model, rows, batch.get());
    const model::ForwardOutput base = ForwardOrFail(*model, rows, nullptr);
    for (size_t i = 0; i < rows.size(); ++i) {
      SCOPED_TRACE(i);
      NaiveLora naive(methods[i]->spec(), *model);
      const model::ForwardOutput ref = ForwardOrFail(*model, {rows[i]}, &naive);
      const int64_t len = static_cast<int64_t>(rows[i].size());
      const double pooled = (batched.pooled[i] - ref.pooled[0]).abs().max().item<double>();
      const double hidden =
          (batched.hidden_states[i].narrow(0, 0, len) - ref.hidden_states[0]).abs().max().item<double>();
      EXPECT_LE(std::max(pooled, hidden), tol);
      // And the delta did something.
      EXPECT_GT((ref.hidden_states[0] - base.hidden_states[i].narrow(0, 0, len)).abs().max().item<double>(), 1e-3);
      std::cout << name << " row " << i << ": batch vs merged weights " << std::max(pooled, hidden) << "\n";
    }
  }
}

TEST(LoraTest, ZeroBLeavesOutputsUnchanged) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const std::vector<std::string> all = {"re:.*"};
    auto m0 = CreateOrFail(RandomLora(*model, &all, 8, 16, 11, /*zero_b=*/true), *model);
    auto m1 = CreateOrFail(RandomLora(*model, nullptr, 2, 2, 12, /*zero_b=*/true), *model);
    ASSERT_TRUE(m0 && m1);
    const auto rows = RandomRows(*model, 4, 1, 9, 5);
    auto batch = MakeBatchOrFail(MethodKind::kLora, {m0.get(), m1.get(), nullptr, m0.get()}, *model);
    ASSERT_TRUE(batch);
    EXPECT_LE(MaxDiff(ForwardOrFail(*model, rows, batch.get()), ForwardOrFail(*model, rows, nullptr)), 1e-6);
    auto empty = MakeBatchOrFail(MethodKind::kLora, {nullptr, nullptr, nullptr, nullptr}, *model);
    ASSERT_TRUE(empty);
    EXPECT_LE(MaxDiff(ForwardOrFail(*model, rows, empty.get()), ForwardOrFail(*model, rows, nullptr)), 1e-6);
  }
}

TEST(LoraTest, CanonicalSpecResolvesTargetsAndFillsDefaults) {
  auto model = TinyBert();
  ASSERT_TRUE(model);
  MethodSpec spec = RandomLora(*model, nullptr, 4, 4, 13);
  spec.config = {{"rank", 4}};  // alpha and targets default
  auto m = CreateOrFail(spec, *model);
  ASSERT_TRUE(m);
  const nlohmann::json& config = m->spec().config;
  EXPECT_EQ(config["rank"], 4);
  EXPECT_EQ(config["alpha"].get<double>(), 4.0);
  EXPECT_EQ(config["targets"],
            nlohmann::json({"encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
                            "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"}));
  EXPECT_EQ(m->spec().tensors.size(), 8u);
  for (const auto& [n, t] : m->spec().tensors) {
    EXPECT_EQ(t.scalar_type(), at::kFloat) << n;
    EXPECT_TRUE(t.device().is_cpu()) << n;
    EXPECT_TRUE(at::equal(t, spec.tensors.at(n))) << n;
  }
  EXPECT_EQ(m->bytes(), 4 * (2 * 2 * (4 * 32 + 32 * 4)));
  // The canonical spec is a fixed point.
  auto again = CreateOrFail(m->spec(), *model);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->spec().config, config);
}

TEST(LoraTest, UpdatesTheOutputInPlaceAndOnlyItsOwnSliceOfAFusedProjection) {
  // The model lets OnLinear update `*output` in place (model.h), also a fused q/k/v projection's slice: LoRA
  // writes that slice and leaves the other modules' slices alone.
  c10::InferenceMode guard;
  auto model = TinyBert();
  ASSERT_TRUE(model);
  const std::string q = "encoder.layer.0.attention.self.query";
  const model::ModuleInfo* module = nullptr;
  for (const model::ModuleInfo& m : model->modules()) {
    if (m.name == q) module = &m;
  }
  ASSERT_NE(module, nullptr);
  const std::vector<std::string> targets = {q};
  auto m0 = CreateOrFail(RandomLora(*model, &targets, 4, 8, 51), *model);
  auto m1 = CreateOrFail(RandomLora(*model, &targets, 2, 8, 52), *model);
  ASSERT_TRUE(m0 && m1);
  auto expected_delta = [&](const Method* m, const at::Tensor& x) {  // x: [T, 32]
    if (m == nullptr) return at::zeros({x.size(0), 32});
    const at::Tensor a = m->spec().tensors.at(q + ".lora_A"), b = m->spec().tensors.at(q + ".lora_B");
    const double s = m->spec().config["alpha"].get<double>() / m->spec().config["rank"].get<double>();
    return at::matmul(at::matmul(x, a.t()), b.t()).mul(s);
  };
  // One LoRA on every row; different LoRAs on every row; one LoRA on some rows; different ones on some rows.
  const std::vector<std::vector<const Method*>> cases = {{m0.get(), m0.get(), m0.get()},
                                                         {m0.get(), m1.get(), m0.get()},
                                                         {nullptr, m1.get(), nullptr},
                                                         {m0.get(), nullptr, m1.get()}};
  for (const auto& rows : cases) {
    auto batch = MakeBatchOrFail(MethodKind::kLora, rows, *model);
    ASSERT_TRUE(batch);
    const at::Tensor input = RandomTensor({3, 5, 32}, 1.0, 53);
    const at::Tensor before = RandomTensor({3, 5, 32}, 1.0, 54);
    at::Tensor want = before.clone();
    for (int i = 0; i < 3; ++i) want[i].add_(expected_delta(rows[i], input[i]));
    at::Tensor fresh = before.clone();
    batch->OnLinear(*module, input, &fresh);
    EXPECT_LE((fresh - want).abs().max().item<double>(), 1e-5);
    // The middle third of a fused [3, 5, 96] projection: the outer thirds keep their values.
    const at::Tensor qkv = at::cat({before, before, before}, -1);
    at::Tensor slice = qkv.narrow(-1, 32, 32);
    batch->OnLinear(*module, input, &slice);
    EXPECT_LE((slice - want).abs().max().item<double>(), 1e-5);
    EXPECT_LE((qkv.narrow(-1, 32, 32) - want).abs().max().item<double>(), 1e-5);
    EXPECT_TRUE(at::equal(qkv.narrow(-1, 0, 32), before));
    EXPECT_TRUE(at::equal(qkv.narrow(-1, 64, 32), before));
  }
}

absl::Status CreateStatus(MethodSpec spec, const model::Model& model, const MethodLimits& limits = {}) {
  return CreateMethod(std::move(spec), model, limits).status();
}

TEST(LoraTest, RejectsBadSpecs) {
  auto model = TinyBert();
  ASSERT_TRUE(model);
  const model::Model& m = *model;
  const std::string q = "encoder.layer.0.attention.self.query";
  const MethodSpec good = RandomLora(m, nullptr, 4, 8, 21);
  ASSERT_TRUE(CreateStatus(good, m).ok());
  auto expect_invalid = [&](const MethodSpec& spec, const std::vector<std::string>& parts,
                            const MethodLimits& limits = {}) {
    const absl::Status s = CreateStatus(spec, m, limits);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    for (const std::string& p : parts) EXPECT_THAT(std::string(s.message()), HasSubstr(p));
  };
  {
    MethodSpec s = good;
    s.tensors.erase(q + ".lora_A");
    expect_invalid(s, {"lora", q + ".lora_A", "missing"});
  }
  {
    MethodSpec s = good;
    s.tensors["encoder.layer.0.attention.self.key.lora_A"] = at::zeros({4, 32});
    expect_invalid(s, {"unexpected", "encoder.layer.0.attention.self.key.lora_A"});
  }
  {
    MethodSpec s = good;
    s.tensors[q + ".lora_B"] = at::zeros({32, 5});
    expect_invalid(s, {q + ".lora_B", "shape", "[32,5]"});
  }
  {
    MethodSpec s = good;
    s.tensors[q + ".lora_A"] = s.tensors[q + ".lora_A"].clone();
    s.tensors[q + ".lora_A"][1][2] = std::numeric_limits<float>::quiet_NaN();
    expect_invalid(s, {q + ".lora_A", "NaN"});
  }
  {
    MethodSpec s = good;
    s.tensors[q + ".lora_B"] = s.tensors[q + ".lora_B"].clone();
    s.tensors[q + ".lora_B"][0][0] = std::numeric_limits<float>::infinity();
    expect_invalid(s, {q + ".lora_B", "Inf"});
  }
  {
    MethodSpec s = good;
    s.tensors[q + ".lora_A"] = s.tensors[q + ".lora_A"].to(at::kDouble);
    expect_invalid(s, {q + ".lora_A", "float32"});
  }
  {
    MethodLimits limits;
    limits.max_rank = 2;
    expect_invalid(good, {"rank", "[1, 2]"}, limits);
  }
  for (const nlohmann::json& bad : {nlohmann::json(2.5), nlohmann::json(0), nlohmann::json(-4), nlohmann::json("4")}) {
    MethodSpec s = good;
    s.config["rank"] = bad;
    expect_invalid(s, {"rank"});
  }
  {
    MethodSpec s = good;
    s.config["alpha"] = "big";
    expect_invalid(s, {"alpha"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {"encoder.layer.0.attention.self.querry"};
    expect_invalid(s, {"querry", "matches no", "closest", "encoder.layer.0.attention.self.query"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = "query";
    expect_invalid(s, {"targets"});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {"re:("};
    expect_invalid(s, {"re:("});
  }
  {
    MethodSpec s = good;
    s.config["targets"] = {"attention.output.LayerNorm"};
    s.tensors.clear();
    expect_invalid(s, {"attention.output.LayerNorm", "layer_norm", "linear"});
  }
  {
    MethodSpec s = good;
    s.config["dropout"] = 0.1;
    expect_invalid(s, {"unknown config key", "dropout"});
  }
}

TEST(LoraTest, BFloat16ModelIsCloseToFloat32) {
  c10::InferenceMode guard;
  auto fp32 = TinyBert("float32");
  auto bf16 = TinyBert("bfloat16");
  ASSERT_TRUE(fp32 && bf16);
  const std::vector<std::string> all = {"re:.*"};
  const MethodSpec specs[] = {RandomLora(*fp32, &all, 4, 16, 31), RandomLora(*fp32, nullptr, 8, 8, 32)};
  std::vector<std::unique_ptr<Method>> m32, m16;
  for (const MethodSpec& s : specs) {
    m32.push_back(CreateOrFail(s, *fp32));
    m16.push_back(CreateOrFail(s, *bf16));
    ASSERT_TRUE(m32.back() && m16.back());
  }
  EXPECT_EQ(m16[0]->bytes() * 2, m32[0]->bytes());
  const auto rows = RandomRows(*fp32, 4, 2, 12, 77);
  auto b32 = MakeBatchOrFail(MethodKind::kLora, {m32[0].get(), nullptr, m32[1].get(), m32[0].get()}, *fp32);
  auto b16 = MakeBatchOrFail(MethodKind::kLora, {m16[0].get(), nullptr, m16[1].get(), m16[0].get()}, *bf16);
  ASSERT_TRUE(b32 && b16);
  const model::ForwardOutput out32 = ForwardOrFail(*fp32, rows, b32.get());
  const model::ForwardOutput out16 = ForwardOrFail(*bf16, rows, b16.get());
  const model::ForwardOutput base32 = ForwardOrFail(*fp32, rows, nullptr);
  const double diff = (out16.pooled - out32.pooled).abs().max().item<double>();
  const double effect = (base32.pooled - out32.pooled).abs().max().item<double>();
  std::cout << "bf16 vs fp32 pooled: " << diff << " (the LoRA's effect: " << effect << ")\n";
  EXPECT_LE(diff, 0.1);
  EXPECT_LT(diff, effect);
  auto solo = MaxBatchVsSoloDiff(*bf16, MethodKind::kLora, rows, {m16[0].get(), nullptr, m16[1].get(), m16[0].get()});
  ASSERT_TRUE(solo.ok()) << solo.status();
  EXPECT_LE(*solo, 0.1);
}


}  // namespace
}  // namespace delta
}  // namespace deltaserve
