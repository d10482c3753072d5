// Merge mode: folding lora / bitfit / ln_tuning / ia3 into the weights gives the unmerged result, and restoring
// gives the base weights back bit for bit.
#include "server/delta/merge.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <limits>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/delta/delta_batch.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using testing::RandomTensor;
using testing::TestModels;
using ::testing::HasSubstr;

PackContents Contents(const model::Model& m) {
  PackContents c;
  c.manifest.name = "merge-test";
  c.manifest.backbone_family = m.info().family;
  c.manifest.backbone_fingerprint = m.info().fingerprint;
  return c;
}

// lora on query/value, bitfit on the FFN up-projections, ln_tuning on every layer norm, ia3 (default targets).
PackContents MergeablePack(const model::Model& m, uint64_t seed) {
  PackContents c = Contents(m);
  MethodSpec lora{MethodKind::kLora, {{"rank", 4}, {"alpha", 8}, {"targets", {"query", "value"}}}, {}};
  MethodSpec bitfit{MethodKind::kBitFit, {{"targets", {"intermediate.dense"}}}, {}};
  MethodSpec ln{MethodKind::kLnTuning, nlohmann::json::object(), {}};
  MethodSpec ia3{MethodKind::kIa3, nlohmann::json::object(), {}};
  for (const auto& mod : m.modules()) {
    if (mod.kind == model::ModuleKind::kLinear &&
        (absl::EndsWith(mod.name, ".query") || absl::EndsWith(mod.name, ".value"))) {
      lora.tensors[mod.name + ".lora_A"] = RandomTensor({4, mod.in_features}, 0.1, seed++);
      lora.tensors[mod.name + ".lora_B"] = RandomTensor({mod.out_features, 4}, 0.1, seed++);
    }
    if (absl::EndsWith(mod.name, "intermediate.dense")) {
      bitfit.tensors[mod.name + ".bias"] = RandomTensor({mod.out_features}, 0.1, seed++);
    }
    if (mod.kind == model::ModuleKind::kLayerNorm) {
      ln.tensors[mod.name + ".weight"] = RandomTensor({mod.in_features}, 0.1, seed++);
      ln.tensors[mod.name + ".bias"] = RandomTensor({mod.in_features}, 0.1, seed++);
    }
    if (mod.kind == model::ModuleKind::kLinear && mod.layer >= 0) {
      const std::string ff = "layer." + std::to_string(mod.layer) + ".output.dense";
      if (absl::EndsWith(mod.name, ".key") || absl::EndsWith(mod.name, ".value")) {
        ia3.tensors[mod.name + ".ia3_l"] = at::ones({mod.out_features}) + RandomTensor({mod.out_features}, 0.2, seed++);
      } else if (absl::EndsWith(mod.name, ff)) {
        ia3.tensors[mod.name + ".ia3_l"] = at::ones({mod.in_features}) + RandomTensor({mod.in_features}, 0.2, seed++);
      }
    }
  }
  c.methods = {lora, bitfit, ln, ia3};
  return c;
}

std::map<std::string, at::Tensor> CloneParameters(const model::Model& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : m.parameters()) out[name] = t.clone();
  return out;
}

TEST(MergeTest, MergedForwardEqualsTheUnmergedHooksAndRestoreIsBitExact) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto pack = DeltaPack::FromContents(MergeablePack(*model, 1), *model, {});
    ASSERT_TRUE(pack.ok()) << pack.status();
    ASSERT_TRUE(IsMergeable(**pack, *model));
    const auto rows = testing::RandomRows(*model, 4, 3, 12, 7);
    c10::InferenceMode guard;
    const auto before = CloneParameters(*model);

    auto hooks = DeltaBatch::Create(std::vector<const DeltaPack*>(rows.size(), pack->get()), *model);
    ASSERT_TRUE(hooks.ok());
    auto unmerged = testing::RunRows(*model, rows, hooks->get());
    ASSERT_TRUE(unmerged.ok()) << unmerged.status();
    auto base = testing::RunRows(*model, rows, nullptr);
    ASSERT_TRUE(base.ok());

    auto merged = MergedPack::Merge(**pack, *model);
    ASSERT_TRUE(merged.ok()) << merged.status();
    EXPECT_GT((*merged)->saved_bytes(), 0);
    auto out = testing::RunRows(*model, rows, nullptr);
    ASSERT_TRUE(out.ok());
    ASSERT_TRUE((*merged)->Restore().ok());

    const double scale = unmerged->hidden_states.abs().max().item<double>();
    EXPECT_LE((out->pooled - unmerged->pooled).abs().max().item<double>(), 1e-4);
    EXPECT_LE((out->hidden_states - unmerged->hidden_states).abs().max().item<double>(), 1e-5 * std::max(1.0, scale));
    EXPECT_GT((unmerged->pooled - base->pooled).abs().max().item<double>(), 1e-3) << "the pack must matter";
    for (const auto& [param, t] : model->parameters()) {
      EXPECT_TRUE(at::equal(t, before.at(param))) << param << " not restored bit for bit";
    }
    auto again = testing::RunRows(*model, rows, nullptr);
    EXPECT_TRUE(at::equal(again->pooled, base->pooled));
  }
}

