// InferenceEngine with deltas. Merge mode: a large batch whose rows all carry one mergeable pack runs as merge ->
// plain forward -> restore (and nothing else does), with the unmerged result, and leaves the base weights bit for
// bit as they were, also when the merge fails. Pass planning: rows with soft prompt tokens run apart.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/delta/merge.h"
#include "server/inference/inference_engine.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using inference::EmbedRequest;
using inference::InferenceEngine;
using testing::RandomTensor;
using ::testing::HasSubstr;

// Serves fixed packs by task name.
class FixedResolver : public inference::DeltaResolver {
 public:
  explicit FixedResolver(std::map<std::string, std::shared_ptr<const DeltaPack>> packs) : packs_(std::move(packs)) {}
  absl::StatusOr<std::shared_ptr<const DeltaPack>> Resolve(const std::string& tenant,
                                                           const inference::TaskSelector& selector) const override {
    auto it = packs_.find(selector.task);
    if (it == packs_.end()) return absl::NotFoundError("no task " + selector.task);
    return it->second;
  }
  int num_packs() const override { return static_cast<int>(packs_.size()); }

 private:
  std::map<std::string, std::shared_ptr<const DeltaPack>> packs_;
};

PackContents Contents(const model::Model& m, const std::string& name) {
  PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = m.info().family;
  c.manifest.backbone_fingerprint = m.info().fingerprint;
  return c;
}

// LoRA on query and value plus BitFit on the FFN up-projections: mergeable.
std::shared_ptr<const DeltaPack> LoraPack(const model::Model& m, uint64_t seed) {
  PackContents c = Contents(m, "lora-" + std::to_string(seed));
  MethodSpec lora{MethodKind::kLora, {{"rank", 4}, {"alpha", 8}, {"targets", {"query", "value"}}}, {}};
  MethodSpec bitfit{MethodKind::kBitFit, {{"targets", {"intermediate.dense"}}}, {}};
  for (const auto& mod : m.modules()) {
    if (absl::EndsWith(mod.name, ".query") || absl::EndsWith(mod.name, ".value")) {
      lora.tensors[mod.name + ".lora_A"] = RandomTensor({4, mod.in_features}, 0.2, seed++);
      lora.tensors[mod.name + ".lora_B"] = RandomTensor({mod.out_features, 4}, 0.2, seed++);
    }
    if (absl::EndsWith(mod.name, "intermediate.dense")) {
      bitfit.tensors[mod.name + ".bias"] = RandomTensor({mod.out_features}, 0.1, seed++);
    }
  }
  c.methods = {lora, bitfit};
  auto pack = DeltaPack::FromContents(std::move(c), m, {});
  EXPECT_TRUE(pack.ok()) << pack.status();
  return pack.ok() ? *pack : nullptr;
}

// Prompt tuning: cannot be merged.
std::shared_ptr<const DeltaPack> PromptPack(const model::Model& m) {
  PackContents c = Contents(m, "prompt");
  const int64_t e = testing::FindModule(m, "embeddings.word_embeddings")->out_features;
  c.methods = {MethodSpec{MethodKind::kPrompt, {{"num_virtual_tokens", 2}},
                          {{"prompt_embeddings", RandomTensor({2, e}, 0.1, 3)}}}};
  auto pack = DeltaPack::FromContents(std::move(c), m, {});
  EXPECT_TRUE(pack.ok()) << pack.status();
  return pack.ok() ? *pack : nullptr;
}

std::map<std::string, at::Tensor> CloneParameters(const model::Model& m) {
  c10::InferenceMode guard;
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : m.parameters()) out[name] = t.clone();
  return out;
}

void ExpectParametersEqual(const model::Model& m, const std::map<std::string, at::Tensor>& before) {
  for (const auto& [name, t] : m.parameters()) EXPECT_TRUE(at::equal(t, before.at(name))) << name;
}

