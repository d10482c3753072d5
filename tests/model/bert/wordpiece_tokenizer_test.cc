#include "server/model/bert/wordpiece_tokenizer.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/model/bert/unicode_text.h"

namespace deltaserve {
namespace model {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

std::vector<std::string> SmallVocab() {
  return {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "!", ",", ".", "un", "##aff", "##able",
          "the", "a", "##b", "中", "国", "cafe", "'", "s", "naive", "i", "##s", "x", "##x", "日"};
}

std::unique_ptr<WordPieceTokenizer> SmallTokenizer(WordPieceOptions options = {}) {
  auto t = WordPieceTokenizer::Create(SmallVocab(), options);
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(t).value();
}

std::vector<std::string> Pieces(const WordPieceTokenizer& t, absl::string_view text) {
  auto ids = t.Tokenize(text);
  EXPECT_TRUE(ids.ok()) << ids.status();
  std::vector<std::string> out;
  if (!ids.ok()) return out;
  for (int64_t id : *ids) out.push_back(t.IdToPiece(id));
  return out;
}

std::string TempDir() {
  char tmpl[] = "/tmp/wordpiece_test_XXXXXX";
  const char* dir = ::mkdtemp(tmpl);
  EXPECT_NE(dir, nullptr);
  return dir == nullptr ? std::string("/tmp") : std::string(dir);
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

TEST(WordPieceTokenizerTest, LowercasesAndSplitsPunctuation) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, "Hello, WORLD!"), ElementsAre("hello", ",", "world", "!"));
  EXPECT_THAT(Pieces(*t, "hello.world"), ElementsAre("hello", ".", "world"));
}

TEST(WordPieceTokenizerTest, StripsAccentsWhenUncased) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, "H\xC3\xA9llo"), ElementsAre("hello"));                 // precomposed é
  EXPECT_THAT(Pieces(*t, "He\xCC\x81llo"), ElementsAre("hello"));                // e + combining acute
  EXPECT_THAT(Pieces(*t, "CAF\xC3\x89 na\xC3\xAFve"), ElementsAre("cafe", "naive"));
  // U+0130 (capital I with dot above) -> "i".
  EXPECT_THAT(Pieces(*t, "\xC4\xB0"), ElementsAre("i"));
}

TEST(WordPieceTokenizerTest, CasedKeepsCaseAndAccents) {
  WordPieceOptions options;
  options.lowercase = false;
  auto t = SmallTokenizer(options);
  EXPECT_THAT(Pieces(*t, "Hello hello"), ElementsAre("[UNK]", "hello"));
  EXPECT_THAT(Pieces(*t, "h\xC3\xA9llo"), ElementsAre("[UNK]"));
  // Lowercase without accent stripping.
  options.lowercase = true;
  options.strip_accents = false;
  auto u = SmallTokenizer(options);
  EXPECT_THAT(Pieces(*u, "H\xC3\xA9llo HELLO"), ElementsAre("[UNK]", "hello"));
  // Accent stripping without lowercasing.
  options.lowercase = false;
  options.strip_accents = true;
  auto v = SmallTokenizer(options);
  EXPECT_THAT(Pieces(*v, "h\xC3\xA9llo"), ElementsAre("hello"));
}

TEST(WordPieceTokenizerTest, SplitsCjkCharactersIntoSingleTokens) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, "hello\xE4\xB8\xAD\xE5\x9B\xBDworld"), ElementsAre("hello", "中", "国", "world"));
  // A CJK compatibility ideograph (U+F900, which decomposes to U+8C48, not in this vocab) is a word of its own.
  EXPECT_THAT(Pieces(*t, "x\xEF\xA4\x80x"), ElementsAre("x", "[UNK]", "x"));
}

TEST(WordPieceTokenizerTest, UsesContinuationPieces) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, "unaffable"), ElementsAre("un", "##aff", "##able"));
  EXPECT_THAT(Pieces(*t, "ab"), ElementsAre("a", "##b"));
  EXPECT_THAT(Pieces(*t, "xxx"), ElementsAre("x", "##x", "##x"));
}

