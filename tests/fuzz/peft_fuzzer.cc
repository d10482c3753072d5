// Fuzz target: the PEFT adapter import (server/delta/peft.h ImportPeft), which reads a directory a user hands to
// `deltaserve-pack import-peft` (and that a tenant may have downloaded from anywhere).
//
// Input layout (so that both files mutate together):
//   byte 0        options: bit 0 import_head, bit 1 skip_head, bit 2 two labels, bit 3 base_checkpoint = the
//                 tiny BERT's model.safetensors
//   bytes 1..4    N, little-endian: the length of adapter_config.json (cut to what is left)
//   N bytes       adapter_config.json
//   the rest      adapter_model.safetensors
// Both files are written into this process's scratch directory, then imported for a tiny BERT.
//
// Reaches: the config's JSON and every PEFT option check, the weights' safetensors parse, key parsing and module
// matching, the LoRA / IA3 / prompt / prefix / bias / classifier mappings and their shape checks. Invariants:
// errors are INVALID_ARGUMENT, UNIMPLEMENTED or NOT_FOUND; an imported pack serializes and binds to the model (as
// ImportPeft promises).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "server/delta/delta_pack.h"
#include "server/delta/peft.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tiny_model.h"

namespace deltaserve {
namespace {

void FuzzOne(absl::string_view input) {
  const model::Model& model = fuzz::TinyBert();
  static const std::string* dir = new std::string(fuzz::ScratchDir());

  uint8_t flags = 0;
  if (!input.empty()) {
    flags = static_cast<uint8_t>(input[0]);
    input.remove_prefix(1);
  }
  uint32_t config_size = 0;
  for (int i = 0; i < 4 && !input.empty(); ++i) {
    config_size |= static_cast<uint32_t>(static_cast<uint8_t>(input[0])) << (8 * i);
    input.remove_prefix(1);
  }
  const absl::string_view config = input.substr(0, config_size);
  const absl::string_view weights = input.substr(config.size());
  fuzz::WriteScratchFile(*dir + "/adapter_config.json", config);
  fuzz::WriteScratchFile(*dir + "/adapter_model.safetensors", weights);

  delta::PeftImportOptions options;
  options.import_head = (flags & 1) != 0;
  options.skip_head = (flags & 2) != 0;
  if ((flags & 4) != 0) options.labels = {"negative", "positive"};
  if ((flags & 8) != 0) options.base_checkpoint = fuzz::TinyBertDir() + "/model.safetensors";

  absl::StatusOr<delta::PackContents> contents = delta::ImportPeft(*dir, model, options);
  if (!contents.ok()) {
    const absl::StatusCode code = contents.status().code();
    FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kUnimplemented ||
               code == absl::StatusCode::kNotFound);
    return;
  }
  FUZZ_CHECK(delta::SerializePack(*contents).ok());
  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> pack =
      delta::DeltaPack::FromContents(*std::move(contents), model, options.limits);
  FUZZ_CHECK(pack.ok());
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  deltaserve::fuzz::TinyBert();  // built before the first input: its allocations are not that input's leaks
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}