// An engine that merges `pack`-only passes from `threshold` padded tokens on (0: never).
std::unique_ptr<InferenceEngine> MakeEngine(std::shared_ptr<const model::Model> model,
                                            const inference::DeltaResolver* resolver, const DeltaPack* pack,
                                            double threshold, int max_batch_rows = 32,
                                            absl::Duration delay = absl::Milliseconds(2)) {
  InferenceEngine::Options options;
  options.merge_break_even =
      pack == nullptr ? 0 : threshold / static_cast<double>(MergeBreakEvenTokens(*pack, *model));
  options.batching.max_batch_rows = max_batch_rows;
  options.batching.max_queue_delay = delay;
  auto engine = InferenceEngine::Create(std::move(model), options, nullptr, resolver);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

EmbedRequest Request(const std::string& task, const std::vector<std::vector<int64_t>>& rows) {
  EmbedRequest request;
  request.task.task = task;
  request.token_ids = rows;
  return request;
}

// Forwards to `inner` and records the rows of every forward pass.
class RecordingModel : public model::Model {
 public:
  explicit RecordingModel(std::shared_ptr<const model::Model> inner) : inner_(std::move(inner)) {}
  const model::ModelInfo& info() const override { return inner_->info(); }
  const model::Tokenizer& tokenizer() const override { return inner_->tokenizer(); }
  const std::vector<model::ModuleInfo>& modules() const override { return inner_->modules(); }
  const std::map<std::string, at::Tensor>& parameters() const override { return inner_->parameters(); }
  absl::StatusOr<model::ForwardOutput> Forward(const model::ForwardInput& input,
                                               model::ForwardHooks* hooks) const override {
    {
      absl::MutexLock lock(&mu_);
      pass_rows_.push_back(input.input_ids.size(0));
    }
    return inner_->Forward(input, hooks);
  }
  absl::StatusOr<model::ForwardOutput> ForwardTrainable(const model::ForwardInput& input,
                                                        model::ForwardHooks* hooks) const override {
    return inner_->ForwardTrainable(input, hooks);
  }
  std::vector<int64_t> pass_rows() const {
    absl::MutexLock lock(&mu_);
    return pass_rows_;
  }

 private:
  std::shared_ptr<const model::Model> inner_;
  mutable absl::Mutex mu_;
  mutable std::vector<int64_t> pass_rows_ ABSL_GUARDED_BY(mu_);
};

TEST(MergeModeTest, MergesALargeBatchOfOnePackAndMatchesTheUnmergedResult) {
  auto model = testing::TinyBert();
  ASSERT_NE(model, nullptr);
  const auto pack = LoraPack(*model, 1);
  ASSERT_NE(pack, nullptr);
  FixedResolver resolver({{"lora", pack}});
  const auto rows = testing::RandomRows(*model, 16, 8, 8, 5);  // 128 padded tokens
  const auto before = CloneParameters(*model);

  auto merging = MakeEngine(model, &resolver, pack.get(), /*threshold=*/127.5);
  auto unmerged_engine = MakeEngine(model, &resolver, nullptr, 0);
  ASSERT_TRUE(merging && unmerged_engine);
  auto merged = merging->Embed(Request("lora", rows), {});
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merging->merged_forwards(), 1);
  ExpectParametersEqual(*model, before);
  auto unmerged = unmerged_engine->Embed(Request("lora", rows), {});
  ASSERT_TRUE(unmerged.ok()) << unmerged.status();
  EXPECT_EQ(unmerged_engine->merged_forwards(), 0);
  auto base = unmerged_engine->Embed(Request("", rows), {});
  ASSERT_TRUE(base.ok()) << base.status();

  double diff = 0, pack_effect = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& a = merged->results[i].embedding;
    const auto& b = unmerged->results[i].embedding;
    const auto& c = base->results[i].embedding;
    ASSERT_EQ(a.size(), b.size());
    for (size_t j = 0; j < a.size(); ++j) {
      diff = std::max<double>(diff, std::abs(a[j] - b[j]));
      pack_effect = std::max<double>(pack_effect, std::abs(b[j] - c[j]));
    }
  }
  EXPECT_LE(diff, 1e-4);
  EXPECT_GT(pack_effect, 1e-3) << "the pack must matter";
}

TEST(MergeModeTest, RunsSmallMixedAndUnmergeableBatchesWithHooks) {
  auto model = testing::TinyBert();
  ASSERT_NE(model, nullptr);
  const auto a = LoraPack(*model, 10);
  ASSERT_NE(a, nullptr);
  FixedResolver resolver({{"a", a}, {"b", LoraPack(*model, 20)}, {"prompt", PromptPack(*model)}});
  const auto rows = testing::RandomRows(*model, 8, 8, 8, 6);  // 64 padded tokens per request
  {
    auto engine = MakeEngine(model, &resolver, a.get(), /*threshold=*/64.5);
    ASSERT_NE(engine, nullptr);
    ASSERT_TRUE(engine->Embed(Request("a", rows), {}).ok());
    EXPECT_EQ(engine->merged_forwards(), 0) << "64 tokens are below the threshold of 64.5";
  }
  {
    auto engine = MakeEngine(model, &resolver, a.get(), /*threshold=*/63.5);
    ASSERT_NE(engine, nullptr);
    ASSERT_TRUE(engine->Embed(Request("prompt", rows), {}).ok());
    EXPECT_EQ(engine->merged_forwards(), 0) << "prompt tuning cannot be merged";
    ASSERT_TRUE(engine->Embed(Request("a", rows), {}).ok());
    EXPECT_EQ(engine->merged_forwards(), 1) << "64 tokens of one LoRA pack reach the threshold of 63.5";
  }
  {
    // Two requests with different packs fill one batch of 16 rows (the batch waits until it is full).
    auto engine = MakeEngine(model, &resolver, a.get(), /*threshold=*/63.5, /*max_batch_rows=*/16, absl::Seconds(30));
    ASSERT_NE(engine, nullptr);
    absl::Status other;
    std::thread second([&] { other = engine->Embed(Request("b", rows), {}).status(); });
    EXPECT_TRUE(engine->Embed(Request("a", rows), {}).ok());
    second.join();
    EXPECT_TRUE(other.ok()) << other;
    EXPECT_EQ(engine->merged_forwards(), 0) << "a batch of two packs runs unmerged";
  }
}

