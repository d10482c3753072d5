// Training datasets for fine-tuning jobs: parsing TSV / CSV / JSONL bytes into labelled examples, resolving the
// label space, and a deterministic train / validation split.
//
// Everything here is outside input (a tenant's upload): nothing is trusted. Every error is INVALID_ARGUMENT and
// names the 1-based line (and the column where it helps) so that a user can fix the file. No LibTorch.
// Free functions on values: thread-safe.
#ifndef DELTASERVE_SERVER_TUNING_DATASET_H_
#define DELTASERVE_SERVER_TUNING_DATASET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace deltaserve {
namespace tuning {

enum class DatasetFormat {
  kAuto,   // JSONL when the first non-blank byte is '{'; else TSV when the first line has a tab; else CSV
  kTsv,    // tab-separated, one example per line, no quoting
  kCsv,    // RFC 4180: comma-separated, fields may be double-quoted (quotes doubled inside, newlines allowed)
  kJsonl,  // one JSON object per line
};

// "auto", "tsv", "csv", "jsonl" (INVALID_ARGUMENT otherwise).
absl::StatusOr<DatasetFormat> ParseDatasetFormat(absl::string_view name);
const char* DatasetFormatName(DatasetFormat format);

struct DatasetOptions {
  // The file's format.
  DatasetFormat format = DatasetFormat::kAuto;
  // TSV / CSV: whether the first line names the columns. Without a header, columns are named by their 0-based
  // index ("0", "1", ...).
  bool header = true;
  // The column (TSV / CSV header name or index; JSONL key) holding the text. "" = the first of "text",
  // "sentence", "sentence1" that exists.
  std::string text_column;
  // The column of the optional second text (pair tasks such as RTE / MRPC). "" = "text_pair" or "sentence2" when
  // present, else none. A pair column that is named explicitly must exist.
  std::string text_pair_column;
  // The column of the label. "" = "label".
  std::string label_column;
  // Limits: the whole file, one text, the number of examples.
  int64_t max_bytes = 256ll << 20;
  int64_t max_text_bytes = 64 << 10;
  int64_t max_examples = 1000000;
};

// Texts are kept byte for byte as written (SST-2's "phrase \t1" keeps its trailing space: the tokenizers ignore
// it); a text that is empty or all whitespace is an error. Labels lose surrounding whitespace ("1 " is "1").
struct Example {
  std::string text;
  std::string text_pair;  // "" when the dataset has no pair column
  std::string label;      // as written in the file, trimmed (JSONL numbers as their text, e.g. "1" or "0.5";
                          // integral numbers without a fraction: 1.0 is "1")
  int64_t line = 0;       // 1-based line where the example starts, for error messages
};

struct Dataset {
  std::vector<Example> examples;
  bool has_text_pair = false;
};

// Parses `bytes`. INVALID_ARGUMENT naming the line for: bytes that are not UTF-8, a missing column (the message
// lists the columns that exist), a row with the wrong number of fields, an unterminated quote, a JSONL line that
// is not an object or has a non-string text / a label that is neither string nor number, an empty text, a text
// over max_text_bytes; and for an empty dataset (no examples) or one over the limits. Blank lines are skipped.
absl::StatusOr<Dataset> ParseDataset(absl::string_view bytes, const DatasetOptions& options);

enum class TaskType { kClassification, kRegression };

// "classification" / "regression" (INVALID_ARGUMENT otherwise).
absl::StatusOr<TaskType> ParseTaskType(absl::string_view name);
const char* TaskTypeName(TaskType type);

struct LabelSpace {
  TaskType type = TaskType::kClassification;
  std::vector<std::string> labels;  // classification: the classes, in head order
};

// The examples' labels as the trainer needs them: class indices (classification) or values (regression).
struct EncodedLabels {
  std::vector<int64_t> classes;  // classification: index into LabelSpace::labels, one per example
  std::vector<float> values;     // regression: the finite value, one per example
};

// Classification: `given` labels (when non-empty; duplicates or empty labels are INVALID_ARGUMENT) or the
// distinct labels of `dataset`, sorted (numerically when all are integers, e.g. "0" < "1" < "10"); at least 2.
// Regression: no labels (`given` must be empty). REQUIRES: dataset is non-empty.
absl::StatusOr<LabelSpace> ResolveLabels(const Dataset& dataset, TaskType type,
                                         const std::vector<std::string>& given);

// INVALID_ARGUMENT naming the line and the label for a label outside `space` (listing up to 10 known labels) or,
// for regression, a label that is not a finite number.
absl::StatusOr<EncodedLabels> EncodeLabels(const Dataset& dataset, const LabelSpace& space);

// Splits `all` deterministically (same inputs and seed, same split): a `validation_fraction` of the examples,
// stratified by label for classification (every class with >= 2 examples keeps at least one in each side), goes
// to `validation`, the rest to `train` (both in a seeded shuffled order). INVALID_ARGUMENT when the fraction is
// not in (0, 1) or either side would be empty. Strata are the label strings, whatever the task: with regression's
// mostly distinct values this is a plain random split. The order is fixed across platforms (no std::shuffle).
// `all` may be the same object as `train` or `validation`.
absl::Status SplitDataset(const Dataset& all, double validation_fraction, uint64_t seed, Dataset* train,
                          Dataset* validation);

}  // namespace tuning
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_TUNING_DATASET_H_
