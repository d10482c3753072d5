// Unicode helpers for the BERT basic tokenizer, without ICU (UTF-8 itself is server/common/utf8.h): the character classes
// the tokenizer cares about, simple lowercasing and "accent stripping" (canonical decomposition, NFD, with the
// non-spacing marks dropped).
//
// The data comes from generated tables (unicode_tables.inc, made by gen_unicode_tables.py from Python's
// unicodedata, Unicode 14.0.0 on Debian 12). The classes follow the Hugging Face `tokenizers` BertNormalizer /
// BertPreTokenizer (the "fast" tokenizer that tokenizer.json describes). Stateless: thread-safe.
#ifndef DELTASERVE_SERVER_MODEL_BERT_UNICODE_TEXT_H_
#define DELTASERVE_SERVER_MODEL_BERT_UNICODE_TEXT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/common/utf8.h"

namespace deltaserve {
namespace model {
namespace unicode {

enum class CharClass : uint8_t {
  kOther = 0,
  kControl,      // Cc, Cf, Co except \t \n \r: removed by clean_text
  kWhitespace,   // \t \n \r, Zs, Zl, Zp
  kPunctuation,  // ASCII punctuation (33-47, 58-64, 91-96, 123-126) and every P* category
  kMark,         // Mn: non-spacing marks (dropped when stripping accents)
  kCjk,          // the CJK ideograph blocks BERT splits into one token per character
};

// The class of a code point (kOther for anything outside [0, 0x10FFFF]).
CharClass ClassOf(char32_t c);

// UTF-8 decoding and encoding are shared with the other tokenizers (server/common/utf8.h).
using ::deltaserve::AppendUtf8;
using ::deltaserve::DecodeUtf8;

// Appends the lowercase form of `c` (the Unicode simple lowercase mapping, plus U+0130 -> "i" U+0307, which is what
// Rust's char::to_lowercase does per character).
void AppendLower(char32_t c, std::u32string* out);

// Appends the canonical decomposition of `c` with its non-spacing marks (Mn) dropped: nothing for a mark, the
// base letter for an accented letter (U+00C4 -> 'A'), the jamo for a Hangul syllable, the unified ideograph for a
// CJK compatibility ideograph, and `c` itself when it does not decompose.
void AppendStripped(char32_t c, std::u32string* out);

// Canonical combining class of a character that survives stripping (0 for almost everything; a few spacing marks
// such as U+1D165 have one). Used for canonical reordering after stripping.
uint8_t NonMarkCombiningClass(char32_t c);

// The Unicode version of the tables.
const char* TablesUnicodeVersion();

}  // namespace unicode
}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_BERT_UNICODE_TEXT_H_
