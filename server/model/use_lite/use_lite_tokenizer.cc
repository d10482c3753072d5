#include "server/model/use_lite/use_lite_tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/utf8.h"
#include "unicode/normalizer2.h"
#include "unicode/unistr.h"
#include "unicode/utypes.h"

namespace deltaserve {
namespace model {
namespace {

constexpr char32_t kSeparator = 0x2581;  // "▁"

// NFKC of valid UTF-8 `text` as code points (what JavaScript's String.prototype.normalize("NFKC") gives).
absl::StatusOr<std::u32string> NormalizeNfkc(absl::string_view text, const std::u32string& decoded) {
  if (std::all_of(decoded.begin(), decoded.end(), [](char32_t c) { return c < 0x80; })) {
    return decoded;  // ASCII is NFKC-normalised already
  }
  UErrorCode error = U_ZERO_ERROR;
  const icu::Normalizer2* nfkc = icu::Normalizer2::getNFKCInstance(error);
  if (U_FAILURE(error) || nfkc == nullptr) {
    return absl::InternalError(absl::StrCat("ICU NFKC normaliser unavailable: ", u_errorName(error)));
  }
  const icu::UnicodeString input =
      icu::UnicodeString::fromUTF8(icu::StringPiece(text.data(), static_cast<int32_t>(text.size())));
  const icu::UnicodeString normalized = nfkc->normalize(input, error);
  if (U_FAILURE(error)) {
    return absl::InternalError(absl::StrCat("ICU NFKC normalisation failed: ", u_errorName(error)));
  }
  std::u32string out;
  out.reserve(normalized.length());
  for (int32_t i = 0; i < normalized.length();) {
    const UChar32 c = normalized.char32At(i);
    out.push_back(static_cast<char32_t>(c));
    i += U16_LENGTH(c);
  }
  return out;
}

uint64_t ChildKey(int32_t node, char32_t symbol) {
  return (static_cast<uint64_t>(node) << 21) | static_cast<uint64_t>(symbol);
}

}  // namespace

absl::StatusOr<std::unique_ptr<UseLiteTokenizer>> UseLiteTokenizer::FromJson(absl::string_view json,
                                                                              absl::string_view source) {
  nlohmann::json vocab = nlohmann::json::parse(json.begin(), json.end(), nullptr, /*allow_exceptions=*/false);
  if (vocab.is_discarded() || !vocab.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(source, " is not a JSON array of [piece, score] pairs"));
  }
  if (static_cast<int64_t>(vocab.size()) < kReservedPieces || vocab.size() > (1u << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(source, " has ", vocab.size(), " pieces; expected at least ",
                                                   kReservedPieces));
  }
  std::unique_ptr<UseLiteTokenizer> tok(new UseLiteTokenizer());
  tok->pieces_.reserve(vocab.size());
  tok->scores_.reserve(vocab.size());
  tok->utf16_lengths_.reserve(vocab.size());
  tok->nodes_.emplace_back();  // root
  std::u32string symbols;
  for (size_t i = 0; i < vocab.size(); ++i) {
    const nlohmann::json& entry = vocab[i];
    if (!entry.is_array() || entry.size() != 2 || !entry[0].is_string() ||
        !(entry[1].is_number() || entry[1].is_null())) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": entry ", i, " is not a [string, number] pair"));
    }
    std::string piece = entry[0].get<std::string>();
    // The upstream vocabulary has a few null scores (pieces with ':'); JavaScript adds null as 0.
    const double score = entry[1].is_null() ? 0.0 : entry[1].get<double>();
    if (absl::Status st = DecodeUtf8(piece, &symbols); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": piece ", i, ": ", st.message()));
    }
    int32_t utf16_length = 0;
    for (char32_t c : symbols) utf16_length += c > 0xFFFF ? 2 : 1;
    if (static_cast<int64_t>(i) >= kReservedPieces && !symbols.empty()) {
      // Insert into the trie; a later duplicate piece overrides an earlier one (as upstream's trie does).
      int32_t node = 0;
      for (char32_t c : symbols) {
        auto [it, inserted] = tok->children_.emplace(ChildKey(node, c), static_cast<int32_t>(tok->nodes_.size()));
        if (inserted) tok->nodes_.emplace_back();
        node = it->second;
      }
      tok->nodes_[node].id = static_cast<int32_t>(i);
      tok->nodes_[node].score = score;
    }
    tok->pieces_.push_back(std::move(piece));
    tok->scores_.push_back(score);
    tok->utf16_lengths_.push_back(utf16_length);
  }
  return tok;
}

