#include "server/model/model_loader.h"

#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/model/bert/bert_model.h"
#include "server/model/use_lite/use_lite_model.h"

namespace deltaserve {
namespace model {
namespace {

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir, const ModelOptions& options) {
  if (dir.empty()) return absl::InvalidArgumentError("no model directory given");
  if (!IsDirectory(dir)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir, " does not exist or is not a directory"));
  }
  const std::string config_path = dir + "/config.json";
  absl::StatusOr<nlohmann::json> parsed = ReadJsonObject(config_path);
  if (absl::IsNotFound(parsed.status())) {
    return absl::NotFoundError(absl::StrCat(config_path, " is missing: a model directory needs config.json, ",
                                            "model.safetensors and tokenizer files (see docs/MODELS.md)"));
  }
  if (!parsed.ok()) return parsed.status();
  const nlohmann::json config = *std::move(parsed);
  auto it = config.find("model_type");
  if (it == config.end() || !it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, " has no string \"model_type\""));
  }
  const std::string type = it->get<std::string>();
  if (type == "use-lite") return LoadUseLiteModel(dir, options);
  if (type == "bert" || type == "roberta" || type == "xlm-roberta" || type == "camembert" || type == "electra") {
    return LoadBertModel(dir, options);
  }
  return absl::UnimplementedError(absl::StrCat(config_path, ": model_type \"", type,
                                               "\" is not supported (supported: use-lite, bert, roberta, "
                                               "xlm-roberta, camembert, electra)"));
}

}  // namespace model
}  // namespace deltaserve
