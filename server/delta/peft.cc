// Hugging Face PEFT interop (peft.h). The key layouts and the arithmetic follow PEFT's save_pretrained /
// get_peft_model_state_dict and its tuner layers:
//   - non-prompt methods: "base_model.model.<module path>.<param>" with the adapter name removed
//     ("...query.lora_A.weight", "...key.ia3_l"); modules_to_save as "<module path>.<param>";
//   - prompt learning: a single "prompt_embeddings" tensor, the *final* prompts (PEFT runs the prompt encoder /
//     prefix MLP before saving), so inference needs nothing else;
//   - prefix tuning: get_prompt() views [P, 2L*H] as [P, 2L, NH, H/NH], permutes to [2L, NH, P, DH] and splits
//     it in pairs: layer l's keys are index 2l, its values 2l+1.
#include "server/delta/peft.h"

#include <ATen/ATen.h>
#include <errno.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "server/common/file_util.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/module_patterns.h"
#include "server/model/safetensors.h"

namespace deltaserve {
namespace delta {
namespace {

constexpr char kConfigFile[] = "adapter_config.json";
constexpr char kWeightsFile[] = "adapter_model.safetensors";
constexpr char kPickleWeightsFile[] = "adapter_model.bin";
constexpr char kBasePrefix[] = "base_model.model.";
constexpr char kMetaName[] = "deltaserve.name";
constexpr char kMetaProvenance[] = "deltaserve.provenance";
constexpr char kSupportedTypes[] = "LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING";

std::string JoinPath(const std::string& dir, const char* file) {
  if (dir.empty()) return file;
  return dir.back() == '/' ? absl::StrCat(dir, file) : absl::StrCat(dir, "/", file);
}

// ---------------------------------------------------------------------------------------------------------------
// adapter_config.json

class PeftConfig {
 public:
  PeftConfig(std::string path, nlohmann::json json) : path_(std::move(path)), json_(std::move(json)) {}

  const std::string& path() const { return path_; }
  const nlohmann::json& json() const { return json_; }

  // The value of `key`, or nullptr when absent or null.
  const nlohmann::json* Get(const char* key) const {
    auto it = json_.find(key);
    return it == json_.end() || it->is_null() ? nullptr : &*it;
  }

  absl::Status Error(const char* key, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": \"", key, "\" ", what));
  }
  absl::Status Unimplemented(const char* key, absl::string_view what) const {
    return absl::UnimplementedError(absl::StrCat(path_, ": \"", key, "\" ", what));
  }

  absl::StatusOr<std::string> String(const char* key, const std::string& fallback) const {
    const nlohmann::json* v = Get(key);
    if (v == nullptr) return fallback;
    if (!v->is_string()) return Error(key, absl::StrCat("must be a string, got ", v->dump()));
    return v->get<std::string>();
  }
  absl::StatusOr<bool> Bool(const char* key, bool fallback) const {
    const nlohmann::json* v = Get(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) return Error(key, absl::StrCat("must be true or false, got ", v->dump()));
    return v->get<bool>();
  }
  // A positive integer (fallback < 0: required).
  absl::StatusOr<int64_t> PositiveInt(const char* key, int64_t fallback) const {
    const nlohmann::json* v = Get(key);
    if (v == nullptr) {
      if (fallback < 0) return Error(key, "is required");
      return fallback;
    }
    if (!v->is_number_integer() || v->get<int64_t>() < 1) {
      return Error(key, absl::StrCat("must be a positive integer, got ", v->dump()));
    }
    return v->get<int64_t>();
  }
  absl::StatusOr<double> Number(const char* key, double fallback) const {
    const nlohmann::json* v = Get(key);
    if (v == nullptr) return fallback;
    if (!v->is_number() || !std::isfinite(v->get<double>())) {
      return Error(key, absl::StrCat("must be a finite number, got ", v->dump()));
    }
    return v->get<double>();
  }
  // An object of pattern -> value (rank_pattern, alpha_pattern); empty when absent.
  absl::StatusOr<std::vector<std::pair<std::string, nlohmann::json>>> Patterns(const char* key) const {
    std::vector<std::pair<std::string, nlohmann::json>> out;
    const nlohmann::json* v = Get(key);
    if (v == nullptr) return out;
    if (!v->is_object()) {
      return Error(key, absl::StrCat("must be an object of module pattern -> value, got ", v->dump()));
    }
    for (auto it = v->begin(); it != v->end(); ++it) out.emplace_back(it.key(), it.value());
    return out;
  }
  // True when the option is present and not "off" (null, false, an empty list / object / string).
  bool IsSet(const char* key) const {
    const nlohmann::json* v = Get(key);
    if (v == nullptr) return false;
    if (v->is_boolean()) return v->get<bool>();
    if (v->is_array() || v->is_object() || v->is_string()) return !v->empty() && *v != "";
    return true;
  }

