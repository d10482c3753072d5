#include "server/tuning/dataset.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace tuning {
namespace {

constexpr absl::string_view kBom = "\xEF\xBB\xBF";
// How many column names / labels an error message lists before "...".
constexpr size_t kMaxListed = 10;

absl::Status LineError(int64_t line, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("line ", line, ": ", message));
}

std::string Quote(absl::string_view s) { return absl::StrCat("\"", absl::CEscape(s), "\""); }

// `"a", "b", ... (N in all)`, quoted, at most kMaxListed.
std::string QuotedList(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < kMaxListed; ++i) absl::StrAppend(&out, i ? ", " : "", Quote(items[i]));
  if (items.size() > kMaxListed) absl::StrAppend(&out, ", ... (", items.size(), " in all)");
  return out;
}

// `a, b, c` unquoted (column names read best bare), at most 2 * kMaxListed.
std::string NameList(const std::vector<std::string>& names) {
  const size_t shown = std::min(names.size(), 2 * kMaxListed);
  std::string out = absl::StrJoin(names.begin(), names.begin() + shown, ", ");
  if (names.size() > shown) absl::StrAppend(&out, ", ... (", names.size(), " in all)");
  if (names.empty()) out = "(none)";
  return out;
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

bool IsBlank(absl::string_view s) {
  for (char c : s) {
    if (!IsSpace(c)) return false;
  }
  return true;
}

absl::string_view StripCr(absl::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  return line;
}

// The offset of the first byte of `s` that is not part of well-formed UTF-8 (overlong forms, surrogates and code
// points above U+10FFFF are not), or npos; `*why` says what is wrong there. ASCII runs are checked 8 bytes at a time.
size_t FindInvalidUtf8(absl::string_view s, const char** why) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    if (i + 8 <= n) {
      uint64_t word;
      std::memcpy(&word, p + i, 8);
      if ((word & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    const unsigned char b0 = p[i];
    if (b0 < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3;
      if (b0 == 0xE0) lo = 0xA0;  // overlong
      if (b0 == 0xED) hi = 0x9F;  // surrogates
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4;
      if (b0 == 0xF0) lo = 0x90;  // overlong
      if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      *why = "cannot start a character";
      return i;
    }
    if (i + len > n) {
      *why = "truncated character at the end of the file";
      return i;
    }
    if (p[i + 1] < lo || p[i + 1] > hi) {
      *why = (p[i + 1] & 0xC0) != 0x80 ? "missing continuation byte"
                                       : "overlong form, surrogate or code point above U+10FFFF";
      return i;
    }
    for (size_t k = 2; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) {
        *why = "missing continuation byte";
        return i;
      }
    }
    i += len;
  }
  return absl::string_view::npos;
}

// The columns an example is read from: names (header names, "0", "1", ... without a header, or JSONL keys) and,
// for TSV / CSV, their indices.
struct Columns {
  std::string text;
  std::string text_pair;  // "" = none
  std::string label;
  int text_index = -1;
  int pair_index = -1;
  int label_index = -1;
  bool has_pair() const { return !text_pair.empty(); }
};

// Resolves the options' columns against `names` (found on `line`). `what` is "column" or "key".
absl::StatusOr<Columns> ResolveColumns(const std::vector<std::string>& names, const DatasetOptions& options,
                                       int64_t line, absl::string_view what, bool numbered) {
  const std::string listing =
      absl::StrCat(what, "s are: ", NameList(names),
                   numbered ? " (without a header, columns are named by their 0-based index)" : "");
  // The index of `name`, -1 when absent, -2 when it appears more than once.
  auto find = [&](const std::string& name) {
    int found = -1;
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i] != name) continue;
      if (found >= 0) return -2;
      found = static_cast<int>(i);
    }
    return found;
  };
  auto duplicate = [&](const std::string& name) {
    return LineError(line, absl::StrCat(what, " ", Quote(name), " appears more than once; ", listing));
  };

  Columns cols;
  if (!options.text_column.empty()) {
    cols.text = options.text_column;
    cols.text_index = find(cols.text);
    if (cols.text_index == -1) {
      return LineError(line, absl::StrCat("no ", what, " ", Quote(cols.text), "; ", listing, " (set text_column)"));
    }
  } else {
    for (const char* candidate : {"text", "sentence", "sentence1"}) {
      cols.text_index = find(candidate);
      if (cols.text_index != -1) {
        cols.text = candidate;
        break;
      }
    }
    if (cols.text_index == -1) {
      return LineError(line, absl::StrCat("no text ", what, ": none of \"text\", \"sentence\", \"sentence1\" exists; ",
                                          listing, " (set text_column)"));
    }
  }
  if (cols.text_index == -2) return duplicate(cols.text);

  if (!options.text_pair_column.empty()) {
    cols.text_pair = options.text_pair_column;
    cols.pair_index = find(cols.text_pair);
    if (cols.pair_index == -1) {
      return LineError(line, absl::StrCat("no ", what, " ", Quote(cols.text_pair), "; ", listing,
                                          " (set text_pair_column, or leave it empty for single-text tasks)"));
    }
  } else {
    for (const char* candidate : {"text_pair", "sentence2"}) {
      const int index = find(candidate);
      if (index != -1) {
        cols.text_pair = candidate;
        cols.pair_index = index;
        break;
      }
    }
  }
  if (cols.pair_index == -2) return duplicate(cols.text_pair);

  cols.label = options.label_column.empty() ? "label" : options.label_column;
  cols.label_index = find(cols.label);
  if (cols.label_index == -1) {
    return LineError(line, absl::StrCat("no ", what, " ", Quote(cols.label), "; ", listing, " (set label_column)"));
  }
  if (cols.label_index == -2) return duplicate(cols.label);

  if (cols.text == cols.label) {
    return LineError(line, absl::StrCat("the text and the label are both ", what, " ", Quote(cols.text),
                                        " (set text_column and label_column)"));
  }
  if (cols.has_pair() && (cols.text_pair == cols.text || cols.text_pair == cols.label)) {
    return LineError(line, absl::StrCat("the text pair ", what, " ", Quote(cols.text_pair),
                                        " is also the text or the label ", what, " (set text_pair_column)"));
  }
  return cols;
}

