// Prompt tuning: soft tokens go first in each row (positions 0..P-1), mixed batches equal each row alone, a prompt
// made of word-embedding rows equals running those ids in front of the row, bad packs are refused, bfloat16 runs.
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
using testing::FindModule;
using testing::MaxBatchVsSoloDiff;
using testing::RandomRows;
using testing::RandomTensor;
using testing::RunRows;
using testing::TestModels;
using testing::TinyBert;

int64_t EmbeddingWidth(const model::Model& model) {
  return model.parameters().at("embeddings.word_embeddings.weight").size(1);
}

MethodSpec PromptSpec(const model::Model& model, int64_t p, uint64_t seed) {
  MethodSpec spec;
  spec.kind = MethodKind::kPrompt;
  spec.config["num_virtual_tokens"] = p;
  spec.tensors["prompt_embeddings"] = RandomTensor({p, EmbeddingWidth(model)}, 0.5, seed);
  return spec;
}

double RelativeTolerance(const at::Tensor& want) {
  return 1e-5 * std::max(1.0, want.abs().max().item<double>());
}

TEST(PromptTest, MixedBatchEqualsEachRowAlone) {
  for (const auto& [name, model] : TestModels()) {
    for (uint64_t seed : {1, 2, 3}) {
      SCOPED_TRACE(absl::StrCat(name, " seed ", seed));
      auto p2 = CreateOrFail(PromptSpec(*model, 2, seed * 10), *model);
      auto p5 = CreateOrFail(PromptSpec(*model, 5, seed * 10 + 1), *model);
      auto p1 = CreateOrFail(PromptSpec(*model, 1, seed * 10 + 2), *model);
      auto p8 = CreateOrFail(PromptSpec(*model, 8, seed * 10 + 3), *model);
      ASSERT_TRUE(p2 && p5 && p1 && p8);
      const auto rows = RandomRows(*model, 10, 1, 14, seed);
      const std::vector<const Method*> methods = {p2.get(), nullptr, p5.get(), p1.get(), p2.get(),
                                                  nullptr,  p8.get(), p5.get(), p1.get(), nullptr};
      const double tol = BatchTolerance(*model, MethodKind::kPrompt, rows, 1e-5, 3);
      auto diff = MaxBatchVsSoloDiff(*model, MethodKind::kPrompt, rows, methods);
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      std::printf("[prompt %s seed %d] mixed batch vs solo: max diff %.3g (bound %.3g)\n", name.c_str(),
                  static_cast<int>(seed), *diff, tol);
      const std::vector<std::vector<int64_t>> four = {rows[0], rows[1], rows[2], rows[3]};
      diff = MaxBatchVsSoloDiff(*model, MethodKind::kPrompt, four, std::vector<const Method*>(4, p5.get()));
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, BatchTolerance(*model, MethodKind::kPrompt, four, 1e-5, 3));
    }
  }
}

