// Merge mode: folding lora / bitfit / ln_tuning / ia3 into the weights gives the unmerged result, and restoring
// gives the base weights back bit for bit.
#include "server/delta/merge.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include "absl/strings/match.h"
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

}  // namespace
}  // namespace delta
}  // namespace deltaserve