// Checks one example's fields and appends it.
absl::Status AddExample(int64_t line, absl::string_view text, absl::string_view pair, absl::string_view label,
                        const Columns& cols, const DatasetOptions& options, Dataset* out) {
  auto check_text = [&](absl::string_view value, const char* what, const std::string& column) -> absl::Status {
    if (IsBlank(value)) return LineError(line, absl::StrCat("empty ", what, " (column ", Quote(column), ")"));
    if (static_cast<int64_t>(value.size()) > options.max_text_bytes) {
      return LineError(line, absl::StrCat(what, " (column ", Quote(column), ") is ", value.size(),
                                          " bytes, over the limit of ", options.max_text_bytes, " (max_text_bytes)"));
    }
    return absl::OkStatus();
  };
  DS_RETURN_IF_ERROR(check_text(text, "text", cols.text));
  if (cols.has_pair()) DS_RETURN_IF_ERROR(check_text(pair, "text pair", cols.text_pair));
  label = absl::StripAsciiWhitespace(label);
  DS_RETURN_IF_ERROR(check_text(label, "label", cols.label));
  if (static_cast<int64_t>(out->examples.size()) >= options.max_examples) {
    return LineError(line,
                     absl::StrCat("the dataset has more than ", options.max_examples, " examples (max_examples)"));
  }
  Example& example = out->examples.emplace_back();
  example.text.assign(text.data(), text.size());
  if (cols.has_pair()) example.text_pair.assign(pair.data(), pair.size());
  example.label.assign(label.data(), label.size());
  example.line = line;
  return absl::OkStatus();
}

std::vector<std::string> HeaderNames(const std::vector<absl::string_view>& fields, bool header) {
  std::vector<std::string> names;
  names.reserve(fields.size());
  for (size_t i = 0; i < fields.size(); ++i) {
    names.push_back(header ? std::string(absl::StripAsciiWhitespace(fields[i])) : std::to_string(i));
  }
  return names;
}

absl::Status FieldCountError(int64_t line, size_t got, const std::vector<std::string>& names, bool tsv) {
  return LineError(line, absl::StrCat(got, got == 1 ? " field" : " fields", ", expected ", names.size(),
                                      " (columns: ", NameList(names), ")",
                                      tsv ? "; TSV has no quoting, so a field cannot contain a tab"
                                          : "; quote a field that contains a comma: \"a, b\""));
}

