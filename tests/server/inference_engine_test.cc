// Unit tests of InferenceEngine's request logic over a fake model (the real models have their own tests, and
// the integration tests run the real server), and of model::EncodeTextPair, the pair rule it shares with
// fine-tuning, over the fake BERT-like tokenizer.
#include "server/inference/inference_engine.h"

#include <ATen/ops/zeros.h>

#include <atomic>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/model/tokenizer.h"

namespace deltaserve {
namespace inference {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Words become ids (their length), wrapped in [CLS]=1 ... [SEP]=2, like a BERT tokenizer.
class FakeTokenizer : public model::Tokenizer {
 public:
  absl::StatusOr<std::vector<int64_t>> Tokenize(absl::string_view text) const override {
    if (text.find('\xff') != absl::string_view::npos) return absl::InvalidArgumentError("text is not valid UTF-8");
    std::vector<int64_t> ids;
    for (absl::string_view w : absl::StrSplit(text, ' ', absl::SkipEmpty())) ids.push_back(10 + w.size());
    return ids;
  }
  absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text) const override {
    auto ids = Tokenize(text);
    if (!ids.ok()) return ids;
    ids->insert(ids->begin(), 1);
    ids->push_back(2);
    return ids;
  }
  std::vector<int64_t> Truncate(const std::vector<int64_t>& ids, int64_t max_tokens) const override {
    std::vector<int64_t> out(ids.begin(), ids.begin() + max_tokens - 1);
    out.push_back(2);
    return out;
  }
  int64_t NumSpecialTokens() const override { return 2; }
  std::string IdToPiece(int64_t id) const override { return std::to_string(id); }
  int64_t vocab_size() const override { return 100; }
};

// pooled[i] = {sum of row i's real ids, number of real tokens}; hidden[i][t] = {id}.
class FakeModel : public model::Model {
 public:
  FakeModel() {
    info_.family = "fake";
    info_.name = "fake";
    info_.vocab_size = 100;
    info_.hidden_size = 1;
    info_.embedding_dim = 2;
    info_.max_sequence_length = 8;
  }
  const model::ModelInfo& info() const override { return info_; }
  const model::Tokenizer& tokenizer() const override { return tokenizer_; }
  const std::vector<model::ModuleInfo>& modules() const override { return modules_; }
  const std::map<std::string, at::Tensor>& parameters() const override { return parameters_; }
  absl::StatusOr<model::ForwardOutput> Forward(const model::ForwardInput& input,
                                               model::ForwardHooks*) const override {
    const int64_t b = input.input_ids.size(0), t = input.input_ids.size(1);
    forward_calls++;
    model::ForwardOutput out;
    out.pooled = at::zeros({b, 2}, at::kFloat);
    out.hidden_states = at::zeros({b, t, 1}, at::kFloat);
    out.attention_mask = input.attention_mask;
    auto ids = input.input_ids.accessor<int64_t, 2>();
    auto mask = input.attention_mask.accessor<bool, 2>();
    auto pooled = out.pooled.accessor<float, 2>();
    auto hidden = out.hidden_states.accessor<float, 3>();
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < t; ++j) {
        hidden[i][j][0] = static_cast<float>(ids[i][j]);
        if (mask[i][j]) {
          pooled[i][0] += static_cast<float>(ids[i][j]);
          pooled[i][1] += 1;
        }
      }
    }
    return out;
  }
  absl::StatusOr<model::ForwardOutput> ForwardTrainable(const model::ForwardInput& input,
                                                        model::ForwardHooks* hooks) const override {
    return Forward(input, hooks);
  }

 private:
  model::ModelInfo info_;
  FakeTokenizer tokenizer_;
  std::vector<model::ModuleInfo> modules_;
  std::map<std::string, at::Tensor> parameters_;

 public:
  mutable std::atomic<int> forward_calls{0};
};

class InferenceEngineTest : public ::testing::Test {
 protected:
  std::unique_ptr<InferenceEngine> MakeEngine(InferenceEngine::Options options = {}) {
    auto engine = InferenceEngine::Create(std::make_shared<FakeModel>(), options, nullptr);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return *std::move(engine);
  }
};