 private:
  std::string path_;
  nlohmann::json json_;
};

// PEFT's get_pattern_key: the first pattern p for which `(.*\.)?(p)$` matches `key` (Python re.match).
absl::StatusOr<const std::pair<std::string, nlohmann::json>*> MatchPattern(
    const PeftConfig& config, const char* option, const std::vector<std::pair<std::string, nlohmann::json>>& patterns,
    const std::string& key) {
  for (const auto& entry : patterns) {
    std::regex re;
    try {
      re = std::regex(absl::StrCat("(.*\\.)?(", entry.first, ")"), std::regex::ECMAScript);
    } catch (const std::regex_error&) {
      return config.Error(option, absl::StrCat("holds the pattern \"", entry.first,
                                               "\", which is not a valid regular expression here"));
    }
    if (std::regex_match(key, re)) return &entry;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
// Module names

class ModuleIndex {
 public:
  explicit ModuleIndex(const model::Model& model) : model_(model) {
    for (const model::ModuleInfo& m : model.modules()) {
      by_name_[m.name] = &m;
      first_components_.insert(std::string(absl::string_view(m.name).substr(0, m.name.find('.'))));
    }
  }

  // The module whose name is the longest dotted suffix of `path` (the path itself first), or nullptr. *prefix is
  // what was stripped ("" or e.g. "bert.").
  const model::ModuleInfo* Resolve(const std::string& path, std::string* prefix) const {
    size_t start = 0;
    while (true) {
      auto it = by_name_.find(path.substr(start));
      if (it != by_name_.end()) {
        if (prefix != nullptr) *prefix = path.substr(0, start);
        return it->second;
      }
      const size_t dot = path.find('.', start);
      if (dot == std::string::npos) return nullptr;
      start = dot + 1;
    }
  }

  // Up to 5 module names closest to `path` (after dropping a leading component no module name starts with, such
  // as a model prefix "bert.").
  std::string Closest(const std::string& path, const std::vector<model::ModuleKind>& kinds) const {
    std::string probe = path;
    const size_t dot = probe.find('.');
    if (dot != std::string::npos && !first_components_.count(probe.substr(0, dot))) probe = probe.substr(dot + 1);
    const std::vector<std::string> closest = ClosestModuleNames(probe, model_, kinds, 5);
    return closest.empty() ? "none" : absl::StrJoin(closest, ", ");
  }

  const model::Model& model() const { return model_; }

 private:
  const model::Model& model_;
  std::map<std::string, const model::ModuleInfo*> by_name_;
  std::set<std::string> first_components_;
};

// ---------------------------------------------------------------------------------------------------------------
// The import

// "base_model.model.x" -> "x"; "classifier.modules_to_save.default.weight" -> "classifier.weight".
std::string NormalizePath(absl::string_view key) {
  std::string path(key);
  if (absl::StartsWith(path, kBasePrefix)) path = path.substr(sizeof(kBasePrefix) - 1);
  for (const char* wrapper : {".modules_to_save.default.", ".modules_to_save."}) {
    const size_t pos = path.find(wrapper);
    if (pos != std::string::npos) path = absl::StrCat(path.substr(0, pos), ".", path.substr(pos + strlen(wrapper)));
  }
  return path;
}

bool IsHeadPath(absl::string_view path) { return absl::StartsWith(path, "classifier."); }

std::string StripSuffix(absl::string_view s, absl::string_view suffix) {
  return std::string(s.substr(0, s.size() - suffix.size()));
}

class Importer {
 public:
  Importer(const PeftConfig& config, const model::SafetensorsFile& file, const model::Model& model,
           const PeftImportOptions& options)
      : config_(config), file_(file), model_(model), index_(model), options_(options) {}

  absl::StatusOr<PackContents> Run();

 private:
  // Errors about the weights file.
  absl::Status KeyError(absl::string_view key, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_.path(), ": tensor \"", key, "\" ", what));
  }
  absl::Status UnknownModule(absl::string_view key, const std::string& path,
                             const std::vector<model::ModuleKind>& kinds) const {
    return KeyError(key, absl::StrCat("names module \"", path, "\", which is not a module of model \"",
                                      model_.info().name, "\" (closest: ", index_.Closest(path, kinds), ")"));
  }
  // The module a key's path names; records the stripped prefix.
  absl::StatusOr<const model::ModuleInfo*> ModuleOf(absl::string_view key, const std::string& path,
                                                    const std::vector<model::ModuleKind>& kinds) {
    std::string prefix;
    const model::ModuleInfo* m = index_.Resolve(path, &prefix);
    if (m == nullptr) return UnknownModule(key, path, kinds);
    prefixes_.insert(prefix);
    return m;
  }
  absl::StatusOr<at::Tensor> Load(const std::string& key) const {
    absl::StatusOr<at::Tensor> t = file_.Load(key, at::kFloat);
    if (!t.ok()) {
      return absl::Status(t.status().code(),
                          absl::StrCat(file_.path(), ": tensor \"", key, "\": ", t.status().message()));
    }
    return TorchCall([&] { return t->contiguous(); }, "peft: loading a tensor");
  }

  absl::Status Classify();
  absl::Status CheckOnly(const char* what, bool allowed);
  absl::Status CheckTargetModules(const char* method);
  absl::Status ImportLora();
  absl::Status ImportBiases();
  absl::Status ImportIa3();
  absl::Status ImportPrompt();
  absl::Status ImportPrefix();
  absl::Status ImportHead();
  absl::StatusOr<bool> FindPooler(at::Tensor* weight, at::Tensor* bias, std::string* source);

  void Note(std::string note) { notes_.push_back(std::move(note)); }

  // Whether adapter_config.json's modules_to_save names the module at `path` (PEFT: the path equals an entry or
  // ends with "." + entry).
  bool InModulesToSave(const std::string& path) const {
    const nlohmann::json* list = config_.Get("modules_to_save");
    if (list == nullptr || !list->is_array()) return false;
    for (const nlohmann::json& e : *list) {
      if (!e.is_string()) continue;
      const std::string entry = e.get<std::string>();
      if (path == entry || absl::EndsWith(path, "." + entry)) return true;
    }
    return false;
  }

  const PeftConfig& config_;
  const model::SafetensorsFile& file_;
  const model::Model& model_;
  ModuleIndex index_;
  const PeftImportOptions& options_;
  std::string peft_type_;

  // Keys by what they hold (normalized path -> file key).
  std::map<std::string, std::string> lora_a_, lora_b_, ia3_, biases_, head_;
  std::string prompt_key_;
  std::set<std::string> prefixes_;

  PackContents contents_;
  nlohmann::json provenance_ = nlohmann::json::object();
  std::vector<std::string> notes_;
};

absl::Status Importer::Classify() {
  int64_t original = 0;
  for (const std::string& key : file_.names()) {
    if (key.find(".original_module.") != std::string::npos) {
      ++original;  // modules_to_save keeps the untouched original next to the trained copy
      continue;
    }
    const std::string path = NormalizePath(key);
    auto add = [&](std::map<std::string, std::string>* to, const std::string& p) -> absl::Status {
      auto [it, inserted] = to->emplace(p, key);
      if (!inserted) {
        // Two spellings of one tensor (e.g. bias="all" and modules_to_save both save the classifier's bias).
        DS_ASSIGN_OR_RETURN(at::Tensor a, Load(it->second));
        DS_ASSIGN_OR_RETURN(at::Tensor b, Load(key));
        if (!a.sizes().equals(b.sizes()) || !at::equal(a, b)) {
          return KeyError(key, absl::StrCat("and \"", it->second, "\" name the same tensor with different values"));
        }
      }
      return absl::OkStatus();
    };
    if (path == "prompt_embeddings") {
      prompt_key_ = key;
    } else if (absl::EndsWith(path, ".lora_A.weight")) {
      DS_RETURN_IF_ERROR(add(&lora_a_, StripSuffix(path, ".lora_A.weight")));
    } else if (absl::EndsWith(path, ".lora_B.weight")) {
      DS_RETURN_IF_ERROR(add(&lora_b_, StripSuffix(path, ".lora_B.weight")));
    } else if (absl::StrContains(path, "lora_magnitude_vector")) {
      return absl::UnimplementedError(
          absl::StrCat(file_.path(), ": tensor \"", key, "\" is a DoRA magnitude (use_dora): DoRA is not supported"));
    } else if (absl::StrContains(path, ".lora_embedding_A") || absl::StrContains(path, ".lora_embedding_B")) {
      return absl::UnimplementedError(absl::StrCat(
          file_.path(), ": tensor \"", key,
          "\" is a LoRA on an embedding (target_modules names an embedding): deltaserve's lora applies to linear "
          "modules only"));
    } else if (absl::EndsWith(path, ".lora_B.bias")) {
      return absl::UnimplementedError(
          absl::StrCat(file_.path(), ": tensor \"", key, "\" is a LoRA bias (lora_bias): not supported"));
    } else if (absl::EndsWith(path, ".ia3_l")) {
      DS_RETURN_IF_ERROR(add(&ia3_, StripSuffix(path, ".ia3_l")));
    } else if (absl::EndsWith(path, ".ia3_l.weight")) {
      DS_RETURN_IF_ERROR(add(&ia3_, StripSuffix(path, ".ia3_l.weight")));
    } else if (IsHeadPath(path)) {
      DS_RETURN_IF_ERROR(add(&head_, path));
    } else if (absl::EndsWith(path, ".bias") || absl::EndsWith(path, ".weight")) {
      const bool bias = absl::EndsWith(path, ".bias");
      std::string module = StripSuffix(path, bias ? ".bias" : ".weight");
      if (absl::EndsWith(module, ".base_layer")) module = StripSuffix(module, ".base_layer");
      std::string prefix;
      const model::ModuleInfo* m = index_.Resolve(module, &prefix);
      if (m == nullptr && absl::EndsWith(module, "pooler.dense")) {
        DS_RETURN_IF_ERROR(add(&head_, path));  // the HF pooler: part of a BERT classification head
      } else if (m == nullptr) {
        return UnknownModule(key, module, {model::ModuleKind::kLinear, model::ModuleKind::kLayerNorm});
      } else if (!bias || InModulesToSave(module)) {
        return absl::UnimplementedError(
            absl::StrCat(file_.path(), ": tensor \"", key, "\" is a fully trained ", bias ? "bias" : "weight",
                         " of backbone module \"", m->name,
                         "\" (modules_to_save): deltaserve imports only classifier heads from modules_to_save"));
      } else {
        DS_RETURN_IF_ERROR(add(&biases_, module));
      }
    } else {
      return KeyError(key, absl::StrCat("is not a tensor a ", peft_type_,
                                        " adapter saves (expected e.g. \"base_model.model.<module>.lora_A.weight\", "
                                        "\"<module>.ia3_l\", \"prompt_embeddings\" or a modules_to_save classifier)"));
    }
  }
  if (original > 0) Note(absl::StrCat("ignored ", original, " modules_to_save original_module tensors"));
  return absl::OkStatus();
}

// INVALID_ARGUMENT when the weights hold tensors of kind `what` that this peft_type does not save.
absl::Status Importer::CheckOnly(const char* what, bool allowed) {
  if (allowed) return absl::OkStatus();
  const std::map<std::string, std::string>* keys = nullptr;
  std::string one;
  if (std::string(what) == "lora") keys = &lora_a_;
  if (std::string(what) == "lora" && lora_a_.empty()) keys = &lora_b_;
  if (std::string(what) == "ia3") keys = &ia3_;
  if (std::string(what) == "bias") keys = &biases_;
  if (keys != nullptr && !keys->empty()) one = keys->begin()->second;
  if (std::string(what) == "prompt" && !prompt_key_.empty()) one = prompt_key_;
  if (one.empty()) return absl::OkStatus();
  return KeyError(one, absl::StrCat("is not a tensor of a ", peft_type_, " adapter (", config_.path(),
                                    " says peft_type ", peft_type_, ")"));
}

// target_modules naming a module PEFT would wrap as something other than a linear layer (an embedding, a layer
// norm): UNIMPLEMENTED. PEFT's rule: a list entry t matches a module key k when k == t or k ends with "." + t; a
// string is a regular expression that must match the whole key.
absl::Status Importer::CheckTargetModules(const char* method) {
  const nlohmann::json* targets = config_.Get("target_modules");
  if (targets == nullptr) return absl::OkStatus();
  auto offending = [&](const model::ModuleInfo& m) {
    return m.kind == model::ModuleKind::kEmbedding || m.kind == model::ModuleKind::kLayerNorm;
  };
  if (targets->is_array()) {
    for (const nlohmann::json& t : *targets) {
      if (!t.is_string()) {
        return config_.Error("target_modules", absl::StrCat("must hold strings, got ", t.dump()));
      }
      const std::string name = t.get<std::string>();
      for (const model::ModuleInfo& m : model_.modules()) {
        if (!offending(m)) continue;
        const std::string dotted = "." + name;
        if (m.name == name || absl::EndsWith(m.name, dotted) || absl::EndsWith(name, "." + m.name)) {
          return config_.Unimplemented(
              "target_modules", absl::StrCat("entry \"", name, "\" names ", model::ModuleKindName(m.kind), " module \"",
                                             m.name, "\": deltaserve's ", method, " applies to linear modules only"));
        }
      }
    }
  } else if (targets->is_string()) {
    const std::string pattern = targets->get<std::string>();
    if (pattern == "all-linear") return absl::OkStatus();
    std::regex re;
    try {
      re = std::regex(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error&) {
      return absl::OkStatus();  // a Python-only construct: the keys are checked one by one anyway
    }
    for (const model::ModuleInfo& m : model_.modules()) {
      if (!offending(m)) continue;
      bool match = std::regex_match(m.name, re);
      for (const std::string& prefix : {std::string("bert."), std::string("roberta."), std::string("electra.")}) {
        match = match || std::regex_match(prefix + m.name, re);
      }
      if (match) {
        return config_.Unimplemented(
            "target_modules", absl::StrCat("\"", pattern, "\" matches ", model::ModuleKindName(m.kind), " module \"",
                                           m.name, "\": deltaserve's ", method, " applies to linear modules only"));
      }
    }
  } else {
    return config_.Error("target_modules", absl::StrCat("must be a list of names or a string, got ", targets->dump()));
  }
  return absl::OkStatus();
}

absl::Status Importer::ImportLora() {
  DS_RETURN_IF_ERROR(CheckOnly("ia3", false));
  DS_RETURN_IF_ERROR(CheckOnly("prompt", false));
  // Options that change what the adapter computes.
  DS_ASSIGN_OR_RETURN(const bool use_dora, config_.Bool("use_dora", false));
  if (use_dora) return config_.Unimplemented("use_dora", "is true: DoRA (weight-decomposed LoRA) is not supported");
  DS_ASSIGN_OR_RETURN(const bool lora_bias, config_.Bool("lora_bias", false));
  if (lora_bias) return config_.Unimplemented("lora_bias", "is true: a bias on lora_B is not supported");
  for (const char* option : {"layer_replication", "trainable_token_indices", "target_parameters",
                             "alora_invocation_tokens", "megatron_config"}) {
    if (config_.IsSet(option)) {
      return config_.Unimplemented(
          option, absl::StrCat("is set (", config_.Get(option)->dump(), "): not supported by the deltaserve import"));
    }
  }
  if (const nlohmann::json* init = config_.Get("init_lora_weights"); init != nullptr && init->is_string()) {
    const std::string v = init->get<std::string>();
    if (absl::StartsWith(v, "pissa") || absl::StartsWith(v, "olora") || absl::StartsWith(v, "corda") || v == "loftq") {
      return config_.Unimplemented("init_lora_weights",
                                   absl::StrCat("is \"", v,
                                                "\", which changes the base weights: the adapter needs the "
                                                "modified backbone (convert it to a plain LoRA first)"));
    }
  }
  DS_RETURN_IF_ERROR(CheckTargetModules("lora"));
  DS_ASSIGN_OR_RETURN(const int64_t r, config_.PositiveInt("r", 8));
  DS_ASSIGN_OR_RETURN(const double lora_alpha, config_.Number("lora_alpha", 8));
  DS_ASSIGN_OR_RETURN(const bool rslora, config_.Bool("use_rslora", false));
  DS_ASSIGN_OR_RETURN(const bool fan_in_fan_out, config_.Bool("fan_in_fan_out", false));
  DS_ASSIGN_OR_RETURN(const auto rank_pattern, config_.Patterns("rank_pattern"));
  DS_ASSIGN_OR_RETURN(const auto alpha_pattern, config_.Patterns("alpha_pattern"));
  DS_ASSIGN_OR_RETURN(const std::string bias, config_.String("bias", "none"));
  if (bias != "none" && bias != "all" && bias != "lora_only") {
    return config_.Error("bias", absl::StrCat("must be \"none\", \"all\" or \"lora_only\", got \"", bias, "\""));
  }
  if (bias == "none" && !biases_.empty()) {
    return KeyError(biases_.begin()->second, absl::StrCat("is a bias, but ", config_.path(), " says bias \"none\""));
  }

  // Every module with lora_A has lora_B and the other way round.
  for (const auto& [path, key] : lora_a_) {
    if (!lora_b_.count(path)) return KeyError(key, absl::StrCat("has no partner \"", path, ".lora_B.weight\""));
  }
  for (const auto& [path, key] : lora_b_) {
    if (!lora_a_.count(path)) return KeyError(key, absl::StrCat("has no partner \"", path, ".lora_A.weight\""));
  }

  MethodSpec spec;
  spec.kind = MethodKind::kLora;
  std::vector<std::string> targets;
  std::map<int64_t, std::string> ranks;  // rank -> a module with it
  std::map<double, std::string> alphas;  // alpha -> a module with it
  for (const auto& [path, a_key] : lora_a_) {
    const std::string& b_key = lora_b_.at(path);
    DS_ASSIGN_OR_RETURN(const model::ModuleInfo* m, ModuleOf(a_key, path, {model::ModuleKind::kLinear}));
    if (m->kind != model::ModuleKind::kLinear) {
      return absl::UnimplementedError(absl::StrCat(file_.path(), ": tensor \"", a_key, "\" is a LoRA on ",
                                                   model::ModuleKindName(m->kind), " module \"", m->name,
                                                   "\": deltaserve's lora applies to linear modules only"));
    }
    DS_ASSIGN_OR_RETURN(at::Tensor a, Load(a_key));
    DS_ASSIGN_OR_RETURN(at::Tensor b, Load(b_key));
    // lora_A / lora_B are nn.Linear modules in PEFT whatever fan_in_fan_out says (the flag only transposes the
    // merged delta for Conv1D base layers), so the layout is always A [r, in], B [out, r].
    if (a.dim() != 2 || a.size(1) != m->in_features || a.size(0) < 1) {
      return KeyError(a_key, absl::StrCat("has shape ", ShapeString(a.sizes()), ", expected [r, ", m->in_features,
                                          "] for module \"", m->name, "\""));
    }
    const int64_t rank = a.size(0);
    if (b.dim() != 2 || b.size(0) != m->out_features || b.size(1) != rank) {
      return KeyError(b_key, absl::StrCat("has shape ", ShapeString(b.sizes()), ", expected [", m->out_features, ", ",
                                          rank, "] (out, r of \"", a_key, "\")"));
    }
    DS_ASSIGN_OR_RETURN(const auto* r_match, MatchPattern(config_, "rank_pattern", rank_pattern, path));
    DS_ASSIGN_OR_RETURN(const auto* a_match, MatchPattern(config_, "alpha_pattern", alpha_pattern, path));
    int64_t expected_rank = r;
    if (r_match != nullptr) {
      if (!r_match->second.is_number_integer() || r_match->second.get<int64_t>() < 1) {
        return config_.Error("rank_pattern", absl::StrCat("maps \"", r_match->first, "\" to ", r_match->second.dump(),
                                                          ", not a positive integer"));
      }
      expected_rank = r_match->second.get<int64_t>();
    }
    double alpha = lora_alpha;
    if (a_match != nullptr) {
      if (!a_match->second.is_number()) {
        return config_.Error("alpha_pattern", absl::StrCat("maps \"", a_match->first, "\" to ", a_match->second.dump(),
                                                           ", not a number"));
      }
      alpha = a_match->second.get<double>();
    }
    if (rank != expected_rank) {
      return KeyError(a_key, absl::StrCat("has rank ", rank, ", but ", config_.path(), " gives this module rank ",
                                          expected_rank, r_match != nullptr ? " (rank_pattern)" : " (r)"));
    }
    ranks.emplace(rank, path);
    alphas.emplace(alpha, path);
    targets.push_back(m->name);
    spec.tensors[m->name + ".lora_A"] = a;
    spec.tensors[m->name + ".lora_B"] = b;
  }
  if (ranks.size() > 1) {
    return config_.Unimplemented("rank_pattern",
                                 absl::StrCat("gives modules different ranks (", ranks.begin()->first, " for \"",
                                              ranks.begin()->second, "\", ", ranks.rbegin()->first, " for \"",
                                              ranks.rbegin()->second, "\"): deltaserve's lora has one rank per pack"));
  }
  if (alphas.size() > 1) {
    return config_.Unimplemented(
        "alpha_pattern", absl::StrCat("gives modules different alphas (", alphas.begin()->first, " for \"",
                                      alphas.begin()->second, "\", ", alphas.rbegin()->first, " for \"",
                                      alphas.rbegin()->second, "\"): deltaserve's lora has one alpha per pack"));
  }
  provenance_["lora_alpha"] = lora_alpha;
  provenance_["r"] = r;
  if (!rank_pattern.empty()) provenance_["rank_pattern"] = *config_.Get("rank_pattern");
  if (!alpha_pattern.empty()) provenance_["alpha_pattern"] = *config_.Get("alpha_pattern");
  if (fan_in_fan_out) {
    provenance_["fan_in_fan_out"] = true;
    Note(
        "fan_in_fan_out is true: lora_A / lora_B are stored as [r, in] / [out, r] either way (PEFT transposes "
        "only the merged delta, for Conv1D base layers); imported unchanged");
  }
  for (const char* option : {"layers_to_transform", "layers_pattern"}) {
    if (config_.IsSet(option)) provenance_[option] = *config_.Get(option);
  }
  if (!ranks.empty()) {
    const int64_t rank = ranks.begin()->first;
    const double alpha = alphas.begin()->first;
    double ours = alpha;
    if (rslora) {
      // PEFT scales by alpha / sqrt(r); ours by alpha' / r: alpha' = alpha * sqrt(r).
      ours = alpha * std::sqrt(static_cast<double>(rank));
      provenance_["use_rslora"] = true;
      Note(absl::StrCat("use_rslora: PEFT's scale lora_alpha / sqrt(r) = ", alpha, " / sqrt(", rank,
                        ") is expressed as alpha = ", ours, " (alpha / r)"));
    }
    spec.config = {{"rank", rank}, {"alpha", ours}, {"targets", targets}};
    contents_.methods.push_back(std::move(spec));
  }
  if (bias != "none") {
    provenance_["bias"] = bias;
    DS_RETURN_IF_ERROR(ImportBiases());
  }
  if (contents_.methods.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_.path(), " holds no LoRA tensors (\"<module>.lora_A.weight\")"));
  }
  return absl::OkStatus();
}