// TSV: one record per line, fields split at tabs, no quoting.
absl::Status ParseTsv(absl::string_view bytes, const DatasetOptions& options, Columns* cols, bool* have_columns,
                      Dataset* out) {
  std::vector<absl::string_view> fields;
  std::vector<std::string> names;
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < bytes.size()) {
    size_t end = bytes.find('\n', pos);
    if (end == absl::string_view::npos) end = bytes.size();
    const absl::string_view line = StripCr(bytes.substr(pos, end - pos));
    pos = end + 1;
    ++line_no;
    if (IsBlank(line)) continue;
    fields.clear();
    for (size_t start = 0;;) {
      const size_t tab = line.find('\t', start);
      if (tab == absl::string_view::npos) {
        fields.push_back(line.substr(start));
        break;
      }
      fields.push_back(line.substr(start, tab - start));
      start = tab + 1;
    }
    if (!*have_columns) {
      names = HeaderNames(fields, options.header);
      DS_ASSIGN_OR_RETURN(*cols, ResolveColumns(names, options, line_no, "column", !options.header));
      *have_columns = true;
      if (options.header) continue;
    }
    if (fields.size() != names.size()) return FieldCountError(line_no, fields.size(), names, /*tsv=*/true);
    DS_RETURN_IF_ERROR(AddExample(line_no, fields[cols->text_index],
                                  cols->has_pair() ? fields[cols->pair_index] : absl::string_view(),
                                  fields[cols->label_index], *cols, options, out));
  }
  return absl::OkStatus();
}

// RFC 4180 records. Reuses its field strings across records (no allocation per field once warm).
class CsvReader {
 public:
  explicit CsvReader(absl::string_view bytes) : bytes_(bytes) {}

  // Reads the next record into fields()[0, size()). Returns false at the end. `*line` is the line the record
  // starts on; `*blank` is whether the record is a blank line (one unquoted all-whitespace field).
  absl::StatusOr<bool> Next(int64_t* line, bool* blank) {
    if (pos_ >= bytes_.size()) return false;
    *line = line_;
    count_ = 0;
    bool quoted_any = false;
    while (true) {
      if (count_ == fields_.size()) fields_.emplace_back();
      std::string& field = fields_[count_++];
      field.clear();
      if (pos_ < bytes_.size() && bytes_[pos_] == '"') {
        quoted_any = true;
        const int64_t open_line = line_;
        ++pos_;
        while (true) {
          const size_t q = bytes_.find('"', pos_);
          if (q == absl::string_view::npos) {
            return LineError(open_line, absl::StrCat("unterminated quote: the quoted field ", count_,
                                                     " that opens here never closes"));
          }
          const absl::string_view segment = bytes_.substr(pos_, q - pos_);
          line_ += std::count(segment.begin(), segment.end(), '\n');
          field.append(segment.data(), segment.size());
          pos_ = q + 1;
          if (pos_ < bytes_.size() && bytes_[pos_] == '"') {  // a doubled quote
            field.push_back('"');
            ++pos_;
            continue;
          }
          break;
        }
        if (pos_ >= bytes_.size()) break;
        const char c = bytes_[pos_];
        if (c == ',') {
          ++pos_;
          continue;
        }
        if (c == '\n' || (c == '\r' && pos_ + 1 < bytes_.size() && bytes_[pos_ + 1] == '\n')) {
          pos_ += c == '\n' ? 1 : 2;
          ++line_;
          break;
        }
        if (c == '\r' && pos_ + 1 == bytes_.size()) {
          ++pos_;
          break;
        }
        return LineError(
            line_, absl::StrCat("unexpected ", Quote(absl::string_view(&c, 1)), " after the closing quote of field ",
                                count_, " (a quote inside a quoted field is written twice: \"\")"));
      }
      // Unquoted: up to the next comma or newline; a quote inside is kept as a literal character.
      size_t end = pos_;
      while (end < bytes_.size() && bytes_[end] != ',' && bytes_[end] != '\n') ++end;
      absl::string_view value = bytes_.substr(pos_, end - pos_);
      if (end == bytes_.size() || bytes_[end] == '\n') value = StripCr(value);
      field.assign(value.data(), value.size());
      if (end == bytes_.size()) {
        pos_ = end;
        break;
      }
      pos_ = end + 1;
      if (bytes_[end] == '\n') {
        ++line_;
        break;
      }
    }
    *blank = !quoted_any && count_ == 1 && IsBlank(fields_[0]);
    return true;
  }

  const std::vector<std::string>& fields() const { return fields_; }
  size_t size() const { return count_; }

