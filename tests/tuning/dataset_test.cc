// Tests for server/tuning/dataset.h: TSV / CSV / JSONL parsing, the errors a user sees for a malformed upload,
// label resolution and encoding, the deterministic stratified split, and the real GLUE / AG News files in
// ../shared/data when they are present.
#include "server/tuning/dataset.h"

#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace tuning {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// ../shared/data next to the source tree (DS_SOURCE_DIR may be overridden by the environment), else
// /work/shared/data; "" when neither exists.
std::string SharedDataDir() {
  auto exists = [](const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
  };
  const char* env = std::getenv("DS_SOURCE_DIR");
  const std::string source = env != nullptr ? env : DS_SOURCE_DIR;
  for (const std::string& dir : {source + "/../shared/data", std::string("/work/shared/data")}) {
    if (exists(dir)) return dir;
  }
  return "";
}

// The bytes of `path`; "" when it cannot be read.
std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

DatasetOptions Options(DatasetFormat format) {
  DatasetOptions options;
  options.format = format;
  return options;
}

// The error message of parsing `bytes` (fails the test when parsing succeeds or fails with another code).
std::string ParseError(const std::string& bytes, const DatasetOptions& options) {
  absl::StatusOr<Dataset> dataset = ParseDataset(bytes, options);
  EXPECT_FALSE(dataset.ok()) << "parsed " << (dataset.ok() ? dataset->examples.size() : 0) << " examples";
  if (dataset.ok()) return "";
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument) << dataset.status();
  return std::string(dataset.status().message());
}

std::vector<std::string> Labels(const Dataset& dataset) {
  std::vector<std::string> labels;
  for (const Example& e : dataset.examples) labels.push_back(e.label);
  return labels;
}

std::vector<std::string> Texts(const Dataset& dataset) {
  std::vector<std::string> texts;
  for (const Example& e : dataset.examples) texts.push_back(e.text);
  return texts;
}

// ---------------------------------------------------------------------------------------------------------------
// Names.

TEST(DatasetTest, ParseDatasetFormatAcceptsKnownNamesAndRejectsOthers) {
  for (DatasetFormat format : {DatasetFormat::kAuto, DatasetFormat::kTsv, DatasetFormat::kCsv, DatasetFormat::kJsonl}) {
    absl::StatusOr<DatasetFormat> parsed = ParseDatasetFormat(DatasetFormatName(format));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, format);
  }
  EXPECT_EQ(*ParseDatasetFormat("TSV"), DatasetFormat::kTsv);
  absl::StatusOr<DatasetFormat> bad = ParseDatasetFormat("xml");
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("auto, tsv, csv, jsonl"));
}