// bias "all" / "lora_only": PEFT saves the full trained biases; as a bitfit method they are deltas from the
// backbone's own biases (modules whose bias did not change are left out).
absl::Status Importer::ImportBiases() {
  MethodSpec spec;
  spec.kind = MethodKind::kBitFit;
  std::vector<std::string> targets;
  int64_t unchanged = 0;
  const auto& params = model_.parameters();
  for (const auto& [path, key] : biases_) {
    DS_ASSIGN_OR_RETURN(const model::ModuleInfo* m,
                        ModuleOf(key, path, {model::ModuleKind::kLinear, model::ModuleKind::kLayerNorm}));
    if (m->kind != model::ModuleKind::kLinear && m->kind != model::ModuleKind::kLayerNorm) {
      return absl::UnimplementedError(absl::StrCat(file_.path(), ": tensor \"", key, "\" is the bias of ",
                                                   model::ModuleKindName(m->kind), " module \"", m->name,
                                                   "\": bitfit applies to linear and layer-norm modules only"));
    }
    const int64_t width = m->kind == model::ModuleKind::kLinear ? m->out_features : m->in_features;
    DS_ASSIGN_OR_RETURN(at::Tensor trained, Load(key));
    if (trained.dim() != 1 || trained.size(0) != width) {
      return KeyError(key, absl::StrCat("has shape ", ShapeString(trained.sizes()), ", expected [", width, "]"));
    }
    at::Tensor delta = trained;
    auto it = params.find(m->name + ".bias");
    if (it != params.end()) {
      DS_ASSIGN_OR_RETURN(
          delta,
          TorchCall([&] { return trained.sub(it->second.to(at::kCPU, at::kFloat)).contiguous(); }, "peft: bias delta"));
    }
    DS_ASSIGN_OR_RETURN(const bool zero, TorchCall([&] { return delta.eq(0).all().item<bool>(); }, "peft: bias"));
    if (zero) {
      ++unchanged;
      continue;
    }
    targets.push_back(m->name);
    spec.tensors[m->name + ".bias"] = delta;
  }
  if (unchanged > 0) Note(absl::StrCat(unchanged, " saved biases equal the backbone's and were left out"));
  if (!targets.empty()) {
    Note("bias tensors imported as bitfit deltas (trained bias - backbone bias)");
    spec.config = {{"targets", targets}};
    contents_.methods.push_back(std::move(spec));
  }
  return absl::OkStatus();
}