 private:
  absl::string_view bytes_;
  size_t pos_ = 0;
  int64_t line_ = 1;
  std::vector<std::string> fields_;
  size_t count_ = 0;
};

absl::Status ParseCsv(absl::string_view bytes, const DatasetOptions& options, Columns* cols, bool* have_columns,
                      Dataset* out) {
  CsvReader reader(bytes);
  std::vector<std::string> names;
  int64_t line = 0;
  bool blank = false;
  while (true) {
    DS_ASSIGN_OR_RETURN(const bool more, reader.Next(&line, &blank));
    if (!more) break;
    if (blank) continue;
    const std::vector<std::string>& fields = reader.fields();
    if (!*have_columns) {
      std::vector<absl::string_view> views(fields.begin(), fields.begin() + reader.size());
      names = HeaderNames(views, options.header);
      DS_ASSIGN_OR_RETURN(*cols, ResolveColumns(names, options, line, "column", !options.header));
      *have_columns = true;
      if (options.header) continue;
    }
    if (reader.size() != names.size()) return FieldCountError(line, reader.size(), names, /*tsv=*/false);
    DS_RETURN_IF_ERROR(AddExample(line, fields[cols->text_index],
                                  cols->has_pair() ? absl::string_view(fields[cols->pair_index]) : absl::string_view(),
                                  fields[cols->label_index], *cols, options, out));
  }
  return absl::OkStatus();
}

// A JSON number label as text: integral values without a fraction ("1", not "1.0"), others in the shortest form
// that reads back the same ("0.5").
std::string NumberLabel(const nlohmann::json& value) {
  if (value.is_number_unsigned()) return std::to_string(value.get<uint64_t>());
  if (value.is_number_integer()) return std::to_string(value.get<int64_t>());
  const double d = value.get<double>();
  if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {
    return std::to_string(static_cast<int64_t>(d));
  }
  return value.dump();
}

absl::Status ParseJsonl(absl::string_view bytes, const DatasetOptions& options, Columns* cols, bool* have_columns,
                        Dataset* out) {
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < bytes.size()) {
    size_t end = bytes.find('\n', pos);
    if (end == absl::string_view::npos) end = bytes.size();
    const absl::string_view line = StripCr(bytes.substr(pos, end - pos));
    pos = end + 1;
    ++line_no;
    if (IsBlank(line)) continue;
    nlohmann::json object;
    try {
      object = nlohmann::json::parse(line.begin(), line.end());
    } catch (const nlohmann::json::parse_error& e) {
      // e.what() reads "[json.exception.parse_error.101] parse error at line 1, column 5: <reason>": keep the
      // reason; the column is e.byte within this line.
      std::string reason = e.what();
      const size_t colon = reason.find(": ");
      if (colon != std::string::npos) reason = reason.substr(colon + 2);
      return LineError(line_no, absl::StrCat("not valid JSON at column ", e.byte, ": ", reason));
    } catch (const nlohmann::json::exception& e) {
      return LineError(line_no, absl::StrCat("not valid JSON: ", e.what()));
    }
    if (!object.is_object()) {
      return LineError(
          line_no, absl::StrCat("expected a JSON object ({\"text\": ..., \"label\": ...}), got ", object.type_name()));
    }
    std::vector<std::string> keys;
    if (!*have_columns) {
      for (const auto& item : object.items()) keys.push_back(item.key());
      DS_ASSIGN_OR_RETURN(*cols, ResolveColumns(keys, options, line_no, "key", /*numbered=*/false));
      *have_columns = true;
    }
    auto missing = [&](const std::string& key) {
      std::vector<std::string> present;
      for (const auto& item : object.items()) present.push_back(item.key());
      return LineError(line_no, absl::StrCat("no key ", Quote(key), "; keys are: ", NameList(present)));
    };
    auto string_field = [&](const std::string& key, const char* what) -> absl::StatusOr<absl::string_view> {
      const auto it = object.find(key);
      if (it == object.end()) return missing(key);
      if (!it->is_string()) {
        return LineError(line_no,
                         absl::StrCat(what, " (key ", Quote(key), ") must be a string, got ", it->type_name()));
      }
      return absl::string_view(it->get_ref<const std::string&>());
    };
    DS_ASSIGN_OR_RETURN(const absl::string_view text, string_field(cols->text, "text"));
    absl::string_view pair;
    if (cols->has_pair()) {
      DS_ASSIGN_OR_RETURN(pair, string_field(cols->text_pair, "text pair"));
    }
    const auto label_it = object.find(cols->label);
    if (label_it == object.end()) return missing(cols->label);
    std::string label;
    if (label_it->is_string()) {
      label = label_it->get<std::string>();
    } else if (label_it->is_number()) {
      label = NumberLabel(*label_it);
    } else {
      return LineError(line_no, absl::StrCat("label (key ", Quote(cols->label), ") must be a string or a number, got ",
                                             label_it->type_name()));
    }
    DS_RETURN_IF_ERROR(AddExample(line_no, text, pair, label, *cols, options, out));
  }
  return absl::OkStatus();
}

