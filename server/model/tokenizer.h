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

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_TOKENIZER_H_