absl::Status Importer::ImportIa3() {
  DS_RETURN_IF_ERROR(CheckOnly("lora", false));
  DS_RETURN_IF_ERROR(CheckOnly("prompt", false));
  DS_RETURN_IF_ERROR(CheckOnly("bias", false));
  DS_RETURN_IF_ERROR(CheckTargetModules("ia3"));
  DS_ASSIGN_OR_RETURN(const bool fan_in_fan_out, config_.Bool("fan_in_fan_out", false));
  if (fan_in_fan_out) provenance_["fan_in_fan_out"] = true;
  if (ia3_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(file_.path(), " holds no (IA)^3 tensors (\"<module>.ia3_l\")"));
  }
  MethodSpec spec;
  spec.kind = MethodKind::kIa3;
  std::vector<std::string> targets, feedforward;
  for (const auto& [path, key] : ia3_) {
    DS_ASSIGN_OR_RETURN(const model::ModuleInfo* m, ModuleOf(key, path, {model::ModuleKind::kLinear}));
    if (m->kind != model::ModuleKind::kLinear) {
      return absl::UnimplementedError(absl::StrCat(file_.path(), ": tensor \"", key, "\" is an (IA)^3 vector on ",
                                                   model::ModuleKindName(m->kind), " module \"", m->name,
                                                   "\": deltaserve's ia3 applies to linear modules only"));
    }
    DS_ASSIGN_OR_RETURN(at::Tensor l, Load(key));
    // PEFT: [out, 1] scales the output; [1, in] (feedforward_modules) scales the input.
    bool ff = false;
    if (l.dim() == 2 && l.size(1) == 1 && l.size(0) == m->out_features) {
      ff = false;
    } else if (l.dim() == 2 && l.size(0) == 1 && l.size(1) == m->in_features) {
      ff = true;
    } else {
      return KeyError(key, absl::StrCat("has shape ", ShapeString(l.sizes()), ", expected [", m->out_features,
                                        ", 1] (scales the output) or [1, ", m->in_features,
                                        "] (feedforward_modules: scales the input) for module \"", m->name, "\""));
    }
    targets.push_back(m->name);
    if (ff) feedforward.push_back(m->name);
    DS_ASSIGN_OR_RETURN(spec.tensors[m->name + ".ia3_l"],
                        TorchCall([&] { return l.reshape({-1}).contiguous(); }, "peft: ia3 vector"));
  }
  spec.config = {{"targets", targets}, {"feedforward", feedforward}};
  contents_.methods.push_back(std::move(spec));
  return absl::OkStatus();
}

