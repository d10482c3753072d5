// Prefix tuning: mixed batches (different prefix lengths, targets, rows without) equal each row alone, rows
// without a prefix equal the plain forward, one row equals a naive concatenation, bad packs are refused,
// bfloat16 runs.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/delta/method.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using testing::BatchTolerance;
using testing::CreateOrFail;
using testing::ExpectInvalid;
using testing::MaxBatchVsSoloDiff;
using testing::RandomRows;
using testing::RandomTensor;
using testing::RunRows;
using testing::TestModels;
using testing::TinyBert;

std::vector<const model::ModuleInfo*> Attentions(const model::Model& model) {
  std::vector<const model::ModuleInfo*> out;
  for (const auto& m : model.modules()) {
    if (m.kind == model::ModuleKind::kAttention) out.push_back(&m);
  }
  return out;
}

// A prefix of `p` tokens on `layers` (empty: every attention module; config "targets" left at its default).
MethodSpec PrefixSpec(const model::Model& model, int64_t p, uint64_t seed, const std::vector<int64_t>& layers = {}) {
  MethodSpec spec;
  spec.kind = MethodKind::kPrefix;
  spec.config["num_virtual_tokens"] = p;
  std::vector<std::string> targets;
  for (const model::ModuleInfo* a : Attentions(model)) {
    if (!layers.empty() && std::find(layers.begin(), layers.end(), a->layer) == layers.end()) continue;
    targets.push_back(a->name);
    const int64_t width = a->num_heads * a->head_dim;
    spec.tensors[a->name + ".prefix_keys"] = RandomTensor({p, width}, 1.0, seed++);
    spec.tensors[a->name + ".prefix_values"] = RandomTensor({p, width}, 1.0, seed++);
  }
  if (!layers.empty()) spec.config["targets"] = targets;
  return spec;
}

TEST(PrefixTest, MixedBatchEqualsEachRowAlone) {
  for (const auto& [name, model] : TestModels()) {
    for (uint64_t seed : {1, 2, 3}) {
      SCOPED_TRACE(absl::StrCat(name, " seed ", seed));
      auto p3 = CreateOrFail(PrefixSpec(*model, 3, seed * 100), *model);
      auto p5 = CreateOrFail(PrefixSpec(*model, 5, seed * 100 + 10), *model);
      auto p1 = CreateOrFail(PrefixSpec(*model, 1, seed * 100 + 20), *model);
      auto layer1 = CreateOrFail(PrefixSpec(*model, 7, seed * 100 + 30, {1}), *model);
      ASSERT_TRUE(p3 && p5 && p1 && layer1);
      const auto rows = RandomRows(*model, 10, 1, 14, seed);
      const std::vector<const Method*> methods = {p3.get(), nullptr,     p5.get(), layer1.get(), p3.get(),
                                                  p1.get(), layer1.get(), nullptr,  p5.get(),     p1.get()};
      const double tol = BatchTolerance(*model, MethodKind::kPrefix, rows, 1e-5, 3);
      auto diff = MaxBatchVsSoloDiff(*model, MethodKind::kPrefix, rows, methods);
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      std::printf("[prefix %s seed %d] mixed batch vs solo: max diff %.3g (bound %.3g)\n", name.c_str(),
                  static_cast<int>(seed), *diff, tol);
      // Every row the same prefix.
      const std::vector<std::vector<int64_t>> four = {rows[0], rows[1], rows[2], rows[3]};
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kPrefix, four, std::vector<const Method*>(4, p5.get()));
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, BatchTolerance(*model, MethodKind::kPrefix, four, 1e-5, 3));
    }
  }
}

