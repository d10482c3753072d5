#include "server/delta/module_patterns.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using model::ModuleKind;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<std::string> Names(const std::vector<const model::ModuleInfo*>& modules) {
  std::vector<std::string> out;
  for (const auto* m : modules) out.push_back(m->name);
  return out;
}

TEST(PatternMatchesTest, ExactAndDottedSuffix) {
  const std::string name = "encoder.layer.0.attention.self.query";
  EXPECT_TRUE(PatternMatches(name, name));
  EXPECT_TRUE(PatternMatches("query", name));
  EXPECT_TRUE(PatternMatches("self.query", name));
  EXPECT_TRUE(PatternMatches("attention.self.query", name));
  EXPECT_TRUE(PatternMatches("0.attention.self.query", name));
  // A suffix must start at a dot.
  EXPECT_FALSE(PatternMatches("uery", name));
  EXPECT_FALSE(PatternMatches("f.query", name));
  EXPECT_FALSE(PatternMatches("encoder.layer.0", name));
  EXPECT_FALSE(PatternMatches(".query", name));  // ".query" is not "query" preceded by a dot boundary
  EXPECT_FALSE(PatternMatches("", name));
  EXPECT_FALSE(PatternMatches("x." + name, name));
}

TEST(PatternMatchesTest, RegexIsAFullMatch) {
  const std::string name = "encoder.layer.3.attention.self.query";
  EXPECT_TRUE(PatternMatches(R"(re:encoder\.layer\.[0-5]\..*\.query)", name));
  EXPECT_TRUE(PatternMatches("re:.*query", name));
  EXPECT_FALSE(PatternMatches("re:query", name));  // full match, not search
  EXPECT_FALSE(PatternMatches(R"(re:encoder\.layer\.[4-5]\..*\.query)", name));
  EXPECT_FALSE(PatternMatches("re:(", name));  // malformed: matches nothing
  // Without "re:" a regex is a literal.
  EXPECT_FALSE(PatternMatches(".*query", name));
}

TEST(ValidatePatternTest, Errors) {
  EXPECT_TRUE(ValidatePattern("query").ok());
  EXPECT_TRUE(ValidatePattern("re:.*query").ok());
  EXPECT_EQ(ValidatePattern("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidatePattern("re:").code(), absl::StatusCode::kInvalidArgument);
  absl::Status s = ValidatePattern("re:encoder.(layer");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("re:encoder.(layer"));
  EXPECT_EQ(ValidatePattern("re:[a-").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidatePattern("re:a{2,1}").code(), absl::StatusCode::kInvalidArgument);
}

class ResolveTargetsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = testing::TinyBert();
    ASSERT_NE(model_, nullptr);
  }
  std::shared_ptr<const model::Model> model_;
};

TEST_F(ResolveTargetsTest, SuffixSelectsEveryLayerInModuleOrder) {
  auto r = ResolveTargets({"value", "query"}, *model_, {ModuleKind::kLinear});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(Names(*r), ElementsAre("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
                                     "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"));
}

TEST_F(ResolveTargetsTest, OverlappingPatternsGiveEachModuleOnce) {
  auto r = ResolveTargets({"query", "encoder.layer.1.attention.self.query", "re:.*\\.1\\..*query"}, *model_,
                          {ModuleKind::kLinear});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(Names(*r), ElementsAre("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"));
}