absl::Status Importer::ImportPrompt() {
  DS_RETURN_IF_ERROR(CheckOnly("lora", false));
  DS_RETURN_IF_ERROR(CheckOnly("ia3", false));
  DS_RETURN_IF_ERROR(CheckOnly("bias", false));
  DS_ASSIGN_OR_RETURN(const int64_t submodules, config_.PositiveInt("num_transformer_submodules", 1));
  if (submodules != 1) {
    return config_.Unimplemented("num_transformer_submodules",
                                 absl::StrCat("is ", submodules, ": only encoder-only models (1) are supported"));
  }
  if (peft_type_ == "PROMPT_TUNING") {
    DS_ASSIGN_OR_RETURN(const std::string init, config_.String("prompt_tuning_init", "RANDOM"));
    // Every PEFT init only chooses the starting point of training: the saved embeddings are all inference needs.
    if (init != "RANDOM" && init != "TEXT" && init != "SAMPLE_VOCAB") {
      return config_.Unimplemented("prompt_tuning_init",
                                   absl::StrCat("is \"", init, "\" (supported: RANDOM, TEXT, SAMPLE_VOCAB)"));
    }
    provenance_["prompt_tuning_init"] = init;
  } else {
    DS_ASSIGN_OR_RETURN(const std::string encoder, config_.String("encoder_reparameterization_type", "MLP"));
    provenance_["encoder_reparameterization_type"] = encoder;
    Note("P_TUNING: prompt_embeddings are the prompt encoder's outputs; imported as prompt tuning");
  }
  DS_ASSIGN_OR_RETURN(const int64_t p, config_.PositiveInt("num_virtual_tokens", -1));
  const model::ModuleInfo* emb = index_.Resolve("embeddings.word_embeddings", nullptr);
  if (emb == nullptr || emb->kind != model::ModuleKind::kEmbedding) {
    return absl::UnimplementedError(
        absl::StrCat("model \"", model_.info().name, "\" has no embeddings.word_embeddings module for prompt tuning"));
  }
  const int64_t e = emb->out_features;
  DS_ASSIGN_OR_RETURN(const int64_t token_dim, config_.PositiveInt("token_dim", e));
  if (token_dim != e) {
    return config_.Error("token_dim",
                         absl::StrCat("is ", token_dim, ", but the model's word embeddings are ", e, " wide"));
  }
  if (prompt_key_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(file_.path(), " has no tensor \"prompt_embeddings\""));
  }
  DS_ASSIGN_OR_RETURN(at::Tensor t, Load(prompt_key_));
  if (t.dim() != 2 || t.size(0) != p || t.size(1) != e) {
    return KeyError(prompt_key_, absl::StrCat("has shape ", ShapeString(t.sizes()), ", expected [", p, ", ", e,
                                              "] (num_virtual_tokens, token_dim)"));
  }
  MethodSpec spec;
  spec.kind = MethodKind::kPrompt;
  spec.config = {{"num_virtual_tokens", p}};
  spec.tensors["prompt_embeddings"] = t;
  contents_.methods.push_back(std::move(spec));
  return absl::OkStatus();
}

