#include "server/model/use_lite/use_lite_tokenizer.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/model/use_lite/test_paths.h"

namespace deltaserve {
namespace model {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

class UseLiteTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tok = UseLiteTokenizer::FromFile(testing::TestDataDir() + "/vocab.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = tok->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  static UseLiteTokenizer* tokenizer_;
};
UseLiteTokenizer* UseLiteTokenizerTest::tokenizer_ = nullptr;

void ExpectIdsMatchReference(const Tokenizer& tokenizer, const std::string& file) {
  const nlohmann::json ref = nlohmann::json::parse(testing::ReadFileOrDie(testing::TestDataDir() + "/" + file));
  ASSERT_EQ(ref["sentences"].size(), ref["token_ids"].size());
  for (size_t i = 0; i < ref["sentences"].size(); ++i) {
    const std::string text = ref["sentences"][i].get<std::string>();
    const std::vector<int64_t> expected = ref["token_ids"][i].get<std::vector<int64_t>>();
    auto ids = tokenizer.Tokenize(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, expected) << file << " sentence " << i << ": \"" << text << "\"";
    auto encoded = tokenizer.Encode(text);
    ASSERT_TRUE(encoded.ok());
    EXPECT_EQ(*encoded, expected);
  }
}

TEST_F(UseLiteTokenizerTest, IdsEqualUpstreamForReferenceSentences) {
  ExpectIdsMatchReference(*tokenizer_, "reference_embeddings.json");
}

TEST_F(UseLiteTokenizerTest, IdsEqualUpstreamForEdgeCases) {
  // Empty text, separators only, tabs/newlines, NFKC-sensitive text, unknown scripts and emoji, long inputs.
  ExpectIdsMatchReference(*tokenizer_, "extra_reference.json");
}

TEST_F(UseLiteTokenizerTest, VocabularyHasEightThousandPiecesWithUnknownFirst) {
  EXPECT_EQ(tokenizer_->vocab_size(), 8000);
  EXPECT_EQ(tokenizer_->IdToPiece(0), "\xEF\xBF\xBD");  // U+FFFD
  EXPECT_EQ(tokenizer_->IdToPiece(9), "\xE2\x96\x81the");
  EXPECT_EQ(tokenizer_->IdToPiece(-1), "");
  EXPECT_EQ(tokenizer_->IdToPiece(8000), "");
  EXPECT_EQ(tokenizer_->NumSpecialTokens(), 0);
}

TEST_F(UseLiteTokenizerTest, EmptyTextHasNoTokens) {
  auto ids = tokenizer_->Tokenize("");
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, IsEmpty());
}

TEST_F(UseLiteTokenizerTest, InvalidUtf8IsInvalidArgument) {
  for (const std::string bad : {std::string("abc\xff"), std::string("\xc3"), std::string("\xc0\xaf"),  // overlong
                                std::string("\xed\xa0\x80"),                                           // surrogate
                                std::string("\xf4\x90\x80\x80"), std::string("a\x80z")}) {
    auto ids = tokenizer_->Tokenize(bad);
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(ids.status().message()), HasSubstr("UTF-8"));
  }
}

TEST_F(UseLiteTokenizerTest, TruncateKeepsFirstIds) {
  const std::vector<int64_t> ids = {5, 6, 7, 8};
  EXPECT_THAT(tokenizer_->Truncate(ids, 2), ElementsAre(5, 6));
  EXPECT_THAT(tokenizer_->Truncate(ids, 4), ElementsAre(5, 6, 7, 8));
  EXPECT_THAT(tokenizer_->Truncate(ids, 10), ElementsAre(5, 6, 7, 8));
  EXPECT_THAT(tokenizer_->Truncate(ids, 0), IsEmpty());
}

TEST_F(UseLiteTokenizerTest, NfkcFoldsFullwidthAndComposesAccents) {
  auto fullwidth = tokenizer_->Tokenize("\xEF\xBC\xA6\xEF\xBD\x95\xEF\xBD\x8C\xEF\xBD\x8C");  // "Ｆｕｌｌ"
  auto ascii = tokenizer_->Tokenize("Full");
  ASSERT_TRUE(fullwidth.ok() && ascii.ok());
  EXPECT_EQ(*fullwidth, *ascii);
  auto decomposed = tokenizer_->Tokenize("cafe\xCC\x81");  // e + COMBINING ACUTE
  auto composed = tokenizer_->Tokenize("caf\xC3\xA9");
  ASSERT_TRUE(decomposed.ok() && composed.ok());
  EXPECT_EQ(*decomposed, *composed);
}

// A tiny vocabulary to pin the algorithm's quirks.
std::unique_ptr<UseLiteTokenizer> TinyTokenizer() {
  const char* vocab = R"([["\ufffd",0],["<s>",0],["</s>",0],["x1",0],["x2",0],["x3",0],
    ["\u2581",-1.0],["a",-2.0],["b",-2.0],["ab",-3.0],["\u2581a",-1.5],["c",-4.0],["bc",-6.0]])";
  auto tok = UseLiteTokenizer::FromJson(vocab);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return std::move(tok).value();
}

TEST(UseLiteTokenizerAlgorithmTest, ViterbiPicksBestScoringSegmentation) {
  auto tok = TinyTokenizer();
  // "▁ab": ▁a + b = -3.5 beats ▁ + ab = -4.0 and ▁ + a + b = -5.
  EXPECT_THAT(*tok->Tokenize("ab"), ElementsAre(10, 8));
}

TEST(UseLiteTokenizerAlgorithmTest, TiesGoToTheLaterStart) {
  auto tok = TinyTokenizer();
  // "▁abc": ▁a + bc = -7.5, ▁a + b + c = -7.5 (tie) -> the edge with the later start (c after b) wins.
  EXPECT_THAT(*tok->Tokenize("abc"), ElementsAre(10, 8, 11));
}

TEST(UseLiteTokenizerAlgorithmTest, UnknownRunsCollapseToOneId) {
  auto tok = TinyTokenizer();
  // Spaces become separators; "zz" are two unknown symbols that collapse into one id 0.
  EXPECT_THAT(*tok->Tokenize("a zz a"), ElementsAre(10, 6, 0, 10));
}

TEST(UseLiteTokenizerAlgorithmTest, ReservedPiecesNeverMatchText) {
  auto tok = TinyTokenizer();
  EXPECT_THAT(*tok->Tokenize("x1"), ElementsAre(6, 0));
}

TEST(UseLiteTokenizerAlgorithmTest, MalformedVocabularyIsInvalidArgument) {
  EXPECT_EQ(UseLiteTokenizer::FromJson("{}").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UseLiteTokenizer::FromJson("[1,2,3,4,5,6]").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UseLiteTokenizer::FromJson(R"([["a",0]])").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UseLiteTokenizer::FromJson("not json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UseLiteTokenizer::FromFile("/nonexistent/vocab.json").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace model
}  // namespace deltaserve
