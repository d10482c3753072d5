// Fuzz target: the WordPiece (BERT-family) tokenizer (server/model/bert/wordpiece_tokenizer.h) on request text,
// which is any bytes a client sends (the gRPC layer does not check UTF-8 for `bytes` / proto2 fields, and a
// dataset's texts reach it too).
//
// Input layout: byte 0 picks the options, byte 1 the token limit of EncodeTextPair (2..257), the rest is the text;
// a 0x1f byte splits it into text and pair.
//   bit 0  lowercase off                 bits 1-2  strip_accents: unset, false, true
//   bit 3  tokenize_chinese_chars off    bit 4     clean_text off
//   bit 5  max_input_chars_per_word 4
// Reaches: UTF-8 decoding, clean-up, CJK splitting, NFD accent stripping, lowercasing, punctuation splitting,
// greedy WordPiece, [CLS] / [SEP], truncation and pair encoding (model::EncodeTextPair). The vocabulary is a small
// built-in one with accented, CJK, punctuation and "##" pieces.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "server/model/bert/wordpiece_tokenizer.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tokenizer_checks.h"

namespace deltaserve {
namespace {

using model::WordPieceOptions;
using model::WordPieceTokenizer;

const std::vector<std::string>& Vocab() {
  static const auto* vocab = new std::vector<std::string>{
      "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "an", "cat", "dog", "sat", "on", "mat", "hello",
      "world", "!", ",", ".", "?", "'", "-", "(", ")", "is", "was", "run", "##s", "##ing", "##ed", "##n", "##e",
      "un", "##able", "##ly", "caf", "##é", "cafe", "naive", "naïve", "über", "uber", "ß", "straße", "i", "##i",
      "x", "##x", "1", "##1", "2", "##0", "中", "国", "日", "本", "語", "한", "국", "ж", "##ж", "мир", "привет",
      "ελληνικά", "עברית", "العربية", "ह", "##िन्दी", "😀", "##😀", "...", "é", "##̃", "ñ", "ǅ", "ﬁ", "Ω", "ω"};
  return *vocab;
}

const WordPieceTokenizer& TokenizerFor(uint8_t flags) {
  static std::unique_ptr<WordPieceTokenizer>* cache = new std::unique_ptr<WordPieceTokenizer>[64];
  std::unique_ptr<WordPieceTokenizer>& slot = cache[flags & 63];
  if (slot == nullptr) {
    WordPieceOptions options;
    options.lowercase = (flags & 1) == 0;
    const int accents = (flags >> 1) & 3;
    if (accents == 1) options.strip_accents = false;
    if (accents >= 2) options.strip_accents = true;
    options.tokenize_chinese_chars = (flags & 8) == 0;
    options.clean_text = (flags & 16) == 0;
    if ((flags & 32) != 0) options.max_input_chars_per_word = 4;
    absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> t = WordPieceTokenizer::Create(Vocab(), options);
    FUZZ_CHECK(t.ok());
    slot = *std::move(t);
  }
  return *slot;
}

void FuzzOne(absl::string_view input) {
  uint8_t flags = 0, limit = 0;
  if (!input.empty()) {
    flags = static_cast<uint8_t>(input[0]);
    input.remove_prefix(1);
  }
  if (!input.empty()) {
    limit = static_cast<uint8_t>(input[0]);
    input.remove_prefix(1);
  }
  const WordPieceTokenizer& tokenizer = TokenizerFor(flags);
  absl::string_view text = input, pair;
  const size_t split = input.find('\x1f');
  if (split != absl::string_view::npos) {
    text = input.substr(0, split);
    pair = input.substr(split + 1);
  }
  fuzz::CheckTokenizer(tokenizer, text, pair, 2 + limit);

  absl::StatusOr<std::vector<std::string>> words = tokenizer.BasicTokenize(text);
  absl::StatusOr<std::vector<int64_t>> ids = tokenizer.Tokenize(text);
  FUZZ_CHECK(words.ok() == ids.ok());
  if (words.ok()) {
    // WordPiece gives every word at least one id (the unknown token when nothing matches).
    FUZZ_CHECK(ids->size() >= words->size());
    for (const std::string& w : *words) FUZZ_CHECK(!w.empty());
  }
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}