absl::Status Importer::ImportPrefix() {
  DS_RETURN_IF_ERROR(CheckOnly("lora", false));
  DS_RETURN_IF_ERROR(CheckOnly("ia3", false));
  DS_RETURN_IF_ERROR(CheckOnly("bias", false));
  DS_ASSIGN_OR_RETURN(const int64_t submodules, config_.PositiveInt("num_transformer_submodules", 1));
  if (submodules != 1) {
    return config_.Unimplemented("num_transformer_submodules",
                                 absl::StrCat("is ", submodules, ": only encoder-only models (1) are supported"));
  }
  DS_ASSIGN_OR_RETURN(const int64_t p, config_.PositiveInt("num_virtual_tokens", -1));
  DS_ASSIGN_OR_RETURN(const int64_t layers, config_.PositiveInt("num_layers", -1));
  DS_ASSIGN_OR_RETURN(const int64_t heads, config_.PositiveInt("num_attention_heads", -1));
  DS_ASSIGN_OR_RETURN(const int64_t token_dim, config_.PositiveInt("token_dim", -1));
  DS_ASSIGN_OR_RETURN(const bool projection, config_.Bool("prefix_projection", false));
  if (token_dim % heads != 0) {
    return config_.Error("token_dim",
                         absl::StrCat("is ", token_dim, ", not a multiple of num_attention_heads ", heads));
  }
  const int64_t head_dim = token_dim / heads;
  // The model's attention modules by layer.
  std::vector<const model::ModuleInfo*> attention;
  for (const model::ModuleInfo& m : model_.modules()) {
    if (m.kind == model::ModuleKind::kAttention) attention.push_back(&m);
  }
  std::stable_sort(attention.begin(), attention.end(),
                   [](const model::ModuleInfo* a, const model::ModuleInfo* b) { return a->layer < b->layer; });
  if (static_cast<int64_t>(attention.size()) != layers) {
    return config_.Error("num_layers", absl::StrCat("is ", layers, ", but model \"", model_.info().name, "\" has ",
                                                    attention.size(), " attention layers"));
  }
  for (const model::ModuleInfo* a : attention) {
    if (a->num_heads != heads || a->head_dim != head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(config_.path(), ": num_attention_heads ", heads, " and token_dim ",
                                                     token_dim, " give ", heads, " heads of ", head_dim, ", but \"",
                                                     a->name, "\" has ", a->num_heads, " heads of ", a->head_dim));
    }
  }
  if (prompt_key_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(file_.path(), " has no tensor \"prompt_embeddings\""));
  }
  DS_ASSIGN_OR_RETURN(at::Tensor t, Load(prompt_key_));
  const int64_t width = layers * 2 * token_dim;
  if (projection && t.dim() == 2 && t.size(1) != width) {
    return config_.Unimplemented(
        "prefix_projection",
        absl::StrCat("is true and \"", prompt_key_, "\" has shape ", ShapeString(t.sizes()),
                     ", not the projected prefixes [", p, ", ", width,
                     "]: the prefix MLP is not supported; save the projected prefixes (PEFT's get_prompt / "
                     "save_pretrained of a model in training mode writes them)"));
  }
  if (t.dim() != 2 || t.size(0) != p || t.size(1) != width) {
    return KeyError(prompt_key_, absl::StrCat("has shape ", ShapeString(t.sizes()), ", expected [", p, ", ", width,
                                              "] (num_virtual_tokens, num_layers * 2 * token_dim)"));
  }
  if (projection) {
    provenance_["prefix_projection"] = true;
    Note("prefix_projection: prompt_embeddings hold the projected prefixes; the MLP is not needed");
  }
  // get_prompt: view [P, 2L, NH, DH], permute to [2L, NH, P, DH], split in pairs -> layer l = (keys 2l, values 2l+1).
  // Ours: "<attention>.prefix_keys" [P, NH*DH] with row p = head-major [NH, DH].
  MethodSpec spec;
  spec.kind = MethodKind::kPrefix;
  std::vector<std::string> targets;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        const at::Tensor v = t.view({p, 2 * layers, heads, head_dim});
        for (int64_t l = 0; l < layers; ++l) {
          const std::string& name = attention[l]->name;
          spec.tensors[name + ".prefix_keys"] = v.select(1, 2 * l).reshape({p, token_dim}).contiguous();
          spec.tensors[name + ".prefix_values"] = v.select(1, 2 * l + 1).reshape({p, token_dim}).contiguous();
          targets.push_back(name);
        }
      },
      "peft: splitting the prefix"));
  spec.config = {{"num_virtual_tokens", p}, {"targets", targets}};
  contents_.methods.push_back(std::move(spec));
  if (model_.info().family == "bert") {
    Note(
        "prefix: Hugging Face BERT models give the input tokens positions P..P+T-1 when past_key_values are "
        "passed; deltaserve's prefix keeps positions 0..T-1 (keys and values are PEFT's exactly)");
  }
  return absl::OkStatus();
}

// The HF pooler (dense [H, H] + bias) for a BERT-style classifier: from the adapter file (modules_to_save) or
// else from options.base_checkpoint. False when not found.
absl::StatusOr<bool> Importer::FindPooler(at::Tensor* weight, at::Tensor* bias, std::string* source) {
  std::string w_key, b_key;
  for (const auto& [path, key] : head_) {
    if (absl::EndsWith(path, "pooler.dense.weight")) w_key = key;
    if (absl::EndsWith(path, "pooler.dense.bias")) b_key = key;
  }
  if (!w_key.empty()) {
    DS_ASSIGN_OR_RETURN(*weight, Load(w_key));
    if (b_key.empty()) return KeyError(w_key, "has no partner pooler bias");
    DS_ASSIGN_OR_RETURN(*bias, Load(b_key));
    *source = file_.path();
    return true;
  }
  if (options_.base_checkpoint.empty()) return false;
  DS_ASSIGN_OR_RETURN(std::unique_ptr<model::SafetensorsFile> base,
                      model::SafetensorsFile::Open(options_.base_checkpoint));
  std::string best;
  for (const std::string& name : base->names()) {
    if ((name == "pooler.dense.weight" || absl::EndsWith(name, ".pooler.dense.weight")) &&
        (best.empty() || name.size() < best.size())) {
      best = name;
    }
  }
  if (best.empty()) return false;
  const std::string bias_name = StripSuffix(best, "weight") + "bias";
  auto load = [&](const std::string& name) -> absl::StatusOr<at::Tensor> {
    absl::StatusOr<at::Tensor> t = base->Load(name, at::kFloat);
    if (!t.ok()) {
      return absl::Status(t.status().code(),
                          absl::StrCat(base->path(), ": tensor \"", name, "\": ", t.status().message()));
    }
    return *t;
  };
  DS_ASSIGN_OR_RETURN(*weight, load(best));
  DS_ASSIGN_OR_RETURN(*bias, load(bias_name));
  // The trained pooler bias (bias="all") replaces the base one.
  if (!b_key.empty()) {
    DS_ASSIGN_OR_RETURN(*bias, Load(b_key));
  }
  *source = base->path();
  return true;
}