absl::StatusOr<std::unique_ptr<UseLiteTokenizer>> UseLiteTokenizer::FromFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  return FromJson(*text, path);
}

int32_t UseLiteTokenizer::Child(int32_t node, char32_t symbol) const {
  auto it = children_.find(ChildKey(node, symbol));
  return it == children_.end() ? -1 : it->second;
}

absl::StatusOr<std::vector<int64_t>> UseLiteTokenizer::Tokenize(absl::string_view text) const {
  std::u32string decoded;
  if (absl::Status st = DecodeUtf8(text, &decoded); !st.ok()) return st;
  absl::StatusOr<std::u32string> normalized = NormalizeNfkc(text, decoded);
  if (!normalized.ok()) return normalized.status();
  if (normalized->empty()) return std::vector<int64_t>();

  std::u32string symbols;
  symbols.reserve(normalized->size() + 1);
  symbols.push_back(kSeparator);
  for (char32_t c : *normalized) symbols.push_back(c == U' ' ? kSeparator : c);

  // Viterbi. Visiting edges by ascending start visits the edges into every end in ascending start order, which is
  // the order upstream relaxes them in; best[start] is final when its edges are visited.
  const size_t n = symbols.size();
  std::vector<double> best(n + 1, 0.0);
  std::vector<int32_t> words(n + 1, static_cast<int32_t>(kUnknownId));
  auto relax = [&](size_t start, size_t end, int32_t id, double score) {
    const double total = score + best[start];
    if (best[end] == 0 || total >= best[end]) {
      best[end] = total;
      words[end] = id;
    }
  };
  for (size_t start = 0; start < n; ++start) {
    bool matched = false;
    int32_t node = Child(0, symbols[start]);
    for (size_t end = start + 1; node >= 0; ++end) {
      if (nodes_[node].id >= 0) {
        relax(start, end, nodes_[node].id, nodes_[node].score);
        matched = true;
      }
      if (end >= n) break;
      node = Child(node, symbols[end]);
    }
    if (!matched) relax(start, start + 1, static_cast<int32_t>(kUnknownId), 0.0);
  }

  // Back-track by each chosen piece's UTF-16 length (upstream's String.length), then merge runs of unknowns.
  std::vector<int64_t> reversed;
  for (int64_t pos = static_cast<int64_t>(n); pos > 0;) {
    const int32_t id = words[pos];
    reversed.push_back(id);
    pos -= std::max<int32_t>(1, utf16_lengths_[id]);
  }
  std::vector<int64_t> ids;
  ids.reserve(reversed.size());
  bool previous_unknown = false;
  for (auto it = reversed.rbegin(); it != reversed.rend(); ++it) {
    const bool unknown = *it == kUnknownId;
    if (!(unknown && previous_unknown)) ids.push_back(*it);
    previous_unknown = unknown;
  }
  return ids;
}

std::vector<int64_t> UseLiteTokenizer::Truncate(const std::vector<int64_t>& ids, int64_t max_tokens) const {
  if (max_tokens < 0) max_tokens = 0;
  if (static_cast<int64_t>(ids.size()) <= max_tokens) return ids;
  return std::vector<int64_t>(ids.begin(), ids.begin() + max_tokens);
}

std::string UseLiteTokenizer::IdToPiece(int64_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return pieces_[id];
}

double UseLiteTokenizer::PieceScore(int64_t id) const {
  if (id < 0 || id >= vocab_size()) return 0;
  return scores_[id];
}

}  // namespace model
}  // namespace deltaserve
