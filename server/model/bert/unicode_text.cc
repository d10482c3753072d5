#include "server/model/bert/unicode_text.h"

#include <algorithm>
#include <cstddef>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace deltaserve {
namespace model {
namespace unicode {
namespace {

struct ClassRange {
  char32_t lo;
  char32_t hi;
  CharClass cls;
};

struct LowerRun {
  char32_t lo;
  char32_t hi;
  int32_t delta;
  int32_t step;  // 1: every code point of [lo, hi]; 2: every other one, starting at lo
};

struct StripSingle {
  char32_t cp;
  char32_t out;
};

struct StripMulti {
  char32_t cp;
  int32_t n;
  char32_t out[3];
};

struct CombiningClass {
  char32_t cp;
  uint8_t ccc;
};

#include "server/model/bert/unicode_tables.inc"

// Hangul syllable composition constants (Unicode 3.12).
constexpr char32_t kHangulSBase = 0xAC00;
constexpr char32_t kHangulLBase = 0x1100;
constexpr char32_t kHangulVBase = 0x1161;
constexpr char32_t kHangulTBase = 0x11A7;
constexpr char32_t kHangulTCount = 28;
constexpr char32_t kHangulNCount = 21 * kHangulTCount;
constexpr char32_t kHangulSCount = 19 * kHangulNCount;

// The last element of `table` whose `key` is <= c, or nullptr.
template <typename T, size_t N, typename Key>
const T* FloorEntry(const T (&table)[N], char32_t c, Key key) {
  const T* it = std::upper_bound(std::begin(table), std::end(table), c,
                                 [&](char32_t v, const T& e) { return v < key(e); });
  if (it == std::begin(table)) return nullptr;
  return it - 1;
}

template <typename T, size_t N>
const T* FindExact(const T (&table)[N], char32_t c) {
  const T* e = FloorEntry(table, c, [](const T& t) { return t.cp; });
  return (e != nullptr && e->cp == c) ? e : nullptr;
}

}  // namespace

CharClass ClassOf(char32_t c) {
  if (c < 0x80) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') return CharClass::kWhitespace;
    if (c < 0x20 || c == 0x7F) return CharClass::kControl;
    if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126)) {
      return CharClass::kPunctuation;
    }
    return CharClass::kOther;
  }
  const ClassRange* r = FloorEntry(kCharClassRanges, c, [](const ClassRange& e) { return e.lo; });
  if (r != nullptr && c <= r->hi) return r->cls;
  return CharClass::kOther;
}


void AppendLower(char32_t c, std::u32string* out) {
  if (c < 0x80) {
    out->push_back((c >= 'A' && c <= 'Z') ? c + 32 : c);
    return;
  }
  if (c == 0x130) {  // LATIN CAPITAL LETTER I WITH DOT ABOVE: the one multi-character lowercase
    out->push_back(U'i');
    out->push_back(0x307);
    return;
  }
  const LowerRun* r = FloorEntry(kLowerRuns, c, [](const LowerRun& e) { return e.lo; });
  if (r != nullptr && c <= r->hi && (c - r->lo) % static_cast<char32_t>(r->step) == 0) {
    out->push_back(static_cast<char32_t>(static_cast<int64_t>(c) + r->delta));
    return;
  }
  out->push_back(c);
}

void AppendStripped(char32_t c, std::u32string* out) {
  if (c < 0xC0) {  // nothing below U+00C0 decomposes or is a mark
    out->push_back(c);
    return;
  }
  if (c >= kHangulSBase && c < kHangulSBase + kHangulSCount) {
    const char32_t s = c - kHangulSBase;
    out->push_back(kHangulLBase + s / kHangulNCount);
    out->push_back(kHangulVBase + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount != 0) out->push_back(kHangulTBase + s % kHangulTCount);
    return;
  }
  if (ClassOf(c) == CharClass::kMark) return;
  if (const StripSingle* e = FindExact(kStripSingle, c)) {
    out->push_back(e->out);
    return;
  }
  if (const StripMulti* e = FindExact(kStripMulti, c)) {
    for (int i = 0; i < e->n; ++i) out->push_back(e->out[i]);
    return;
  }
  out->push_back(c);
}

uint8_t NonMarkCombiningClass(char32_t c) {
  if (c < 0x1715) return 0;
  const CombiningClass* e = FindExact(kNonMarkCombining, c);
  return e == nullptr ? 0 : e->ccc;
}

const char* TablesUnicodeVersion() { return kUnicodeVersion; }

}  // namespace unicode
}  // namespace model
}  // namespace deltaserve
