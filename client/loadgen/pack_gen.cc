#include "client/loadgen/pack_gen.h"

#include <random>
#include <set>

#include "ATen/ATen.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/delta_pack.h"

namespace deltaserve {
namespace loadgen {
namespace {

using delta::MethodKind;
using delta::MethodSpec;
using model::ModuleInfo;
using model::ModuleKind;

class Draw {
 public:
  Draw(uint64_t seed, double scale) : rng_(seed), dist_(0.f, static_cast<float>(scale)) {}
  at::Tensor operator()(std::vector<int64_t> shape, float offset = 0.f) {
    at::Tensor t = at::empty(shape, at::kFloat);
    float* p = t.data_ptr<float>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = offset + dist_(rng_);
    return t;
  }

 private:
  std::mt19937_64 rng_;
  std::normal_distribution<float> dist_;
};

bool IsLayerLinear(const ModuleInfo& m) { return m.kind == ModuleKind::kLinear && m.layer >= 0; }

absl::StatusOr<MethodSpec> MakeSpec(const model::Model& model, MethodKind kind, const PackGenOptions& o, Draw& draw) {
  MethodSpec s;
  s.kind = kind;
  const auto& mods = model.modules();
  switch (kind) {
    case MethodKind::kLora: {
      std::vector<std::string> targets;
      for (const ModuleInfo& m : mods) {
        if (!IsLayerLinear(m)) continue;
        targets.push_back(m.name);
        s.tensors[m.name + ".lora_A"] = draw({o.lora_rank, m.in_features});
        s.tensors[m.name + ".lora_B"] = draw({m.out_features, o.lora_rank});
      }
      s.config = {{"rank", o.lora_rank}, {"alpha", 2 * o.lora_rank}, {"targets", targets}};
      break;
    }
    case MethodKind::kBitFit:
      for (const ModuleInfo& m : mods) {
        if (m.kind == ModuleKind::kLinear) s.tensors[m.name + ".bias"] = draw({m.out_features});
        if (m.kind == ModuleKind::kLayerNorm) s.tensors[m.name + ".bias"] = draw({m.in_features});
      }
      break;
    case MethodKind::kLnTuning:
      for (const ModuleInfo& m : mods) {
        if (m.kind != ModuleKind::kLayerNorm) continue;
        s.tensors[m.name + ".weight"] = draw({m.in_features});
        s.tensors[m.name + ".bias"] = draw({m.in_features});
      }
      break;
    case MethodKind::kIa3:
      // The default targets: attention keys and values (output scaling) and FFN down-projections (input).
      for (const ModuleInfo& m : mods) {
        if (!IsLayerLinear(m)) continue;
        if (absl::EndsWith(m.name, ".key") || absl::EndsWith(m.name, ".value")) {
          s.tensors[m.name + ".ia3_l"] = draw({m.out_features}, 1.f);
        } else if (absl::EndsWith(m.name, absl::StrCat("layer.", m.layer, ".output.dense"))) {
          s.tensors[m.name + ".ia3_l"] = draw({m.in_features}, 1.f);
        }
      }
      break;
    case MethodKind::kAdapter:
    case MethodKind::kParallelAdapter: {
      std::vector<std::string> targets;
      for (const ModuleInfo& m : mods) {
        if (m.kind != ModuleKind::kBlockOutput) continue;
        if (kind == MethodKind::kParallelAdapter && absl::EndsWith(m.name, "attention.output")) continue;
        targets.push_back(m.name);
        const int64_t h = m.in_features;
        s.tensors[m.name + ".down.weight"] = draw({o.bottleneck, h});
        s.tensors[m.name + ".down.bias"] = draw({o.bottleneck});
        s.tensors[m.name + ".up.weight"] = draw({h, o.bottleneck});
        s.tensors[m.name + ".up.bias"] = draw({h});
      }
      s.config = {{"bottleneck", o.bottleneck}, {"targets", targets}};
      if (kind == MethodKind::kAdapter) s.config["placement"] = "custom";
      break;
    }
    case MethodKind::kPrefix:
      s.config = {{"num_virtual_tokens", o.virtual_tokens}};
      for (const ModuleInfo& m : mods) {
        if (m.kind != ModuleKind::kAttention) continue;
        s.tensors[m.name + ".prefix_keys"] = draw({o.virtual_tokens, m.num_heads * m.head_dim});
        s.tensors[m.name + ".prefix_values"] = draw({o.virtual_tokens, m.num_heads * m.head_dim});
      }
      break;
    case MethodKind::kPrompt:
      s.config = {{"num_virtual_tokens", o.virtual_tokens}};
      for (const ModuleInfo& m : mods) {
        if (m.name == "embeddings.word_embeddings") {
          s.tensors["prompt_embeddings"] = draw({o.virtual_tokens, m.out_features});
        }
      }
      break;
  }
  if (s.tensors.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the model (", model.info().family, ") has no modules for ",
                                                   delta::MethodKindName(kind)));
  }
  return s;
}

}  // namespace

