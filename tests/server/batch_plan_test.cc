#include "server/batching/batch_plan.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace batching {
namespace {

using ::testing::ElementsAre;

TEST(PlanForwardPassesTest, KeepsOnePassInOriginalOrderWhenPaddingIsSmall) {
  EXPECT_THAT(PlanForwardPasses({10, 12, 11, 9}, 1.5), ElementsAre(ElementsAre(0, 1, 2, 3)));
  EXPECT_TRUE(PlanForwardPasses({}, 1.5).empty());
}

TEST(PlanForwardPassesTest, SplitsLengthSkewedRowsIntoSortedPasses) {
  const auto passes = PlanForwardPasses({40, 3, 38, 4, 5}, 1.5);
  ASSERT_EQ(passes.size(), 2u);
  EXPECT_THAT(passes[0], ElementsAre(1, 3, 4));
  EXPECT_THAT(passes[1], ElementsAre(2, 0));
}

TEST(PlanForwardPassesTest, NeverSplitsWithANonPositiveRatio) {
  EXPECT_THAT(PlanForwardPasses({40, 3, 38}, 0), ElementsAre(ElementsAre(0, 1, 2)));
}

TEST(PlanForwardPassesTest, KeepsRowsOfDifferentGroupsInDifferentPasses) {
  // Lengths alone would share one pass; the groups do not.
  EXPECT_THAT(PlanForwardPasses({30, 40, 31, 40}, 1.5, {0, 1, 0, 1}),
              ElementsAre(ElementsAre(0, 2), ElementsAre(1, 3)));
  EXPECT_THAT(PlanForwardPasses({30, 40, 31}, 0, {1, 0, 1}), ElementsAre(ElementsAre(0, 2), ElementsAre(1)));
  // Within a group, the padding ratio still splits.
  EXPECT_THAT(PlanForwardPasses({40, 3, 4, 50}, 1.5, {0, 0, 0, 1}),
              ElementsAre(ElementsAre(1, 2), ElementsAre(0), ElementsAre(3)));
  // One group: as without groups.
  EXPECT_THAT(PlanForwardPasses({10, 12}, 1.5, {2, 2}), ElementsAre(ElementsAre(0, 1)));
}

TEST(PlanForwardPassesTest, EveryRowLandsInExactlyOnePass) {
  std::vector<int64_t> lengths;
  for (int i = 0; i < 100; ++i) lengths.push_back(1 + (i * 37) % 120);
  std::vector<int> seen(lengths.size(), 0);
  for (const auto& pass : PlanForwardPasses(lengths, 1.2)) {
    int64_t longest = 0, real = 0;
    for (size_t i : pass) {
      seen[i]++;
      longest = std::max(longest, lengths[i]);
      real += lengths[i];
    }
    // A pass over the ratio can only be a single row.
    if (pass.size() > 1) EXPECT_LE(longest * static_cast<int64_t>(pass.size()), 1.2 * real + 1e-9);
  }
  for (int s : seen) EXPECT_EQ(s, 1);
}

}  // namespace
}  // namespace batching
}  // namespace deltaserve
