// UseLiteTokenizer: the SentencePiece-style unigram tokenizer of USE-lite, reimplemented to give exactly the ids of
// the upstream TF.js runtime (@energetic-ai/embeddings@0.2.0, itself derived from
// @tensorflow-models/universal-sentence-encoder).
//
// The vocabulary is `vocab.json`: a JSON array of [piece, score] pairs; a piece's id is its index. The algorithm,
// including the upstream quirks that decide ids:
//   1. The text is NFKC-normalised (ICU). A non-empty result gets U+2581 ("▁") prepended and every U+0020 space
//      replaced by U+2581 (no whitespace collapsing; tabs and newlines stay as they are).
//   2. Symbols are Unicode code points. Every piece with id >= kReservedPieces (6) is a candidate; at each position
//      all pieces that are a prefix of the rest of the text are lattice edges. A position where no piece starts
//      gets a single one-symbol edge with id 0 (the unknown piece) and score 0.
//   3. Viterbi over the edges ordered by (end, start): an edge replaces the best path to its end when that end has
//      best score exactly 0 (upstream's "unset") or when its total score is >= the current best (later wins ties).
//   4. Back-tracking steps back by the UTF-16 length of the chosen piece's string (as upstream does).
//   5. Consecutive unknown ids (0) collapse into one.
// A null score in vocab.json (upstream has a few, on pieces with ':') counts as 0, as JavaScript's null + x does.
// No special tokens are added (Encode == Tokenize); Truncate keeps the first ids.
//
// Immutable after construction: thread-safe. Depends on Abseil, nlohmann-json and ICU only (no LibTorch).
#ifndef DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_TOKENIZER_H_
#define DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/model/tokenizer.h"

namespace deltaserve {
namespace model {

class UseLiteTokenizer : public Tokenizer {
 public:
  // Ids [0, kReservedPieces) are control pieces ("�" = unknown, <s>, </s>, extra tokens) never matched in text.
  static constexpr int64_t kReservedPieces = 6;
  static constexpr int64_t kUnknownId = 0;

  // Parses the contents of a vocab.json. `source` names the file in error messages. INVALID_ARGUMENT when the
  // JSON is not an array of [string, number-or-null] pairs, has fewer than kReservedPieces entries, or a piece is not UTF-8.
  static absl::StatusOr<std::unique_ptr<UseLiteTokenizer>> FromJson(absl::string_view json,
                                                                     absl::string_view source = "vocab.json");
  // Reads and parses a vocab.json file (NOT_FOUND when it cannot be read).
  static absl::StatusOr<std::unique_ptr<UseLiteTokenizer>> FromFile(const std::string& path);

  absl::StatusOr<std::vector<int64_t>> Tokenize(absl::string_view text) const override;
  absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text) const override { return Tokenize(text); }
  std::vector<int64_t> Truncate(const std::vector<int64_t>& ids, int64_t max_tokens) const override;
  int64_t NumSpecialTokens() const override { return 0; }
  std::string IdToPiece(int64_t id) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }

  // The score of a piece (for tests); 0 when out of range.
  double PieceScore(int64_t id) const;

 private:
  struct TrieNode {
    int32_t id = -1;  // the piece ending here, -1 when none
    double score = 0;
  };

  UseLiteTokenizer() = default;
  int32_t Child(int32_t node, char32_t symbol) const;

  std::vector<std::string> pieces_;     // UTF-8
  std::vector<double> scores_;
  std::vector<int32_t> utf16_lengths_;  // upstream's String.length of each piece
  std::vector<TrieNode> nodes_;         // nodes_[0] is the root
  std::unordered_map<uint64_t, int32_t> children_;  // (node << 21 | code point) -> child node
};

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_TOKENIZER_H_
