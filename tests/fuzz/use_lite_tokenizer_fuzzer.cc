// Fuzz target: the use-lite SentencePiece-style tokenizer (server/model/use_lite/use_lite_tokenizer.h) on request
// text, with the real 8k-piece vocabulary (tests/data/use_lite/vocab.json).
//
// Input layout: byte 0 is the token limit of EncodeTextPair (1..256), the rest is the text; a 0x1f byte splits it
// into text and pair.
// Reaches: UTF-8 checks, ICU NFKC normalisation, the "▁" rewriting, the trie lattice and Viterbi, UTF-16
// back-tracking, unknown-run collapsing, truncation and pair encoding (model::EncodeTextPair).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "server/model/use_lite/use_lite_tokenizer.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tokenizer_checks.h"

namespace deltaserve {
namespace {

using model::UseLiteTokenizer;

const UseLiteTokenizer& Tokenizer() {
  static const UseLiteTokenizer* tokenizer = [] {
    const char* env = std::getenv("DS_SOURCE_DIR");
    const std::string root = env != nullptr && *env != '\0' ? env : DS_SOURCE_DIR;
    const std::string path = root + "/tests/data/use_lite/vocab.json";
    absl::StatusOr<std::unique_ptr<UseLiteTokenizer>> t = UseLiteTokenizer::FromFile(path);
    if (!t.ok()) {
      std::fprintf(stderr, "fuzz harness: %s (set DS_SOURCE_DIR to the source tree)\n", t.status().ToString().c_str());
      std::abort();
    }
    return t->release();  // kept for the life of the process
  }();
  return *tokenizer;
}

void FuzzOne(absl::string_view input) {
  uint8_t limit = 0;
  if (!input.empty()) {
    limit = static_cast<uint8_t>(input[0]);
    input.remove_prefix(1);
  }
  absl::string_view text = input, pair;
  const size_t split = input.find('\x1f');
  if (split != absl::string_view::npos) {
    text = input.substr(0, split);
    pair = input.substr(split + 1);
  }
  fuzz::CheckTokenizer(Tokenizer(), text, pair, 1 + limit);
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  deltaserve::Tokenizer();  // loaded before the first input: its allocations are not that input's leaks
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}