TEST(MergeModeTest, AFailedMergeFailsTheRequestWithAClearStatusAndKeepsTheWeights) {
  auto tiny = testing::TinyBert();
  ASSERT_NE(tiny, nullptr);
  // Merging fails at layer 1's value weight, after layer 0's query and value and layer 1's query were rewritten.
  auto model = testing::WithoutParameter(tiny, "encoder.layer.1.attention.self.value.weight");
  const auto pack = LoraPack(*tiny, 30);
  ASSERT_NE(pack, nullptr);
  FixedResolver resolver({{"lora", pack}});
  const auto rows = testing::RandomRows(*tiny, 16, 8, 8, 7);
  const auto before = CloneParameters(*tiny);
  auto engine = MakeEngine(model, &resolver, pack.get(), /*threshold=*/64);
  ASSERT_NE(engine, nullptr);
  auto failed = engine->Embed(Request("lora", rows), {});
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInternal) << failed.status();
  EXPECT_THAT(failed.status().message(), HasSubstr("merge mode")) << failed.status();
  EXPECT_THAT(failed.status().message(), HasSubstr("encoder.layer.1.attention.self.value.weight"));
  EXPECT_THAT(failed.status().message(), HasSubstr("restored"));
  EXPECT_EQ(engine->merged_forwards(), 0);
  ExpectParametersEqual(*tiny, before);
  // The weights are free again: a base request runs.
  EXPECT_TRUE(engine->Embed(Request("", rows), {}).ok());
}

// Sends a prompt-tuned and a LoRA request of `rows` each at once (one batch of 2 x rows) to an engine with
// `options` over `model`; returns the rows of each forward pass it ran and, through the pointers, the responses.
std::vector<int64_t> RunPromptAndLoraTogether(std::shared_ptr<RecordingModel> model,
                                              const inference::DeltaResolver* resolver,
                                              InferenceEngine::Options options,
                                              const std::vector<std::vector<int64_t>>& rows,
                                              inference::EmbedResponse* prompt_out,
                                              inference::EmbedResponse* lora_out) {
  options.merge_break_even = 0;
  options.batching.max_batch_rows = 2 * static_cast<int>(rows.size());  // the two requests fill one batch
  options.batching.max_queue_delay = absl::Seconds(30);
  auto created = InferenceEngine::Create(model, options, nullptr, resolver);
  EXPECT_TRUE(created.ok()) << created.status();
  if (!created.ok()) return {};
  const size_t passes_before = model->pass_rows().size();
  absl::StatusOr<inference::EmbedResponse> prompt;
  std::thread other([&] {
    EmbedRequest request = Request("prompt", rows);
    request.return_token_embeddings = true;
    prompt = (*created)->Embed(request, {});
  });
  EmbedRequest request = Request("lora", rows);
  request.return_token_embeddings = true;
  auto lora = (*created)->Embed(request, {});
  other.join();
  EXPECT_TRUE(lora.ok()) << lora.status();
  EXPECT_TRUE(prompt.ok()) << prompt.status();
  if (prompt.ok()) *prompt_out = *prompt;
  if (lora.ok()) *lora_out = *lora;
  const std::vector<int64_t> all = model->pass_rows();
  return std::vector<int64_t>(all.begin() + passes_before, all.end());
}