TEST(MergeTest, DestroyingAMergedPackRestoresTheWeights) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto pack = DeltaPack::FromContents(MergeablePack(*model, 50), *model, {});
    ASSERT_TRUE(pack.ok()) << pack.status();
    c10::InferenceMode guard;
    const auto before = CloneParameters(*model);
    {
      auto merged = MergedPack::Merge(**pack, *model);
      ASSERT_TRUE(merged.ok());
      bool changed = false;
      for (const auto& [param, t] : model->parameters()) changed = changed || !at::equal(t, before.at(param));
      EXPECT_TRUE(changed);
    }
    for (const auto& [param, t] : model->parameters()) EXPECT_TRUE(at::equal(t, before.at(param))) << param;
  }
}

TEST(MergeTest, RefusesPacksWithAdaptersPrefixesOrPrompts) {
  auto model = testing::TinyBert();
  ASSERT_NE(model, nullptr);
  PackContents c = Contents(*model);
  const int64_t e = testing::FindModule(*model, "embeddings.word_embeddings")->out_features;
  c.methods = {MethodSpec{MethodKind::kPrompt, {{"num_virtual_tokens", 2}},
                          {{"prompt_embeddings", RandomTensor({2, e}, 0.1, 3)}}}};
  auto pack = DeltaPack::FromContents(c, *model, {});
  ASSERT_TRUE(pack.ok()) << pack.status();
  EXPECT_FALSE(IsMergeable(**pack, *model));
  const auto before = CloneParameters(*model);
  auto merged = MergedPack::Merge(**pack, *model);
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(merged.status().message(), HasSubstr("cannot be merged"));
  for (const auto& [param, t] : model->parameters()) EXPECT_TRUE(at::equal(t, before.at(param))) << param;
}

TEST(MergeTest, AFailedMergeRestoresEveryWeightItAlreadyRewrote) {
  auto tiny = testing::TinyBert();
  ASSERT_NE(tiny, nullptr);
  // LoRA folds run in name order: layer 0's query and value, layer 1's query, then the hidden layer-1 value.
  auto model = testing::WithoutParameter(tiny, "encoder.layer.1.attention.self.value.weight");
  auto pack = DeltaPack::FromContents(MergeablePack(*tiny, 90), *tiny, {});
  ASSERT_TRUE(pack.ok()) << pack.status();
  c10::InferenceMode guard;
  const auto before = CloneParameters(*tiny);
  auto merged = MergedPack::Merge(**pack, *model);
  ASSERT_FALSE(merged.ok());
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(merged.status().message(), HasSubstr("encoder.layer.1.attention.self.value.weight"));
  EXPECT_THAT(merged.status().message(), HasSubstr("restored"));
  for (const auto& [param, t] : tiny->parameters()) {
    EXPECT_TRUE(at::equal(t, before.at(param))) << param << " not restored bit for bit";
  }
  // The mutex was released: a reader gets it at once.
  EXPECT_TRUE(model->weights_mutex().ReaderTryLock());
  model->weights_mutex().ReaderUnlock();
}

