// Hugging Face PEFT interop: import a PEFT adapter directory (what `PeftModel.save_pretrained` writes:
// adapter_config.json + adapter_model.safetensors) as a delta pack, and export a LoRA pack as one.
//
// Import (ImportPeft) maps, for BERT-family backbones (and use-lite where the module names line up):
//   LORA           "<module>.lora_A.weight" [r,in], ".lora_B.weight" [out,r]  -> lora (rank r, alpha so that
//                  alpha / r is PEFT's scale: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora)
//                  bias "all" / "lora_only" tensors (full trained biases)        -> bitfit (trained - base bias)
//   IA3            "<module>.ia3_l" [out,1] (scales the output) or [1,in] (feedforward_modules: scales the
//                  input)                                                        -> ia3
//   PROMPT_TUNING, P_TUNING
//                  "prompt_embeddings" [P, E] (the final soft tokens)            -> prompt
//   PREFIX_TUNING  "prompt_embeddings" [P, num_layers*2*H] (the final past_key_values) -> prefix, per layer l
//                  keys = [:, 2l], values = [:, 2l+1] of the [P, 2L, NH, DH] view (PEFT's get_prompt order)
//   modules_to_save classifier ("classifier.weight"/".bias", or RoBERTa-style "classifier.dense.*" +
//                  "classifier.out_proj.*")                                      -> head, see PeftImportOptions
// Keys are "base_model.model.<module>..." (the prefix is optional), where <module> may carry a model prefix such
// as "bert." / "roberta.": the longest dotted suffix that is a module name of the model is used.
//
// Errors: a PEFT option or tensor that changes what the adapter computes and that deltaserve cannot reproduce is
// UNIMPLEMENTED naming the option (use_dora, lora_bias, rank_pattern giving several ranks, alpha_pattern giving
// several scales, LoRA on an embedding, init_lora_weights that mutates the base weights (pissa / olora / corda /
// loftq), layer_replication, trainable_token_indices, target_parameters, prefix_projection with the MLP saved,
// num_transformer_submodules != 1, an unknown peft_type (the message lists the supported ones), ...). A missing
// file is NOT_FOUND; a malformed file (bad JSON, wrong types, a tensor of the wrong shape, a missing partner
// tensor, a key of no supported form) is INVALID_ARGUMENT naming the file and the key; a key whose module is not
// in the model is INVALID_ARGUMENT naming the key and the closest module names. Options that do not change
// inference (lora_dropout, fan_in_fan_out — PEFT stores lora_A / lora_B in nn.Linear layout either way and resets
// the flag for nn.Linear targets —, layers_to_transform / layers_pattern, whose layers the keys already name,
// init weights, target_modules given as the keys' modules) are accepted and recorded in the provenance.
//
// Stateless functions: thread-safe (the model is only read).
#ifndef DELTASERVE_SERVER_DELTA_PEFT_H_
#define DELTASERVE_SERVER_DELTA_PEFT_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/delta/delta_pack.h"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

struct PeftImportOptions {
  // The pack's manifest name. Empty: the name ExportPeftLora stored in the weights' metadata, if any, else "".
  std::string name;

  // Task heads (modules_to_save with a classifier). HF BertForSequenceClassification applies its classifier to
  // the *pooler* output, tanh(pooler.dense(CLS state)); RoBERTa / ELECTRA heads apply dense + tanh / gelu to the
  // CLS state. deltaserve's head runs on the model's pooled embedding, so the head is reproduced exactly when the
  // model pools the raw CLS state (ModelInfo::pooling == "cls") and, for BERT-style heads, the pooler weights are
  // found (in the adapter file's modules_to_save, or in `base_checkpoint`): then it is imported as
  // out(tanh(dense(x))) with dense = the pooler. Otherwise it is imported only when `import_head` is set (the
  // classifier alone on the pooled embedding; the provenance records the difference) and skipped by default
  // (the provenance says so).
  bool import_head = false;
  // Never import a head (the provenance notes a skipped classifier).
  bool skip_head = false;
  // Classification labels, one per classifier output. Empty: "LABEL_0", "LABEL_1", ... (HF's defaults); a
  // classifier with one output and no labels becomes a regression head.
  std::vector<std::string> labels;
  // A safetensors file with the base model's pooler ("[<prefix>.]pooler.dense.weight" / ".bias"), usually the
  // backbone's model.safetensors. Empty: only the adapter file is searched.
  std::string base_checkpoint;

  // Limits the imported pack is validated against.
  PackLimits limits;
};

// Imports the PEFT adapter in `peft_dir` for `model`. The result is validated against the model (it binds with
// DeltaPack::FromContents) and canonical: SerializePack() of it gives the pack's canonical bytes. Manifest: the
// model's family and fingerprint; provenance {"imported_from": "peft", "peft_type", "base_model_name_or_path",
// "task_type", ... and "notes" for what was skipped or approximated}. When the weights carry the metadata
// ExportPeftLora writes ("deltaserve.name", "deltaserve.provenance"), name and provenance are restored from it,
// so export followed by import gives back the same pack.
absl::StatusOr<PackContents> ImportPeft(const std::string& peft_dir, const model::Model& model,
                                        const PeftImportOptions& options);

struct PeftExportOptions {
  // adapter_config.json's base_model_name_or_path (e.g. "bert-base-uncased" or a local path).
  std::string base_model_name_or_path;
  // Put in front of every module name in the weights' keys: "" for a bare BertModel (PEFT's keys are then
  // "base_model.model.encoder.layer..."), "bert." for BertFor... models.
  std::string module_prefix;
  // Export a pack with a head by leaving the head out (otherwise a head is UNIMPLEMENTED).
  bool skip_head = false;
  // Limits the pack is validated against.
  PackLimits limits;
};

// Writes `pack` (bound to `model` first: the fingerprint must match and targets are resolved) as a PEFT LoRA
// adapter into `out_dir` (created if missing; files are replaced): adapter_config.json (peft_type LORA, r,
// lora_alpha, target_modules = the exact module names, task_type FEATURE_EXTRACTION, inference_mode true,
// bias "none", fan_in_fan_out false, use_rslora false) and adapter_model.safetensors with keys
// "base_model.model.<prefix><module>.lora_A.weight" / ".lora_B.weight" and metadata {"format": "pt",
// "deltaserve.name", "deltaserve.provenance"}. UNIMPLEMENTED naming the other methods when the pack holds
// anything but one lora method.
absl::Status ExportPeftLora(const PackContents& pack, const model::Model& model, const std::string& out_dir,
                            const PeftExportOptions& options);

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_PEFT_H_