const std::vector<Recipe>& MixedRecipes() {
  static const auto* recipes = new std::vector<Recipe>{
      {MethodKind::kLora},
      {MethodKind::kBitFit},
      {MethodKind::kIa3},
      {MethodKind::kPrompt},
      {MethodKind::kAdapter},
      {MethodKind::kLora, MethodKind::kBitFit},
      {MethodKind::kLnTuning},
      {MethodKind::kPrefix},
      {MethodKind::kParallelAdapter},
      {MethodKind::kPrompt, MethodKind::kAdapter},
  };
  return *recipes;
}

absl::StatusOr<std::vector<Recipe>> ParseRecipes(const std::string& spec) {
  if (spec == "mixed") return MixedRecipes();
  std::vector<Recipe> out;
  for (absl::string_view part : absl::StrSplit(spec, ',')) {
    Recipe recipe;
    std::set<MethodKind> seen;
    for (absl::string_view name : absl::StrSplit(part, '+')) {
      absl::StatusOr<MethodKind> kind = delta::ParseMethodKind(name);
      if (!kind.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--methods: \"", std::string(part), "\": ", std::string(kind.status().message())));
      }
      if (!seen.insert(*kind).second) {
        return absl::InvalidArgumentError(absl::StrCat("--methods: \"", std::string(part), "\" names ",
                                                       std::string(name), " twice"));
      }
      recipe.push_back(*kind);
    }
    out.push_back(std::move(recipe));
  }
  return out;
}

std::string RecipeName(const Recipe& recipe) {
  std::vector<std::string> names;
  for (MethodKind k : recipe) names.push_back(delta::MethodKindName(k));
  return absl::StrJoin(names, "+");
}

absl::StatusOr<std::string> MakeLoadPack(const model::Model& model, const Recipe& recipe, uint64_t seed,
                                         const std::string& name, const PackGenOptions& options) {
  if (recipe.empty()) return absl::InvalidArgumentError("a pack recipe needs at least one method");
  absl::StatusOr<absl::StatusOr<std::string>> bytes = TorchCall([&]() -> absl::StatusOr<std::string> {
    Draw draw(seed, options.scale);
    delta::PackContents c;
    c.manifest.name = name;
    c.manifest.backbone_family = model.info().family;
    c.manifest.backbone_fingerprint = model.info().fingerprint;
    c.manifest.provenance = {{"generator", "deltaserve-loadgen"},
                             {"description", absl::StrCat("load-test pack: ", RecipeName(recipe))}};
    for (MethodKind kind : recipe) {
      DS_ASSIGN_OR_RETURN(MethodSpec spec, MakeSpec(model, kind, options, draw));
      c.methods.push_back(std::move(spec));
    }
    delta::HeadSpec head;
    head.config = {{"type", "classification"}, {"labels", {"negative", "positive"}}};
    const int64_t d = model.info().embedding_dim;
    head.tensors["out.weight"] = draw({2, d});
    head.tensors["out.bias"] = draw({2});
    c.head = std::move(head);
    return delta::SerializePack(c);
  }, "making a load-test pack");
  if (!bytes.ok()) return bytes.status();
  return *std::move(bytes);
}

}  // namespace loadgen
}  // namespace deltaserve
