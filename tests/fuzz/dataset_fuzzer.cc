// Fuzz target: the fine-tuning dataset parser (server/tuning/dataset.h), which reads a tenant's upload.
//
// Input layout: byte 0 picks the options, the rest is the file.
//   bits 0-1  format: auto, tsv, csv, jsonl
//   bit 2     no header line (columns are then named "0", "1", ...)
//   bit 3     name the columns explicitly: "text" / "label" with a header, "0" / "1" without
//   bit 4     name a pair column explicitly: "text_pair" with a header, "2" without
//   bit 5     small limits (8 examples, 32-byte texts, 4 KiB files), so that every limit is reached
//   bit 6     regression instead of classification
//   bit 7     pass two given labels ("0", "1") to ResolveLabels
// Reaches: the TSV / CSV (quotes, embedded newlines) / JSONL readers, UTF-8 checks, column resolution, limits;
// then, for a dataset that parses, ResolveLabels, EncodeLabels and SplitDataset. Invariants: every error is
// INVALID_ARGUMENT; a parsed dataset respects the limits and has no empty text; the split keeps every example.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "server/tuning/dataset.h"
#include "tests/fuzz/fuzz_util.h"

namespace deltaserve {
namespace {

using tuning::Dataset;
using tuning::DatasetOptions;

void FuzzOne(absl::string_view input) {
  uint8_t flags = 0;
  if (!input.empty()) {
    flags = static_cast<uint8_t>(input[0]);
    input.remove_prefix(1);
  }
  DatasetOptions options;
  static constexpr tuning::DatasetFormat kFormats[] = {tuning::DatasetFormat::kAuto, tuning::DatasetFormat::kTsv,
                                                       tuning::DatasetFormat::kCsv, tuning::DatasetFormat::kJsonl};
  options.format = kFormats[flags & 3];
  options.header = (flags & 4) == 0;
  if ((flags & 8) != 0) {
    options.text_column = options.header ? "text" : "0";
    options.label_column = options.header ? "label" : "1";
  }
  if ((flags & 16) != 0) options.text_pair_column = options.header ? "text_pair" : "2";
  if ((flags & 32) != 0) {
    options.max_examples = 8;
    options.max_text_bytes = 32;
    options.max_bytes = 4096;
  }
  const tuning::TaskType type =
      (flags & 64) != 0 ? tuning::TaskType::kRegression : tuning::TaskType::kClassification;
  std::vector<std::string> given;
  if ((flags & 128) != 0 && type == tuning::TaskType::kClassification) given = {"0", "1"};

  absl::StatusOr<Dataset> dataset = tuning::ParseDataset(input, options);
  if (!dataset.ok()) {
    FUZZ_CHECK(dataset.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  FUZZ_CHECK(!dataset->examples.empty());
  FUZZ_CHECK(static_cast<int64_t>(dataset->examples.size()) <= options.max_examples);
  for (const tuning::Example& e : dataset->examples) {
    FUZZ_CHECK(!e.text.empty());
    FUZZ_CHECK(static_cast<int64_t>(e.text.size()) <= options.max_text_bytes);
    FUZZ_CHECK(static_cast<int64_t>(e.text_pair.size()) <= options.max_text_bytes);
    FUZZ_CHECK(e.line >= 1);
    FUZZ_CHECK(dataset->has_text_pair || e.text_pair.empty());
  }

  absl::StatusOr<tuning::LabelSpace> space = tuning::ResolveLabels(*dataset, type, given);
  if (space.ok()) {
    absl::StatusOr<tuning::EncodedLabels> labels = tuning::EncodeLabels(*dataset, *space);
    if (labels.ok()) {
      const size_t n = type == tuning::TaskType::kClassification ? labels->classes.size() : labels->values.size();
      FUZZ_CHECK(n == dataset->examples.size());
      for (int64_t c : labels->classes) FUZZ_CHECK(c >= 0 && c < static_cast<int64_t>(space->labels.size()));
    } else {
      FUZZ_CHECK(labels.status().code() == absl::StatusCode::kInvalidArgument);
    }
  } else {
    FUZZ_CHECK(space.status().code() == absl::StatusCode::kInvalidArgument);
  }

  Dataset train, validation;
  const absl::Status split = tuning::SplitDataset(*dataset, 0.25, /*seed=*/flags, &train, &validation);
  if (split.ok()) {
    FUZZ_CHECK(train.examples.size() + validation.examples.size() == dataset->examples.size());
    FUZZ_CHECK(!train.examples.empty() && !validation.examples.empty());
  } else {
    FUZZ_CHECK(split.code() == absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}