// A label that is a plain decimal integer: optional '-', then digits (no '+', spaces or leading zeros rules).
bool ParseIntegerLabel(const std::string& s, int64_t* value) {
  size_t i = (!s.empty() && s[0] == '-') ? 1 : 0;
  if (i == s.size()) return false;
  for (size_t k = i; k < s.size(); ++k) {
    if (s[k] < '0' || s[k] > '9') return false;
  }
  return absl::SimpleAtoi(s, value);
}

// SplitMix64: a small, fully specified generator, so that a split is the same on every platform and standard
// library (std::shuffle's use of the engine is implementation-defined).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n). REQUIRES: n > 0.
  uint64_t Below(uint64_t n) {
    const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % n;
    uint64_t r;
    do {
      r = Next();
    } while (r >= limit);
    return r % n;
  }
  template <typename T>
  void Shuffle(std::vector<T>* v) {
    for (size_t i = v->size(); i > 1; --i) std::swap((*v)[i - 1], (*v)[Below(i)]);
  }

 private:
  uint64_t state_;
};

}  // namespace

absl::StatusOr<DatasetFormat> ParseDatasetFormat(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "auto") return DatasetFormat::kAuto;
  if (lower == "tsv") return DatasetFormat::kTsv;
  if (lower == "csv") return DatasetFormat::kCsv;
  if (lower == "jsonl") return DatasetFormat::kJsonl;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dataset format ", Quote(name), "; expected one of: auto, tsv, csv, jsonl"));
}

const char* DatasetFormatName(DatasetFormat format) {
  switch (format) {
    case DatasetFormat::kAuto:
      return "auto";
    case DatasetFormat::kTsv:
      return "tsv";
    case DatasetFormat::kCsv:
      return "csv";
    case DatasetFormat::kJsonl:
      return "jsonl";
  }
  return "unknown";
}

absl::StatusOr<Dataset> ParseDataset(absl::string_view bytes, const DatasetOptions& options) {
  if (options.max_bytes <= 0 || options.max_text_bytes <= 0 || options.max_examples <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("dataset limits must be positive: max_bytes=", options.max_bytes,
                                                   " max_text_bytes=", options.max_text_bytes,
                                                   " max_examples=", options.max_examples));
  }
  if (static_cast<int64_t>(bytes.size()) > options.max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the dataset is ", bytes.size(), " bytes, over the limit of ",
                                                   options.max_bytes, " bytes (max_bytes)"));
  }
  if (absl::StartsWith(bytes, kBom)) bytes.remove_prefix(kBom.size());
  const char* why = "";
  const size_t bad = FindInvalidUtf8(bytes, &why);
  if (bad != absl::string_view::npos) {
    const absl::string_view before = bytes.substr(0, bad);
    const int64_t line = 1 + std::count(before.begin(), before.end(), '\n');
    const size_t line_start = before.rfind('\n');
    const size_t column = bad - (line_start == absl::string_view::npos ? 0 : line_start + 1) + 1;
    return LineError(line, absl::StrCat("not valid UTF-8 at byte ", column, " of the line (0x",
                                        absl::Hex(static_cast<unsigned char>(bytes[bad]), absl::kZeroPad2), "): ", why,
                                        "; save the file as UTF-8"));
  }

  DatasetFormat format = options.format;
  if (format == DatasetFormat::kAuto) {
    size_t first = 0;
    while (first < bytes.size() && IsSpace(bytes[first])) ++first;
    if (first < bytes.size() && bytes[first] == '{') {
      format = DatasetFormat::kJsonl;
    } else {
      // The first non-blank line decides between TSV and CSV.
      const size_t line_start = bytes.rfind('\n', first) == absl::string_view::npos ? 0 : bytes.rfind('\n', first) + 1;
      const size_t line_end = std::min(bytes.find('\n', first), bytes.size());
      const absl::string_view line = bytes.substr(line_start, line_end - line_start);
      format = line.find('\t') != absl::string_view::npos ? DatasetFormat::kTsv : DatasetFormat::kCsv;
    }
  }

  Dataset dataset;
  Columns cols;
  bool have_columns = false;
  switch (format) {
    case DatasetFormat::kTsv:
      DS_RETURN_IF_ERROR(ParseTsv(bytes, options, &cols, &have_columns, &dataset));
      break;
    case DatasetFormat::kCsv:
      DS_RETURN_IF_ERROR(ParseCsv(bytes, options, &cols, &have_columns, &dataset));
      break;
    case DatasetFormat::kJsonl:
    case DatasetFormat::kAuto:
      DS_RETURN_IF_ERROR(ParseJsonl(bytes, options, &cols, &have_columns, &dataset));
      break;
  }
  if (dataset.examples.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the dataset has no examples (",
                                                   have_columns ? "only a header line" : "the file is empty or blank",
                                                   ", read as ", DatasetFormatName(format), ")"));
  }
  dataset.has_text_pair = cols.has_pair();
  return dataset;
}