TEST(WordPieceTokenizerTest, UnknownWordBecomesUnk) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, "hello zebra world"), ElementsAre("hello", "[UNK]", "world"));
  // A word that starts well but cannot be finished is one [UNK], not a partial match.
  EXPECT_THAT(Pieces(*t, "unaffablez"), ElementsAre("[UNK]"));
}

TEST(WordPieceTokenizerTest, WhitespaceOnlyAndEmptyGiveNoTokens) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, ""), IsEmpty());
  EXPECT_THAT(Pieces(*t, " \t\n\r  \xE3\x80\x80 \xC2\xA0"), IsEmpty());  // includes U+3000 and U+00A0
}

TEST(WordPieceTokenizerTest, CleansControlCharacters) {
  auto t = SmallTokenizer();
  // NUL, U+FFFD, a C0 control, a zero-width joiner (Cf) are removed; they do not split words.
  EXPECT_THAT(Pieces(*t, std::string("hel\0lo", 6)), ElementsAre("hello"));
  EXPECT_THAT(Pieces(*t, "hel\xEF\xBF\xBDlo w\x01orld"), ElementsAre("hello", "world"));
  EXPECT_THAT(Pieces(*t, "hel\xE2\x80\x8Dlo"), ElementsAre("hello"));
  // Other whitespace (U+2028 line separator) splits.
  EXPECT_THAT(Pieces(*t, "hello\xE2\x80\xA8world"), ElementsAre("hello", "world"));
}

TEST(WordPieceTokenizerTest, LongWordBecomesUnk) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, std::string(100, 'x')).size(), 100u);
  EXPECT_THAT(Pieces(*t, std::string(101, 'x')), ElementsAre("[UNK]"));
  EXPECT_THAT(Pieces(*t, "hello " + std::string(101, 'x') + " world"), ElementsAre("hello", "[UNK]", "world"));
}

