// LoadModel: opens a model directory and builds the Model of its family.
//
// A model directory follows the Hugging Face layout: `config.json` (its "model_type" picks the family:
// "use-lite" for our converted USE-lite, "bert" / "roberta" / ... for the bert family), `model.safetensors`, and
// the tokenizer files of the family (`vocab.json` for use-lite, `vocab.txt` for bert). Every problem with the
// directory is a status whose message names the file and says what is wrong (NOT_FOUND for a missing file,
// INVALID_ARGUMENT for a malformed one, UNIMPLEMENTED for an unknown model_type). Stateless: thread-safe.
#ifndef DELTASERVE_SERVER_MODEL_MODEL_LOADER_H_
#define DELTASERVE_SERVER_MODEL_MODEL_LOADER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/model/model.h"

namespace deltaserve {
namespace model {

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir, const ModelOptions& options);

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_MODEL_LOADER_H_