TEST_F(InferenceEngineTest, EmbedsEachTextWithSpecialTokensAndPaddingDoesNotLeak) {
  auto engine = MakeEngine();
  EmbedRequest request;
  request.texts = {"a bb", "ccc dddd eeeee"};
  request.return_token_ids = true;
  request.return_token_embeddings = true;
  auto r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->results.size(), 2u);
  EXPECT_THAT(r->results[0].token_ids, ElementsAre(1, 11, 12, 2));
  EXPECT_THAT(r->results[0].embedding, ElementsAre(26, 4));  // padding of the shorter row is masked
  EXPECT_THAT(r->results[1].embedding, ElementsAre(1 + 13 + 14 + 15 + 2, 5));
  EXPECT_THAT(r->results[0].token_embeddings, ElementsAre(1, 11, 12, 2));
  EXPECT_EQ(r->total_tokens, 9);
}

TEST_F(InferenceEngineTest, TruncatesOverLongTextsKeepingTheSpecialTokens) {
  auto engine = MakeEngine();
  EmbedRequest request;
  request.texts = {"a b c d e f g h i j"};
  request.return_token_ids = true;
  auto r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->results[0].truncated);
  EXPECT_THAT(r->results[0].token_ids, ElementsAre(1, 11, 11, 11, 11, 11, 11, 2));
}

TEST_F(InferenceEngineTest, RejectsOverLongInputsWhenTruncationIsOff) {
  InferenceEngine::Options options;
  options.truncate_by_default = false;
  auto engine = MakeEngine(options);
  EmbedRequest request;
  request.texts = {"a b c d e f g h i j"};
  auto r = engine->Embed(request, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("at most 8"));
  request.truncation = Truncation::kTruncate;  // the request overrides the default
  EXPECT_TRUE(engine->Embed(request, {}).ok());
}