TEST(DatasetTest, ParseTaskTypeAcceptsKnownNamesAndRejectsOthers) {
  EXPECT_EQ(*ParseTaskType(TaskTypeName(TaskType::kClassification)), TaskType::kClassification);
  EXPECT_EQ(*ParseTaskType(TaskTypeName(TaskType::kRegression)), TaskType::kRegression);
  EXPECT_EQ(ParseTaskType("ranking").status().code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------------------------
// TSV.

TEST(DatasetTest, TsvWithHeaderReadsTextLabelAndLines) {
  absl::StatusOr<Dataset> d =
      ParseDataset("sentence\tlabel\ngood film\t1\n\nbad film\t0\n", Options(DatasetFormat::kTsv));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_FALSE(d->has_text_pair);
  ASSERT_EQ(d->examples.size(), 2u);
  EXPECT_EQ(d->examples[0].text, "good film");
  EXPECT_EQ(d->examples[0].label, "1");
  EXPECT_EQ(d->examples[0].text_pair, "");
  EXPECT_EQ(d->examples[0].line, 2);
  EXPECT_EQ(d->examples[1].text, "bad film");
  EXPECT_EQ(d->examples[1].line, 4);  // the blank line 3 is skipped but counted
}

TEST(DatasetTest, TsvKeepsTextWhitespaceAndTrimsLabels) {
  // SST-2 writes "phrase \t1": the text keeps its trailing space, the label loses its stray spaces.
  absl::StatusOr<Dataset> d = ParseDataset("sentence\tlabel\nthe camera \t1 \n", Options(DatasetFormat::kTsv));
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ(d->examples.size(), 1u);
  EXPECT_EQ(d->examples[0].text, "the camera ");
  EXPECT_EQ(d->examples[0].label, "1");
}

TEST(DatasetTest, TsvHandlesCrlfBomAndTrailingBlankLines) {
  absl::StatusOr<Dataset> d =
      ParseDataset("\xEF\xBB\xBFtext\tlabel\r\nyes\tpos\r\nno\tneg\r\n\r\n\n  \n", Options(DatasetFormat::kAuto));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(Texts(*d), ElementsAre("yes", "no"));
  EXPECT_THAT(Labels(*d), ElementsAre("pos", "neg"));
}

TEST(DatasetTest, TsvWithoutHeaderNamesColumnsByIndex) {
  DatasetOptions options = Options(DatasetFormat::kTsv);
  options.header = false;
  options.text_column = "1";
  options.label_column = "0";
  absl::StatusOr<Dataset> d = ParseDataset("World\tpeace talks\nSports\tcup final\n", options);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(Texts(*d), ElementsAre("peace talks", "cup final"));
  EXPECT_THAT(Labels(*d), ElementsAre("World", "Sports"));
  EXPECT_EQ(d->examples[0].line, 1);

  options.text_column = "";
  EXPECT_THAT(ParseError("World\tpeace talks\n", options),
              HasSubstr("line 1: no text column: none of \"text\", \"sentence\", \"sentence1\" exists; columns are: "
                        "0, 1 (without a header, columns are named by their 0-based index) (set text_column)"));
}

TEST(DatasetTest, TsvFindsSentencePairColumnsByDefault) {
  absl::StatusOr<Dataset> d = ParseDataset(
      "idx\tsentence1\tsentence2\tlabel\n0\tA man runs.\tA person moves.\tentailment\n", Options(DatasetFormat::kTsv));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->has_text_pair);
  ASSERT_EQ(d->examples.size(), 1u);
  EXPECT_EQ(d->examples[0].text, "A man runs.");
  EXPECT_EQ(d->examples[0].text_pair, "A person moves.");
  EXPECT_EQ(d->examples[0].label, "entailment");
}

TEST(DatasetTest, MissingColumnErrorListsTheColumns) {
  DatasetOptions options = Options(DatasetFormat::kTsv);
  options.text_column = "text";
  EXPECT_EQ(ParseError("sentence\tlabel\nhi\t1\n", options),
            "line 1: no column \"text\"; columns are: sentence, label (set text_column)");
  options = Options(DatasetFormat::kTsv);
  EXPECT_EQ(ParseError("sentence\tclass\nhi\t1\n", options),
            "line 1: no column \"label\"; columns are: sentence, class (set label_column)");
  options.label_column = "class";
  options.text_pair_column = "hypothesis";
  EXPECT_THAT(ParseError("sentence\tclass\nhi\t1\n", options),
              HasSubstr("line 1: no column \"hypothesis\"; columns are: sentence, class (set text_pair_column"));
}

TEST(DatasetTest, TextAndLabelMustBeDifferentColumns) {
  DatasetOptions options = Options(DatasetFormat::kTsv);
  options.text_column = "label";
  EXPECT_THAT(ParseError("sentence\tlabel\nhi\t1\n", options), HasSubstr("line 1: the text and the label"));
}

TEST(DatasetTest, DuplicateHeaderColumnIsAnError) {
  EXPECT_THAT(ParseError("text\tlabel\tlabel\nhi\t1\t2\n", Options(DatasetFormat::kTsv)),
              HasSubstr("line 1: column \"label\" appears more than once"));
}

TEST(DatasetTest, TsvWrongFieldCountNamesTheLine) {
  const std::string message = ParseError("sentence\tlabel\nfine\t1\nhas\ta tab\t0\n", Options(DatasetFormat::kTsv));
  EXPECT_THAT(message, HasSubstr("line 3: 3 fields, expected 2 (columns: sentence, label)"));
  EXPECT_THAT(message, HasSubstr("tab"));
  EXPECT_THAT(ParseError("sentence\tlabel\nfine\t1\nno label\n", Options(DatasetFormat::kTsv)),
              HasSubstr("line 3: 1 field, expected 2"));
}

TEST(DatasetTest, AutoDetectsTheFormat) {
  DatasetOptions options;  // kAuto
  absl::StatusOr<Dataset> jsonl =
      ParseDataset("\n  {\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 0}", options);
  ASSERT_TRUE(jsonl.ok()) << jsonl.status();
  EXPECT_THAT(Labels(*jsonl), ElementsAre("1", "0"));
  absl::StatusOr<Dataset> tsv = ParseDataset("text\tlabel\na, b\t1\n", options);
  ASSERT_TRUE(tsv.ok()) << tsv.status();
  EXPECT_THAT(Texts(*tsv), ElementsAre("a, b"));
  absl::StatusOr<Dataset> csv = ParseDataset("text,label\n\"a\tb\",1\n", options);
  ASSERT_TRUE(csv.ok()) << csv.status();
  EXPECT_THAT(Texts(*csv), ElementsAre("a\tb"));
}

// ---------------------------------------------------------------------------------------------------------------
// CSV.

TEST(DatasetTest, CsvQuotedFieldsKeepCommasNewlinesAndDoubledQuotes) {
  const std::string csv =
      "text,label\n"
      "plain,0\n"
      "\"a, b\",1\n"
      "\"spans\ntwo lines\",0\n"
      "\"she said \"\"hi\"\"\",1\n"
      "5'11\" tall,1\n"  // a quote inside an unquoted field is a literal character
      "last,\"0\"";      // no final newline
  absl::StatusOr<Dataset> d = ParseDataset(csv, Options(DatasetFormat::kCsv));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(Texts(*d), ElementsAre("plain", "a, b", "spans\ntwo lines", "she said \"hi\"", "5'11\" tall", "last"));
  EXPECT_THAT(Labels(*d), ElementsAre("0", "1", "0", "1", "1", "0"));
  std::vector<int64_t> lines;
  for (const Example& e : d->examples) lines.push_back(e.line);
  EXPECT_THAT(lines, ElementsAre(2, 3, 4, 6, 7, 8));  // the record on line 4 spans two lines
}

TEST(DatasetTest, CsvHandlesCrlfAndBom) {
  absl::StatusOr<Dataset> d =
      ParseDataset("\xEF\xBB\xBFtext,label\r\n\"multi\r\nline\",1\r\nb,0\r\n\r\n", Options(DatasetFormat::kCsv));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(Texts(*d), ElementsAre("multi\r\nline", "b"));
  EXPECT_THAT(Labels(*d), ElementsAre("1", "0"));
  EXPECT_EQ(d->examples[1].line, 4);
}

TEST(DatasetTest, CsvUnterminatedQuoteNamesTheLineItOpensOn) {
  EXPECT_THAT(ParseError("text,label\nfine,1\n\"never closes,0\nmore,1\n", Options(DatasetFormat::kCsv)),
              HasSubstr("line 3: unterminated quote"));
}

TEST(DatasetTest, CsvTextAfterClosingQuoteIsAnError) {
  EXPECT_THAT(ParseError("text,label\n\"quoted\" tail,1\n", Options(DatasetFormat::kCsv)),
              HasSubstr("line 2: unexpected \" \" after the closing quote of field 1"));
}

TEST(DatasetTest, CsvWrongFieldCountNamesTheLine) {
  EXPECT_THAT(ParseError("text,label\na,1\nb, c,0\n", Options(DatasetFormat::kCsv)),
              HasSubstr("line 3: 3 fields, expected 2 (columns: text, label); quote a field"));
}

// ---------------------------------------------------------------------------------------------------------------
// JSONL.

TEST(DatasetTest, JsonlReadsStringAndNumberLabels) {
  const std::string jsonl =
      "{\"text\": \"a\", \"label\": \"pos\"}\n"
      "{\"text\": \"b\", \"label\": 1}\n"
      "{\"text\": \"c\", \"label\": 0.5}\n"
      "{\"text\": \"d\", \"label\": 1.0}\n"
      "{\"text\": \"e\", \"label\": -3}\n"
      "{\"text\": \"f\", \"label\": 2.5e-1, \"extra\": [1, 2]}\r\n"
      "\n";
  absl::StatusOr<Dataset> d = ParseDataset(jsonl, Options(DatasetFormat::kJsonl));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(Labels(*d), ElementsAre("pos", "1", "0.5", "1", "-3", "0.25"));
  EXPECT_EQ(d->examples[5].line, 6);
}

TEST(DatasetTest, JsonlReadsPairKeys) {
  absl::StatusOr<Dataset> d =
      ParseDataset("{\"text\": \"q\", \"text_pair\": \"a\", \"label\": \"yes\"}\n", Options(DatasetFormat::kJsonl));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->has_text_pair);
  EXPECT_EQ(d->examples[0].text_pair, "a");
  EXPECT_THAT(
      ParseError("{\"text\": \"q\", \"text_pair\": \"a\", \"label\": \"yes\"}\n{\"text\": \"q\", \"label\": \"no\"}\n",
                 Options(DatasetFormat::kJsonl)),
      HasSubstr("line 2: no key \"text_pair\"; keys are: label, text"));
}