TEST(PromptTest, SoftTokensComeFirstAndShapesFollow) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto p3 = CreateOrFail(PromptSpec(*model, 3, 1), *model);
    auto p6 = CreateOrFail(PromptSpec(*model, 6, 2), *model);
    ASSERT_TRUE(p3 && p6);
    const auto rows = RandomRows(*model, 4, 2, 9, 5);
    const std::vector<const Method*> methods = {p3.get(), nullptr, p6.get(), p3.get()};
    auto hooks = MakeMethodBatch(MethodKind::kPrompt, methods, *model);
    ASSERT_TRUE(hooks.ok()) << hooks.status();
    const std::vector<int64_t> lead = {3, 0, 6, 3};
    int64_t longest = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      EXPECT_EQ((*hooks)->LeadingVirtualTokens(i), lead[i]);
      longest = std::max<int64_t>(longest, lead[i] + rows[i].size());
    }
    auto out = RunRows(*model, rows, hooks->get());
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->hidden_states.size(1), longest);
    ASSERT_EQ(out->attention_mask.sizes(), (std::vector<int64_t>{4, longest}));
    for (size_t i = 0; i < rows.size(); ++i) {
      const int64_t n = lead[i] + static_cast<int64_t>(rows[i].size());
      at::Tensor want = at::zeros({longest}, at::kBool);
      want.narrow(0, 0, n).fill_(true);
      EXPECT_TRUE(out->attention_mask[i].cpu().equal(want)) << "row " << i;
    }
    // A row without a prompt is the plain forward of that row.
    auto plain = RunRows(*model, {rows[1]}, nullptr);
    ASSERT_TRUE(plain.ok());
    const int64_t len = static_cast<int64_t>(rows[1].size());
    EXPECT_LE((out->hidden_states[1].narrow(0, 0, len) - plain->hidden_states[0]).abs().max().item<double>(),
              RelativeTolerance(plain->hidden_states));
    EXPECT_LE((out->pooled[1] - plain->pooled[0]).abs().max().item<double>(), 1e-5);
    // A prompt is not a no-op.
    auto alone = RunRows(*model, {rows[0]}, nullptr);
    ASSERT_TRUE(alone.ok());
    EXPECT_GT((out->pooled[0] - alone->pooled[0]).abs().max().item<double>(), 1e-3);
  }
}

TEST(PromptTest, WordEmbeddingPromptEqualsPrependedIds) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    // The prompt is the embedding rows of some ids: the row then must equal those ids followed by the row.
    const std::vector<int64_t> prompt_ids = RandomRows(*model, 1, 4, 4, 99)[0];
    const at::Tensor table = model->parameters().at("embeddings.word_embeddings.weight").to(at::kCPU, at::kFloat);
    at::Tensor ids = at::empty({4}, at::kLong);
    for (int64_t k = 0; k < 4; ++k) ids[k] = prompt_ids[k];
    MethodSpec spec;
    spec.kind = MethodKind::kPrompt;
    spec.config["num_virtual_tokens"] = 4;
    spec.tensors["prompt_embeddings"] = table.index_select(0, ids).contiguous();
    auto method = CreateOrFail(spec, *model);
    ASSERT_NE(method, nullptr);
    const auto rows = RandomRows(*model, 3, 2, 10, 17);
    auto hooks = MakeMethodBatch(MethodKind::kPrompt, {method.get(), nullptr, method.get()}, *model);
    ASSERT_TRUE(hooks.ok());
    auto got = RunRows(*model, rows, hooks->get());
    ASSERT_TRUE(got.ok()) << got.status();
    for (int64_t i : {0, 2}) {
      std::vector<int64_t> joined = prompt_ids;
      joined.insert(joined.end(), rows[i].begin(), rows[i].end());
      auto want = RunRows(*model, {joined}, nullptr);
      ASSERT_TRUE(want.ok());
      const int64_t n = static_cast<int64_t>(joined.size());
      const double dh =
          (got->hidden_states[i].narrow(0, 0, n) - want->hidden_states[0]).abs().max().item<double>();
      const double dp = (got->pooled[i] - want->pooled[0]).abs().max().item<double>();
      EXPECT_LE(dh, RelativeTolerance(want->hidden_states)) << "row " << i;
      EXPECT_LE(dp, 1e-5) << "row " << i;
      std::printf("[prompt %s] word-embedding prompt vs prepended ids, row %d: max diff %.3g / pooled %.3g\n",
                  name.c_str(), static_cast<int>(i), dh, dp);
    }
  }
}

// The naive reference for one row: cat(prompt, the row's embeddings), an all-true mask.
class NaivePrompt : public model::ForwardHooks {
 public:
  explicit NaivePrompt(at::Tensor prompt) : prompt_(std::move(prompt)) {}
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    *hidden = at::cat({prompt_.unsqueeze(0).to(hidden->scalar_type()), *hidden}, 1);
    *mask = at::ones({1, hidden->size(1)}, at::kBool);
  }

 private:
  at::Tensor prompt_;
};

