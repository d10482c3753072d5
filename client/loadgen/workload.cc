#include "client/loadgen/workload.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace deltaserve {
namespace loadgen {

const std::vector<std::string>& BuiltinTexts() {
  static const auto* texts = new std::vector<std::string>{
      "hello world",
      "The quick brown fox jumps over the lazy dog.",
      "it 's a charming and often affecting journey .",
      "I love this movie.",
      "This film is wonderful.",
      "The stock market fell sharply today.",
      "a gorgeous , witty , seductive movie .",
      "the story is predictable and the characters are thin .",
      "Delta tuning adapts one frozen model to many tasks by training a small delta.",
      "Requests for different tasks are batched together into one forward pass.",
      "The customer service was slow and nobody answered my emails for a week.",
      "Please reset my password; the link in the last message expired.",
      "an utterly forgettable sequel that runs out of ideas halfway through .",
      "Heavy rain is expected across the north of the country on Tuesday.",
      "What is the capital of Australia?",
      "The new library opens on Monday with extended hours for students.",
  };
  return *texts;
}

absl::StatusOr<std::vector<std::string>> LoadTexts(const std::string& path, int64_t max_texts) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the texts file ", path));
  std::vector<std::string> out;
  std::string line;
  bool first = true;
  while (static_cast<int64_t>(out.size()) < max_texts && std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::string text = line.substr(0, line.find('\t'));
    if (first && (text == "sentence" || text == "text")) {
      first = false;
      continue;
    }
    first = false;
    if (!text.empty()) out.push_back(std::move(text));
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("the texts file ", path, " holds no text"));
  return out;
}

TaskName NameTask(const std::string& prefix, int64_t index, int num_tenants) {
  TaskName name;
  name.task = absl::StrFormat("%stask-%05d", prefix, index);
  if (num_tenants > 0) name.tenant = absl::StrCat(prefix, "tenant-", index % num_tenants);
  return name;
}

}  // namespace loadgen
}  // namespace deltaserve
