#include "server/model/bert/wordpiece_tokenizer.h"

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/status_macros.h"
#include "server/model/bert/unicode_text.h"

namespace deltaserve {
namespace model {
namespace {

using unicode::CharClass;
using unicode::ClassOf;

// Largest id a tokenizer.json vocabulary may use (guards the id -> piece table against absurd ids).
constexpr int64_t kMaxVocabId = int64_t{1} << 24;

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// Whitespace for the word split: the cleaned-text whitespace plus the White_Space controls that survive when
// clean_text is off (Rust's char::is_whitespace).
bool IsSplitSpace(char32_t c) {
  return ClassOf(c) == CharClass::kWhitespace || c == 0x0B || c == 0x0C || c == 0x85;
}

// Reads an optional bool `key` of `j` into `*out`.
absl::Status ReadBool(const nlohmann::json& j, const char* key, const std::string& path, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": \"", key, "\" must be true or false"));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

// Reads an optional special token `key`: a string, or an AddedToken object {"content": "..."}.
absl::Status ReadToken(const nlohmann::json& j, const char* key, const std::string& path, std::string* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (it->is_string()) {
    *out = it->get<std::string>();
    return absl::OkStatus();
  }
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      *out = content->get<std::string>();
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": \"", key, "\" must be a string or an object with a string \"content\""));
}

absl::Status OptionsFromTokenizerConfig(const std::string& path, WordPieceOptions* options) {
  DS_ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonObject(path));
  DS_RETURN_IF_ERROR(ReadBool(j, "do_lower_case", path, &options->lowercase));
  DS_RETURN_IF_ERROR(ReadBool(j, "tokenize_chinese_chars", path, &options->tokenize_chinese_chars));
  auto it = j.find("strip_accents");
  if (it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": \"strip_accents\" must be true, false or null"));
    }
    options->strip_accents = it->get<bool>();
  }
  DS_RETURN_IF_ERROR(ReadToken(j, "unk_token", path, &options->unk_token));
  DS_RETURN_IF_ERROR(ReadToken(j, "cls_token", path, &options->cls_token));
  DS_RETURN_IF_ERROR(ReadToken(j, "sep_token", path, &options->sep_token));
  DS_RETURN_IF_ERROR(ReadToken(j, "pad_token", path, &options->pad_token));
  return absl::OkStatus();
}