TEST(PrefixTest, RowsWithoutPrefixEqualPlainForward) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto p4 = CreateOrFail(PrefixSpec(*model, 4, 5), *model);
    auto p2 = CreateOrFail(PrefixSpec(*model, 2, 50, {0}), *model);
    ASSERT_TRUE(p4 && p2);
    const auto rows = RandomRows(*model, 6, 1, 12, 9);
    auto plain = RunRows(*model, rows, nullptr);
    ASSERT_TRUE(plain.ok());
    auto hooks = MakeMethodBatch(MethodKind::kPrefix, {p4.get(), nullptr, p2.get(), nullptr, p4.get(), nullptr},
                                 *model);
    ASSERT_TRUE(hooks.ok()) << hooks.status();
    auto out = RunRows(*model, rows, hooks->get());
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->hidden_states.sizes(), plain->hidden_states.sizes());  // queries unchanged: T stays
    // Relative 1e-5 (use-lite's states reach ~30; longer keys alone change the GEMM's summation order).
    const double tol = 1e-5 * std::max(1.0, plain->hidden_states.abs().max().item<double>());
    for (int64_t row : {1, 3, 5}) {
      const int64_t len = static_cast<int64_t>(rows[row].size());
      const at::Tensor got = out->hidden_states[row].narrow(0, 0, len);
      const double dh = (got - plain->hidden_states[row].narrow(0, 0, len)).abs().max().item<double>();
      const double dp = (out->pooled[row] - plain->pooled[row]).abs().max().item<double>();
      EXPECT_LE(dh, tol) << "row " << row;
      EXPECT_LE(dp, tol) << "row " << row;
    }
    for (int64_t row : {0, 2, 4}) {  // and the prefix rows do change
      EXPECT_GT((out->pooled[row] - plain->pooled[row]).abs().max().item<double>(), 1e-4) << "row " << row;
    }
  }
}

// The naive reference for one row: concatenate the spec's prefix before the keys / values, all slots attended.
class NaivePrefix : public model::ForwardHooks {
 public:
  explicit NaivePrefix(const MethodSpec& spec) : spec_(spec) {}
  void OnAttentionKeyValue(const model::ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    auto k = spec_.tensors.find(attention.name + ".prefix_keys");
    if (k == spec_.tensors.end()) return;
    const at::Tensor& v = spec_.tensors.at(attention.name + ".prefix_values");
    const int64_t p = k->second.size(0), nh = attention.num_heads, dh = attention.head_dim;
    ASSERT_EQ(keys->size(0), 1);
    *keys = at::cat({k->second.view({1, p, nh, dh}).transpose(1, 2), *keys}, 2);
    *values = at::cat({v.view({1, p, nh, dh}).transpose(1, 2), *values}, 2);
    *key_mask = at::cat({at::ones({1, p}, at::kBool), *key_mask}, 1);
  }

 private:
  const MethodSpec& spec_;
};

TEST(PrefixTest, OneRowEqualsNaiveConcatenation) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    for (int64_t p : {1, 6}) {
      SCOPED_TRACE(absl::StrCat(name, " P=", p));
      const MethodSpec spec = PrefixSpec(*model, p, 77);
      auto method = CreateOrFail(spec, *model);
      ASSERT_NE(method, nullptr);
      const auto rows = RandomRows(*model, 1, 8, 8, 3);
      NaivePrefix naive(spec);
      auto want = RunRows(*model, rows, &naive);
      ASSERT_TRUE(want.ok()) << want.status();
      auto hooks = MakeMethodBatch(MethodKind::kPrefix, {method.get()}, *model);
      ASSERT_TRUE(hooks.ok());
      auto got = RunRows(*model, rows, hooks->get());
      ASSERT_TRUE(got.ok());
      const double diff = std::max((got->hidden_states - want->hidden_states).abs().max().item<double>(),
                                   (got->pooled - want->pooled).abs().max().item<double>());
      EXPECT_LE(diff, 1e-5 * std::max(1.0, want->hidden_states.abs().max().item<double>()));
      std::printf("[prefix %s P=%d] one row vs naive concatenation: max diff %.3g\n", name.c_str(),
                  static_cast<int>(p), diff);
    }
  }
}

TEST(PrefixTest, CanonicalSpec) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto all = CreateOrFail(PrefixSpec(*model, 3, 1), *model);
    ASSERT_NE(all, nullptr);
    std::vector<std::string> names;
    int64_t bytes = 0;
    for (const model::ModuleInfo* a : Attentions(*model)) {
      names.push_back(a->name);
      bytes += 2 * 3 * a->num_heads * a->head_dim * 4;
    }
    std::sort(names.begin(), names.end());
    EXPECT_EQ(all->spec().config["targets"].get<std::vector<std::string>>(), names);
    EXPECT_EQ(all->spec().config["num_virtual_tokens"], 3);
    EXPECT_EQ(all->bytes(), bytes);
    auto again = CreateOrFail(all->spec(), *model);
    ASSERT_NE(again, nullptr);
    EXPECT_EQ(again->spec().config, all->spec().config);
    // A regex target.
    MethodSpec spec = PrefixSpec(*model, 2, 1, {0});
    spec.config["targets"] = {R"(re:encoder\.layer\.0\..*)"};
    auto layer0 = CreateOrFail(spec, *model);
    ASSERT_NE(layer0, nullptr);
    EXPECT_EQ(layer0->spec().config["targets"].size(), 1u);
  }
}

