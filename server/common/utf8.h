// Strict UTF-8 decoding and encoding, shared by every tokenizer and parser that takes outside text.
//
// Stateless functions: thread-safe. No LibTorch dependency (tokenizers are fuzzed on their own).
#ifndef DELTASERVE_SERVER_COMMON_UTF8_H_
#define DELTASERVE_SERVER_COMMON_UTF8_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace deltaserve {

// Decodes `text` into code points. INVALID_ARGUMENT ("text is not valid UTF-8: ... at offset N") for anything
// that is not well-formed UTF-8: stray continuation bytes, truncated sequences, overlong forms, surrogates, code
// points above U+10FFFF.
absl::Status DecodeUtf8(absl::string_view text, std::u32string* out);

// Appends the UTF-8 encoding of a valid code point. REQUIRES: c <= 0x10FFFF and not a surrogate.
void AppendUtf8(char32_t c, std::string* out);

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_COMMON_UTF8_H_
