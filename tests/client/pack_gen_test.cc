// The load generator's packs: every recipe makes a pack the server accepts (DeltaPack::Load against the model),
// the bytes depend only on the arguments, and bad recipes are rejected with a clear message.
#include "client/loadgen/pack_gen.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/delta/delta_pack.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace loadgen {
namespace {

using ::testing::HasSubstr;

TEST(PackGenTest, EveryMixedRecipeLoadsOnEveryTestModel) {
  for (const delta::testing::NamedModel& m : delta::testing::TestModels()) {
    for (const Recipe& recipe : MixedRecipes()) {
      absl::StatusOr<std::string> bytes = MakeLoadPack(*m.model, recipe, 5, "t");
      ASSERT_TRUE(bytes.ok()) << m.name << " " << RecipeName(recipe) << ": " << bytes.status();
      absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> pack =
          delta::DeltaPack::Load(*bytes, *m.model, delta::PackLimits());
      ASSERT_TRUE(pack.ok()) << m.name << " " << RecipeName(recipe) << ": " << pack.status();
      EXPECT_EQ((*pack)->methods().size(), recipe.size());
      ASSERT_NE((*pack)->head(), nullptr);
      EXPECT_THAT((*pack)->head()->labels(), ::testing::ElementsAre("negative", "positive"));
    }
  }
}

TEST(PackGenTest, SameArgumentsGiveTheSameBytes) {
  std::shared_ptr<const model::Model> model = delta::testing::TinyBert();
  const Recipe recipe = {delta::MethodKind::kLora, delta::MethodKind::kBitFit};
  absl::StatusOr<std::string> a = MakeLoadPack(*model, recipe, 1, "x");
  absl::StatusOr<std::string> b = MakeLoadPack(*model, recipe, 1, "x");
  absl::StatusOr<std::string> c = MakeLoadPack(*model, recipe, 2, "x");
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_NE(*a, *c);
}

TEST(PackGenTest, LoraRankSetsThePackSize) {
  std::shared_ptr<const model::Model> model = delta::testing::TinyBert();
  PackGenOptions small, large;
  small.lora_rank = 2;
  large.lora_rank = 16;
  const Recipe lora = {delta::MethodKind::kLora};
  EXPECT_LT(MakeLoadPack(*model, lora, 1, "x", small)->size(), MakeLoadPack(*model, lora, 1, "x", large)->size());
}

TEST(PackGenTest, ParsesRecipes) {
  absl::StatusOr<std::vector<Recipe>> r = ParseRecipes("lora,lora+bitfit,prompt");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ(RecipeName((*r)[1]), "lora+bitfit");
  EXPECT_EQ(ParseRecipes("mixed")->size(), MixedRecipes().size());
  EXPECT_THAT(std::string(ParseRecipes("lora,dropout").status().message()), HasSubstr("dropout"));
  EXPECT_THAT(std::string(ParseRecipes("lora+lora").status().message()), HasSubstr("twice"));
  EXPECT_FALSE(MakeLoadPack(*delta::testing::TinyBert(), {}, 1, "x").ok());
}

}  // namespace
}  // namespace loadgen
}  // namespace deltaserve