TEST_F(InferenceEngineTest, HonoursALowerMaxSequenceLength) {
  InferenceEngine::Options options;
  options.max_sequence_length = 4;
  auto engine = MakeEngine(options);
  EXPECT_EQ(engine->max_sequence_length(), 4);
  options.max_sequence_length = 1000;  // never above the model's own maximum
  EXPECT_EQ(MakeEngine(options)->max_sequence_length(), 8);
  options.max_sequence_length = 2;  // no room for a token besides the specials
  EXPECT_EQ(InferenceEngine::Create(std::make_shared<FakeModel>(), options, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(InferenceEngineTest, RejectsBadRequestsWithMessagesNamingTheInput) {
  auto engine = MakeEngine();
  struct Case {
    EmbedRequest request;
    absl::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({EmbedRequest{}, absl::StatusCode::kInvalidArgument, "no inputs"});
  {
    EmbedRequest r;
    r.texts = {"a"};
    r.token_ids = {{1, 2}};
    cases.push_back({r, absl::StatusCode::kInvalidArgument, "not both"});
  }
  {
    EmbedRequest r;
    r.texts = {"ok", "   "};
    cases.push_back({r, absl::StatusCode::kInvalidArgument, "texts[1] has no tokens"});
  }
  {
    EmbedRequest r;
    r.texts = {"bad \xff"};
    cases.push_back({r, absl::StatusCode::kInvalidArgument, "texts[0]: text is not valid UTF-8"});
  }
  {
    EmbedRequest r;
    r.token_ids = {{1, 2}, {1, 100}};
    cases.push_back({r, absl::StatusCode::kInvalidArgument, "token_ids[1][1] = 100 is out of range"});
  }
  {
    EmbedRequest r;
    r.token_ids = {{}};
    cases.push_back({r, absl::StatusCode::kInvalidArgument, "token_ids[0] is empty"});
  }
  {
    EmbedRequest r;
    r.texts = std::vector<std::string>(257, "a");
    cases.push_back({r, absl::StatusCode::kInvalidArgument, "too many inputs"});
  }
  {
    EmbedRequest r;
    r.texts = {std::string((1 << 20) + 1, 'a')};
    cases.push_back({r, absl::StatusCode::kInvalidArgument, "bytes"});
  }
  {
    EmbedRequest r;
    r.texts = {"a"};
    r.task.label = "prod";
    cases.push_back({r, absl::StatusCode::kFailedPrecondition, "no delta store"});
  }
  for (const Case& c : cases) {
    auto r = engine->Embed(c.request, {});
    EXPECT_EQ(r.status().code(), c.code) << c.message;
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
}

TEST_F(InferenceEngineTest, TokenIdInputsAreCutButGetNoSpecialTokensAdded) {
  auto engine = MakeEngine();
  EmbedRequest request;
  request.token_ids = {{5, 6, 7, 8, 9, 10, 11, 12, 13, 14}};
  request.return_token_ids = true;
  auto r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->results[0].truncated);
  EXPECT_THAT(r->results[0].token_ids, ElementsAre(5, 6, 7, 8, 9, 10, 11, 12));
}

TEST_F(InferenceEngineTest, UnpackedSplitsABatchOfVeryDifferentLengthsIntoSortedForwardsKeepingOrder) {
  auto model = std::make_shared<FakeModel>();
  InferenceEngine::Options options;
  options.pack_tokens = false;
  options.max_padding_ratio = 1.5;
  auto engine = *InferenceEngine::Create(model, options, nullptr);
  EmbedRequest request;
  request.token_ids = {{5, 6, 7, 8, 9, 10, 11, 12}, {3}, {4, 4, 4, 4, 4, 4, 4}, {9}};
  auto r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(model->forward_calls.load(), 2);  // {3},{9} and the two long rows
  EXPECT_THAT(r->results[0].embedding, ElementsAre(68, 8));
  EXPECT_THAT(r->results[1].embedding, ElementsAre(3, 1));
  EXPECT_THAT(r->results[2].embedding, ElementsAre(28, 7));
  EXPECT_THAT(r->results[3].embedding, ElementsAre(9, 1));

  options.max_padding_ratio = 0;  // never split
  auto one_pass = *InferenceEngine::Create(model, options, nullptr);
  model->forward_calls = 0;
  ASSERT_TRUE(one_pass->Embed(request, {}).ok());
  EXPECT_EQ(model->forward_calls.load(), 1);
}

TEST_F(InferenceEngineTest, PackedRunsLengthSkewedRowsInOnePassUnlessAttentionPaddingIsExtreme) {
  auto model = std::make_shared<FakeModel>();
  auto engine = *InferenceEngine::Create(model, InferenceEngine::Options(), nullptr);  // packed by default
  EmbedRequest request;
  request.token_ids = {{5, 6, 7, 8, 9, 10, 11, 12}, {3}, {4, 4, 4, 4, 4, 4, 4}, {9}};  // 4 x 8 = 1.9 x 17 real
  auto r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(model->forward_calls.load(), 1);
  EXPECT_THAT(r->results[0].embedding, ElementsAre(68, 8));
  EXPECT_THAT(r->results[1].embedding, ElementsAre(3, 1));
  // Eight 1-token rows and one of 8 (the fake model's longest): 9 x 8 = 72 padded positions, over 4 x 16 real.
  request.token_ids.assign(8, {3});
  request.token_ids.push_back(std::vector<int64_t>(8, 4));
  model->forward_calls = 0;
  r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(model->forward_calls.load(), 2);
  EXPECT_THAT(r->results[8].embedding, ElementsAre(32, 8));
}

TEST_F(InferenceEngineTest, AnswersUnavailableAfterStop) {
  auto engine = MakeEngine();
  engine->Stop();
  EmbedRequest request;
  request.texts = {"a"};
  EXPECT_EQ(engine->Embed(request, {}).status().code(), absl::StatusCode::kUnavailable);
}

// ------------------------------------------------------------------------------------------------------------
// Text pairs: model::EncodeTextPair (the rule fine-tuning trains with) and the engine's `text_pairs`.

TEST(EncodeTextPairTest, JoinsTheTextsWithTheTrailingSpecialsAndTrimsTheLongerTextFirst) {
  FakeTokenizer tok;
  int64_t full = 0;
  auto pair = model::EncodeTextPair(tok, "a bb", "ccc", 64, &full);
  ASSERT_TRUE(pair.ok()) << pair.status();
  EXPECT_THAT(*pair, ElementsAre(1, 11, 12, 2, 13, 2));  // [CLS] a bb [SEP] ccc [SEP]
  EXPECT_EQ(full, 6);
  // No pair: Encode, cut by Truncate.
  auto single = model::EncodeTextPair(tok, "a bb ccc", "", 4, &full);
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_THAT(*single, ElementsAre(1, 11, 12, 2));
  EXPECT_EQ(full, 5);
  // Over the limit: the longer text loses its tail first ...
  auto cut = model::EncodeTextPair(tok, "a b c d", "bb", 6, &full);
  ASSERT_TRUE(cut.ok()) << cut.status();
  EXPECT_THAT(*cut, ElementsAre(1, 11, 11, 2, 12, 2));
  EXPECT_EQ(full, 8);
  auto cut_pair = model::EncodeTextPair(tok, "bb", "a b c d", 6);
  ASSERT_TRUE(cut_pair.ok()) << cut_pair.status();
  EXPECT_THAT(*cut_pair, ElementsAre(1, 12, 2, 11, 11, 2));
  // ... then both alternately, ties trimming the pair.
  auto both = model::EncodeTextPair(tok, "a bb", "ccc dddd", 5);
  ASSERT_TRUE(both.ok()) << both.status();
  EXPECT_THAT(*both, ElementsAre(1, 11, 2, 13, 2));
  // Errors say which text.
  EXPECT_THAT(model::EncodeTextPair(tok, "a", " ", 64).status().message(), HasSubstr("the text pair has no tokens"));
  EXPECT_THAT(model::EncodeTextPair(tok, " ", "a", 64).status().message(), HasSubstr("the text has no tokens"));
  EXPECT_THAT(model::EncodeTextPair(tok, "a", "b\xff", 64).status().message(),
              HasSubstr("the text pair: text is not valid UTF-8"));
  auto no_room = model::EncodeTextPair(tok, "a", "b", 4);
  EXPECT_EQ(no_room.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(no_room.status().message(), HasSubstr("no room for a text pair"));
}

TEST_F(InferenceEngineTest, EncodesTextPairsWithTheSharedPairRuleRowByRow) {
  auto engine = MakeEngine();
  EmbedRequest request;
  request.texts = {"a bb", "ccc", "d"};
  request.text_pairs = {"eeeee", "", "ff"};  // "" = no pair for that text
  request.return_token_ids = true;
  auto r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->results.size(), 3u);
  EXPECT_EQ(r->results[0].token_ids, *model::EncodeTextPair(FakeTokenizer(), "a bb", "eeeee", 8));
  EXPECT_THAT(r->results[0].token_ids, ElementsAre(1, 11, 12, 2, 15, 2));
  EXPECT_THAT(r->results[1].token_ids, ElementsAre(1, 13, 2));
  EXPECT_THAT(r->results[2].token_ids, ElementsAre(1, 11, 2, 12, 2));
  EXPECT_EQ(r->results[0].num_tokens, 6);
  EXPECT_THAT(r->results[0].embedding, ElementsAre(1 + 11 + 12 + 2 + 15 + 2, 6));
  for (const EmbedResult& result : r->results) EXPECT_FALSE(result.truncated);
  EXPECT_EQ(r->total_tokens, 6 + 3 + 5);
}

TEST_F(InferenceEngineTest, TruncatesOverLongPairsLongerTextFirstOrRejectsThemWhenTruncationIsOff) {
  auto engine = MakeEngine();
  EmbedRequest request;
  request.texts = {"a b c d e f", "a"};
  request.text_pairs = {"bb", "cc"};
  request.return_token_ids = true;
  auto r = engine->Embed(request, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->results[0].truncated);
  EXPECT_THAT(r->results[0].token_ids, ElementsAre(1, 11, 11, 11, 11, 2, 12, 2));  // 8 = the model's maximum
  EXPECT_EQ(r->results[0].num_tokens, 8);
  EXPECT_FALSE(r->results[1].truncated);

  request.truncation = Truncation::kError;
  auto refused = engine->Embed(request, {});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("texts[0] with text_pairs[0] is 10 tokens"));
  EXPECT_THAT(refused.status().message(), HasSubstr("at most 8"));
}

TEST_F(InferenceEngineTest, RejectsTextPairsThatAreNotOnePerTextOrComeWithTokenIds) {
  auto engine = MakeEngine();
  struct Case {
    EmbedRequest request;
    std::string message;
  };
  std::vector<Case> cases;
  {
    EmbedRequest r;
    r.texts = {"a", "b"};
    r.text_pairs = {"c", "d", "e"};
    cases.push_back({r, "text_pairs has 3 entries but texts has 2: give one per text, or none"});
  }
  {
    EmbedRequest r;
    r.token_ids = {{1, 11, 2}};
    r.text_pairs = {"c"};
    cases.push_back({r, "not with `token_ids`"});
  }
  {
    EmbedRequest r;
    r.text_pairs = {"c"};
    cases.push_back({r, "text_pairs has 1 entries but texts has 0"});
  }
  {
    EmbedRequest r;
    r.texts = {"a", "b"};
    r.text_pairs = {"c", std::string((1 << 20) + 1, 'a')};
    cases.push_back({r, "text_pairs[1] is 1048577 bytes"});
  }
  {
    EmbedRequest r;
    r.texts = {"a", "b"};
    r.text_pairs = {"c", "   "};
    cases.push_back({r, "texts[1] with text_pairs[1]: the text pair has no tokens"});
  }
  {
    EmbedRequest r;
    r.texts = {"a"};
    r.text_pairs = {"c \xff"};
    cases.push_back({r, "texts[0] with text_pairs[0]: the text pair: text is not valid UTF-8"});
  }
  for (const Case& c : cases) {
    auto r = engine->Embed(c.request, {});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace inference
}  // namespace deltaserve