TEST(DatasetTest, JsonlRejectsLabelsThatAreNotStringsOrNumbers) {
  for (const std::string& label : {"true", "null", "[1]", "{\"a\": 1}"}) {
    const std::string jsonl =
        absl::StrCat("{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": ", label, "}\n");
    EXPECT_THAT(ParseError(jsonl, Options(DatasetFormat::kJsonl)),
                HasSubstr("line 2: label (key \"label\") must be a string or a number, got "))
        << label;
  }
}

TEST(DatasetTest, JsonlRejectsBadLinesNamingThem) {
  const DatasetOptions options = Options(DatasetFormat::kJsonl);
  EXPECT_THAT(ParseError("{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": }\n", options),
              HasSubstr("line 2: not valid JSON at column"));
  EXPECT_THAT(ParseError("{\"text\": \"a\", \"label\": 1}\n[\"b\", 1]\n", options),
              HasSubstr("line 2: expected a JSON object"));
  EXPECT_THAT(ParseError("{\"text\": 5, \"label\": 1}\n", options),
              HasSubstr("line 1: text (key \"text\") must be a string, got number"));
  EXPECT_THAT(ParseError("{\"text\": \"a\", \"label\": 1}\n{\"txt\": \"b\", \"label\": 1}\n", options),
              HasSubstr("line 2: no key \"text\"; keys are: label, txt"));
  EXPECT_THAT(
      ParseError("{\"body\": \"a\", \"label\": 1}\n", options),
      HasSubstr("line 1: no text key: none of \"text\", \"sentence\", \"sentence1\" exists; keys are: body, label"));
}