TEST(PromptTest, OneRowEqualsNaiveSplice) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const MethodSpec spec = PromptSpec(*model, 5, 8);
    auto method = CreateOrFail(spec, *model);
    ASSERT_NE(method, nullptr);
    const auto rows = RandomRows(*model, 1, 7, 7, 2);
    NaivePrompt naive(spec.tensors.at("prompt_embeddings"));
    auto want = RunRows(*model, rows, &naive);
    ASSERT_TRUE(want.ok()) << want.status();
    auto hooks = MakeMethodBatch(MethodKind::kPrompt, {method.get()}, *model);
    ASSERT_TRUE(hooks.ok());
    auto got = RunRows(*model, rows, hooks->get());
    ASSERT_TRUE(got.ok());
    ASSERT_EQ(got->hidden_states.sizes(), want->hidden_states.sizes());
    const double diff = std::max((got->hidden_states - want->hidden_states).abs().max().item<double>(),
                                 (got->pooled - want->pooled).abs().max().item<double>());
    EXPECT_LE(diff, RelativeTolerance(want->hidden_states));
    std::printf("[prompt %s] one row vs naive splice: max diff %.3g\n", name.c_str(), diff);
  }
}

TEST(PromptTest, CanonicalSpec) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto p = CreateOrFail(PromptSpec(*model, 3, 1), *model);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(p->spec().config["num_virtual_tokens"], 3);
    EXPECT_EQ(p->spec().tensors.size(), 1u);
    EXPECT_EQ(p->bytes(), 3 * EmbeddingWidth(*model) * 4);
    auto again = CreateOrFail(p->spec(), *model);
    ASSERT_NE(again, nullptr);
    EXPECT_EQ(again->spec().config, p->spec().config);
  }
}

TEST(PromptTest, BadInputIsInvalidArgument) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    const MethodSpec good = PromptSpec(*model, 4, 3);
    const int64_t e = EmbeddingWidth(*model);

    MethodSpec s = good;
    s.tensors.clear();
    ExpectInvalid(s, *model, "\"prompt_embeddings\" is missing");

    s = good;
    s.tensors["prompt_embeddings"] = at::zeros({4, e + 1});
    ExpectInvalid(s, *model, absl::StrCat("has shape [4,", e + 1, "], expected [4,", e, "]"));

    s = good;
    s.tensors["prompt_embeddings"] = at::zeros({5, e});
    ExpectInvalid(s, *model, "has shape [5,");

    s = good;
    s.tensors["prompt_embeddings"] = s.tensors["prompt_embeddings"].clone();
    s.tensors["prompt_embeddings"][3][0] = std::nan("");
    ExpectInvalid(s, *model, "NaN");

    s = good;
    s.tensors["encoder.layer.0.attention.self.prefix_keys"] = at::zeros({4, e});
    ExpectInvalid(s, *model, "unexpected tensor");

    s = good;
    s.config.erase("num_virtual_tokens");
    ExpectInvalid(s, *model, "\"num_virtual_tokens\" is required");

    s = good;
    s.config["num_virtual_tokens"] = -2;
    ExpectInvalid(s, *model, "\"num_virtual_tokens\" must be an integer");

    MethodLimits small;
    small.max_virtual_tokens = 2;
    ExpectInvalid(good, *model, "\"num_virtual_tokens\" must be an integer in [1, 2]", small);

    s = PromptSpec(*model, model->info().max_sequence_length, 1);
    MethodLimits big;
    big.max_virtual_tokens = 100000;
    ExpectInvalid(s, *model, "leaves no room", big);

    s = good;
    s.config["targets"] = {"embeddings.word_embeddings"};
    ExpectInvalid(s, *model, "unknown config key \"targets\"");
  }
}

TEST(PromptTest, TooLongAfterPromptIsAnError) {
  c10::InferenceMode guard;
  auto model = TinyBert();
  const int64_t max_len = model->info().max_sequence_length;
  auto p = CreateOrFail(PromptSpec(*model, max_len - 2, 1), *model);
  ASSERT_NE(p, nullptr);
  auto hooks = MakeMethodBatch(MethodKind::kPrompt, {p.get()}, *model);
  ASSERT_TRUE(hooks.ok());
  auto out = RunRows(*model, RandomRows(*model, 1, 5, 5, 1), hooks->get());
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
  EXPECT_TRUE(RunRows(*model, RandomRows(*model, 1, 2, 2, 1), hooks->get()).ok());
}