// The special-token strings of a tokenizer.json post_processor (BertProcessing / RobertaProcessing: "cls" and
// "sep" pairs; TemplateProcessing: the special tokens before and after sequence A of "single").
absl::Status SpecialsFromPostProcessor(const nlohmann::json& pp, const std::string& path,
                                       WordPieceOptions* options) {
  if (pp.is_null()) return absl::OkStatus();
  const std::string type = pp.value("type", "");
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    for (const char* key : {"cls", "sep"}) {
      auto it = pp.find(key);
      if (it == pp.end() || !it->is_array() || it->empty() || !(*it)[0].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": post_processor.", key, " must be a [token, id] pair"));
      }
      (std::string(key) == "cls" ? options->cls_token : options->sep_token) = (*it)[0].get<std::string>();
    }
    return absl::OkStatus();
  }
  if (type == "TemplateProcessing") {
    auto single = pp.find("single");
    if (single == pp.end() || !single->is_array()) return absl::OkStatus();
    bool seen_sequence = false;
    std::string before, after;
    for (const auto& piece : *single) {
      if (!piece.is_object()) continue;
      if (piece.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      auto special = piece.find("SpecialToken");
      if (special == piece.end() || !special->is_object()) continue;
      auto id = special->find("id");
      if (id == special->end() || !id->is_string()) continue;
      if (!seen_sequence && before.empty()) before = id->get<std::string>();
      if (seen_sequence && after.empty()) after = id->get<std::string>();
    }
    if (before.empty() || after.empty()) {
      return absl::UnimplementedError(absl::StrCat(
          path, ": post_processor template \"single\" must be <special> $A <special> (like [CLS] $A [SEP])"));
    }
    options->cls_token = before;
    options->sep_token = after;
    return absl::OkStatus();
  }
  return absl::UnimplementedError(absl::StrCat(path, ": post_processor type \"", type,
                                               "\" is not supported (BertProcessing, RobertaProcessing, "
                                               "TemplateProcessing)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> WordPieceTokenizer::Create(std::vector<std::string> vocab,
                                                                                const WordPieceOptions& options) {
  if (vocab.empty()) return absl::InvalidArgumentError("WordPiece vocabulary is empty");
  if (options.max_input_chars_per_word < 1) {
    return absl::InvalidArgumentError("WordPiece max_input_chars_per_word must be positive");
  }
  std::unique_ptr<WordPieceTokenizer> t(new WordPieceTokenizer());
  t->options_ = options;
  t->strip_accents_ = options.strip_accents.value_or(options.lowercase);
  t->id_to_piece_ = std::move(vocab);
  t->piece_to_id_.reserve(t->id_to_piece_.size());
  for (size_t i = 0; i < t->id_to_piece_.size(); ++i) {
    t->piece_to_id_[t->id_to_piece_[i]] = static_cast<int64_t>(i);
  }
  struct Special {
    const std::string* token;
    int64_t* id;
    bool required;
  };
  for (const Special& s : {Special{&options.unk_token, &t->unk_id_, true},
                           Special{&options.cls_token, &t->cls_id_, true},
                           Special{&options.sep_token, &t->sep_id_, true},
                           Special{&options.pad_token, &t->pad_id_, false}}) {
    *s.id = t->TokenToId(*s.token);
    if (*s.id < 0 && s.required) {
      return absl::InvalidArgumentError(
          absl::StrCat("WordPiece vocabulary has no special token \"", *s.token, "\""));
    }
  }
  return t;
}

absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> WordPieceTokenizer::FromVocabFile(
    const std::string& path, const WordPieceOptions& options) {
  DS_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::vector<std::string> vocab;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    while (!line.empty() && line.back() == '\r') line.pop_back();
    vocab.push_back(std::move(line));
    pos = nl + 1;
  }
  auto t = Create(std::move(vocab), options);
  if (!t.ok()) return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  return t;
}

absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> WordPieceTokenizer::FromTokenizerJson(const std::string& path) {
  DS_ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonObject(path));
  auto model = j.find("model");
  if (model == j.end() || !model->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " has no \"model\" object"));
  }
  const std::string type = model->value("type", "");
  if (type != "WordPiece") {
    return absl::UnimplementedError(absl::StrCat(path, ": tokenizer model \"", type,
                                                 "\" is not supported (the bert family needs WordPiece)"));
  }
  WordPieceOptions options;
  DS_RETURN_IF_ERROR(ReadToken(*model, "unk_token", path, &options.unk_token));
  auto prefix = model->find("continuing_subword_prefix");
  if (prefix != model->end() && prefix->is_string()) options.continuing_subword_prefix = prefix->get<std::string>();
  auto max_chars = model->find("max_input_chars_per_word");
  if (max_chars != model->end() && max_chars->is_number_integer()) {
    options.max_input_chars_per_word = max_chars->get<int64_t>();
  }
  auto vocab_json = model->find("vocab");
  if (vocab_json == model->end() || !vocab_json->is_object() || vocab_json->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": model.vocab must be a non-empty object"));
  }
  int64_t max_id = -1;
  for (auto it = vocab_json->begin(); it != vocab_json->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() >= kMaxVocabId) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": model.vocab[\"", it.key(), "\"] is not an id in [0, ", kMaxVocabId, ")"));
    }
    max_id = std::max(max_id, it.value().get<int64_t>());
  }
  std::vector<std::string> vocab(static_cast<size_t>(max_id + 1));
  for (auto it = vocab_json->begin(); it != vocab_json->end(); ++it) vocab[it.value().get<int64_t>()] = it.key();

  auto normalizer = j.find("normalizer");
  if (normalizer == j.end() || normalizer->is_null()) {
    options.clean_text = options.tokenize_chinese_chars = options.lowercase = false;
    options.strip_accents = false;
  } else {
    const std::string ntype = normalizer->is_object() ? normalizer->value("type", "") : "";
    if (ntype != "BertNormalizer") {
      return absl::UnimplementedError(
          absl::StrCat(path, ": normalizer \"", ntype, "\" is not supported (only BertNormalizer)"));
    }
    DS_RETURN_IF_ERROR(ReadBool(*normalizer, "clean_text", path, &options.clean_text));
    DS_RETURN_IF_ERROR(ReadBool(*normalizer, "handle_chinese_chars", path, &options.tokenize_chinese_chars));
    DS_RETURN_IF_ERROR(ReadBool(*normalizer, "lowercase", path, &options.lowercase));
    auto strip = normalizer->find("strip_accents");
    if (strip != normalizer->end() && strip->is_boolean()) options.strip_accents = strip->get<bool>();
  }
  auto pre = j.find("pre_tokenizer");
  const std::string ptype =
      (pre != j.end() && pre->is_object()) ? pre->value("type", "") : std::string("(none)");
  if (ptype != "BertPreTokenizer") {
    return absl::UnimplementedError(
        absl::StrCat(path, ": pre_tokenizer \"", ptype, "\" is not supported (only BertPreTokenizer)"));
  }
  auto pp = j.find("post_processor");
  if (pp != j.end()) DS_RETURN_IF_ERROR(SpecialsFromPostProcessor(*pp, path, &options));

  auto t = Create(std::move(vocab), options);
  if (!t.ok()) return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  return t;
}

absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> WordPieceTokenizer::FromDirectory(const std::string& dir) {
  const std::string vocab_path = dir + "/vocab.txt";
  const std::string tokenizer_json_path = dir + "/tokenizer.json";
  if (!FileExists(vocab_path) && FileExists(tokenizer_json_path)) return FromTokenizerJson(tokenizer_json_path);
  if (!FileExists(vocab_path)) {
    return absl::NotFoundError(absl::StrCat(vocab_path, " is missing: the bert family needs a WordPiece vocab.txt ",
                                            "(or a tokenizer.json with a WordPiece model)"));
  }
  WordPieceOptions options;
  const std::string tokenizer_config_path = dir + "/tokenizer_config.json";
  const std::string config_path = dir + "/config.json";
  if (FileExists(tokenizer_config_path)) {
    DS_RETURN_IF_ERROR(OptionsFromTokenizerConfig(tokenizer_config_path, &options));
  } else if (FileExists(config_path)) {
    DS_ASSIGN_OR_RETURN(nlohmann::json config, ReadJsonObject(config_path));
    DS_RETURN_IF_ERROR(ReadBool(config, "do_lower_case", config_path, &options.lowercase));
  }
  return FromVocabFile(vocab_path, options);
}

int64_t WordPieceTokenizer::TokenToId(absl::string_view token) const {
  auto it = piece_to_id_.find(token);
  return it == piece_to_id_.end() ? -1 : it->second;
}

std::string WordPieceTokenizer::IdToPiece(int64_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return id_to_piece_[static_cast<size_t>(id)];
}

absl::Status WordPieceTokenizer::Normalize(absl::string_view text, std::u32string* out) const {
  std::u32string cps;
  DS_RETURN_IF_ERROR(unicode::DecodeUtf8(text, &cps));
  out->clear();
  out->reserve(cps.size() + 8);
  std::u32string stripped;
  bool maybe_reorder = false;
  auto emit = [&](char32_t c) {
    if (strip_accents_) {
      stripped.clear();
      unicode::AppendStripped(c, &stripped);
      for (char32_t d : stripped) {
        if (unicode::NonMarkCombiningClass(d) != 0) maybe_reorder = true;
        if (options_.lowercase) {
          unicode::AppendLower(d, out);
        } else {
          out->push_back(d);
        }
      }
    } else if (options_.lowercase) {
      unicode::AppendLower(c, out);
    } else {
      out->push_back(c);
    }
  };
  for (char32_t c : cps) {
    const CharClass cls = ClassOf(c);
    if (options_.clean_text) {
      if (c == 0 || c == 0xFFFD || cls == CharClass::kControl) continue;
      if (cls == CharClass::kWhitespace) {
        out->push_back(U' ');
        continue;
      }
    }
    if (options_.tokenize_chinese_chars && cls == CharClass::kCjk) {
      out->push_back(U' ');
      emit(c);
      out->push_back(U' ');
      continue;
    }
    emit(c);
  }
  if (maybe_reorder) {
    // Canonical ordering (the last step of NFD) for the few combining characters that survive stripping: a stable
    // sort by combining class within each run of non-starters.
    size_t i = 0;
    while (i < out->size()) {
      if (unicode::NonMarkCombiningClass((*out)[i]) == 0) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < out->size() && unicode::NonMarkCombiningClass((*out)[j]) != 0) ++j;
      std::stable_sort(out->begin() + i, out->begin() + j, [](char32_t a, char32_t b) {
        return unicode::NonMarkCombiningClass(a) < unicode::NonMarkCombiningClass(b);
      });
      i = j;
    }
  }
  return absl::OkStatus();
}