// ---------------------------------------------------------------------------------------------------------------
// Malformed or oversized input.

TEST(DatasetTest, InvalidUtf8NamesTheLine) {
  const std::vector<std::string> bad = {
      "\xFF",              // cannot start a character
      "\xC3",              // truncated (followed by a tab)
      "\xC0\x80",          // overlong NUL
      "\xED\xA0\x80",      // a surrogate
      "\xF4\x90\x80\x80",  // above U+10FFFF
      "\x80",              // stray continuation byte
  };
  for (const std::string& bytes : bad) {
    const std::string tsv = absl::StrCat("text\tlabel\nok caf\xC3\xA9\t1\nbad ", bytes, "\t0\n");
    EXPECT_THAT(ParseError(tsv, Options(DatasetFormat::kTsv)), HasSubstr("line 3: not valid UTF-8 at byte 5"))
        << absl::CEscape(bytes);
  }
  EXPECT_THAT(ParseError("text,label\n\"a\nb \xFE\",1\n", Options(DatasetFormat::kCsv)),
              HasSubstr("line 3: not valid UTF-8"));
}

TEST(DatasetTest, EmptyTextOrLabelIsAnError) {
  EXPECT_EQ(ParseError("sentence\tlabel\nfine\t1\n\t0\n", Options(DatasetFormat::kTsv)),
            "line 3: empty text (column \"sentence\")");
  EXPECT_THAT(ParseError("sentence\tlabel\n   \t0\n", Options(DatasetFormat::kTsv)), HasSubstr("line 2: empty text"));
  EXPECT_THAT(ParseError("sentence\tlabel\nfine\t \n", Options(DatasetFormat::kTsv)),
              HasSubstr("line 2: empty label (column \"label\")"));
  EXPECT_THAT(ParseError("text,label\n\"\",1\n", Options(DatasetFormat::kCsv)), HasSubstr("line 2: empty text"));
  EXPECT_THAT(ParseError("{\"text\": \"\", \"label\": 1}\n", Options(DatasetFormat::kJsonl)),
              HasSubstr("line 1: empty text"));
  EXPECT_THAT(ParseError("sentence1\tsentence2\tlabel\na\t\t1\n", Options(DatasetFormat::kTsv)),
              HasSubstr("line 2: empty text pair (column \"sentence2\")"));
}