TEST(MergeTest, MergeWaitsForReadersOfTheWeightsAndHoldsThemOffUntilRestored) {
  auto model = testing::TinyBert();
  ASSERT_NE(model, nullptr);
  auto pack = DeltaPack::FromContents(MergeablePack(*model, 120), *model, {});
  ASSERT_TRUE(pack.ok()) << pack.status();
  c10::InferenceMode guard;
  const auto before = CloneParameters(*model);
  absl::Notification merged, restore;
  model->weights_mutex().ReaderLock();  // a forward pass on another thread
  std::thread merger([&] {  // merges and restores on its own thread (a MergedPack stays on one thread)
    c10::InferenceMode thread_guard;
    auto m = MergedPack::Merge(**pack, *model);
    EXPECT_TRUE(m.ok()) << m.status();
    merged.Notify();
    restore.WaitForNotification();
    if (m.ok()) EXPECT_TRUE((*m)->Restore().ok());
  });
  EXPECT_FALSE(merged.WaitForNotificationWithTimeout(absl::Milliseconds(100)))
      << "merged while a reader held the weights";
  for (const auto& [param, t] : model->parameters()) EXPECT_TRUE(at::equal(t, before.at(param))) << param;
  model->weights_mutex().ReaderUnlock();
  merged.WaitForNotification();
  EXPECT_FALSE(model->weights_mutex().ReaderTryLock()) << "a reader got in while the weights were merged";
  restore.Notify();
  merger.join();
  EXPECT_TRUE(model->weights_mutex().ReaderTryLock());
  model->weights_mutex().ReaderUnlock();
  for (const auto& [param, t] : model->parameters()) EXPECT_TRUE(at::equal(t, before.at(param))) << param;
}

TEST(MergeTest, MergedWeightBytesCountsEachRewrittenParameterOnce) {
  auto model = testing::TinyBert();
  ASSERT_NE(model, nullptr);
  auto pack = DeltaPack::FromContents(MergeablePack(*model, 150), *model, {});
  ASSERT_TRUE(pack.ok()) << pack.status();
  // lora: query and value weights; bitfit: the FFN up-projections' biases; ln_tuning: every layer norm's gain
  // and bias; ia3: key and value weights and biases (value's weight already counted), FFN down-projection weights.
  std::set<std::string> expected;
  for (const auto& m : model->modules()) {
    const bool q = absl::EndsWith(m.name, ".query"), k = absl::EndsWith(m.name, ".key"),
               v = absl::EndsWith(m.name, ".value");
    if (q || v) expected.insert(m.name + ".weight");
    if (k || v) expected.insert({m.name + ".weight", m.name + ".bias"});
    if (absl::EndsWith(m.name, "intermediate.dense")) expected.insert(m.name + ".bias");
    if (m.layer >= 0 && m.name == "encoder.layer." + std::to_string(m.layer) + ".output.dense") {
      expected.insert(m.name + ".weight");
    }
    if (m.kind == model::ModuleKind::kLayerNorm) expected.insert({m.name + ".weight", m.name + ".bias"});
  }
  int64_t bytes = 0;
  for (const std::string& name : expected) bytes += model->parameters().at(name).nbytes();
  EXPECT_EQ(MergedWeightBytes(**pack, *model), bytes);
  c10::InferenceMode guard;
  auto merged = MergedPack::Merge(**pack, *model);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ((*merged)->saved_bytes(), bytes);
}

TEST(MergeTest, BreakEvenGrowsWithTheWeightsAMergeRewritesAndIsNeverForUnmergeablePacks) {
  auto model = testing::TinyBert();
  ASSERT_NE(model, nullptr);
  auto pack_of = [&](std::vector<MethodSpec> methods) {
    PackContents c = Contents(*model);
    c.methods = std::move(methods);
    auto pack = DeltaPack::FromContents(std::move(c), *model, {});
    EXPECT_TRUE(pack.ok()) << pack.status();
    return *pack;
  };
  PackContents all = MergeablePack(*model, 200);  // lora, bitfit, ln_tuning, ia3
  const int64_t lora = MergeBreakEvenTokens(*pack_of({all.methods[0]}), *model);
  const int64_t bitfit = MergeBreakEvenTokens(*pack_of({all.methods[1]}), *model);
  const int64_t ia3 = MergeBreakEvenTokens(*pack_of({all.methods[3]}), *model);
  // BitFit rewrites biases only: merging pays almost at once. LoRA and (IA)^3 rewrite whole weight matrices.
  EXPECT_GT(bitfit, 0);
  EXPECT_LT(bitfit, lora);
  EXPECT_LT(bitfit, ia3);
  const int64_t e = testing::FindModule(*model, "embeddings.word_embeddings")->out_features;
  EXPECT_EQ(MergeBreakEvenTokens(*pack_of({MethodSpec{MethodKind::kPrompt, {{"num_virtual_tokens", 2}},
                                                      {{"prompt_embeddings", RandomTensor({2, e}, 0.1, 3)}}}}),
                                 *model),
            std::numeric_limits<int64_t>::max());
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