TEST(PromptTest, BFloat16Runs) {
  auto model = TinyBert("bfloat16");
  ASSERT_NE(model, nullptr);
  auto p3 = CreateOrFail(PromptSpec(*model, 3, 1), *model);
  auto p6 = CreateOrFail(PromptSpec(*model, 6, 2), *model);
  ASSERT_TRUE(p3 && p6);
  EXPECT_EQ(p3->bytes() * 2, CreateOrFail(p3->spec(), *TinyBert())->bytes());
  const auto rows = RandomRows(*model, 5, 1, 12, 4);
  auto diff = MaxBatchVsSoloDiff(*model, MethodKind::kPrompt, rows, {p3.get(), nullptr, p6.get(), p3.get(), p6.get()});
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_TRUE(std::isfinite(*diff));
  EXPECT_LE(*diff, 0.1);
  std::printf("[prompt tiny-bert bfloat16] mixed batch vs solo: max diff %.3g\n", *diff);
}

// The hooks of several kinds in MethodKind order (what DeltaBatch does), for one pass.
class Composite : public model::ForwardHooks {
 public:
  std::vector<std::unique_ptr<MethodBatch>> parts;
  int64_t Lead(int64_t row) const {
    int64_t n = 0;
    for (const auto& p : parts) n += p->LeadingVirtualTokens(row);
    return n;
  }
  void OnTokenEmbeddings(at::Tensor* h, at::Tensor* m) override {
    for (auto& p : parts) p->OnTokenEmbeddings(h, m);
  }
  void OnLinear(const model::ModuleInfo& mod, const at::Tensor& in, at::Tensor* out) override {
    for (auto& p : parts) p->OnLinear(mod, in, out);
  }
  void OnAttentionKeyValue(const model::ModuleInfo& a, at::Tensor* k, at::Tensor* v, at::Tensor* m) override {
    for (auto& p : parts) p->OnAttentionKeyValue(a, k, v, m);
  }
  void OnBlockOutput(const model::ModuleInfo& b, at::Tensor* h) override {
    for (auto& p : parts) p->OnBlockOutput(b, h);
  }
};

MethodSpec AdapterSpecFor(const model::Model& model, bool parallel, int64_t b, uint64_t seed) {
  MethodSpec spec;
  spec.kind = parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  spec.config["bottleneck"] = b;
  for (const auto& m : model.modules()) {
    if (m.kind != model::ModuleKind::kBlockOutput) continue;
    if (parallel && m.name != absl::StrCat("encoder.layer.", m.layer, ".output")) continue;
    const int64_t in = parallel ? FindModule(model, m.sublayer_input)->in_features : m.in_features;
    spec.tensors[m.name + ".down.weight"] = RandomTensor({b, in}, 1.0 / std::sqrt(double(in)), seed++);
    spec.tensors[m.name + ".down.bias"] = RandomTensor({b}, 0.1, seed++);
    spec.tensors[m.name + ".up.weight"] = RandomTensor({m.in_features, b}, 0.5, seed++);
    spec.tensors[m.name + ".up.bias"] = RandomTensor({m.in_features}, 0.1, seed++);
  }
  return spec;
}

MethodSpec PrefixSpecFor(const model::Model& model, int64_t p, uint64_t seed) {
  MethodSpec spec;
  spec.kind = MethodKind::kPrefix;
  spec.config["num_virtual_tokens"] = p;
  for (const auto& m : model.modules()) {
    if (m.kind != model::ModuleKind::kAttention) continue;
    spec.tensors[m.name + ".prefix_keys"] = RandomTensor({p, m.num_heads * m.head_dim}, 1.0, seed++);
    spec.tensors[m.name + ".prefix_values"] = RandomTensor({p, m.num_heads * m.head_dim}, 1.0, seed++);
  }
  return spec;
}