TEST(WordPieceTokenizerTest, InvalidUtf8IsInvalidArgument) {
  auto t = SmallTokenizer();
  for (const std::string& bad : {std::string("hello \xFF"), std::string("\xC3"), std::string("\xC0\xAF"),
                                 std::string("\xED\xA0\x80"), std::string("\xF4\x90\x80\x80"),
                                 std::string("\x80"), std::string("a\xE4\xB8")}) {
    auto ids = t->Tokenize(bad);
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument) << absl::CEscape(bad);
    EXPECT_EQ(t->Encode(bad).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(WordPieceTokenizerTest, SpecialTokensInTextAreNotRecognised) {
  auto t = SmallTokenizer();
  EXPECT_THAT(Pieces(*t, "[CLS]"), ElementsAre("[UNK]", "[UNK]", "[UNK]"));
}

TEST(WordPieceTokenizerTest, EncodeAddsClsAndSep) {
  auto t = SmallTokenizer();
  auto ids = t->Encode("hello world");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(2, 5, 6, 3));
  auto empty = t->Encode("");
  ASSERT_TRUE(empty.ok());
  EXPECT_THAT(*empty, ElementsAre(2, 3));
  EXPECT_EQ(t->NumSpecialTokens(), 2);
  EXPECT_EQ(t->vocab_size(), static_cast<int64_t>(SmallVocab().size()));
  EXPECT_EQ(t->pad_id(), 0);
  EXPECT_EQ(t->IdToPiece(-1), "");
  EXPECT_EQ(t->IdToPiece(1000), "");
}

TEST(WordPieceTokenizerTest, TruncateKeepsClsAndSep) {
  auto t = SmallTokenizer();
  std::vector<int64_t> ids = {2, 5, 6, 7, 5, 3};
  EXPECT_THAT(t->Truncate(ids, 4), ElementsAre(2, 5, 6, 3));
  EXPECT_THAT(t->Truncate(ids, 2), ElementsAre(2, 3));
  EXPECT_THAT(t->Truncate(ids, 6), ElementsAre(2, 5, 6, 7, 5, 3));
  EXPECT_THAT(t->Truncate(ids, 100), ElementsAre(2, 5, 6, 7, 5, 3));
}

TEST(WordPieceTokenizerTest, CreateRejectsVocabularyWithoutSpecials) {
  auto t = WordPieceTokenizer::Create({"hello", "[CLS]", "[SEP]"}, WordPieceOptions());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("[UNK]"));
  EXPECT_EQ(WordPieceTokenizer::Create({}, WordPieceOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(WordPieceTokenizerTest, FromDirectoryReadsVocabAndTokenizerConfig) {
  const std::string dir = TempDir();
  std::string vocab;
  for (const std::string& piece : SmallVocab()) vocab += piece + "\r\n";  // CRLF is tolerated
  WriteFile(dir + "/vocab.txt", vocab);
  auto t = WordPieceTokenizer::FromDirectory(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(Pieces(**t, "HELLO"), ElementsAre("hello"));
  EXPECT_EQ((*t)->vocab_size(), static_cast<int64_t>(SmallVocab().size()));

  WriteFile(dir + "/tokenizer_config.json", R"({"do_lower_case": false, "unk_token": {"content": "[MASK]"}})");
  auto cased = WordPieceTokenizer::FromDirectory(dir);
  ASSERT_TRUE(cased.ok()) << cased.status();
  EXPECT_THAT(Pieces(**cased, "HELLO hello"), ElementsAre("[MASK]", "hello"));

  WriteFile(dir + "/tokenizer_config.json", R"({"do_lower_case": "yes"})");
  auto bad = WordPieceTokenizer::FromDirectory(dir);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("tokenizer_config.json"));
}

TEST(WordPieceTokenizerTest, FromDirectoryWithoutVocabIsNotFound) {
  const std::string dir = TempDir();
  auto t = WordPieceTokenizer::FromDirectory(dir);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("vocab.txt"));
}

TEST(WordPieceTokenizerTest, FromTokenizerJsonReadsWordPieceModel) {
  const std::string dir = TempDir();
  std::string vocab = "{";
  const auto pieces = SmallVocab();
  for (size_t i = 0; i < pieces.size(); ++i) {
    absl::StrAppend(&vocab, i ? "," : "", "\"", pieces[i], "\":", i);
  }
  vocab += "}";
  WriteFile(dir + "/tokenizer.json",
            absl::StrCat(R"({"version": "1.0", "normalizer": {"type": "BertNormalizer", "clean_text": true,
                "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
              "pre_tokenizer": {"type": "BertPreTokenizer"},
              "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}]},
              "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                        "max_input_chars_per_word": 100, "vocab": )",
                         vocab, "}}"));
  auto t = WordPieceTokenizer::FromDirectory(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(Pieces(**t, "H\xC3\xA9llo, unaffable"), ElementsAre("hello", ",", "un", "##aff", "##able"));
  auto ids = (*t)->Encode("hello");
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(2, 5, 3));

  WriteFile(dir + "/tokenizer.json", R"({"model": {"type": "BPE", "vocab": {}}})");
  EXPECT_EQ(WordPieceTokenizer::FromDirectory(dir).status().code(), absl::StatusCode::kUnimplemented);
}

TEST(UnicodeTextTest, DecodesAndEncodesUtf8) {
  std::u32string cps;
  ASSERT_TRUE(unicode::DecodeUtf8("a\xC3\xA9\xE4\xB8\xAD\xF0\x9F\xA6\x99", &cps).ok());
  EXPECT_EQ(cps, (std::u32string{U'a', 0xE9, 0x4E2D, 0x1F999}));
  std::string back;
  for (char32_t c : cps) unicode::AppendUtf8(c, &back);
  EXPECT_EQ(back, "a\xC3\xA9\xE4\xB8\xAD\xF0\x9F\xA6\x99");
}

TEST(UnicodeTextTest, ClassifiesCharacters) {
  using unicode::CharClass;
  EXPECT_EQ(unicode::ClassOf(U'a'), CharClass::kOther);
  EXPECT_EQ(unicode::ClassOf(U'$'), CharClass::kPunctuation);   // ASCII symbol counts as punctuation
  EXPECT_EQ(unicode::ClassOf(0x00BF), CharClass::kPunctuation); // ¿
  EXPECT_EQ(unicode::ClassOf(0x3001), CharClass::kPunctuation); // 、
  EXPECT_EQ(unicode::ClassOf(0x0301), CharClass::kMark);
  EXPECT_EQ(unicode::ClassOf(0x200D), CharClass::kControl);     // ZWJ (Cf)
  EXPECT_EQ(unicode::ClassOf(0x3000), CharClass::kWhitespace);
  EXPECT_EQ(unicode::ClassOf(0x4E2D), CharClass::kCjk);
  EXPECT_EQ(unicode::ClassOf(0x1F999), CharClass::kOther);
}

TEST(UnicodeTextTest, LowercasesAndStrips) {
  std::u32string out;
  unicode::AppendLower(0x0391, &out);  // Greek capital alpha
  unicode::AppendLower(0x0416, &out);  // Cyrillic Zhe
  unicode::AppendLower(0x00C4, &out);  // Ä
  EXPECT_EQ(out, (std::u32string{0x03B1, 0x0436, 0x00E4}));
  out.clear();
  unicode::AppendStripped(0x00C4, &out);  // Ä -> A
  unicode::AppendStripped(0x0301, &out);  // combining acute -> nothing
  unicode::AppendStripped(0x1EC7, &out);  // ệ -> e
  unicode::AppendStripped(0xD55C, &out);  // 한 -> jamo
  EXPECT_EQ(out, (std::u32string{U'A', U'e', 0x1112, 0x1161, 0x11AB}));
}

// HF BertTokenizerFast("bert-base-uncased"-style vocab) on llama.cpp's 46 tokenizer test strings
// (shared/data/tokenizer-cases/bert-bge, see FORMAT.md there).
TEST(WordPieceTokenizerTest, ReproducesBertBgeReferenceCases) {
  const char* source_dir = std::getenv("DS_SOURCE_DIR");
  const std::string root = std::string(source_dir != nullptr ? source_dir : DS_SOURCE_DIR) + "/../shared/data";
  const std::string inp_path = root + "/tokenizer-cases/bert-bge/ggml-vocab-bert-bge.gguf.inp";
  const std::string out_path = root + "/tokenizer-cases/bert-bge/ggml-vocab-bert-bge.gguf.out";
  const std::string vocab_path = root + "/tokenizers/bert-base-uncased/vocab.txt";
  std::ifstream inp_file(inp_path, std::ios::binary), out_file(out_path, std::ios::binary);
  if (!inp_file || !out_file || ::access(vocab_path.c_str(), R_OK) != 0) {
    GTEST_SKIP() << "shared tokenizer test data not found under " << root;
  }
  std::stringstream inp_buf, out_buf;
  inp_buf << inp_file.rdbuf();
  out_buf << out_file.rdbuf();
  std::vector<std::string> inputs = absl::StrSplit(inp_buf.str(), "\n__ggml_vocab_test__\n");
  std::vector<std::string> outputs = absl::StrSplit(out_buf.str(), '\n');
  ASSERT_FALSE(inputs.empty());
  ASSERT_FALSE(outputs.empty());
  inputs.pop_back();
  outputs.pop_back();
  ASSERT_EQ(inputs.size(), 46u);
  ASSERT_EQ(outputs.size(), 46u);

  auto t = WordPieceTokenizer::FromVocabFile(vocab_path, WordPieceOptions());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 30522);
  int passed = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::vector<int64_t> want;
    for (absl::string_view s : absl::StrSplit(outputs[i], ' ', absl::SkipEmpty())) {
      want.push_back(std::stoll(std::string(s)));
    }
    auto got = (*t)->Tokenize(inputs[i]);
    ASSERT_TRUE(got.ok()) << got.status();
    if (*got == want) {
      ++passed;
    } else {
      ADD_FAILURE() << "case " << i << " \"" << absl::CEscape(inputs[i]) << "\": got "
                    << ::testing::PrintToString(*got) << ", want " << ::testing::PrintToString(want);
    }
  }
  EXPECT_EQ(passed, 46);
}

}  // namespace
}  // namespace model
}  // namespace deltaserve
