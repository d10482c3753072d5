// WordPieceTokenizer: the Hugging Face BERT tokenizer (BertTokenizer / BertTokenizerFast) in C++, without ICU.
//
// Tokenize(text) runs, in this order (the order of the `tokenizers` BertNormalizer + BertPreTokenizer + WordPiece
// that a BERT tokenizer.json describes, which is what HF's AutoTokenizer uses):
//   1. clean_text: drop NUL, U+FFFD and control characters (Cc, Cf, Co except \t \n \r); every whitespace
//      character (\t \n \r, Zs, Zl, Zp) becomes a space;
//   2. tokenize_chinese_chars: put spaces around every CJK ideograph, so each becomes its own word;
//   3. strip_accents: canonical decomposition (NFD) with the non-spacing marks (Mn) dropped ("Héllo" -> "Hello");
//   4. lowercase: per-character Unicode lowercase;
//   5. split on whitespace, and split every punctuation character (ASCII punctuation and Unicode P*) into its own
//      word;
//   6. WordPiece per word: greedy longest-match-first against the vocabulary, continuation pieces prefixed with
//      "##"; a word with no full segmentation, or longer than max_input_chars_per_word (100) code points, becomes
//      the single unknown token.
// Special tokens written in the text ("[CLS]") are NOT recognised: they are tokenized as ordinary text (llama.cpp's
// parse_special=false), so user text can never inject control tokens.
//
// Encode adds [CLS] ... [SEP]; Truncate keeps [CLS], the first tokens and the trailing [SEP].
//
// Loading from a model directory (FromDirectory):
//   - vocab.txt (one token per line, id = line number) with options from tokenizer_config.json when present
//     (do_lower_case, strip_accents, tokenize_chinese_chars, unk/cls/sep/pad_token), else config.json's
//     do_lower_case when present, else the uncased defaults;
//   - otherwise tokenizer.json whose model is WordPiece (vocab, unk_token, continuing_subword_prefix,
//     max_input_chars_per_word; BertNormalizer options; the [CLS]/[SEP] of its post_processor).
// Unicode data: Unicode 14.0.0 (see unicode_text.h). Immutable after construction: thread-safe.
#ifndef DELTASERVE_SERVER_MODEL_BERT_WORDPIECE_TOKENIZER_H_
#define DELTASERVE_SERVER_MODEL_BERT_WORDPIECE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/model/tokenizer.h"

namespace deltaserve {
namespace model {

struct WordPieceOptions {
  bool clean_text = true;
  bool tokenize_chinese_chars = true;
  bool lowercase = true;
  // Unset: strip accents exactly when lowercasing (HF's strip_accents=None).
  std::optional<bool> strip_accents;
  std::string unk_token = "[UNK]";
  std::string cls_token = "[CLS]";
  std::string sep_token = "[SEP]";
  std::string pad_token = "[PAD]";  // optional in the vocabulary
  std::string continuing_subword_prefix = "##";
  int64_t max_input_chars_per_word = 100;
};

class WordPieceTokenizer : public Tokenizer {
 public:
  // `vocab[i]` is the token with id i. INVALID_ARGUMENT when the vocabulary is empty or lacks the unknown, [CLS] or
  // [SEP] token. A token listed twice maps to its last id (as in HF).
  static absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> Create(std::vector<std::string> vocab,
                                                                    const WordPieceOptions& options);
  // A vocab.txt file. NOT_FOUND when missing; errors name the file.
  static absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> FromVocabFile(const std::string& path,
                                                                           const WordPieceOptions& options);
  // A HF tokenizer.json whose model is WordPiece (options come from the file). UNIMPLEMENTED for other models.
  static absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> FromTokenizerJson(const std::string& path);
  // A model directory, as described above. NOT_FOUND names vocab.txt when neither file is present.
  static absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> FromDirectory(const std::string& dir);

  // Tokenizer.
  absl::StatusOr<std::vector<int64_t>> Tokenize(absl::string_view text) const override;
  absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text) const override;
  std::vector<int64_t> Truncate(const std::vector<int64_t>& ids, int64_t max_tokens) const override;
  int64_t NumSpecialTokens() const override { return 2; }
  std::string IdToPiece(int64_t id) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_piece_.size()); }

  // Steps 1-5 only: the words WordPiece sees (UTF-8). INVALID_ARGUMENT for invalid UTF-8.
  absl::StatusOr<std::vector<std::string>> BasicTokenize(absl::string_view text) const;
  // The id of a token, or -1.
  int64_t TokenToId(absl::string_view token) const;

  const WordPieceOptions& options() const { return options_; }
  int64_t unk_id() const { return unk_id_; }
  int64_t cls_id() const { return cls_id_; }
  int64_t sep_id() const { return sep_id_; }
  int64_t pad_id() const { return pad_id_; }  // -1 when the vocabulary has no pad token

 private:
  WordPieceTokenizer() = default;
  // Normalizes `text` (steps 1-4) into code points.
  absl::Status Normalize(absl::string_view text, std::u32string* out) const;
  // Appends the ids of one word (step 6).
  void WordPiece(const std::u32string& word, std::vector<int64_t>* ids) const;

  WordPieceOptions options_;
  bool strip_accents_ = true;
  std::vector<std::string> id_to_piece_;
  absl::flat_hash_map<std::string, int64_t> piece_to_id_;
  int64_t unk_id_ = -1;
  int64_t cls_id_ = -1;
  int64_t sep_id_ = -1;
  int64_t pad_id_ = -1;
};

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_BERT_WORDPIECE_TOKENIZER_H_
