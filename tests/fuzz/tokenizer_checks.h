// The checks both tokenizer fuzz targets run on one text (and an optional pair): what every model::Tokenizer
// promises, whatever the bytes (server/model/tokenizer.h). Header-only; used by one fuzz target per binary.
#ifndef DELTASERVE_TESTS_FUZZ_TOKENIZER_CHECKS_H_
#define DELTASERVE_TESTS_FUZZ_TOKENIZER_CHECKS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "server/model/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

namespace deltaserve {
namespace fuzz {

// Tokenize / Encode / Truncate / IdToPiece on `text`, and EncodeTextPair(text, pair, max_tokens). Invariants:
// errors are INVALID_ARGUMENT; ids are in [0, vocab_size()); Encode is Tokenize plus NumSpecialTokens() ids;
// Truncate and EncodeTextPair stay within their limit.
inline void CheckTokenizer(const model::Tokenizer& tokenizer, absl::string_view text, absl::string_view pair,
                           int64_t max_tokens) {
  const int64_t vocab = tokenizer.vocab_size();
  const int64_t specials = tokenizer.NumSpecialTokens();
  auto check_ids = [&](const std::vector<int64_t>& ids) {
    for (int64_t id : ids) {
      FUZZ_CHECK(id >= 0 && id < vocab);
      tokenizer.IdToPiece(id);
    }
  };

  absl::StatusOr<std::vector<int64_t>> tokens = tokenizer.Tokenize(text);
  absl::StatusOr<std::vector<int64_t>> encoded = tokenizer.Encode(text);
  FUZZ_CHECK(tokens.ok() == encoded.ok());
  if (!tokens.ok()) {
    FUZZ_CHECK(tokens.status().code() == absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(encoded.status().code() == absl::StatusCode::kInvalidArgument);
  } else {
    check_ids(*tokens);
    check_ids(*encoded);
    FUZZ_CHECK(encoded->size() == tokens->size() + static_cast<size_t>(specials));
    for (int64_t limit : {specials + 1, specials + 2, static_cast<int64_t>(encoded->size())}) {
      const std::vector<int64_t> cut = tokenizer.Truncate(*encoded, limit);
      FUZZ_CHECK(static_cast<int64_t>(cut.size()) <= std::max<int64_t>(limit, specials));
      FUZZ_CHECK(cut.size() <= encoded->size());
      if (!cut.empty()) FUZZ_CHECK(cut.front() == encoded->front());
      if (specials > 0 && !cut.empty()) FUZZ_CHECK(cut.back() == encoded->back());
    }
  }

  int64_t untruncated = -1;
  absl::StatusOr<std::vector<int64_t>> input = model::EncodeTextPair(tokenizer, text, pair, max_tokens, &untruncated);
  if (!input.ok()) {
    FUZZ_CHECK(input.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  check_ids(*input);
  FUZZ_CHECK(!input->empty());
  FUZZ_CHECK(static_cast<int64_t>(input->size()) <= max_tokens);
  FUZZ_CHECK(untruncated >= static_cast<int64_t>(input->size()));
}

}  // namespace fuzz
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_FUZZ_TOKENIZER_CHECKS_H_
