// Delta packs made up for load tests: one pack per task, each with a recipe of methods (LoRA, BitFit, (IA)^3,
// prompt, adapter, combinations, ...) and a two-label classification head, with small random weights drawn from
// a seed. The same arguments always give the same canonical bytes, so pushing them again adds no versions.
//
// Needs the served model (its module names and shapes); the packs are validated by the server when pushed.
// Pure functions; thread-safe (each call draws from its own engine).
#ifndef DELTASERVE_CLIENT_LOADGEN_PACK_GEN_H_
#define DELTASERVE_CLIENT_LOADGEN_PACK_GEN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/delta/method.h"
#include "server/model/model.h"

namespace deltaserve {
namespace loadgen {

// The methods one pack holds (at most one of each kind).
using Recipe = std::vector<delta::MethodKind>;

// The recipes of "mixed": lora, bitfit, ia3, prompt, adapter, lora+bitfit, ln_tuning, prefix, parallel_adapter,
// prompt+adapter — task i gets recipe i mod 10.
const std::vector<Recipe>& MixedRecipes();

// "mixed", or a comma-separated list of recipes, each method names joined by '+' ("lora", "lora,ia3",
// "lora+bitfit,prompt"). INVALID_ARGUMENT naming the bad part (unknown method, a method twice in one recipe).
absl::StatusOr<std::vector<Recipe>> ParseRecipes(const std::string& spec);
// "lora+bitfit".
std::string RecipeName(const Recipe& recipe);

struct PackGenOptions {
  // LoRA rank (on every attention and feed-forward linear).
  int64_t lora_rank = 8;
  // Adapter / parallel adapter bottleneck width.
  int64_t bottleneck = 16;
  // Prompt / prefix virtual tokens.
  int64_t virtual_tokens = 10;
  // Standard deviation of the random weights (small: the packs nudge the model, they do not wreck it).
  double scale = 0.02;
};

// The canonical bytes of a pack named `name` for `model` holding `recipe` and a classification head
// ("negative", "positive"), weights drawn from `seed`. INVALID_ARGUMENT for an empty recipe or one a model has
// no modules for (e.g. prefix on a model without attention modules).
absl::StatusOr<std::string> MakeLoadPack(const model::Model& model, const Recipe& recipe, uint64_t seed,
                                         const std::string& name, const PackGenOptions& options = {});

}  // namespace loadgen
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_LOADGEN_PACK_GEN_H_