absl::Status Importer::ImportHead() {
  // Split the head tensors: classifier vs pooler.
  std::map<std::string, std::string> classifier;
  bool pooler_only = true;
  for (const auto& [path, key] : head_) {
    if (IsHeadPath(path)) {
      classifier[path] = key;
      pooler_only = false;
    }
  }
  if (head_.empty()) return absl::OkStatus();
  if (pooler_only) {
    Note("pooler tensors ignored: the adapter has no classifier");
    return absl::OkStatus();
  }
  if (options_.skip_head) {
    Note("modules_to_save classifier not imported (skip_head)");
    return absl::OkStatus();
  }
  const model::ModelInfo& info = model_.info();
  const bool cls_pooling = info.pooling == "cls";
  auto require = [&](const char* path) -> absl::StatusOr<at::Tensor> {
    auto it = classifier.find(path);
    if (it == classifier.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_.path(), ": the classifier has no \"", path, "\" (found: ",
                       absl::StrJoin(classifier, ", ",
                                     absl::PairFormatter(absl::AlphaNumFormatter(), "=", absl::AlphaNumFormatter())),
                       ")"));
    }
    return Load(it->second);
  };
  HeadSpec head;
  at::Tensor out_w, out_b, dense_w, dense_b;
  std::string activation = "tanh";
  bool exact = false;
  std::string layout, difference;
  if (classifier.count("classifier.weight") || classifier.count("classifier.bias")) {
    // BertForSequenceClassification: classifier(dropout(tanh(pooler.dense(CLS state)))).
    layout = "bert";
    if (classifier.size() != 2) {
      return KeyError(classifier.begin()->second,
                      "is part of a classifier of an unknown layout (expected "
                      "classifier.weight + classifier.bias, or classifier.dense.* + "
                      "classifier.out_proj.*)");
    }
    DS_ASSIGN_OR_RETURN(out_w, require("classifier.weight"));
    DS_ASSIGN_OR_RETURN(out_b, require("classifier.bias"));
    std::string source;
    DS_ASSIGN_OR_RETURN(const bool have_pooler, FindPooler(&dense_w, &dense_b, &source));
    if (!cls_pooling) {
      difference = absl::StrCat("the model pools \"", info.pooling, "\", not the CLS state the HF pooler reads");
    } else if (!have_pooler) {
      difference = "the HF pooler weights (pooler.dense) were found neither in the adapter nor in the base checkpoint";
    } else {
      exact = true;
      provenance_["head_pooler_from"] = source == file_.path() ? "adapter" : "base_checkpoint";
    }
  } else {
    // RobertaClassificationHead / ElectraClassificationHead: out_proj(act(dense(CLS state))).
    layout = "roberta";
    if (classifier.size() != 4) {
      return KeyError(classifier.begin()->second,
                      "is part of a classifier of an unknown layout (expected "
                      "classifier.weight + classifier.bias, or classifier.dense.* + "
                      "classifier.out_proj.*)");
    }
    DS_ASSIGN_OR_RETURN(dense_w, require("classifier.dense.weight"));
    DS_ASSIGN_OR_RETURN(dense_b, require("classifier.dense.bias"));
    DS_ASSIGN_OR_RETURN(out_w, require("classifier.out_proj.weight"));
    DS_ASSIGN_OR_RETURN(out_b, require("classifier.out_proj.bias"));
    if (prefixes_.count("electra.")) activation = "gelu";
    if (!cls_pooling) {
      difference = absl::StrCat("the model pools \"", info.pooling, "\", not the CLS state the head reads");
    } else {
      exact = true;
    }
  }
  if (out_w.dim() != 2 || out_w.size(0) < 1) {
    return KeyError(classifier.begin()->second,
                    absl::StrCat("(the classifier's output weight) has shape ", ShapeString(out_w.sizes())));
  }
  const int64_t n = out_w.size(0);
  if (!exact && !options_.import_head) {
    Note(absl::StrCat("modules_to_save classifier (", n, " outputs) not imported: it cannot be reproduced exactly (",
                      difference, "); set import_head to import it anyway"));
    return absl::OkStatus();
  }
  if (!options_.labels.empty() && static_cast<int64_t>(options_.labels.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat(options_.labels.size(), " labels given, but the classifier in ",
                                                   file_.path(), " has ", n, " outputs"));
  }
  if (n == 1 && options_.labels.empty()) {
    head.config["type"] = "regression";
  } else {
    std::vector<std::string> labels = options_.labels;
    for (int64_t i = 0; labels.empty() && i < n; ++i) labels.push_back(absl::StrCat("LABEL_", i));
    for (int64_t i = static_cast<int64_t>(labels.size()); i < n; ++i) labels.push_back(absl::StrCat("LABEL_", i));
    head.config["type"] = "classification";
    head.config["labels"] = labels;
  }
  if (exact || layout == "roberta") {
    head.config["activation"] = activation;
    head.tensors["dense.weight"] = dense_w;
    head.tensors["dense.bias"] = dense_b;
  }
  head.tensors["out.weight"] = out_w;
  head.tensors["out.bias"] = out_b;
  provenance_["head"] = layout == "bert" ? "BertForSequenceClassification classifier on the pooler"
                                         : absl::StrCat("classification head dense + ", activation, " + out_proj");
  if (exact) {
    provenance_["head_exact"] = true;
  } else {
    provenance_["head_exact"] = false;
    Note(absl::StrCat("head imported on request although it differs from the checkpoint's: ", difference,
                      layout == "bert" ? "; the classifier is applied to the pooled embedding directly" : ""));
  }
  contents_.head = std::move(head);
  return absl::OkStatus();
}