TEST_F(ResolveTargetsTest, KindsFilter) {
  // "output.dense" is a linear; "attention.output" is a block output; "LayerNorm" are layer norms.
  auto r = ResolveTargets({"LayerNorm"}, *model_, {ModuleKind::kLayerNorm});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(Names(*r), ElementsAre("embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm",
                                     "encoder.layer.0.output.LayerNorm", "encoder.layer.1.attention.output.LayerNorm",
                                     "encoder.layer.1.output.LayerNorm"));
  auto lin_or_ln =
      ResolveTargets({"re:encoder\\.layer\\.0\\.output\\..*"}, *model_, {ModuleKind::kLinear, ModuleKind::kLayerNorm});
  ASSERT_TRUE(lin_or_ln.ok()) << lin_or_ln.status();
  EXPECT_THAT(Names(*lin_or_ln), ElementsAre("encoder.layer.0.output.dense", "encoder.layer.0.output.LayerNorm"));
  // A layer norm asked for as a linear matches nothing.
  auto none = ResolveTargets({"LayerNorm"}, *model_, {ModuleKind::kLinear});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ResolveTargetsTest, NoMatchNamesPatternKindsAndClosest) {
  auto r = ResolveTargets({"query", "atention.self.qurey"}, *model_, {ModuleKind::kLinear});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("\"atention.self.qurey\""));
  EXPECT_THAT(r.status().message(), HasSubstr(model::ModuleKindName(ModuleKind::kLinear)));
  EXPECT_THAT(r.status().message(), HasSubstr("encoder.layer.0.attention.self.query"));
}

TEST_F(ResolveTargetsTest, MalformedRegexIsInvalidArgument) {
  auto r = ResolveTargets({"re:(query"}, *model_, {ModuleKind::kLinear});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("re:(query"));
  auto empty = ResolveTargets({""}, *model_, {ModuleKind::kLinear});
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ResolveTargetsTest, EmptyPatternListResolvesToNothing) {
  auto r = ResolveTargets({}, *model_, {ModuleKind::kLinear});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->empty());
}

TEST_F(ResolveTargetsTest, ClosestModuleNames) {
  auto closest = ClosestModuleNames("encoder.layer.1.attention.self.qurey", *model_, {ModuleKind::kLinear}, 3);
  ASSERT_EQ(closest.size(), 3u);
  EXPECT_EQ(closest[0], "encoder.layer.1.attention.self.query");
  // The "re:" prefix is not part of the distance.
  auto re = ClosestModuleNames("re:encoder.layer.1.attention.self.key", *model_, {ModuleKind::kLinear}, 1);
  EXPECT_THAT(re, ElementsAre("encoder.layer.1.attention.self.key"));
  // Ties keep module order: both layers' "output.dense" are at distance 1 from "encoder.layer.X.output.dense".
  auto tie = ClosestModuleNames("encoder.layer.X.output.dense", *model_, {ModuleKind::kLinear}, 2);
  EXPECT_THAT(tie, ElementsAre("encoder.layer.0.output.dense", "encoder.layer.1.output.dense"));
  // n larger than the candidates: every candidate once.
  auto all = ClosestModuleNames("LayerNorm", *model_, {ModuleKind::kLayerNorm}, 100);
  EXPECT_EQ(all.size(), 5u);
  EXPECT_TRUE(ClosestModuleNames("x", *model_, {ModuleKind::kLinear}, 0).empty());
}

TEST_F(ResolveTargetsTest, ClosestModuleNamesComparesShortPatternsWithSuffixes) {
  // "querry" is far from every full name but one edit from the last component of each query: those come first,
  // in module order.
  auto one = ClosestModuleNames("querry", *model_, {ModuleKind::kLinear}, 2);
  EXPECT_THAT(one, ElementsAre("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"));
  // Three components are compared with the last three.
  auto three = ClosestModuleNames("attention.self.qurey", *model_, {ModuleKind::kLinear}, 2);
  EXPECT_THAT(three, ElementsAre("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"));
  auto two = ClosestModuleNames("outptu.dense", *model_, {ModuleKind::kLinear}, 4);
  EXPECT_THAT(two, ElementsAre("encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense",
                               "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"));
  // The full name still counts: a pattern longer than a name is compared with all of it.
  auto full = ClosestModuleNames("encoder.layer.1.attention.self.vaule", *model_, {ModuleKind::kLinear}, 1);
  EXPECT_THAT(full, ElementsAre("encoder.layer.1.attention.self.value"));
  // And the suggestions reach ResolveTargets' message.
  auto r = ResolveTargets({"querry"}, *model_, {ModuleKind::kLinear});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("closest: encoder.layer.0.attention.self.query, "
                                              "encoder.layer.1.attention.self.query"));
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