absl::StatusOr<TaskType> ParseTaskType(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "classification") return TaskType::kClassification;
  if (lower == "regression") return TaskType::kRegression;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown task type ", Quote(name), "; expected classification or regression"));
}

const char* TaskTypeName(TaskType type) {
  switch (type) {
    case TaskType::kClassification:
      return "classification";
    case TaskType::kRegression:
      return "regression";
  }
  return "unknown";
}

absl::StatusOr<LabelSpace> ResolveLabels(const Dataset& dataset, TaskType type, const std::vector<std::string>& given) {
  LabelSpace space;
  space.type = type;
  if (type == TaskType::kRegression) {
    if (!given.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("a regression task takes no labels; got ", QuotedList(given)));
    }
    return space;
  }
  if (!given.empty()) {
    std::unordered_map<std::string, size_t> seen;
    for (size_t i = 0; i < given.size(); ++i) {
      if (given[i].empty())
        return absl::InvalidArgumentError(absl::StrCat("label ", i + 1, " of the given labels is empty"));
      const auto [it, inserted] = seen.emplace(given[i], i);
      if (!inserted) {
        return absl::InvalidArgumentError(
            absl::StrCat("label ", Quote(given[i]), " is given twice (labels ", it->second + 1, " and ", i + 1, ")"));
      }
    }
    space.labels = given;
  } else {
    std::unordered_map<std::string, bool> seen;
    for (const Example& example : dataset.examples) {
      if (seen.emplace(example.label, true).second) space.labels.push_back(example.label);
    }
    std::vector<std::pair<int64_t, std::string>> numeric;
    bool all_integers = true;
    for (const std::string& label : space.labels) {
      int64_t value = 0;
      if (!ParseIntegerLabel(label, &value)) {
        all_integers = false;
        break;
      }
      numeric.emplace_back(value, label);
    }
    if (all_integers) {
      std::sort(numeric.begin(), numeric.end());  // by value, then by text ("01" and "1" stay distinct)
      for (size_t i = 0; i < numeric.size(); ++i) space.labels[i] = std::move(numeric[i].second);
    } else {
      std::sort(space.labels.begin(), space.labels.end());
    }
  }
  if (space.labels.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat("classification needs at least 2 labels, found ",
                                                   space.labels.size(), space.labels.empty() ? "" : ": ",
                                                   QuotedList(space.labels)));
  }
  return space;
}

absl::StatusOr<EncodedLabels> EncodeLabels(const Dataset& dataset, const LabelSpace& space) {
  EncodedLabels encoded;
  if (space.type == TaskType::kRegression) {
    encoded.values.reserve(dataset.examples.size());
    for (const Example& example : dataset.examples) {
      double value = 0;
      if (!absl::SimpleAtod(example.label, &value) || !std::isfinite(value) ||
          !std::isfinite(static_cast<float>(value))) {
        return LineError(example.line, absl::StrCat("label ", Quote(example.label),
                                                    " is not a finite number (a regression label must be one)"));
      }
      encoded.values.push_back(static_cast<float>(value));
    }
    return encoded;
  }
  if (space.labels.empty()) return absl::InvalidArgumentError("the label space has no labels");
  std::unordered_map<std::string_view, int64_t> index;  // absl::string_view has no std::hash here
  for (size_t i = 0; i < space.labels.size(); ++i)
    index.emplace(std::string_view(space.labels[i]), static_cast<int64_t>(i));
  encoded.classes.reserve(dataset.examples.size());
  for (const Example& example : dataset.examples) {
    const auto it = index.find(std::string_view(example.label));
    if (it == index.end()) {
      return LineError(example.line, absl::StrCat("unknown label ", Quote(example.label),
                                                  "; the labels are: ", QuotedList(space.labels)));
    }
    encoded.classes.push_back(it->second);
  }
  return encoded;
}