float MaxResponseDiff(const inference::EmbedResponse& a, const inference::EmbedResponse& b) {
  EXPECT_EQ(a.results.size(), b.results.size());
  float worst = 0;
  for (size_t i = 0; i < a.results.size() && i < b.results.size(); ++i) {
    const auto& x = a.results[i];
    const auto& y = b.results[i];
    EXPECT_EQ(x.embedding.size(), y.embedding.size());
    EXPECT_EQ(x.token_embeddings.size(), y.token_embeddings.size());
    for (size_t k = 0; k < x.embedding.size() && k < y.embedding.size(); ++k) {
      worst = std::max(worst, std::abs(x.embedding[k] - y.embedding[k]));
    }
    for (size_t k = 0; k < x.token_embeddings.size() && k < y.token_embeddings.size(); ++k) {
      worst = std::max(worst, std::abs(x.token_embeddings[k] - y.token_embeddings[k]));
    }
  }
  return worst;
}

TEST(PassPlanningTest, UnpackedRunsRowsWithSoftTokensApartFromRowsWithout) {
  auto tiny = testing::TinyBert();
  ASSERT_NE(tiny, nullptr);
  auto model = std::make_shared<RecordingModel>(tiny);
  FixedResolver resolver({{"prompt", PromptPack(*tiny)}, {"lora", LoraPack(*tiny, 40)}});
  const auto rows = testing::RandomRows(*tiny, 4, 8, 8, 8);  // equal lengths: only the soft tokens differ
  for (double ratio : {1.5, 0.0}) {
    SCOPED_TRACE(ratio);
    InferenceEngine::Options options;
    options.pack_tokens = false;
    options.max_padding_ratio = ratio;  // 0: one forward per batch, whatever the lengths
    inference::EmbedResponse prompt, lora;
    const std::vector<int64_t> passes = RunPromptAndLoraTogether(model, &resolver, options, rows, &prompt, &lora);
    if (ratio > 0) {
      EXPECT_THAT(passes, ::testing::ElementsAre(4, 4));
    } else {
      EXPECT_THAT(passes, ::testing::ElementsAre(8));
    }
  }
}

TEST(PassPlanningTest, PackedRunsRowsOfAnyLengthAndSoftTokensInOnePassWithTheSameResults) {
  auto tiny = testing::TinyBert();
  ASSERT_NE(tiny, nullptr);
  auto model = std::make_shared<RecordingModel>(tiny);
  FixedResolver resolver({{"prompt", PromptPack(*tiny)}, {"lora", LoraPack(*tiny, 41)}});
  // Lengths 3..12 and soft tokens: unpacked, the prompt's rows run apart (and long / short rows may split).
  const auto rows = testing::RandomRows(*tiny, 5, 3, 12, 9);
  InferenceEngine::Options packed_options;  // pack_tokens is the default
  ASSERT_TRUE(packed_options.pack_tokens);
  inference::EmbedResponse packed_prompt, packed_lora;
  EXPECT_THAT(RunPromptAndLoraTogether(model, &resolver, packed_options, rows, &packed_prompt, &packed_lora),
              ::testing::ElementsAre(10));

  InferenceEngine::Options padded_options;
  padded_options.pack_tokens = false;
  inference::EmbedResponse padded_prompt, padded_lora;
  EXPECT_GE(RunPromptAndLoraTogether(model, &resolver, padded_options, rows, &padded_prompt, &padded_lora).size(),
            2u);  // at least the prompt's rows apart
  EXPECT_LT(MaxResponseDiff(packed_prompt, padded_prompt), 1e-4);
  EXPECT_LT(MaxResponseDiff(packed_lora, padded_lora), 1e-4);
  EXPECT_EQ(packed_prompt.results.size(), rows.size());
}

TEST(PassPlanningTest, PackedStillSplitsBatchesWhoseAttentionPaddingIsExtreme) {
  auto tiny = testing::TinyBert();
  ASSERT_NE(tiny, nullptr);
  auto model = std::make_shared<RecordingModel>(tiny);
  FixedResolver resolver({{"prompt", PromptPack(*tiny)}, {"lora", LoraPack(*tiny, 42)}});
  // Seven 1-token rows and one of 30, twice (the prompt's rows 2 tokens longer): rows x longest = 16 x 32 = 512
  // padded positions for 90 real tokens, over packed_max_padding_ratio (4).
  std::vector<std::vector<int64_t>> rows = testing::RandomRows(*tiny, 7, 1, 1, 10);
  rows.push_back(testing::RandomRows(*tiny, 1, 30, 30, 11)[0]);
  InferenceEngine::Options options;
  inference::EmbedResponse prompt, lora;
  const std::vector<int64_t> passes = RunPromptAndLoraTogether(model, &resolver, options, rows, &prompt, &lora);
  EXPECT_GT(passes.size(), 1u);
  options.packed_max_padding_ratio = 0;  // never split
  EXPECT_THAT(RunPromptAndLoraTogether(model, &resolver, options, rows, &prompt, &lora), ::testing::ElementsAre(16));
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