TEST(PrefixTest, BadInputIsInvalidArgument) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const MethodSpec good = PrefixSpec(*model, 4, 3);
    ASSERT_NE(CreateOrFail(good, *model), nullptr);
    const std::string att = Attentions(*model)[0]->name;
    const std::string att1 = Attentions(*model)[1]->name;

    MethodSpec s = good;
    s.tensors.erase(att + ".prefix_values");
    ExpectInvalid(s, *model, att + ".prefix_values\" is missing");

    s = good;
    s.tensors[att + ".prefix_queries"] = at::zeros({4, 8});
    ExpectInvalid(s, *model, "unexpected tensor \"" + att + ".prefix_queries\"");

    s = good;
    s.tensors[att + ".prefix_keys"] = at::zeros({3, s.tensors[att + ".prefix_keys"].size(1)});
    ExpectInvalid(s, *model, att + ".prefix_keys\" has shape [3,");

    // A width that is not NH * DH of the module.
    s = good;
    s.tensors[att + ".prefix_keys"] = at::zeros({4, s.tensors[att + ".prefix_keys"].size(1) + 1});
    ExpectInvalid(s, *model, att + ".prefix_keys\" has shape");

    s = good;
    s.tensors[att1 + ".prefix_values"] = s.tensors[att1 + ".prefix_values"].clone();
    s.tensors[att1 + ".prefix_values"][1][2] = std::numeric_limits<float>::infinity();
    ExpectInvalid(s, *model, "NaN or Inf");

    s = good;
    s.tensors[att + ".prefix_keys"] = s.tensors[att + ".prefix_keys"].clone();
    s.tensors[att + ".prefix_keys"][0][0] = std::nan("");
    ExpectInvalid(s, *model, "NaN");

    s = good;
    s.config.erase("num_virtual_tokens");
    ExpectInvalid(s, *model, "\"num_virtual_tokens\" is required");

    s = good;
    s.config["num_virtual_tokens"] = "four";
    ExpectInvalid(s, *model, "\"num_virtual_tokens\" must be an integer");

    MethodLimits small;
    small.max_virtual_tokens = 3;
    ExpectInvalid(good, *model, "\"num_virtual_tokens\" must be an integer in [1, 3]", small);

    s = good;
    s.config["targets"] = {"encoder.layer.0.output"};  // a block output, not an attention module
    ExpectInvalid(s, *model, "encoder.layer.0.output");

    s = good;
    s.config["prefix_projection"] = true;
    ExpectInvalid(s, *model, "unknown config key \"prefix_projection\"");

    s = good;
    s.config["targets"] = {"re:("};
    ExpectInvalid(s, *model, "re:(");
  }
}

TEST(PrefixTest, BFloat16Runs) {
  auto model = TinyBert("bfloat16");
  ASSERT_NE(model, nullptr);
  auto p3 = CreateOrFail(PrefixSpec(*model, 3, 1), *model);
  auto p6 = CreateOrFail(PrefixSpec(*model, 6, 2, {0}), *model);
  ASSERT_TRUE(p3 && p6);
  EXPECT_EQ(p3->bytes() * 2, CreateOrFail(p3->spec(), *TinyBert())->bytes());
  const auto rows = RandomRows(*model, 5, 1, 12, 4);
  auto diff = MaxBatchVsSoloDiff(*model, MethodKind::kPrefix, rows, {p3.get(), nullptr, p6.get(), p3.get(), p6.get()});
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_TRUE(std::isfinite(*diff));
  EXPECT_LE(*diff, 0.1);
  std::printf("[prefix tiny-bert bfloat16] mixed batch vs solo: max diff %.3g\n", *diff);
}

TEST(PrefixTest, MakeBatchRefusesOtherModels) {
  auto model = TinyBert();
  auto p = CreateOrFail(PrefixSpec(*model, 2, 1), *model);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(MakeMethodBatch(MethodKind::kPrefix, {p.get()}, *TinyBert("bfloat16")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MakeMethodBatch(MethodKind::kPrefix, {nullptr}, *model).ok());
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
