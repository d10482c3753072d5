#include "server/model/tokenizer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace model {

absl::StatusOr<std::vector<int64_t>> EncodeTextPair(const Tokenizer& tokenizer, absl::string_view text,
                                                    absl::string_view pair, int64_t max_tokens,
                                                    int64_t* untruncated_tokens) {
  const int64_t specials = tokenizer.NumSpecialTokens();
  // Encode() = `lead` specials, the text's tokens, the rest of the specials (BERT: [CLS] text [SEP]).
  const int64_t lead = specials > 0 ? 1 : 0;
  DS_ASSIGN_OR_RETURN(std::vector<int64_t> a, tokenizer.Encode(text));
  if (static_cast<int64_t>(a.size()) <= specials) {
    return absl::InvalidArgumentError("the text has no tokens (empty or only whitespace / control characters)");
  }
  if (pair.empty()) {
    if (untruncated_tokens != nullptr) *untruncated_tokens = static_cast<int64_t>(a.size());
    if (max_tokens <= specials) {
      return absl::InvalidArgumentError(
          absl::StrCat("a limit of ", max_tokens, " tokens leaves no room after the ", specials, " special tokens"));
    }
    if (static_cast<int64_t>(a.size()) > max_tokens) return tokenizer.Truncate(a, max_tokens);
    return a;
  }
  absl::StatusOr<std::vector<int64_t>> encoded_pair = tokenizer.Encode(pair);
  if (!encoded_pair.ok()) {
    return absl::Status(encoded_pair.status().code(),
                        absl::StrCat("the text pair: ", encoded_pair.status().message()));
  }
  std::vector<int64_t> b = *std::move(encoded_pair);
  if (static_cast<int64_t>(b.size()) <= specials) {
    return absl::InvalidArgumentError("the text pair has no tokens (empty or only whitespace / control characters)");
  }
  const int64_t trail = specials - lead;
  const int64_t pair_specials = specials + trail;  // [CLS] a [SEP] b [SEP]
  const std::vector<int64_t> a_body(a.begin() + lead, a.end() - trail);
  const std::vector<int64_t> b_body(b.begin() + lead, b.end() - trail);
  int64_t la = static_cast<int64_t>(a_body.size()), lb = static_cast<int64_t>(b_body.size());
  if (untruncated_tokens != nullptr) *untruncated_tokens = pair_specials + la + lb;
  if (max_tokens < pair_specials + 2) {
    return absl::InvalidArgumentError(absl::StrCat("a limit of ", max_tokens,
                                                   " tokens leaves no room for a text pair after its ",
                                                   pair_specials, " special tokens"));
  }
  const int64_t budget = max_tokens - pair_specials;
  // Trim the longer text first, one token at a time (ties trim the pair), as Hugging Face's longest_first does.
  while (la + lb > budget) {
    if (la > lb) {
      --la;
    } else {
      --lb;
    }
  }
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(pair_specials + la + lb));
  out.insert(out.end(), a.begin(), a.begin() + lead);
  out.insert(out.end(), a_body.begin(), a_body.begin() + la);
  out.insert(out.end(), a.end() - trail, a.end());
  out.insert(out.end(), b_body.begin(), b_body.begin() + lb);
  out.insert(out.end(), b.end() - trail, b.end());
  return out;
}

}  // namespace model
}  // namespace deltaserve