absl::Status SplitDataset(const Dataset& all, double validation_fraction, uint64_t seed, Dataset* train,
                          Dataset* validation) {
  if (!(validation_fraction > 0 && validation_fraction < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("validation_fraction must be in (0, 1), got ", validation_fraction));
  }
  const size_t n = all.examples.size();
  if (n < 2) {
    return absl::InvalidArgumentError(absl::StrCat("a dataset of ", n, n == 1 ? " example" : " examples",
                                                   " cannot be split into non-empty train and validation sets"));
  }
  SplitMix64 rng(seed);

  // Strata: the examples of each label, in order of first appearance. For regression, where most labels are
  // distinct, most strata hold one example and the split below degenerates to a plain random split.
  std::vector<std::vector<size_t>> strata;
  {
    std::unordered_map<std::string_view, size_t> stratum_of;
    for (size_t i = 0; i < n; ++i) {
      const auto [it, inserted] = stratum_of.emplace(std::string_view(all.examples[i].label), strata.size());
      if (inserted) strata.emplace_back();
      strata[it->second].push_back(i);
    }
  }
  // How many of each stratum go to validation: the floor of its share, plus one for the strata with the largest
  // remainders (ties in a seeded random order) until the total is round(n * fraction); then every stratum of
  // >= 2 examples keeps at least one on each side. Each count stays within one of its exact share.
  const size_t k = strata.size();
  std::vector<size_t> take(k);
  std::vector<double> remainder(k);
  size_t floors = 0;
  for (size_t s = 0; s < k; ++s) {
    const double share = static_cast<double>(strata[s].size()) * validation_fraction;
    take[s] = static_cast<size_t>(std::floor(share));
    remainder[s] = share - static_cast<double>(take[s]);
    floors += take[s];
  }
  const size_t target = static_cast<size_t>(std::llround(static_cast<double>(n) * validation_fraction));
  std::vector<size_t> order(k);
  for (size_t s = 0; s < k; ++s) order[s] = s;
  rng.Shuffle(&order);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return remainder[a] > remainder[b]; });
  for (size_t i = 0; floors + i < target && i < k; ++i) ++take[order[i]];
  for (size_t s = 0; s < k; ++s) {
    const size_t size = strata[s].size();
    if (size >= 2) take[s] = std::min(std::max<size_t>(take[s], 1), size - 1);
  }

  std::vector<size_t> train_idx, validation_idx;
  for (size_t s = 0; s < k; ++s) {
    std::vector<size_t>& members = strata[s];
    rng.Shuffle(&members);
    validation_idx.insert(validation_idx.end(), members.begin(), members.begin() + take[s]);
    train_idx.insert(train_idx.end(), members.begin() + take[s], members.end());
  }
  if (validation_idx.empty() || train_idx.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("validation_fraction ", validation_fraction, " of ", n, " examples leaves the ",
                     validation_idx.empty() ? "validation" : "train", " set empty; ",
                     validation_idx.empty() ? "raise" : "lower", " validation_fraction or add examples"));
  }
  rng.Shuffle(&train_idx);
  rng.Shuffle(&validation_idx);

  // Build both before assigning, so that `all` may alias `train` or `validation`.
  Dataset new_train, new_validation;
  new_train.has_text_pair = new_validation.has_text_pair = all.has_text_pair;
  new_train.examples.reserve(train_idx.size());
  new_validation.examples.reserve(validation_idx.size());
  for (size_t i : train_idx) new_train.examples.push_back(all.examples[i]);
  for (size_t i : validation_idx) new_validation.examples.push_back(all.examples[i]);
  *train = std::move(new_train);
  *validation = std::move(new_validation);
  return absl::OkStatus();
}

}  // namespace tuning
}  // namespace deltaserve