void WordPieceTokenizer::WordPiece(const std::u32string& word, std::vector<int64_t>* ids) const {
  if (static_cast<int64_t>(word.size()) > options_.max_input_chars_per_word) {
    ids->push_back(unk_id_);
    return;
  }
  std::string utf8;
  std::vector<size_t> offsets;  // byte offset of each character, plus the end
  offsets.reserve(word.size() + 1);
  for (char32_t c : word) {
    offsets.push_back(utf8.size());
    unicode::AppendUtf8(c, &utf8);
  }
  offsets.push_back(utf8.size());
  const size_t n = word.size();
  const size_t first = ids->size();
  std::string candidate;
  size_t start = 0;
  while (start < n) {
    size_t end = n;
    int64_t found = -1;
    while (end > start) {
      absl::string_view piece(utf8.data() + offsets[start], offsets[end] - offsets[start]);
      if (start == 0) {
        found = TokenToId(piece);
      } else {
        candidate.assign(options_.continuing_subword_prefix);
        candidate.append(piece.data(), piece.size());
        found = TokenToId(candidate);
      }
      if (found >= 0) break;
      --end;
    }
    if (found < 0) {
      ids->resize(first);
      ids->push_back(unk_id_);
      return;
    }
    ids->push_back(found);
    start = end;
  }
}

absl::StatusOr<std::vector<std::string>> WordPieceTokenizer::BasicTokenize(absl::string_view text) const {
  std::u32string normalized;
  DS_RETURN_IF_ERROR(Normalize(text, &normalized));
  std::vector<std::string> words;
  std::string word;
  auto flush = [&] {
    if (!word.empty()) words.push_back(std::move(word));
    word.clear();
  };
  for (char32_t c : normalized) {
    if (IsSplitSpace(c)) {
      flush();
    } else if (ClassOf(c) == CharClass::kPunctuation) {
      flush();
      unicode::AppendUtf8(c, &word);
      flush();
    } else {
      unicode::AppendUtf8(c, &word);
    }
  }
  flush();
  return words;
}

absl::StatusOr<std::vector<int64_t>> WordPieceTokenizer::Tokenize(absl::string_view text) const {
  std::u32string normalized;
  DS_RETURN_IF_ERROR(Normalize(text, &normalized));
  std::vector<int64_t> ids;
  std::u32string word;
  for (char32_t c : normalized) {
    if (IsSplitSpace(c)) {
      if (!word.empty()) WordPiece(word, &ids);
      word.clear();
    } else if (ClassOf(c) == CharClass::kPunctuation) {
      if (!word.empty()) WordPiece(word, &ids);
      word.assign(1, c);
      WordPiece(word, &ids);
      word.clear();
    } else {
      word.push_back(c);
    }
  }
  if (!word.empty()) WordPiece(word, &ids);
  return ids;
}

absl::StatusOr<std::vector<int64_t>> WordPieceTokenizer::Encode(absl::string_view text) const {
  DS_ASSIGN_OR_RETURN(std::vector<int64_t> ids, Tokenize(text));
  ids.insert(ids.begin(), cls_id_);
  ids.push_back(sep_id_);
  return ids;
}

std::vector<int64_t> WordPieceTokenizer::Truncate(const std::vector<int64_t>& ids, int64_t max_tokens) const {
  if (max_tokens < 0) max_tokens = 0;
  if (static_cast<int64_t>(ids.size()) <= max_tokens) return ids;
  if (max_tokens >= 2 && ids.back() == sep_id_) {
    std::vector<int64_t> out(ids.begin(), ids.begin() + (max_tokens - 1));
    out.push_back(sep_id_);
    return out;
  }
  return std::vector<int64_t>(ids.begin(), ids.begin() + max_tokens);
}

}  // namespace model
}  // namespace deltaserve