TEST(DatasetTest, OversizedTextIsAnError) {
  DatasetOptions options = Options(DatasetFormat::kTsv);
  options.max_text_bytes = 10;
  EXPECT_TRUE(ParseDataset("text\tlabel\n0123456789\t1\n", options).ok());
  EXPECT_EQ(ParseError("text\tlabel\n0123456789\t1\n01234567890\t1\n", options),
            "line 3: text (column \"text\") is 11 bytes, over the limit of 10 (max_text_bytes)");
}

TEST(DatasetTest, EmptyDatasetIsAnError) {
  EXPECT_THAT(ParseError("", DatasetOptions()), HasSubstr("no examples (the file is empty or blank"));
  EXPECT_THAT(ParseError("\n \r\n", DatasetOptions()), HasSubstr("no examples"));
  EXPECT_THAT(ParseError("\xEF\xBB\xBFtext\tlabel\n\n", DatasetOptions()),
              HasSubstr("no examples (only a header line"));
  EXPECT_THAT(ParseError("text,label\n", Options(DatasetFormat::kCsv)), HasSubstr("no examples"));
}

TEST(DatasetTest, TooManyExamplesIsAnError) {
  DatasetOptions options = Options(DatasetFormat::kTsv);
  options.max_examples = 2;
  EXPECT_TRUE(ParseDataset("text\tlabel\na\t1\nb\t0\n", options).ok());
  EXPECT_EQ(ParseError("text\tlabel\na\t1\nb\t0\nc\t1\n", options),
            "line 4: the dataset has more than 2 examples (max_examples)");
}

TEST(DatasetTest, FileOverMaxBytesIsAnError) {
  DatasetOptions options = Options(DatasetFormat::kTsv);
  const std::string tsv = "text\tlabel\na\t1\nb\t0\n";
  options.max_bytes = static_cast<int64_t>(tsv.size());
  EXPECT_TRUE(ParseDataset(tsv, options).ok());
  options.max_bytes -= 1;
  EXPECT_EQ(ParseError(tsv, options), absl::StrCat("the dataset is ", tsv.size(), " bytes, over the limit of ",
                                                   tsv.size() - 1, " bytes (max_bytes)"));
}

// ---------------------------------------------------------------------------------------------------------------
// Labels.

Dataset WithLabels(const std::vector<std::string>& labels) {
  Dataset d;
  for (size_t i = 0; i < labels.size(); ++i) {
    d.examples.push_back(Example{absl::StrCat("text ", i), "", labels[i], static_cast<int64_t>(i + 2)});
  }
  return d;
}

TEST(DatasetTest, ResolveLabelsSortsIntegerLabelsNumerically) {
  absl::StatusOr<LabelSpace> space =
      ResolveLabels(WithLabels({"10", "2", "1", "2", "-1"}), TaskType::kClassification, {});
  ASSERT_TRUE(space.ok()) << space.status();
  EXPECT_EQ(space->type, TaskType::kClassification);
  EXPECT_THAT(space->labels, ElementsAre("-1", "1", "2", "10"));
}

TEST(DatasetTest, ResolveLabelsSortsOtherLabelsLexicographically) {
  absl::StatusOr<LabelSpace> space =
      ResolveLabels(WithLabels({"pos", "neg", "10", "neutral", "2"}), TaskType::kClassification, {});
  ASSERT_TRUE(space.ok()) << space.status();
  EXPECT_THAT(space->labels, ElementsAre("10", "2", "neg", "neutral", "pos"));
}