// Prompt tuning changes T before every other hook: parallel adapters (which capture sub-layer inputs), prefixes
// and sequential adapters all see the spliced sequence, and each row still equals itself alone.
TEST(PromptTest, CombinesWithTheOtherAdditionMethods) {
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto parallel = CreateOrFail(AdapterSpecFor(*model, true, 6, 1), *model);
    auto prefix = CreateOrFail(PrefixSpecFor(*model, 3, 100), *model);
    auto prompt2 = CreateOrFail(PromptSpec(*model, 2, 7), *model);
    auto prompt5 = CreateOrFail(PromptSpec(*model, 5, 8), *model);
    auto adapter = CreateOrFail(AdapterSpecFor(*model, false, 4, 200), *model);
    ASSERT_TRUE(parallel && prefix && prompt2 && prompt5 && adapter);
    const int n = 6;
    const auto rows = RandomRows(*model, n, 1, 12, 21);
    // Per kind (parallel, prefix, prompt, adapter), what each row carries.
    const std::vector<std::vector<const Method*>> kinds = {
        {parallel.get(), nullptr, parallel.get(), nullptr, parallel.get(), nullptr},
        {prefix.get(), prefix.get(), nullptr, nullptr, prefix.get(), nullptr},
        {prompt2.get(), prompt5.get(), prompt5.get(), nullptr, nullptr, nullptr},
        {adapter.get(), nullptr, nullptr, adapter.get(), adapter.get(), nullptr}};
    const MethodKind kind_of[] = {MethodKind::kParallelAdapter, MethodKind::kPrefix, MethodKind::kPrompt,
                                  MethodKind::kAdapter};
    auto make = [&](const std::vector<int>& which) {
      auto c = std::make_unique<Composite>();
      for (int k = 0; k < 4; ++k) {
        std::vector<const Method*> methods;
        for (int r : which) methods.push_back(kinds[k][r]);
        auto b = MakeMethodBatch(kind_of[k], methods, *model);
        EXPECT_TRUE(b.ok()) << b.status();
        c->parts.push_back(std::move(*b));
      }
      return c;
    };
    auto batch_hooks = make({0, 1, 2, 3, 4, 5});
    auto batch = RunRows(*model, rows, batch_hooks.get());
    ASSERT_TRUE(batch.ok()) << batch.status();
    auto base = MaxBatchVsSoloDiff(*model, MethodKind::kPrompt, rows, std::vector<const Method*>(n, nullptr));
    ASSERT_TRUE(base.ok());
    double worst = 0;
    for (int r = 0; r < n; ++r) {
      auto solo_hooks = make({r});
      auto solo = RunRows(*model, {rows[r]}, solo_hooks.get());
      ASSERT_TRUE(solo.ok()) << solo.status();
      const int64_t len = static_cast<int64_t>(rows[r].size());
      EXPECT_EQ(batch_hooks->Lead(r), solo_hooks->Lead(0));
      const int64_t lead = batch_hooks->Lead(r);
      worst = std::max(worst, (batch->pooled[r] - solo->pooled[0]).abs().max().item<double>());
      worst = std::max(worst, (batch->hidden_states[r].narrow(0, 0, lead + len) -
                               solo->hidden_states[0].narrow(0, 0, lead + len)).abs().max().item<double>());
    }
    EXPECT_LE(worst, std::max(1e-5, 3 * *base));
    std::printf("[prompt+prefix+adapters %s] mixed batch vs solo: max diff %.3g\n", name.c_str(), worst);
  }
}

TEST(PromptTest, MakeBatchRefusesOtherModels) {
  auto model = TinyBert();
  auto p = CreateOrFail(PromptSpec(*model, 2, 1), *model);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(MakeMethodBatch(MethodKind::kPrompt, {p.get()}, *TinyBert("bfloat16")).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto none = MakeMethodBatch(MethodKind::kPrompt, {nullptr, nullptr}, *model);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ((*none)->LeadingVirtualTokens(1), 0);
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