absl::StatusOr<PackContents> Importer::Run() {
  DS_ASSIGN_OR_RETURN(peft_type_, config_.String("peft_type", ""));
  if (peft_type_.empty()) return config_.Error("peft_type", "is required");
  if (peft_type_ != "LORA" && peft_type_ != "IA3" && peft_type_ != "PROMPT_TUNING" && peft_type_ != "P_TUNING" &&
      peft_type_ != "PREFIX_TUNING") {
    return config_.Unimplemented("peft_type", absl::StrCat("is \"", peft_type_, "\"; supported: ", kSupportedTypes));
  }
  DS_RETURN_IF_ERROR(Classify());
  if (peft_type_ == "LORA") {
    DS_RETURN_IF_ERROR(ImportLora());
  } else if (peft_type_ == "IA3") {
    DS_RETURN_IF_ERROR(ImportIa3());
  } else if (peft_type_ == "PREFIX_TUNING") {
    DS_RETURN_IF_ERROR(ImportPrefix());
  } else {
    DS_RETURN_IF_ERROR(ImportPrompt());
  }
  DS_RETURN_IF_ERROR(ImportHead());

  // Manifest.
  PackManifest& manifest = contents_.manifest;
  manifest.backbone_family = model_.info().family;
  manifest.backbone_fingerprint = model_.info().fingerprint;
  provenance_["imported_from"] = "peft";
  provenance_["peft_type"] = peft_type_;
  for (const char* key : {"base_model_name_or_path", "task_type", "revision", "peft_version"}) {
    const nlohmann::json* v = config_.Get(key);
    if (v != nullptr && v->is_string()) provenance_[key] = *v;
  }
  std::set<std::string> prefixes = prefixes_;
  prefixes.erase("");
  if (prefixes.size() == 1) provenance_["module_prefix"] = *prefixes.begin();
  if (!notes_.empty()) provenance_["notes"] = notes_;
  manifest.provenance = std::move(provenance_);
  const auto& meta = file_.metadata();
  if (auto it = meta.find(kMetaProvenance); it != meta.end()) {
    // Written by ExportPeftLora: the pack's own provenance, so that export + import is the identity.
    nlohmann::json stored = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    if (!stored.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_.path(), ": metadata \"", kMetaProvenance, "\" is not a JSON object"));
    }
    manifest.provenance = std::move(stored);
  }
  if (auto it = meta.find(kMetaName); it != meta.end()) manifest.name = it->second;
  if (!options_.name.empty()) manifest.name = options_.name;

  // Bind: validates everything against the model and gives the canonical specs.
  DS_ASSIGN_OR_RETURN(std::shared_ptr<const DeltaPack> pack,
                      DeltaPack::FromContents(contents_, model_, options_.limits));
  PackContents canonical;
  canonical.manifest = pack->manifest();
  for (const auto& method : pack->methods()) canonical.methods.push_back(method->spec());
  if (pack->head() != nullptr) canonical.head = pack->head()->spec();
  return canonical;
}

// mkdir -p.
absl::Status MakeDirectories(const std::string& dir) {
  std::string path;
  for (absl::string_view part : absl::StrSplit(dir, '/')) {
    if (path.empty() && dir.front() == '/') path = "/";
    if (part.empty()) continue;
    absl::StrAppend(&path, path.empty() || path.back() == '/' ? "" : "/", part);
    if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::PermissionDeniedError(absl::StrCat("cannot create directory ", path, ": ", std::strerror(errno)));
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(dir, " is not a directory"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PackContents> ImportPeft(const std::string& peft_dir, const model::Model& model,
                                        const PeftImportOptions& options) {
  const std::string config_path = JoinPath(peft_dir, kConfigFile);
  const std::string weights_path = JoinPath(peft_dir, kWeightsFile);
  DS_ASSIGN_OR_RETURN(nlohmann::json json, ReadJsonFile(config_path));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, " is not a JSON object (got ", json.type_name(), ")"));
  }
  if (!FileExists(weights_path)) {
    if (FileExists(JoinPath(peft_dir, kPickleWeightsFile))) {
      return absl::UnimplementedError(absl::StrCat(peft_dir, " holds ", kPickleWeightsFile,
                                                   " (a pickle), which is not read: save the adapter with "
                                                   "safe_serialization=True (the default) or convert it to ",
                                                   kWeightsFile));
    }
    return absl::NotFoundError(absl::StrCat(weights_path, " is missing"));
  }
  DS_ASSIGN_OR_RETURN(std::unique_ptr<model::SafetensorsFile> file, model::SafetensorsFile::Open(weights_path));
  PeftConfig config(config_path, std::move(json));
  Importer importer(config, *file, model, options);
  return importer.Run();
}

absl::Status ExportPeftLora(const PackContents& contents, const model::Model& model, const std::string& out_dir,
                            const PeftExportOptions& options) {
  if (out_dir.empty()) return absl::InvalidArgumentError("PEFT export: no output directory");
  DS_ASSIGN_OR_RETURN(std::shared_ptr<const DeltaPack> pack, DeltaPack::FromContents(contents, model, options.limits));
  const Method* lora = pack->method(MethodKind::kLora);
  std::vector<std::string> others;
  for (const auto& m : pack->methods()) {
    if (m->kind() != MethodKind::kLora) others.push_back(MethodKindName(m->kind()));
  }
  if (!others.empty()) {
    return absl::UnimplementedError(absl::StrCat("PEFT export writes LoRA packs only; pack \"", pack->manifest().name,
                                                 "\" also has: ", absl::StrJoin(others, ", ")));
  }
  if (lora == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("PEFT export writes LoRA packs only; pack \"", pack->manifest().name, "\" has no lora method"));
  }
  if (pack->head() != nullptr && !options.skip_head) {
    return absl::UnimplementedError(absl::StrCat("PEFT export writes LoRA packs only; pack \"", pack->manifest().name,
                                                 "\" has a head (skip_head leaves it out)"));
  }
  const MethodSpec& spec = lora->spec();
  const int64_t rank = spec.config.at("rank").get<int64_t>();
  const double alpha = spec.config.at("alpha").get<double>();
  const std::vector<std::string> targets = spec.config.at("targets").get<std::vector<std::string>>();

  std::map<std::string, at::Tensor> tensors;
  for (const std::string& t : targets) {
    const std::string key = absl::StrCat(kBasePrefix, options.module_prefix, t);
    tensors[key + ".lora_A.weight"] = spec.tensors.at(t + ".lora_A");
    tensors[key + ".lora_B.weight"] = spec.tensors.at(t + ".lora_B");
  }
  std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {kMetaName, pack->manifest().name},
      {kMetaProvenance, pack->manifest().provenance.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)}};

  nlohmann::json config = {
      {"peft_type", "LORA"},
      {"task_type", "FEATURE_EXTRACTION"},
      {"base_model_name_or_path", options.base_model_name_or_path},
      {"inference_mode", true},
      {"r", rank},
      {"lora_alpha", alpha},
      {"lora_dropout", 0.0},
      {"target_modules", targets},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_rslora", false},
      {"use_dora", false},
      {"init_lora_weights", true},
      {"modules_to_save", nullptr},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"rank_pattern", nlohmann::json::object()},
      {"alpha_pattern", nlohmann::json::object()},
      {"revision", nullptr},
  };
  DS_RETURN_IF_ERROR(MakeDirectories(out_dir));
  DS_RETURN_IF_ERROR(model::WriteSafetensors(JoinPath(out_dir, kWeightsFile), tensors, metadata));
  return WriteFileAtomically(JoinPath(out_dir, kConfigFile),
                             config.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

}  // namespace delta
}  // namespace deltaserve