TEST(DatasetTest, ResolveLabelsKeepsTheGivenOrderAndChecksIt) {
  const Dataset d = WithLabels({"pos", "neg"});
  absl::StatusOr<LabelSpace> space = ResolveLabels(d, TaskType::kClassification, {"pos", "neg", "neutral"});
  ASSERT_TRUE(space.ok()) << space.status();
  EXPECT_THAT(space->labels, ElementsAre("pos", "neg", "neutral"));

  absl::StatusOr<LabelSpace> duplicate = ResolveLabels(d, TaskType::kClassification, {"pos", "neg", "pos"});
  ASSERT_EQ(duplicate.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(duplicate.status().message()), HasSubstr("\"pos\" is given twice"));
  absl::StatusOr<LabelSpace> empty = ResolveLabels(d, TaskType::kClassification, {"pos", ""});
  ASSERT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("empty"));
  EXPECT_EQ(ResolveLabels(d, TaskType::kClassification, {"pos"}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DatasetTest, ResolveLabelsNeedsTwoClasses) {
  absl::StatusOr<LabelSpace> space = ResolveLabels(WithLabels({"pos", "pos"}), TaskType::kClassification, {});
  ASSERT_EQ(space.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(space.status().message()), HasSubstr("needs at least 2 labels, found 1: \"pos\""));
}

TEST(DatasetTest, RegressionHasNoLabelSpace) {
  absl::StatusOr<LabelSpace> space = ResolveLabels(WithLabels({"0.5", "3.8"}), TaskType::kRegression, {});
  ASSERT_TRUE(space.ok()) << space.status();
  EXPECT_EQ(space->type, TaskType::kRegression);
  EXPECT_TRUE(space->labels.empty());
  EXPECT_EQ(ResolveLabels(WithLabels({"0.5"}), TaskType::kRegression, {"a", "b"}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DatasetTest, EncodeLabelsUsesTheHeadOrder) {
  const Dataset d = WithLabels({"neg", "pos", "pos", "neutral"});
  LabelSpace space;
  space.labels = {"pos", "neutral", "neg"};
  absl::StatusOr<EncodedLabels> encoded = EncodeLabels(d, space);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_THAT(encoded->classes, ElementsAre(2, 0, 0, 1));
  EXPECT_TRUE(encoded->values.empty());
}

TEST(DatasetTest, EncodeLabelsNamesTheLineOfAnUnknownLabel) {
  const Dataset d = WithLabels({"neg", "pos", "meh"});
  LabelSpace space;
  space.labels = {"neg", "pos"};
  absl::StatusOr<EncodedLabels> encoded = EncodeLabels(d, space);
  ASSERT_EQ(encoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded.status().message(), "line 4: unknown label \"meh\"; the labels are: \"neg\", \"pos\"");

  LabelSpace many;
  for (int i = 0; i < 20; ++i) many.labels.push_back(absl::StrCat("c", i));
  encoded = EncodeLabels(d, many);
  ASSERT_EQ(encoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(encoded.status().message()), HasSubstr("\"c9\", ... (20 in all)"));
}

TEST(DatasetTest, EncodeRegressionLabelsNeedsFiniteNumbers) {
  LabelSpace space;
  space.type = TaskType::kRegression;
  absl::StatusOr<EncodedLabels> encoded = EncodeLabels(WithLabels({"0.5", "3", "-1e-3"}), space);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_THAT(encoded->values, ElementsAre(0.5f, 3.0f, -1e-3f));
  for (const std::string& bad : {"abc", "nan", "inf", "1e300", "1,5"}) {
    encoded = EncodeLabels(WithLabels({"1", bad}), space);
    ASSERT_EQ(encoded.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(encoded.status().message()),
                HasSubstr("line 3: label \"" + bad + "\" is not a finite number"));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Split.

// `counts[label]` examples of each label, interleaved.
Dataset Classes(const std::map<std::string, int>& counts) {
  std::vector<std::string> labels;
  std::map<std::string, int> left = counts;
  for (bool more = true; more;) {
    more = false;
    for (auto& [label, n] : left) {
      if (n > 0) {
        labels.push_back(label);
        --n;
        more = true;
      }
    }
  }
  return WithLabels(labels);
}

std::vector<std::string> TextsOf(const Dataset& d) { return Texts(d); }

TEST(DatasetTest, SplitIsDeterministicForASeed) {
  const Dataset all = Classes({{"a", 40}, {"b", 25}, {"c", 7}});
  Dataset train1, validation1, train2, validation2;
  ASSERT_TRUE(SplitDataset(all, 0.2, 42, &train1, &validation1).ok());
  ASSERT_TRUE(SplitDataset(all, 0.2, 42, &train2, &validation2).ok());
  EXPECT_EQ(TextsOf(train1), TextsOf(train2));
  EXPECT_EQ(TextsOf(validation1), TextsOf(validation2));
}

TEST(DatasetTest, SplitDependsOnTheSeed) {
  const Dataset all = Classes({{"a", 40}, {"b", 25}, {"c", 7}});
  Dataset train1, validation1, train2, validation2;
  ASSERT_TRUE(SplitDataset(all, 0.2, 1, &train1, &validation1).ok());
  ASSERT_TRUE(SplitDataset(all, 0.2, 2, &train2, &validation2).ok());
  const std::vector<std::string> t1 = TextsOf(validation1), t2 = TextsOf(validation2);
  EXPECT_NE(std::set<std::string>(t1.begin(), t1.end()), std::set<std::string>(t2.begin(), t2.end()));
  EXPECT_NE(TextsOf(train1), TextsOf(train2));
}

TEST(DatasetTest, SplitIsStratifiedAndKeepsEveryExampleOnce) {
  const std::map<std::string, int> counts = {{"a", 97}, {"b", 31}, {"c", 5}, {"d", 2}, {"e", 1}};
  const Dataset all = Classes(counts);
  for (double fraction : {0.05, 0.1, 0.2, 0.5, 0.9}) {
    for (uint64_t seed : {0u, 7u, 12345u}) {
      Dataset train, validation;
      ASSERT_TRUE(SplitDataset(all, fraction, seed, &train, &validation).ok()) << fraction;
      std::map<std::string, int> in_train, in_validation;
      for (const Example& e : train.examples) ++in_train[e.label];
      for (const Example& e : validation.examples) ++in_validation[e.label];
      for (const auto& [label, n] : counts) {
        EXPECT_EQ(in_train[label] + in_validation[label], n) << label;
        EXPECT_LE(std::abs(in_validation[label] - n * fraction), 1.0) << label << " fraction " << fraction;
        if (n >= 2) {
          EXPECT_GE(in_train[label], 1) << label << " fraction " << fraction;
          EXPECT_GE(in_validation[label], 1) << label << " fraction " << fraction;
        }
      }
      std::vector<std::string> texts = TextsOf(train);
      const std::vector<std::string> v = TextsOf(validation);
      texts.insert(texts.end(), v.begin(), v.end());
      EXPECT_EQ(std::set<std::string>(texts.begin(), texts.end()).size(), all.examples.size());
      EXPECT_EQ(texts.size(), all.examples.size());
    }
  }
}

TEST(DatasetTest, SplitOfDistinctRegressionValuesTakesTheFraction) {
  std::vector<std::string> labels;
  for (int i = 0; i < 1000; ++i) labels.push_back(absl::StrCat(i * 0.005));
  Dataset all = WithLabels(labels);
  all.has_text_pair = true;
  Dataset train, validation;
  ASSERT_TRUE(SplitDataset(all, 0.1, 3, &train, &validation).ok());
  EXPECT_EQ(validation.examples.size(), 100u);
  EXPECT_EQ(train.examples.size(), 900u);
  EXPECT_TRUE(train.has_text_pair);
  EXPECT_TRUE(validation.has_text_pair);
}

TEST(DatasetTest, SplitRejectsBadFractionsAndEmptySides) {
  const Dataset all = WithLabels({"0", "1", "0", "1"});
  Dataset train, validation;
  for (double bad : {0.0, 1.0, -0.5, 1.5, std::nan("")}) {
    EXPECT_EQ(SplitDataset(all, bad, 1, &train, &validation).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(SplitDataset(WithLabels({"0"}), 0.5, 1, &train, &validation).code(), absl::StatusCode::kInvalidArgument);
  // 40 distinct values, 1%: round(0.4) = 0 examples for validation.
  std::vector<std::string> labels;
  for (int i = 0; i < 40; ++i) labels.push_back(absl::StrCat(i));
  const absl::Status status = SplitDataset(WithLabels(labels), 0.01, 1, &train, &validation);
  ASSERT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("leaves the validation set empty"));
}

TEST(DatasetTest, SplitMayOverwriteItsInput) {
  Dataset data = Classes({{"a", 10}, {"b", 10}});
  Dataset validation;
  ASSERT_TRUE(SplitDataset(data, 0.3, 9, &data, &validation).ok());
  EXPECT_EQ(data.examples.size(), 14u);
  EXPECT_EQ(validation.examples.size(), 6u);
}

// ---------------------------------------------------------------------------------------------------------------
// Real data (skipped when ../shared/data is absent).

std::string SharedFile(const std::string& relative) {
  const std::string dir = SharedDataDir();
  return dir.empty() ? "" : ReadFileOrEmpty(dir + "/" + relative);
}

std::map<std::string, int> LabelCounts(const Dataset& d) {
  std::map<std::string, int> counts;
  for (const Example& e : d.examples) ++counts[e.label];
  return counts;
}

TEST(DatasetRealDataTest, ParsesSst2TrainPart2) {
  const std::string bytes = SharedFile("glue-sst2/train_part2.tsv");
  if (bytes.empty()) GTEST_SKIP() << "no shared data (glue-sst2/train_part2.tsv)";
  absl::StatusOr<Dataset> d = ParseDataset(bytes, DatasetOptions());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->examples.size(), 6735u);
  EXPECT_FALSE(d->has_text_pair);
  EXPECT_EQ(d->examples[0].text, "the expressive power of the camera ");
  EXPECT_EQ(LabelCounts(*d), (std::map<std::string, int>{{"0", 2994}, {"1", 3741}}));
  absl::StatusOr<LabelSpace> space = ResolveLabels(*d, TaskType::kClassification, {});
  ASSERT_TRUE(space.ok()) << space.status();
  EXPECT_THAT(space->labels, ElementsAre("0", "1"));
  ASSERT_TRUE(EncodeLabels(*d, *space).ok());
}

TEST(DatasetRealDataTest, ParsesAgNewsWithoutHeader) {
  const std::string bytes = SharedFile("agnews/train_subset.tsv");
  if (bytes.empty()) GTEST_SKIP() << "no shared data (agnews/train_subset.tsv)";
  DatasetOptions options;
  options.header = false;
  options.text_column = "0";
  options.label_column = "1";
  absl::StatusOr<Dataset> d = ParseDataset(bytes, options);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->examples.size(), 10001u);
  EXPECT_EQ(d->examples[0].line, 1);
  EXPECT_EQ(LabelCounts(*d),
            (std::map<std::string, int>{{"Business", 2496}, {"Sci/Tech", 2538}, {"Sports", 2458}, {"World", 2509}}));
  absl::StatusOr<LabelSpace> space = ResolveLabels(*d, TaskType::kClassification, {});
  ASSERT_TRUE(space.ok()) << space.status();
  EXPECT_THAT(space->labels, ElementsAre("Business", "Sci/Tech", "Sports", "World"));
  Dataset train, validation;
  ASSERT_TRUE(SplitDataset(*d, 0.1, 1, &train, &validation).ok());
  EXPECT_EQ(validation.examples.size(), 1000u);
}

TEST(DatasetRealDataTest, ParsesMrpcWithBomAndPairColumns) {
  const std::string bytes = SharedFile("glue-mrpc/train.tsv");
  if (bytes.empty()) GTEST_SKIP() << "no shared data (glue-mrpc/train.tsv)";
  ASSERT_EQ(bytes.substr(0, 3), "\xEF\xBB\xBF");
  DatasetOptions options;
  options.text_column = "#1 String";
  options.text_pair_column = "#2 String";
  options.label_column = "Quality";
  absl::StatusOr<Dataset> d = ParseDataset(bytes, options);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->has_text_pair);
  EXPECT_EQ(d->examples.size(), 3668u);
  EXPECT_EQ(d->examples[0].text.substr(0, 16), "Amrozi accused h");
  EXPECT_EQ(d->examples[0].text_pair.substr(0, 22), "Referring to him as on");
  EXPECT_EQ(LabelCounts(*d), (std::map<std::string, int>{{"0", 1194}, {"1", 2474}}));
}

TEST(DatasetRealDataTest, ParsesFullSst2Quickly) {
  const std::string bytes = SharedFile("glue-sst2/train.tsv");
  if (bytes.empty()) GTEST_SKIP() << "no shared data (glue-sst2/train.tsv)";
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<Dataset> d = ParseDataset(bytes, DatasetOptions());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->examples.size(), 60614u);
  EXPECT_EQ(LabelCounts(*d), (std::map<std::string, int>{{"0", 26786}, {"1", 33828}}));
  std::cout << "parsed " << bytes.size() << " bytes in " << seconds << " s\n";
#ifdef NDEBUG
  EXPECT_LT(seconds, 1.0);
#endif
}

}  // namespace
}  // namespace tuning
}  // namespace deltaserve
