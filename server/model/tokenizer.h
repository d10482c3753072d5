// Tokenizer: turns text into the token ids a model consumes. One implementation per model family
// (SentencePiece-style unigram pieces for use-lite, WordPiece for bert).
//
// Implementations are immutable after construction: thread-safe.
#ifndef DELTASERVE_SERVER_MODEL_TOKENIZER_H_
#define DELTASERVE_SERVER_MODEL_TOKENIZER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace deltaserve {
namespace model {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Ids of `text` without any special tokens (what HF calls add_special_tokens=False). INVALID_ARGUMENT when
  // `text` is not valid UTF-8.
  virtual absl::StatusOr<std::vector<int64_t>> Tokenize(absl::string_view text) const = 0;

  // The full model input for `text`: Tokenize() plus the family's special tokens (e.g. [CLS] ... [SEP]).
  virtual absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text) const = 0;

  // Shortens a full model input (as returned by Encode) to at most `max_tokens`, keeping the family's special
  // tokens in place (e.g. the trailing [SEP]). REQUIRES: max_tokens >= NumSpecialTokens().
  virtual std::vector<int64_t> Truncate(const std::vector<int64_t>& ids, int64_t max_tokens) const = 0;

  // How many special tokens Encode adds to every input (0 for use-lite, 2 for BERT).
  virtual int64_t NumSpecialTokens() const = 0;

  // The piece string of an id (for debugging and tests); "" when out of range.
  virtual std::string IdToPiece(int64_t id) const = 0;

  // Size of the id space: valid ids are [0, vocab_size()).
  virtual int64_t vocab_size() const = 0;
};

// The model input for `text` and an optional second text `pair` (pair tasks: entailment, paraphrase, ...): the one
// encoding rule fine-tuning (tuning::EncodeExample) and serving (inference::InferenceEngine, `text_pairs`) share.
//   - `pair` empty: Encode(text), cut to `max_tokens` by Truncate (the text loses its tail).
//   - otherwise: Encode(text), then the pair's tokens and the family's trailing special tokens (BERT:
//     [CLS] a [SEP] b [SEP]; use-lite: a's pieces then b's). Over `max_tokens`, the longer of the two texts loses
//     its last token, one token at a time, ties trimming the pair (Hugging Face's truncation="longest_first").
// When `untruncated_tokens` is non-null it is set to the input's length before truncation (so a caller can tell
// that the input was cut, or refuse it).
// INVALID_ARGUMENT: `text` (or a non-empty `pair`) is not valid UTF-8 or has no tokens (only whitespace / control
// characters); `max_tokens` leaves no room for a token of each text after the special tokens.
absl::StatusOr<std::vector<int64_t>> EncodeTextPair(const Tokenizer& tokenizer, absl::string_view text,
                                                    absl::string_view pair, int64_t max_tokens,
                                                    int64_t* untruncated_tokens = nullptr);

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_TOKENIZER_H_
